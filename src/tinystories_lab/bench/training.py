"""`make bench` and `make bench-sweep`: training speed of the project's path against a bare loop.

For each variant, on the current device, in one run: the device's peak FLOP/s measured by a large
matrix product; LitGPT's training loop as the runner starts it (`tinystories_lab.pretrain`) with the
variant's config and this project's DataModule on the sample (the real path); and the bare loop of
`bench.bare` on the same model, batches, precision, compile setting and optimizer. Both are timed over
optimizer steps after a warm-up that absorbs compilation. MFU uses FLOPs per token = 6N + 12 L H Q T
(nanoGPT, llama2.c).
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Literal

import torch

from tinystories_lab.configs import count_parameters, model_config, parse_config
from tinystories_lab.errors import UserError
from tinystories_lab.experiments.queue import find, load_entries
from tinystories_lab.hardware import cpu_count, resolve_device
from tinystories_lab.probe import bench_env, run_project
from tinystories_lab.render import markdown_table

Precision = Literal["32-true", "bf16-mixed", "bf16-true"]
RESULTS_DIR = Path("benchmarks/results")


def resolve_config(model: str, queues: list[Path] | None = None) -> Path:
    """A config path from an experiment name (in the queues) or a path to a YAML file."""
    if Path(model).is_file():
        return Path(model)
    return Path(find(load_entries(queues), model)["config"])


def device_name(device: torch.device) -> str:
    """A short name of the device for result files, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-2core-...'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        model = (
            re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
            if Path("/proc/cpuinfo").exists()
            else None
        )
        name = f"cpu {cpu_count()}core {model.group(1) if model else platform.processor()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best FLOP/s of a large square matrix product on the device (2048 on a CPU, 8192 on a GPU)."""
    torch.set_float32_matmul_precision("high")  # as the `litgpt` CLI sets it for training (TF32 on a GPU)
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def flops_per_token(cfg) -> float:
    """6N + 12 L H Q T: forward and backward through all parameters, plus attention over the context."""
    config = model_config(cfg)
    n = count_parameters(config, cfg.train.tie_embeddings)
    return 6 * n + 12 * config.n_layer * config.n_head * config.head_size * cfg.train.max_seq_length


def run_bare(config: Path, overrides: list[str], steps: int, warmup: int, compile: bool, device: str) -> dict:
    """The bare loop in a process of its own (so its peak memory is its own)."""
    settings = dict(
        config=str(config), overrides=overrides, steps=steps, warmup=warmup, compile=compile, device=device
    )
    with tempfile.TemporaryDirectory() as tmp:
        measured = Path(tmp) / "bare.json"
        cmd = [sys.executable, "-m", "tinystories_lab.bench.bare", json.dumps(settings), str(measured)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=bench_env(True, device))
        if result.returncode != 0:
            raise RuntimeError(f"the bare loop failed:\n{result.stderr[-3000:]}")
        return json.loads(measured.read_text())


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s, noting every run's tokens/s."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return ranked[len(ranked) // 2] | {"tokens_per_s_runs": [r["tokens_per_s"] for r in runs]}


@dataclass
class Setting:
    """What one benchmark row runs: a variant and the overrides of its config."""

    model: str
    precision: Precision | None = None
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    compile: bool = True

    def overrides(self, data_dir: Path) -> list[str]:
        """`litgpt pretrain` arguments: the sample data, and the setting's changes to the config."""
        args = [
            "--data.init_args.source=sample",
            f"--data.init_args.data_dir={data_dir}",
            f"--tokenizer_dir={data_dir / 'tokenizers' / 'sample'}",
        ]
        if self.precision:
            args.append(f"--precision={self.precision}")
        if self.micro_batch_size:
            args.append(f"--train.micro_batch_size={self.micro_batch_size}")
        if self.global_batch_size or self.micro_batch_size:
            args.append(f"--train.global_batch_size={self.global_batch_size or self.micro_batch_size}")
        return args


