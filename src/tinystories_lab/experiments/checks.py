"""What the runner checks before it starts, resumes or deletes a run: whether an entry is really running,
whether it may start (config, data, devices, checkpoints), and whether a folder is the runner's to delete."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from tinystories_lab.configs import check_training, model_config, parse_config
from tinystories_lab.data.tokenizer import load_tokenizer
from tinystories_lab.errors import UserError
from tinystories_lab.experiments import slurm
from tinystories_lab.experiments.launch import choose_strategy
from tinystories_lab.experiments.locks import run_is_alive, run_processes
from tinystories_lab.experiments.queue import Queue
from tinystories_lab.experiments.runs import (
    Checkpoint,
    check_resumable,
    check_run_folder,
    newest_loadable,
    out_dir_of,
    resume_point,
    run_file_names,
    step_checkpoints,
    world_size,
)
from tinystories_lab.experiments.slurm import is_slurm


def is_alive(entry: dict) -> bool:
    """Whether a `running` entry is really running: its SLURM job is listed, or a process of the run
    holds a lock in its folder."""
    if is_slurm(entry):
        return slurm.job_state(entry.get("slurm_job")) is not None
    return run_is_alive(out_dir_of(entry))


def is_runnable(entry: dict, include_optional: bool = False) -> bool:
    """todo entries, and `running` ones whose runner or job died; never one whose folder is unreadable."""
    if entry.get("optional") and not include_optional:
        return False
    if entry["status"] not in ("todo", "running"):
        return False
    out_dir = out_dir_of(entry)
    if not accessible(out_dir):
        print(f"Skipping {entry['name']}: its run folder {out_dir} is not accessible (permission denied).")
        return False
    return entry["status"] == "todo" or not is_alive(entry)


def accessible(out_dir: Path) -> bool:
    """Whether the runner may read and write a run folder (one not made yet counts as accessible)."""
    return not out_dir.exists() or os.access(out_dir, os.R_OK | os.W_OK | os.X_OK)


def where_running(entry: dict) -> str:
    if is_slurm(entry):
        return f"SLURM job {entry.get('slurm_job')}"
    where = f"pid {entry.get('pid')} on {entry.get('host')}"
    if entry.get("host") != socket.gethostname():
        return where
    processes = run_processes(out_dir_of(entry))
    if entry.get("pid") in processes or not processes:
        return where
    held = ", ".join(f"pid {pid} holds {lock.name}" for pid, lock in processes.items())
    return (
        f"its runner pid {entry.get('pid')} is gone, but {held}; `make cancel MODEL={entry['name']}` ends it"
    )


def check_ready(
    entry: dict,
    args: list[str],
    restart: bool = False,
    micro_batch_size: Literal["auto"] | None = None,
    resize: bool = False,
) -> None:
    """Refuse to start when the config does not parse, cannot train on the entry's devices, its tokenizer
    or token files are missing, its checkpoints cannot be resumed (another strategy's, or trained on another
    world size or batch unless `resize`); for SLURM, what sbatch would refuse."""
    check_local_nodes(entry)
    # MICRO=auto picks a micro batch dividing the per-device batch: only the devices must divide the batch.
    auto = ["--train.micro_batch_size=1"] if micro_batch_size == "auto" else []
    cfg = parse_config(entry["config"], *entry.get("args", []), *args, *auto)
    check_training(cfg.train, world_size(entry))
    if cfg.tokenizer_dir is None:
        raise UserError(f"{entry['config']} sets no tokenizer_dir; the TinyStories data module needs one.")
    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    cfg.data.connect(
        tokenizer, batch_size=cfg.train.micro_batch_size, max_seq_length=cfg.train.max_seq_length
    )
    cfg.data.prepare_data()  # raises with the command that makes the token files
    vocab = model_config(cfg).padded_vocab_size
    if tokenizer.vocab_size > vocab:
        raise UserError(
            f"The tokenizer in {cfg.tokenizer_dir} has {tokenizer.vocab_size:,} tokens but {entry['config']} "
            f"has a vocabulary of {vocab:,}; raise model_config.padded_vocab_size or use a smaller tokenizer."
        )
    if not restart:
        ckpt = resume_point(out_dir_of(entry), say=lambda _: None)  # refuses to overwrite a finished run
        if ckpt is not None and cfg.seed != Checkpoint(ckpt).hparams.get("seed", cfg.seed):
            raise UserError(
                f"{entry['name']} runs with seed {cfg.seed}, but its checkpoints in {out_dir_of(entry)} were "
                f"trained with seed {Checkpoint(ckpt).hparams['seed']}; put that seed first in its seeds:, "
                "or train it from zero with RESTART=1."
            )
        strategy = entry.get("strategy", "auto")
        if ckpt and not (is_slurm(entry) and strategy == "auto"):  # there, auto depends on the node's GPU
            # DDP's and FSDP's checkpoints differ: refused here, before anything starts.
            check_resumable(ckpt, choose_strategy(cfg, world_size(entry), strategy))
        if not resize:
            check_same_batch(entry, cfg.train, micro_batch_size)
    if is_slurm(entry):
        if micro_batch_size == "auto":
            raise UserError(
                f"{entry['name']}: MICRO=auto measures this machine's GPU, not the cluster's; for a SLURM "
                "run give the micro batch with ARGS=--train.micro_batch_size=N."
            )
        slurm.check_request(entry)


def check_local_nodes(entry: dict) -> None:
    """Refuse `num_nodes > 1` on `environment: local`: the runner starts processes on this machine only,
    and the ranks would wait 30 minutes for nodes that never come."""
    nodes = entry.get("num_nodes", 1)
    if nodes > 1 and not is_slurm(entry):
        raise UserError(
            f"{entry['name']}: num_nodes: {nodes} needs `environment: slurm` (the local runner starts "
            "processes on this machine only)."
        )


def check_same_batch(entry: dict, train, micro_batch_size: Literal["auto"] | None = None) -> None:
    """Refuse a resume whose world size, global batch or micro batch differs from the checkpoint's: it would
    train another run (other optimizer steps and data order) under the same name."""
    newest, _ = newest_loadable(out_dir_of(entry))
    recorded = [c.hparams for c in (newest, *step_checkpoints(out_dir_of(entry))) if c and c.hparams]
    if not recorded:
        return
    saved = recorded[0]  # the newest checkpoint's, or the one before when its save was cut short
    changes = [("world size (devices x num_nodes)", world_size(saved), world_size(entry)),
               ("global batch", saved["train"]["global_batch_size"], train.global_batch_size)]  # fmt: skip
    if micro_batch_size != "auto":  # MICRO=auto keeps the micro batch the run started with
        changes.append(("micro batch", saved["train"]["micro_batch_size"], train.micro_batch_size))
    changed = [f"{what} {old} -> {new}" for what, old, new in changes if old != new]
    if changed:
        raise UserError(
            f"{entry['name']}: its checkpoint {newest.folder.name} was trained with another batch "
            f"({'; '.join(changed)}); resuming would change the training. Put the entry's devices/args back, "
            "or resume anyway with RESIZE=1 (`--resize true`), or train from zero with RESTART=1."
        )


def check_deletable(out_dir: Path, name: str, queue: Queue) -> None:
    """Refuse to delete anything but a real folder the runner made for experiment `name`."""
    if out_dir.is_symlink():
        raise UserError(f"{out_dir} is a symlink (to {out_dir.resolve()}); delete what you mean by hand.")
    resolved = out_dir.resolve()
    if Path.cwd().resolve().is_relative_to(resolved) or queue.target.is_relative_to(resolved):
        raise UserError(f"{out_dir} holds the current folder or the queue; it is not a run folder.")
    if not run_file_names(out_dir, name):
        raise UserError(
            f"{out_dir} was not made by the runner for {name} (no run.yaml naming it); delete it by hand "
            "if you mean it."
        )
    check_run_folder(out_dir, name, queue.path)  # only from the queue file that owns it
