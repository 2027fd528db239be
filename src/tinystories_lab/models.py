"""Trained models: find an experiment's checkpoint and load it as LitGPT's `GPT`, ready for analysis."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import yaml
from litgpt import GPT, Config, Tokenizer

from tinystories_lab.data import TinyStories
from tinystories_lab.data.tokenizer import load_tokenizer
from tinystories_lab.errors import UserError
from tinystories_lab.experiments.queue import find, load_entries, queue_files
from tinystories_lab.experiments.runs import Checkpoint, final_checkpoint, out_dir_of

FINETUNE_DIR = Path("experiments/finetune")


@dataclass
class TrainedModel:
    """A checkpoint loaded for inference: the model (eval mode), its config, tokenizer and run settings."""

    model: GPT
    config: Config
    tokenizer: Tokenizer
    checkpoint_dir: Path
    hparams: dict

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def tie_embeddings(self) -> bool:
        return self.model.lm_head.weight is self.model.transformer.wte.weight

    @property
    def max_seq_length(self) -> int:
        return self.model.max_seq_length


def load_trained(
    checkpoint_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> TrainedModel:
    """Load a LitGPT checkpoint folder: `litgpt pretrain`'s `final/` or `step-*/`, or a fine-tune's `final/`.

    LitGPT does not record `tie_embeddings` in `model_config.yaml`; it is read from the
    `hyperparameters.yaml` saved beside it, and the embedding is tied again before loading. LitGPT's
    fine-tuning does not tie them: a full fine-tune trains them apart, and they stay untied here; a LoRA
    fine-tune leaves both equal, and they are tied again.
    """
    checkpoint_dir = Path(checkpoint_dir)
    ckpt = Checkpoint(checkpoint_dir / "lit_model.pth")
    if not ckpt.path.is_file():
        raise UserError(f"No checkpoint in {checkpoint_dir} (lit_model.pth is missing).")
    try:
        state = ckpt.load()
    except Exception:
        raise UserError(
            f"{ckpt.path} does not load (truncated or corrupt); resume training to rewrite it."
        ) from None
    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    hparams = yaml.safe_load((checkpoint_dir / "hyperparameters.yaml").read_text())
    state = state.get("model", state)  # pretraining saves {"model": ...}; fine-tunes the weights alone
    with torch.device(device):
        model = GPT(config)
    if hparams["train"].get("tie_embeddings"):
        check_tied(state, ckpt.path)
        model.transformer.wte.weight = model.lm_head.weight
    elif torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]):
        # A LoRA fine-tune of a tied model saves the (untouched) matrix twice: it is still tied.
        model.transformer.wte.weight = model.lm_head.weight
    model.load_state_dict(state)
    model.max_seq_length = hparams["train"].get("max_seq_length") or config.block_size
    model = model.to(dtype=dtype).eval()
    fix = f"Copy the tokenizer files of {hparams.get('tokenizer_dir')} (the run's tokenizer_dir) into it."
    return TrainedModel(model, config, load_tokenizer(checkpoint_dir, fix), checkpoint_dir, hparams)


def check_tied(state: dict, path: Path) -> None:
    """Refuse a checkpoint trained with tied embeddings whose `wte` and `lm_head` differ: tying them again
    would silently pick one (FSDP can untie them while materialising the model, litgpt issue 1727)."""
    wte, head = state.get("transformer.wte.weight"), state.get("lm_head.weight")
    if wte is None or head is None or torch.equal(wte, head):
        return
    diff = (wte.float() - head.float()).abs().max().item()
    raise UserError(
        f"{path} was trained with tied embeddings, but its wte and lm_head differ (max |diff| {diff:.3g}, "
        f"max |wte| {wte.float().abs().max().item():.3g}): the tie was lost during training. To load both "
        "matrices as they are, set train.tie_embeddings: false in its hyperparameters.yaml."
    )


def training_data(trained: TrainedModel) -> TinyStories:
    """The TinyStories data module the model was trained on (named in its hyperparameters.yaml), connected
    to its tokenizer: `.split("validation")` gives the validation tokens, checked against that tokenizer."""
    data = trained.hparams.get("data") or {}
    if not isinstance(data, dict) or data.get("class_path") != "tinystories_lab.data.TinyStories":
        raise UserError(
            f"{trained.checkpoint_dir} was not trained with tinystories_lab.data.TinyStories, so its "
            "validation text is unknown here; evaluate it on a text file instead (TEXT=path)."
        )
    known = {f.name for f in fields(TinyStories) if f.init}
    module = TinyStories(**{k: v for k, v in (data.get("init_args") or {}).items() if k in known})
    module.connect(trained.tokenizer, max_seq_length=trained.max_seq_length)
    return module


def select_experiments(model: str | None = None, queues: list[Path] | None = None) -> list[dict]:
    """The entry called `model` in the queues (refusing unknown names), or every `done` entry (refusing
    none). Each entry is a copy that also records the queue file it came from (`queue`)."""
    queues = queue_files(queues)
    entries = load_entries(queues)
    if model is not None:
        return [find(entries, model)]
    done = [e for e in entries if e["status"] == "done"]
    if not done:
        raise UserError(
            f"No finished experiment in {', '.join(map(str, queues))}: train one first "
            "(`make run-next` or `make demo`)."
        )
    return done


def checkpoint_folder(path: Path) -> Path | None:
    """The LitGPT checkpoint folder at `path`: the folder itself if it holds lit_model.pth, or its final/."""
    for folder in (path, path / "final"):
        if (folder / "lit_model.pth").is_file():
            return folder
    return None


def is_finetune(checkpoint_dir: Path) -> bool:
    """Whether a checkpoint folder was written by LitGPT's fine-tuning (it records its base checkpoint)."""
    hparams = checkpoint_dir / "hyperparameters.yaml"
    return hparams.is_file() and "checkpoint_dir" in (yaml.safe_load(hparams.read_text()) or {})


