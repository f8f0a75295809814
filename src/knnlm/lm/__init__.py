"""Model loading, architecture adapters, tokenizers and the training loop."""
