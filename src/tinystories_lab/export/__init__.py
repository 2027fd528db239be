"""Hugging Face export: a `transformers` folder with a parity check and a model card, and its upload."""