def results_dir(checkpoint_dir: Path) -> Path:
    """Where eval.json, samples and hf/ of a checkpoint go: the run's (or fine-tune's) folder for its
    final/, else the checkpoint's own folder (a step-* checkpoint's results never pass for the run's)."""
    return checkpoint_dir.parent if checkpoint_dir.name == "final" else checkpoint_dir


def select_checkpoints(model: str | None = None, queues: list[Path] | None = None) -> list[tuple[str, Path]]:
    """(name, checkpoint folder) pairs: for `model` a checkpoint folder's path (a run, a fine-tune under
    experiments/finetune/, or their final/), a fine-tune's folder name, or an experiment's name; with no
    `model`, every `done` experiment. A folder's name is its own, or its parent's for a final/ folder."""
    if model is not None:
        path = Path(model)
        if not path.is_dir() and (FINETUNE_DIR / model).is_dir():
            path = FINETUNE_DIR / model
        if path.is_dir():
            folder = checkpoint_folder(path)
            if folder is None:
                raise UserError(f"{path} holds no LitGPT checkpoint (lit_model.pth, or final/lit_model.pth).")
            return [(results_dir(folder).name, folder)]
    return [(e["name"], final_checkpoint_dir(e)) for e in select_experiments(model, queues)]


def final_checkpoint_dir(entry: dict) -> Path:
    """The experiment's `final/` folder, or an error saying how to produce it."""
    ckpt = final_checkpoint(out_dir_of(entry))
    if ckpt is None:
        queue = entry.get("queue")  # set by select_experiments; the Makefile's QUEUE= is experiments.yaml
        queue_arg = f" QUEUE={queue}" if queue is not None and Path(queue) != Path("experiments.yaml") else ""
        raise UserError(
            f"{entry['name']} has no final checkpoint in {out_dir_of(entry)} (status {entry['status']}); "
            f"train it first: `make run-specific MODEL={entry['name']}{queue_arg}`."
        )
    return ckpt.folder
