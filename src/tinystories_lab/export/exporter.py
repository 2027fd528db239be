"""`make export`: an experiment's final checkpoint as a `transformers` folder, proven equal to LitGPT."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from tinystories_lab.errors import UserError
from tinystories_lab.export.card import model_card
from tinystories_lab.export.hf import hf_config, hf_state_dict, write_model, write_tokenizer
from tinystories_lab.export.parity import Parity, check_parity, parity_texts
from tinystories_lab.hardware import resolve_device
from tinystories_lab.models import load_trained, results_dir, select_checkpoints


def export_checkpoint(checkpoint_dir: Path, out_dir: Path, device: str = "cpu") -> Parity:
    """Write the LitGPT checkpoint in `checkpoint_dir` to `out_dir` and return the passed parity check.

    Everything is written to a temporary folder beside `out_dir` and renamed into place only once the
    parity check passes, so a failure leaves no half-written folder. `out_dir` may be absent, empty, or an
    earlier export of the same weights (replaced, so the model card picks up new evaluations); anything
    else is refused before a file is written.
    """
    trained = load_trained(checkpoint_dir)
    tok = trained.tokenizer
    cfg = hf_config(trained.config, trained.tie_embeddings, tok.bos_id, tok.eos_id)
    state = hf_state_dict(trained.config, trained.model.state_dict(), cfg)
    refuse_other_model(out_dir, state)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        write_model(staging, cfg, state)
        write_tokenizer(tok, checkpoint_dir, staging, cfg["max_position_embeddings"])
        parity = check_parity(trained, staging, parity_texts(), device)
        trained.model.cpu()
        (staging / "README.md").write_text(model_card(trained, cfg, parity, results_dir(checkpoint_dir)))
        for path in staging.iterdir():  # mkdtemp and safetensors create owner-only files
            path.chmod(0o644)
        staging.chmod(0o755)
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return parity


def refuse_other_model(out_dir: Path, state: dict[str, torch.Tensor]) -> None:
    """Raise unless `out_dir` is absent, empty, or holds an export of exactly these weights."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    weights = out_dir / "model.safetensors"
    if weights.is_file():
        old = load_file(weights)
        if old.keys() == state.keys() and all(torch.equal(old[k], state[k]) for k in state):
            return
    raise UserError(
        f"{out_dir} already holds something other than this model; delete it first or choose another "
        "--out_dir. Nothing was written."
    )


def replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`, removing an older `target` only once `new` is in place."""
    if not target.exists():
        new.rename(target)
        return
    old = new.with_name(new.name + "-old")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)


def export(
    model: str, out_dir: Path | None = None, queues: list[Path] | None = None, device: str = "auto"
) -> None:
    """Export an experiment's final checkpoint to the Hugging Face format, checked against LitGPT.

    Writes config.json, model.safetensors, generation_config.json, tokenizer files and a model card. The
    export fails, writing nothing, unless transformers reproduces LitGPT's tokens and logits (max
    difference under 1e-4 in fp32). Re-exporting the same weights replaces the folder (refreshing the
    card); a folder holding anything else is refused.

    Args:
        model: The experiment's name in the queues, e.g. gpt_6L_6H_288D, or a checkpoint folder (a run's, or a
            fine-tune's under experiments/finetune/).
        out_dir: Where to write (default: hf/ in the run's folder, e.g. experiments/tiny_stories/<name>/hf).
        queues: Queue files to look the name up in (default: experiments.yaml and experiments.demo.yaml).
        device: Where the parity check runs both models: 'auto' (cuda if available, else cpu), 'cpu' or
            'cuda'.
    """
    device = resolve_device(device)
    name, checkpoint_dir = select_checkpoints(model, queues)[0]
    out_dir = out_dir or results_dir(checkpoint_dir) / "hf"
    parity = export_checkpoint(checkpoint_dir, out_dir, device)
    print(f"{name} -> {out_dir}: {parity.summary()}")
