"""How runs end, written into the queue: the outcome's fields (retried on a full disk), and the lines that
say what ran."""

from __future__ import annotations

import errno
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

from tinystories_lab.errors import UserError
from tinystories_lab.experiments.launch import failure_reason, now
from tinystories_lab.experiments.queue import Queue, find, load_entries
from tinystories_lab.experiments.runs import final_checkpoint, newest_loadable

ERROR_LINES = 15  # log lines kept in a failed entry
DISK_FULL_RETRY_S, DISK_FULL_WAIT_S = 5, 600  # retrying to record an outcome on a full disk


class Outcome(NamedTuple):
    """How a run ended: 'done', 'failed', 'stopped' (by a signal) or 'submitted' (a SLURM job), and the
    exit code to report."""

    name: str
    status: str
    code: int


def record(queue: Queue, name: str, **fields) -> None:
    """Set fields of an entry in the queue file (those given as None are left as they are)."""
    with queue.edit(check_configs=False) as entries:
        find(entries, name).update({k: v for k, v in fields.items() if v is not None})


def finish(queue: Queue, name: str, status: str, **fields) -> None:
    """Record an outcome. A queue broken by hand during the run, or a disk that stays full, is reported
    with the status to set by hand; a full disk is retried for a while first."""
    waited = 0
    while True:
        try:
            record(queue, name, status=status, finished_at=now(), **fields)
            return
        except OSError as e:
            if e.errno != errno.ENOSPC or waited >= DISK_FULL_WAIT_S:
                problem = e.strerror
            else:
                if not waited:
                    print(
                        f"Disk full: cannot record that {name} is {status} in {queue.path}; retrying every "
                        f"{DISK_FULL_RETRY_S} s for {DISK_FULL_WAIT_S // 60} min: free some space.",
                        file=sys.stderr,
                        flush=True,
                    )
                time.sleep(DISK_FULL_RETRY_S)
                waited += DISK_FULL_RETRY_S
                continue
        except UserError as e:  # the file was broken by hand during the run
            problem = str(e)
        print(
            f"Could not record that {name} is {status} in {queue.path}: {problem}\n"
            f"Fix that, then set the status of {name} to {status} by hand.",
            file=sys.stderr,
        )
        return


def record_outcome(queue: Queue, name: str, out_dir: Path, code: int, tail: list[str], log: Path) -> Outcome:
    """Write how a training process ended: `done` when it exited 0 with a final checkpoint, else `failed`
    with the exit code and the log's last lines."""
    newest, _ = newest_loadable(out_dir)
    step = newest.step_count() if newest else None
    if code == 0 and final_checkpoint(out_dir):
        finish(queue, name, status="done", exit_code=0, last_step=step)
        print(f"{name}: done ({out_dir}/final).")
        return Outcome(name, "done", 0)
    reason = failure_reason(tail)
    finish(
        queue, name, status="failed", exit_code=code, last_step=step, failure_reason=reason,
        error="\n".join(tail[-ERROR_LINES:]),
    )  # fmt: skip
    print(f"{name}: failed with exit code {code}" + (f" ({reason})" if reason else "") + f"; log: {log}",
          file=sys.stderr)  # fmt: skip
    return Outcome(name, "failed", code or 1)


def record_stopped(queue: Queue, name: str, code: int, signum: int) -> Outcome:
    """A run stopped by SIGINT or SIGTERM goes back to `todo`: the next run-next resumes it."""
    signame = signal.Signals(signum).name
    note = f"stopped by {signame}; the next run-next resumes it from its last checkpoint"
    finish(queue, name, status="todo", exit_code=code, note=note)
    print(f"{name}: stopped by {signame}; `make run-next` resumes it.")
    return Outcome(name, "stopped", 128 + signum)


def names(queues: list[Path]) -> str:
    return ", ".join(map(str, queues))


def failed_hint(queues: list[Path]) -> str:
    failed = [e for e in load_entries(queues) if e["status"] == "failed"]
    if not failed:
        return ""
    names = ", ".join(
        f"{e['name']} (exit {e.get('exit_code')}"
        + (f": {e['failure_reason']}" if e.get("failure_reason") else "")
        + ")"
        for e in failed
    )
    return (
        f" Failed: {names}; `make reset MODEL=<name>` puts one back to todo, keeping its checkpoints and "
        "arguments."
    )


def print_outcomes(queues: list[Path], outcomes: list[Outcome]) -> None:
    if outcomes:
        print(f"\nrun-all on {names(queues)}:")
        for o in outcomes:
            print(f"  {o.name}: {o.status}" + (f" (exit {o.code})" if o.code else ""))
