"""`make bench` works end to end (a tool test, not a speed test)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CONFIGS, ROOT
from litgpt import GPT

from tinystories_lab.bench import precision
from tinystories_lab.bench.gpu_check import datasheet_tflops
from tinystories_lab.configs import parse_config


def demo_flops_per_token(name: str = "gpt_demo") -> float:
    """6N + 12 L H Q T for a demo model, N counted on LitGPT's own GPT (the tied weight once), so a wrong
    parameter count or FLOP formula in the benchmark code fails the comparison."""
    cfg = parse_config(DEMO_CONFIGS[name])
    config = cfg.model_config
    with torch.device("meta"):
        model = GPT(config)
    if cfg.train.tie_embeddings:  # as `litgpt pretrain` ties them
        model.lm_head.weight = model.transformer.wte.weight
    n = sum(p.numel() for p in model.parameters())  # a shared Parameter is yielded once
    return 6 * n + 12 * config.n_layer * config.n_head * config.head_size * cfg.train.max_seq_length


@pytest.mark.slow
def test_make_bench_reports_both_paths_ratio_and_mfu(sample_data, tmp_path):
    lab = f"LAB={sys.executable} -m tinystories_lab.cli"
    cmd = [
        "make",
        "-s",
        "bench",
        "MODEL=gpt_demo",
        "STEPS=2",
        f"DATA_DIR={sample_data}",
        f"BENCH_OUT={tmp_path}",
        lab,
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [path] = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    assert report["steps"] == 2 and report["peak_flops"]["fp32"] > 0
    [r] = report["results"]
    assert r["model"] == "gpt_demo" and r["precision"] == "32-true"
    for side in ("project", "bare"):
        s = r[side]
        assert s["tokens_per_s"] * s["step_seconds"] == pytest.approx(32 * 128)  # gpt_demo: 32 x 128 a step
        assert s["mfu"] == pytest.approx(
            s["tokens_per_s"] * demo_flops_per_token() / report["peak_flops"]["fp32"]
        )
        assert s["peak_memory_gib"] > 0
    # Both paths train the same tokens a step, so the speed ratio is the inverse ratio of step times.
    assert r["ratio_project_over_bare"] == pytest.approx(
        r["bare"]["step_seconds"] / r["project"]["step_seconds"]
    )
    assert 0 <= r["data_wait_share"] < 1
    # Same seed, init, batches, LR schedule and optimizer: the bare loop trains exactly as LitGPT does.
    assert r["project"]["losses"] == pytest.approx(r["bare"]["losses"], abs=1e-3)
    assert len(r["project"]["losses"]) == 3 + 2  # warm-up and timed steps
    assert (tmp_path / path.name.replace(".json", ".md")).read_text().count("gpt_demo") == 1


def test_precision_prints_the_choice_its_measured_ratio_implies():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "tinystories-lab"), "precision", "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    ratio = float(re.search(r"run at ([\d.]+)x the fp32 rate", result.stderr).group(1))
    expected = "bf16-mixed" if ratio >= precision.BF16_SPEEDUP else "32-true"
    if abs(ratio - precision.BF16_SPEEDUP) > 0.05:  # the printed ratio is rounded to one decimal
        assert result.stdout == expected + "\n"
    assert result.stderr.startswith(f"Training precision: {result.stdout.strip()} (bf16 matrix products")


@pytest.mark.parametrize(
    "bf16_over_fp32, expected", [(3.0, "bf16-mixed"), (2.0, "bf16-mixed"), (1.2, "32-true")]
)
def test_cpu_precision_follows_the_measured_bf16_speedup(monkeypatch, bf16_over_fp32, expected):
    rates = {torch.float32: 1e11, torch.bfloat16: bf16_over_fp32 * 1e11}
    monkeypatch.setattr(precision, "peak_flops", lambda device, dtype, repeats: rates[dtype])
    choice, why = precision.choose_precision(torch.device("cpu"))
    assert choice == expected and f"{bf16_over_fp32:.1f}x" in why


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA L4", 121), ("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 NVL", 835), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 SXM5 94GB", 989),
        ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A10", 125), ("NVIDIA A10G", None), ("NVIDIA L4X", None),
        ("NVIDIA GeForce RTX 4090 D", 165), ("NVIDIA H800", None), ("Tesla T4", None),
    ],
)  # fmt: skip
def test_gpu_check_knows_a_cards_peak_by_exact_name_then_longest_model_else_not_at_all(name, tflops):
    assert datasheet_tflops(name) == tflops


@pytest.mark.slow
def test_gpu_check_runs_on_a_cpu_in_its_small_form_and_reports_every_field(sample_data, tmp_path):
    """DEVICE=auto without a GPU: the CPU form, saying so."""
    cmd = [sys.executable, "-m", "tinystories_lab.cli", "gpu-check", "--device", "auto"]
    cmd += ["--models", "gpt_demo", "--data_dir", str(sample_data), "--out_dir", str(tmp_path)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.startswith("No GPU visible: running the check's small CPU form")
    [path] = tmp_path.glob("*-gpu-check.json")
    report = json.loads(path.read_text())
    assert set(report) == {
        "device", "date", "torch", "cuda", "precision", "precision_reason", "peak_flops_measured",
        "peak_flops_datasheet", "memory_target_gb", "variants", "demo", "seconds",
    }  # fmt: skip
    assert report["device"].startswith("cpu-") and report["cuda"] is None
    assert report["precision"] in ("32-true", "bf16-mixed") and report["precision_reason"]
    assert report["peak_flops_measured"] > 0 and report["peak_flops_datasheet"] is None
    assert report["memory_target_gb"] == 16 and report["seconds"] > 0
    [v] = report["variants"]
    assert v["model"] == "gpt_demo" and v["micro_batch_size"] == v["global_batch_size"] == 2
    assert v["seq_len"] == 128 and v["steps"] == 2 and v["compile"] is False
    mfu = v["tokens_per_s"] * demo_flops_per_token() / report["peak_flops_measured"]
    assert v["mfu_measured_peak"] == pytest.approx(mfu) and v["mfu_datasheet_peak"] is None
    # At least the fp32 weights, gradients and two AdamW moments (16 bytes a parameter, 1.84M of them).
    assert 16 * 1.84e6 / 2**30 < v["peak_memory_gib"] < 16 and v["fits_memory_target"] is True
    assert len(v["loss_first_last"]) == 2 and v["loss_first_last"][0] > 8  # ~ln(8192) at initialisation
    d = report["demo"]
    assert d["model"] == "gpt_demo" and d["steps"] == 4
    assert set(d["seconds"]) == {"train", "eval", "sample", "interpret", "export"}
    assert 0 < d["val_loss"] < 10 and 0 < d["bits_per_byte"] < 4
    assert d["samples"] == 5 and 0 <= d["samples_ended_at_eos"] <= 5
    assert 0 <= d["interpret_dead_fraction"] <= 1 and d["export_written"] is True
    page = path.with_suffix(".md").read_text()
    assert "| gpt_demo | 2 | 2 | no |" in page and "export with parity check: written" in page
    assert "datasheet peak unknown" in page


@pytest.mark.slow
def test_step_memory_measures_a_step_under_the_runs_strategy_on_a_cpu(sample_data):
    """`make step-memory` with DEVICES=2 STRATEGY=fsdp: two FSDP ranks (gloo), rank 0's peak."""
    lab = f"LAB={sys.executable} -m tinystories_lab.cli"
    cmd = ["make", "-s", "step-memory", "MODEL=gpt_demo", "DEVICE=cpu", "DEVICES=2", "STRATEGY=fsdp"]
    cmd += [f"DATA_DIR={sample_data}", lab]
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1"}  # compiling on a CPU only makes the test slower
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("gpt_demo: micro batch 32, peak "))
    assert line.endswith("GiB on 2 x cpu (fsdp)") and 0 < float(line.split()[5]) < 16
