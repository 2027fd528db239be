"""Evaluation of trained runs: perplexity and bits per byte, story samples, and the comparison report."""
