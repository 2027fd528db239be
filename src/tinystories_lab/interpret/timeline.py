"""`tinystories-lab interpret-timeline`: the instruments across training time, one checkpoint after another.

For every checkpoint of a run (its `step-*/` folders, and `final/` when it holds a later step): the per-head
previous-token, BOS, induction and duplicate-token scores (the instruments and inputs of `interpret`), the
loss at every position of validation windows, and the in-context learning score of Olsson et al. (2022):
the loss late in the context minus the loss early in it. Induction heads form in a phase change that shows
as a bump in the training loss and a drop of this score; delphi-suite and Pythia track the same scores
across their checkpoints.

Results go to <run>/interp/timeline.json, rewritten after each checkpoint: a rerun computes only the
checkpoints it has not seen (or that changed since), so it can follow a run while it trains.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from litgpt import GPT
from matplotlib.ticker import FuncFormatter, NullFormatter
from tqdm import tqdm

from tinystories_lab.configs import architecture
from tinystories_lab.errors import UserError
from tinystories_lab.experiments.runs import (
    Checkpoint,
    final_checkpoint,
    out_dir_of,
    read_curves,
    step_checkpoints,
)
from tinystories_lab.files import write_atomic
from tinystories_lab.hardware import resolve_device
from tinystories_lab.interpret.head_scores import SCORES, head_scores
from tinystories_lab.interpret.hooks import gpt_of
from tinystories_lab.interpret.inputs import score_inputs, validation_tokens, validation_windows
from tinystories_lab.models import TrainedModel, load_trained, select_experiments
from tinystories_lab.render import plt, save

TIMELINE = "timeline.json"
ICL_EARLY, ICL_LATE, ICL_CONTEXT = 50, 500, 512
"""Olsson et al.'s in-context score: the loss at the 500th token minus the loss at the 50th. A context of T
tokens uses the tokens at T * 50 / 512 and T * 500 / 512 (exactly 50 and 500 for the 512-token variants)."""
INDUCTION_HEAD = 0.3
"""A head counts as an induction head from the first checkpoint where its induction score reaches this
(the mean attention on the token after the earlier occurrence; about 1/60 for attention spread evenly)."""
TIMELINE_SCORES = ("induction", "previous_token", "bos")  # drawn against training tokens


def icl_positions(context: int) -> tuple[int, int]:
    """The early and late token (1-based: how many tokens the model has read) of the in-context score."""
    return max(1, context * ICL_EARLY // ICL_CONTEXT), max(2, context * ICL_LATE // ICL_CONTEXT)


def in_context_score(loss_by_position: list[float] | torch.Tensor) -> float:
    """Loss at the late token minus loss at the early one (`icl_positions` of the context the losses span);
    negative when the model predicts better with more context."""
    losses = torch.as_tensor(loss_by_position, dtype=torch.float64)
    early, late = icl_positions(len(losses))
    return (losses[late - 1] - losses[early - 1]).item()


@torch.no_grad()
def loss_by_position(model: GPT | TrainedModel, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token loss at each position of `windows` (n, T + 1): a (T,) tensor whose entry i is the loss
    of the prediction made after reading i + 1 tokens."""
    gpt = gpt_of(model)
    device = gpt.lm_head.weight.device
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = gpt(batch[:, :-1]).float()
        losses = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        total += losses.view(batch.shape[0], -1).sum(0).double().cpu()
    return total / len(windows)


def saved_checkpoints(out_dir: Path) -> list[Checkpoint]:
    """A run's `step-*` checkpoints, oldest first, then its `final/` if it has one."""
    final = final_checkpoint(out_dir)
    return step_checkpoints(out_dir)[::-1] + ([final] if final else [])