def bench_one(
    setting: Setting,
    steps: int,
    warmup: int,
    repeats: int,
    data_dir: Path,
    device: torch.device,
    peaks: dict[str, float],
    queues: list[Path] | None = None,
) -> dict:
    """Both paths for one setting: tokens/s, their ratio, MFU, peak memory and the data wait."""
    config = resolve_config(setting.model, queues)
    if not (data_dir / "tokenizers" / "sample").is_dir():
        raise UserError(
            f"No sample data in {data_dir}: benchmarks train on the sample; run `make data-sample`."
        )
    overrides = setting.overrides(data_dir)
    cfg = parse_config(config, *overrides)
    # A run of exactly warmup + steps optimizer steps, so both paths follow the same LR schedule.
    overrides.append(
        f"--train.max_tokens={(warmup + steps) * cfg.train.global_batch_size * cfg.train.max_seq_length}"
    )
    projects, bares = [], []
    for _ in range(repeats):  # alternated, so a slow spell of the machine hits both paths alike
        with tempfile.TemporaryDirectory() as tmp:
            projects.append(run_project(config, overrides, warmup, setting.compile, device.type, Path(tmp)))
        bares.append(run_bare(config, overrides, steps, warmup, setting.compile, device.type))
    project, bare = median_run(projects), median_run(bares)
    fpt = flops_per_token(cfg)
    peak = peaks["bf16" if cfg.precision.startswith("bf16") else "fp32"]
    return {
        "model": setting.model,
        "config": str(config),
        "precision": cfg.precision,
        "micro_batch_size": cfg.train.micro_batch_size,
        "global_batch_size": cfg.train.global_batch_size,
        "seq_len": cfg.train.max_seq_length,
        "compile": setting.compile,
        "parameters": count_parameters(model_config(cfg), cfg.train.tie_embeddings),
        "flops_per_token": fpt,
        "project": project | {"mfu": project["tokens_per_s"] * fpt / peak},
        "bare": bare | {"mfu": bare["tokens_per_s"] * fpt / peak},
        "ratio_project_over_bare": project["tokens_per_s"] / bare["tokens_per_s"],
        "data_wait_share": bare["data_seconds_per_step"] / project["step_seconds"],
    }


def run_benchmarks(
    settings: list[Setting],
    steps: int,
    warmup: int,
    repeats: int,
    data_dir: Path,
    device: str,
    out_dir: Path,
    name: str,
    queues: list[Path] | None = None,
) -> dict:
    """Measure the device's peaks, then every setting; write <device>-<date>-<name>.json and .md."""
    if steps < 1 or warmup < 1:
        raise UserError("Benchmarks need steps >= 1 and warmup >= 1 (the first step's time includes setup).")
    device = resolve_device(device)
    dev = torch.device(device)
    peaks = {"fp32": peak_flops(dev, torch.float32), "bf16": peak_flops(dev, torch.bfloat16)}
    fp32, bf16 = peaks["fp32"] / 1e9, peaks["bf16"] / 1e9
    print(f"{device_name(dev)}: matmul peak {fp32:,.0f} GFLOP/s fp32, {bf16:,.0f} GFLOP/s bf16")
    results = []
    for setting in settings:
        print(f"Benchmarking {setting}")
        results.append(bench_one(setting, steps, warmup, repeats, data_dir, dev, peaks, queues))
    report = {
        "name": name,
        "device": device_name(dev),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "peak_flops": peaks,
        "results": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report['device']}-{report['date']}-{name}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    page = bench_page(report)
    (out_dir / f"{stem}.md").write_text(page + "\n")
    print(page)
    print(f"Results: {out_dir / stem}.json and .md")
    return report


def bench_page(report: dict) -> str:
    """The report as Markdown: one row per setting."""
    header = [
        "model",
        "precision",
        "micro",
        "compile",
        "project tok/s",
        "bare tok/s",
        "project/bare",
        "MFU project",
        "MFU bare",
        "peak GiB project / bare",
        "data wait",
        "loss first -> last",
    ]
    rows = []
    for r in report["results"]:
        p, b = r["project"], r["bare"]
        rows.append(
            [
                r["model"],
                r["precision"],
                r["micro_batch_size"],
                "yes" if r["compile"] else "no",
                f"{p['tokens_per_s']:,.0f}",
                f"{b['tokens_per_s']:,.0f}",
                f"{r['ratio_project_over_bare']:.3f}",
                f"{p['mfu']:.1%}",
                f"{b['mfu']:.1%}",
                f"{p['peak_memory_gib']:.2f} / {b['peak_memory_gib']:.2f}",
                f"{r['data_wait_share']:.2%}",
                f"{p['losses'][0]:.3f} -> {p['losses'][-1]:.3f}",
            ]
        )
    peaks = report["peak_flops"]
    caption = (
        f"Device: {report['device']}, torch {report['torch']}, {report['date']}. Matmul peak "
        f"{peaks['fp32'] / 1e9:,.0f} GFLOP/s fp32, {peaks['bf16'] / 1e9:,.0f} GFLOP/s bf16. "
        f"Tokens/s from the median step time of {report['steps']} steps after {report['warmup']} warm-up "
        f"steps; each path run {report['repeats']} time(s), alternated, the median run shown."
    )
    return "\n".join([caption, "", markdown_table(header, rows)])


