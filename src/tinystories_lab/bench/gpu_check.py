"""`make gpu-check`: what a new GPU box does with this project, in one command (about 5 minutes on one GPU).

The precision it would train in; a few compiled steps of the real variants through the project's launcher
(tokens/s, MFU against the measured bf16 matmul peak and the card's datasheet peak, peak memory against
the 16 GB the configs are sized for); then a demo model trained, evaluated, sampled, opened up and
exported on the device. Results: benchmarks/results/<device>-<date>-gpu-check.json and .md. On a CPU
(`--device cpu`) it runs the same steps, smaller, so a test covers it.

On a GPU it takes one free GPU as a training run does (its lock, and CUDA_VISIBLE_DEVICES for every
process it starts), so it never times a GPU that a run is training on.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml

from tinystories_lab.bench.memory import GPU_TARGET_BYTES
from tinystories_lab.bench.precision import choose_precision
from tinystories_lab.bench.training import (
    RESULTS_DIR,
    Setting,
    device_name,
    flops_per_token,
    peak_flops,
    resolve_config,
)
from tinystories_lab.configs import parse_config
from tinystories_lab.errors import UserError
from tinystories_lab.experiments.gpus import claim_gpus, visible_gpus
from tinystories_lab.hardware import resolve_device
from tinystories_lab.probe import bench_env, run_project
from tinystories_lab.render import markdown_table

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's datasheets: first by the exact name torch reports,
# then by the longest model name found in it as whole words ("L4" is not in "NVIDIA L40"); other cards
# have no known peak rather than a guessed one.
DATASHEET_BY_NAME = {
    "NVIDIA H200": 989,
    "NVIDIA H200 NVL": 835,
    "NVIDIA H100 80GB HBM3": 989,
    "NVIDIA H100 PCIe": 756,
    "NVIDIA H100 NVL": 835,
    "NVIDIA A100-SXM4-80GB": 312,
    "NVIDIA A100-SXM4-40GB": 312,
    "NVIDIA A100 80GB PCIe": 312,
    "NVIDIA A100-PCIE-40GB": 312,
    "NVIDIA L40S": 362,
    "NVIDIA L40": 181,
    "NVIDIA L4": 121,
    "NVIDIA A10": 125,
    "NVIDIA GeForce RTX 4090": 165,
    "NVIDIA RTX A6000": 155,
}
DATASHEET_BY_MODEL = {
    "GH200": 989, "H200": 989, "H200 NVL": 835, "H100": 989, "H100 SXM": 989, "H100 PCIe": 756,
    "H100 NVL": 835, "A100": 312, "L40S": 362, "L40": 181, "L4": 121, "A10": 125, "RTX 4090": 165,
    "RTX A6000": 155,
}  # fmt: skip


def datasheet_tflops(name: str) -> float | None:
    """A card's dense bf16 datasheet peak in TFLOP/s from the name torch reports; None when unknown."""
    if name in DATASHEET_BY_NAME:
        return DATASHEET_BY_NAME[name]
    found = [m for m in DATASHEET_BY_MODEL if re.search(rf"(?<![\w-]){re.escape(m)}(?![\w-])", name)]
    return DATASHEET_BY_MODEL[max(found, key=len)] if found else None


VARIANTS = "gpt_6L_6H_288D,llama_6L_6H_288D,llama_12L_8H_1024D"
DEMO = "config_hub/pretrain/tiny_stories/demo/gpt_demo.yaml"


def datasheet_peak(device: torch.device) -> float | None:
    """The card's dense bf16 peak in FLOP/s, when it is one of the known cards."""
    if device.type != "cuda":
        return None
    tflops = datasheet_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def check_variant(
    model: str, precision: str, steps: int, warmup: int, micro: int | None, compile: bool, data_dir: Path,
    device: torch.device, peaks: dict, env: dict[str, str] | None = None,
) -> dict:  # fmt: skip
    """`steps` timed optimizer steps of one variant through `tinystories_lab.pretrain`."""
    config = resolve_config(model)
    overrides = Setting(model, precision, micro, micro).overrides(data_dir)
    cfg = parse_config(config, *overrides)
    tokens = (warmup + steps) * cfg.train.global_batch_size * cfg.train.max_seq_length
    with tempfile.TemporaryDirectory() as tmp:
        run = run_project(
            config, [*overrides, f"--train.max_tokens={tokens}"], warmup, compile, device.type, Path(tmp), env
        )
    fpt = flops_per_token(cfg)
    peak_bytes = run["peak_memory_gib"] * 2**30
    return {
        "model": model,
        "micro_batch_size": cfg.train.micro_batch_size,
        "global_batch_size": cfg.train.global_batch_size,
        "seq_len": cfg.train.max_seq_length,
        "steps": steps,
        "compile": compile,
        "tokens_per_s": run["tokens_per_s"],
        "mfu_measured_peak": run["tokens_per_s"] * fpt / peaks["measured"],
        "mfu_datasheet_peak": run["tokens_per_s"] * fpt / peaks["datasheet"] if peaks["datasheet"] else None,
        "peak_memory_gib": run["peak_memory_gib"],
        "fits_memory_target": peak_bytes <= GPU_TARGET_BYTES,
        "loss_first_last": [run["losses"][0], run["losses"][-1]],
    }


