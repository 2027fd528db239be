"""What a run leaves on disk: LitGPT checkpoints, their hyperparameters, and the logged metrics."""

from __future__ import annotations

import csv
import fcntl
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

EXPERIMENTS_DIR = Path("experiments/tiny_stories")


def out_dir_of(entry: dict) -> Path:
    """An experiment's fixed folder (LitGPT's out_dir plus our logs, evaluations and exports):
    experiments/tiny_stories/<name>, or the entry's own `out_dir`."""
    return Path(entry.get("out_dir") or EXPERIMENTS_DIR / entry["name"])


@dataclass(frozen=True)
class Checkpoint:
    """One `lit_model.pth` written by `litgpt pretrain` (a `step-*` folder or `final`)."""

    path: Path

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def step(self) -> int | None:
        """The optimizer step in the folder name; None for `final`."""
        name = self.folder.name
        return int(name.split("-")[1]) if name.startswith("step-") else None

    def load(self) -> dict:
        """The checkpoint's contents, memory-mapped (cheap even for large models)."""
        return torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)

    def is_loadable(self) -> bool:
        """Whether the file loads and holds what LitGPT resumes from (a truncated file does not)."""
        try:
            return {"model", "optimizer", "iter_num", "step_count"} <= self.load().keys()
        except Exception:
            return False

    @cached_property
    def hparams(self) -> dict:
        """The `litgpt pretrain` arguments saved next to the checkpoint."""
        return yaml.safe_load((self.folder / "hyperparameters.yaml").read_text())

    def tokens_seen(self) -> int:
        """Training tokens consumed up to this checkpoint, over all devices."""
        train = self.hparams["train"]
        devices = self.hparams.get("devices", 1)
        world = (devices if isinstance(devices, int) else 1) * self.hparams.get("num_nodes", 1)
        return int(self.load()["iter_num"]) * train["micro_batch_size"] * train["max_seq_length"] * world


def step_checkpoints(out_dir: Path) -> list[Checkpoint]:
    """`step-*` checkpoints, newest first: the candidates LitGPT's `--resume auto` chooses from."""
    found = [Checkpoint(p) for p in out_dir.rglob("step-*/*.pth")] if out_dir.is_dir() else []
    return sorted(found, key=lambda c: c.step, reverse=True)


def final_checkpoint(out_dir: Path) -> Checkpoint | None:
    path = out_dir / "final" / "lit_model.pth"
    return Checkpoint(path) if path.is_file() else None


def is_current(result: Path, out_dir: Path) -> bool:
    """Whether a file made from a run's final checkpoint (eval.json, samples.json, interp results) exists
    and is newer than that checkpoint: a run extended since has to be evaluated again."""
    final = out_dir / "final" / "lit_model.pth"
    return result.is_file() and (not final.is_file() or result.stat().st_mtime >= final.stat().st_mtime)


def newest_checkpoint(out_dir: Path) -> Checkpoint | None:
    """`final` if training finished, else the newest step checkpoint."""
    steps = step_checkpoints(out_dir)
    return final_checkpoint(out_dir) or (steps[0] if steps else None)


class Point(NamedTuple):
    """One logged value: after `iter` micro-batches, `tokens` training tokens (all devices)."""

    iter: int
    tokens: int
    value: float


def read_curves(out_dir: Path) -> tuple[list[Point], list[Point]]:
    """Training and validation loss against iterations and tokens, from LitGPT's CSV logs.

    A resumed run writes a new `version_N`; it replaces what the earlier versions logged from its first
    iteration on (the interrupted run's tail was redone). Partly written rows (a killed run) are skipped.
    """
    train: list[Point] = []
    val: list[Point] = []
    files = sorted(
        (out_dir / "logs" / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])
    )
    tokens_per_iter = None
    for path in files:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if None not in r.values() and None not in r]
        train_rows = [r for r in rows if r.get("loss")]
        if not train_rows:
            continue
        first = int(train_rows[0]["iter"])
        last = int(train_rows[-1]["iter"])
        train = [p for p in train if p.iter < first]
        val = [p for p in val if p.iter < first]
        tokens_per_iter = int(train_rows[0]["total_tokens"]) // first
        train += [Point(int(r["iter"]), int(r["total_tokens"]), float(r["loss"])) for r in train_rows]
        for r in rows:
            if r.get("val_loss"):
                # LitGPT logs periodic validation at step iter - 1 and the final one at step iter.
                it = min(int(r["step"]) + 1, last)
                val.append(Point(it, it * tokens_per_iter, float(r["val_loss"])))
    return train, val


def last_val_loss(out_dir: Path) -> float | None:
    """The most recent validation loss in the metrics."""
    _, val = read_curves(out_dir)
    return val[-1].value if val else None


class RunLock:
    """An exclusive lock held while an experiment trains, by the runner and the LitGPT it starts.

    The OS drops it when every process holding it has exited (kill -9 and reboots included), so a
    `running` entry whose lock is free is stale and can be resumed.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "runner.lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False if another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing our copy; a LitGPT child still running keeps the lock
            self.fd = None

    def is_held(self) -> bool:
        """Whether some process holds the lock now."""
        if not self.path.exists():
            return False
        probe = RunLock(self.path.parent)
        if probe.acquire():
            probe.release()
            return False
        return True
