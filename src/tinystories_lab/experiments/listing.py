"""`make list`: every experiment of the queues with its shape, status, progress and last validation loss."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from tinystories_lab.configs import architecture, count_parameters, model_config, parse_config
from tinystories_lab.errors import UserError
from tinystories_lab.experiments import slurm
from tinystories_lab.experiments.queue import Queue, queue_files
from tinystories_lab.experiments.runs import last_val_loss, newest_loadable, out_dir_of
from tinystories_lab.render import text_table


def experiment_row(entry: dict) -> list[str]:
    """One row: name, architecture, shape, true parameters, seed, status, tokens done / max, val loss.
    An entry whose config or arguments LitGPT rejects gets a row saying so in one line."""
    try:
        with contextlib.redirect_stderr(io.StringIO()) as said:  # jsonargparse's usage dump
            cfg = parse_config(entry["config"], *entry.get("args", []), *entry.get("run_args", []))
    except UserError as e:
        reason = _last_line(said.getvalue()) or str(e)
        return [entry["name"], "-", "-", "-", "-", status_text(entry), f"cannot start: {reason}", "-"]
    config = model_config(cfg)
    params = count_parameters(config, cfg.train.tie_embeddings)
    out_dir = out_dir_of(entry)
    row = [
        entry["name"],
        architecture(config),
        f"{config.n_layer}L_{config.n_head}H_{config.n_embd}D",
        f"{params / 1e6:.1f}M",
        str(cfg.seed),
        status_text(entry),
    ]
    if out_dir.exists() and not os.access(out_dir, os.R_OK | os.X_OK):
        return [*row, f"- (cannot read {out_dir})", "-"]
    max_tokens, done = cfg.train.max_tokens, 0
    ckpt, _ = newest_loadable(out_dir)
    if ckpt is not None and ckpt.hparams:  # (a save cut short has no hyperparameters yet)
        max_tokens = ckpt.hparams["train"]["max_tokens"]  # what the run was launched with
        done = ckpt.tokens_seen()
    val = last_val_loss(out_dir)
    progress = f"{_tokens(done)} / {_tokens(max_tokens)}"
    if isinstance(max_tokens, int) and max_tokens > 0:
        progress += f" ({100 * done / max_tokens:.0f}%)"
    return [*row, progress, f"{val:.3f}" if val is not None else "-"]


def status_text(entry: dict) -> str:
    """The entry's status, with its SLURM job's state while it is queued or running."""
    status = entry["status"] + (" (optional)" if entry.get("optional") else "")
    if entry["status"] == "running" and entry.get("slurm_job"):
        try:
            state = str(slurm.job_state(entry["slurm_job"], retry_s=0) or "gone")
        except UserError:
            state = "state unknown (squeue does not answer)"
        status += f", job {entry['slurm_job']} {state}"
    return status


def list_experiments(queues: list[Path] | None = None) -> None:
    """Print each queue's experiments: architecture, true parameters, status, progress, last val loss.

    Args:
        queues: Queue files to show (default: experiments.yaml and experiments.demo.yaml).
    """
    header = ["name", "arch", "size", "params", "seed", "status", "progress (tokens)", "val loss"]
    for path in queue_files(queues):
        print(f"{path}:")
        print(text_table(header, [experiment_row(e) for e in Queue(path).load()]) + "\n")


def _last_line(text: str) -> str:
    """jsonargparse's reason: the last line of what it printed ("error: Parser key ... ")."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else ""


def _tokens(n: int | None) -> str:
    if not isinstance(n, int):
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
