"""Data pipeline: sources -> tokenizer -> token files -> the LitGPT DataModule."""

from tinystories_lab.data.datamodule import TinyStories

__all__ = ["TinyStories"]
