"""`environment: slurm`: one batch job per experiment, written into its run folder and submitted with sbatch.

The job runs one task per device with srun (Fabric takes the ranks from SLURM), resumes from the newest
checkpoint that loads, asks for a signal before its time limit and requeues itself on it, and records its
own start and outcome in the queue (`tinystories-lab slurm-record`). Here too: submitting an entry's job
(`submit_entry`), waiting for it (`wait_for_job`, `--wait true`) and checking a requeued job's progress
(`record_start`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from tinystories_lab.errors import UserError
from tinystories_lab.experiments.launch import launch_command, now
from tinystories_lab.experiments.outcomes import Outcome, finish, record
from tinystories_lab.experiments.queue import Queue, find
from tinystories_lab.experiments.runs import newest_loadable, out_dir_of
from tinystories_lab.preemption import PREEMPTED_EXIT

REQUEUE_SIGNAL_S = 120  # ask for SIGUSR1 this long before the time limit, to save and requeue in time
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
SLURM_TIMEOUT_S = 60  # a SLURM command that has not answered by then is taken as not answering
SQUEUE_TRIES = 3


class JobState(NamedTuple):
    """A job as squeue shows it: PENDING, RUNNING, ... and its node (or the reason it waits)."""

    state: str
    where: str

    def __str__(self) -> str:
        where = self.where.strip("()")  # squeue writes a pending job's reason as "(BeginTime)"
        return f"{self.state} on {where}" if self.state == "RUNNING" else f"{self.state} ({where})"


def is_slurm(entry: dict) -> bool:
    """Whether an entry trains as a SLURM job (`environment: slurm`) rather than as local processes."""
    return entry.get("environment", "local") == "slurm"


def _slurm(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise UserError(
            f"environment: slurm needs SLURM's `{cmd[0]}` on PATH: run on the cluster's login node, or start "
            "a cluster on this machine with `make slurm-local`."
        )
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        result = subprocess.CompletedProcess(cmd, 124, "", f"no answer in {SLURM_TIMEOUT_S} s")
    if check and result.returncode != 0:
        raise UserError(f"`{shlex.join(cmd)}` failed: {(result.stderr or result.stdout).strip()}")
    return result


def check_request(entry: dict) -> None:
    """Refuse what sbatch would refuse or run wrongly: a value that would break the batch script, no
    SLURM, an unknown partition, GPUs per node that are neither one per device nor 0 (a CPU partition)."""
    slurm = entry.get("slurm") or {}
    check_values(entry)
    _slurm("sbatch", "--version")
    partition = slurm.get("partition")
    if partition is not None and not _slurm("sinfo", "-h", "-p", str(partition), "-o", "%P").stdout.strip():
        known = " ".join(_slurm("sinfo", "-h", "-o", "%P").stdout.split())
        raise UserError(f"{entry['name']}: SLURM has no partition {partition!r} (it has: {known}).")
    gpus = gpus_per_node(entry)
    if gpus not in (0, entry.get("devices", 1)):
        raise UserError(
            f"{entry['name']}: slurm.gpus_per_node is {gpus} but devices is {entry.get('devices', 1)}; "
            "one task trains on each GPU, so make them equal (or 0 for a CPU partition)."
        )
    test = _slurm("sbatch", "--test-only", *_request_options(entry), "--wrap=true", check=False)
    if test.returncode != 0:  # an option sbatch refuses (a bad time, an unknown account, ...)
        reason = " ".join(test.stderr.replace("sbatch: error:", "").split())
        raise UserError(
            f"{entry['name']}: sbatch refuses its slurm: options ({reason}); fix them in the entry."
        )


def _request_options(entry: dict) -> list[str]:
    """The sbatch options that the entry asks for: its size and its `slurm:` mapping."""
    slurm = entry.get("slurm") or {}
    options = [f"--nodes={entry.get('num_nodes', 1)}", f"--ntasks-per-node={entry.get('devices', 1)}"]
    for key, flag in (("partition", "partition"), ("time", "time"), ("account", "account"),
                      ("cpus_per_task", "cpus-per-task")):  # fmt: skip
        if key in slurm:
            options.append(f"--{flag}={slurm[key]}")
    if gpus_per_node(entry):
        options.append(f"--gpus-per-node={gpus_per_node(entry)}")
    return options + [str(a) for a in slurm.get("sbatch_args", [])]


def check_values(entry: dict) -> None:
    """Refuse a newline or other control character in any `slurm:` value: each becomes an `#SBATCH` line,
    and a newline would make the rest a shell line of the batch script."""
    slurm = entry.get("slurm") or {}
    for key, value in slurm.items():
        for v in value if isinstance(value, list) else [value]:
            if CONTROL_CHARACTERS.search(str(v)):
                raise UserError(
                    f"{entry['name']}: slurm.{key} holds a newline or control character ({str(v)!r}); "
                    "write it on one line without them."
                )


def gpus_per_node(entry: dict) -> int:
    """The GPUs a job asks for on each node: `slurm.gpus_per_node`, by default one per device."""
    return int((entry.get("slurm") or {}).get("gpus_per_node", entry.get("devices", 1)))


def batch_script(entry: dict, queue: Path, command: list[str]) -> str:
    """The sbatch script of an experiment: readable, and resubmittable by hand with `sbatch`."""
    name, out_dir = entry["name"], out_dir_of(entry).resolve()
    options = [
        f"--job-name=ts-{name}",
        f"--chdir={Path.cwd()}",
        f"--output={out_dir}/logs/slurm-%j.out",
        "--open-mode=append",  # a requeued job goes on writing the same file
        "--requeue",
        f"--signal=B:USR1@{REQUEUE_SIGNAL_S}",
        *_request_options(entry),
    ]
    gpus = gpus_per_node(entry)
    if gpus:  # a process that sees fewer GPUs than asked for fails at once, not on CPUs
        command = [*command[:3], f"--gpus_per_node={gpus}", *command[3:]]
    record = [
        sys.executable,
        "-m",
        "tinystories_lab.cli",
        "slurm-record",
        name,
        "--queues",
        json.dumps([str(queue.resolve())]),
    ]
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {o}" for o in options),
        f"# Written by tinystories-lab for experiment {name} of {queue}.",
        f"# Resubmit by hand: sbatch {out_dir}/job.sbatch",
        "",
        "# The main address: the allocation's first node. srun does not inherit --cpus-per-task (22.05+).",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        '[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"',
        "# Near the time limit (or on `scancel --batch --signal=USR1`) the ranks are told: each",
        f"# saves at the next step boundary and exits with {PREEMPTED_EXIT}; then the job is requeued and",
        "# resumes from that checkpoint. A start with no checkpoint newer than the previous start's fails.",
        "signalled=",
        'trap \'echo "USR1: the ranks save, then the job requeues"; signalled=1; kill -USR1 "$pid"\' USR1',
        f"{shlex.join(record)} --event started || exit 1",
        f"srun --label --kill-on-bad-exit=1 {shlex.join(command)} &",  # each line names its task
        "pid=$!",
        "# `wait` also returns when a trap runs: wait again while srun lives.",
        'while :; do wait "$pid"; code=$?; kill -0 "$pid" 2>/dev/null || break; done',
        f'if [ "$code" = {PREEMPTED_EXIT} ] || {{ [ -n "$signalled" ] && [ "$code" != 0 ]; }}; then',
        '    echo "requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        f'{shlex.join(record)} --event finished --exit_code "$code"',
        'exit "$code"',
        "",
    ]
    return "\n".join(lines)


def submit(script: Path) -> str:
    """Submit a batch script; its job id."""
    return _slurm("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]


def job_state(job: str | int | None, retry_s: float = 2.0) -> JobState | None:
    """The job's state while SLURM still lists it (pending, running, requeued...), else None.

    A controller that does not answer (busy, restarting: "Socket timed out") is not a job that ended:
    squeue is asked again, then this raises. Taking it for ended would let the runner submit a running
    experiment a second time, two jobs writing one run folder."""
    if job is None:
        return None
    for attempt in range(SQUEUE_TRIES):
        result = _slurm("squeue", "-h", "-j", str(job), "-o", "%T|%R", check=False)
        if result.returncode == 0 or "Invalid job id" in result.stderr:  # the latter: ended and purged
            break
        if attempt + 1 < SQUEUE_TRIES:
            time.sleep(retry_s * (attempt + 1))
    else:
        reason = " ".join((result.stderr or result.stdout).split())
        raise UserError(
            f"SLURM does not answer about job {job} (squeue: {reason}); nothing was changed. "
            "Try again when `squeue` answers."
        )
    line = result.stdout.strip()
    if result.returncode != 0 or not line:
        return None
    state, where = line.splitlines()[0].split("|", 1)
    return JobState(state, where)


def cancel_job(job: str | int) -> None:
    _slurm("scancel", str(job))


def submit_entry(queue: Queue, entry: dict) -> Outcome:
    """Write an entry's batch script into its run folder, submit it and record the job in the queue."""
    name, out_dir = entry["name"], out_dir_of(entry)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    command = launch_command(entry, entry.get("run_logger"), list(entry.get("run_args", [])))
    script = out_dir / "job.sbatch"
    script.write_text(batch_script(entry, queue.path, command))
    job = submit(script)
    record(queue, name, slurm_job=job, log=str(out_dir / "logs" / f"slurm-{job}.out"))
    print(f"{name}: submitted SLURM job {job} ({script}); `make list` shows its state.")
    return Outcome(name, "submitted", 0)


