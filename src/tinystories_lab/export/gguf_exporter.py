"""`make gguf`: an experiment's final checkpoint as a GGUF file for llama.cpp, proven equal to LitGPT."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.perplexity import validation_split
from tinystories_lab.export.gguf import QUANTS, gguf_arch, write_gguf
from tinystories_lab.export.gguf_parity import (
    GREEDY_PROMPT,
    QUANT_LOSS_TOLERANCE,
    TOLERANCE,
    ParityError,
    check_greedy,
    check_tokenizer,
    llama_loss,
    load_llama,
    max_logit_diffs,
)
from tinystories_lab.export.parity import parity_texts
from tinystories_lab.files import write_atomic
from tinystories_lab.models import TrainedModel, load_trained, results_dir, select_checkpoints


def write_trained(trained: TrainedModel, path: Path, quant: str) -> None:
    """The trained model as a GGUF file at `path`."""
    tokenizer_model = trained.checkpoint_dir / "tokenizer.model"
    if not tokenizer_model.is_file():
        raise UserError(
            f"{trained.checkpoint_dir} has no tokenizer.model: GGUF needs the SentencePiece model; copy it "
            f"from the run's tokenizer_dir ({trained.hparams.get('tokenizer_dir')})."
        )
    tok = trained.tokenizer
    write_gguf(
        path, trained.config, trained.model.state_dict(), trained.tie_embeddings, tokenizer_model,
        tok.bos_id, tok.eos_id, quant, context=trained.max_seq_length,
    )  # fmt: skip


def check_f32(trained: TrainedModel, path: Path) -> dict:
    """The f32 file's parity with LitGPT: tokenizer, logits and greedy story (raises `ParityError`).

    The tolerance applies to LitGPT running llama.cpp's GELU (`llama_cpp_gelu_in`); the difference to the
    model as trained is recorded beside it.
    """
    llm = load_llama(path, trained.max_seq_length)
    try:
        texts = parity_texts()
        check_tokenizer(llm, trained, texts)
        as_trained, same_gelu, tokens = max_logit_diffs(llm, trained, texts)
        if not same_gelu <= TOLERANCE:  # also catches NaN
            raise ParityError(
                f"llama.cpp's logits differ from LitGPT's by up to {same_gelu:.3g} (allowed {TOLERANCE:.0e})."
            )
        greedy = check_greedy(llm, trained)
    finally:
        llm.close()
    return {
        "max_abs_logit_diff_f32": same_gelu,
        "max_abs_logit_diff_f32_exact_gelu": as_trained,
        "logit_tokens": tokens,
        "logit_tolerance": TOLERANCE,
        "tokenizer_texts_identical": len(texts),
        "greedy_prompt": GREEDY_PROMPT,
        "greedy_tokens_identical": len(greedy),
    }


def quant_loss(trained: TrainedModel, f32: Path, quantized: Path, quant: str, max_tokens: int | None) -> dict:
    """Validation loss of the f32 and the quantized file in llama.cpp, and the change (raises past
    QUANT_LOSS_TOLERANCE); the quantized file's tokenizer is checked too."""
    tokens, _, text, _ = validation_split(trained)
    tokens = tokens[:max_tokens] if max_tokens else tokens
    context = trained.max_seq_length
    losses = {}
    for name, path in (("f32", f32), (quant, quantized)):
        llm = load_llama(path, context)
        if name == quant:
            check_tokenizer(llm, trained, parity_texts())
        losses[name], count = llama_loss(llm, np.asarray(tokens), context, desc=f"loss {name}")
        llm.close()
    change = losses[quant] - losses["f32"]
    if not abs(change) <= QUANT_LOSS_TOLERANCE:
        raise ParityError(
            f"{quant} changes the validation loss by {change:+.4f} nats (allowed {QUANT_LOSS_TOLERANCE})."
        )
    return {
        "eval_text": text,
        "eval_tokens": count,
        "loss_f32": losses["f32"],
        f"loss_{quant}": losses[quant],
        "loss_change": change,
        "loss_change_tolerance": QUANT_LOSS_TOLERANCE,
    }


