"""`environment: slurm` on a real SLURM: the cluster `make slurm-local NODES=2` starts (CI runs it first);
the two-node test skips on a one-node cluster, saying so."""

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import entry, losses_by_iter, run_cli, runner, status, wait_for, write_queue

from tinystories_lab.experiments.runs import read_curves
from tinystories_lab.experiments.slurm import batch_script, job_state


def cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and any(s in result.stdout for s in ("idle", "mix", "alloc"))


def cluster_nodes() -> int:
    if not cluster_answers():
        return 0
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=10)
    return len(set(result.stdout.split()))


needs_cluster = pytest.mark.skipif(
    not cluster_answers(), reason="no SLURM cluster answers here (`make slurm-local` starts one)"
)
needs_two_nodes = pytest.mark.skipif(
    cluster_nodes() < 2,
    reason="no two-node SLURM cluster answers here (`make slurm-local NODES=2` starts one)",
)


def slurm_entry(name, tmp_path, data, steps=12, devices=2, num_nodes=1, **slurm):
    """A job of gpt_demo on the sample, one task per device, micro batch 32 / world size; no GPU asked
    (the local cluster has none)."""
    micro = 32 // (devices * num_nodes)
    e = entry(name, tmp_path, data, steps=steps, extra=[f"--train.micro_batch_size={micro}"])
    slurm = {"gpus_per_node": 0, **slurm}
    return {**e, "devices": devices, "num_nodes": num_nodes, "environment": "slurm", "slurm": slurm}


def start_requeued_job_soon(job):
    """Cut SLURM's 2-minute hold of a requeued job to 5 s, not to 0: slurmd revokes the previous run's
    credential as of the requeue's second, and a start within that second is killed ("Killing
    non-startable batch job: Job credential revoked") before the batch script runs."""
    wait_for(lambda: str(job_state(job)).startswith("PENDING"), timeout=120)
    subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now+5"], check=True)


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


def test_a_newline_or_control_character_in_a_slurm_value_is_refused_before_anything_is_written(
    tmp_path, sample_data, capsys
):
    for slurm, field in (
        ({"time": "1:00:00\nrm -rf /"}, "slurm.time"),
        ({"account": "me\x1b[2J"}, "slurm.account"),
        ({"sbatch_args": ["--exclusive", "--mem=0\necho owned"]}, "slurm.sbatch_args"),
    ):
        queue = write_queue(tmp_path / "q.yaml", [slurm_entry("a", tmp_path, sample_data, **slurm)])
        before = queue.read_bytes()
        code, _, err = run_cli(["run-next", "--queues", f"[{queue}]"], capsys)
        assert code == 1 and f"a: {field} holds a newline or control character" in err
        assert err.count("error:") == 1, err
        assert queue.read_bytes() == before and not (tmp_path / "runs" / "a").exists()


def test_the_gpu_request_follows_devices_and_srun_gets_the_cpus_per_task(tmp_path):
    base = {"name": "a", "config": "c.yaml", "status": "todo", "devices": 8, "num_nodes": 2,
            "out_dir": str(tmp_path / "a")}  # fmt: skip
    command = [sys.executable, "-m", "tinystories_lab.pretrain", "--devices=8"]
    gpu = batch_script({**base, "slurm": {"cpus_per_task": 6}}, tmp_path / "q.yaml", command)
    assert "#SBATCH --gpus-per-node=8" in gpu and "#SBATCH --nodes=2" in gpu
    assert "tinystories_lab.pretrain --gpus_per_node=8 --devices=8" in gpu  # no GPU seen: fails at once
    assert "#SBATCH --cpus-per-task=6" in gpu and 'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"' in gpu
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in gpu
    cpu = batch_script({**base, "slurm": {"gpus_per_node": 0}}, tmp_path / "q.yaml", command)
    assert "gpus-per-node" not in cpu and "--gpus_per_node" not in cpu


def test_a_run_that_asked_for_gpus_but_sees_none_fails_at_once_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "tinystories_lab.pretrain", "--gpus_per_node=2", "--config", "nope.yaml"],
        capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: this job asked for 2 GPU(s) per node but sees 0 (CUDA_VISIBLE_DEVICES=): check the partition "
        "has GPUs and grants them, or set `slurm: {gpus_per_node: 0}` for a CPU partition."
    )