def wait_for_job(queue: Queue, name: str, poll_s: float = 2.0) -> Outcome:
    """Block until a submitted experiment's job has ended and say how (for scripts: `--wait true`). Ctrl-C
    stops the waiting only: the job goes on."""
    shown = None
    job = None
    try:
        while True:
            entry = find(queue.load(), name)
            job = entry.get("slurm_job")
            state = job_state(job)
            if entry["status"] != "running" or state is None:
                break
            if str(state) != shown:
                shown = str(state)
                print(f"{name}: SLURM job {job} {shown}", flush=True)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(
            f"\n{name}: stopped waiting; SLURM job {job} goes on (`make list` shows it, "
            f"`make cancel MODEL={name}` cancels it).",
            file=sys.stderr,
        )
        sys.exit(130)
    if entry["status"] == "running":  # the job left SLURM's list without recording how it ended
        entry = find(queue.load(), name)
    status = entry["status"]
    print(f"{name}: {status}" + (f" (exit {entry.get('exit_code')})" if status == "failed" else ""))
    if status == "done":
        return Outcome(name, "done", 0)
    return Outcome(name, "failed" if status != "todo" else "stopped", int(entry.get("exit_code") or 1))


def record_start(queue: Queue, entry: dict) -> None:
    """A SLURM job's start: its node and the step it resumes from (`start_step`). A requeued job that finds
    no checkpoint newer than its previous start's made no progress and would loop forever: it is recorded
    `failed` with the reason, and this exits 1 so the batch script stops instead of training again."""
    name = entry["name"]
    newest, _ = newest_loadable(out_dir_of(entry))
    step = newest.step_count() if newest is not None else 0
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    if restarts and "start_step" in entry and step <= int(entry["start_step"]):
        reason = (
            f"SLURM job {entry.get('slurm_job')} came back (restart {restarts}) with no checkpoint newer "
            f"than step {step}, where its previous start began: it would requeue forever without progress. "
            f"Give it a longer slurm.time or a smaller --train.save_interval, then `make reset MODEL={name}`."
        )
        finish(queue, name, status="failed", last_step=step, error=reason)
        print(f"{name}: failed: {reason}", file=sys.stderr)
        sys.exit(1)
    record(queue, name, host=socket.gethostname(), started_at=now(), start_step=step)
