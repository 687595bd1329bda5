"""Conversion between this project's checkpoints and the official Hugging Face LLaDA layout."""
