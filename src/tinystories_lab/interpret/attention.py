"""Attention patterns. LitGPT never materialises attention weights (it calls fused attention), so they are
recomputed from the post-rotary queries and keys, recorded as they enter the fused call."""

from __future__ import annotations

import html
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from litgpt import GPT
from litgpt.model import CausalSelfAttention

from tinystories_lab.interpret.hooks import gpt_of
from tinystories_lab.models import TrainedModel
from tinystories_lab.render import plt, save


@contextmanager
def recording_qkv(model: GPT | TrainedModel) -> Iterator[dict[int, tuple[torch.Tensor, ...]]]:
    """Record each layer's q, k, v (B, n_head, T, head_size) as they enter fused attention: after RoPE,
    with keys and values already repeated for grouped queries."""
    gpt = gpt_of(model)
    qkv: dict[int, tuple[torch.Tensor, ...]] = {}
    attns = [block.attn for block in gpt.transformer.h]
    for layer, attn in enumerate(attns):
        fused = attn.scaled_dot_product_attention

        def spy(q, k, v, mask=None, layer=layer, fused=fused):
            qkv[layer] = (q.detach(), k.detach(), v.detach())
            return fused(q, k, v, mask)

        attn.scaled_dot_product_attention = spy  # an instance attribute shadows the method
    try:
        yield qkv
    finally:
        for attn in attns:
            del attn.scaled_dot_product_attention


def pattern_from_qk(q: torch.Tensor, k: torch.Tensor, attn: CausalSelfAttention) -> torch.Tensor:
    """softmax(q k^T * scale) under the causal mask, with LitGPT's scale, in fp32: (..., T, T)."""
    scale = attn.mscale**2 / math.sqrt(attn.config.attention_scores_scalar or attn.config.head_size)
    scores = (q.float() @ k.float().mT) * scale
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@torch.no_grad()
def attention_patterns(model: GPT | TrainedModel, idx: torch.Tensor) -> torch.Tensor:
    """Every layer's and head's attention pattern on token ids `idx` (B, T): (n_layer, B, n_head, T, T).

    Row t of a pattern is how position t spreads its attention over positions 0..t (it sums to 1).
    """
    gpt = gpt_of(model)
    with recording_qkv(gpt) as qkv:
        gpt(idx.to(gpt.lm_head.weight.device))
    blocks = gpt.transformer.h
    return torch.stack([pattern_from_qk(*qkv[layer][:2], block.attn) for layer, block in enumerate(blocks)])


def plot_attention(pattern: torch.Tensor, labels: list[str], path: Path, title: str) -> Path:
    """A layers x heads grid of heatmaps of one sequence's patterns (n_layer, n_head, T, T), with tokens."""
    n_layer, n_head, T, _ = pattern.shape
    size = max(2.0, 0.1 * T)
    fig, axes = plt.subplots(
        n_layer, n_head, figsize=(size * n_head, size * n_layer), squeeze=False, sharex=True, sharey=True
    )
    ticks = [repr(s)[1:-1] for s in labels]  # shows spaces and newlines
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            ax.imshow(pattern[layer, head].cpu().numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"L{layer}H{head}", fontsize=9)
            ax.set_xticks(range(T), ticks, rotation=90, fontsize=5)
            ax.set_yticks(range(T), ticks, fontsize=5)
            ax.tick_params(length=0, labelbottom=layer == n_layer - 1, labelleft=head == 0)
    fig.suptitle(f"{title}\nrows: attending position, columns: attended position", fontsize=11)
    return save(fig, path)


def write_attention_html(pattern: torch.Tensor, labels: list[str], path: Path, title: str) -> Path:
    """An interactive view of every head (circuitsvis), one self-contained file that needs no network."""
    import circuitsvis.attention

    n_layer, n_head = pattern.shape[:2]
    view = circuitsvis.attention.attention_heads(
        attention=pattern.flatten(0, 1).cpu(),
        tokens=labels,
        attention_head_names=[f"L{layer}H{head}" for layer in range(n_layer) for head in range(n_head)],
        mask_upper_tri=True,
    )
    # local_src inlines circuitsvis's JavaScript; str(view) would load it from a CDN instead.
    page = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f"<body><h2>{html.escape(title)}</h2>\n<p>Click a head to enlarge it; hover over a token to see "
        f"where it attends.</p>\n{view.local_src}\n</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def write_attention(pattern: torch.Tensor, labels: list[str], out_dir: Path, title: str) -> list[Path]:
    """attention.png (the grid) and attention.html (the interactive view) of one sequence's patterns."""
    return [
        plot_attention(pattern, labels, out_dir / "attention.png", title),
        write_attention_html(pattern, labels, out_dir / "attention.html", title),
    ]
