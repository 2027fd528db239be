"""The runner: take an experiment from the queue, train it with resume (local processes or a SLURM job),
record the outcome."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Literal, NamedTuple

from tinystories_lab.bench.memory import auto_micro_batch
from tinystories_lab.configs import check_training, model_config, parse_config
from tinystories_lab.data.tokenizer import load_tokenizer
from tinystories_lab.errors import UserError
from tinystories_lab.experiments import slurm
from tinystories_lab.experiments.gpus import claim_gpus
from tinystories_lab.experiments.locks import Lock, RunLock, run_is_alive
from tinystories_lab.experiments.queue import (
    RUN_QUEUES,
    RUN_RECORD,
    RUNNER_FIELDS,
    Queue,
    find,
    load_entries,
    queue_of,
)
from tinystories_lab.experiments.runs import (
    final_checkpoint,
    newest_loadable,
    out_dir_of,
    resume_point,
    run_file_names,
    step_checkpoints,
    world_size,
    write_run_file,
)
from tinystories_lab.pretrain import check_resumable, choose_strategy, die_with_parent

Logger = Literal["csv", "tensorboard", "wandb"]


class Outcome(NamedTuple):
    """How a run ended: 'done', 'failed', 'stopped' (by a signal) or 'submitted' (a SLURM job), and the
    exit code to report."""

    name: str
    status: str
    code: int


ERROR_LINES = 15  # log lines kept in a failed entry
DISK_FULL_RETRY_S, DISK_FULL_WAIT_S = 5, 600  # retrying to record an outcome on a full disk


def is_slurm(entry: dict) -> bool:
    return entry.get("environment", "local") == "slurm"


def is_alive(entry: dict) -> bool:
    """Whether a `running` entry is really running: its SLURM job is listed, or a process of the run
    holds a lock in its folder."""
    if is_slurm(entry):
        return slurm.job_state(entry.get("slurm_job")) is not None
    return run_is_alive(out_dir_of(entry))


def is_runnable(entry: dict, include_optional: bool = False) -> bool:
    """todo entries, and `running` ones whose runner or job died; never one whose folder is unreadable."""
    if entry.get("optional") and not include_optional:
        return False
    if entry["status"] not in ("todo", "running"):
        return False
    out_dir = out_dir_of(entry)
    if not accessible(out_dir):
        print(f"Skipping {entry['name']}: its run folder {out_dir} is not accessible (permission denied).")
        return False
    return entry["status"] == "todo" or not is_alive(entry)


def accessible(out_dir: Path) -> bool:
    """Whether the runner may read and write a run folder (one not made yet counts as accessible)."""
    return not out_dir.exists() or os.access(out_dir, os.R_OK | os.W_OK | os.X_OK)


def claim(
    queue: Queue,
    name: str | None,
    include_optional: bool,
    args: list[str],
    logger: Logger | None,
    restart: bool = False,
    micro_batch_size: Literal["auto"] | None = None,
) -> tuple[dict, RunLock] | None:
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
            if entry["status"] == "running" and is_alive(entry):
                raise UserError(f"{name} is running already ({where_running(entry)}).")
            candidates = [entry]
        else:
            candidates = [e for e in entries if is_runnable(e, include_optional)]
        for entry in candidates:
            out_dir = out_dir_of(entry)
            created = not out_dir.exists()
            lock = RunLock(out_dir)
            if not lock.acquire():  # another runner got there first
                continue
            run_args = args or list(entry.get("run_args", []))
            run_logger = logger or entry.get("run_logger")
            try:
                check_ready(entry, run_args, restart, micro_batch_size)
            except BaseException:
                lock.release()
                if created:  # leave no empty folder behind a refusal
                    lock.path.unlink(missing_ok=True)
                    out_dir.rmdir()
                raise
            if entry["status"] == "running":
                print(
                    f"{entry['name']} was left running ({where_running(entry)}), which is gone: resuming it."
                )
            if (run_args and not args) or (run_logger and not logger):
                shown = shlex.join(run_args + ([f"--logger_name={run_logger}"] if run_logger else []))
                print(f"{entry['name']}: resuming with the arguments it started with: {shown}")
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
                started_at=now(),
            )
            return dict(entry), lock
    return None


def where_running(entry: dict) -> str:
    if is_slurm(entry):
        return f"SLURM job {entry.get('slurm_job')}"
    return f"pid {entry.get('pid')} on {entry.get('host')}"


def check_ready(
    entry: dict, args: list[str], restart: bool = False, micro_batch_size: Literal["auto"] | None = None
) -> None:
    """Refuse to start when the config does not parse, cannot train on the entry's devices, its tokenizer
    or token files are missing, or its checkpoints cannot be resumed; for SLURM, what sbatch would refuse."""
    # MICRO=auto picks a micro batch dividing the per-device batch: only the devices must divide the batch.
    auto = ["--train.micro_batch_size=1"] if micro_batch_size == "auto" else []
    cfg = parse_config(entry["config"], *entry.get("args", []), *args, *auto)
    check_training(cfg.train, world_size(entry))
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
    if not restart:
        point = resume_point(out_dir_of(entry), say=lambda _: None)  # refuses to overwrite a finished run
        strategy = entry.get("strategy", "auto")
        if point and not (is_slurm(entry) and strategy == "auto"):  # there, auto depends on the node's GPU
            # DDP's and FSDP's checkpoints differ: refused here, before anything starts.
            check_resumable(point, choose_strategy(cfg, world_size(entry), strategy))
    if is_slurm(entry):
        if micro_batch_size == "auto":
            raise UserError(
                f"{entry['name']}: MICRO=auto measures this machine's GPU, not the cluster's; for a SLURM "
                "run give the micro batch with ARGS=--train.micro_batch_size=N."
            )
        slurm.check_request(entry)


def launch_command(entry: dict, logger: Logger | None, args: list[str]) -> list[str]:
    """The training command of an entry: `litgpt pretrain`'s arguments, run by `tinystories_lab.pretrain`."""
    cmd = [
        sys.executable, "-m", "tinystories_lab.pretrain",
        f"--strategy={entry.get('strategy', 'auto')}",
        "--config", str(entry["config"]),
        f"--devices={entry.get('devices', 1)}",
        f"--num_nodes={entry.get('num_nodes', 1)}",
        f"--out_dir={out_dir_of(entry)}",
        "--resume=auto",
    ]  # fmt: skip
    if logger:
        cmd.append(f"--logger_name={logger}")
    return cmd + list(entry.get("args", [])) + args


