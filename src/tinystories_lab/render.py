"""How results are shown: Markdown tables for the pages, plain-text tables for the terminal, PNG figures."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["escape", "markdown_table", "plt", "save", "text_table"]


def escape(text: str) -> str:
    """Text shown literally in a Markdown table cell: one line, markup characters escaped."""
    text = re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)
    return text.replace("\r", "").replace("\n", "⏎")


def markdown_table(header: list, rows: list[list], align: str | None = None) -> str:
    """A Markdown table. `align` has one letter per column, 'l' (left) or 'r' (right); without it the
    columns keep the renderer's default alignment."""
    if align is None:
        rule = "|" + "---|" * len(header)
    else:
        rule = "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"
    return "\n".join([_row(header), rule, *map(_row, rows)])


def _row(cells: list) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def text_table(header: list[str], rows: list[list]) -> str:
    """A plain left-aligned text table, for the terminal (arguments in `markdown_table`'s order)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in lines)


def save(fig: plt.Figure, path: Path, dpi: int = 100, crop: bool = True) -> Path:
    """Write a figure as PNG (making its folder) and free it; `crop` trims the canvas to what is drawn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if crop else None)
    plt.close(fig)
    return path
