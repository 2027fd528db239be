"""Measuring the project's real training step, for training (`MICRO=auto`) and for the benchmarks.

Both run the project's training path itself (`tinystories_lab.pretrain`: Fabric, its precision plugin,
torch.compile where it runs) in processes of their own, on as many devices and under the strategy the run
will use (DDP's gradient buckets and communication buffers, or FSDP's shards, are in the peak). The training
process reports back structurally, never through its printed text: rank 0 writes `<out_dir>/device.json`
(its peak memory and, on a GPU, the device's total), and it exits with OUT_OF_MEMORY_EXIT when the step
does not fit. The peak is the CUDA allocator's maximum on a GPU, the process's peak resident memory on a
CPU (which also counts Python, torch and the data, about 1 GiB).

It sits beside `pretrain.py`, not in `experiments/` or `bench/`: the runner and the benchmarks both
import it, and it imports neither.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from tinystories_lab.configs import parse_config
from tinystories_lab.errors import UserError
from tinystories_lab.experiments.runs import metrics_files, world_size

DEVICE_FILE = "device.json"  # written by the training process's rank 0 into its out_dir
OUT_OF_MEMORY_EXIT = 3  # a training process out of device memory (1: an error, 2: usage, 75: preempted)
HEADROOM = 0.85  # a micro batch must leave this share of the device's memory unused by its peak
CPU_MICRO_BATCH = 16  # on a CPU: the fastest micro batch of the 6L variants in the benchmark sweep


class OutOfMemory(Exception):
    """The measured step did not fit the device's memory."""


def run_project(
    config: Path,
    overrides: list[str],
    warmup: int,
    compile: bool,
    device: str,
    workdir: Path,
    env: dict[str, str] | None = None,
    devices: int = 1,
    strategy: str = "auto",
) -> dict:
    """The project's training path (`python -m tinystories_lab.pretrain`, as the runner starts it) for
    warmup + steps optimizer steps; speed from the median step time in its CSV metrics (robust to a
    passing disturbance), rank 0's peak memory (under `strategy` with `devices` > 1) from its device.json.
    Raises OutOfMemory when the step does not fit."""
    cfg = parse_config(config, *overrides)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.max_seq_length
    cmd = [sys.executable, "-m", "tinystories_lab.pretrain", f"--strategy={strategy}"]
    cmd += [
        "--config",
        str(config),
        *overrides,
        f"--out_dir={workdir}",
        f"--devices={devices}",
        "--logger_name=csv",
        "--train.save_interval=null",
        "--train.log_interval=1",
        "--eval.interval=1000000",
        "--eval.initial_validation=false",
        "--eval.final_validation=false",
    ]
    result = subprocess.run(
        cmd, env=bench_env(compile, device, env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if result.returncode == OUT_OF_MEMORY_EXIT:
        raise OutOfMemory(f"{config} at {overrides}: out of memory")
    if result.returncode != 0:
        raise RuntimeError(f"the project's training path failed:\n{result.stdout[-3000:]}")
    with open(metrics_files(workdir)[0], newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    # `time` is the wall time since training started, logged after every optimizer step.
    times = [float(r["time"]) for r in rows]
    step_seconds = statistics.median(b - a for a, b in zip(times[warmup - 1 :], times[warmup:]))
    measured = json.loads((workdir / DEVICE_FILE).read_text())
    return {
        "tokens_per_s": tokens_per_step / step_seconds,
        "step_seconds": step_seconds,
        "losses": [float(r["loss"]) for r in rows],
        "peak_memory_gib": measured["peak_memory_gib"],
        "device_memory_gib": measured["device_memory_gib"],
    }


def bench_env(compile: bool, device: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child (from `base`, default ours): LitGPT always compiles unless
    TORCH_COMPILE_DISABLE=1, and picks a GPU whenever it sees one, so a CPU benchmark hides them."""
    env = {k: v for k, v in (base or os.environ).items() if k != "TORCH_COMPILE_DISABLE"}
    if not compile:
        env["TORCH_COMPILE_DISABLE"] = "1"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


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
    import torch

    if not torch.cuda.is_available() or env.get("CUDA_VISIBLE_DEVICES") == "":
        micro = largest_fitting(per_device_batch, lambda m: m <= CPU_MICRO_BATCH)
        return micro, f"the CPU default, {CPU_MICRO_BATCH}"
    peaks: dict[int, tuple[float, float]] = {}

    def fits(micro: int) -> bool:
        try:
            run = step_peak(config, micro, overrides, "cuda", False, env, devices, strategy)
        except OutOfMemory:
            print(f"micro batch {micro}: out of memory", flush=True)
            return False
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


def micro_batch_of(entry: dict, env: dict[str, str]) -> tuple[int, str, int]:
    """`MICRO=auto` for a queue entry, on its devices under its strategy: the micro batch, why, and the
    gradient accumulation steps it gives (the global batch, hence the training, stays the same)."""
    args = [*entry.get("args", []), *entry.get("run_args", [])]
    per_device = parse_config(entry["config"], *args).train.global_batch_size // world_size(entry)
    devices, strategy = entry.get("devices", 1), entry.get("strategy", "auto")
    micro, why = auto_micro_batch(Path(entry["config"]), args, per_device, env, devices, strategy)
    return micro, why, per_device // micro


def write_device_file(out_dir: Path) -> None:
    """In the training process's rank 0, after training: its peak memory (GiB) and the device's total."""
    import resource

    import torch

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:  # ru_maxrss is in KiB on Linux
        peak, total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None
    out_dir.mkdir(parents=True, exist_ok=True)
    measured = {"peak_memory_gib": peak, "device_memory_gib": total}
    (out_dir / DEVICE_FILE).write_text(json.dumps(measured) + "\n")
