"""`make eval`: loss, perplexity and bits per byte over a whole text, plus what the run's logs say."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tinystories_lab.configs import architecture, count_parameters
from tinystories_lab.data.sources import Separator, read_text_file
from tinystories_lab.data.tokens import encode_stories, stories_fingerprint
from tinystories_lab.errors import UserError
from tinystories_lab.experiments.runs import Checkpoint, metrics_files, read_curves, world_size
from tinystories_lab.models import TrainedModel, load_trained, results_dir, training_data
from tinystories_lab.render import text_table

THRESHOLDS = [4.0, 3.0, 2.0, 1.5, 1.25, 1.0]


@torch.no_grad()
def window_loss(
    forward: Callable[[torch.Tensor], torch.Tensor],
    tokens: np.ndarray,
    context: int,
    batch_size: int = 16,
    device: str = "cpu",
    desc: str = "eval",
) -> tuple[float, int]:
    """Mean next-token loss (nats) over every token of `tokens` but the first, and how many were predicted.

    Windows of `context + 1` tokens with stride `context` (the last one shorter) make every token a
    target exactly once; the mean is over tokens, not over batches. `forward` maps a batch of token ids
    (on `device`) to logits: LitGPT's `GPT` as it is, a `transformers` model through `.logits`.
    """
    starts = list(range(0, len(tokens) - 1, context))
    if not starts:
        raise UserError("The text is too short to evaluate: it needs at least two tokens.")
    full = [s for s in starts if s + context + 1 <= len(tokens)]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    if len(full) < len(starts):
        batches.append(starts[len(full) :])  # the shorter tail window, alone
    total, count = 0.0, 0
    for batch in tqdm(batches, desc=desc, unit="batch"):
        width = min(context + 1, len(tokens) - batch[0])
        x = torch.from_numpy(np.stack([tokens[s : s + width] for s in batch]).astype(np.int64)).to(device)
        logits = forward(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    return total / count, count


def text_loss(
    trained: TrainedModel, tokens: np.ndarray, batch_size: int = 16, device: str = "cpu", desc: str = "eval"
) -> tuple[float, int]:
    """`window_loss` of a LitGPT checkpoint, with windows of its training context."""
    model = trained.model.to(device)
    return window_loss(model, tokens, trained.max_seq_length, batch_size, device, desc)


def text_tokens(
    trained: TrainedModel, path: Path, separator: Separator | None
) -> tuple[np.ndarray, int, list[str]]:
    """[BOS] story [EOS] tokens of a text file, its byte count, and its stories."""
    stories = read_text_file(path, separator)  # refuses a missing, binary or empty file; None: detect
    tokens = encode_stories(trained.tokenizer, stories)
    return tokens, sum(len(s.encode()) for s in stories), stories


def validation_split(trained: TrainedModel) -> tuple[np.ndarray, int, str, dict]:
    """The run's own validation split (checked against its tokenizer), its byte count, a description,
    and what meta.json says about its stories (their hash, how many also occur in the training split)."""
    data = training_data(trained)
    tokens = data.split("validation")
    meta = data.meta()
    split = meta["splits"]["validation"]
    about = {
        "stories": split["stories"],
        "stories_sha256": split.get("stories_sha256"),
        "validation_stories_in_train": (meta.get("validation_in_train") or {}).get("stories"),
    }
    return tokens, split["bytes"], validation_text(data.source), about


def validation_text(source: str) -> str:
    """How an evaluation on a source's validation split is described (in eval.json and reference results)."""
    return f"validation split of {source}"


def training_summary(out_dir: Path, hparams: dict, thresholds: list[float]) -> dict:
    """Throughput, training-loop time and convergence speed from the run's CSV metrics."""
    rates, wall = [], 0.0
    world = world_size(hparams)
    for path in metrics_files(out_dir):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("time")]
        rates += [float(r["device/items_per_sec"]) * world for r in rows if r.get("device/items_per_sec")]
        if rows:
            wall += float(rows[-1]["time"])
    _, val = read_curves(out_dir)
    reached = {str(t): next((p.tokens for p in val if p.value <= t), None) for t in thresholds}
    return {
        "train_tokens_per_s": statistics.median(rates) if rates else None,
        "train_wall_time_s": wall or None,
        "tokens_to_val_loss": reached,
    }


