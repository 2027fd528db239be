"""Several processes: the project's launcher against plain `litgpt pretrain`, 1 rank against 2 (gloo on the
CPU), DDP against FSDP, a 2-rank FSDP run killed and resumed, and the environment each runner gives its
ranks."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    DEMO_CONFIGS,
    entry,
    litgpt_pretrain,
    losses_by_iter,
    run_cli,
    runner,
    status,
    wait_for,
    write_queue,
)

from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.perplexity import evaluate_run
from tinystories_lab.experiments.gpus import claim_gpus
from tinystories_lab.experiments.launch import child_env
from tinystories_lab.experiments.locks import run_is_alive
from tinystories_lab.experiments.runs import read_curves
from tinystories_lab.export.exporter import export_checkpoint

TOLERANCE = 1e-5  # measured: per-step losses of 1 and 2 ranks differ by <= 1e-6, validation losses by 0
FSDP_TOLERANCE = 1e-4  # FSDP's reduce-scatter sums gradients in another order than DDP's all-reduce
TIED = "Tied embeddings: the output head is the embedding"


def processes_of(out_dir: Path) -> list[int]:
    """Pids of the processes training into `out_dir` (its path is on their command line)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"--out_dir={out_dir}" in proc.joinpath("cmdline").read_bytes().decode().split("\0"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def val_losses(out_dir):
    return [p.value for p in read_curves(out_dir)[1]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "precision, tolerance", [("32-true", 1e-6), ("bf16-mixed", 1e-3), ("bf16-true", 1e-3)]
)
def test_the_launcher_trains_as_plain_litgpt_pretrain(precision, tolerance, sample_data, tmp_path):
    """The same losses; in bf16 within 1e-3, though the project computes the loss from bf16 logits in
    autocast where LitGPT (through Fabric) takes an fp32 copy of them."""
    args = [
        "--train.max_tokens=32768", "--train.save_interval=4", "--eval.interval=4",
        "--data.init_args.val_windows=64", "--eval.initial_validation=false", f"--precision={precision}",
    ]  # fmt: skip
    plain = litgpt_pretrain(DEMO_CONFIGS["llama_demo"], sample_data, tmp_path / "plain", *args)
    assert plain.returncode == 0, plain.stderr[-3000:]
    ours = subprocess.run(
        [sys.executable, "-m", "tinystories_lab.pretrain", "--config", str(DEMO_CONFIGS["llama_demo"]),
         f"--out_dir={tmp_path / 'ours'}", f"--data.init_args.data_dir={sample_data}",
         f"--tokenizer_dir={sample_data / 'tokenizers' / 'sample'}", *args],
        env={**os.environ, "TORCH_COMPILE_DISABLE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ours.returncode == 0, ours.stderr[-3000:]
    expected, got = losses_by_iter(tmp_path / "plain"), losses_by_iter(tmp_path / "ours")
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    assert all(got[i] == pytest.approx(expected[i], abs=tolerance) for i in got)
    # 64 whole windows in two equal batches: LitGPT's mean of batch means is the exact mean here.
    assert val_losses(tmp_path / "ours") == pytest.approx(val_losses(tmp_path / "plain"), abs=tolerance)


def two_rank_entry(name, tmp_path, data, devices):
    """12 steps of gpt_demo on `devices` gloo ranks (micro batch 32 / devices: the same accumulation, hence
    the same learning rate at every step), validating on the whole split at the end."""
    e = entry(name, tmp_path, data, steps=12, extra=[f"--train.micro_batch_size={32 // devices}"])
    e["args"].remove("--data.init_args.val_windows=64")
    return {**e, "devices": devices}


@pytest.mark.slow
def test_one_and_two_ranks_agree_fsdp_trains_as_ddp_and_a_killed_fsdp_run_resumes_to_the_same_end(
    sample_data, tmp_path, capsys
):
    """1 rank, 2 DDP ranks and 2 FSDP ranks (FSDP2 on gloo) train alike; the FSDP run, its micro batch from
    MICRO=auto, is killed with kill -9 past its first checkpoint and resumed by run-next to the same end,
    its embedding tied throughout; its final/ is a full state dict that eval, export and `litgpt generate`
    take; a DDP checkpoint is not resumed under FSDP, nor the other way round."""
    fsdp = two_rank_entry("killed", tmp_path, sample_data, 2)
    fsdp["args"].remove("--train.micro_batch_size=16")  # MICRO=auto picks it: 16 on a CPU
    entries = [two_rank_entry(n, tmp_path, sample_data, d) for n, d in (("one", 1), ("two", 2))]
    queue = write_queue(tmp_path / "q.yaml", [*entries, {**fsdp, "strategy": "fsdp"}])
    for name in ("one", "two"):
        result = runner("run-specific", queue, name)
        assert result.returncode == 0, result.stdout[-3000:]
    runs = tmp_path / "runs"
    one, two = losses_by_iter(runs / "one"), losses_by_iter(runs / "two")
    assert sorted(one) == sorted(two) == list(range(1, 13))
    assert all(two[i] == pytest.approx(one[i], abs=TOLERANCE) for i in one)
    assert val_losses(runs / "two")[-1] == pytest.approx(val_losses(runs / "one")[-1], abs=TOLERANCE)
    exact = evaluate_run(runs / "two" / "final")  # `make eval`: every validation token once, in fp32
    assert val_losses(runs / "two")[-1] == pytest.approx(exact["loss"], abs=TOLERANCE)

    proc = runner("run-specific", queue, "killed", "--micro_batch_size", "auto", wait=False)
    out = runs / "killed"
    wait_for(lambda: max(losses_by_iter(out), default=0) >= 6, timeout=600)  # past the step-4 checkpoint
    assert len(processes_of(out)) == 2  # rank 0 and rank 1
    proc.send_signal(signal.SIGKILL)
    first = proc.stdout.read()
    proc.wait()
    assert "killed: micro batch 16 (the CPU default, 16)" in first
    assert "Strategy: fsdp over 2 processes" in first and f"{TIED} (after setup)" in first
    assert status(queue, "killed")["run_args"] == ["--train.micro_batch_size=16"]
    wait_for(lambda: not run_is_alive(out), timeout=30)  # every lock is free ...
    assert processes_of(out) == []  # ... because no rank outlived its runner
    log = next((out / "logs").glob("*.log")).read_text()
    assert "loss train" in log  # the log of a killed runner keeps what it saw
    result = runner("run-next", queue)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"{TIED} (after the resume)" in result.stdout
    assert status(queue, "killed")["status"] == "done" and status(queue, "killed")["last_step"] == 12
    resumed = losses_by_iter(out)
    assert all(resumed[i] == pytest.approx(two[i], abs=FSDP_TOLERANCE) for i in two)
    assert val_losses(out)[-1] == pytest.approx(val_losses(runs / "two")[-1], abs=FSDP_TOLERANCE)

    # final/: one full state dict, the head equal to the embedding, taken by eval, export and generate.
    state = torch.load(out / "final" / "lit_model.pth", weights_only=False)["model"]
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    assert sorted(state) == sorted(torch.load(runs / "two" / "final" / "lit_model.pth")["model"])
    assert evaluate_run(out / "final")["loss"] == pytest.approx(val_losses(out)[-1], abs=FSDP_TOLERANCE)
    export_checkpoint(out / "final", tmp_path / "hf")  # raises unless transformers gives LitGPT's logits
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    generate = subprocess.run(
        [str(Path(sys.executable).parent / "litgpt"), "generate", str(out / "final"), "--prompt", "Once",
         "--max_new_tokens", "5"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert generate.returncode == 0 and generate.stdout.strip(), generate.stderr[-2000:]

    # A checkpoint is resumed only under the layout it was saved in: refused in one line, nothing started.
    crossed = [("fsdp_from_ddp", "fsdp", runs / "two"), ("ddp_from_fsdp", "ddp", out)]
    for name, _, source in crossed:
        shutil.copytree(source / "step-00000004", runs / name / "step-00000004")
    more = [{**two_rank_entry(n, tmp_path, sample_data, 2), "strategy": st} for n, st, _ in crossed]
    queue = write_queue(tmp_path / "crossed.yaml", more)
    for name, strategy, _ in crossed:
        before = queue.read_bytes()
        code, _, err = run_cli(["run-specific", name, "--queues", f"[{queue}]"], capsys)  # no start-up
        saved = "DDP or one device" if strategy == "fsdp" else "FSDP"
        assert code == 1 and f"was saved under {saved} and cannot be resumed" in err
        assert err.count("error:") == 1 and err.rstrip().splitlines()[-1].startswith("error:")
        assert queue.read_bytes() == before and not (runs / name / "logs").exists()


def test_devices_that_cannot_make_the_global_batch_are_refused_before_start(tmp_path, sample_data, capsys):
    queue = write_queue(tmp_path / "q.yaml", [{**entry("a", tmp_path, sample_data), "devices": 3}])
    before = queue.read_bytes()
    code, _, err = run_cli(["run-next", "--queues", f"[{queue}]"], capsys)
    assert code == 1
    assert "global_batch_size 32 is not a multiple of processes x micro_batch_size (3 x 32)" in err
    assert "devices x num_nodes must be one of 1" in err
    assert queue.read_bytes() == before and not (tmp_path / "runs" / "a").exists()


def test_each_runner_pins_gpus_no_other_runner_holds(tmp_path):
    visible = ["0", "1", "2"]
    first, first_locks = claim_gpus(2, visible=visible, lock_dir=tmp_path)
    assert first == "0,1"
    with pytest.raises(UserError, match=r"in use by other runs: GPU 0 \(pid \d+ on .*\), GPU 1"):
        claim_gpus(2, visible=visible, lock_dir=tmp_path)
    second, second_locks = claim_gpus(1, visible=visible, lock_dir=tmp_path)
    assert second == "2"
    with pytest.raises(UserError, match="GPU 1"):
        claim_gpus(1, wanted=[1], visible=visible, lock_dir=tmp_path)
    for lock in first_locks:
        lock.release()
    assert claim_gpus(1, wanted=[1], visible=visible, lock_dir=tmp_path)[0] == "1"
    with pytest.raises(UserError, match="names GPU 5, but only 3 are visible"):
        claim_gpus(1, wanted=[5], visible=visible, lock_dir=tmp_path)
    assert claim_gpus(1, visible=[], lock_dir=tmp_path) == (None, [])  # a machine without GPUs


def test_a_local_run_gets_its_gpus_and_no_inherited_slurm_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    env = child_env(None, tmp_path, gpus="2,3")
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert not [k for k in env if k.startswith("SLURM_")]