def check_demo(
    precision: str, steps: int, data_dir: Path, device: str, compile: bool, env: dict[str, str] | None = None
) -> dict:
    """Train gpt_demo briefly through the runner, then eval, sample, interpret and export it on `device`."""
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        queue = Path(tmp) / "queue.yaml"
        entry = {
            "name": "gpt_demo", "config": DEMO, "status": "todo", "out_dir": f"{tmp}/gpt_demo",
            "args": [f"--data.init_args.data_dir={data_dir}", f"--tokenizer_dir={data_dir}/tokenizers/sample",
                     f"--precision={precision}", f"--train.max_tokens={steps * 32 * 128}",
                     "--eval.interval=1000000"],
        }  # fmt: skip
        queue.write_text(yaml.safe_dump({"experiments": [entry]}, sort_keys=False))
        queues = f"[{queue}]"
        verbs = {
            "train": ["run-specific", "gpt_demo", "--queues", queues],
            "eval": ["eval", "--model", "gpt_demo", "--queues", queues, "--device", device],
            "sample": ["sample", "--model", "gpt_demo", "--queues", queues, "--device", device],
            "interpret": ["interpret", "gpt_demo", "--queues", queues, "--device", device, "--windows", "16"],
            "export": ["export", "gpt_demo", "--queues", queues, "--device", device],
        }
        for stage, argv in verbs.items():
            t0 = time.perf_counter()
            result = subprocess.run(
                [sys.executable, "-m", "tinystories_lab.cli", *argv], capture_output=True, text=True,
                env=bench_env(compile, device, env),
            )  # fmt: skip
            if result.returncode != 0:
                output = f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
                raise RuntimeError(f"`tinystories-lab {shlex.join(argv)}` failed:\n{output}")
            timings[stage] = time.perf_counter() - t0
        run = Path(tmp) / "gpt_demo"
        evaluation = json.loads((run / "eval.json").read_text())
        samples = json.loads((run / "samples.json").read_text())["samples"]
        interp = json.loads((run / "interp" / "summary.json").read_text())
        card = (run / "hf" / "README.md").is_file()
    return {
        "model": "gpt_demo",
        "steps": steps,
        "seconds": timings,
        "val_loss": evaluation["loss"],
        "bits_per_byte": evaluation["bits_per_byte"],
        "samples": len(samples),
        "samples_ended_at_eos": sum(s["stopped_at_eos"] for s in samples),
        "interpret_dead_fraction": interp["dead_fraction"],
        "export_written": card,
    }


def gpu_check(
    device: str = "auto",
    models: str = VARIANTS,
    steps: int | None = None,
    micro_batch_size: int | None = None,
    data_dir: Path = Path("data"),
    out_dir: Path = RESULTS_DIR,
) -> dict:
    """Check a new GPU box in one command: precision, compiled training steps of the real variants (tokens/s,
    MFU, peak memory against 16 GB), and a demo model trained, evaluated, sampled, interpreted and exported
    on the device. Writes <out_dir>/<device>-<date>-gpu-check.json and .md.

    On a CPU (`--device cpu`) the same checks run smaller: 2 steps, no compilation, micro batch 2 unless
    given, so the whole command is testable without a GPU.

    Args:
        device: 'auto', 'cpu' or 'cuda'.
        models: Comma-separated experiment names (or config paths) to train for a few steps.
        steps: Timed optimizer steps per model (default: 20 on a GPU, 2 on a CPU).
        micro_batch_size: Override the configs' micro batches (default: theirs on a GPU, 2 on a CPU; the
            global batch becomes the micro batch).
        data_dir: Data folder holding the sample's tokenizer and token files (`make data-sample`).
        out_dir: Where the results go.
    """
    start = time.perf_counter()
    if not (data_dir / "tokenizers" / "sample").is_dir():
        raise UserError(f"No sample data in {data_dir}: run `make data-sample` first.")
    asked, device = device, resolve_device(device)
    if asked == "auto" and device == "cpu":
        print("No GPU visible: running the check's small CPU form (--device cpu runs it without this note).")
    dev, env, locks = torch.device(device), dict(os.environ), []
    if dev.type == "cuda":  # one free GPU, locked and pinned as a training run's are
        gpu, locks = claim_gpus(1, wanted=None if dev.index is None else [dev.index])
        env["CUDA_VISIBLE_DEVICES"] = gpu
        dev, device = torch.device("cuda", visible_gpus().index(gpu)), "cuda"
        torch.cuda.set_device(dev)
        print(f"Checking GPU {gpu} (locked while the check runs)", flush=True)
    try:
        return _gpu_check(dev, device, env, models, steps, micro_batch_size, data_dir, out_dir, start)
    finally:
        for lock in locks:
            lock.release()


