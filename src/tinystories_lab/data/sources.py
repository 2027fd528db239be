"""Where stories come from: the Hugging Face dataset, the bundled sample, or local text files."""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path
from typing import Literal

from tinystories_lab.errors import UserError

HF_DATASET = "roneneldan/TinyStories"
SAMPLE_DIR = Path("data/sample")
SPLITS = ("train", "validation")
EOT = "<|endoftext|>"

Separator = Literal["eot", "blank"]


def split_stories(text: str, separator: Separator = "eot") -> list[str]:
    """Split text into stories, stripped, empty ones dropped.

    `eot`: stories end with a line `<|endoftext|>` (the upstream TinyStories .txt format).
    `blank`: stories are separated by one or more blank lines.
    """
    if separator == "eot":
        parts = text.split(EOT)
    elif separator == "blank":
        parts = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    else:
        raise UserError(f"Unknown story separator {separator!r}: choose 'eot' or 'blank'.")
    return [p.strip() for p in parts if p.strip()]


def read_text_file(path: Path, separator: Separator | None = "eot") -> list[str]:
    """Stories of one local UTF-8 text file; refuses a missing, binary or story-less file.

    `separator=None` picks 'eot' when the file holds <|endoftext|> lines, else 'blank'.
    """
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a text file.")
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a regular file (a device, a pipe, ...); give a text file of stories.")
    if not path.is_file():
        raise UserError(f"Text file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text ({e.reason}: byte {e.object[e.start]:#04x}); give a UTF-8 text file "
            "of stories."
        ) from None
    if "\0" in text:
        raise UserError(f"{path} holds NUL bytes: it is not a text file of stories.")
    if separator is None:
        separator = "eot" if EOT in text else "blank"
    stories = split_stories(text, separator)
    if not stories:
        raise UserError(f"Text file {path} holds no stories (separator {separator!r}).")
    return stories


def source_name(source: str) -> str:
    """A short name for a source, used in folder names: 'tinystories', 'sample', or for a local folder
    its name and a hash of its path, so two folders called `stories` never share tokenizers or tokens."""
    if source in ("tinystories", "sample"):
        return source
    path = Path(source).resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def data_command(source: str, data_dir: Path = Path("data")) -> str:
    """The command that (re-)makes a source's tokenizer and token files in `data_dir`, in backquotes."""
    default_dir = Path(data_dir) == Path("data")
    if source in ("sample", "tinystories"):
        target = "data-sample" if source == "sample" else "data"
        return f"`make {target}`" if default_dir else f"`make {target} DATA_DIR={shlex.quote(str(data_dir))}`"
    folder = "" if default_dir else f" --data_dir {shlex.quote(str(data_dir))}"
    return f"`tinystories-lab data --source {shlex.quote(source)}{folder}`"


def load_split(
    source: str,
    split: str,
    data_dir: Path = Path("data"),
    separator: Separator = "eot",
    offline: str | None = None,
) -> list[str]:
    """The stories of one split ('train' or 'validation') of a source.

    Args:
        source: 'tinystories' (download from the Hugging Face Hub, cached under `data_dir/hf`),
            'sample' (the bundled sample in data/sample) or a folder holding train.txt and validation.txt.
        split: 'train' or 'validation'.
        data_dir: The project's data folder.
        separator: How stories are separated in local text files: 'eot' or 'blank'.
        offline: What to advise when TinyStories cannot be downloaded (default: training on local data).
    """
    if split not in SPLITS:
        raise UserError(f"Unknown split {split!r}: choose one of {', '.join(SPLITS)}.")
    if source == "tinystories":
        return download_split(split, data_dir / "hf", offline)
    folder = SAMPLE_DIR if source == "sample" else Path(source)
    if not folder.is_dir():
        raise UserError(
            f"Unknown data source {source!r}: use 'tinystories', 'sample', or a folder holding train.txt and "
            "validation.txt."
        )
    return read_text_file(folder / f"{split}.txt", "eot" if source == "sample" else separator)


def download_split(split: str, cache_dir: Path, offline: str | None = None) -> list[str]:
    """One split of TinyStories from the Hugging Face Hub (cached; `datasets` shows progress)."""
    offline = offline or (
        "Without a network, train on the bundled sample (`make data-sample`) or on local text files "
        "(`tinystories-lab data --source path/to/folder`)."
    )
    ds = hub_dataset(HF_DATASET, split, cache_dir, offline)
    return [s.strip() for s in ds["text"] if s and s.strip()]


def hub_dataset(name: str, split: str, cache_dir: Path, offline: str):
    """One split of a Hugging Face Hub dataset (cached), or a one-line UserError that ends with `offline`,
    the advice for a machine without a network."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split, cache_dir=str(cache_dir))
    except Exception as e:  # datasets raises many types for a missing network; all mean the same here
        reason = str(e).splitlines()[0].rstrip(".") if str(e) else ""
        raise UserError(
            f"Could not download {name} ({split}) from the Hugging Face Hub; is the network up? "
            f"({type(e).__name__}: {reason}). {offline}"
        ) from None
