"""GASP data side: geometry, scene readers, pairs, shard format, synthetic scenes, loader."""
