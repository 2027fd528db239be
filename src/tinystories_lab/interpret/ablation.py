"""Ablations: how much the validation loss rises when a head, an MLP or a neuron is removed.

Zero ablation sets the component's output to 0; mean ablation sets it to its mean over every position of
the evaluated windows (the same windows the loss is measured on), which removes what the component says
about each token while keeping its average contribution, so a component whose output is constant costs 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from litgpt import GPT, Config
from tqdm import tqdm

from tinystories_lab.interpret.hooks import Hook, Site, gpt_of, hooks, record
from tinystories_lab.interpret.plots import heatmaps
from tinystories_lab.models import TrainedModel
from tinystories_lab.render import markdown_table

KINDS = {"attn.z": "head", "mlp.out": "mlp", "mlp.act": "neuron"}


@dataclass(frozen=True)
class Component:
    """Something to ablate: the positions `index` of the last dimension of a site's activation."""

    name: str
    layer: int
    site: Site
    index: slice
    number: int | None = None
    """The head's or neuron's number in its layer (None for a whole MLP)."""

    @property
    def kind(self) -> str:
        return KINDS[self.site]


def head_components(config: Config) -> list[Component]:
    """Every attention head: its slice of the output projection's input."""
    hs = config.head_size
    return [
        Component(f"L{layer}H{head}", layer, "attn.z", slice(head * hs, (head + 1) * hs), head)
        for layer in range(config.n_layer)
        for head in range(config.n_head)
    ]


def mlp_components(config: Config) -> list[Component]:
    """Every layer's whole MLP output."""
    return [Component(f"L{layer} MLP", layer, "mlp.out", slice(None)) for layer in range(config.n_layer)]


def neuron_components(which: list[tuple[int, int]]) -> list[Component]:
    """The given (layer, neuron) pairs."""
    return [Component(f"L{layer}N{n}", layer, "mlp.act", slice(n, n + 1), n) for layer, n in which]


def ablate(component: Component, value: torch.Tensor | None = None) -> Hook:
    """A hook setting the component to 0 or, given `value` (its site's mean activation), to its part."""

    def hook(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., component.index] = 0.0 if value is None else value[component.index]
        return x

    return hook


@torch.no_grad()
def loss(
    model: GPT | TrainedModel,
    windows: torch.Tensor,
    batch_size: int = 8,
    fns: dict[tuple[int, Site], Hook] | None = None,
) -> float:
    """Mean next-token cross-entropy over `windows` (n, T + 1), with `fns` hooked in."""
    gpt = gpt_of(model)
    device = gpt.lm_head.weight.device
    total = 0.0
    with hooks(gpt, fns or {}):
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = gpt(batch[:, :-1])
            total += F.cross_entropy(
                logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
            ).item()
    return total / windows[:, 1:].numel()


@torch.no_grad()
def mean_activations(
    model: GPT | TrainedModel, windows: torch.Tensor, sites: list[tuple[int, Site]], batch_size: int = 8
) -> dict[tuple[int, Site], torch.Tensor]:
    """Each site's activation averaged over every position of `windows`: a vector per (layer, site)."""
    gpt = gpt_of(model)
    sums: dict[tuple[int, Site], torch.Tensor] = {}
    for batch in windows.split(batch_size):
        with record(gpt, sites) as acts:
            gpt(batch[:, :-1].to(gpt.lm_head.weight.device))
        for site, a in acts.items():
            sums[site] = sums.get(site, 0) + a.double().sum((0, 1))
    return {site: (s / windows[:, :-1].numel()).to(gpt.lm_head.weight.dtype) for site, s in sums.items()}


@dataclass
class Ablations:
    """The clean loss and, per component, the loss change under zero and mean ablation."""

    clean_loss: float
    rows: list[dict]
    """One per component: name, kind, layer, number (of the head or neuron), zero and mean (loss changes)."""

    def head_map(self, how: str) -> torch.Tensor:
        """The `how` ('zero' or 'mean') effect of every head as a (n_layer, n_head) tensor."""
        heads = [r for r in self.rows if r["kind"] == "head"]
        effect = torch.zeros(max(r["layer"] for r in heads) + 1, max(r["number"] for r in heads) + 1)
        for r in heads:
            effect[r["layer"], r["number"]] = r[how]
        return effect

    def ranked(self) -> list[dict]:
        """Rows by decreasing effect (the larger of the two ablations)."""
        return sorted(self.rows, key=lambda r: max(r["zero"], r["mean"]), reverse=True)


def ablation_effects(
    model: GPT | TrainedModel, windows: torch.Tensor, components: list[Component], batch_size: int = 8
) -> Ablations:
    """Zero- and mean-ablate each component in turn; the loss change on `windows` (n, T + 1) for each."""
    gpt = gpt_of(model)
    clean = loss(gpt, windows, batch_size)
    means = mean_activations(gpt, windows, sorted({(c.layer, c.site) for c in components}), batch_size)
    rows = []
    for c in tqdm(components, desc="ablations", leave=False):
        site = (c.layer, c.site)
        zero = loss(gpt, windows, batch_size, {site: ablate(c)}) - clean
        mean = loss(gpt, windows, batch_size, {site: ablate(c, means[site])}) - clean
        rows.append(dict(name=c.name, kind=c.kind, layer=c.layer, number=c.number, zero=zero, mean=mean))
    return Ablations(clean, rows)


def plot_head_ablations(results: dict[str, Ablations], path: Path) -> Path:
    """Layer x head heatmaps of the loss change under zero and mean ablation, one row per model."""
    rows = {
        name: {f"{how} ablation": a.head_map(how) for how in ("zero", "mean")} for name, a in results.items()
    }
    return heatmaps(
        rows,
        path,
        "Validation loss change when one head is ablated",
        cmap="RdBu_r",
        centered=True,
        fmt="{:+.3f}",
    )


def write_ablations(ablations: Ablations, out_dir: Path, title: str) -> list[Path]:
    """ablation.json, ablation.md (every component ranked by effect) and ablation.png (the head map)."""
    json_path = out_dir / "ablation.json"
    json_path.write_text(json.dumps(dict(clean_loss=ablations.clean_loss, rows=ablations.rows), indent=1))
    rows = [
        [i + 1, r["name"], r["kind"], f"{r['zero']:+.4f}", f"{r['mean']:+.4f}"]
        for i, r in enumerate(ablations.ranked())
    ]
    md_path = out_dir / "ablation.md"
    md_path.write_text(
        f"# Ablations: {title}\n\n"
        f"Validation loss change when one component is ablated (clean loss {ablations.clean_loss:.4f}), "
        "ranked by the larger of the two. Zero: its output set to 0. Mean: set to its mean over the same "
        "windows.\n\n"
        "![head ablations](ablation.png)\n\n"
        + markdown_table(["rank", "component", "kind", "zero", "mean"], rows, align="rllrr")
        + "\n"
    )
    png = plot_head_ablations({title: ablations}, out_dir / "ablation.png")
    return [md_path, json_path, png]
