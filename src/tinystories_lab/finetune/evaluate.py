"""`make eval` on a fine-tune: loss on the held-out instructions, and on stories, before and after."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import torch
import yaml
from litgpt.data import JSON
from tqdm import tqdm

from tinystories_lab.data.sources import Separator
from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.perplexity import evaluate_each, text_loss, text_tokens, validation_split
from tinystories_lab.models import TrainedModel, load_trained, results_dir


def instruction_data(checkpoint_dir: Path) -> JSON:
    """LitGPT's JSON data module as the fine-tune used it (same file, split, prompt style and masking),
    rebuilt from its hyperparameters.yaml."""
    hparams = yaml.safe_load((checkpoint_dir / "hyperparameters.yaml").read_text())
    data = hparams.get("data") or {}
    if not isinstance(data, dict) or data.get("class_path") != "litgpt.data.JSON":
        raise UserError(
            f"{checkpoint_dir} was not fine-tuned on a JSON instruction set; cannot evaluate it here."
        )
    known = {f.name for f in fields(JSON) if f.init}
    kwargs = {k: v for k, v in (data.get("init_args") or {}).items() if k in known}
    kwargs["json_path"] = Path(kwargs["json_path"])
    if not kwargs["json_path"].exists():
        raise UserError(
            f"The instruction data {kwargs['json_path']} is gone; it was used to fine-tune {checkpoint_dir}."
        )
    return JSON(**(kwargs | {"num_workers": 0}))


@torch.no_grad()
def instruction_loss(
    trained: TrainedModel, data: JSON, batch_size: int = 16, device: str = "cpu"
) -> tuple[float, int]:
    """Mean loss per target token of the held-out split (with LitGPT's labels: the response and its EOS
    when the prompt is masked), and the number of target tokens."""
    data.connect(trained.tokenizer, batch_size=batch_size, max_seq_length=trained.max_seq_length)
    data.setup()
    model = trained.model.to(device)
    total, count = 0.0, 0
    for batch in tqdm(data.val_dataloader(), desc=f"instructions {trained.checkpoint_dir}", unit="batch"):
        x, y = batch["input_ids"].to(device), batch["labels"][:, 1:].to(device)
        logits = model(x)[:, :-1]
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=data.ignore_index, reduction="sum"
        ).item()
        count += int((y != data.ignore_index).sum())
    return total / count, count


def evaluate_finetune(
    checkpoint_dir: Path,
    text: Path | None = None,
    separator: Separator | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict:
    """The fine-tune and the weights it started from, on its held-out instructions and on stories (the base
    run's validation split, or `text`): what fine-tuning gained, and what it cost."""
    hparams = yaml.safe_load((checkpoint_dir / "hyperparameters.yaml").read_text())
    base_dir = Path(hparams["checkpoint_dir"])
    if not (base_dir / "lit_model.pth").is_file():
        raise UserError(f"The checkpoint {checkpoint_dir} was fine-tuned from, {base_dir}, is gone.")
    base, tuned = load_trained(base_dir, device=device), load_trained(checkpoint_dir, device=device)
    data = instruction_data(checkpoint_dir)
    before, n_targets = instruction_loss(base, data, batch_size, device)
    after, _ = instruction_loss(tuned, data, batch_size, device)
    if text is None:
        tokens, n_bytes, described, _ = validation_split(base)
    else:
        tokens, n_bytes, _ = text_tokens(base, text, separator)
        described = str(text)
    story_before, n_tokens = text_loss(base, tokens, batch_size, device, desc="stories, before")
    story_after, _ = text_loss(tuned, tokens, batch_size, device, desc="stories, after")
    method = "lora" if "lora_r" in hparams else "full"
    return {
        "name": results_dir(checkpoint_dir).name,
        "checkpoint": str(checkpoint_dir),
        "base_checkpoint": str(base_dir),
        "method": method,
        "instruction_data": str(data.json_path),
        "prompt_style": type(data.prompt_style).__name__,
        "instruction_targets": n_targets,
        "instruction_loss_before": before,
        "instruction_loss_after": after,
        "story_text": described,
        "story_tokens": n_tokens,
        "story_loss_before": story_before,
        "story_loss_after": story_after,
        "story_bits_per_byte_after": story_after / math.log(2) * n_tokens / n_bytes,
    }


def evaluate_finetunes(
    checkpoint_dirs: list[Path],
    text: Path | None = None,
    separator: Separator | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> list[dict]:
    """Evaluate fine-tunes (`make eval`), write eval.json next to each and print their table."""
    header = ["fine-tune", "method", "held-out instruction loss before -> after",
              "story loss before -> after"]  # fmt: skip

    def row(r: dict) -> list:
        return [r["name"], r["method"],
                f"{r['instruction_loss_before']:.4f} -> {r['instruction_loss_after']:.4f}",
                f"{r['story_loss_before']:.4f} -> {r['story_loss_after']:.4f}"]  # fmt: skip

    def evaluate(checkpoint_dir: Path) -> dict:
        return evaluate_finetune(checkpoint_dir, text, separator, batch_size, device)

    return evaluate_each(checkpoint_dirs, evaluate, text, header, row)