def child_env(logger: Logger | None, out_dir: Path, gpus: str | None = None) -> dict[str, str]:
    """The training processes' environment: pinned GPUs, no inherited SLURM variables (a local run inside
    an allocation would otherwise make Fabric wait for srun's ranks), and offline W&B without an account."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if logger == "wandb":
        env.setdefault("WANDB_DIR", str(out_dir))
        env.setdefault("WANDB_PROJECT", "tinystories-lab")
        if not (env.get("WANDB_API_KEY") or _netrc_has("api.wandb.ai")) and "WANDB_MODE" not in env:
            print("No Weights & Biases account configured: logging offline (`wandb sync` uploads it later).")
            env["WANDB_MODE"] = "offline"
    return env


def run_entry(
    queue: Queue, entry: dict, lock: RunLock, restart: bool = False, auto_micro: bool = False
) -> Outcome:
    """Run (or submit) one claimed entry and record the outcome in the queue; then release its lock."""
    try:
        out_dir = out_dir_of(entry)
        write_run_file(out_dir, entry["name"], queue.path)
        if restart:
            delete_checkpoints(out_dir)
        if is_slurm(entry):
            return _submit(queue, entry)
        return _run_local(queue, entry, lock, auto_micro)
    finally:  # only now: until the outcome is written, no other runner may take the entry as stale
        lock.release()


def delete_checkpoints(out_dir: Path) -> None:
    """What `--restart` asks for: the run's checkpoints go, so training starts from zero (logs stay)."""
    folders = [c.folder for c in step_checkpoints(out_dir)] + [out_dir / "final"]
    folders = [f for f in folders if f.is_dir()]
    for folder in folders:
        shutil.rmtree(folder)
    if folders:
        print(f"Restarting from zero: deleted {', '.join(f.name for f in folders)} in {out_dir}.")


