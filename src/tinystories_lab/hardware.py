"""What this machine offers: CPU cores, and the device a verb runs on."""

from __future__ import annotations

import os

import torch

from tinystories_lab.errors import UserError


def cpu_count() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; refuses unknown devices and a missing GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"Unknown device {device!r}: use auto, cpu or cuda.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no GPU here; use --device cpu or auto.")
    return device
