"""`make finetune`: a finished run's final checkpoint fine-tuned on instructions by LitGPT's own
`finetune_lora` / `finetune_full`, into experiments/finetune/<run>-<data>-<method>/.

The folder holds `base/` (the run's weights alone, made by LitGPT's `convert_pretrained_checkpoint`:
LitGPT's fine-tuning loads a plain state dict), LitGPT's out_dir contents (`step-*/`, `final/`,
`logs/csv/`) and our logs. The pretraining run's folder is only read.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Literal

import yaml
from litgpt import Config

from tinystories_lab.errors import UserError
from tinystories_lab.experiments.launch import log_path_in, supervise
from tinystories_lab.experiments.locks import RunLock
from tinystories_lab.experiments.runs import is_run_folder, resume_point
from tinystories_lab.finetune.data import SPLIT_FILES, data_instruct
from tinystories_lab.models import FINETUNE_DIR, is_finetune, select_checkpoints

Method = Literal["lora", "full"]
PROMPT_STYLE = "phi-2"  # LitGPT's shortest built-in template: "Instruct: {instruction}\nOutput:"
LEARNING_RATE = {"lora": 1e-3, "full": 2e-4}


def is_finished(out_dir: Path) -> bool:
    """Whether LitGPT finished: `final/` holds the weights and the prompt style, which both methods write
    last or next to last (LoRA merges its weights into final/lit_model.pth at the very end)."""
    final = out_dir / "final"
    return (final / "lit_model.pth").is_file() and (final / "prompt_style.yaml").is_file()


def resolve_data(data: str, data_dir: Path) -> tuple[str, Path]:
    """A short name for the data (used in the output folder's name) and what LitGPT's JSON module reads:
    'sample' (built here when missing), 'tinystories' (`make data-instruct` first), a folder with train.json
    and val.json, or one JSON file (LitGPT then holds out 5% of it)."""
    if data in ("sample", "tinystories"):
        folder = data_dir / "instruct" / data
        if not all((folder / f).is_file() for f in SPLIT_FILES.values()):
            if data == "tinystories":
                raise UserError(
                    f"No TinyStories-Instruct set in {folder}: run `make data-instruct` first (it downloads "
                    "roneneldan/TinyStoriesInstruct), or use the offline set: DATA=sample."
                )
            data_instruct("sample", data_dir)
        return data, folder
    path = Path(data)
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        return path.stem, path
    if path.is_dir() and all(
        any((path / f"{s}{x}").is_file() for x in (".json", ".jsonl")) for s in ("train", "val")
    ):
        return path.name, path
    raise UserError(
        f"Unknown instruction data {data!r}: use 'sample', 'tinystories', a JSON file of "
        '{"instruction", "input", "output"} examples, or a folder holding train.json and val.json.'
    )


def convert_base(checkpoint_dir: Path, base: Path) -> None:
    """The run's weights alone in `base/` (LitGPT's convert_pretrained_checkpoint), with its
    hyperparameters.yaml, which records what LitGPT's model_config.yaml does not: tied embeddings and
    the context. Written beside and renamed into place, so a crash leaves no half-made base."""
    from litgpt.scripts.convert_pretrained_checkpoint import convert_pretrained_checkpoint

    staging = Path(tempfile.mkdtemp(prefix=".base-", dir=base.parent))
    try:
        convert_pretrained_checkpoint(checkpoint_dir, staging / "base")
        shutil.copy(checkpoint_dir / "hyperparameters.yaml", staging / "base")
        (staging / "base").rename(base)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def litgpt_command(
    method: Method,
    base: Path,
    out_dir: Path,
    data: Path,
    context: int,
    steps: int,
    lr: float,
    resume: str | None,
) -> list[str]:
    """The `litgpt finetune_<method>` command with this project's defaults (the user's arguments come after
    it and win): one epoch, batches of 32 examples (micro-batches of 8), the run's context, warm-up over a
    tenth of the `steps` (at most 100), AdamW at learning rate `lr`, the loss on the response only,
    LitGPT's phi-2 prompt template, and the CSV logger."""
    cmd = [
        sys.executable, "-m", "litgpt", f"finetune_{method}", str(base),
        f"--out_dir={out_dir}",
        "--data=JSON",
        f"--data.json_path={data}",
        "--data.mask_prompt=true",
        f"--data.prompt_style={PROMPT_STYLE}",
        *(["--data.val_split_fraction=0.05"] if data.is_file() else []),
        "--train.epochs=1",
        "--train.global_batch_size=32",
        "--train.micro_batch_size=8",
        f"--train.lr_warmup_steps={max(1, min(100, math.ceil(steps / 10)))}",
        f"--train.max_seq_length={context}",
        "--optimizer=" + json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}}),
        "--logger_name=csv",
    ]  # fmt: skip
    if resume is not None:
        cmd.append(f"--resume={resume}")
    return cmd


