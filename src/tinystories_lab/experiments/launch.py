"""Starting a training process and watching it: its command, its environment, the strategy it trains under,
its log, and its process group (signals forwarded to every rank, death with the process that started it).

The runner and fine-tuning both start their processes through `supervise`. The death with the parent
itself is armed by `experiments/lifeline.py`, which the training process imports first, before torch.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from jsonargparse import Namespace

from tinystories_lab.configs import count_parameters, model_config
from tinystories_lab.experiments.lifeline import PARENT_PID, die_with_parent
from tinystories_lab.experiments.locks import Lock, lock_files
from tinystories_lab.experiments.runs import out_dir_of

Logger = Literal["csv", "tensorboard", "wandb"]
Strategy = Literal["auto", "ddp", "fsdp"]
ADAM_BYTES_PER_PARAMETER = 16  # fp32 weights, gradients and AdamW's two moments
STATE_SHARE_OF_MEMORY = 0.5  # leave the rest of a device's memory to activations
TAIL_LINES = 400  # log lines kept to find the error that failed a run (the tasks' lines interleave)


class Ended(NamedTuple):
    """How a supervised process ended: its exit code (128 + N when killed by signal N, as a shell says),
    the signal we forwarded to it (SIGINT or SIGTERM, or None) and its last lines of output."""

    code: int
    stopped_by: int | None
    tail: list[str]


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def choose_strategy(cfg: Namespace, world: int, strategy: Strategy) -> Strategy | Literal["single"]:
    """`ddp` when the training state fits one device, `fsdp` when it does not; `single` for one process."""
    if world == 1:
        return "single"
    if strategy != "auto":
        return strategy
    if not torch.cuda.is_available():
        return "ddp"  # a CPU's memory is the machine's: nothing to shard for
    config = model_config(cfg)
    state = count_parameters(config, cfg.train.tie_embeddings) * ADAM_BYTES_PER_PARAMETER
    return (
        "ddp" if state <= STATE_SHARE_OF_MEMORY * torch.cuda.get_device_properties(0).total_memory else "fsdp"
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
    env[PARENT_PID] = str(os.getpid())  # training dies with this process (experiments/lifeline.py)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if logger == "wandb":
        env.setdefault("WANDB_DIR", str(out_dir))
        env.setdefault("WANDB_PROJECT", "tinystories-lab")
        if not (env.get("WANDB_API_KEY") or _netrc_has("api.wandb.ai")) and "WANDB_MODE" not in env:
            print("No Weights & Biases account configured: logging offline (`wandb sync` uploads it later).")
            env["WANDB_MODE"] = "offline"
    return env


def log_path_in(out_dir: Path) -> Path:
    """A new log file of a run: out_dir/logs/<timestamp>.log."""
    return out_dir / "logs" / f"{datetime.now():%Y%m%d_%H%M%S}.log"


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


def supervise(
    cmd: list[str], log_path: Path, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = (),
    note: str = "", ranks_of: Path | None = None,
) -> Ended:  # fmt: skip
    """Run `cmd` in a process group of its own that dies with us, its output teed to the terminal and to
    `log_path` (after a header: the command, host, our pid, the time, and `note`). SIGINT and SIGTERM are
    forwarded to the whole group; when the process ends, whatever is left of its group is killed (no rank
    outlives rank 0) and, with `ranks_of`, we wait until the ranks' locks in that run folder are free."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    stopped_by: list[int] = []
    log = RunLog(log_path)
    header = f"$ {shlex.join(cmd)}\n# host {socket.gethostname()}, runner pid {os.getpid()}, {now()}\n{note}"
    print(header, end="", flush=True)
    log.write(header)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env=env, pass_fds=pass_fds, preexec_fn=_training_process,
    )  # fmt: skip

    def forward(signum, _frame):
        stopped_by.append(signum)
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
        if ranks_of is not None:
            _wait_for_ranks(ranks_of)
        log.close()
    if code < 0:  # killed by a signal (e.g. the kernel's OOM killer): report it as a shell would
        code = 128 - code
    return Ended(code, stopped_by[0] if stopped_by else None, list(tail))


def terminate(pids: list[int]) -> list[str]:
    """Send SIGTERM to each process; the pids of those that were still there."""
    stopped = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(str(pid))
        except ProcessLookupError:  # ended meanwhile
            pass
    return stopped


_LABEL = re.compile(r"^\s*(\d+): ?(.*)$")  # `srun --label`: "<task>: <line>"
_FAILED_TASK = re.compile(r"srun: error: .*\btasks? (\d+)(?:-\d+)?: (?:Exited with exit code [1-9]|Killed)")


def failure_reason(lines: list[str]) -> str | None:
    """For people reading the queue: the first real error line of a failed run's log, the exception a
    traceback ends with (such as `ModuleNotFoundError: No module named 'mlflow'`), or an `error: ...` line,
    of the task srun says failed (lines of `srun --label` carry their task); warnings and srun's own lines
    are skipped."""
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