def _gpu_check(
    dev: torch.device, device: str, env: dict[str, str], models: str, steps: int | None,
    micro_batch_size: int | None, data_dir: Path, out_dir: Path, start: float,
) -> dict:  # fmt: skip
    on_gpu = dev.type == "cuda"
    precision, why = choose_precision(dev)
    print(f"{device_name(dev)}: training precision {precision} ({why})", flush=True)
    peaks = {"measured": peak_flops(dev, torch.bfloat16 if precision != "32-true" else torch.float32)}
    peaks["datasheet"] = datasheet_peak(dev)
    steps = steps or (20 if on_gpu else 2)
    micro = micro_batch_size or (None if on_gpu else 2)
    variants = []
    for model in models.split(","):
        print(f"Training {model} for {steps} steps ...", flush=True)
        variants.append(
            check_variant(
                model, precision, steps, 3 if on_gpu else 1, micro, on_gpu, data_dir, dev, peaks, env
            )
        )
    print("Training, evaluating, sampling, interpreting and exporting gpt_demo ...", flush=True)
    demo = check_demo(precision, 20 if on_gpu else 4, data_dir, device, compile=on_gpu, env=env)
    report = {
        "device": device_name(dev),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if on_gpu else None,
        "precision": precision,
        "precision_reason": why,
        "peak_flops_measured": peaks["measured"],
        "peak_flops_datasheet": peaks["datasheet"],
        "memory_target_gb": GPU_TARGET_BYTES / 1e9,
        "variants": variants,
        "demo": demo,
        "seconds": time.perf_counter() - start,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{report['device']}-{report['date']}-gpu-check"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    page = check_markdown(report)
    stem.with_suffix(".md").write_text(page + "\n")
    print(page)
    print(f"Results: {stem}.json and .md ({report['seconds']:.0f} s)")
    return report


def check_markdown(report: dict) -> str:
    """The check as a short Markdown page."""
    datasheet = report["peak_flops_datasheet"]
    lines = [
        f"# GPU check: {report['device']}, {report['date']}",
        "",
        f"torch {report['torch']}, CUDA {report['cuda'] or '-'}; precision {report['precision']} "
        f"({report['precision_reason']}). Matmul peak measured {report['peak_flops_measured'] / 1e12:.1f} "
        f"TFLOP/s"
        + (f", datasheet {datasheet / 1e12:.0f} TFLOP/s." if datasheet else ", datasheet peak unknown."),
        "",
    ]
    header = ["model", "micro", "steps", "compiled", "tokens/s", "MFU (measured peak)", "MFU (datasheet)",
              "peak GiB", f"under {report['memory_target_gb']:.0f} GB"]  # fmt: skip
    rows = [
        [v["model"], v["micro_batch_size"], v["steps"], "yes" if v["compile"] else "no",
         f"{v['tokens_per_s']:,.0f}", f"{v['mfu_measured_peak']:.1%}",
         "-" if v["mfu_datasheet_peak"] is None else f"{v['mfu_datasheet_peak']:.1%}",
         f"{v['peak_memory_gib']:.2f}", "yes" if v["fits_memory_target"] else "no"]
        for v in report["variants"]
    ]  # fmt: skip
    lines.append(markdown_table(header, rows))
    d = report["demo"]
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in d["seconds"].items())
    lines += [
        "",
        f"gpt_demo, {d['steps']} steps on the device: val loss {d['val_loss']:.3f}, "
        f"{d['bits_per_byte']:.3f} bits/byte; {d['samples']} samples ({d['samples_ended_at_eos']} ended at "
        f"EOS); interpret: {d['interpret_dead_fraction']:.1%} dead neurons; export with parity check: "
        f"{'written' if d['export_written'] else 'missing'}. Times: {seconds}.",
    ]
    return "\n".join(lines)
