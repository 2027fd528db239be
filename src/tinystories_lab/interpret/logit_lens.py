"""Logit lens: read the residual stream after each layer through the final norm and the unembedding, as if
the model stopped there, and score those predictions (next-token loss and top-1 accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from litgpt import GPT

from tinystories_lab.interpret.hooks import gpt_of, record
from tinystories_lab.models import TrainedModel
from tinystories_lab.render import markdown_table, plt, save


def unembed(model: GPT | TrainedModel, resid: torch.Tensor) -> torch.Tensor:
    """Logits from a residual stream (B, T, n_embd): the final norm, then the LM head."""
    gpt = gpt_of(model)
    return gpt.lm_head(gpt.transformer.ln_f(resid))


@torch.no_grad()
def logit_lens(
    model: GPT | TrainedModel, windows: torch.Tensor, batch_size: int = 8
) -> dict[str, list[float]]:
    """Loss and top-1 accuracy on `windows` (n, T + 1) from the residual stream after the embedding (entry 0)
    and after each of the n_layer blocks (entries 1..n_layer; the last is the model's own prediction)."""
    gpt = gpt_of(model)
    device = gpt.lm_head.weight.device
    sites = [(0, "resid.pre")] + [(layer, "resid.post") for layer in range(gpt.config.n_layer)]
    losses = torch.zeros(len(sites), dtype=torch.float64)
    correct = torch.zeros(len(sites), dtype=torch.int64)
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        targets = batch[:, 1:]
        with record(gpt, sites) as resid:
            gpt(batch[:, :-1])
        for i, site in enumerate(sites):
            logits = unembed(gpt, resid[site]).float()
            losses[i] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            correct[i] += (logits.argmax(-1) == targets).sum().item()
    n = windows[:, 1:].numel()
    return {"loss": (losses / n).tolist(), "accuracy": (correct / n).tolist()}


def plot_logit_lens(results: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Loss and accuracy against depth, one line per model."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, lens in results.items():
        layers = range(len(lens["loss"]))
        ax_loss.plot(layers, lens["loss"], marker="o", label=name)
        ax_acc.plot(layers, lens["accuracy"], marker="o", label=name)
    for ax, what in ((ax_loss, "next-token loss"), (ax_acc, "top-1 accuracy")):
        ax.set_xlabel("layers applied (0 = embedding only)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Logit lens: the residual stream after each layer, through the final norm and unembedding")
    return save(fig, path)


def write_logit_lens(lens: dict[str, list[float]], out_dir: Path, title: str) -> list[Path]:
    """logit_lens.json and logit_lens.png."""
    json_path = out_dir / "logit_lens.json"
    json_path.write_text(json.dumps(lens, indent=1))
    return [json_path, plot_logit_lens({title: lens}, out_dir / "logit_lens.png")]


def lens_table(lens: dict[str, list[float]]) -> str:
    """The logit lens as a Markdown table, one row per depth."""
    rows = [
        ["embedding" if i == 0 else f"after L{i - 1}", f"{loss:.3f}", f"{acc:.1%}"]
        for i, (loss, acc) in enumerate(zip(lens["loss"], lens["accuracy"]))
    ]
    return markdown_table(["residual stream", "loss", "top-1 accuracy"], rows, align="lrr")
