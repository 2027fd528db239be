"""Nothing the user has is lost: faults and bad input against the real runner and queue (docs/faults.md)."""

import errno
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    DEMO_CONFIGS,
    ROOT,
    TOKENS_PER_STEP,
    UNPRIVILEGED,
    entry,
    run_cli,
    runner,
    status,
    wait_for,
    write_queue,
)

from tinystories_lab.errors import UserError
from tinystories_lab.experiments import checks, outcomes
from tinystories_lab.experiments import runner as runner_module
from tinystories_lab.experiments.gpus import claim_gpus
from tinystories_lab.experiments.launch import failure_reason
from tinystories_lab.experiments.locks import LOCK_DIR_ENV, RunLock, run_is_alive
from tinystories_lab.experiments.queue import Queue
from tinystories_lab.experiments.runs import step_checkpoints, write_run_file


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


# 1. Names are folder names; nothing outside a run folder is created or deleted.


@pytest.mark.parametrize("name", [".", "../..", "../x", ".hidden", "a/b", 123, ""])
def test_a_name_that_is_not_a_folder_name_is_refused_and_nothing_is_touched(name, tmp_path, capsys):
    config = "config_hub/pretrain/tiny_stories/demo/gpt_demo.yaml"
    queue = write_queue(tmp_path / "q.yaml", [{"name": name, "config": config, "status": "running"}])
    before = queue.read_bytes()
    experiments = sorted((ROOT / "experiments").rglob("*"))
    for argv in (["run-next"], ["reset", str(name), "--delete_run_folder", "true"], ["list"]):
        code, _, err = run_cli([*argv, "--queues", f"[{queue}]"], capsys)
        assert code == 1 and "becomes a folder name" in err, err
    assert queue.read_bytes() == before
    assert sorted((ROOT / "experiments").rglob("*")) == experiments  # no lock, no folder, nothing deleted


def test_reset_delete_deletes_only_the_folder_the_runner_made_for_that_name(tmp_path, sample_data, capsys):
    entries = [entry(n, tmp_path, sample_data) for n in ("hand", "linked", "other", "mine")]
    queue = write_queue(tmp_path / "q.yaml", entries)
    runs = tmp_path / "runs"
    (runs / "hand" / "step-00000001").mkdir(parents=True)  # made by hand: looks like a run, is not ours
    (tmp_path / "elsewhere" / "final").mkdir(parents=True)
    write_run_file(tmp_path / "elsewhere", "linked", queue)
    (runs / "linked").symlink_to(tmp_path / "elsewhere")
    (runs / "other").mkdir()
    write_run_file(runs / "other", "someone-else", queue)
    (runs / "mine" / "final").mkdir(parents=True)
    write_run_file(runs / "mine", "mine", queue)
    refusals = {"hand": "was not made by the runner for hand", "linked": "is a symlink",
                "other": "was not made by the runner for other"}  # fmt: skip
    for name, message in refusals.items():
        before = queue.read_bytes()
        code, _, err = run_cli(
            ["reset", name, "--queues", f"[{queue}]", "--delete_run_folder", "true"], capsys
        )
        assert code == 1 and message in err, err
        assert queue.read_bytes() == before
    assert (runs / "hand" / "step-00000001").is_dir() and (tmp_path / "elsewhere" / "final").is_dir()
    assert (runs / "linked").is_symlink() and (runs / "other" / "run.yaml").is_file()
    assert run_cli(["reset", "mine", "--queues", f"[{queue}]", "--delete_run_folder", "true"], capsys)[0] == 0
    assert not (runs / "mine").exists()


def test_a_refused_run_leaves_no_folder_behind(tmp_path, sample_data, capsys):
    e = entry("a", tmp_path, sample_data)
    e["args"][0] = f"--data.init_args.data_dir={tmp_path / 'nothing'}"  # token files missing
    queue = write_queue(tmp_path / "q.yaml", [e])
    code, _, err = run_cli(["run-next", "--queues", f"[{queue}]"], capsys)
    assert code == 1 and "make data-sample" in err
    assert not (tmp_path / "runs" / "a").exists()


# 2. final/ is a checkpoint: a finished run is extended, never silently restarted over.


