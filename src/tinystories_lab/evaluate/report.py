"""`make report`: every run compared in experiments/report/README.md, with figures."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib.ticker import FuncFormatter, NullFormatter

from tinystories_lab.configs import architecture, count_parameters, model_config, parse_config
from tinystories_lab.evaluate.judge import CRITERIA
from tinystories_lab.evaluate.reference import REFERENCE_DIR
from tinystories_lab.evaluate.seeds import Summary, summarize, welch
from tinystories_lab.experiments.queue import load_entries, queue_files
from tinystories_lab.experiments.runs import Point, final_checkpoint, is_current, out_dir_of, read_curves
from tinystories_lab.interpret.timeline import (
    INDUCTION_HEAD,
    best_head,
    formation,
    icl_positions,
    induction_onset,
    load_timeline,
)
from tinystories_lab.render import markdown_table, plt, save

REPORT_DIR = Path("experiments/report")
ANCHORS = Path(__file__).with_name("anchors.yaml")
COLORS = {"gpt": "tab:blue", "llama": "tab:orange"}
RESULTS_NOTE = (
    "Validation loss and perplexity cover every token of each run's validation split once (windows "
    "of the run's context, stride = context); bits per byte = total loss in bits / UTF-8 bytes of "
    "the evaluated stories, comparable across tokenizers. Throughput is the median of LitGPT's "
    "logged tokens/s; train time is the training loop's time as LitGPT logs it (no setup, final "
    'validation or saving), summed over sessions. "Tokens to X" is the first validation point at or '
    "below loss X (validation runs every `eval.interval` steps: an upper bound)."
)
SAMPLES_NOTE = "Same prompts, seeds, temperature and top-k for both; **[EOS]** marks a story the model ended."
REFERENCE_NOTE = (
    "Quoted from their authors, for context only, where nothing was measured here. Per-token losses "
    "compare only between runs with the same tokenizer and evaluation set: these use other tokenizers "
    "(Llama 2's or their own), other evaluation sets and token budgets. Bits per byte is the fairer "
    "comparison."
)
MEASURED_NOTE = (
    "Rows marked *reference* are published models scored here on the same stories (`make "
    "eval-reference`, `make eval-hf`), each with its own tokenizer, context and story boundary: their "
    "loss and perplexity are per token of their own tokenizer, so compare bits per byte. Their "
    "parameter counts include every stored embedding row. They may have seen these stories, or "
    "others from other TinyStories versions, in training: see docs/reference-models.md."
)
INTERVAL_NOTE = (
    "sd: sample standard deviation (n - 1); 95% interval of the mean: mean +- t(0.975, n - 1) x sd / "
    "sqrt(n), Student's t with n seeds."
)
SEEDS_NOTE = (
    "One row per experiment with several evaluated seeds (each seed sets the initialisation and the order "
    "of the training windows). " + INTERVAL_NOTE
)
WELCH_NOTE = (
    "Where both variants have several seeds, the last column tests whether their mean validation losses "
    "(and bits per byte) differ by more than the seeds' spread: Welch's two-sided t-test (unequal "
    'variances), p-value; "one seed: not tested" otherwise. Values are means over the seeds.'
)


@dataclass
class Run:
    """One experiment as the report sees it: its queue entry, shape, curves and evaluation files."""

    entry: dict
    arch: str
    size: str
    parameters: int
    out_dir: Path
    train: list[Point] = field(default_factory=list)
    val: list[Point] = field(default_factory=list)
    seed: int = 0
    eval: dict | None = None
    samples: dict | None = None
    timeline: dict | None = None
    quality: dict | None = None

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def experiment(self) -> str:
        """The queue entry this run is one seed of (its own name without `seeds:`)."""
        return self.entry.get("experiment", self.name)

    @property
    def finished(self) -> bool:
        return self.entry["status"] == "done" and final_checkpoint(self.out_dir) is not None


def load_runs(queues: list[Path]) -> list[Run]:
    """Every entry of the queues, with whatever its run folder holds."""
    runs = []
    for entry in load_entries(queues):
        cfg = parse_config(entry["config"], *entry.get("args", []))
        config = model_config(cfg)
        out_dir = out_dir_of(entry)
        train, val = read_curves(out_dir)
        run = Run(
            entry=entry,
            arch=architecture(config),
            size=f"{config.n_layer}L_{config.n_head}H_{config.n_embd}D",
            parameters=count_parameters(config, cfg.train.tie_embeddings),
            out_dir=out_dir,
            seed=cfg.seed,
            train=train,
            val=val,
        )
        for attr, name in (("eval", "eval.json"), ("samples", "samples.json"), ("quality", "quality.json")):
            if is_current(out_dir / name, out_dir):  # not from before the run was extended
                setattr(run, attr, json.loads((out_dir / name).read_text()))
        run.timeline = load_timeline(out_dir)
        runs.append(run)
    return runs


def load_references(reference_dir: Path, evaluated: list[Run]) -> list[dict]:
    """The measured reference results (`make eval-reference`, `make eval-hf`) on the stories an evaluated
    run was scored on (same stories hash; the same description for eval.json files older than the hash)."""
    texts = {r.eval.get("stories_sha256") or r.eval["eval_text"] for r in evaluated}
    found = [json.loads(p.read_text()) for p in sorted(reference_dir.glob("*.json"))]
    same = [f for f in found if f.get("stories_sha256") in texts or f.get("eval_text") in texts]
    return sorted(same, key=lambda f: f["parameters"])


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average, for readable training-loss curves."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def by_experiment(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by experiment: the seeds of each, in queue order."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.experiment, []).append(r)
    return groups


def plot_curves(ax, runs: list[Run], color, label: str) -> None:
    """Training loss (smoothed, faint) and validation loss (markers) of one run, or the mean of several
    seeds' with their validation band (min to max) shaded."""
    runs = [r for r in runs if r.train]
    if not runs:
        return
    steps = min(len(r.train) for r in runs)
    train = [smooth([p.value for p in r.train])[:steps] for r in runs]
    ax.plot([p.tokens for p in runs[0].train[:steps]], [sum(v) / len(v) for v in zip(*train)], color=color,
            alpha=0.35, lw=1)  # fmt: skip
    common = set.intersection(*({p.tokens for p in r.val} for r in runs))
    val = [[p.value for p in r.val if p.tokens in common] for r in runs]
    tokens = [p.tokens for p in runs[0].val if p.tokens in common]
    if len(runs) > 1:
        low, high = [min(v) for v in zip(*val)], [max(v) for v in zip(*val)]
        ax.fill_between(tokens, low, high, color=color, alpha=0.25, lw=0)
        label += f" (mean of {len(runs)} seeds, band: min-max)"
    ax.plot(tokens, [sum(v) / len(v) for v in zip(*val)], "o-", color=color, ms=3, label=label)


