"""`environment: slurm`: one batch job per experiment, written into its run folder and submitted with sbatch.

The job runs one task per device with srun (Fabric takes the ranks from SLURM), resumes from the newest
checkpoint that loads, asks for a signal before its time limit and requeues itself on it, and records its
own start and outcome in the queue (`tinystories-lab slurm-record`).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from tinystories_lab.errors import UserError
from tinystories_lab.experiments.runs import out_dir_of

REQUEUE_SIGNAL_S = 120  # ask for SIGUSR1 this long before the time limit, to requeue in time


class JobState(NamedTuple):
    """A job as squeue shows it: PENDING, RUNNING, ... and its node (or the reason it waits)."""

    state: str
    where: str

    def __str__(self) -> str:
        where = self.where.strip("()")  # squeue writes a pending job's reason as "(BeginTime)"
        return f"{self.state} on {where}" if self.state == "RUNNING" else f"{self.state} ({where})"


def _slurm(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise UserError(
            f"environment: slurm needs SLURM's `{cmd[0]}` on PATH: run on the cluster's login node, or start "
            "a one-node cluster on this machine with `make slurm-local`."
        )
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise UserError(f"`{shlex.join(cmd)}` failed: {(result.stderr or result.stdout).strip()}")
    return result


def check_request(entry: dict) -> None:
    """Refuse what sbatch would refuse or run wrongly: no SLURM, an unknown partition, GPUs per node that
    are not one per device."""
    slurm = entry.get("slurm") or {}
    _slurm("sbatch", "--version")
    partition = slurm.get("partition")
    if partition is not None and not _slurm("sinfo", "-h", "-p", str(partition), "-o", "%P").stdout.strip():
        known = " ".join(_slurm("sinfo", "-h", "-o", "%P").stdout.split())
        raise UserError(f"{entry['name']}: SLURM has no partition {partition!r} (it has: {known}).")
    gpus = slurm.get("gpus_per_node")
    if gpus is not None and gpus != entry.get("devices", 1):
        raise UserError(
            f"{entry['name']}: slurm.gpus_per_node is {gpus} but devices is {entry.get('devices', 1)}; "
            "one task trains on each GPU, so make them equal."
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
                      ("gpus_per_node", "gpus-per-node"), ("cpus_per_task", "cpus-per-task")):  # fmt: skip
        if key in slurm:
            options.append(f"--{flag}={slurm[key]}")
    return options + [str(a) for a in slurm.get("sbatch_args", [])]


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
        "# Near the time limit (or on `scancel --batch --signal=USR1`) requeue: the next start resumes from",
        "# the newest checkpoint that loads. SLURM ends this job as it requeues it.",
        "requeued=",
        'trap \'echo "requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID" && requeued=1\' USR1',
        f"{shlex.join(record)} --event started",
        f"srun --label --kill-on-bad-exit=1 {shlex.join(command)} &",  # each line names its task
        "pid=$!",
        "# `wait` also returns when a trap runs: wait again while srun lives.",
        'while :; do wait "$pid"; code=$?; kill -0 "$pid" 2>/dev/null || break; done',
        '[ -n "$requeued" ] && exit 0',
        f'{shlex.join(record)} --event finished --exit_code "$code"',
        'exit "$code"',
        "",
    ]
    return "\n".join(lines)


def submit(script: Path) -> str:
    """Submit a batch script; its job id."""
    return _slurm("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]


def job_state(job: str | int | None) -> JobState | None:
    """The job's state while SLURM still lists it (pending, running, requeued...), else None."""
    if job is None:
        return None
    result = _slurm("squeue", "-h", "-j", str(job), "-o", "%T|%R", check=False)
    line = result.stdout.strip()
    if result.returncode != 0 or not line:
        return None
    state, where = line.splitlines()[0].split("|", 1)
    return JobState(state, where)


def cancel_job(job: str | int) -> None:
    _slurm("scancel", str(job))