@pytest.mark.slow
def test_a_finished_run_without_step_folders_is_extended_from_final_not_restarted(
    tmp_path, sample_data, capsys
):
    """Training through the runner's CLI; resets, listings and the refusal in this process (no start-up)."""
    queue = write_queue(tmp_path / "q.yaml", [entry("a", tmp_path, sample_data, steps=8)])
    queues = f"[{queue}]"
    assert runner("run-next", queue).returncode == 0
    out = tmp_path / "runs" / "a"
    for step in out.glob("step-*"):
        shutil.rmtree(step)  # as the README suggests, to save disk
    assert run_cli(["reset", "a", "--queues", queues], capsys)[0] == 0
    longer = f"--args=--train.max_tokens={12 * TOKENS_PER_STEP}"
    result = runner("run-next", queue, longer)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"Resuming training from {out / 'final' / 'lit_model.pth'}" in result.stdout
    assert status(queue, "a")["last_step"] == 12
    logged = [
        int(line.split("iter ")[1].split()[0]) for line in result.stdout.splitlines() if "loss train" in line
    ]
    assert logged[0] == 9 and logged[-1] == 12  # continued, not restarted at iter 1

    # A resume with nothing left to train logs only a final validation: `make list` still shows it.
    assert run_cli(["reset", "a", "--queues", queues], capsys)[0] == 0
    assert runner("run-next", queue).returncode == 0
    row = listing_row(queues, "a", capsys)
    assert "49.15k / 49.15k (100%)" in row and not row.rstrip().endswith("-")

    # A truncated newest checkpoint: progress comes from the newest one that loads.
    final = out / "final" / "lit_model.pth"
    final.write_bytes(final.read_bytes()[:1000])
    assert "49.15k / 49.15k (100%)" in listing_row(queues, "a", capsys)  # from step-00000012
    for step in out.glob("step-*"):
        shutil.rmtree(step)
    assert "0 / 49.15k (0%)" in listing_row(queues, "a", capsys)

    # Nothing loads but final/ exists: a restart from zero would overwrite it, so it must be asked for.
    assert run_cli(["reset", "a", "--queues", queues], capsys)[0] == 0
    before = md5(final)
    code, _, err = run_cli(["run-next", "--queues", queues], capsys)
    assert code == 1 and "would overwrite its final/" in err
    assert md5(final) == before and status(queue, "a")["status"] == "todo"
    restarted = runner("run-next", queue, "--restart", "true")
    assert restarted.returncode == 0, restarted.stdout[-3000:]
    assert "Restarting from zero: deleted final" in restarted.stdout
    assert torch.load(final, weights_only=True)["step_count"] == 12


def listing_row(queues, name, capsys):
    code, listing, _ = run_cli(["list", "--queues", queues], capsys)
    assert code == 0
    return next(line for line in listing.splitlines() if line.startswith(f"{name} "))


# 4. A full disk: the run's error reaches the user, and the outcome is recorded.