def figure_loss_curves(runs: list[Run], path: Path) -> None:
    """All experiments overlaid: training loss (smoothed, faint) and validation loss (markers) against
    tokens; an experiment with several seeds as their mean, with the seeds' band."""
    fig, ax = plt.subplots(figsize=(8, 5), layout="tight")
    groups = [g for g in by_experiment(runs).values() if any(r.train for r in g)]
    for i, group in enumerate(groups):
        plot_curves(ax, group, plt.cm.tab10(i % 10), group[0].experiment)
    ax.set(
        xlabel="training tokens",
        ylabel="loss (nats/token)",
        xscale="log",
        title="Training (faint, smoothed) and validation (markers) loss",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path, dpi=120, crop=False)


def figure_gpt_vs_llama(pairs: dict[str, dict[str, list[Run]]], path: Path) -> None:
    """One panel per size: the GPT and LLaMA runs of that shape (their seeds' mean and band)."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False, layout="tight")
    for ax, (size, pair) in zip(axes[0], pairs.items()):
        for arch, runs in sorted(pair.items()):
            plot_curves(ax, runs, COLORS.get(arch), f"{arch}: {runs[0].experiment}")
        ax.set(title=size, xlabel="training tokens", ylabel="loss (nats/token)", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path, dpi=120, crop=False)


def figure_scaling(evaluated: list[Run], anchors: list[dict], references: list[dict], path: Path) -> None:
    """Final validation loss, perplexity and bits per byte against true parameters; the bits-per-byte
    panel adds the published models measured on the same stories, and quoted numbers for the others."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout="tight")
    for ax, key, label in zip(
        axes,
        ("loss", "perplexity", "bits_per_byte"),
        ("validation loss (nats/token)", "perplexity", "bits per byte"),
    ):
        for arch in ("gpt", "llama"):
            groups = [g for g in by_experiment(evaluated).values() if g[0].arch == arch]
            groups.sort(key=lambda g: g[0].parameters)
            stats = [summarize([r.eval[key] for r in g]) for g in groups]
            ax.errorbar(
                [g[0].parameters for g in groups],
                [s.mean for s in stats],
                yerr=[s.sd or 0 for s in stats],
                fmt="o-",
                color=COLORS[arch],
                capsize=3,
                label=arch + (" (mean +- sd of seeds)" if any(len(g) > 1 for g in groups) else ""),
            )
            for g, st in zip(groups, stats):
                ax.annotate(
                    g[0].experiment, (g[0].parameters, st.mean), fontsize=7, xytext=(3, 3),
                    textcoords="offset points",
                )  # fmt: skip
        if key == "bits_per_byte" and references:
            ax.plot(
                [r["parameters"] for r in references],
                [r["bits_per_byte"] for r in references],
                "s",
                color="dimgray",
                label="other models, measured here (eval-hf)",
            )
            for r in references:
                ax.annotate(
                    r["name"].split("--")[-1], (r["parameters"], r["bits_per_byte"]), fontsize=7,
                    xytext=(3, -9), textcoords="offset points", color="dimgray",
                )  # fmt: skip
        if key == "bits_per_byte":
            quoted = [a for a in unmeasured(anchors, references) if a.get("approx_bits_per_byte")]
            quoted = [a for a in quoted if a.get("parameters")]
            ax.plot(
                [a["parameters"] for a in quoted],
                [a["approx_bits_per_byte"] for a in quoted],
                "x",
                color="gray",
                label="llama2.c, quoted (approx.)",
            )
        ax.set(xlabel="true parameters", ylabel=label)
        ax.set_xscale("log" if ax.get_xlim()[1] > 10 * ax.get_xlim()[0] else "linear")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path, dpi=120, crop=False)


