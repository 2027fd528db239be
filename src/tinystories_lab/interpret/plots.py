"""Interpretability plots: a grid of annotated layer x head heatmaps."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib import patheffects

from tinystories_lab.render import plt, save

OUTLINE = [patheffects.withStroke(linewidth=2, foreground="white")]  # cell values readable on any colour


def heatmaps(
    rows: dict[str, dict[str, torch.Tensor]],
    path: Path,
    title: str,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    centered: bool = False,
    fmt: str = "{:.2f}",
    xlabel: str = "head",
    ylabel: str = "layer",
) -> Path:
    """One row of layer x head heatmaps per entry of `rows` ({row name: {panel title: matrix}}), values
    written in the cells; panels in the same column share one colour scale, so rows compare directly.
    `centered` makes each scale symmetric around 0 (for a diverging `cmap`); `fmt` formats the cell values."""
    names = list(rows)
    columns = list(rows[names[0]])
    n_layer, n_head = next(iter(rows[names[0]].values())).shape
    size = 0.45 * max(n_layer, n_head) + 1.5
    fig, axes = plt.subplots(
        len(names),
        len(columns),
        figsize=(size * len(columns) + 1, size * len(names) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for j, column in enumerate(columns):
        values = [rows[name][column].float().cpu() for name in names]
        lo = vmin if vmin is not None else min(v.min().item() for v in values)
        hi = vmax if vmax is not None else max(v.max().item() for v in values)
        if centered:
            hi = max(abs(lo), abs(hi))
            lo = -hi
        for i, name in enumerate(names):
            ax, v = axes[i, j], values[i]
            image = ax.imshow(v.numpy(), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
            ax.set_title(f"{name}: {column}" if len(names) > 1 else column, fontsize=10)
            ax.set_xticks(range(v.shape[1]))
            ax.set_yticks(range(v.shape[0]))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if v.numel() <= 200:
                for y in range(v.shape[0]):
                    for x in range(v.shape[1]):
                        ax.text(
                            x,
                            y,
                            fmt.format(v[y, x]),
                            ha="center",
                            va="center",
                            fontsize=7,
                            path_effects=OUTLINE,
                        )
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    return save(fig, path)
