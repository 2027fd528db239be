"""The runner: take an experiment from the queue, train it with resume (local processes or a SLURM job),
record the outcome."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import Literal, NamedTuple

from tinystories_lab import probe
from tinystories_lab.configs import parse_config
from tinystories_lab.errors import UserError
from tinystories_lab.experiments import checks, launch, outcomes, slurm
from tinystories_lab.experiments.gpus import claim_gpus
from tinystories_lab.experiments.launch import Logger
from tinystories_lab.experiments.locks import Lock, RunLock, run_processes
from tinystories_lab.experiments.outcomes import Outcome, finish, record
from tinystories_lab.experiments.queue import (
    RUN_QUEUES,
    RUN_RECORD,
    RUNNER_FIELDS,
    Queue,
    find,
    queue_of,
    set_seeds,
)
from tinystories_lab.experiments.runs import (
    check_run_folder,
    delete_checkpoints,
    out_dir_of,
    write_run_file,
)


class Claimed(NamedTuple):
    """An entry taken for a run: its fields as now marked running, its lock, its fields before the claim
    and whether its run folder was made by the claim (what `unclaim` restores)."""

    entry: dict
    lock: RunLock
    before: dict
    created: bool


def claim(
    queue: Queue,
    name: str | None,
    include_optional: bool,
    args: list[str],
    logger: Logger | None,
    restart: bool = False,
    micro_batch_size: Literal["auto"] | None = None,
    resize: bool = False,
) -> Claimed | None:
    """Under the queue lock, take the named (or next runnable) entry, check it can start, mark it running.

    The extra arguments and logger a run starts with are recorded in its entry (`run_args`,
    `run_logger`) and reused when it resumes without any, so a resumed run trains to the same
    max_tokens and LR schedule. Nothing is written, and no run folder is left behind, when the entry is
    unknown, done, running elsewhere, or not ready to start.
    """
    with queue.edit() as entries:
        if name is not None:
            entry = find(entries, name)
            if entry["status"] == "done" and not restart:
                raise UserError(f"{name} is already done; `make reset MODEL={name}` to train it again.")
            if entry["status"] == "running" and checks.is_alive(entry):
                raise UserError(f"{name} is running already ({checks.where_running(entry)}).")
            candidates = [entry]
        else:
            candidates = [e for e in entries if checks.is_runnable(e, include_optional)]
        for entry in candidates:
            out_dir = out_dir_of(entry)
            check_run_folder(out_dir, entry["name"], queue.path)  # before the lock file goes into it
            created = not out_dir.exists()
            lock = RunLock(out_dir)
            if not lock.acquire():  # another runner got there first
                continue
            run_args = args or list(entry.get("run_args", []))
            run_logger = logger or entry.get("run_logger")
            try:
                checks.check_ready(entry, run_args, restart, micro_batch_size, resize)
            except BaseException:
                lock.release()
                if created:  # leave no empty folder behind a refusal
                    lock.path.unlink(missing_ok=True)
                    out_dir.rmdir()
                raise
            if entry["status"] == "running":
                where = checks.where_running(entry)
                print(f"{entry['name']} was left running ({where}), which is gone: resuming it.")
            if (run_args and not args) or (run_logger and not logger):
                shown = shlex.join(run_args + ([f"--logger_name={run_logger}"] if run_logger else []))
                print(f"{entry['name']}: resuming with the arguments it started with: {shown}")
            before = dict(entry)  # in order: an undone claim leaves the file as it was
            for field in (*RUN_RECORD, "run_args", "run_logger"):
                entry.pop(field, None)
            if run_args:
                entry["run_args"] = run_args
            if run_logger:
                entry["run_logger"] = run_logger
            entry.update(
                status="running",
                host=socket.gethostname(),
                pid=os.getpid(),
                attempts=int(entry.get("attempts", 0)) + 1,
                started_at=launch.now(),
            )
            return Claimed(dict(entry), lock, before, created)
    return None


def unclaim(queue: Queue, claimed: Claimed) -> None:
    """Undo a claim whose run was refused before training: the entry's fields as they were, and no run folder
    the claim made."""
    with queue.edit(check_configs=False) as entries:
        entry = find(entries, claimed.entry["name"])
        for field in [f for f in entry if f not in claimed.before]:
            del entry[field]
        for position, (field, value) in enumerate(claimed.before.items()):
            if field in entry:
                entry[field] = value
            else:
                entry.insert(position, field, value)
    claimed.lock.release()
    if claimed.created:
        shutil.rmtree(out_dir_of(claimed.entry), ignore_errors=True)


def run_entry(
    queue: Queue, claimed: Claimed, restart: bool = False, micro_batch_size: Literal["auto"] | None = None
) -> Outcome:
    """Run (or submit) one claimed entry and record the outcome in the queue; then release its lock.

    A refusal before training starts (no free GPU, sbatch refusing the job, ...) undoes the claim."""
    entry, lock = claimed.entry, claimed.lock
    out_dir = out_dir_of(entry)
    gpus, gpu_locks = None, []
    try:
        try:
            if not slurm.is_slurm(entry):
                gpus, gpu_locks = claim_gpus(entry.get("devices", 1), entry.get("gpus"))
            if micro_batch_size == "auto":
                choose_micro_batch(queue, entry, launch.child_env(entry.get("run_logger"), out_dir, gpus))
            write_run_file(out_dir, entry["name"], queue.path, entry.get("seed"))
            if restart:
                delete_checkpoints(out_dir)
            if slurm.is_slurm(entry):
                return slurm.submit_entry(queue, entry)
        except UserError:
            for gpu_lock in gpu_locks:
                gpu_lock.release()
            unclaim(queue, claimed)
            raise
        return _run_local(queue, entry, lock, gpus, gpu_locks)
    finally:  # only now: until the outcome is written, no other runner may take the entry as stale
        lock.release()


def _run_local(queue: Queue, entry: dict, lock: RunLock, gpus: str | None, gpu_locks: list[Lock]) -> Outcome:
    name, out_dir = entry["name"], out_dir_of(entry)
    logger = entry.get("run_logger")
    log_path = launch.log_path_in(out_dir)
    cmd = launch.launch_command(entry, logger, list(entry.get("run_args", [])))
    record(queue, name, log=str(log_path), cuda_visible_devices=gpus)
    note = f"# CUDA_VISIBLE_DEVICES={gpus}\n" if gpus is not None else ""
    try:
        env, fds = launch.child_env(logger, out_dir, gpus), (lock.fd, *(g.fd for g in gpu_locks))
        ended = launch.supervise(cmd, log_path, env, fds, note, ranks_of=out_dir)
    finally:
        for gpu_lock in gpu_locks:
            gpu_lock.release()
    if ended.stopped_by:
        return outcomes.record_stopped(queue, name, ended.code, ended.stopped_by)
    return outcomes.record_outcome(queue, name, out_dir, ended.code, ended.tail, log_path)


def choose_micro_batch(queue: Queue, entry: dict, env: dict[str, str]) -> None:
    """`MICRO=auto`: measure the micro batch this machine fits and add it to the run's recorded arguments, so
    a resume keeps it. Gradient accumulation keeps the global batch: the training is the same."""
    chosen = [a for a in entry.get("run_args", []) if a.startswith("--train.micro_batch_size=")]
    if chosen:  # a resume: the micro batch counts the iterations its checkpoints recorded
        print(f"{entry['name']}: keeping the micro batch it was started with ({chosen[-1]}).")
        return
    micro, why, steps = probe.micro_batch_of(entry, env)
    entry["run_args"] = [*entry.get("run_args", []), f"--train.micro_batch_size={micro}"]
    record(queue, entry["name"], run_args=entry["run_args"])
    print(f"{entry['name']}: micro batch {micro} ({why}); {steps} accumulation steps.")


def run_next(
    queues: list[Path] | None = None,
    args: str = "",
    logger: Logger | None = None,
    include_optional: bool = False,
    restart: bool = False,
    wait: bool = False,
    micro_batch_size: Literal["auto"] | None = None,
    resize: bool = False,
) -> None:
    """Run the next runnable experiment: the first `todo` one, or a `running` one whose runner died.

    Args:
        queues: Queue files, in order: the next experiment is taken from the first that has one (default:
            experiments.yaml).
        args: Extra `litgpt pretrain` arguments, e.g. "--train.max_tokens=1000000".
        logger: Logger to use instead of the config's: csv, tensorboard or wandb (offline without an account).
        include_optional: Also consider entries marked `optional: true` (the baselines).
        restart: Train from zero, deleting the experiment's checkpoints first.
        wait: For a SLURM experiment, block until its job has ended (local runs always block).
        micro_batch_size: 'auto': the largest micro batch whose real step fits this GPU (on a CPU, 16),
            recorded with the run's arguments; the global batch, hence the training, stays the same.
        resize: Resume even though the world size, global or micro batch differs from the checkpoint's
            (the training changes: other optimizer steps).
    """
    queues = queues or RUN_QUEUES
    for path in queues:
        outcome = _run_one(
            Queue(path), None, args, logger, include_optional, restart, wait, micro_batch_size, resize
        )
        if outcome is not None:
            break
    if outcome is None:
        print(f"Nothing to run in {outcomes.names(queues)}.{outcomes.failed_hint(queues)}")
    elif outcome.code:
        sys.exit(outcome.code)


def run_specific(
    model: str,
    queues: list[Path] | None = None,
    args: str = "",
    logger: Logger | None = None,
    restart: bool = False,
    wait: bool = False,
    micro_batch_size: Literal["auto"] | None = None,
    resize: bool = False,
    seeds: int | None = None,
) -> None:
    """Run (or resume) one experiment by name, optional ones included; with `seeds`, each of its seeds.

    Args:
        model: The experiment's name in the queues (or one seed's run: `<name>-seed<s>`).
        queues: Queue files, searched in order (default: experiments.yaml).
        args: Extra `litgpt pretrain` arguments, e.g. "--train.max_tokens=1000000".
        logger: Logger to use instead of the config's: csv, tensorboard or wandb.
        restart: Train from zero, deleting the experiment's checkpoints first (also for a done one).
        wait: For a SLURM experiment, block until its job has ended (local runs always block).
        micro_batch_size: 'auto': the largest micro batch whose real step fits this GPU (on a CPU, 16),
            recorded with the run's arguments; the global batch, hence the training, stays the same.
        resize: Resume even though the world size, global or micro batch differs from the checkpoint's
            (the training changes: other optimizer steps).
        seeds: Give the experiment this many seeds (its `seeds:` in the queue: those it has, then the next
            integers after its config's seed) and train or resume each one that is not done yet.
    """
    queues = queues or RUN_QUEUES
    queue = queue_of(model, queues)
    if seeds is None:
        outcome = _run_one(queue, model, args, logger, True, restart, wait, micro_batch_size, resize)
        if outcome.code:
            sys.exit(outcome.code)
        return
    entry = find(queue.load(), model)
    base = parse_config(entry["config"], *entry.get("args", [])).seed
    ran = []
    for name in set_seeds(queue, model, seeds, base):
        if find(queue.load(), name)["status"] == "done" and not restart:
            print(f"{name} is done already.")
            continue
        ran.append(_run_one(queue, name, args, logger, True, restart, wait, micro_batch_size, resize))
        if ran[-1].status == "stopped":
            break
    for o in ran:
        print(f"{o.name}: {o.status}" + (f" (exit {o.code})" if o.code else ""))
    failed = [o for o in ran if o.code]
    if failed:
        sys.exit(failed[-1].code)


def run_all(
    queues: list[Path] | None = None,
    args: str = "",
    logger: Logger | None = None,
    include_optional: bool = False,
    wait: bool = False,
    micro_batch_size: Literal["auto"] | None = None,
    resize: bool = False,
) -> None:
    """Run every runnable experiment in order, going on past failures; exit non-zero if any failed.

    SLURM experiments are submitted one job each and not waited for, unless `wait`.

    Args:
        queues: Queue files, run one after the other in order (default: experiments.yaml).
        args: Extra `litgpt pretrain` arguments for every run.
        logger: Logger to use instead of the configs': csv, tensorboard or wandb.
        include_optional: Also run entries marked `optional: true` (the baselines).
        wait: Block until every submitted SLURM job has ended.
        micro_batch_size: 'auto': for each run, the largest micro batch whose real step fits this GPU.
        resize: Resume runs whose world size, global or micro batch differs from their checkpoint's.
    """
    queues = queues or RUN_QUEUES
    ran: list[Outcome] = []
    try:
        for q in map(Queue, queues):
            while (
                outcome := _run_one(
                    q, None, args, logger, include_optional, micro_batch_size=micro_batch_size, resize=resize
                )
            ) is not None:
                ran.append(outcome)
                if outcome.status == "stopped":
                    break
            if ran and ran[-1].status == "stopped":
                break
    except UserError:  # the next entry cannot start: say what ran before the refusal
        outcomes.print_outcomes(queues, ran)
        raise
    if wait:
        ran = [slurm.wait_for_job(queue_of(o.name, queues), o.name) if o.status == "submitted" else o
               for o in ran]  # fmt: skip
    if not ran:
        print(f"Nothing to run in {outcomes.names(queues)}.{outcomes.failed_hint(queues)}")
        return
    outcomes.print_outcomes(queues, ran)
    if ran[-1].status == "stopped":
        sys.exit(ran[-1].code)
    if any(o.status == "failed" for o in ran):
        sys.exit(1)


def _run_one(
    queue: Queue,
    name: str | None,
    args: str,
    logger: Logger | None,
    include_optional: bool,
    restart: bool = False,
    wait: bool = False,
    micro_batch_size: Literal["auto"] | None = None,
    resize: bool = False,
) -> Outcome | None:
    claimed = claim(
        queue, name, include_optional, shlex.split(args), logger, restart, micro_batch_size, resize
    )
    if claimed is None:
        return None
    outcome = run_entry(queue, claimed, restart, micro_batch_size)
    if wait and outcome.status == "submitted":
        return slurm.wait_for_job(queue, claimed.entry["name"])
    return outcome


def reset(model: str, queues: list[Path] | None = None, delete_run_folder: bool = False) -> None:
    """Put an experiment back to `todo`. Its checkpoints and the arguments it ran with are kept (the next
    run resumes from them) unless `delete_run_folder` is set, which deletes its whole run folder.

    Args:
        model: The experiment's name in the queues.
        queues: Queue files, searched in order (default: experiments.yaml).
        delete_run_folder: Delete its run folder (checkpoints, logs, evaluations): only a folder the
            runner made for this experiment.
    """
    q = queue_of(model, queues or RUN_QUEUES)
    with q.edit() as entries:
        entry = find(entries, model)
        out_dir = out_dir_of(entry)
        if not checks.accessible(out_dir):
            raise UserError(f"{out_dir} is not accessible (permission denied); fix its permissions first.")
        if entry["status"] == "running" and checks.is_alive(entry):
            raise UserError(
                f"{model} is running now ({checks.where_running(entry)}); `make cancel MODEL={model}` first."
            )
        entry["status"] = "todo"
        kept = () if delete_run_folder else ("attempts", "run_args", "run_logger")
        for field in RUNNER_FIELDS:
            if field not in kept:
                entry.pop(field, None)
        if delete_run_folder and (out_dir.exists() or out_dir.is_symlink()):
            checks.check_deletable(out_dir, model, q)
            shutil.rmtree(out_dir)
            print(f"Deleted {out_dir}.")
    kept = "" if delete_run_folder else " (checkpoints and arguments kept: the next run resumes from them)"
    print(f"{model} is back to todo{kept}.")


def cancel(model: str, queues: list[Path] | None = None) -> None:
    """Stop a running experiment and put it back to `todo`: cancel its SLURM job, or stop its local runner.

    Args:
        model: The experiment's name in the queues.
        queues: Queue files, searched in order (default: experiments.yaml).
    """
    q = queue_of(model, queues or RUN_QUEUES)
    entry = find(q.load(), model)
    if entry["status"] != "running" or not checks.is_alive(entry):
        raise UserError(f"{model} is not running (status {entry['status']}).")
    if slurm.is_slurm(entry):
        slurm.cancel_job(entry["slurm_job"])
        finish(q, model, status="todo", note=f"SLURM job {entry['slurm_job']} cancelled")
        print(f"{model}: cancelled SLURM job {entry['slurm_job']}; back to todo.")
        return
    if entry.get("host") != socket.gethostname():
        raise UserError(f"{model} runs on {entry.get('host')}; cancel it there.")
    # Signal only processes proven to be this run's (they hold its locks): a pid may have been reused.
    processes = run_processes(out_dir_of(entry))
    if entry.get("pid") in processes:
        pids = [entry["pid"]]  # the runner stops training and puts the entry back
    else:  # the runner is gone: stop what is left of the run (training processes it left behind)
        pids = list(processes)
    stopped = launch.terminate(pids)
    if not stopped:
        raise UserError(
            f"{model} is not running: no process holds its locks any more (status {entry['status']})."
        )
    if pids == [entry.get("pid")]:
        print(f"{model}: sent SIGTERM to its runner (pid {entry['pid']}); it goes back to todo when stopped.")
        return
    finish(q, model, status="todo", note=f"runner gone; stopped processes {', '.join(stopped)}")
    print(
        f"{model}: its runner (pid {entry.get('pid')}) is gone; stopped pid {', '.join(stopped)}; now todo."
    )


def slurm_record(
    model: str,
    queues: list[Path] | None = None,
    event: Literal["started", "finished"] = "finished",
    exit_code: int = 0,
) -> None:
    """Record a SLURM job's start or end in its experiment's entry (the batch scripts call this).

    Args:
        model: The experiment's name in the queues.
        queues: Queue files, searched in order (default: experiments.yaml).
        event: 'started' (the node it runs on) or 'finished' (done or failed, from the exit code).
        exit_code: The training step's exit code, for 'finished'.
    """
    q = queue_of(model, queues or RUN_QUEUES)
    entry = find(q.load(), model)
    if event == "started":
        slurm.record_start(q, entry)
        return
    log = Path(entry.get("log") or "")
    tail = log.read_text(errors="replace").splitlines()[-launch.TAIL_LINES :] if log.is_file() else []
    outcomes.record_outcome(q, model, out_dir_of(entry), exit_code, tail, log)
