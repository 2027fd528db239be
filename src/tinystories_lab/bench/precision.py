"""`tinystories-lab precision`: the training precision to use on this machine, from a measurement."""

from __future__ import annotations

import sys

import torch

from tinystories_lab.bench.training import peak_flops
from tinystories_lab.hardware import resolve_device

BF16_SPEEDUP = 2.0  # bf16 matmul / fp32 matmul rate above which bf16-mixed trains faster end to end


def choose_precision(device: torch.device) -> tuple[str, str]:
    """The fastest stable training precision on `device`, and why."""
    if device.type == "cuda":  # the configs' own choice for GPUs; no measurement needed
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # emulated bf16 is slow
        return ("bf16-mixed", "this GPU has bf16") if bf16 else ("32-true", "this GPU has no bf16")
    ratio = peak_flops(device, torch.bfloat16, repeats=2) / peak_flops(device, torch.float32, repeats=2)
    why = f"bf16 matrix products run at {ratio:.1f}x the fp32 rate on this CPU"
    return ("bf16-mixed" if ratio >= BF16_SPEEDUP else "32-true"), why


def precision(device: str = "auto") -> str:
    """Print the fastest stable training precision here: bf16-mixed on a GPU with bf16, and on a CPU
    whose bf16 matrix products run at least twice the fp32 rate (AVX512-BF16 or AMX); else 32-true.

    `make demo` passes it to the demo runs; `make bench-sweep` shows the numbers behind the rule.

    Args:
        device: 'auto', 'cpu' or 'cuda'.
    """
    device = resolve_device(device)
    choice, why = choose_precision(torch.device(device))
    print(f"Training precision: {choice} ({why}).", file=sys.stderr)
    print(choice)
    return choice
