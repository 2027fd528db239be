"""Small helpers for the Markdown pages."""

from __future__ import annotations

import re


def escape(text: str) -> str:
    """Text shown literally in a Markdown table cell: one line, markup characters escaped."""
    text = re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)
    return text.replace("\r", "").replace("\n", "⏎")


def table(header: list[str], rows: list[list], align: str) -> str:
    """A Markdown table; `align` has one letter per column, 'l' (left) or 'r' (right)."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in [header, rule, *rows])