def interpret_timeline(
    model: str | None = None,
    stories: int = 16,
    repeats: int = 16,
    period: int = 40,
    windows: int = 64,
    batch_size: int = 8,
    device: str = "auto",
    seed: int = 0,
    queues: list[Path] | None = None,
) -> list[Path]:
    """Head scores, loss by token position and the in-context learning score of every saved checkpoint of a
    run, into experiments/tiny_stories/<name>/interp/timeline.json, with figures against training tokens.

    A checkpoint that does not load (truncated or corrupt) is skipped with a line saying so; a rerun computes
    only the checkpoints not in timeline.json yet (or rewritten since), and tries the skipped ones again.

    Args:
        model: The experiment's name in the queues (any status: a run can be followed while it trains);
            default: every finished experiment.
        stories: Validation stories the previous-token and BOS scores average over (as `interpret`).
        repeats: Random repeated sequences the induction and duplicate-token scores average over.
        period: Length of the random sequence repeated in each of them.
        windows: Validation windows (the model's context length each) for the loss by position.
        batch_size: Sequences per forward pass.
        device: Where the models run: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
        seed: Seed of the random repeated sequences.
        queues: Queue files that hold the experiments (default: experiments.yaml and experiments.demo.yaml).
    """
    device = resolve_device(device)
    settings = dict(stories=stories, repeats=repeats, period=period, windows=windows, seed=seed)
    return [timeline(entry, settings, batch_size, device) for entry in select_experiments(model, queues)]


def timeline(entry: dict, settings: dict, batch_size: int, device: str) -> Path:
    """One experiment's timeline.json and figures (see `interpret_timeline`)."""
    start = time.perf_counter()
    name, out_dir = entry["name"], out_dir_of(entry)
    checkpoints = saved_checkpoints(out_dir)
    if not checkpoints:
        queue = entry.get("queue")  # the Makefile's QUEUE= defaults to experiments.yaml
        queue_arg = f" QUEUE={queue}" if queue is not None and Path(queue) != Path("experiments.yaml") else ""
        raise UserError(
            f"{name} has no checkpoints in {out_dir} yet: train it first "
            f"(`make run-specific MODEL={name}{queue_arg}`)."
        )
    path = out_dir / "interp" / TIMELINE
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.is_file() else {}
    kept = {c["checkpoint"]: c for c in old.get("checkpoints", [])}
    if kept and old.get("settings") != settings:
        print(f"{name}: {TIMELINE} was made with other settings ({old.get('settings')}): computing it again.")
        kept = {}
    current = {c.folder.name: c.path.stat().st_mtime for c in checkpoints}
    doc = dict(name=name, arch=old.get("arch"), context=old.get("context"), settings=settings)
    doc["checkpoints"] = [c for c in kept.values() if current.get(c["checkpoint"]) == c["mtime"]]
    done = {c["checkpoint"] for c in doc["checkpoints"]}
    folder_steps = {c.step for c in checkpoints if c.step is not None}
    inputs, computed, skipped = None, 0, []
    bar = tqdm(
        [c for c in checkpoints if c.folder.name not in done], desc=f"timeline {name}", unit="checkpoint"
    )
    for ckpt in bar:
        bar.set_postfix_str(ckpt.folder.name)
        if not ckpt.is_loadable():
            tqdm.write(f"Skipping {ckpt.path}: it does not load (truncated or corrupt).")
            skipped.append(ckpt.folder.name)
            continue
        step = ckpt.step_count()
        if ckpt.step is None and step in folder_steps:
            continue  # final/ holds the same weights as the last step-* folder
        try:
            trained = load_trained(ckpt.folder, device=device)
        except (UserError, OSError) as e:
            tqdm.write(f"Skipping {ckpt.folder}: {e}")
            skipped.append(ckpt.folder.name)
            continue
        if inputs is None:
            inputs = _inputs(trained, settings, name)
            doc.update(arch=architecture(trained.config), context=trained.max_seq_length)
        doc["checkpoints"].append(_measure(trained, ckpt, step, inputs, batch_size))
        doc["checkpoints"].sort(key=lambda c: c["step"])
        computed += 1
        write_atomic(path, json.dumps(doc))
    if not doc["checkpoints"]:
        raise UserError(
            f"No checkpoint of {name} in {out_dir} loads ({', '.join(skipped)}); nothing to show."
        )
    write_atomic(path, json.dumps(doc))
    figures = write_timeline_figures(doc, read_curves(out_dir), path.parent)
    n = len(doc["checkpoints"])
    print(
        f"{name}: {n} checkpoints in {path} ({computed} computed, {n - computed} kept, "
        f"{len(skipped)} skipped) and {len(figures)} figures in {time.perf_counter() - start:.0f} s; "
        f"{formation(doc)}"
    )
    return path


