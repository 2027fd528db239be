"""What a run leaves on disk: LitGPT checkpoints, their hyperparameters, and the logged metrics."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from tinystories_lab.errors import UserError
from tinystories_lab.experiments.queue import SEED_ARGS

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
        """The `litgpt pretrain` arguments saved next to the checkpoint; {} when a kill cut the save short
        before LitGPT wrote them (it writes the weights first, which resume fine)."""
        path = self.folder / "hyperparameters.yaml"
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}

    def step_count(self) -> int:
        """Optimizer steps taken up to this checkpoint."""
        return int(self.load()["step_count"])

    def tokens_seen(self) -> int:
        """Training tokens consumed up to this checkpoint, over all devices."""
        train = self.hparams["train"]
        per_iter = train["micro_batch_size"] * train["max_seq_length"] * world_size(self.hparams)
        return int(self.load()["iter_num"]) * per_iter


def world_size(hparams: dict) -> int:
    """A run's training processes: devices x num_nodes of its saved arguments or its queue entry ('auto'
    devices count 1)."""
    devices = hparams.get("devices", 1)
    return (devices if isinstance(devices, int) else 1) * hparams.get("num_nodes", 1)


def step_checkpoints(out_dir: Path) -> list[Checkpoint]:
    """`step-*` checkpoints, newest first: the candidates LitGPT's `--resume auto` chooses from."""
    # The run's own folders only, never those of runs below it (check_run_folder refuses such an out_dir).
    found = [Checkpoint(p) for p in out_dir.glob("step-*/lit_model.pth")] if out_dir.is_dir() else []
    return sorted(found, key=lambda c: c.step, reverse=True)


def final_checkpoint(out_dir: Path) -> Checkpoint | None:
    path = out_dir / "final" / "lit_model.pth"
    return Checkpoint(path) if path.is_file() else None


def is_current(result: Path, out_dir: Path) -> bool:
    """Whether a file made from a run's final checkpoint (eval.json, samples.json, interp results) exists
    and is newer than that checkpoint: a run extended since has to be evaluated again."""
    final = out_dir / "final" / "lit_model.pth"
    return result.is_file() and (not final.is_file() or result.stat().st_mtime >= final.stat().st_mtime)


def newest_loadable(out_dir: Path) -> tuple[Checkpoint | None, list[Checkpoint]]:
    """The checkpoint with the most steps among those that load (`final/` included), and the ones newer
    than it, or `final/`, that do not load (truncated or corrupt: a process killed while saving)."""
    broken = []
    newest = None
    for ckpt in step_checkpoints(out_dir):
        if ckpt.is_loadable():
            newest = ckpt
            break
        broken.append(ckpt)
    final = final_checkpoint(out_dir)
    if final is not None:
        if not final.is_loadable():
            broken.append(final)
        elif newest is None or final.step_count() >= newest.step_count():
            newest = final
    return newest, broken


def resume_point(out_dir: Path, say: Callable[[str], None] = print) -> Path | None:
    """The checkpoint a run resumes from: the newest that loads, `final/` included (a finished run whose
    `step-*` folders were deleted is extended, not restarted); None to start from zero.

    Starting from zero when `final/` exists but nothing loads would overwrite a finished run: refused.
    """
    newest, broken = newest_loadable(out_dir)
    names = ", ".join(c.folder.name for c in broken)
    if newest is None and final_checkpoint(out_dir) is not None:
        raise UserError(
            f"No checkpoint in {out_dir} loads ({names}: truncated or corrupt), and training from zero would "
            "overwrite its final/. Restore a checkpoint, or train it again from the start with RESTART=1 "
            "(`--restart true`), which deletes its checkpoints."
        )
    if newest is None:
        if broken:
            say(f"No checkpoint in {out_dir} loads (truncated or corrupt): training from the start.")
        return None
    if broken:
        say(f"Checkpoint {names} does not load (truncated or corrupt): resuming from {newest.folder.name}.")
    return newest.path


RUN_FILE = "run.yaml"