@contextmanager
def tiny_disk(path, size):
    """A real file system of `size` at `path` (tmpfs; needs root)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.slow
def test_a_full_disk_fails_the_run_with_its_error_and_records_it(tmp_path, sample_data):
    with tiny_disk(tmp_path / "runs", "4M"):  # logs fit, the first checkpoint (~22 MB) does not
        queue = write_queue(tmp_path / "q.yaml", [entry("a", tmp_path, sample_data, steps=8)])
        result = runner("run-next", queue)
        assert result.returncode != 0
        failed = status(queue, "a")
        assert failed["status"] == "failed" and "No space left on device" in failed["error"]


def test_an_outcome_is_recorded_once_a_full_disk_has_room_again(tmp_path, sample_data, monkeypatch, capsys):
    monkeypatch.setattr(outcomes, "DISK_FULL_RETRY_S", 0.2)
    with tiny_disk(tmp_path / "disk", "256k") as disk:
        queue = write_queue(disk / "q.yaml", [{**entry("a", tmp_path, sample_data), "status": "running"}])
        Queue(queue).load()
        (disk / "q.yaml.lock").touch()
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        record = threading.Thread(target=outcomes.finish, args=(Queue(queue), "a", "done"))
        record.start()
        wait_for(lambda: "Disk full: cannot record that a is done" in capsys.readouterr().err, timeout=30)
        assert status(queue, "a")["status"] == "running"
        filler.unlink()
        record.join(timeout=30)
        assert status(queue, "a")["status"] == "done"


# 5. A symlinked queue stays a symlink.


def test_a_symlinked_queue_is_rewritten_through_its_link(tmp_path, sample_data, capsys):
    target = write_queue(tmp_path / "real.yaml", [{**entry("a", tmp_path, sample_data), "status": "failed"}])
    link = tmp_path / "experiments.yaml"
    link.symlink_to(target)
    assert run_cli(["reset", "a", "--queues", f"[{link}]"], capsys)[0] == 0
    assert link.is_symlink() and status(target, "a")["status"] == "todo"


# 6. A failed run keeps its arguments, and run-next says what failed.


def test_a_failed_run_is_named_by_run_next_and_keeps_its_arguments_through_reset(
    tmp_path, sample_data, capsys
):
    failed = {**entry("a", tmp_path, sample_data), "status": "failed", "exit_code": 137}
    failed["run_args"] = ["--train.max_tokens=98304"]
    queue = write_queue(tmp_path / "q.yaml", [failed])
    code, out, _ = run_cli(["run-next", "--queues", f"[{queue}]"], capsys)
    assert code == 0 and "Failed: a (exit 137)" in out and "make reset MODEL=<name>" in out
    assert run_cli(["reset", "a", "--queues", f"[{queue}]"], capsys)[0] == 0
    a = status(queue, "a")
    assert a["status"] == "todo" and a["run_args"] == ["--train.max_tokens=98304"] and "exit_code" not in a


# 9. A stopped lock holder is named, and waiting for it ends.


def test_a_stopped_queue_lock_holder_is_named_and_the_wait_ends(tmp_path, sample_data, monkeypatch, capsys):
    queue = write_queue(tmp_path / "q.yaml", [entry("a", tmp_path, sample_data)])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tinystories_lab.experiments.queue import Queue\n"
         "with Queue(sys.argv[1]).edit():\n    print('locked', flush=True); time.sleep(600)", str(queue)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGSTOP)  # Ctrl-Z
        monkeypatch.setattr(Queue, "LOCK_TIMEOUT_S", 3)
        monkeypatch.setattr(Queue, "LOCK_NOTICE_S", 1)
        start = time.monotonic()
        code, out, err = run_cli(["run-next", "--queues", f"[{queue}]"], capsys)
        assert code == 1 and time.monotonic() - start < 30
        assert f"Waiting for the lock of {queue}: held by pid {holder.pid}" in out
        assert f"held by pid {holder.pid}" in err and "(stopped)" in err and "kill -CONT" in err
    finally:
        holder.kill()
        holder.wait()


# 10. One clear line, never a traceback.


def test_bad_training_settings_are_refused_before_start(tmp_path, sample_data, capsys):
    cases = {
        "--train.max_tokens=0": "train.max_tokens must be a positive number",
        "--train.max_tokens=null": "train.max_tokens must be a positive number",
        f"--train.max_tokens={10**20}": "train.max_tokens must be a positive number",
        "--train.micro_batch_size=12": "global_batch_size 32 is not a multiple of processes x micro_batch",
    }
    for arg, message in cases.items():
        queue = write_queue(tmp_path / "q.yaml", [entry("a", tmp_path, sample_data, extra=[arg])])
        before = queue.read_bytes()
        code, _, err = run_cli(["run-next", "--queues", f"[{queue}]"], capsys)
        assert code == 1 and message in err, (arg, err)
        assert queue.read_bytes() == before
        code, out, _ = run_cli(["list", "--queues", f"[{queue}]"], capsys)
        assert code == 0 and "a " in out  # `make list` shows it without a traceback


@pytest.mark.skipif(not UNPRIVILEGED and os.geteuid() == 0, reason="needs setpriv to drop root's file access")
def test_unreadable_or_read_only_run_folders_get_one_line_and_block_nothing(tmp_path, sample_data):
    shutil.copytree(sample_data, tmp_path / "data")  # readable by an unprivileged process
    data = tmp_path / "data"
    stale = {**entry("stale", tmp_path, data), "status": "running", "pid": 1, "host": "gone"}
    nodata = entry("nodata", tmp_path, data)
    nodata["args"][0] = f"--data.init_args.data_dir={tmp_path / 'nothing'}"  # refused when its turn comes
    queue = write_queue(tmp_path / "q.yaml", [stale, nodata])
    locked = tmp_path / "runs" / "stale"
    locked.mkdir(parents=True)
    locked.chmod(0o000)
    try:
        result = runner("run-next", queue, unprivileged=True)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "Skipping stale: its run folder" in result.stdout and "make data-sample" in result.stderr
        listing = subprocess.run(
            UNPRIVILEGED + [sys.executable, "-m", "tinystories_lab.cli", "list", "--queues", f"[{queue}]"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert listing.returncode == 0 and f"cannot read {locked}" in listing.stdout, listing.stderr
        reset = runner("reset", queue, "stale", unprivileged=True)
        assert reset.returncode == 1 and "not accessible (permission denied)" in reset.stderr
    finally:
        locked.chmod(0o755)
    (tmp_path / "runs").chmod(0o555)  # a read-only experiments folder
    try:
        queue = write_queue(tmp_path / "q2.yaml", [entry("new", tmp_path, data)])
        result = runner("run-next", queue, unprivileged=True)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "Cannot create the run folder" in result.stderr and "Permission denied" in result.stderr
    finally:
        (tmp_path / "runs").chmod(0o755)


def test_a_file_system_without_locks_gets_one_line_naming_the_setting_that_moves_them(
    tmp_path, sample_data, monkeypatch, capsys
):
    """Lustre or NFS without working flock: flock raises ENOLCK (or ENOSYS); one line, and the setting
    that puts every lock in a local folder instead."""
    queue = write_queue(tmp_path / "q.yaml", [entry("a", tmp_path, sample_data)])
    before = queue.read_bytes()
    real_flock = fcntl.flock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    code, _, err = run_cli(["run-next", "--queues", f"[{queue}]"], capsys)
    assert code == 1 and err.count("error:") == 1 and "Traceback" not in err, err
    assert "its file system does not support file locks (No locks available)" in err
    assert "TINYSTORIES_LAB_LOCK_DIR=" in err and queue.read_bytes() == before

    monkeypatch.setattr(fcntl, "flock", real_flock)
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    out_dir = tmp_path / "runs" / "a"
    lock = RunLock(out_dir, "rank-0")
    assert lock.acquire() and lock.path.parent == tmp_path / "locks"
    assert run_is_alive(out_dir) and not list(out_dir.glob("*.lock"))
    lock.release()
    assert not run_is_alive(out_dir)


def test_gpu_locks_are_keyed_by_uuid_and_shared_by_every_user():
    """Two SLURM allocations on one node both see their GPU as "0": different GPUs, both may train. One
    user's lock folder and files do not lock out the next user."""
    home = Path(tempfile.mkdtemp())  # not under tmp_path, whose 0700 parents would bar another user
    home.chmod(0o755)
    lock_dir = home / "gpu-locks"
    old = os.umask(0o022)
    try:
        first, first_locks = claim_gpus(1, visible=["0"], uuids=["GPU-aaa"], lock_dir=lock_dir)
        second, second_locks = claim_gpus(1, visible=["0"], uuids=["GPU-bbb"], lock_dir=lock_dir)
        assert first == second == "0"
        with pytest.raises(UserError, match=r"in use by other runs: GPU 0"):
            claim_gpus(1, visible=["0"], uuids=["GPU-aaa"], lock_dir=lock_dir)
        assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o1777
        assert {stat.S_IMODE(p.stat().st_mode) for p in lock_dir.iterdir()} == {0o666}
        assert sorted(p.name for p in lock_dir.iterdir()) == ["gpu-GPU-aaa.lock", "gpu-GPU-bbb.lock"]
        for lock in first_locks + second_locks:
            lock.release()
    finally:
        os.umask(old)
    if UNPRIVILEGED:  # as another user whom permissions bind: the same folder and file are usable
        check = (
            "from pathlib import Path; from tinystories_lab.experiments.gpus import claim_gpus; "
            f"print(claim_gpus(1, visible=['0'], uuids=['GPU-aaa'], lock_dir=Path({str(lock_dir)!r}))[0])"
        )
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", check],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0 and result.stdout.strip() == "0", result.stderr
    shutil.rmtree(home)