def _inputs(trained: TrainedModel, settings: dict, name: str) -> dict:
    """The tokens every checkpoint is measured on (the same for all: one tokenizer, one validation split)."""
    tokens = validation_tokens(trained)
    stories, repeated = score_inputs(
        trained, tokens, settings["stories"], settings["repeats"], settings["period"], settings["seed"], name
    )
    return dict(
        stories=stories,
        repeated=repeated,
        windows=validation_windows(tokens, trained.max_seq_length, settings["windows"]),
    )


def _measure(trained: TrainedModel, ckpt: Checkpoint, step: int, inputs: dict, batch_size: int) -> dict:
    scores = head_scores(trained, inputs["stories"], inputs["repeated"], batch_size)
    losses = loss_by_position(trained, inputs["windows"], batch_size)
    return dict(
        checkpoint=ckpt.folder.name,
        mtime=ckpt.path.stat().st_mtime,
        step=step,
        tokens=ckpt.tokens_seen(),
        loss=losses.mean().item(),
        in_context_score=in_context_score(losses),
        loss_by_position=losses.tolist(),
        head_scores={key: scores[key].tolist() for key in SCORES},
    )


def formation(doc: dict) -> str:
    """When the first induction head formed, in words (its tokens, head and score), or that none has."""
    first = induction_onset(doc)
    if first is not None:
        c, head, score = first
        return f"first induction head at {c['tokens']:,} tokens ({head}, score {score:.2f})"
    last = doc["checkpoints"][-1]
    head, score = best_head(last["head_scores"]["induction"])
    tokens = f"{last['tokens']:,}"
    return f"no induction head (score >= {INDUCTION_HEAD}) by {tokens} tokens (best {head}, {score:.2f})"


def best_head(scores: list[list[float]]) -> tuple[str, float]:
    """The highest-scoring head as ("L{layer}H{head}", score)."""
    values = torch.tensor(scores)
    i = values.argmax().item()
    return f"L{i // values.shape[1]}H{i % values.shape[1]}", values.flatten()[i].item()


def induction_onset(doc: dict) -> tuple[dict, str, float] | None:
    """The first checkpoint where a head's induction score reaches INDUCTION_HEAD, that head and its score."""
    for c in doc["checkpoints"]:
        head, score = best_head(c["head_scores"]["induction"])
        if score >= INDUCTION_HEAD:
            return c, head, score
    return None


# Figures


def write_timeline_figures(doc: dict, curves: tuple, out: Path) -> list[Path]:
    """timeline.png (each score against training tokens beside the loss curve), timeline_heads.png (a layer x
    head grid over time) and timeline_loss_by_position.png (token position x training tokens)."""
    return [
        figure_scores(doc, curves, out / "timeline.png"),
        figure_heads(doc, out / "timeline_heads.png"),
        figure_loss_by_position(doc, out / "timeline_loss_by_position.png"),
    ]


