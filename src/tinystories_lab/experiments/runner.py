"""The runner: take an experiment from the queue, run `litgpt pretrain` with resume, record the outcome."""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Literal, NamedTuple

from tinystories_lab.configs import model_config, parse_config
from tinystories_lab.data.tokenizer import load_tokenizer
from tinystories_lab.errors import UserError
from tinystories_lab.experiments.queue import RUNNER_FIELDS, Queue, find
from tinystories_lab.experiments.runs import (
    RunLock,
    final_checkpoint,
    newest_checkpoint,
    out_dir_of,
    step_checkpoints,
)

Logger = Literal["csv", "tensorboard", "wandb"]


class Outcome(NamedTuple):
    """How a run ended: status 'done', 'failed' or 'stopped' (by a signal), and the exit code to report."""

    name: str
    status: str
    code: int


ERROR_LINES = 15  # log lines kept in a failed entry


def is_runnable(entry: dict, include_optional: bool = False) -> bool:
    """todo entries, and `running` ones whose runner died (their run lock is free)."""
    if entry.get("optional") and not include_optional:
        return False
    if entry["status"] == "todo":
        return True
    return entry["status"] == "running" and not RunLock(out_dir_of(entry)).is_held()


def claim(
    queue: Queue, name: str | None, include_optional: bool, args: list[str], logger: Logger | None
) -> tuple[dict, RunLock] | None:
    """Under the queue lock, take the named (or next runnable) entry, check it can start, mark it running.

    The extra arguments and logger a run starts with are recorded in its entry (`run_args`,
    `run_logger`) and reused when it resumes without any, so a resumed run trains to the same
    max_tokens and LR schedule. Nothing is written when the entry is unknown, done, running
    elsewhere, or not ready to start.
    """
    with queue.edit() as entries:
        if name is not None:
            entry = find(entries, name)
            if entry["status"] == "done":
                raise UserError(f"{name} is already done; `make reset MODEL={name}` to train it again.")
            if entry["status"] == "running" and RunLock(out_dir_of(entry)).is_held():
                raise UserError(f"{name} is running already (pid {entry.get('pid')} on {entry.get('host')}).")
            candidates = [entry]
        else:
            candidates = [e for e in entries if is_runnable(e, include_optional)]
        for entry in candidates:
            lock = RunLock(out_dir_of(entry))
            if not lock.acquire():  # another runner got there first
                continue
            run_args = args or list(entry.get("run_args", []))
            run_logger = logger or entry.get("run_logger")
            try:
                check_ready(entry, run_args)
            except BaseException:
                lock.release()
                raise
            if entry["status"] == "running":
                print(
                    f"{entry['name']} was left running by pid {entry.get('pid')} on {entry.get('host')}, "
                    "which is gone: resuming it."
                )
            if (run_args and not args) or (run_logger and not logger):
                shown = shlex.join(run_args + ([f"--logger_name={run_logger}"] if run_logger else []))
                print(f"{entry['name']}: resuming with the arguments it started with: {shown}")
            for field in ("finished_at", "exit_code", "error", "note", "log", "run_args", "run_logger"):
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
                started_at=now(),
            )
            return dict(entry), lock
    return None


def launch_command(entry: dict, resume: str, logger: Logger | None, args: list[str]) -> list[str]:
    """The `litgpt pretrain` command line for an entry."""
    cmd = [
        sys.executable, "-m", "litgpt", "pretrain",
        "--config", str(entry["config"]),
        f"--devices={entry.get('devices', 1)}",
        f"--num_nodes={entry.get('num_nodes', 1)}",
        f"--out_dir={out_dir_of(entry)}",
        f"--resume={resume}",
    ]  # fmt: skip
    if logger:
        cmd.append(f"--logger_name={logger}")
    return cmd + list(entry.get("args", [])) + args


def check_ready(entry: dict, args: list[str]) -> None:
    """Refuse to start when the config does not parse or its tokenizer or token files are missing."""
    cfg = parse_config(entry["config"], *entry.get("args", []), *args)
    if cfg.tokenizer_dir is None:
        raise UserError(f"{entry['config']} sets no tokenizer_dir; the TinyStories data module needs one.")
    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    cfg.data.connect(
        tokenizer, batch_size=cfg.train.micro_batch_size, max_seq_length=cfg.train.max_seq_length
    )
    cfg.data.prepare_data()  # raises with the command that makes the token files
    vocab = model_config(cfg).padded_vocab_size
    if tokenizer.vocab_size > vocab:
        raise UserError(
            f"The tokenizer in {cfg.tokenizer_dir} has {tokenizer.vocab_size:,} tokens but {entry['config']} "
            f"has a vocabulary of {vocab:,}; raise model_config.padded_vocab_size or use a smaller tokenizer."
        )


