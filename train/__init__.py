"""Training: tokenizer, data (files and synthetic), the trainer and its stages, and the CLI."""