# 11. Round 2: run folders that are not the run's, orphans, refusals that change the queue (issue 26).


def fake_checkpoint(folder, step, devices=1, micro=32, global_batch=32):
    """A checkpoint folder as LitGPT leaves it, as far as the runner reads it (no training needed)."""
    folder.mkdir(parents=True)
    torch.save({"model": {}, "optimizer": {}, "iter_num": step, "step_count": step}, folder / "lit_model.pth")
    train = {"micro_batch_size": micro, "global_batch_size": global_batch, "max_seq_length": 128}
    (folder / "hyperparameters.yaml").write_text(
        yaml.safe_dump({"devices": devices, "num_nodes": 1, "train": {**train, "max_tokens": 10**6}})
    )


def test_an_out_dir_holding_other_runs_is_refused_and_their_checkpoints_kept(tmp_path, sample_data, capsys):
    runs = tmp_path / "runs"
    for name in ("x", "y"):
        fake_checkpoint(runs / name / "step-00000010", 10)
        fake_checkpoint(runs / name / "final", 12)
        write_run_file(runs / name, name, tmp_path / "q.yaml")
    assert step_checkpoints(runs) == []  # only a run's own step-* folders, never its children's
    parent = {**entry("p", tmp_path, sample_data), "out_dir": str(runs)}
    queue = write_queue(tmp_path / "q.yaml", [parent])
    before = queue.read_bytes()
    for extra in ([], ["--restart", "true"]):
        code, _, err = run_cli(["run-specific", "p", "--queues", f"[{queue}]", *extra], capsys)
        assert code == 1 and f"{runs} holds other runs (x, y)" in err, err
        assert queue.read_bytes() == before
    for name in ("x", "y"):
        assert (runs / name / "step-00000010" / "lit_model.pth").is_file() and (
            runs / name / "final"
        ).is_dir()
    # An out_dir that is another experiment's run folder is refused too.
    queue = write_queue(tmp_path / "q.yaml", [{**parent, "out_dir": str(runs / "x")}])
    code, _, err = run_cli(["run-specific", "p", "--queues", f"[{queue}]"], capsys)
    assert code == 1 and "is the run folder of experiment 'x'" in err, err