def write_run_file(out_dir: Path, name: str, queue: Path, seed: int | None = None) -> None:
    """Mark a folder as the run of experiment `name` of queue file `queue` (what `reset DELETE=1` and every
    run check before touching it); for one seed of several, also record the seed and what it set."""
    path = out_dir / RUN_FILE
    fields = {"experiment": name, "queue": str(Path(queue).resolve())}
    if path.is_file():
        fields = read_run_file(out_dir)
        if not fields:
            return  # not ours to rewrite: `reset DELETE=1` then refuses to delete the folder
    if seed is not None:
        fields["seed"] = seed
        fields["seed_sets"] = {what: arg.format(seed) for what, arg in SEED_ARGS.items()}
    text = yaml.safe_dump(fields, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def read_run_file(out_dir: Path) -> dict:
    """What the folder's run file says (experiment, queue); {} when there is none or it does not parse."""
    try:
        record = yaml.safe_load((out_dir / RUN_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return record if isinstance(record, dict) else {}


def is_run_folder(folder: Path) -> bool:
    """Whether a folder holds a run: the runner's run file, LitGPT checkpoints or a `final/`."""
    try:
        return (
            (folder / RUN_FILE).is_file()
            or (folder / "final").is_dir()
            or any(p.is_dir() for p in folder.glob("step-*"))
        )
    except OSError:
        return False


def check_run_folder(out_dir: Path, name: str, queue: Path) -> None:
    """Refuse a run folder that is not experiment `name`'s of queue file `queue`: one whose run file names
    another experiment or queue file (the same name in two queues), or a parent folder of other runs."""
    record = read_run_file(out_dir)
    owner = record.get("queue")
    if record and record.get("experiment") != name:
        raise UserError(
            f"{out_dir} is the run folder of experiment {record.get('experiment')!r} ({owner}), not of "
            f"{name}; give {name} its own out_dir."
        )
    if owner is not None and Path(owner).resolve() != Path(queue).resolve():
        raise UserError(
            f"{out_dir} belongs to {name} of {owner} (its run.yaml), not of {queue}; use --queues "
            f"'[{owner}]' (make: QUEUE={owner}), or give {name} of {queue} its own out_dir."
        )
    try:
        others = sorted(c.name for c in out_dir.iterdir() if c.is_dir() and is_run_folder(c))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        others = []
    if others:
        raise UserError(
            f"{out_dir} holds other runs ({', '.join(others)}): it cannot be {name}'s run folder; give "
            f"{name} an out_dir of its own, such as {out_dir / name}."
        )


def run_file_names(out_dir: Path, name: str) -> bool:
    """Whether the folder holds the run file the runner wrote for experiment `name`."""
    return read_run_file(out_dir).get("experiment") == name


class Point(NamedTuple):
    """One logged value: after `iter` micro-batches, `tokens` training tokens (all devices)."""

    iter: int
    tokens: int
    value: float


def metrics_files(out_dir: Path) -> list[Path]:
    """LitGPT's CSV metrics of a run (or of a bench's work folder), one per session, oldest first."""
    found = (out_dir / "logs" / "csv").glob("version_*/metrics.csv")
    return sorted(found, key=lambda p: int(p.parent.name.removeprefix("version_")))


def read_curves(out_dir: Path) -> tuple[list[Point], list[Point]]:
    """Training and validation loss against iterations and tokens, from LitGPT's CSV logs.

    A resumed run writes a new `version_N`; it replaces what the earlier versions logged from its first
    iteration on (the interrupted run's tail was redone). Partly written rows (a killed run) are skipped.
    """
    train: list[Point] = []
    val: list[Point] = []
    tokens_per_iter = None
    for path in metrics_files(out_dir):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if None not in r.values() and None not in r]
        train_rows = [r for r in rows if r.get("loss")]
        val_rows = [r for r in rows if r.get("val_loss")]
        if train_rows:
            first = int(train_rows[0]["iter"])
            last = int(train_rows[-1]["iter"])
            train = [p for p in train if p.iter < first]
            val = [p for p in val if p.iter < first]
            tokens_per_iter = int(train_rows[0]["total_tokens"]) // first
            train += [Point(int(r["iter"]), int(r["total_tokens"]), float(r["loss"])) for r in train_rows]
        elif val_rows and tokens_per_iter is not None:
            # A resume with nothing left to train logs only its final validation, at step = iter.
            last = int(val_rows[-1]["step"])
            val = [p for p in val if p.iter < last]
        else:
            continue
        for r in val_rows:
            # LitGPT logs periodic validation at step iter - 1 and the final one at step iter.
            it = min(int(r["step"]) + 1, last)
            val.append(Point(it, it * tokens_per_iter, float(r["val_loss"])))
    return train, val


def last_val_loss(out_dir: Path) -> float | None:
    """The most recent validation loss in the metrics."""
    _, val = read_curves(out_dir)
    return val[-1].value if val else None


def saved_by_fsdp(checkpoint: Path) -> bool:
    """Whether a checkpoint was saved by an FSDP run: its optimizer state is keyed by parameter names (one
    device and DDP key it by position). Read memory-mapped: nothing but the keys is loaded."""
    state = torch.load(checkpoint, mmap=True, map_location="cpu", weights_only=False)
    return any(isinstance(key, str) for key in state.get("optimizer", {}).get("state", {}))


def check_resumable(checkpoint: Path, strategy: str) -> None:
    """Refuse to resume an FSDP checkpoint under DDP or one device, or the other way round: their optimizer
    states are laid out differently, and Lightning would fail after the processes have started."""
    fsdp = saved_by_fsdp(checkpoint)
    if fsdp != (strategy == "fsdp"):
        saved = "FSDP" if fsdp else "DDP or one device"
        now = {"fsdp": "FSDP", "ddp": "DDP", "single": "one device"}[strategy]
        fix = "strategy: fsdp and devices > 1" if fsdp else "strategy: ddp (or devices: 1)"
        raise UserError(
            f"{checkpoint} was saved under {saved} and cannot be resumed under {now}: set {fix} in the entry "
            "to resume it, or start over with RESTART=1."
        )


def delete_checkpoints(out_dir: Path) -> None:
    """What `--restart` asks for: the run's checkpoints go, so training starts from zero (logs stay)."""
    folders = [c.folder for c in step_checkpoints(out_dir)] + [out_dir / "final"]
    folders = [f for f in folders if f.is_dir()]
    for folder in folders:
        shutil.rmtree(folder)
    if folders:
        print(f"Restarting from zero: deleted {', '.join(f.name for f in folders)} in {out_dir}.")
