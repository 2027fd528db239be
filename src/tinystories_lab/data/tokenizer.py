"""Train a SentencePiece BPE tokenizer and save it as a folder `litgpt.Tokenizer` loads as-is."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import tempfile
from pathlib import Path

from litgpt import Tokenizer

from tinystories_lab.data.sources import data_command
from tinystories_lab.errors import UserError
from tinystories_lab.hardware import cpu_count

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def is_tokenizer_dir(path: Path) -> bool:
    """Whether `path` holds a tokenizer LitGPT can load."""
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: Path, fix: str | None = None) -> Tokenizer:
    """Load a LitGPT tokenizer folder, refusing a missing or damaged one in one line that says how to fix it
    (`fix`, by default the command that re-makes a tokenizer of the project's data folder)."""
    if not is_tokenizer_dir(path):
        raise UserError(
            f"No tokenizer in {path} (expected tokenizer.model or tokenizer.json). "
            + (
                fix
                or "Make one with `make data` (or `make data-sample`), or point tokenizer_dir at an existing "
                "LitGPT tokenizer folder."
            )
        )
    try:
        tokenizer = Tokenizer(path)
    except Exception as e:  # SentencePiece, `tokenizers` and json each raise their own types for a bad file
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise UserError(
            f"The tokenizer in {path} does not load ({reason[:200]}). {fix or remake_tokenizer(path)}"
        ) from None
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise UserError(f"The tokenizer in {path} defines no BOS or EOS token; stories need both.")
    return tokenizer


def remake_tokenizer(path: Path) -> str:
    """How to replace a damaged tokenizer folder: re-make it if the project made it (tokenizers/<source>)."""
    other = "or point tokenizer_dir at a working LitGPT tokenizer folder."
    if path.parent.name != "tokenizers":
        return f"Replace its files with a working copy, {other}"
    if path.name in ("sample", "tinystories"):
        command = data_command(path.name, path.parent.parent)
    else:
        command = "`tinystories-lab data --source <the folder of stories it was made from>`"
    return f"Delete {path} and re-make it with {command}, {other}"


def fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of what the tokenizer does: its vocabulary and merges plus its BOS/EOS ids."""
    if tokenizer.backend == "sentencepiece":
        blob = tokenizer.processor.serialized_model_proto()
    else:
        blob = tokenizer.processor.to_str().encode()
    return hashlib.sha256(blob + f"|bos={tokenizer.bos_id}|eos={tokenizer.eos_id}".encode()).hexdigest()


def training_text(stories: list[str], max_chars: int, seed: int = 42) -> list[str]:
    """A seeded random subset of stories holding at most `max_chars` characters."""
    order = list(range(len(stories)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total + len(stories[i]) > max_chars and chosen:
            break
        chosen.append(stories[i])
        total += len(stories[i])
    return chosen


def train_tokenizer(
    stories: list[str], out_dir: Path, vocab_size: int = 32000, max_chars: int = 200_000_000, seed: int = 42
) -> int:
    """Train a BPE tokenizer (byte fallback, digits split) on `stories` and save it to `out_dir`.

    If the text supports fewer pieces than `vocab_size`, the largest vocabulary it supports is used.
    Ids follow Llama 2's layout: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), then the 256 byte pieces.
    Returns the vocabulary size.
    """
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(
            f"{out_dir} already exists and is not empty; remove it or choose another tokenizer_dir."
        )
    text = training_text(stories, max_chars, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        trained = _train_sentencepiece(text, staging, vocab_size)
        if trained != vocab_size:
            print(
                f"The training text supports at most {trained:,} tokens: using {trained:,} instead of the "
                f"requested {vocab_size:,}."
            )
        write_config_files(staging)
        info = {
            "type": "sentencepiece-bpe",
            "vocab_size": trained,
            "requested_vocab_size": vocab_size,
            "training_stories": len(text),
            "training_chars": sum(map(len, text)),
            "seed": seed,
        }
        (staging / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return trained


def _train_sentencepiece(text: list[str], folder: Path, vocab_size: int) -> int:
    """Write `folder/tokenizer.model`, lowering `vocab_size` to what the text supports if needed."""
    import sentencepiece as spm

    options = dict(
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        # Identity normalization and kept whitespace make decode(encode(text)) == text.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,  # whole stories are the "sentences"
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=cpu_count(),
        minloglevel=2,
    )
    for _ in range(5):
        model = io.BytesIO()  # in-memory input and output keep temporary paths out of the model file
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size, **options
            )
        except RuntimeError as e:  # "Vocabulary size too high (32000). Please set it to a value <= N."
            match = re.search(r"value <= (\d+)", str(e))
            if not match:
                raise
            vocab_size = int(match.group(1))
            continue
        (folder / "tokenizer.model").write_bytes(model.getvalue())
        return vocab_size
    raise RuntimeError("SentencePiece kept rejecting the vocabulary size")


def write_config_files(folder: Path) -> None:
    """The JSON files LitGPT (and later `transformers`) read next to `tokenizer.model`."""
    tokenizer_config = {
        # "LlamaTokenizer" makes LitGPT add BOS and apply its single-token decoding fix, which relies
        # on byte piece 33 being "\x1e", as it is in this id layout.
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "legacy": False,
    }
    generation_config = {"bos_token_id": 1, "eos_token_id": 2}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