class RunLog:
    """A run's log file, written line by line (it survives any death of the runner). A full disk stops
    the log, saying so once, never the run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)  # noqa: SIM115 (closed by close())
        except OSError as e:
            self._give_up(e)

    def write(self, text: str) -> None:
        if self.file is not None:
            try:
                self.file.write(text)
            except OSError as e:
                self._give_up(e)

    def _give_up(self, e: OSError) -> None:
        self.file = None
        print(f"warning: cannot write the log {self.path} ({e.strerror}); output continues here only.")

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass


def _run_local(queue: Queue, entry: dict, lock: RunLock, auto_micro: bool = False) -> Outcome:
    name, out_dir = entry["name"], out_dir_of(entry)
    logger = entry.get("run_logger")
    gpus, gpu_locks = claim_gpus(entry.get("devices", 1), entry.get("gpus"))
    env = child_env(logger, out_dir, gpus)
    if auto_micro:
        choose_micro_batch(queue, entry, env)
    log_path = out_dir / "logs" / f"{datetime.now():%Y%m%d_%H%M%S}.log"
    cmd = launch_command(entry, logger, list(entry.get("run_args", [])))
    _record(queue, name, log=str(log_path), cuda_visible_devices=gpus)

    interrupted: list[int] = []
    tail: deque[str] = deque(maxlen=ERROR_LINES)
    log = RunLog(log_path)
    header = f"$ {shlex.join(cmd)}\n# host {socket.gethostname()}, runner pid {os.getpid()}, {now()}\n"
    if gpus is not None:
        header += f"# CUDA_VISIBLE_DEVICES={gpus}\n"
    print(header, end="", flush=True)
    log.write(header)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env=env, pass_fds=(lock.fd, *(g.fd for g in gpu_locks)),
        preexec_fn=_training_process,
    )  # fmt: skip

    def forward(signum, _frame):
        interrupted.append(signum)
        _signal_group(proc.pid, signum)

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
        _signal_group(proc.pid, signal.SIGKILL)  # no rank outlives rank 0
        _wait_for_ranks(out_dir)
        log.close()
        for gpu_lock in gpu_locks:
            gpu_lock.release()

    if code < 0:  # killed by a signal (e.g. the kernel's OOM killer): report it as a shell would
        code = 128 - code
    if interrupted:
        signame = signal.Signals(interrupted[0]).name
        note = f"stopped by {signame}; the next run-next resumes it from its last checkpoint"
        _finish(queue, name, status="todo", exit_code=code, note=note)
        print(f"{name}: stopped by {signame}; `make run-next` resumes it.")
        return Outcome(name, "stopped", 128 + interrupted[0])
    return record_outcome(queue, name, out_dir, code, list(tail), log_path)


def choose_micro_batch(queue: Queue, entry: dict, env: dict[str, str]) -> None:
    """`MICRO=auto`: measure the micro batch this machine fits and add it to the run's recorded arguments, so
    a resume keeps it. Gradient accumulation keeps the global batch: the training is the same."""
    chosen = [a for a in entry.get("run_args", []) if a.startswith("--train.micro_batch_size=")]
    if chosen:  # a resume: the micro batch counts the iterations its checkpoints recorded
        print(f"{entry['name']}: keeping the micro batch it was started with ({chosen[-1]}).")
        return
    args = [*entry.get("args", []), *entry.get("run_args", [])]
    cfg = parse_config(entry["config"], *args)
    per_device = cfg.train.global_batch_size // world_size(entry)
    devices, strategy = entry.get("devices", 1), entry.get("strategy", "auto")
    micro, why = auto_micro_batch(Path(entry["config"]), args, per_device, env, devices, strategy)
    entry["run_args"] = [*entry.get("run_args", []), f"--train.micro_batch_size={micro}"]
    _record(queue, entry["name"], run_args=entry["run_args"])
    print(f"{entry['name']}: micro batch {micro} ({why}); {per_device // micro} accumulation steps.")


def record_outcome(queue: Queue, name: str, out_dir: Path, code: int, tail: list[str], log: Path) -> Outcome:
    """Write how a training process ended: `done` when it exited 0 with a final checkpoint, else `failed`
    with the exit code and the log's last lines."""
    newest, _ = newest_loadable(out_dir)
    step = newest.step_count() if newest else None
    if code == 0 and final_checkpoint(out_dir):
        _finish(queue, name, status="done", exit_code=0, last_step=step)
        print(f"{name}: done ({out_dir}/final).")
        return Outcome(name, "done", 0)
    _finish(
        queue, name, status="failed", exit_code=code, last_step=step, error="\n".join(tail[-ERROR_LINES:])
    )
    print(f"{name}: failed with exit code {code}; log: {log}", file=sys.stderr)
    return Outcome(name, "failed", code or 1)