def bench(
    model: str = "gpt_demo,llama_demo",
    steps: int = 10,
    warmup: int = 3,
    repeats: int = 1,
    precision: Precision | None = None,
    micro_batch_size: int | None = None,
    global_batch_size: int | None = None,
    compile: bool = True,
    data_dir: Path = Path("data"),
    device: str = "auto",
    out_dir: Path = RESULTS_DIR,
    name: str = "bench",
    queues: list[Path] | None = None,
) -> dict:
    """Tokens/s of the project's training path (LitGPT's loop as the runner starts it) and of a bare loop,
    their ratio, MFU, peak memory and the share of step time spent waiting for data; written to
    out_dir/<device>-<date>-<name>.json and .md.

    Args:
        model: Comma-separated experiment names (or config paths) to benchmark.
        steps: Optimizer steps timed, after the warm-up.
        warmup: Optimizer steps run first and not timed (they include torch.compile's compilation).
        repeats: Runs of each path, alternated; the median counts.
        precision: Override the config's precision (32-true, bf16-mixed or bf16-true).
        micro_batch_size: Override the config's micro batch (also the global batch, unless given).
        global_batch_size: Override the config's global batch.
        compile: Compile the model (LitGPT always does; False sets TORCH_COMPILE_DISABLE=1).
        data_dir: Data folder holding the sample's tokenizer and token files (`make data-sample`).
        device: 'auto', 'cpu' or 'cuda'.
        out_dir: Where the results go.
        name: Names the result files, e.g. "demo" or "6L".
        queues: Queue files to look experiment names up in (default: experiments.yaml and
            experiments.demo.yaml).
    """
    settings = [Setting(m, precision, micro_batch_size, global_batch_size, compile) for m in model.split(",")]
    return run_benchmarks(settings, steps, warmup, repeats, data_dir, device, out_dir, name, queues)


def bench_sweep(
    model: str = "gpt_demo,llama_demo",
    micro_batch_sizes: list[int] = [8, 16, 32],  # noqa: B006 - jsonargparse needs a literal default
    precisions: list[Precision] = ["32-true", "bf16-mixed", "bf16-true"],  # noqa: B006
    steps: int = 6,
    warmup: int = 3,
    repeats: int = 1,
    data_dir: Path = Path("data"),
    device: str = "auto",
    out_dir: Path = RESULTS_DIR,
    name: str = "sweep",
    queues: list[Path] | None = None,
) -> dict:
    """Every precision x micro batch (global batch = micro batch), per variant; both paths each time.

    Args:
        model: Comma-separated experiment names (or config paths).
        micro_batch_sizes: Micro batch sizes to try.
        precisions: Precisions to try.
        steps: Optimizer steps timed, after the warm-up.
        warmup: Optimizer steps run first and not timed.
        repeats: Runs of each path, alternated; the median counts.
        data_dir: Data folder holding the sample's tokenizer and token files (`make data-sample`).
        device: 'auto', 'cpu' or 'cuda'.
        out_dir: Where the results go.
        name: Names the result files: <device>-<date>-<name>.json and .md.
        queues: Queue files to look experiment names up in (default: experiments.yaml and
            experiments.demo.yaml).
    """
    settings = [Setting(m, p, mb) for m in model.split(",") for mb in micro_batch_sizes for p in precisions]
    return run_benchmarks(settings, steps, warmup, repeats, data_dir, device, out_dir, name, queues)
