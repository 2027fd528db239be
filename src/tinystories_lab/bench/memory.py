"""`tinystories-lab step-memory`: peak memory of each config's real training step (two optimizer steps of one
micro batch per rank through `tinystories_lab.pretrain`, measured by `tinystories_lab.probe`, which also
picks the micro batch of `MICRO=auto`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tinystories_lab.bench.training import Setting, resolve_config
from tinystories_lab.configs import parse_config
from tinystories_lab.hardware import resolve_device
from tinystories_lab.probe import step_peak
from tinystories_lab.render import text_table

VARIANTS = [
    f"{arch}_{shape}" for shape in ("6L_6H_288D", "8L_8H_768D", "12L_8H_1024D") for arch in ("gpt", "llama")
]
GPU_TARGET_BYTES = 16e9  # the GPU the configs' micro batches are sized for (docs/recipe.md: 16 GB)


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