def _submit(queue: Queue, entry: dict) -> Outcome:
    name, out_dir = entry["name"], out_dir_of(entry)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    command = launch_command(entry, entry.get("run_logger"), list(entry.get("run_args", [])))
    script = out_dir / "job.sbatch"
    script.write_text(slurm.batch_script(entry, queue.path, command))
    job = slurm.submit(script)
    _record(queue, name, slurm_job=job, log=str(out_dir / "logs" / f"slurm-{job}.out"))
    print(f"{name}: submitted SLURM job {job} ({script}); `make list` shows its state.")
    return Outcome(name, "submitted", 0)


def wait_for_job(queue: Queue, name: str, poll_s: float = 2.0) -> Outcome:
    """Block until a submitted experiment's job has ended and say how (for scripts: `--wait true`)."""
    shown = None
    while True:
        entry = find(queue.load(), name)
        state = slurm.job_state(entry.get("slurm_job"))
        if entry["status"] != "running" or state is None:
            break
        if str(state) != shown:
            shown = str(state)
            print(f"{name}: SLURM job {entry.get('slurm_job')} {shown}", flush=True)
        time.sleep(poll_s)
    if entry["status"] == "running":  # the job left SLURM's list without recording how it ended
        entry = find(queue.load(), name)
    status = entry["status"]
    print(f"{name}: {status}" + (f" (exit {entry.get('exit_code')})" if status == "failed" else ""))
    if status == "done":
        return Outcome(name, "done", 0)
    return Outcome(name, "failed" if status != "todo" else "stopped", int(entry.get("exit_code") or 1))


def _record(queue: Queue, name: str, **fields) -> None:
    with queue.edit(check_configs=False) as entries:
        find(entries, name).update({k: v for k, v in fields.items() if v is not None})


def _finish(queue: Queue, name: str, status: str, **fields) -> None:
    """Record an outcome. A queue broken by hand during the run, or a disk that stays full, is reported
    with the status to set by hand; a full disk is retried for a while first."""
    waited = 0
    while True:
        try:
            _record(queue, name, status=status, finished_at=now(), **fields)
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