def test_a_run_folder_belongs_to_the_queue_its_run_yaml_names(tmp_path, sample_data, capsys):
    e = entry("mr", tmp_path, sample_data)
    owner = write_queue(tmp_path / "q.yaml", [{**e, "status": "done"}])
    other = write_queue(tmp_path / "q2.yaml", [e])
    out = tmp_path / "runs" / "mr"
    fake_checkpoint(out / "final", 12)
    write_run_file(out, "mr", owner)
    before = other.read_bytes()
    for argv in (["reset", "mr", "--delete_run_folder", "true"], ["run-specific", "mr"]):
        code, _, err = run_cli([*argv, "--queues", f"[{other}]"], capsys)
        assert code == 1 and f"belongs to mr of {owner}" in err and f"QUEUE={owner}" in err, err
        assert other.read_bytes() == before and (out / "final" / "lit_model.pth").is_file()
    code, _, _ = run_cli(["reset", "mr", "--delete_run_folder", "true", "--queues", f"[{owner}]"], capsys)
    assert code == 0 and not out.exists()


def test_a_rank_dies_with_its_parent_even_during_its_imports(tmp_path):
    env = {**os.environ, "TINYSTORIES_LAB_PARENT_PID": "1"}  # a parent that is not this process's
    gone = subprocess.run(
        [sys.executable, "-m", "tinystories_lab.pretrain"], env=env, capture_output=True, text=True
    )
    assert gone.returncode == 1 and "(pid 1) is gone; not training" in gone.stderr
    assert "Traceback" not in gone.stderr
    # A parent killed with -9 after the child armed: the kernel ends the child.
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time\n"
         "env = {**os.environ, 'TINYSTORIES_LAB_PARENT_PID': str(os.getpid())}\n"
         "child = subprocess.Popen([sys.executable, '-c', 'import tinystories_lab.experiments.lifeline, time;"
         " print(flush=True); time.sleep(300)'], env=env, stdout=subprocess.PIPE)\n"
         "child.stdout.readline(); print(child.pid, flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    wait_for(lambda: not os.path.exists(f"/proc/{child}"), 10)  # reaped by init once killed