def test_several_nodes_without_slurm_are_refused_not_left_to_hang(tmp_path, sample_data, capsys):
    e = {**entry("a", tmp_path, sample_data, extra=["--train.micro_batch_size=16"]), "num_nodes": 2}
    queue = write_queue(tmp_path / "q.yaml", [e])
    before = queue.read_bytes()
    code, _, err = run_cli(["run-next", "--queues", f"[{queue}]"], capsys)
    assert code == 1 and "a: num_nodes: 2 needs `environment: slurm`" in err
    assert queue.read_bytes() == before and not (tmp_path / "runs" / "a").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK"))}
    plain = subprocess.run(
        [sys.executable, "-m", "tinystories_lab.pretrain", "--config", e["config"], *e["args"],
         "--devices=1", "--num_nodes=2", f"--out_dir={tmp_path / 'plain'}"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert plain.returncode == 1 and "--num_nodes=2 needs a cluster launcher" in plain.stderr


def test_a_controller_that_does_not_answer_is_not_taken_for_a_job_that_ended(
    tmp_path, sample_data, capsys, monkeypatch
):
    """squeue failing ("Socket timed out", a busy or restarting slurmctld) must not make a running job's
    entry look abandoned: run-specific would submit it again (reset and cancel ask the same question)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("squeue", "sbatch"):
        (bin_dir / name).write_text(
            "#!/bin/sh\necho 'slurm_load_jobs error: Socket timed out on send/recv operation' >&2\nexit 1\n"
        )
        (bin_dir / name).chmod(0o755)
    e = {**slurm_entry("a", tmp_path, sample_data), "status": "running", "slurm_job": "999"}
    queue = write_queue(tmp_path / "q.yaml", [e])
    before = queue.read_bytes()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, _, err = run_cli(["run-specific", "a", "--queues", f"[{queue}]"], capsys)
    assert (
        code == 1
        and "SLURM does not answer about job 999 (squeue: slurm_load_jobs error: Socket timed" in err
    )
    assert queue.read_bytes() == before
    code, listed, _ = run_cli(["list", "--queues", f"[{queue}]"], capsys)
    assert code == 0 and "job 999 state unknown (squeue does not answer)" in listed


@needs_cluster
def test_an_unknown_partition_or_gpus_that_do_not_match_devices_are_refused(tmp_path, sample_data, capsys):
    for slurm, message in (
        ({"partition": "nope"}, "SLURM has no partition 'nope'"),
        ({"gpus_per_node": 4}, "slurm.gpus_per_node is 4 but devices is 2"),
        ({"gpus_per_node": 1}, "or 0 for a CPU partition"),
    ):
        queue = write_queue(tmp_path / "q.yaml", [slurm_entry("a", tmp_path, sample_data, **slurm)])
        before = queue.read_bytes()
        code, _, err = run_cli(["run-next", "--queues", f"[{queue}]"], capsys)
        assert code == 1 and message in err, err
        assert queue.read_bytes() == before


@needs_cluster
@pytest.mark.slow
def test_a_two_task_job_trains_to_done_and_a_preempted_one_saves_and_resumes_to_the_same_end(
    tmp_path, sample_data
):
    queue = write_queue(
        tmp_path / "q.yaml",
        [slurm_entry("straight", tmp_path, sample_data), slurm_entry("requeued", tmp_path, sample_data)],
    )
    submitted = runner("run-all", queue)  # submits both and returns
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "straight: submitted SLURM job" in submitted.stdout and "requeued: submitted" in submitted.stdout
    runs = tmp_path / "runs"
    job = status(queue, "requeued")["slurm_job"]
    script = (runs / "requeued" / "job.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "--requeue" in script and "srun" in script
    assert "--resume=auto" in script

    # Preempted past its step-4 checkpoint: the signal SLURM sends before the time limit, which the batch
    # shell relays to every rank; they save at the next step boundary and the job requeues.
    wait_for(lambda: (runs / "requeued" / "step-00000004" / "lit_model.pth").is_file(), timeout=600)
    wait_for(lambda: max(losses_by_iter(runs / "requeued"), default=0) >= 6)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)
    start_requeued_job_soon(job)

    waited = runner("run-specific", queue, "requeued", "--wait", "true")  # running: refused, not resubmitted
    assert waited.returncode == 1 and f"is running already (SLURM job {job})" in waited.stderr
    wait_for(lambda: status(queue, "requeued")["status"] != "running", timeout=600)
    wait_for(lambda: status(queue, "straight")["status"] != "running", timeout=600)
    for name in ("straight", "requeued"):
        e = status(queue, name)
        assert e["status"] == "done" and e["last_step"] == 12, e
        assert (runs / name / "final" / "lit_model.pth").is_file()
    log = (runs / "requeued" / "logs" / f"slurm-{job}.out").read_text()
    saved = [int(s) for s in re.findall(r"Preempted at step (\d+): saved", log)]
    assert len(saved) == 1 and 4 < saved[0] < 12, log[-3000:]  # newer than the last interval save
    assert "requeueing job" in log and log.count("Resuming training from") == 1
    assert f"step-{saved[0]:08d}" in log.split("Resuming training from")[1].splitlines()[0]
    assert not list((runs / "requeued").glob(".preempted-*"))
    print(f"preempted at step {saved[0]}: steps lost 0 (interval saves alone would lose {saved[0] - 4})")
    straight, requeued = losses_by_iter(runs / "straight"), losses_by_iter(runs / "requeued")
    assert sorted(requeued) == list(range(1, 13))
    assert all(requeued[i] == pytest.approx(straight[i], abs=1e-5) for i in straight)
    final = [read_curves(runs / n)[1][-1].value for n in ("straight", "requeued")]
    assert final[1] == pytest.approx(final[0], abs=1e-4)


@needs_cluster
@pytest.mark.slow
def test_a_job_that_comes_back_without_a_new_checkpoint_is_failed_with_the_reason_not_requeued(
    tmp_path, sample_data
):
    queue = write_queue(tmp_path / "q.yaml", [slurm_entry("stuck", tmp_path, sample_data, steps=100000)])
    assert runner("run-next", queue).returncode == 0
    job = status(queue, "stuck")["slurm_job"]
    try:
        wait_for(lambda: "start_step" in status(queue, "stuck"), timeout=300)
        subprocess.run(["scontrol", "requeue", str(job)], check=True)  # before its first step
        start_requeued_job_soon(job)
        wait_for(lambda: status(queue, "stuck")["status"] != "running", timeout=600)
        e = status(queue, "stuck")
        assert e["status"] == "failed", e
        assert f"SLURM job {job} came back (restart 1) with no checkpoint newer than step 0" in e["error"]
        assert "requeue forever" in e["error"] and "slurm.time" in e["error"]
        wait_for(lambda: job_state(job) is None, timeout=120)  # ended, not requeued again
    finally:
        subprocess.run(["scancel", str(job)])


@needs_two_nodes
@pytest.mark.slow
def test_two_nodes_train_to_done_with_the_losses_of_one_node_and_the_allocations_main_address(
    tmp_path, sample_data
):
    """2 nodes x 1 and 2 x 2 processes against 1 x 2 and 1 x 4. The local cluster's nodes ts-n1 and
    ts-n2 resolve to 127.0.0.11 and 127.0.0.12, not to 127.0.0.1 nor this host's name: ranks that
    found each other used the main address the batch script took from the allocation's first node."""
    first_node = socket.gethostbyname("ts-n1")
    assert first_node == "127.0.0.11" and socket.gethostbyname(socket.gethostname()) != first_node
    steps = 4

    def local(name, devices):  # the same world size in local processes on this one machine
        e = slurm_entry(name, tmp_path, sample_data, steps, devices)
        return {k: v for k, v in e.items() if k != "slurm"} | {"environment": "local"}

    pairs = {  # SLURM jobs first: run-all submits them, then trains the local runs while they run
        "nodes2x1": slurm_entry("nodes2x1", tmp_path, sample_data, steps, 1, 2, cpus_per_task=2),
        "nodes2x2": slurm_entry("nodes2x2", tmp_path, sample_data, steps, 2, 2),
        "node1x2": local("node1x2", 2),
        "node1x4": local("node1x4", 4),
    }
    queue = write_queue(tmp_path / "q.yaml", list(pairs.values()))
    submitted = subprocess.run(  # 4 + 2 + 4 + 2 processes: longer than `runner`'s 10 minutes on a busy CPU
        cli("run-all", "--queues", f"[{queue}]", "--wait", "true"),
        capture_output=True, text=True, timeout=1800, env={**os.environ, "TORCH_COMPILE_DISABLE": "1"},
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    runs = tmp_path / "runs"
    for name in pairs:
        e = status(queue, name)
        assert e["status"] == "done" and e["last_step"] == steps, e
    for several, one in (("nodes2x1", "node1x2"), ("nodes2x2", "node1x4")):
        a, b = losses_by_iter(runs / several), losses_by_iter(runs / one)
        assert sorted(a) == sorted(b) and all(a[i] == pytest.approx(b[i], abs=1e-5) for i in a), (a, b)
        job = status(queue, several)["slurm_job"]
        log = (runs / several / "logs" / f"slurm-{job}.out").read_text()
        nodes = dict(re.findall(r"Node rank (\d) of 2 \((ts-n\d), ", log))
        assert nodes == {"0": "ts-n1", "1": "ts-n2"}, log[-3000:]
        addresses = set(re.findall(r"main address (\S+):\d+", log))
        assert addresses == {"ts-n1"}, addresses  # the allocation's first node, on every node
        if several == "nodes2x1":  # srun was given --cpus-per-task: each rank sees its 2 CPUs, not 1
            assert log.count("1 process(es), 2 CPU(s) each") == 2, log[-3000:]


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
