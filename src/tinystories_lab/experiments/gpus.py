"""Which GPUs a local run trains on: each runner pins its own (CUDA_VISIBLE_DEVICES) and holds a lock per
GPU while it trains, so two runners on one machine never share a GPU unknowingly.

Locks are keyed by the GPU's UUID, not its index: inside a cgroup-constrained SLURM allocation every job
sees its GPU as "0". The lock folder is shared by every user of the machine (mode 1777, like /tmp; its
files 0666)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tinystories_lab.errors import UserError
from tinystories_lab.experiments.locks import Lock

LOCK_DIR = Path(tempfile.gettempdir()) / "tinystories-lab-gpus"  # per machine, like the GPUs themselves


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_uuids(visible: list[str]) -> list[str]:
    """Each visible GPU's UUID (what identifies it across allocations); its CUDA_VISIBLE_DEVICES entry where
    torch cannot tell."""
    import torch

    try:
        return [f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in range(len(visible))]
    except (RuntimeError, AssertionError, AttributeError):
        return list(visible)


def shared_lock_dir(lock_dir: Path) -> Path:
    """The GPU lock folder, made writable by every user of the machine (sticky, as /tmp)."""
    if not lock_dir.is_dir():
        lock_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock_dir.chmod(0o1777)
        except PermissionError:  # made by another user at the same moment
            pass
    return lock_dir


def claim_gpus(
    devices: int,
    wanted: list[int] | None = None,
    visible: list[str] | None = None,
    lock_dir: Path = LOCK_DIR,
    uuids: list[str] | None = None,
) -> tuple[str | None, list[Lock]]:
    """Lock `devices` GPUs (the `wanted` indices into the visible ones, or the first free ones).

    Returns the CUDA_VISIBLE_DEVICES value for the run and the locks to hold while it trains; (None, [])
    on a machine without GPUs. Refuses when the GPUs are taken or too few. `uuids`: the visible GPUs' UUIDs,
    which name the locks (by default asked of torch; the visible entries themselves when `visible` is given).
    """
    if visible is None:
        visible = visible_gpus()
        uuids = uuids or gpu_uuids(visible)
    if not visible:
        return None, []
    key = dict(zip(visible, uuids or visible))
    if wanted is not None:
        unknown = [i for i in wanted if not 0 <= i < len(visible)]
        if unknown:
            raise UserError(
                f"gpus: {wanted} names GPU {unknown[0]}, but only {len(visible)} are visible here."
            )
        candidates = [visible[i] for i in wanted]
    elif devices > len(visible):
        raise UserError(f"devices: {devices} asks for more GPUs than the {len(visible)} visible here.")
    else:
        candidates = visible
    shared_lock_dir(lock_dir)
    taken, busy = [], []
    for gpu in candidates:
        if len(taken) == devices:
            break
        lock = Lock(lock_dir / f"gpu-{key[gpu]}.lock", shared=True)
        if lock.acquire():
            taken.append((gpu, lock))
        else:
            busy.append(f"GPU {gpu} ({lock.holder()})")
            if wanted is not None:
                break
    if len(taken) < devices:
        for _, lock in taken:
            lock.release()
        raise UserError(
            f"Not enough free GPUs for devices: {devices}: in use by other runs: {', '.join(busy)}. "
            "Wait for them, or list free ones with `gpus: [...]` in the entry."
        )
    return ",".join(g for g, _ in taken), [lock for _, lock in taken]