def test_cancel_signals_only_processes_that_hold_the_runs_locks(tmp_path, sample_data, capsys):
    bystander = subprocess.Popen(["sleep", "300"])  # the dead runner's pid, now reused by another process
    out = tmp_path / "runs" / "a"
    out.mkdir(parents=True)
    rank = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tinystories_lab.experiments.locks import RunLock\n"
         "assert RunLock(sys.argv[1], 'rank-1').acquire(); print('locked', flush=True); time.sleep(300)",
         str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert rank.stdout.readline().strip() == "locked"
        running = {**entry("a", tmp_path, sample_data), "status": "running", "pid": bystander.pid}
        queue = write_queue(tmp_path / "q.yaml", [{**running, "host": socket.gethostname()}])
        code, _, err = run_cli(["run-specific", "a", "--queues", f"[{queue}]"], capsys)
        assert (
            code == 1 and f"runner pid {bystander.pid} is gone, but pid {rank.pid} holds rank-1.lock" in err
        )
        code, out_text, err = run_cli(["cancel", "a", "--queues", f"[{queue}]"], capsys)
        assert code == 0 and f"stopped pid {rank.pid}" in out_text, err
        assert rank.wait(timeout=10) == -signal.SIGTERM and bystander.poll() is None
        assert status(queue, "a")["status"] == "todo"
        # Nothing holds its locks any more: one line, no ProcessLookupError.
        write_queue(queue, [{**running, "host": socket.gethostname(), "pid": 999999}])
        code, _, err = run_cli(["cancel", "a", "--queues", f"[{queue}]"], capsys)
        assert code == 1 and "a is not running" in err and "Traceback" not in err
    finally:
        for p in (bystander, rank):
            p.kill()
            p.wait()


def test_a_resume_with_another_world_size_or_batch_is_refused_unless_asked(tmp_path, sample_data, capsys):
    e = {**entry("a", tmp_path, sample_data), "attempts": 1}
    out = tmp_path / "runs" / "a"
    fake_checkpoint(out / "step-00000004", 4, devices=2, micro=16)
    write_run_file(out, "a", tmp_path / "q.yaml")
    queue = write_queue(tmp_path / "q.yaml", [e])
    before = queue.read_bytes()
    code, _, err = run_cli(["run-specific", "a", "--queues", f"[{queue}]"], capsys)
    assert code == 1 and "world size (devices x num_nodes) 2 -> 1" in err, err
    assert "micro batch 16 -> 32" in err
    assert "RESIZE=1" in err and queue.read_bytes() == before
    checks.check_ready(e, [], resize=True)  # asked for: allowed
    # A kill between LitGPT writing the weights and the hyperparameters: the check reads the step before,
    # and `make list` still shows the run.
    fake_checkpoint(out / "step-00000008", 8, devices=2, micro=16)
    (out / "step-00000008" / "hyperparameters.yaml").unlink()
    code, _, err = run_cli(["run-specific", "a", "--queues", f"[{queue}]"], capsys)
    assert code == 1 and "world size (devices x num_nodes) 2 -> 1" in err and "Traceback" not in err, err
    code, out_text, _ = run_cli(["list", "--queues", f"[{queue}]"], capsys)
    assert code == 0 and any(line.startswith("a ") for line in out_text.splitlines())


def test_a_refusal_after_the_claim_restores_the_entry_and_leaves_no_folder(
    tmp_path, sample_data, monkeypatch, capsys
):
    def no_gpus(*_args):
        raise UserError("Not enough free GPUs: 1 asked for, 0 free.")

    monkeypatch.setattr(runner_module, "claim_gpus", no_gpus)
    queue = write_queue(tmp_path / "q.yaml", [{**entry("a", tmp_path, sample_data), "attempts": 2}])
    before = [list(e.items()) for e in Queue(queue).load()]
    code, _, err = run_cli(["run-specific", "a", "--queues", f"[{queue}]"], capsys)
    assert code == 1 and "Not enough free GPUs" in err
    assert [list(e.items()) for e in Queue(queue).load()] == before  # status todo, attempts 2, same order
    assert not (tmp_path / "runs" / "a").exists()


