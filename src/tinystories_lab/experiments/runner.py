"""The runner: take an experiment from the queue, train it with resume (local processes or a SLURM job),
record the outcome."""

from __future__ import annotations

import errno
import os
import re
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
from tinystories_lab.experiments.lifeline import PARENT_PID, die_with_parent
from tinystories_lab.experiments.locks import Lock, RunLock, lock_files, run_is_alive, run_processes
from tinystories_lab.experiments.queue import (
    RUN_QUEUES,
    RUN_RECORD,
    RUNNER_FIELDS,
    Queue,
    find,
    load_entries,
    queue_of,
    set_seeds,
)
from tinystories_lab.experiments.runs import (
    Checkpoint,
    check_run_folder,
    final_checkpoint,
    newest_loadable,
    out_dir_of,
    resume_point,
    run_file_names,
    step_checkpoints,
    world_size,
    write_run_file,
)
from tinystories_lab.pretrain import check_resumable, choose_strategy

Logger = Literal["csv", "tensorboard", "wandb"]


class Claimed(NamedTuple):
    """An entry taken for a run: its fields as now marked running, its lock, its fields before the claim
    and whether its run folder was made by the claim (what `unclaim` restores)."""

    entry: dict
    lock: RunLock
    before: dict
    created: bool


class Outcome(NamedTuple):
    """How a run ended: 'done', 'failed', 'stopped' (by a signal) or 'submitted' (a SLURM job), and the
    exit code to report."""

    name: str
    status: str
    code: int


ERROR_LINES = 15  # log lines kept in a failed entry
REASON_LINES = 400  # log lines searched for the error that failed a run (the tasks' lines interleave)
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
            if entry["status"] == "running" and is_alive(entry):
                raise UserError(f"{name} is running already ({where_running(entry)}).")
            candidates = [entry]
        else:
            candidates = [e for e in entries if is_runnable(e, include_optional)]
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
                check_ready(entry, run_args, restart, micro_batch_size, resize)
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
                started_at=now(),
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


def where_running(entry: dict) -> str:
    if is_slurm(entry):
        return f"SLURM job {entry.get('slurm_job')}"
    where = f"pid {entry.get('pid')} on {entry.get('host')}"
    if entry.get("host") != socket.gethostname():
        return where
    processes = run_processes(out_dir_of(entry))
    if entry.get("pid") in processes or not processes:
        return where
    held = ", ".join(f"pid {pid} holds {lock.name}" for pid, lock in processes.items())
    return (
        f"its runner pid {entry.get('pid')} is gone, but {held}; `make cancel MODEL={entry['name']}` ends it"
    )


def check_ready(
    entry: dict,
    args: list[str],
    restart: bool = False,
    micro_batch_size: Literal["auto"] | None = None,
    resize: bool = False,
) -> None:
    """Refuse to start when the config does not parse, cannot train on the entry's devices, its tokenizer
    or token files are missing, its checkpoints cannot be resumed (another strategy's, or trained on another
    world size or batch unless `resize`); for SLURM, what sbatch would refuse."""
    check_local_nodes(entry)
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
        ckpt = resume_point(out_dir_of(entry), say=lambda _: None)  # refuses to overwrite a finished run
        if ckpt is not None and cfg.seed != Checkpoint(ckpt).hparams.get("seed", cfg.seed):
            raise UserError(
                f"{entry['name']} runs with seed {cfg.seed}, but its checkpoints in {out_dir_of(entry)} were "
                f"trained with seed {Checkpoint(ckpt).hparams['seed']}; put that seed first in its seeds:, "
                "or train it from zero with RESTART=1."
            )
        strategy = entry.get("strategy", "auto")
        if ckpt and not (is_slurm(entry) and strategy == "auto"):  # there, auto depends on the node's GPU
            # DDP's and FSDP's checkpoints differ: refused here, before anything starts.
            check_resumable(ckpt, choose_strategy(cfg, world_size(entry), strategy))
        if not resize:
            check_same_batch(entry, cfg.train, micro_batch_size)
    if is_slurm(entry):
        if micro_batch_size == "auto":
            raise UserError(
                f"{entry['name']}: MICRO=auto measures this machine's GPU, not the cluster's; for a SLURM "
                "run give the micro batch with ARGS=--train.micro_batch_size=N."
            )
        slurm.check_request(entry)


def check_local_nodes(entry: dict) -> None:
    """Refuse `num_nodes > 1` on `environment: local`: the runner starts processes on this machine only,
    and the ranks would wait 30 minutes for nodes that never come."""
    nodes = entry.get("num_nodes", 1)
    if nodes > 1 and not is_slurm(entry):
        raise UserError(
            f"{entry['name']}: num_nodes: {nodes} needs `environment: slurm` (the local runner starts "
            "processes on this machine only)."
        )


