"""Head scores, one number per layer and head: previous-token, induction, duplicate-token, attention to BOS.

Each score is the mean attention weight on one source position per destination position, so 1.0 means the
head always attends there and nothing else. The scoring functions take patterns (..., T, T) and return (...).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from litgpt import GPT
from tqdm import tqdm

from tinystories_lab.interpret.attention import attention_patterns
from tinystories_lab.interpret.plots import heatmaps
from tinystories_lab.models import TrainedModel

SCORES = {
    "previous_token": "previous-token",
    "induction": "induction",
    "duplicate_token": "duplicate-token",
    "bos": "BOS",
}
"""The scores `head_scores` computes, with their names on the pages."""


def _mean_attention(pattern: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return pattern[..., rows, cols].mean(-1)


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """Attention from each position t >= 1 to t - 1."""
    rows = torch.arange(1, pattern.shape[-1], device=pattern.device)
    return _mean_attention(pattern, rows, rows - 1)


def bos_score(pattern: torch.Tensor) -> torch.Tensor:
    """Attention from each position t >= 1 to position 0 (BOS, when the sequence starts with it)."""
    rows = torch.arange(1, pattern.shape[-1], device=pattern.device)
    return _mean_attention(pattern, rows, torch.zeros_like(rows))


def induction_score(pattern: torch.Tensor, period: int) -> torch.Tensor:
    """On `[BOS] r r` with r of `period` tokens: attention from each token of the second r to the token
    that followed its first occurrence (t - period + 1)."""
    rows = torch.arange(period + 1, 2 * period + 1, device=pattern.device)
    return _mean_attention(pattern, rows, rows - period + 1)


def duplicate_token_score(pattern: torch.Tensor, period: int) -> torch.Tensor:
    """On `[BOS] r r` with r of `period` tokens: attention from each token of the second r to its first
    occurrence (t - period)."""
    rows = torch.arange(period + 1, 2 * period + 1, device=pattern.device)
    return _mean_attention(pattern, rows, rows - period)


def head_scores(
    model: GPT | TrainedModel, stories: list[torch.Tensor], repeated: torch.Tensor, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """Every score of `SCORES` as a (n_layer, n_head) tensor.

    previous_token and bos: averaged over `stories` (token ids starting with BOS, one sequence each);
    induction and duplicate_token: averaged over `repeated` (n, 2 * period + 1), as `repeated_tokens` makes.
    """
    natural = []
    for story in tqdm(stories, desc="head scores: stories", leave=False):  # lengths differ: one at a time
        pattern = attention_patterns(model, story[None])[:, 0]
        natural.append(torch.stack([previous_token_score(pattern), bos_score(pattern)]))
    period = (repeated.shape[1] - 1) // 2
    synthetic = []
    for batch in tqdm(repeated.split(batch_size), desc="head scores: repeats", leave=False):
        pattern = attention_patterns(model, batch)
        scores = [induction_score(pattern, period), duplicate_token_score(pattern, period)]
        synthetic.append(torch.stack(scores).sum(2))  # summed over the batch, divided below
    previous, bos = torch.stack(natural).mean(0).cpu()
    induction, duplicate = (torch.stack(synthetic).sum(0) / len(repeated)).cpu()
    return {"previous_token": previous, "induction": induction, "duplicate_token": duplicate, "bos": bos}


def top_heads(scores: dict[str, torch.Tensor], n: int = 3) -> dict[str, list[tuple[str, float]]]:
    """The `n` highest-scoring heads for every score, as ("L{layer}H{head}", score)."""
    top = {}
    for name, values in scores.items():
        best = values.flatten().topk(min(n, values.numel()))
        n_head = values.shape[1]
        top[name] = [
            (f"L{i // n_head}H{i % n_head}", v) for v, i in zip(best.values.tolist(), best.indices.tolist())
        ]
    return top


def plot_head_scores(results: dict[str, dict[str, torch.Tensor]], path: Path) -> Path:
    """Layer x head heatmaps of every score, one row per model, on a common 0..1 scale."""
    rows = {name: {label: scores[key] for key, label in SCORES.items()} for name, scores in results.items()}
    return heatmaps(rows, path, "Head scores (mean attention weight on the scored position)", vmin=0, vmax=1)


def write_head_scores(scores: dict[str, torch.Tensor], out_dir: Path, title: str) -> list[Path]:
    """head_scores.json ({score: n_layer x n_head lists}) and head_scores.png."""
    json_path = out_dir / "head_scores.json"
    json_path.write_text(json.dumps({name: values.tolist() for name, values in scores.items()}, indent=1))
    return [json_path, plot_head_scores({title: scores}, out_dir / "head_scores.png")]