def test_slurm_options_are_checked_as_sbatch_would(tmp_path, sample_data, capsys):
    e = {**entry("a", tmp_path, sample_data), "environment": "slurm"}
    args = {"gpus_per_node": 0, "sbatch_args": ["--exclusive", "--mem=0"]}  # the local cluster has no GPU
    queue = write_queue(tmp_path / "q.yaml", [{**e, "slurm": args}])
    assert Queue(queue).load()[0]["slurm"]["sbatch_args"] == ["--exclusive", "--mem=0"]  # YAML's list type
    write_queue(queue, [{**e, "slurm": {"sbatch_args": "--exclusive"}}])
    with pytest.raises(UserError, match="slurm.sbatch_args must be a list"):
        Queue(queue).load()
    if shutil.which("sbatch") is None:
        pytest.skip("no sbatch here")
    write_queue(queue, [{**e, "slurm": {"gpus_per_node": 0, "time": "bogus"}}])
    before = queue.read_bytes()
    code, _, err = run_cli(["run-next", "--queues", f"[{queue}]"], capsys)
    assert code == 1 and "sbatch refuses its slurm: options" in err, err
    assert "time" in err and queue.read_bytes() == before and not (tmp_path / "runs" / "a").exists()


def test_the_failure_reason_is_the_failing_tasks_first_real_error():
    log = [
        "0: /venv/lib/python3.11/site-packages/lightning/x.py:12: DeprecationWarning: `x` is deprecated",
        "0:   warnings.warn(",
        "1: Traceback (most recent call last):",
        "0: Strategy: ddp over 2 processes",
        '1:   File "/venv/lib/python3.11/site-packages/litgpt/utils.py", line 3, in <module>',
        "1:     import mlflow",
        "1: ModuleNotFoundError: No module named 'mlflow'",
        "srun: error: ts-n1: task 1: Exited with exit code 1",
        "0: UserWarning: something else",
    ]
    assert failure_reason(log) == "ModuleNotFoundError: No module named 'mlflow'"
    assert failure_reason(["error: ts is trained by another process"]).startswith("error: ")
    assert failure_reason(["UserWarning: nothing", "loss 3.2"]) is None


def test_list_shows_every_entry_and_marks_a_bad_one_in_one_line(tmp_path, sample_data, capsys):
    bad = entry("bad", tmp_path, sample_data, extra=["--train.no_such_field=1"])
    queue = write_queue(tmp_path / "q.yaml", [bad, entry("good", tmp_path, sample_data)])
    code, out, err = run_cli(["list", "--queues", f"[{queue}]"], capsys)
    assert code == 0 and "usage:" not in out + err
    bad_row = next(line for line in out.splitlines() if line.startswith("bad "))
    assert "cannot start:" in bad_row and "no_such_field" in bad_row
    assert any(line.startswith("good ") and "4L_4H_128D" in line for line in out.splitlines())


def run_logged_in_a_process(out: Path, child: str, *child_args: str) -> subprocess.Popen:
    """`finetune.run.run_logged` supervising `python -c child` from its own process, as `make finetune`."""
    script = (
        "import sys; from pathlib import Path\n"
        "from tinystories_lab.experiments.locks import RunLock\n"
        "from tinystories_lab.finetune.run import run_logged\n"
        "out = Path(sys.argv[1]); lock = RunLock(out); lock.acquire()\n"
        "sys.exit(run_logged([sys.executable, '-c', *sys.argv[2:]], out, lock))"
    )
    cmd = [sys.executable, "-c", script, str(out), child, *child_args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL)


def test_the_finetune_log_is_written_line_by_line(tmp_path):
    proc = run_logged_in_a_process(tmp_path, 'import time; print("step 1", flush=True); time.sleep(300)')
    try:
        wait_for(lambda: any("step 1" in p.read_text() for p in (tmp_path / "logs").glob("*.log")), 60)
    finally:
        proc.kill()  # kill -9: the log already holds the line
        proc.wait()