def export_gguf(
    checkpoint_dir: Path, out_dir: Path, name: str, quant: str = "f32", max_tokens: int | None = None
) -> dict:
    """Write `<name>-<quant>.gguf` and its parity record `<name>-<quant>.json` into `out_dir`; return
    the record.

    The f32 file is always written and checked first (a quantized file is only as right as the conversion
    under it); then the quantized file is written and its validation loss compared. Everything happens in
    a temporary folder inside `out_dir` and only a file that passed is renamed into place, so a failure
    leaves nothing behind. An earlier file of the same name is replaced.
    """
    if quant not in QUANTS:
        raise UserError(f"Unknown QUANT {quant!r}: choose one of {', '.join(QUANTS)}.")
    trained = load_trained(checkpoint_dir)
    arch = gguf_arch(trained.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gguf-", dir=out_dir))
    try:
        f32 = staging / f"{name}-f32.gguf"
        write_trained(trained, f32, "f32")
        record = {"name": name, "checkpoint": str(checkpoint_dir), "architecture": arch, "quant": quant}
        record |= check_f32(trained, f32)
        final = f32
        if quant != "f32":
            final = staging / f"{name}-{quant}.gguf"
            write_trained(trained, final, quant)
            record |= quant_loss(trained, f32, final, quant, max_tokens)
        target = out_dir / f"{name}-{quant}.gguf"
        record |= {
            "file": target.name,
            "bytes": final.stat().st_size,
            "sha256": hashlib.sha256(final.read_bytes()).hexdigest(),
            "llama_cpp_python": version("llama-cpp-python"),
            "gguf": version("gguf"),
        }
        final.chmod(0o644)
        os.replace(final, target)
        write_atomic(out_dir / f"{name}-{quant}.json", json.dumps(record, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def gguf(
    model: str, quant: str = "f32", out_dir: Path | None = None, queues: list[Path] | None = None,
    max_tokens: int | None = None,
) -> None:  # fmt: skip
    """Export an experiment's final checkpoint to a GGUF file for llama.cpp, checked against LitGPT.

    Writes `<name>-<quant>.gguf` and `<name>-<quant>.json` (the parity record). Written only if, in f32,
    llama.cpp (through llama-cpp-python) gives LitGPT's token ids on fixed texts, logits within 1e-3 (of
    LitGPT running llama.cpp's GELU), and
    the same 64 greedy tokens; a quantized file must also keep the validation loss within 0.05 nats of
    the f32 file's. Needs `make install-gguf`.

    Args:
        model: The experiment's name in the queues, e.g. llama_6L_6H_288D, or a checkpoint folder (a run's,
            or a fine-tune's under experiments/finetune/).
        quant: f32, f16 or q8_0 (matrices in that type; norms and biases stay f32).
        out_dir: Where to write (default: gguf/ in the run's folder, e.g.
            experiments/tiny_stories/<name>/gguf).
        queues: Queue files to look the name up in (default: experiments.yaml and experiments.demo.yaml).
        max_tokens: Score the quantized file on only the first this many validation tokens (default: all).
    """
    name, checkpoint_dir = select_checkpoints(model, queues)[0]
    out_dir = out_dir or results_dir(checkpoint_dir) / "gguf"
    record = export_gguf(checkpoint_dir, out_dir, name, quant, max_tokens)
    loss = f"; validation loss {record['loss_change']:+.4f} nats vs f32" if quant != "f32" else ""
    print(
        f"{name} -> {out_dir / record['file']}: parity: max |logit diff| "
        f"{record['max_abs_logit_diff_f32']:.2e} "
        f"<= {TOLERANCE:.0e} (f32; {record['max_abs_logit_diff_f32_exact_gelu']:.2e} against exact GELU), "
        f"tokenization identical on {record['tokenizer_texts_identical']} texts, "
        f"{record['greedy_tokens_identical']} greedy tokens identical{loss}"
    )