def finetune(
    model: str,
    data: str = "sample",
    method: Method = "lora",
    lr: float | None = None,
    args: str = "",
    out_dir: Path | None = None,
    data_dir: Path = Path("data"),
    queues: list[Path] | None = None,
) -> Path:
    """Fine-tune a finished run's final checkpoint on instructions with `litgpt finetune_lora` or
    `litgpt finetune_full`, into experiments/finetune/<run>-<data>-<method>/.

    Crash-safe like the runner: a lock keeps two fine-tunes of the same folder apart; an interrupted full
    fine-tune resumes from its newest checkpoint that loads; an interrupted LoRA fine-tune is refused
    (LitGPT's finetune_lora cannot resume); a finished one is refused. The run's own folder is only read.
    Then `make eval MODEL=<folder>` (loss before and after on the held-out instructions), `make sample
    MODEL=<folder>` (instruction prompts) and `make export MODEL=<folder>` work on it.

    Args:
        model: The run to start from: an experiment's name (it must be done), or a pretraining checkpoint
            folder.
        data: 'sample' (offline: "write a story that uses the words ...", built from data/sample when
            missing), 'tinystories' (TinyStories-Instruct; `make data-instruct` first), a folder holding
            train.json and val.json, or one JSON file, in LitGPT's format ({"instruction", "input",
            "output"}).
        method: 'lora' (LitGPT's defaults: rank 8 on the query and value matrices; merged into full weights
            at the end) or 'full' (every weight, embedding and output head trained separately).
        lr: Peak learning rate of AdamW (default: 1e-3 for LoRA, 2e-4 for full).
        args: Extra `litgpt finetune_<method>` arguments, after this project's defaults, e.g.
            "--train.epochs=3 --precision=32-true".
        out_dir: Where to write (default: experiments/finetune/<run>-<data>-<method>).
        data_dir: The project's data folder (instruction sets go to data_dir/instruct/).
        queues: Queue files to look the run up in (default: experiments.yaml and experiments.demo.yaml).
    """
    if method not in ("lora", "full"):
        raise UserError(f"Unknown fine-tuning method {method!r}: choose 'lora' or 'full'.")
    if out_dir is not None and is_run_folder(out_dir) and not (out_dir / "base").is_dir():
        # every fine-tune folder has its base/; LitGPT would fail on a pretraining checkpoint's state
        raise UserError(
            f"{out_dir} holds another run (a pretraining run's checkpoints or run.yaml), not a fine-tune; "
            "give --out_dir a folder of its own or leave it out (experiments/finetune/<run>-<data>-<method>)."
        )
    name, checkpoint_dir = select_checkpoints(model, queues)[0]
    if is_finetune(checkpoint_dir):
        raise UserError(
            f"{checkpoint_dir} is a fine-tune already; start from a pretraining run's checkpoint."
        )
    data_name, data_path = resolve_data(data, data_dir)
    out_dir = out_dir or FINETUNE_DIR / f"{name}-{data_name}-{method}"
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir)
    if not lock.acquire():
        raise UserError(f"{out_dir} is being fine-tuned by another process; wait for it or stop it.")
    try:
        if is_finished(out_dir):
            raise UserError(
                f"{out_dir} is fine-tuned already; delete it to fine-tune again (or pass --out_dir)."
            )
        base = out_dir / "base"
        source = checkpoint_dir / "lit_model.pth"
        if not (base / "lit_model.pth").is_file():
            print(f"Converting {checkpoint_dir} for fine-tuning -> {base}")
            convert_base(checkpoint_dir, base)
        elif (base / "lit_model.pth").stat().st_mtime < source.stat().st_mtime:
            raise UserError(
                f"{checkpoint_dir} was trained further after this fine-tune started from it; delete "
                f"{out_dir} to fine-tune the new weights."
            )
        resume = None
        if method == "full":
            point = resume_point(out_dir)  # the newest step-* that loads
            resume = str(point) if point else "false"
        elif any(out_dir.glob("step-*")) or (out_dir / "final").exists():
            raise UserError(
                f"{out_dir} holds an interrupted LoRA fine-tune, which LitGPT's finetune_lora cannot resume "
                f"(it has no --resume); delete {out_dir} and run again."
            )
        hparams = yaml.safe_load((checkpoint_dir / "hyperparameters.yaml").read_text())
        context = (
            hparams["train"].get("max_seq_length") or Config.from_file(base / "model_config.yaml").block_size
        )
        extra = shlex.split(args)
        steps, lr = planned_steps(data_path, extra), lr or LEARNING_RATE[method]
        cmd = litgpt_command(method, base, out_dir, data_path, context, steps, lr, resume)
        code = run_logged(cmd + extra, out_dir, lock)
    finally:
        lock.release()
    if code != 0 or not is_finished(out_dir):
        again = "run the same command to resume" if method == "full" else f"delete {out_dir} to start again"
        print(
            f"{out_dir.name}: stopped with exit code {code} ({again}); log in {out_dir / 'logs'}",
            file=sys.stderr,
        )
        sys.exit(code or 1)
    print(
        f"{out_dir.name}: done ({out_dir}/final). Next: make eval MODEL={out_dir}, make sample "
        f"MODEL={out_dir}, make export MODEL={out_dir}."
    )
    return out_dir / "final"


