"""Memory of the real training step: `tinystories-lab step-memory`, and the micro batch `MICRO=auto` picks.

Both run the project's training path itself (`tinystories_lab.pretrain`: Fabric, its precision plugin,
torch.compile where it runs) for two optimizer steps of one micro batch per rank, in processes of their
own, on as many devices and under the strategy the run will use (DDP's gradient buckets and
communication buffers, or FSDP's shards, are in the peak), and read rank 0's peak: the CUDA allocator's
maximum on a GPU, the process's peak resident memory on a CPU (which also counts Python, torch and the
data, about 1 GiB).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from tinystories_lab.bench.training import Setting, resolve_config, run_project
from tinystories_lab.configs import parse_config
from tinystories_lab.errors import UserError
from tinystories_lab.hardware import resolve_device
from tinystories_lab.render import text_table

VARIANTS = [
    f"{arch}_{shape}" for shape in ("6L_6H_288D", "8L_8H_768D", "12L_8H_1024D") for arch in ("gpt", "llama")
]
GPU_TARGET_BYTES = 16e9  # the GPU the configs' micro batches are sized for (docs/recipe.md: 16 GB)
HEADROOM = 0.85  # a micro batch must leave this share of the device's memory unused by its peak
CPU_MICRO_BATCH = 16  # on a CPU: the fastest micro batch of the 6L variants in the benchmark sweep


def step_peak(
    config: Path, micro_batch: int, overrides: list[str], device: str, compile: bool, env: dict | None = None,
    devices: int = 1, strategy: str = "auto",
) -> dict:  # fmt: skip
    """Two real optimizer steps of `config` at `micro_batch` per rank (no accumulation) on `devices` under
    `strategy`: rank 0's `peak_memory_gib`, and on a GPU `device_memory_gib`, its total memory."""
    batch = micro_batch * devices
    args = [*overrides, f"--train.micro_batch_size={micro_batch}", f"--train.global_batch_size={batch}"]
    seq_len = parse_config(config, *args).train.max_seq_length
    args.append(f"--train.max_tokens={2 * batch * seq_len}")
    with tempfile.TemporaryDirectory() as tmp:
        return run_project(config, args, 1, compile, device, Path(tmp), env, devices, strategy)


def largest_fitting(batch: int, fits: Callable[[int], bool]) -> int:
    """The largest power of two dividing `batch` for which `fits` holds, trying from the largest down."""
    for micro in (2**k for k in range(batch.bit_length(), -1, -1)):
        if micro <= batch and batch % micro == 0 and fits(micro):
            return micro
    raise UserError(f"Not even a micro batch of 1 fits in {HEADROOM:.0%} of this device's memory.")


def auto_micro_batch(
    config: Path, overrides: list[str], per_device_batch: int, env: dict, devices: int = 1,
    strategy: str = "auto",
) -> tuple[int, str]:  # fmt: skip
    """The micro batch `MICRO=auto` trains with, and why. On GPUs (the run's, `env`'s
    CUDA_VISIBLE_DEVICES): the largest power of two whose real step on `devices` under `strategy`,
    uncompiled (compiling only lowers the peak), peaks under HEADROOM of a GPU's memory on rank 0. On a
    CPU: CPU_MICRO_BATCH, or the largest power of two below it that divides the batch."""
    if not torch.cuda.is_available() or env.get("CUDA_VISIBLE_DEVICES") == "":
        micro = largest_fitting(per_device_batch, lambda m: m <= CPU_MICRO_BATCH)
        return micro, f"the CPU default, {CPU_MICRO_BATCH}"
    peaks: dict[int, tuple[float, float]] = {}

    def fits(micro: int) -> bool:
        try:
            run = step_peak(config, micro, overrides, "cuda", False, env, devices, strategy)
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                return False
            raise
        peaks[micro] = (run["peak_memory_gib"], run["device_memory_gib"])
        print(
            f"micro batch {micro}: step peak {peaks[micro][0]:.1f} GiB of {peaks[micro][1]:.1f} GiB",
            flush=True,
        )
        return peaks[micro][0] <= HEADROOM * peaks[micro][1]

    micro = largest_fitting(per_device_batch, fits)
    peak, total = peaks[micro]
    where = f" on {devices} GPUs (strategy {strategy})" if devices > 1 else ""
    return micro, f"its step{where} peaks at {peak:.1f} GiB, under {HEADROOM:.0%} of a GPU's {total:.1f} GiB"


def step_memory(
    models: list[str] = VARIANTS,  # noqa: B006 - jsonargparse needs a literal default
    micro_batch_size: int | None = None,
    compile: bool = True,
    device: str = "auto",
    data_dir: Path = Path("data"),
    queues: list[Path] | None = None,
    devices: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
) -> list[dict]:
    """Peak memory of each config's real training step at its micro batch (or `micro_batch_size`).

    Two optimizer steps through the project's training path in processes of their own, on the sample
    data (`make data-sample`), on `devices` under `strategy` (rank 0's peak); the configs' micro batches
    are the largest powers of two under 16 GB on one device.

    Args:
        models: Experiment names or config paths.
        micro_batch_size: Measure at this micro batch instead of each config's own.
        compile: Compile the model, as training does.
        device: 'auto', 'cpu' or 'cuda'.
        data_dir: Data folder holding the sample's tokenizer and token files.
        queues: Queue files to look experiment names up in (default: experiments.yaml and
            experiments.demo.yaml).
        devices: Processes (GPUs) to measure on, as a run with `devices: N` trains.
        strategy: 'auto', 'ddp' or 'fsdp', as the run's entry sets it.
    """
    device = resolve_device(device)
    rows = []
    for model in models:
        config = resolve_config(model, queues)
        micro = micro_batch_size or parse_config(config).train.micro_batch_size
        overrides = Setting(model).overrides(data_dir)
        run = step_peak(config, micro, overrides, device, compile, None, devices, strategy)
        peak = run["peak_memory_gib"]
        rows.append({"model": model, "micro_batch_size": micro, "peak_gib": peak, "device": device})
        on = f"{devices} x {device} ({strategy})" if devices > 1 else device
        print(f"{model}: micro batch {micro}, peak {peak:.2f} GiB on {on}", flush=True)
    under = {True: "yes", False: "no"}
    table = [
        [
            r["model"],
            r["micro_batch_size"],
            f"{r['peak_gib']:.2f}",
            under[r["peak_gib"] * 2**30 <= GPU_TARGET_BYTES],
        ]
        for r in rows
    ]
    print(text_table(["config", "micro", "peak GiB", "under 16 GB"], table))
    return rows