def run_next(
    queues: list[Path] | None = None,
    args: str = "",
    logger: Logger | None = None,
    include_optional: bool = False,
    restart: bool = False,
    wait: bool = False,
    micro_batch_size: Literal["auto"] | None = None,
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
    """
    queues = queues or RUN_QUEUES
    for path in queues:
        outcome = _run_one(Queue(path), None, args, logger, include_optional, restart, wait, micro_batch_size)
        if outcome is not None:
            break
    if outcome is None:
        print(f"Nothing to run in {_names(queues)}.{_failed_hint(queues)}")
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
) -> None:
    """Run (or resume) one experiment by name, optional ones included.

    Args:
        model: The experiment's name in the queues.
        queues: Queue files, searched in order (default: experiments.yaml).
        args: Extra `litgpt pretrain` arguments, e.g. "--train.max_tokens=1000000".
        logger: Logger to use instead of the config's: csv, tensorboard or wandb.
        restart: Train from zero, deleting the experiment's checkpoints first (also for a done one).
        wait: For a SLURM experiment, block until its job has ended (local runs always block).
        micro_batch_size: 'auto': the largest micro batch whose real step fits this GPU (on a CPU, 16),
            recorded with the run's arguments; the global batch, hence the training, stays the same.
    """
    queue = queue_of(model, queues or RUN_QUEUES)
    outcome = _run_one(queue, model, args, logger, True, restart, wait, micro_batch_size)
    if outcome.code:
        sys.exit(outcome.code)


def run_all(
    queues: list[Path] | None = None,
    args: str = "",
    logger: Logger | None = None,
    include_optional: bool = False,
    wait: bool = False,
    micro_batch_size: Literal["auto"] | None = None,
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
    """
    queues = queues or RUN_QUEUES
    outcomes: list[Outcome] = []
    try:
        for q in map(Queue, queues):
            while (
                outcome := _run_one(q, None, args, logger, include_optional, micro=micro_batch_size)
            ) is not None:
                outcomes.append(outcome)
                if outcome.status == "stopped":
                    break
            if outcomes and outcomes[-1].status == "stopped":
                break
    except UserError:  # the next entry cannot start: say what ran before the refusal
        _print_outcomes(queues, outcomes)
        raise
    if wait:
        outcomes = [
            wait_for_job(queue_of(o.name, queues), o.name) if o.status == "submitted" else o for o in outcomes
        ]
    if not outcomes:
        print(f"Nothing to run in {_names(queues)}.{_failed_hint(queues)}")
        return
    _print_outcomes(queues, outcomes)
    if outcomes[-1].status == "stopped":
        sys.exit(outcomes[-1].code)
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)


def _names(queues: list[Path]) -> str:
    return ", ".join(map(str, queues))


def _failed_hint(queues: list[Path]) -> str:
    failed = [e for e in load_entries(queues) if e["status"] == "failed"]
    if not failed:
        return ""
    names = ", ".join(f"{e['name']} (exit {e.get('exit_code')})" for e in failed)
    return (
        f" Failed: {names}; `make reset MODEL=<name>` puts one back to todo, keeping its checkpoints and "
        "arguments."
    )


def _print_outcomes(queues: list[Path], outcomes: list[Outcome]) -> None:
    if outcomes:
        print(f"\nrun-all on {_names(queues)}:")
        for o in outcomes:
            print(f"  {o.name}: {o.status}" + (f" (exit {o.code})" if o.code else ""))


def _run_one(
    queue: Queue,
    name: str | None,
    args: str,
    logger: Logger | None,
    include_optional: bool,
    restart: bool = False,
    wait: bool = False,
    micro: Literal["auto"] | None = None,
) -> Outcome | None:
    claimed = claim(queue, name, include_optional, shlex.split(args), logger, restart, micro)
    if claimed is None:
        return None
    entry, lock = claimed
    outcome = run_entry(queue, entry, lock, restart, auto_micro=micro == "auto")
    if wait and outcome.status == "submitted":
        return wait_for_job(queue, entry["name"])
    return outcome


