"""Entry points (train, probe, evaluate) and their DeepSpeed configs."""