def evaluate_run(
    checkpoint_dir: Path,
    text: Path | None = None,
    separator: Separator | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    thresholds: list[float] = THRESHOLDS,
) -> dict:
    """Evaluate one checkpoint on its validation split (or a text file) and summarise its training run."""
    trained = load_trained(checkpoint_dir)
    if text is None:
        tokens, n_bytes, described, about = validation_split(trained)
    else:
        tokens, n_bytes, stories = text_tokens(trained, text, separator)
        described = str(text)
        about = {
            "stories": len(stories),
            "stories_sha256": stories_fingerprint(stories),
            "validation_stories_in_train": None,
        }
    loss, n_tokens = text_loss(trained, tokens, batch_size, device, desc=f"eval {trained.name}")
    ckpt = Checkpoint(checkpoint_dir / "lit_model.pth")
    state = ckpt.load()
    result = {
        "name": trained.name,
        "checkpoint": str(checkpoint_dir),
        "arch": architecture(trained.config),
        "parameters": count_parameters(trained.config, trained.tie_embeddings),
        "tokens_trained": ckpt.tokens_seen(),
        "steps": int(state["step_count"]),
        "eval_text": described,
        **about,
        "context": trained.max_seq_length,
        "windows": math.ceil(n_tokens / trained.max_seq_length),
        "tokens_evaluated": n_tokens,
        "bytes_evaluated": n_bytes,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": loss / math.log(2) * n_tokens / n_bytes,
    }
    return result | training_summary(checkpoint_dir.parent, trained.hparams, thresholds)


def evaluate_runs(
    checkpoint_dirs: list[Path],
    text: Path | None = None,
    separator: Separator | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> list[dict]:
    """Evaluate pretraining runs (`make eval`), write eval.json next to each and print their table."""
    header = ["name", "params", "text", "tokens", "loss", "ppl", "bits/byte", "train tok/s", "train time"]

    def row(r: dict) -> list:
        return [r["name"], f"{r['parameters'] / 1e6:.1f}M", r["eval_text"], f"{r['tokens_evaluated']:,}",
                f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['bits_per_byte']:.4f}",
                f"{r['train_tokens_per_s']:,.0f}" if r["train_tokens_per_s"] else "-",
                f"{r['train_wall_time_s'] / 60:.1f} min" if r["train_wall_time_s"] else "-"]  # fmt: skip

    def evaluate(checkpoint_dir: Path) -> dict:
        return evaluate_run(checkpoint_dir, text, separator, batch_size, device)

    return evaluate_each(checkpoint_dirs, evaluate, text, header, row)


def evaluate_each(
    checkpoint_dirs: list[Path],
    evaluate: Callable[[Path], dict],
    text: Path | None,
    header: list[str],
    row: Callable[[dict], list],
) -> list[dict]:
    """`evaluate` each checkpoint, write each result next to it (`write_result`), then print one table row
    per result: what `make eval` does for pretraining runs and for fine-tunes alike."""
    results = [evaluate(c) for c in checkpoint_dirs]
    for checkpoint_dir, result in zip(checkpoint_dirs, results):
        write_result(checkpoint_dir, text, result)
    if results:
        print(text_table(header, [row(r) for r in results]))
    return results


def write_result(checkpoint_dir: Path, text: Path | None, result: dict) -> None:
    """An evaluation's result in the run's folder: eval.json, or eval-<file name>.json for `text`."""
    name = "eval.json" if text is None else f"eval-{text.stem}.json"
    (results_dir(checkpoint_dir) / name).write_text(json.dumps(result, indent=2) + "\n")