def choose_resume(out_dir: Path) -> str:
    """`auto` when the newest checkpoint loads; otherwise the newest one that does, saying so."""
    checkpoints = step_checkpoints(out_dir)
    for i, ckpt in enumerate(checkpoints):
        if ckpt.is_loadable():
            if i == 0:
                return "auto"
            skipped = ", ".join(c.folder.name for c in checkpoints[:i])
            print(
                f"Checkpoint {skipped} does not load (truncated or corrupt): "
                f"resuming from {ckpt.folder.name}."
            )
            return str(ckpt.path)
    if checkpoints:
        print(f"No checkpoint in {out_dir} loads (truncated or corrupt): training from the start.")
        return "false"
    return "auto"


def child_env(logger: Logger | None, out_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    if logger == "wandb":
        env.setdefault("WANDB_DIR", str(out_dir))
        env.setdefault("WANDB_PROJECT", "tinystories-lab")
        if not (env.get("WANDB_API_KEY") or _netrc_has("api.wandb.ai")) and "WANDB_MODE" not in env:
            print("No Weights & Biases account configured: logging offline (`wandb sync` uploads it later).")
            env["WANDB_MODE"] = "offline"
    return env


def run_entry(queue: Queue, entry: dict, lock: RunLock) -> Outcome:
    """Run one claimed entry to its end and record the outcome in the queue; then release its lock."""
    try:
        return _run_and_record(queue, entry, lock)
    finally:  # only now: until the outcome is written, no other runner may take the entry as stale
        lock.release()


def _run_and_record(queue: Queue, entry: dict, lock: RunLock) -> Outcome:
    name = entry["name"]
    logger = entry.get("run_logger")
    out_dir = out_dir_of(entry)
    resume = choose_resume(out_dir)
    log_path = out_dir / "logs" / f"{datetime.now():%Y%m%d_%H%M%S}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(entry, resume, logger, list(entry.get("run_args", [])))
    with queue.edit() as entries:
        find(entries, name)["log"] = str(log_path)

    interrupted: list[int] = []
    tail: deque[str] = deque(maxlen=ERROR_LINES)
    with open(log_path, "w") as log:
        header = f"$ {shlex.join(cmd)}\n# host {socket.gethostname()}, runner pid {os.getpid()}, {now()}\n"
        print(header, end="", flush=True)
        log.write(header)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env=child_env(logger, out_dir), pass_fds=(lock.fd,), preexec_fn=_die_with_parent,
        )  # fmt: skip

        def forward(signum, _frame):
            interrupted.append(signum)
            proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                tail.append(line.rstrip())
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    if code < 0:  # killed by a signal (e.g. the kernel's OOM killer): report it as a shell would
        code = 128 - code
    if interrupted:
        signame = signal.Signals(interrupted[0]).name
        note = f"stopped by {signame}; the next run-next resumes it from its last checkpoint"
        _finish(queue, name, status="todo", exit_code=code, note=note)
        print(f"{name}: stopped by {signame}; `make run-next` resumes it.")
        return Outcome(name, "stopped", 128 + interrupted[0])
    last = newest_checkpoint(out_dir)
    step = int(last.load()["step_count"]) if last and last.is_loadable() else None
    if code == 0 and final_checkpoint(out_dir):
        _finish(queue, name, status="done", exit_code=0, last_step=step)
        print(f"{name}: done ({out_dir}/final).")
        return Outcome(name, "done", 0)
    _finish(queue, name, status="failed", exit_code=code, last_step=step, error="\n".join(tail))
    print(f"{name}: failed with exit code {code}; log: {log_path}", file=sys.stderr)
    return Outcome(name, "failed", code or 1)


def _finish(queue: Queue, name: str, status: str, **fields) -> None:
    try:
        with queue.edit(check_configs=False) as entries:
            entry = find(entries, name)
            entry["status"] = status
            entry["finished_at"] = now()
            entry.update({k: v for k, v in fields.items() if v is not None})
    except UserError as e:  # the file was broken by hand during the run: say what could not be written
        print(
            f"Could not record that {name} is {status} in {queue.path}: {e}\n"
            f"Fix the file, then set the status of {name} to {status} by hand.",
            file=sys.stderr,
        )