def _tokens_axis(ax, label: bool = True) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _short(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training tokens" if label else None)
    ax.grid(alpha=0.3)


def figure_scores(doc: dict, curves: tuple, path: Path) -> Path:
    """The loss curve, then every head's score (thin, coloured by layer; the best head bold) for each score,
    then the in-context score, all against training tokens."""
    points = doc["checkpoints"]
    tokens = [c["tokens"] for c in points]
    fig, axes = plt.subplots(1, 2 + len(TIMELINE_SCORES), figsize=(4.2 * (2 + len(TIMELINE_SCORES)), 3.8))
    ax = axes[0]
    train, val = curves
    if train:
        ax.plot(
            [p.tokens for p in train],
            [p.value for p in train],
            color="gray",
            alpha=0.4,
            lw=0.8,
            label="training",
        )
    if val:
        ax.plot([p.tokens for p in val], [p.value for p in val], "o-", ms=3, label="validation")
    ax.plot(tokens, [c["loss"] for c in points], "s", ms=4, color="black", label="checkpoints (windows)")
    ax.set(ylabel="loss (nats/token)", title="loss")
    ax.legend(fontsize=7)
    _tokens_axis(ax)
    n_layer = len(points[0]["head_scores"]["induction"])
    for ax, key in zip(axes[1:], TIMELINE_SCORES):
        values = torch.tensor([c["head_scores"][key] for c in points])  # (checkpoints, n_layer, n_head)
        for layer in range(n_layer):
            color = plt.cm.viridis(layer / max(1, n_layer - 1))
            for head in range(values.shape[2]):
                ax.plot(tokens, values[:, layer, head], color=color, lw=0.7, alpha=0.6,
                        label=f"layer {layer}" if head == 0 else None)  # fmt: skip
        ax.plot(tokens, values.flatten(1).max(1).values, "o-", color="black", ms=3, lw=1.5, label="best head")
        if key == "induction":
            ax.axhline(INDUCTION_HEAD, color="red", ls=":", lw=1)
        ax.set(ylim=(0, 1), title=f"{SCORES[key]} score per head")
        if key == TIMELINE_SCORES[0]:
            ax.legend(fontsize=6)
        _tokens_axis(ax)
    early, late = icl_positions(doc["context"] or len(points[0]["loss_by_position"]))
    ax = axes[-1]
    ax.plot(tokens, [c["in_context_score"] for c in points], "o-", ms=3)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(title=f"in-context score (token {late} - token {early})", ylabel="loss difference (nats)")
    _tokens_axis(ax)
    fig.suptitle(f"{doc['name']}: interpretability across training ({formation(doc)})", fontsize=10)
    fig.tight_layout()
    return save(fig, path, dpi=100, crop=False)


def figure_heads(doc: dict, path: Path) -> Path:
    """One small panel per layer and head: its induction, previous-token and BOS scores against tokens."""
    points = doc["checkpoints"]
    tokens = [c["tokens"] for c in points]
    n_layer = len(points[0]["head_scores"]["induction"])
    n_head = len(points[0]["head_scores"]["induction"][0])
    fig, axes = plt.subplots(
        n_layer,
        n_head,
        figsize=(1.9 * n_head + 1, 1.5 * n_layer + 1),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            for key in TIMELINE_SCORES:
                ax.plot(tokens, [c["head_scores"][key][layer][head] for c in points], lw=1, label=SCORES[key])
            _tokens_axis(ax, label=False)
            ax.set_ylim(0, 1)
            ax.set_title(f"L{layer}H{head}", fontsize=8)
            ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6)
    fig.supxlabel("training tokens")
    fig.supylabel("score (mean attention on the scored position)")
    fig.suptitle(f"{doc['name']}: head scores over training, layer x head", fontsize=10)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.1, top=0.9, hspace=0.45, wspace=0.15)  # fast
    return save(fig, path, dpi=100, crop=False)


def figure_loss_by_position(doc: dict, path: Path) -> Path:
    """Loss at each token position (rows) for each checkpoint (columns, by training tokens)."""
    points = doc["checkpoints"]
    losses = torch.tensor([c["loss_by_position"] for c in points]).T  # (positions, checkpoints)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(points) + 3), 4.5))
    image = ax.imshow(losses.numpy(), aspect="auto", origin="lower", cmap="magma_r", interpolation="nearest",
                      extent=(-0.5, len(points) - 0.5, 0.5, losses.shape[0] + 0.5))  # fmt: skip
    for position in icl_positions(losses.shape[0]):
        ax.axhline(position, color="cyan", ls=":", lw=1)
    ax.set_xticks(range(len(points)), [_short(c["tokens"]) for c in points], rotation=60, fontsize=7)
    ax.set(xlabel="training tokens (one column per checkpoint)", ylabel="token position in the context",
           title=f"{doc['name']}: loss by token position (dotted: the in-context score's)")  # fmt: skip
    fig.colorbar(image, ax=ax, label="loss (nats/token)")
    fig.tight_layout()
    return save(fig, path, dpi=100, crop=False)


def _short(n: float) -> str:
    """A token count in a few characters: 4.1K, 16M, 9.7B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def load_timeline(out_dir: Path) -> dict | None:
    """A run's timeline.json, or None if it has none."""
    path = out_dir / "interp" / TIMELINE
    return json.loads(path.read_text()) if path.is_file() else None
