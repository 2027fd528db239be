"""Train, compare and study small GPT- and LLaMA-style language models on TinyStories with LitGPT."""

__version__ = "0.1.0"
