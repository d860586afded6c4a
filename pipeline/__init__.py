"""Ray jobs: corpora to WebDataset shards."""