def planned_steps(data: Path, args: list[str]) -> int:
    """Optimizer steps the fine-tune will take: epochs x examples / global batch, or max_steps if fewer
    (reading the user's --train.epochs, --train.global_batch_size and --train.max_steps when given)."""
    epochs = int(arg_value(args, "--train.epochs") or 1)
    batch = int(arg_value(args, "--train.global_batch_size") or 32)
    steps = max(1, epochs * count_examples(data) // batch)
    max_steps = arg_value(args, "--train.max_steps")
    return min(steps, int(max_steps)) if max_steps else steps


def arg_value(args: list[str], name: str) -> str | None:
    """The last value given to option `name` in `args` (`--name=value` or `--name value`)."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def count_examples(data: Path) -> int:
    """Training examples in a JSON instruction set (all of a single file: LitGPT splits it later)."""
    path = (
        data
        if data.is_file()
        else next(p for p in (data / "train.json", data / "train.jsonl") if p.is_file())
    )
    if path.suffix == ".jsonl":
        return sum(1 for line in path.open() if line.strip())
    return len(json.loads(path.read_text()))


def run_logged(cmd: list[str], out_dir: Path, lock: RunLock) -> int:
    """Run LitGPT as the runner runs training (`experiments/launch.py`): its output streamed to the terminal
    and to out_dir/logs/<timestamp>.log line by line, in a process group of its own that holds the lock too,
    dies with us and gets our SIGINT or SIGTERM; the exit code, 128 + the signal when stopped by one."""
    ended = supervise(cmd, log_path_in(out_dir), pass_fds=(lock.fd,))
    return 128 + ended.stopped_by if ended.stopped_by else ended.code
