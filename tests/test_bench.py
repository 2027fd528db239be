"""`make bench` works end to end (a tool test, not a speed test)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


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
        assert r[side]["tokens_per_s"] > 0
        assert 0 < r[side]["mfu"] < 1
        assert r[side]["peak_memory_gib"] > 0
    assert r["ratio_project_over_bare"] == pytest.approx(
        r["project"]["tokens_per_s"] / r["bare"]["tokens_per_s"]
    )
    assert 0 <= r["data_wait_share"] < 1
    # Same seed, init, batches, LR schedule and optimizer: the bare loop trains exactly as LitGPT does.
    assert r["project"]["losses"] == pytest.approx(r["bare"]["losses"], abs=1e-3)
    assert len(r["project"]["losses"]) == 3 + 2  # warm-up and timed steps
    assert (tmp_path / path.name.replace(".json", ".md")).read_text().count("gpt_demo") == 1


def test_precision_prints_one_choice_and_its_reason():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "tinystories-lab"), "precision"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout in ("32-true\n", "bf16-mixed\n")
    assert result.stderr.startswith(f"Training precision: {result.stdout.strip()} (")
