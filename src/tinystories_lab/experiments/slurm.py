"""`environment: slurm`: one batch job per experiment, written into its run folder and submitted with sbatch.

The job runs one task per device with srun (Fabric takes the ranks from SLURM), resumes from the newest
checkpoint that loads, asks for a signal before its time limit and requeues itself on it, and records its
own start and outcome in the queue (`tinystories-lab slurm-record`).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from tinystories_lab.errors import UserError
from tinystories_lab.experiments.runs import out_dir_of
from tinystories_lab.preemption import PREEMPTED_EXIT

REQUEUE_SIGNAL_S = 120  # ask for SIGUSR1 this long before the time limit, to save and requeue in time
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


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
            "a cluster on this machine with `make slurm-local`."
        )
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
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
