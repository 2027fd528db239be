"""Saving on preemption: SIGUSR1 makes every rank take part in one checkpoint at the next optimizer-step
boundary, then exit with `PREEMPTED_EXIT`, which the SLURM batch script answers by requeueing the job.

SLURM sends USR1 before a job's time limit (`--signal=B:USR1@120`, to the batch shell, which relays it to
srun and srun to every task); `scancel --batch --signal=USR1 <job>` sends it by hand. Ranks may get it at
different moments, so at every step boundary they all-reduce the flag and save together. The checkpoint
is written under a name the resume never looks at (`.preempted-step-N/`) and renamed to `step-N/` once
complete: one cut short by the kill is never the one resumed.
"""

from __future__ import annotations

import functools
import inspect
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import litgpt.pretrain
import torch
from litgpt.utils import CycleIterator

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved, try again later
_requested: list[int] = []


def _request(signum: int, _frame) -> None:
    _requested.append(signum)


def install() -> None:
    """Take SIGUSR1 as a request to save and stop at the next step boundary (instead of dying on it)."""
    signal.signal(signal.SIGUSR1, _request)


def saving_fit(fit: Callable) -> Callable:
    """LitGPT's `fit`, whose training iterator checks, before each optimizer step's first batch, whether
    any rank was asked to stop; if so every rank writes the checkpoint and the process exits."""
    signature = inspect.signature(fit)

    @functools.wraps(fit)
    def wrapped(*args, **kwargs):
        run = signature.bind(*args, **kwargs)
        run.apply_defaults()
        a = run.arguments
        accumulation = a["train"].gradient_accumulation_iters(a["devices"], a["num_nodes"])

        class _StopAtStepBoundary(CycleIterator):
            started_at = a["state"]["iter_num"]

            def __next__(self):
                fabric, state = a["fabric"], a["state"]
                if state["iter_num"] % accumulation == 0 and _agreed(fabric):
                    _save_and_exit(fabric, state, Path(a["out_dir"]), a["tokenizer_dir"], self.started_at)
                return super().__next__()

        litgpt.pretrain.CycleIterator = _StopAtStepBoundary
        return fit(*args, **kwargs)

    return wrapped


def _agreed(fabric) -> bool:
    """Whether any rank got the signal: every rank calls this at the same step, so all agree."""
    flag = torch.tensor([float(bool(_requested))], device=fabric.device)
    return bool(fabric.all_reduce(flag, reduce_op="sum").item() > 0)


def _save_and_exit(fabric, state: dict, out_dir: Path, tokenizer_dir, started_at: int) -> None:
    step = state["step_count"]
    final = out_dir / f"step-{step:08d}"
    if state["iter_num"] == started_at:
        fabric.print("Preempted before the first step of this start: nothing new to save.")
    elif (final / "lit_model.pth").is_file():
        fabric.print(f"Preempted at step {step}, saved already as {final}.")
    else:
        partial = out_dir / f".preempted-step-{step:08d}"  # not `step-*`: never resumed half-written
        if fabric.global_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        fabric.barrier()
        litgpt.pretrain.save_checkpoint(fabric, state, tokenizer_dir, partial / "lit_model.pth")
        fabric.barrier()
        if fabric.global_rank == 0:
            partial.rename(final)
        fabric.barrier()
        fabric.print(f"Preempted at step {step}: saved {final}.")
    fabric.print(f"Exiting with {PREEMPTED_EXIT} so the job is requeued and resumes.")
    raise SystemExit(PREEMPTED_EXIT)
