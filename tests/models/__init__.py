"""Hand-written tiny models for pass tests (no transformers): gpt-fast style and nanoGPT style."""
