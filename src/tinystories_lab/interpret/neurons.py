"""MLP neurons: activation statistics, top-k activating contexts, dead neurons, the most selective ones.

A neuron is one unit of `mlp.act`, the input of the MLP's output projection: gelu(fc x) in GptNeoxMLP,
silu(fc_1 x) * fc_2 x in LLaMAMLP. Its strength on a token is the activation itself for GELU (only the
positive side is unbounded) and its magnitude for SwiGLU (flipping the signs of a neuron's fc_2 row and
proj column changes nothing, so the sign means nothing).

- dead: its strength never exceeds `threshold` on the evaluated tokens.
- selectivity: how far its k strongest activations stand above its typical one, in standard deviations:
  (mean of the top-k strengths - mean strength) / std of the strength. High for a neuron that fires
  strongly on a few contexts and stays quiet elsewhere; NaN for dead neurons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from litgpt import GPT
from tqdm import tqdm

from tinystories_lab.interpret.hooks import gpt_of, is_gated, record
from tinystories_lab.interpret.inputs import label
from tinystories_lab.models import TrainedModel
from tinystories_lab.render import escape, markdown_table


@dataclass
class NeuronStats:
    """Statistics of every neuron over a set of tokens; tensors are (n_layer, n_neuron) unless noted."""

    gated: bool
    threshold: float
    tokens: int
    mean: torch.Tensor
    std: torch.Tensor
    max: torch.Tensor
    fire_rate: torch.Tensor
    """Fraction of the tokens on which the strength exceeds `threshold`."""
    top_values: torch.Tensor
    """(n_layer, n_neuron, k): the signed activations on the k strongest tokens, strongest first."""
    top_tokens: torch.Tensor
    """(n_layer, n_neuron, k): where those tokens are, as flat indices (window * T + position)."""

    @property
    def dead(self) -> torch.Tensor:
        return self.max <= self.threshold

    @property
    def selectivity(self) -> torch.Tensor:
        top = self.top_values.abs() if self.gated else self.top_values
        z = (top.mean(-1) - self.mean) / self.std.clamp_min(1e-8)
        return z.masked_fill(self.dead, float("nan"))

    def most_selective(self, n: int) -> list[tuple[int, int]]:
        """The `n` most selective live neurons as (layer, neuron), most selective first."""
        s = self.selectivity.nan_to_num(float("-inf")).flatten()
        order = s.topk(min(n, int((~self.dead).sum()))).indices.tolist()
        n_neuron = self.mean.shape[1]
        return [(i // n_neuron, i % n_neuron) for i in order]


@torch.no_grad()
def neuron_stats(
    model: GPT | TrainedModel, windows: torch.Tensor, k: int = 8, threshold: float = 0.01, batch_size: int = 8
) -> NeuronStats:
    """Statistics of every MLP neuron over the inputs of `windows` (n, T + 1): all but their last tokens."""
    gpt = gpt_of(model)
    gated = is_gated(gpt)
    device = gpt.lm_head.weight.device
    inputs = windows[:, :-1]
    sites = [(layer, "mlp.act") for layer in range(gpt.config.n_layer)]
    shape = (gpt.config.n_layer, gpt.transformer.h[0].mlp.proj.in_features)
    total, squares, fired = (torch.zeros(shape, dtype=torch.float64, device=device) for _ in range(3))
    maximum = torch.full(shape, float("-inf"), device=device)
    top_s = top_v = torch.empty(shape[0], 0, shape[1], device=device)  # (n_layer, k, n_neuron)
    top_i = torch.empty(shape[0], 0, shape[1], dtype=torch.long, device=device)
    for start in tqdm(range(0, len(inputs), batch_size), desc="neurons", leave=False):
        with record(gpt, sites) as acts:
            gpt(inputs[start : start + batch_size].to(device))
        a = torch.stack([acts[site] for site in sites]).flatten(1, 2).float()  # (n_layer, tokens, n_neuron)
        s = a.abs() if gated else a
        total += s.sum(1, dtype=torch.float64)
        squares += s.double().square().sum(1)
        maximum = torch.maximum(maximum, s.amax(1))
        fired += (s > threshold).sum(1)
        # this batch's k strongest tokens per neuron, merged with the best so far
        batch_s, idx = s.topk(min(k, s.shape[1]), dim=1)
        cand_s = torch.cat([top_s, batch_s], 1)
        cand_v = torch.cat([top_v, a.gather(1, idx)], 1)
        cand_i = torch.cat([top_i, idx + start * inputs.shape[1]], 1)
        best = cand_s.topk(min(k, cand_s.shape[1]), dim=1).indices
        top_s, top_v, top_i = cand_s.gather(1, best), cand_v.gather(1, best), cand_i.gather(1, best)
    n = inputs.numel()
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt()
    return NeuronStats(
        gated=gated,
        threshold=threshold,
        tokens=n,
        mean=mean.float().cpu(),
        std=std.float().cpu(),
        max=maximum.cpu(),
        fire_rate=(fired / n).float().cpu(),
        top_values=top_v.transpose(1, 2).cpu(),
        top_tokens=top_i.transpose(1, 2).cpu(),
    )


def context(inputs: torch.Tensor, index: int, labels: list[str], before: int = 12) -> tuple[str, str]:
    """The text of up to `before` tokens leading to flat token `index` of `inputs` (n, T), and that token."""
    window, position = divmod(index, inputs.shape[1])
    ids = inputs[window, max(0, position - before) : position + 1].tolist()
    return "".join(label(labels, i) for i in ids[:-1]), label(labels, ids[-1])


def write_neurons(
    stats: NeuronStats,
    windows: torch.Tensor,
    labels: list[str],
    out_dir: Path,
    title: str,
    listed: int = 20,
    before: int = 12,
) -> list[Path]:
    """neurons.json (every neuron: statistics and top-k contexts) and neurons.md (dead neurons per layer,
    and the `listed` most selective neurons with their contexts)."""
    doc = neurons_json(stats, windows[:, :-1], labels, before)
    json_path = out_dir / "neurons.json"
    json_path.write_text(json.dumps(doc, separators=(",", ":")))  # compact: it holds every neuron
    md_path = out_dir / "neurons.md"
    md_path.write_text(neurons_markdown(stats, doc, title, listed) + "\n")
    return [md_path, json_path]


def neurons_json(stats: NeuronStats, inputs: torch.Tensor, labels: list[str], before: int = 12) -> dict:
    """Every neuron's statistics and top contexts (the text of up to `before` tokens leading to each), and
    the dead neurons per layer."""
    n_layer, n_neuron = stats.mean.shape
    selectivity, dead = stats.selectivity, stats.dead

    def top_contexts(layer: int, neuron: int) -> list[dict]:
        tops = []
        for value, index in zip(
            stats.top_values[layer, neuron].tolist(), stats.top_tokens[layer, neuron].tolist()
        ):
            text, token = context(inputs, index, labels, before)
            window, position = divmod(index, inputs.shape[1])
            tops.append(dict(activation=value, window=window, position=position, context=text, token=token))
        return tops

    per_layer = [
        dict(
            layer=layer,
            dead=int(dead[layer].sum()),
            dead_fraction=dead[layer].float().mean().item(),
            mean_fire_rate=stats.fire_rate[layer].mean().item(),
        )
        for layer in range(n_layer)
    ]
    neurons = [
        dict(
            layer=layer,
            neuron=neuron,
            mean=stats.mean[layer, neuron].item(),
            std=stats.std[layer, neuron].item(),
            max=stats.max[layer, neuron].item(),
            fire_rate=stats.fire_rate[layer, neuron].item(),
            dead=bool(dead[layer, neuron]),
            selectivity=None if dead[layer, neuron] else selectivity[layer, neuron].item(),
            top=top_contexts(layer, neuron),
        )
        for layer in tqdm(range(n_layer), desc="neuron contexts", leave=False)
        for neuron in range(n_neuron)
    ]
    strength = "|activation|" if stats.gated else "activation"
    return dict(
        tokens=stats.tokens,
        threshold=stats.threshold,
        strength=strength,
        definitions=dict(
            dead=f"{strength} never above the threshold on the evaluated tokens",
            selectivity=f"(mean of the top-k {strength} - mean {strength}) / std of {strength}",
        ),
        layers=per_layer,
        neurons=neurons,
    )


def neurons_markdown(stats: NeuronStats, doc: dict, title: str, listed: int = 20) -> str:
    """neurons.md: dead neurons per layer, and the `listed` most selective neurons with the top contexts
    `doc` (`neurons_json`) holds for them."""
    n_layer, n_neuron = stats.mean.shape
    selectivity = stats.selectivity
    best = stats.most_selective(listed)
    tops = {(n["layer"], n["neuron"]): n["top"] for n in doc["neurons"]}
    definitions = doc["definitions"]
    lines = [
        f"# Neurons: {title}",
        "",
        f"{n_layer} layers x {n_neuron} neurons (the input of each MLP's output projection), over "
        f"{stats.tokens:,} validation tokens. Strength: {doc['strength']}. Dead: {definitions['dead']} "
        f"({stats.threshold:g}). Selectivity: {definitions['selectivity']}, k = "
        f"{stats.top_values.shape[-1]}. Every neuron's statistics and top contexts: "
        "[neurons.json](neurons.json).",
        "",
        "## Dead neurons",
        "",
        markdown_table(
            ["layer", "dead", "fraction", "mean firing rate"],
            [
                [p["layer"], p["dead"], f"{p['dead_fraction']:.1%}", f"{p['mean_fire_rate']:.1%}"]
                for p in doc["layers"]
            ],
            align="rrrr",
        ),
        "",
        f"## The {len(best)} most selective neurons",
        "",
        markdown_table(
            ["neuron", "selectivity", "firing rate", "top activation", "its context"],
            [
                [
                    f"[L{layer}N{neuron}](#l{layer}n{neuron})",
                    f"{selectivity[layer, neuron]:.1f}",
                    f"{stats.fire_rate[layer, neuron]:.1%}",
                    f"{stats.top_values[layer, neuron, 0]:.2f}",
                    _highlight(tops[layer, neuron][0]["context"], tops[layer, neuron][0]["token"]),
                ]
                for layer, neuron in best
            ],
            align="lrrrl",
        ),
    ]
    for layer, neuron in best:
        lines += [
            "",
            f"### L{layer}N{neuron}",
            "",
            f"selectivity {selectivity[layer, neuron]:.1f}, fires on {stats.fire_rate[layer, neuron]:.1%} of "
            f"tokens, mean {stats.mean[layer, neuron]:.3f}, std {stats.std[layer, neuron]:.3f}",
            "",
            markdown_table(
                ["activation", "context"],
                [
                    [f"{t['activation']:.2f}", _highlight(t["context"], t["token"])]
                    for t in tops[layer, neuron]
                ],
                align="rl",
            ),
        ]
    return "\n".join(lines)


def _highlight(text: str, token: str) -> str:
    """The context with its token in bold (a leading space stays outside the bold, or Markdown ignores it)."""
    shown = escape(token)
    core = shown.lstrip(" ")
    return f"{escape(text)}{shown[: len(shown) - len(core)]}**{core or '␣'}**"
