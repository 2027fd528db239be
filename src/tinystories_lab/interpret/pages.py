"""The Markdown pages: one index per model (interp/index.md) and the GPT-vs-LLaMA comparison."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tinystories_lab.interpret.ablation import Ablations, plot_head_ablations
from tinystories_lab.interpret.head_scores import SCORES, plot_head_scores, top_heads
from tinystories_lab.interpret.logit_lens import lens_table, plot_logit_lens
from tinystories_lab.interpret.neurons import NeuronStats
from tinystories_lab.render import markdown_table

ARCH = {"gpt": "GPT-style (LayerNorm, GELU MLP, RoPE)", "llama": "LLaMA-style (RMSNorm, SwiGLU MLP, RoPE)"}


def describe(summary: dict) -> str:
    """'GPT-style (...), 4 layers x 4 heads, 128 dims, MLP 512'."""
    s = summary["shape"]
    shape = f"{s['n_layer']} layers x {s['n_head']} heads, {s['n_embd']} dims, MLP {s['d_mlp']}"
    return f"{ARCH[summary['arch']]}, {shape}"


def inputs_line(summary: dict) -> str:
    """What the instruments read, in one sentence."""
    s = summary["settings"]
    return (
        f"{s['windows']} validation windows of {s['window_tokens']} tokens for the neurons and the logit "
        f"lens, the first {s['ablation_windows']} of them for the ablations; {s['stories']} validation "
        f"stories for the previous-token and BOS scores; {s['repeats']} random sequences of {s['period']} "
        "tokens, each repeated once, for the induction and duplicate-token scores."
    )


def write_index(
    out: Path,
    summary: dict,
    files: dict[str, list[Path]],
    ablations: Ablations,
    lens: dict,
    stats: NeuronStats,
) -> Path:
    """interp/index.md: what was measured, the main pictures and numbers, and a link to every file."""

    def links(section: str) -> str:
        return ", ".join(f"[{p.name}]({p.name})" for p in files[section])

    s = summary["settings"]
    shown = "the given text" if s["text"] else f"validation story {s['story']}"
    top = summary["top_heads"]
    dead = stats.dead.float()
    lines = [
        f"# Interpretability: {summary['name']}",
        "",
        f"{describe(summary)}; checkpoint `{summary['checkpoint']}`. Inputs: {inputs_line(summary)} Written "
        f"by `tinystories-lab interpret {summary['name']}` in {summary['seconds']:.0f} s; settings in "
        "[summary.json](summary.json).",
        "",
        "## Attention patterns",
        "",
        f"Every head on the first {s['attention_tokens']} tokens of {shown}. The [interactive view]"
        f"(attention.html) works offline: pick a head, hover over a token. Files: {links('attention')}.",
        "",
        "![attention patterns](attention.png)",
        "",
        "## Head scores",
        "",
        "Mean attention weight on the scored position: the previous token, the token after the previous "
        "occurrence of the current one (induction), that occurrence itself (duplicate token), and position 0 "
        f"(BOS). Files: {links('head_scores')}.",
        "",
        "![head scores](head_scores.png)",
        "",
        markdown_table(
            ["score", "top heads"],
            [[SCORES[name], ", ".join(f"{h} ({v:.2f})" for h, v in top[name])] for name in SCORES],
            align="ll",
        ),
        "",
        "## Neurons",
        "",
        f"Dead neurons: {dead.mean().item():.1%} overall; per layer "
        + ", ".join(f"L{layer} {d:.1%}" for layer, d in enumerate(dead.mean(1).tolist()))
        + ". The most selective neurons with their top activating contexts: [neurons.md](neurons.md); every "
        f"neuron: [neurons.json](neurons.json). Files: {links('neurons')}.",
        "",
        "## Ablations",
        "",
        f"Validation loss change when one component is removed (clean loss {ablations.clean_loss:.4f}). "
        f"Files: {links('ablation')}.",
        "",
        "![head ablations](ablation.png)",
        "",
        _top_ablations(ablations, 10),
        "",
        "## Logit lens",
        "",
        f"The residual stream after each layer read through the final norm and unembedding. Files: "
        f"{links('logit_lens')}.",
        "",
        "![logit lens](logit_lens.png)",
        "",
        lens_table(lens),
        "",
    ]
    path = out / "index.md"
    path.write_text("\n".join(lines))
    return path


def _top_ablations(ablations: Ablations, n: int) -> str:
    rows = [[r["name"], r["kind"], f"{r['zero']:+.4f}", f"{r['mean']:+.4f}"] for r in ablations.ranked()[:n]]
    return markdown_table(["component", "kind", "zero ablation", "mean ablation"], rows, align="llrr")


def load_results(folder: Path) -> dict:
    """What `interpret` wrote to an interp/ folder, read back: summary, scores, ablations, lens."""
    read = lambda name: json.loads((folder / name).read_text())  # noqa: E731
    return dict(
        summary=read("summary.json"),
        scores={k: torch.tensor(v) for k, v in read("head_scores.json").items()},
        ablations=Ablations(**read("ablation.json")),
        lens=read("logit_lens.json"),
    )


def write_comparison(dirs: dict[str, Path], out_dir: Path) -> Path:
    """<a>-vs-<b>.md in `out_dir`, with its PNGs beside it: the models' interp results side by side."""
    results = {name: load_results(folder) for name, folder in dirs.items()}
    names = list(results)
    stem = "-vs-".join(names)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_head_scores({n: r["scores"] for n, r in results.items()}, out_dir / f"{stem}-head_scores.png")
    plot_head_ablations({n: r["ablations"] for n, r in results.items()}, out_dir / f"{stem}-ablation.png")
    plot_logit_lens({n: r["lens"] for n, r in results.items()}, out_dir / f"{stem}-logit_lens.png")

    overview = {n: _overview(r, _rel(dirs[n] / "index.md", out_dir)) for n, r in results.items()}
    rows = [[label, *(overview[n][label] for n in names)] for label in overview[names[0]]]
    depths = max(len(r["lens"]["loss"]) for r in results.values())
    lens_rows = [[i, *(_at(results[n]["lens"]["loss"], i) for n in names)] for i in range(depths)]
    settings = [{k: results[n]["summary"]["settings"][k] for k in COMPARED_SETTINGS} for n in names]
    warning = (
        "" if all(s == settings[0] for s in settings) else " **The models ran with different settings.**"
    )
    lines = [
        f"# Interpretability: {' vs '.join(names)}",
        "",
        "Results of `tinystories-lab interpret` side by side. Inputs: "
        + inputs_line(results[names[0]]["summary"])
        + warning,
        "",
        markdown_table(["", *names], rows, align="l" * (len(names) + 1)),
        "",
        "## Head scores",
        "",
        f"![head scores]({stem}-head_scores.png)",
        "",
        "## Ablations",
        "",
        "Validation loss change when one component (a head, an MLP or a neuron) is set to zero or to its "
        "mean output; the maps show the heads.",
        "",
        f"![head ablations]({stem}-ablation.png)",
        "",
    ]
    for n in names:
        lines += [f"Largest effects in {n}:", "", _top_ablations(results[n]["ablations"], 8), ""]
    lines += [
        "## Logit lens",
        "",
        f"![logit lens]({stem}-logit_lens.png)",
        "",
        markdown_table(
            ["layers applied", *(f"{n} loss" for n in names)], lens_rows, align="r" * (len(names) + 1)
        ),
        "",
    ]
    page = out_dir / f"{stem}.md"
    page.write_text("\n".join(lines))
    return page


COMPARED_SETTINGS = ("windows", "ablation_windows", "window_tokens", "stories", "repeats", "period")


def _overview(r: dict, index: str) -> dict[str, str]:
    """One model's column of the comparison's overview table."""
    top = top_heads(r["scores"], 1)
    ablations = r["ablations"]

    def strongest(kind: str) -> str:
        row = max((x for x in ablations.rows if x["kind"] == kind), key=lambda x: x["mean"])
        return f"{row['name']} ({row['mean']:+.3f})"

    lens = r["lens"]["loss"]
    return {
        "model": describe(r["summary"]),
        "interpret results": f"[index.md]({index})",
        "loss on the ablation windows": f"{ablations.clean_loss:.4f}",
        **{f"top {label} head": "{} ({:.2f})".format(*top[s][0]) for s, label in SCORES.items()},
        "most important head (mean ablation)": strongest("head"),
        "most important MLP (mean ablation)": strongest("mlp"),
        "dead neurons": f"{r['summary']['dead_fraction']:.1%}",
        "logit lens loss halfway": f"{lens[len(lens) // 2]:.3f}",
    }


def _at(values: list[float], i: int) -> str:
    return f"{values[i]:.3f}" if i < len(values) else ""


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
