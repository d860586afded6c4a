"""VLM family adapters, tiny presets, the fused correspondence head and the VLM wrapper."""