def check_same_batch(entry: dict, train, micro_batch_size: Literal["auto"] | None = None) -> None:
    """Refuse a resume whose world size, global batch or micro batch differs from the checkpoint's: it would
    train another run (other optimizer steps and data order) under the same name."""
    newest, _ = newest_loadable(out_dir_of(entry))
    recorded = [c.hparams for c in (newest, *step_checkpoints(out_dir_of(entry))) if c and c.hparams]
    if not recorded:
        return
    saved = recorded[0]  # the newest checkpoint's, or the one before when its save was cut short
    changes = [("world size (devices x num_nodes)", world_size(saved), world_size(entry)),
               ("global batch", saved["train"]["global_batch_size"], train.global_batch_size)]  # fmt: skip
    if micro_batch_size != "auto":  # MICRO=auto keeps the micro batch the run started with
        changes.append(("micro batch", saved["train"]["micro_batch_size"], train.micro_batch_size))
    changed = [f"{what} {old} -> {new}" for what, old, new in changes if old != new]
    if changed:
        raise UserError(
            f"{entry['name']}: its checkpoint {newest.folder.name} was trained with another batch "
            f"({'; '.join(changed)}); resuming would change the training. Put the entry's devices/args back, "
            "or resume anyway with RESIZE=1 (`--resize true`), or train from zero with RESTART=1."
        )


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
    if entry.get("early_checkpoints"):
        cmd.insert(4, "--early_checkpoints=true")
    if logger:
        cmd.append(f"--logger_name={logger}")
    return cmd + list(entry.get("args", [])) + args


