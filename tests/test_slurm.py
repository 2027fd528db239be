"""`environment: slurm` on a real SLURM: the one-node cluster `make slurm-local` starts (CI runs it first)."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import entry, losses_by_iter, runner, status, wait_for, write_queue

from tinystories_lab.experiments.runs import read_curves
from tinystories_lab.experiments.slurm import job_state


def cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and any(s in result.stdout for s in ("idle", "mix", "alloc"))


needs_cluster = pytest.mark.skipif(
    not cluster_answers(), reason="no SLURM cluster answers here (`make slurm-local` starts one)"
)


def slurm_entry(name, tmp_path, data, steps=12, **slurm):
    """A 2-task job (one task per device) of gpt_demo on the sample."""
    e = entry(name, tmp_path, data, steps=steps, extra=["--train.micro_batch_size=16"])
    return {**e, "devices": 2, "environment": "slurm", **({"slurm": slurm} if slurm else {})}


def cli(verb, *args):
    return [sys.executable, "-m", "tinystories_lab.cli", verb, *args]


def test_without_sbatch_a_slurm_entry_is_refused_and_the_queue_kept(tmp_path, sample_data):
    queue = write_queue(tmp_path / "q.yaml", [slurm_entry("a", tmp_path, sample_data)])
    before = queue.read_bytes()
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not shutil.which("sbatch", path=p)
    )
    result = subprocess.run(
        cli("run-next", "--queues", f"[{queue}]"),
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path},
    )
    assert result.returncode == 1 and "needs SLURM's `sbatch` on PATH" in result.stderr
    assert "make slurm-local" in result.stderr
    assert queue.read_bytes() == before and not (tmp_path / "runs" / "a").exists()


@needs_cluster
def test_an_unknown_partition_or_gpus_that_do_not_match_devices_are_refused(tmp_path, sample_data):
    for slurm, message in (
        ({"partition": "nope"}, "SLURM has no partition 'nope'"),
        ({"gpus_per_node": 4}, "slurm.gpus_per_node is 4 but devices is 2"),
    ):
        queue = write_queue(tmp_path / "q.yaml", [slurm_entry("a", tmp_path, sample_data, **slurm)])
        before = queue.read_bytes()
        result = runner("run-next", queue)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert queue.read_bytes() == before


@needs_cluster
@pytest.mark.slow
def test_a_two_task_job_trains_to_done_and_a_requeued_one_resumes_to_the_same_end(tmp_path, sample_data):
    queue = write_queue(
        tmp_path / "q.yaml",
        [slurm_entry("straight", tmp_path, sample_data), slurm_entry("requeued", tmp_path, sample_data)],
    )
    submitted = runner("run-all", queue)  # submits both and returns; SLURM runs them one after the other
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "straight: submitted SLURM job" in submitted.stdout and "requeued: submitted" in submitted.stdout
    runs = tmp_path / "runs"
    job = status(queue, "requeued")["slurm_job"]
    script = (runs / "requeued" / "job.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "--requeue" in script and "srun" in script
    assert "--resume=auto" in script

    # Preempted past its step-4 checkpoint: the signal the job asked for before its time limit.
    wait_for(lambda: (runs / "requeued" / "step-00000004" / "lit_model.pth").is_file(), timeout=600)
    wait_for(lambda: max(losses_by_iter(runs / "requeued"), default=0) >= 6)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)
    wait_for(lambda: str(job_state(job)).startswith("PENDING"), timeout=60)
    subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=True)  # skip the 2 min hold

    waited = runner("run-specific", queue, "requeued", "--wait", "true")  # running: refused, not resubmitted
    assert waited.returncode == 1 and f"is running already (SLURM job {job})" in waited.stderr
    wait_for(lambda: status(queue, "requeued")["status"] != "running", timeout=600)
    wait_for(lambda: status(queue, "straight")["status"] != "running", timeout=600)
    for name in ("straight", "requeued"):
        e = status(queue, name)
        assert e["status"] == "done" and e["last_step"] == 12, e
        assert (runs / name / "final" / "lit_model.pth").is_file()
    log = (runs / "requeued" / "logs" / f"slurm-{job}.out").read_text()
    assert "requeueing job" in log and log.count("Resuming training from") == 1
    straight, requeued = losses_by_iter(runs / "straight"), losses_by_iter(runs / "requeued")
    assert sorted(requeued) == list(range(1, 13))
    assert all(requeued[i] == pytest.approx(straight[i], abs=1e-5) for i in straight)
    final = [read_curves(runs / n)[1][-1].value for n in ("straight", "requeued")]
    assert final[1] == pytest.approx(final[0], abs=1e-5)


@needs_cluster
@pytest.mark.slow
def test_cancel_puts_a_job_back_to_todo_and_list_shows_its_state(tmp_path, sample_data):
    queue = write_queue(tmp_path / "q.yaml", [slurm_entry("a", tmp_path, sample_data, steps=100000)])
    assert runner("run-next", queue).returncode == 0
    job = status(queue, "a")["slurm_job"]
    try:
        listing = subprocess.run(cli("list", "--queues", f"[{queue}]"), capture_output=True, text=True)
        assert (
            f"running, job {job} PENDING" in listing.stdout
            or f"running, job {job} RUNNING on" in listing.stdout
        )
        result = runner("cancel", queue, "a")
        assert result.returncode == 0, result.stderr
        assert f"cancelled SLURM job {job}" in result.stdout
        a = status(queue, "a")
        assert a["status"] == "todo" and "cancelled" in a["note"]
        wait_for(lambda: job_state(job) is None, timeout=60)
    finally:
        subprocess.run(["scancel", str(job)])