def test_a_finetune_stopped_by_sigterm_stops_litgpt_with_it(tmp_path):
    """Fine-tuning supervises LitGPT as the runner does: our SIGTERM reaches its process group."""
    child = 'import os, sys, time; open(sys.argv[1], "w").write(str(os.getpid())); time.sleep(300)'
    proc = run_logged_in_a_process(tmp_path, child, str(tmp_path / "pid"))
    try:
        wait_for(lambda: (tmp_path / "pid").is_file() and (tmp_path / "pid").read_text(), 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    litgpt = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(litgpt, 0)


def test_offline_hub_and_text_refusals_are_one_line(tmp_path, capsys):
    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_TOKEN": "x",
    }
    hub_model = ("eval-hf", "someone/not-cached")
    publish = ("publish", "a", "me/a", "--queues", f"[{tmp_path / 'q.yaml'}]")
    cases = [  # (arguments, extra environment, the refusal)
        ((*hub_model, "--source", "sample"), {}, "must be downloaded from the Hugging Face"),
        # (offline mode: the datasets library retries an unreachable Hub for half a minute, to the same end)
        ((*hub_model, "--data_dir", str(tmp_path)), {"HF_HUB_OFFLINE": "1"}, "SOURCE=sample"),
        (publish, {}, "Could not reach the Hugging Face"),
    ]
    export = tmp_path / "runs" / "a" / "hf"
    export.mkdir(parents=True)
    (export / "model.safetensors").write_bytes(b"")
    write_queue(tmp_path / "q.yaml", [{"name": "a", "config": str(DEMO_CONFIGS["gpt_demo"]), "status": "done",
                                       "out_dir": str(tmp_path / "runs" / "a")}])  # fmt: skip
    for argv, extra_env, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "tinystories_lab.cli", *argv], env={**env, **extra_env},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 1 and message in result.stderr, (argv, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    code, _, err = run_cli(["eval-hf", "someone/not-cached", "--text", "/dev/null"], capsys)
    assert code == 1 and "/dev/null is not a regular file" in err, err


def test_a_finetune_into_a_pretraining_runs_folder_is_refused_first(tmp_path, capsys):
    run = tmp_path / "runs" / "a"
    fake_checkpoint(run / "final", 12)
    write_run_file(run, "a", tmp_path / "q.yaml")
    code, _, err = run_cli(["finetune", "a", "--method", "full", "--out_dir", str(run)], capsys)
    assert code == 1 and "holds another run" in err and "not a fine-tune" in err, err
    assert sorted(p.name for p in run.iterdir()) == ["final", "run.yaml"]


def slurm_answers():
    if shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0


@pytest.mark.skipif(
    not slurm_answers(), reason="no SLURM cluster answers here (`make slurm-local` starts one)"
)
def test_ctrl_c_on_wait_is_one_line_and_the_job_goes_on(tmp_path, sample_data):
    # Pending for an hour: it never trains here.
    held = {"gpus_per_node": 0, "sbatch_args": ["--begin=now+1hour"]}
    queue = write_queue(
        tmp_path / "q.yaml", [{**entry("a", tmp_path, sample_data), "environment": "slurm", "slurm": held}]
    )
    proc = runner("run-specific", queue, "a", "--wait", "true", wait=False)
    try:
        lines = []
        while not (lines and "BeginTime" in lines[-1]):  # the scheduler may say "PENDING (None)" first
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        assert lines[-1].rstrip().endswith("PENDING (BeginTime)"), lines[-1]  # not "((BeginTime))"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        job = status(queue, "a")["slurm_job"]
        assert proc.returncode == 130 and f"stopped waiting; SLURM job {job} goes on" in out, out
        assert "Traceback" not in out and status(queue, "a")["status"] == "running"
        cancelled = runner("cancel", queue, "a")
        assert cancelled.returncode == 0 and status(queue, "a")["status"] == "todo", cancelled.stderr
    finally:
        proc.kill()
        proc.wait()
        job = status(queue, "a").get("slurm_job")
        if job is not None:
            subprocess.run(["scancel", str(job)], capture_output=True)  # never leave it to train later