def reset(model: str, queues: list[Path] | None = None, delete_checkpoints: bool = False) -> None:
    """Put an experiment back to `todo`. Its checkpoints and the arguments it ran with are kept (the next
    run resumes from them) unless `delete_checkpoints` is set, which deletes its whole run folder.

    Args:
        model: The experiment's name in the queues.
        queues: Queue files, searched in order (default: experiments.yaml).
        delete_checkpoints: Delete its run folder (checkpoints, logs, evaluations): only a folder the
            runner made for this experiment.
    """
    q = queue_of(model, queues or RUN_QUEUES)
    with q.edit() as entries:
        entry = find(entries, model)
        out_dir = out_dir_of(entry)
        if not accessible(out_dir):
            raise UserError(f"{out_dir} is not accessible (permission denied); fix its permissions first.")
        if entry["status"] == "running" and is_alive(entry):
            raise UserError(
                f"{model} is running now ({where_running(entry)}); `make cancel MODEL={model}` first."
            )
        entry["status"] = "todo"
        kept = () if delete_checkpoints else ("attempts", "run_args", "run_logger")
        for field in RUNNER_FIELDS:
            if field not in kept:
                entry.pop(field, None)
        if delete_checkpoints and (out_dir.exists() or out_dir.is_symlink()):
            check_deletable(out_dir, model, q)
            shutil.rmtree(out_dir)
            print(f"Deleted {out_dir}.")
    kept = "" if delete_checkpoints else " (checkpoints and arguments kept: the next run resumes from them)"
    print(f"{model} is back to todo{kept}.")


def check_deletable(out_dir: Path, name: str, queue: Queue) -> None:
    """Refuse to delete anything but a real folder the runner made for experiment `name`."""
    if out_dir.is_symlink():
        raise UserError(f"{out_dir} is a symlink (to {out_dir.resolve()}); delete what you mean by hand.")
    resolved = out_dir.resolve()
    if Path.cwd().resolve().is_relative_to(resolved) or queue.target.is_relative_to(resolved):
        raise UserError(f"{out_dir} holds the current folder or the queue; it is not a run folder.")
    if not run_file_names(out_dir, name):
        raise UserError(
            f"{out_dir} was not made by the runner for {name} (no run.yaml naming it); delete it by hand "
            "if you mean it."
        )


def cancel(model: str, queues: list[Path] | None = None) -> None:
    """Stop a running experiment and put it back to `todo`: cancel its SLURM job, or stop its local runner.

    Args:
        model: The experiment's name in the queues.
        queues: Queue files, searched in order (default: experiments.yaml).
    """
    q = queue_of(model, queues or RUN_QUEUES)
    entry = find(q.load(), model)
    if entry["status"] != "running" or not is_alive(entry):
        raise UserError(f"{model} is not running (status {entry['status']}).")
    if is_slurm(entry):
        slurm.cancel_job(entry["slurm_job"])
        _finish(q, model, status="todo", note=f"SLURM job {entry['slurm_job']} cancelled")
        print(f"{model}: cancelled SLURM job {entry['slurm_job']}; back to todo.")
        return
    if entry.get("host") != socket.gethostname():
        raise UserError(f"{model} runs on {entry.get('host')}; cancel it there.")
    os.kill(int(entry["pid"]), signal.SIGTERM)  # the runner stops training and puts the entry back
    print(f"{model}: sent SIGTERM to its runner (pid {entry['pid']}); it goes back to todo when stopped.")


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
        _record(q, model, host=socket.gethostname(), started_at=now())
        return
    log = Path(entry.get("log") or "")
    tail = log.read_text(errors="replace").splitlines()[-ERROR_LINES:] if log.is_file() else []
    record_outcome(q, model, out_dir_of(entry), exit_code, tail, log)


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _training_process() -> None:
    """In the child: its own process group (signals reach every rank), and death with the runner."""
    os.setpgid(0, 0)
    die_with_parent()


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_for_ranks(out_dir: Path, timeout: float = 60) -> None:
    """Until every training rank has exited (their locks are free), so the run is not taken as stale early."""
    deadline = time.monotonic() + timeout
    while any(Lock(p).is_held() for p in out_dir.glob("rank-*.lock")) and time.monotonic() < deadline:
        time.sleep(0.1)


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