def child_env(logger: Logger | None, out_dir: Path, gpus: str | None = None) -> dict[str, str]:
    """The training processes' environment: pinned GPUs, no inherited SLURM variables (a local run inside
    an allocation would otherwise make Fabric wait for srun's ranks), and offline W&B without an account."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env[PARENT_PID] = str(os.getpid())  # training dies with this runner (experiments/lifeline.py)
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
    queue: Queue, claimed: Claimed, restart: bool = False, micro_batch_size: Literal["auto"] | None = None
) -> Outcome:
    """Run (or submit) one claimed entry and record the outcome in the queue; then release its lock.

    A refusal before training starts (no free GPU, sbatch refusing the job, ...) undoes the claim."""
    entry, lock = claimed.entry, claimed.lock
    out_dir = out_dir_of(entry)
    gpus, gpu_locks = None, []
    try:
        try:
            if not is_slurm(entry):
                gpus, gpu_locks = claim_gpus(entry.get("devices", 1), entry.get("gpus"))
            if micro_batch_size == "auto":
                choose_micro_batch(queue, entry, child_env(entry.get("run_logger"), out_dir, gpus))
            write_run_file(out_dir, entry["name"], queue.path, entry.get("seed"))
            if restart:
                delete_checkpoints(out_dir)
            if is_slurm(entry):
                return _submit(queue, entry)
        except UserError:
            for gpu_lock in gpu_locks:
                gpu_lock.release()
            unclaim(queue, claimed)
            raise
        return _run_local(queue, entry, lock, gpus, gpu_locks)
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


def _run_local(queue: Queue, entry: dict, lock: RunLock, gpus: str | None, gpu_locks: list[Lock]) -> Outcome:
    name, out_dir = entry["name"], out_dir_of(entry)
    logger = entry.get("run_logger")
    env = child_env(logger, out_dir, gpus)
    log_path = out_dir / "logs" / f"{datetime.now():%Y%m%d_%H%M%S}.log"
    cmd = launch_command(entry, logger, list(entry.get("run_args", [])))
    _record(queue, name, log=str(log_path), cuda_visible_devices=gpus)

    interrupted: list[int] = []
    tail: deque[str] = deque(maxlen=REASON_LINES)
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
    reason = failure_reason(tail)
    _finish(
        queue, name, status="failed", exit_code=code, last_step=step, failure_reason=reason,
        error="\n".join(tail[-ERROR_LINES:]),
    )  # fmt: skip
    print(f"{name}: failed with exit code {code}" + (f" ({reason})" if reason else "") + f"; log: {log}",
          file=sys.stderr)  # fmt: skip
    return Outcome(name, "failed", code or 1)


_LABEL = re.compile(r"^\s*(\d+): ?(.*)$")  # `srun --label`: "<task>: <line>"
_FAILED_TASK = re.compile(r"srun: error: .*\btasks? (\d+)(?:-\d+)?: (?:Exited with exit code [1-9]|Killed)")


def failure_reason(lines: list[str]) -> str | None:
    """The first real error line of a failed run's log: the exception a traceback ends with (such as
    `ModuleNotFoundError: No module named 'mlflow'`), or an `error: ...` line, of the task srun says failed
    (lines of `srun --label` carry their task); warnings and srun's own lines are skipped."""
    failing = next((m.group(1) for m in map(_FAILED_TASK.search, lines) if m), None)
    in_traceback: dict[str | None, bool] = {}
    for line in lines:
        match = _LABEL.match(line)
        task, text = (match.group(1), match.group(2)) if match else (None, line)
        if failing is not None and task is not None and task != failing:
            continue
        if text.startswith("srun:") or re.search(r"Warning: ", text):
            continue
        if text.startswith("Traceback (most recent call last)"):
            in_traceback[task] = True
        elif in_traceback.get(task):
            if text and not text[0].isspace():
                return text.strip()
        elif text.startswith("error: "):
            return text.strip()
    return None


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
    """Block until a submitted experiment's job has ended and say how (for scripts: `--wait true`). Ctrl-C
    stops the waiting only: the job goes on."""
    shown = None
    job = None
    try:
        while True:
            entry = find(queue.load(), name)
            job = entry.get("slurm_job")
            state = slurm.job_state(job)
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
    outcomes = []
    for name in set_seeds(queue, model, seeds, base):
        if find(queue.load(), name)["status"] == "done" and not restart:
            print(f"{name} is done already.")
            continue
        outcomes.append(_run_one(queue, name, args, logger, True, restart, wait, micro_batch_size, resize))
        if outcomes[-1].status == "stopped":
            break
    for o in outcomes:
        print(f"{o.name}: {o.status}" + (f" (exit {o.code})" if o.code else ""))
    failed = [o for o in outcomes if o.code]
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
    outcomes: list[Outcome] = []
    try:
        for q in map(Queue, queues):
            while (
                outcome := _run_one(
                    q, None, args, logger, include_optional, micro_batch_size=micro_batch_size, resize=resize
                )
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
    micro_batch_size: Literal["auto"] | None = None,
    resize: bool = False,
) -> Outcome | None:
    claimed = claim(
        queue, name, include_optional, shlex.split(args), logger, restart, micro_batch_size, resize
    )
    if claimed is None:
        return None
    entry = claimed.entry
    outcome = run_entry(queue, claimed, restart, micro_batch_size)
    if wait and outcome.status == "submitted":
        return wait_for_job(queue, entry["name"])
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
        if not accessible(out_dir):
            raise UserError(f"{out_dir} is not accessible (permission denied); fix its permissions first.")
        if entry["status"] == "running" and is_alive(entry):
            raise UserError(
                f"{model} is running now ({where_running(entry)}); `make cancel MODEL={model}` first."
            )
        entry["status"] = "todo"
        kept = () if delete_run_folder else ("attempts", "run_args", "run_logger")
        for field in RUNNER_FIELDS:
            if field not in kept:
                entry.pop(field, None)
        if delete_run_folder and (out_dir.exists() or out_dir.is_symlink()):
            check_deletable(out_dir, model, q)
            shutil.rmtree(out_dir)
            print(f"Deleted {out_dir}.")
    kept = "" if delete_run_folder else " (checkpoints and arguments kept: the next run resumes from them)"
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
    check_run_folder(out_dir, name, queue.path)  # only from the queue file that owns it


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
    # Signal only processes proven to be this run's (they hold its locks): a pid may have been reused.
    processes = run_processes(out_dir_of(entry))
    if entry.get("pid") in processes:
        pids = [entry["pid"]]  # the runner stops training and puts the entry back
    else:  # the runner is gone: stop what is left of the run (training processes it left behind)
        pids = list(processes)
    stopped = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(str(pid))
        except ProcessLookupError:  # ended meanwhile
            pass
    if not stopped:
        raise UserError(
            f"{model} is not running: no process holds its locks any more (status {entry['status']})."
        )
    if pids == [entry.get("pid")]:
        print(f"{model}: sent SIGTERM to its runner (pid {entry['pid']}); it goes back to todo when stopped.")
        return
    _finish(q, model, status="todo", note=f"runner gone; stopped processes {', '.join(stopped)}")
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
        record_start(q, entry)
        return
    log = Path(entry.get("log") or "")
    tail = log.read_text(errors="replace").splitlines()[-REASON_LINES:] if log.is_file() else []
    record_outcome(q, model, out_dir_of(entry), exit_code, tail, log)


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
        _finish(queue, name, status="failed", last_step=step, error=reason)
        print(f"{name}: failed: {reason}", file=sys.stderr)
        sys.exit(1)
    _record(queue, name, host=socket.gethostname(), started_at=now(), start_step=step)


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
    while any(Lock(p).is_held() for p in lock_files(out_dir, "rank-*.lock")) and time.monotonic() < deadline:
        time.sleep(0.1)


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