def run_next(
    queue: Path = Path("experiments.yaml"),
    args: str = "",
    logger: Logger | None = None,
    include_optional: bool = False,
) -> None:
    """Run the next runnable experiment: the first `todo` one, or a `running` one whose runner died.

    Args:
        queue: The queue file.
        args: Extra `litgpt pretrain` arguments, e.g. "--train.max_tokens=1000000".
        logger: Logger to use instead of the config's: csv, tensorboard or wandb (offline without an account).
        include_optional: Also consider entries marked `optional: true` (the baselines).
    """
    outcome = _run_one(Queue(queue), None, args, logger, include_optional)
    if outcome is None:
        print(f"Nothing to run in {queue}.")
    elif outcome.code:
        sys.exit(outcome.code)


def run_specific(
    model: str, queue: Path = Path("experiments.yaml"), args: str = "", logger: Logger | None = None
) -> None:
    """Run (or resume) one experiment by name, optional ones included.

    Args:
        model: The experiment's name in the queue.
        queue: The queue file.
        args: Extra `litgpt pretrain` arguments, e.g. "--train.max_tokens=1000000".
        logger: Logger to use instead of the config's: csv, tensorboard or wandb.
    """
    outcome = _run_one(Queue(queue), model, args, logger, include_optional=True)
    if outcome.code:
        sys.exit(outcome.code)


def run_all(
    queue: Path = Path("experiments.yaml"),
    args: str = "",
    logger: Logger | None = None,
    include_optional: bool = False,
) -> None:
    """Run every runnable experiment in order, going on past failures; exit non-zero if any failed.

    Args:
        queue: The queue file.
        args: Extra `litgpt pretrain` arguments for every run.
        logger: Logger to use instead of the configs': csv, tensorboard or wandb.
        include_optional: Also run entries marked `optional: true` (the baselines).
    """
    q = Queue(queue)
    outcomes: list[Outcome] = []
    try:
        while (outcome := _run_one(q, None, args, logger, include_optional)) is not None:
            outcomes.append(outcome)
            if outcome.status == "stopped":
                break
    except UserError:  # the next entry cannot start: say what ran before the refusal
        _print_outcomes(queue, outcomes)
        raise
    if not outcomes:
        print(f"Nothing to run in {queue}.")
        return
    _print_outcomes(queue, outcomes)
    if outcomes[-1].status == "stopped":
        sys.exit(outcomes[-1].code)
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)


def _print_outcomes(queue: Path, outcomes: list[Outcome]) -> None:
    if outcomes:
        print(f"\nrun-all on {queue}:")
        for o in outcomes:
            print(f"  {o.name}: {o.status}" + (f" (exit {o.code})" if o.code else ""))


def _run_one(
    queue: Queue, name: str | None, args: str, logger: Logger | None, include_optional: bool
) -> Outcome | None:
    claimed = claim(queue, name, include_optional, shlex.split(args), logger)
    if claimed is None:
        return None
    entry, lock = claimed
    return run_entry(queue, entry, lock)


def reset(model: str, queue: Path = Path("experiments.yaml"), delete_checkpoints: bool = False) -> None:
    """Put an experiment back to `todo`. Its checkpoints are kept (the next run resumes from them)
    unless `delete_checkpoints` is set, which deletes its whole folder.

    Args:
        model: The experiment's name in the queue.
        queue: The queue file.
        delete_checkpoints: Delete experiments/tiny_stories/<model>/ (checkpoints, logs, evaluations).
    """
    import shutil

    q = Queue(queue)
    with q.edit() as entries:
        entry = find(entries, model)
        out_dir = out_dir_of(entry)
        if RunLock(out_dir).is_held():
            raise UserError(f"{model} is running now (pid {entry.get('pid')}); stop it before resetting it.")
        entry["status"] = "todo"
        for field in RUNNER_FIELDS:
            entry.pop(field, None)
        if delete_checkpoints and out_dir.exists():
            if not any((out_dir / p).exists() for p in ("runner.lock", "logs", "final")) and not any(
                out_dir.glob("step-*")
            ):
                raise UserError(
                    f"{out_dir} does not look like a run folder; delete it by hand if you mean it."
                )
            shutil.rmtree(out_dir)
            print(f"Deleted {out_dir}.")
    kept = "" if delete_checkpoints else " (checkpoints kept: the next run resumes from them)"
    print(f"{model} is back to todo{kept}.")


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the runner dies, so no orphan keeps training (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