def figure_throughput(evaluated: list[Run], path: Path) -> None:
    """Training throughput of each run, as logged."""
    runs = [r for r in evaluated if r.eval.get("train_tokens_per_s")]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(runs)), 4), layout="tight")
    ax.bar(
        [r.name for r in runs],
        [r.eval["train_tokens_per_s"] for r in runs],
        color=[COLORS[r.arch] for r in runs],
    )
    ax.set(ylabel="training tokens/s (median, all devices)", title="Training throughput")
    ax.tick_params(axis="x", rotation=30)
    save(fig, path, dpi=120, crop=False)


def figure_timelines(by_size: dict[str, dict[str, Run]], path: Path) -> None:
    """One column per size, GPT and LLaMA overlaid: validation loss, the best head's induction score and the
    in-context score, against training tokens (from each run's interp/timeline.json)."""
    rows = ("validation loss (nats/token)", "best induction score", "in-context score (nats)")
    fig, axes = plt.subplots(3, len(by_size), figsize=(5 * len(by_size), 9), squeeze=False, layout="tight")
    for column, (size, pair) in zip(axes.T, by_size.items()):
        for arch, run in sorted(pair.items()):
            points, color = run.timeline["checkpoints"], COLORS.get(arch)
            tokens = [c["tokens"] for c in points]
            column[0].plot([p.tokens for p in run.val], [p.value for p in run.val], "o-", ms=3, color=color,
                           label=run.name)  # fmt: skip
            induction = [best_head(c["head_scores"]["induction"])[1] for c in points]
            column[1].plot(tokens, induction, "o-", ms=3, color=color, label=run.name)
            icl = [c["in_context_score"] for c in points]
            column[2].plot(tokens, icl, "o-", ms=3, color=color, label=run.name)
            onset = induction_onset(run.timeline)
            if onset is not None:
                for ax in column:
                    ax.axvline(onset[0]["tokens"], color=color, ls=":", lw=1)
        column[1].axhline(INDUCTION_HEAD, color="gray", ls="--", lw=0.8)
        column[1].set_ylim(0, 1)
        column[2].axhline(0, color="gray", lw=0.8)
        column[0].set_title(size)
        for ax, label in zip(column, rows):
            ax.set(xscale="log", xlabel="training tokens", ylabel=label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    save(fig, path, dpi=110, crop=False)


def timelines_section(by_size: dict[str, dict[str, Run]], out_dir: Path) -> list[str]:
    """When each run formed its first induction head, and its in-context score, as a table and in words."""
    header = ["size", "run", "checkpoints", "first induction head", "in-context score, first -> last"]
    rows, lines = [], []
    for size, pair in by_size.items():
        for _, run in sorted(pair.items()):
            t = run.timeline
            points = t["checkpoints"]
            onset = induction_onset(t)
            if onset is None:
                head, score = best_head(points[-1]["head_scores"]["induction"])
                first = f"none by {points[-1]['tokens']:,} tokens (best {head}: {score:.2f})"
            else:
                first = f"{onset[0]['tokens']:,} tokens (step {onset[0]['step']}, {onset[1]}: {onset[2]:.2f})"
            icl = f"{points[0]['in_context_score']:+.2f} -> {points[-1]['in_context_score']:+.2f}"
            link = os.path.relpath(run.out_dir / "interp" / "timeline.png", out_dir)
            rows.append([size, f"[`{run.name}`]({link})", len(points), first, icl])
            lines.append(f"- `{run.name}`: {formation(t)}.")
    runs = [r for pair in by_size.values() for r in pair.values()]
    if all(induction_onset(r.timeline) is None for r in runs):
        most = max(r.timeline["checkpoints"][-1]["tokens"] for r in runs)
        lines.append(
            f"**No run here formed an induction head** (by up to {most:,} training tokens), so there is "
            "no induction phase change to see in these curves: they show what comes before it."
        )
    context = runs[0].timeline.get("context") or 0
    early, late = icl_positions(context) if context else ("50", "500")
    return [
        markdown_table(header, rows),
        "",
        *lines,
        "",
        "A head is an induction head from the first checkpoint where its induction score (mean attention "
        "from the second copy of a random sequence to the token after the first copy) reaches "
        f"{INDUCTION_HEAD}; dotted lines mark it. The in-context score is Olsson et al.'s: the loss at a "
        f"late token of the context minus the loss at an early one (tokens {late} and {early} here; 500 and "
        "50 in a 512-token context); it falls below 0 as the model learns to use its context. Each run's "
        "`interp/timeline*.png` has every head and the loss at every position (`make interpret-timeline`).",
        "",
    ]


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def unmeasured(anchors: list[dict], references: list[dict]) -> list[dict]:
    """The quoted results of models not measured here on the same stories."""
    measured = {r["model"] for r in references}
    return [a for a in anchors if a.get("measured_as") not in measured]


def results_table(evaluated: list[Run], thresholds: list[str], references: list[dict] = ()) -> list[str]:
    header = [
        "run",
        "arch",
        "size",
        "params",
        "tokens trained",
        "val loss",
        "perplexity",
        "bits/byte",
        "train tok/s",
        "train time",
    ] + [f"tokens to {t}" for t in thresholds]
    rows = []
    for r in evaluated:
        e = r.eval
        wall = e.get("train_wall_time_s")
        cells = [
            f"`{r.name}`" + (f" (seed {r.seed})" if "experiment" in r.entry else ""),
            r.arch,
            r.size,
            f"{r.parameters / 1e6:.2f}M",
            f"{e['tokens_trained']:,}",
            fmt(e["loss"]),
            fmt(e["perplexity"], ".2f"),
            fmt(e["bits_per_byte"]),
            fmt(e.get("train_tokens_per_s"), ",.0f"),
            "-" if wall is None else f"{wall / 60:.1f} min",
        ]
        rows.append(cells + [fmt(e["tokens_to_val_loss"].get(t), ",") for t in thresholds])
    for r in references:
        name, params = f"`{r['model']}` *reference*", f"{r['parameters'] / 1e6:.2f}M"
        cells = [name, r["model_type"], r["size"], params, "-", fmt(r["loss"]), fmt(r["perplexity"], ".2f"),
                 fmt(r["bits_per_byte"]), "-", "-"]  # fmt: skip
        rows.append(cells + ["-"] * len(thresholds))
    return [markdown_table(header, rows)]


def samples_section(pairs: dict[str, dict[str, list[Run]]]) -> list[str]:
    """The same prompts' samples, GPT and LLaMA side by side, per size (each one's first seed)."""
    lines = []
    for size, pair in pairs.items():
        gpt, llama = pair["gpt"][0], pair["llama"][0]
        if not (gpt.samples and llama.samples):
            continue
        rows = [
            [repr(a["prompt"]) + f" (seed {a['seed']})", _cell(a), _cell(b)]
            for a, b in zip(gpt.samples["samples"], llama.samples["samples"])
        ]
        lines += [
            f"#### {size}",
            "",
            markdown_table(["prompt", f"`{gpt.name}`", f"`{llama.name}`"], rows),
            "",
        ]
    return lines


def _cell(sample: dict) -> str:
    text = sample["text"].replace("|", "\\|").replace("\n", "<br>")
    return text + (" **[EOS]**" if sample["stopped_at_eos"] else " …")


def anchors_section(anchors: dict, references: list[dict] = ()) -> list[str]:
    """The quoted results of anchors.yaml as a table, with their caveats; those of models measured here
    on the same stories are left out (their measured rows are in the results table)."""
    header = ["model", "shape", "tokenizer", "eval set", "tokens trained", "val loss, quoted",
              "~bits/byte, quoted", "source"]  # fmt: skip
    quoted = unmeasured(anchors["validation_loss"], references)
    rows = [
        [a["model"], a["shape"], a["tokenizer"], a["eval_set"], a["tokens_trained"], a["loss"],
         a.get("approx_bits_per_byte", "-"), a["source"]]
        for a in quoted
    ]  # fmt: skip
    lines = [markdown_table(header, rows)]
    dropped = [a["model"] for a in anchors["validation_loss"] if a not in quoted]
    if dropped:
        lines += ["", f"Measured here on the same stories, so not quoted: {', '.join(dropped)}."]
    lines += [""] + [f"- {n}" for n in anchors["notes"]]
    return lines + ["", "Training throughput:", ""] + [f"- {t}" for t in anchors["throughput"]]


def overlap_lines(evaluated: list[Run]) -> list[str]:
    """For each validation split the runs were scored on: how many of its stories the training split holds."""
    lines, seen = [], set()
    for r in evaluated:
        e = r.eval
        if e.get("validation_stories_in_train") is None or e["eval_text"] in seen:
            continue
        seen.add(e["eval_text"])
        lines.append(
            f"- {e['eval_text']}: {e['validation_stories_in_train']:,} of {e['stories']:,} stories also "
            "occur in the training split (exact match after whitespace normalisation)."
        )
    return lines + [""] if lines else []


def figure_link(stem: str, figures: dict[str, str]) -> str:
    return f"![{figures[stem]}]({stem}.png)"


def pending_section(pending: list[Run]) -> list[str]:
    """Runs left out of the comparison, and why."""
    rows = []
    for r in pending:
        if not r.train:
            why = "not trained yet"
        elif not r.finished:
            why = "unfinished"
        else:
            why = "not evaluated (since its final checkpoint): `make eval`"
        rows.append([f"`{r.name}`", r.entry["status"], why])
    return ["### Not in the comparison", "", markdown_table(["run", "status", "why"], rows), ""]


def seeds_section(evaluated: list[Run]) -> list[str]:
    """Mean, sd and 95% interval of validation loss and bits per byte of each experiment with seeds."""
    header = ["experiment", "seeds", "val loss mean +- sd", "val loss 95% interval", "bits/byte mean +- sd",
              "bits/byte 95% interval"]  # fmt: skip
    rows = []
    for name, group in by_experiment(evaluated).items():
        if len(group) < 2:
            continue
        loss, bpb = (summarize([r.eval[key] for r in group]) for key in ("loss", "bits_per_byte"))
        seeds = ", ".join(str(r.seed) for r in group)
        rows.append([f"`{name}`", f"{len(group)} ({seeds})", _mean_sd(loss), _interval(loss), _mean_sd(bpb),
                     _interval(bpb)])  # fmt: skip
    return [markdown_table(header, rows), "", SEEDS_NOTE, ""] if rows else []


def _mean_sd(s: Summary) -> str:
    return f"{s.mean:.4f} +- {s.sd:.4f}"


def _interval(s: Summary) -> str:
    return f"[{s.low:.4f}, {s.high:.4f}]"


def _means(runs: list[Run], key: str) -> str:
    return f"{summarize([r.eval[key] for r in runs]).mean:.3f}"


def welch_cell(gpt: list[Run], llama: list[Run]) -> str:
    """Welch's t-test p-values of GPT vs LLaMA in loss and bits per byte, or why none."""
    if len(gpt) < 2 or len(llama) < 2:
        return "one seed: not tested"
    p = [welch([r.eval[k] for r in gpt], [r.eval[k] for r in llama]).p for k in ("loss", "bits_per_byte")]
    return f"p = {p[0]:.2g} / {p[1]:.2g}"


def pairs_section(pairs: dict[str, dict[str, list[Run]]]) -> list[str]:
    """GPT against LLaMA at each size, in numbers (means over seeds), with Welch's t-test where both have
    several seeds."""
    header = ["size", "GPT", "LLaMA", "params GPT / LLaMA", "val loss GPT / LLaMA", "bits/byte GPT / LLaMA",
              "Welch's t-test, loss / bits/byte"]  # fmt: skip
    rows = []
    for size, pair in pairs.items():
        g, ll = pair["gpt"], pair["llama"]
        rows.append([
            size, f"`{g[0].experiment}` ({len(g)} seeds)" if len(g) > 1 else f"`{g[0].name}`",
            f"`{ll[0].experiment}` ({len(ll)} seeds)" if len(ll) > 1 else f"`{ll[0].name}`",
            f"{g[0].parameters / 1e6:.2f}M / {ll[0].parameters / 1e6:.2f}M",
            f"{_means(g, 'loss')} / {_means(ll, 'loss')}",
            f"{_means(g, 'bits_per_byte')} / {_means(ll, 'bits_per_byte')}",
            welch_cell(g, ll),
        ])  # fmt: skip
    return [
        markdown_table(header, rows),
        "",
        "Same shapes; the LLaMA variants have more parameters (SwiGLU's third MLP matrix). " + WELCH_NOTE,
        "",
    ]


def interval(summary: dict) -> str:
    """'7.21 [6.90, 7.52]': a criterion's mean and 95% interval."""
    if summary["mean"] is None:
        return "-"
    return f"{summary['mean']:.2f} [{summary['low']:.2f}, {summary['high']:.2f}]"


def quality_section(runs: list[Run]) -> list[str]:
    """Story quality (`make quality`) beside bits per byte, GPT and LLaMA of each size next to each other;
    the judge's grades name the judge model."""
    header = ["run", "arch", "size", "bits/byte", "completions", "ended (EOS)", "mean tokens", "rep-2",
              "distinct-2", "Rouge-k precision", "longest overlap (max words)", "judge", "grammar",
              "creativity", "consistency", "plot", "unparseable"]  # fmt: skip
    rows = []
    smallest = {}  # each size's smallest run, to order sizes small to large with GPT and LLaMA together
    for r in runs:
        smallest[r.size] = min(smallest.get(r.size, r.parameters), r.parameters)
    for r in sorted(runs, key=lambda r: (smallest[r.size], r.size, r.arch)):
        q, f = r.quality, quality_figures(r.quality)
        j = q.get("judge")
        judged = (  # `make quality` without a judge: the measures only
            [f"`{j['model']}`", *(interval(j["criteria"][c]) for c in CRITERIA), str(j["unparseable"])]
            if j
            else ["-"] * 6
        )
        rows.append([
            f"`{r.name}`", r.arch, r.size, fmt(r.eval["bits_per_byte"]) if r.eval else "-",
            f"{q['measures']['completions']} (v{q['beginnings_version']})", fmt(f["eos_share"], ".0%"),
            fmt(f["mean_tokens"], ".1f"), fmt(f["rep_2"]), fmt(f["distinct_2"]), fmt(f["rouge_precision"]),
            fmt(f["longest_overlap_max"], "d"),
        ] + judged)  # fmt: skip
    return [
        markdown_table(header, rows),
        "",
        "Completions of the fixed story beginnings (`make quality`; v = their version), sampled with the "
        "settings in each quality.json. rep-2: the share of repeated word pairs within a completion; "
        "distinct-2: distinct word pairs over all completions; Rouge-k precision: the share of a "
        "completion's k-word sequences found in the training stories. The grades (1-10, mean and 95% "
        "interval) are the TinyStories paper's, by the judge model named: scores from different judges do "
        "not compare. See docs/evaluation.md.",
        "",
    ]


QUALITY_FIGURES = {"eos_share": "ended (EOS)", "mean_tokens": "mean tokens", "rep_2": "rep-2",
                   "distinct_2": "distinct-2", "rouge_precision": "Rouge-k precision",
                   "longest_overlap_max": "longest overlap (max words)"}  # fmt: skip


def quality_figures(q: dict) -> dict[str, float | None]:
    """One quality.json's figures as the per-run table shows them: the measures, then the judge's mean
    grades named by criterion (None: not measured)."""
    m = q["measures"]
    figures = {k: m.get(k) for k in ("eos_share", "mean_tokens", "rep_2", "distinct_2")}
    figures["rouge_precision"] = next((v for k, v in m.items() if k.startswith("rouge_")), None)
    figures["longest_overlap_max"] = (m.get("longest_overlap_words") or {}).get("max")
    for c in CRITERIA:
        figures[c] = q["judge"]["criteria"][c]["mean"] if q.get("judge") else None
    return figures


def quality_seeds_section(rated: list[Run]) -> list[str]:
    """Mean, sd and 95% interval over the seeds of each experiment with several rated seeds, of each story
    quality figure; the judge's grades only where one judge model graded every seed."""
    rows = []
    for name, group in by_experiment(rated).items():
        if len(group) < 2:
            continue
        seeds = f"{len(group)} ({', '.join(str(r.seed) for r in group)})"
        versions = sorted({r.quality["beginnings_version"] for r in group})
        if len(versions) > 1:
            why = f"beginnings versions differ ({', '.join(f'v{v}' for v in versions)}): rerun `make quality`"
            rows.append([f"`{name}`", seeds, why, "", ""])
            continue
        judges = {(r.quality.get("judge") or {}).get("model") for r in group}
        labels = dict(QUALITY_FIGURES)
        if len(judges) == 1 and None not in judges:
            labels |= {c: f"{c} (`{next(iter(judges))}`)" for c in CRITERIA}
        figures = [quality_figures(r.quality) for r in group]
        for key, label in labels.items():
            values = [f[key] for f in figures]
            if None in values:
                continue
            s = summarize(values)
            rows.append([f"`{name}`", seeds, label, _mean_sd(s), _interval(s)])
    if not rows:
        return []
    header = ["experiment", "seeds", "figure", "mean +- sd", "95% interval"]
    return [
        "### Story quality across seeds",
        "",
        markdown_table(header, rows),
        "",
        "Each figure of the table above, over the seeds of an experiment (the judge's: each seed's mean "
        "grade, only where one judge model graded every seed; a figure missing for a seed is left out). "
        + INTERVAL_NOTE,
        "",
    ]


def speculative_pairs(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Finished runs that can draft for one another: a smaller one into a larger one of the same architecture,
    or a GPT into a larger LLaMA."""
    done = [r for r in runs if r.finished and r.name == r.experiment]  # one seed of each experiment
    return [
        (d, t)
        for t in sorted(done, key=lambda r: r.parameters)
        for d in sorted(done, key=lambda r: r.parameters)
        if d.parameters < t.parameters and (d.arch == t.arch or (d.arch, t.arch) == ("gpt", "llama"))
    ]


def speculative_section(pairs: list[tuple[Run, Run]], folder: Path) -> list[str]:
    """Each pair's measured speed-up, from `make speculative`'s files (decoding is never run here)."""
    header = ["draft -> target", "params", "k", "acceptance", "tokens / target pass",
              "tok/s speculative / alone", "speed-up"]  # fmt: skip
    rows = []
    for d, t in pairs:
        path = folder / f"{d.name}-{t.name}.json"
        name = f"`{d.name}` -> `{t.name}`"
        params = f"{d.parameters / 1e6:.2f}M / {t.parameters / 1e6:.2f}M"
        if not (is_current(path, d.out_dir) and is_current(path, t.out_dir)):
            why = "measured before a run was extended" if path.is_file() else "not measured"
            rows.append(
                [name, params, "", f"{why}: `make speculative DRAFT={d.name} TARGET={t.name}`", "", "", ""]
            )
            continue
        r = json.loads(path.read_text())
        o = r["overall"]
        rows.append([
            f"[{name}](speculative/{path.stem}.md)", params, r["k"], f"{o['acceptance_rate']:.3f}",
            f"{o['tokens_per_target_pass']:.2f}", f"{o['speculative_tokens_per_s']:,.1f} / "
            f"{o['target_tokens_per_s']:,.1f}", f"**{o['speed_up']:.2f}x**",
        ])  # fmt: skip
    return [
        markdown_table(header, rows),
        "",
        "Greedy decoding on the fixed prompts of `make sample`; the output equals the target's own. "
        "Speed-up: tokens/s with the draft over the target decoding alone, on the device each file names "
        "(the GPU when one is visible, unless `DEVICE=cpu`). A draft pays off only when it is much cheaper "
        "than the target and often agrees with it.",
        "",
    ]


def interpretability_links(runs: list[Run], out_dir: Path) -> list[str]:
    """Links to the comparison pages in out_dir/interp/ and to each run's interp/ index."""
    pages = sorted((out_dir / "interp").glob("*.md"))
    indexes = [p for r in runs for p in sorted((r.out_dir / "interp").glob("index.*"))]
    links = [f"- [{p.stem}]({os.path.relpath(p, out_dir)})" for p in pages]
    links += [f"- [{p.parent.parent.name}]({os.path.relpath(p, out_dir)})" for p in indexes]
    return links


def report(
    queues: list[Path] | None = None, out_dir: Path = REPORT_DIR, reference_dir: Path = REFERENCE_DIR
) -> Path:
    """Compare every run in one Markdown report with figures: experiments/report/README.md.

    Finished runs need `make eval` (and `make sample` for the samples section) first; runs that are
    missing, unfinished or not evaluated are listed, not dropped.

    Args:
        queues: Queue files whose experiments to compare (default: experiments.yaml and
            experiments.demo.yaml, those that exist).
        out_dir: Where the report and its figures go.
        reference_dir: Measured results of published models (`make eval-reference`, `make eval-hf`);
            those on the runs' stories join the results table and the scaling figure.
    """
    queues = queue_files(queues)
    runs = load_runs(queues)
    out_dir.mkdir(parents=True, exist_ok=True)
    anchors = yaml.safe_load(ANCHORS.read_text())
    evaluated = [r for r in runs if r.finished and r.eval]
    pending = [r for r in runs if r not in evaluated]
    references = load_references(reference_dir, evaluated)
    by_size: dict[str, dict[str, list[Run]]] = {}
    for group in by_experiment(evaluated).values():
        by_size.setdefault(group[0].size, {})[group[0].arch] = group
    pairs = {size: pair for size, pair in by_size.items() if len(pair) == 2}
    timelines: dict[str, dict[str, Run]] = {}
    for r in runs:
        if r.timeline and r.timeline["checkpoints"]:
            timelines.setdefault(r.size, {})[r.arch] = r

    figures = {}
    if any(r.train for r in runs):
        figure_loss_curves(runs, out_dir / "loss_curves.png")
        figures["loss_curves"] = "Training and validation loss of every run against training tokens"
    if pairs:
        figure_gpt_vs_llama(pairs, out_dir / "gpt_vs_llama.png")
        figures["gpt_vs_llama"] = "GPT vs LLaMA at each size"
    if evaluated:
        figure_scaling(evaluated, anchors["validation_loss"], references, out_dir / "scaling.png")
        figures["scaling"] = "Final validation loss, perplexity and bits per byte against true parameters"
        figure_throughput(evaluated, out_dir / "throughput.png")
        figures["throughput"] = "Training throughput"
    if timelines:
        figure_timelines(timelines, out_dir / "timelines.png")
        figures["timelines"] = "Validation loss, best induction score and in-context score against tokens"

    lines = ["# TinyStories runs compared", "", f"Queues: {', '.join(f'`{q}`' for q in queues)}.", ""]
    lines += ["## Results", ""]
    if evaluated:
        thresholds = list(evaluated[0].eval["tokens_to_val_loss"])
        lines += results_table(evaluated, thresholds, references) + ["", RESULTS_NOTE, ""]
        seeds = seeds_section(evaluated)
        lines += ["### Across seeds", ""] + seeds if seeds else []
        lines += [MEASURED_NOTE, ""] if references else []
        lines += overlap_lines(evaluated)
    else:
        lines += ["No evaluated run yet: train (`make run-next`), then `make eval`.", ""]
    if pending:
        lines += pending_section(pending)
    if "loss_curves" in figures:
        lines += ["## Loss curves", "", figure_link("loss_curves", figures), ""]
    if pairs:
        lines += ["## GPT vs LLaMA", "", figure_link("gpt_vs_llama", figures), ""] + pairs_section(pairs)
        samples = samples_section(pairs)
        if samples:
            lines += ["### Samples, side by side", "", SAMPLES_NOTE, ""] + samples
    rated = [r for r in runs if r.finished and r.quality]
    if rated:
        lines += ["## Story quality", ""] + quality_section(rated) + quality_seeds_section(rated)
    if evaluated:
        lines += [
            "## Size and speed",
            "",
            figure_link("scaling", figures),
            "",
            figure_link("throughput", figures),
            "",
        ]
    drafts = speculative_pairs(runs)
    if drafts:
        lines += ["## Speculative decoding", ""] + speculative_section(drafts, out_dir / "speculative")
    if timelines:
        lines += ["## Induction heads across training", "", figure_link("timelines", figures), ""]
        lines += timelines_section(timelines, out_dir)
    links = interpretability_links(runs, out_dir)
    if links:
        lines += ["## Interpretability", ""] + links + [""]
    lines += ["## Published reference results (quoted)", "", REFERENCE_NOTE, ""]
    lines += anchors_section(anchors, references) + [""]
    (out_dir / "README.md").write_text("\n".join(lines))
    print(
        f"Report: {out_dir / 'README.md'}: {len(evaluated)} runs and {len(references)} published models "
        f"compared, {len(pending)} runs listed as pending"
    )
    return out_dir / "README.md"
