"""Token files: every story as [BOS] story [EOS], concatenated per split into a flat memory-mapped array."""

from __future__ import annotations

import hashlib
import json
import os
from itertools import chain
from pathlib import Path

import numpy as np
from litgpt import Tokenizer
from tqdm import tqdm

from tinystories_lab.data.tokenizer import fingerprint
from tinystories_lab.errors import UserError
from tinystories_lab.files import write_atomic
from tinystories_lab.hardware import cpu_count

FORMAT_VERSION = 1
META_FILE = "meta.json"
HEADER_KEYS = (
    "format_version",
    "tokenizer_sha256",
    "tokenizer_name",
    "vocab_size",
    "bos_id",
    "eos_id",
    "dtype",
)
ANY_DATA_COMMAND = (
    "`make data` (TinyStories), `make data-sample` (the bundled sample) or "
    "`tinystories-lab data --source FOLDER`"
)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokens_dir_for(data_dir: Path, source_name: str, tokenizer: Tokenizer) -> Path:
    """Where a source's token files made by a tokenizer live: one folder per (source, tokenizer hash)."""
    return data_dir / "tokens" / f"{source_name}-{fingerprint(tokenizer)[:10]}"


def stories_fingerprint(stories: list[str]) -> str:
    """A hash of the stories and their boundaries."""
    h = hashlib.sha256()
    for story in stories:
        h.update(story.encode())
        h.update(b"\0")
    return h.hexdigest()


def normalise_whitespace(story: str) -> str:
    """The story with every run of whitespace made one space, for comparing stories."""
    return " ".join(story.split())


def validation_in_train(train: list[str], validation: list[str]) -> int:
    """How many validation stories also occur in the training split (exact match after whitespace
    normalisation; a story that occurs twice in validation counts twice)."""
    wanted = {normalise_whitespace(s) for s in validation}
    train = tqdm(train, desc="validation stories in train", unit="story", unit_scale=True)
    found = {n for n in map(normalise_whitespace, train) if n in wanted}
    return sum(normalise_whitespace(s) in found for s in validation)


def encode_batch(tokenizer: Tokenizer, stories: list[str], threads: int) -> list[list[int]]:
    """Token ids of each story, without BOS/EOS, using the backend's own multi-threaded batch encoder."""
    if tokenizer.backend == "sentencepiece":
        return tokenizer.processor.encode(stories, num_threads=threads)
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read by `tokenizers` when its pool starts
    return [e.ids for e in tokenizer.processor.encode_batch(stories, add_special_tokens=False)]


def encode_stories(tokenizer: Tokenizer, stories: list[str], threads: int | None = None) -> np.ndarray:
    """[BOS] story [EOS] for every story, concatenated into one flat array."""
    ids = encode_batch(tokenizer, stories, threads or cpu_count())
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    return np.fromiter(
        chain.from_iterable([bos, *story, eos] for story in ids),
        dtype=token_dtype(tokenizer.vocab_size),
        count=sum(len(s) + 2 for s in ids),
    )


def write_split(
    tokenizer: Tokenizer,
    stories: list[str],
    path: Path,
    threads: int | None = None,
    chunk: int = 2048,
    desc: str = "encoding",
) -> dict:
    """Encode stories into `path` ([BOS] story [EOS] ...), atomically. Returns the split's counts and the
    sha256 of the file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tokens = n_bytes = 0
    digest = hashlib.sha256()
    with open(tmp, "wb") as f, tqdm(total=len(stories), desc=desc, unit="story", unit_scale=True) as bar:
        for start in range(0, len(stories), chunk):
            batch = stories[start : start + chunk]
            flat = encode_stories(tokenizer, batch, threads)
            raw = flat.tobytes()
            f.write(raw)
            digest.update(raw)
            tokens += flat.size
            n_bytes += sum(len(s.encode()) for s in batch)
            bar.update(len(batch))
    os.replace(tmp, path)
    return {"stories": len(stories), "tokens": tokens, "bytes": n_bytes, "file_sha256": digest.hexdigest()}


# Damaged files are checked here only: every reader goes through read_meta and split_problem.


def read_meta(tokens_dir: Path, remake: str = ANY_DATA_COMMAND) -> dict | None:
    """The token folder's metadata, or None if it was never completed; refuses an invalid meta.json,
    naming the command that re-makes it."""
    meta, problem = _load_meta(tokens_dir)
    if problem:
        raise UserError(damaged(problem, remake))
    return meta


def split_problem(tokens_dir: Path, meta: dict, split: str, check_hash: bool = False) -> str | None:
    """What is wrong with a split's token file by what meta.json says of it (size, and with `check_hash`
    its sha256 when recorded), or None."""
    path = tokens_dir / f"{split}.bin"
    counts = meta["splits"][split]
    if not path.is_file():
        return f"{path} is missing"
    size, dtype = path.stat().st_size, np.dtype(meta["dtype"])
    if size == 0:
        return f"{path} is empty"
    if size % dtype.itemsize:
        return f"{path} is {size:,} bytes, not a whole number of {dtype.name} tokens"
    if size // dtype.itemsize != counts["tokens"]:
        return f"{path} holds {size // dtype.itemsize:,} tokens but {META_FILE} says {counts['tokens']:,}"
    if check_hash and "file_sha256" in counts and file_sha256(path) != counts["file_sha256"]:
        return f"{path} does not match its sha256 in {META_FILE}"
    return None


def damaged(problem: str, remake: str) -> str:
    """The one-line refusal for damaged token files."""
    return f"{problem}: the token files are damaged. Re-make them with {remake}."


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _load_meta(tokens_dir: Path) -> tuple[dict | None, str | None]:
    """(metadata, None), (None, None) when there is none, or (None, what is wrong with it)."""
    path = tokens_dir / META_FILE
    if not path.is_file():
        return None, None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return None, f"{path} is not valid JSON ({e})"
    problem = _meta_problem(meta)
    return (None, f"{path} {problem}") if problem else (meta, None)


def _meta_problem(meta: object) -> str | None:
    if not isinstance(meta, dict):
        return "is not a JSON object"
    missing = [k for k in (*HEADER_KEYS, "splits") if k not in meta]
    if missing:
        return f"lacks {', '.join(missing)}"
    if meta["format_version"] != FORMAT_VERSION:
        return f"has format_version {meta['format_version']!r}; this version reads {FORMAT_VERSION}"
    if meta["dtype"] not in ("uint16", "uint32"):
        return f"says dtype {meta['dtype']!r}, not uint16 or uint32"
    if not all(isinstance(meta[k], int) for k in ("vocab_size", "bos_id", "eos_id")):
        return "has a vocab_size, bos_id or eos_id that is not an integer"
    if not isinstance(meta["splits"], dict):
        return "has no mapping of splits"
    for split, counts in meta["splits"].items():
        ints = isinstance(counts, dict) and all(
            isinstance(counts.get(k), int) for k in ("stories", "tokens", "bytes")
        )
        if not (ints and isinstance(counts.get("stories_sha256"), str)):
            return f"has an incomplete entry for split {split!r}"
    return None


def write_tokens(
    tokenizer: Tokenizer, splits: dict[str, list[str]], tokens_dir: Path, threads: int | None = None
) -> dict:
    """Encode every split into `tokens_dir`, skipping splits whose stories and tokenizer are unchanged.

    Writes `<split>.bin` files and `meta.json` (tokenizer hash, vocabulary size, dtype, and per split the
    story, token and byte counts, the hash of the stories and the file's; `validation_in_train`: how many
    validation stories also occur in the training split). A damaged meta.json or token file (wrong size or
    hash) is rewritten, saying so. Returns the metadata.
    """
    tokens_dir.mkdir(parents=True, exist_ok=True)
    header = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": fingerprint(tokenizer),
        "tokenizer_name": tokenizer.model_name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
    }
    old, problem = _load_meta(tokens_dir)
    if problem:
        print(f"{problem}: rewriting every split.")
    old = old or {}
    same_header = {k: old.get(k) for k in header} == header
    done = dict(old.get("splits", {})) if same_header else {}
    on_disk = old
    for split, stories in splits.items():
        digest = stories_fingerprint(stories)
        path = tokens_dir / f"{split}.bin"
        if done.get(split, {}).get("stories_sha256") == digest:
            problem = split_problem(tokens_dir, {**header, "splits": done}, split, check_hash=True)
            if problem is None:
                print(f"{split}: {path} is up to date ({done[split]['tokens']:,} tokens)")
                continue
            print(f"{split}: {problem}: rewriting it.")
        counts = write_split(tokenizer, stories, path, threads, desc=f"encoding {split}")
        done[split] = {**counts, "stories_sha256": digest}
        on_disk = {**header, "splits": done}  # after each split: a crash keeps the splits already written
        write_atomic(tokens_dir / META_FILE, json.dumps(on_disk, indent=2) + "\n")
        print(
            f"{split}: {counts['stories']:,} stories, {counts['tokens']:,} tokens, "
            f"{counts['bytes'] / counts['tokens']:.2f} bytes/token -> {path}"
        )
    meta = {**header, "splits": done}
    overlap = _overlap(splits, done, old.get("validation_in_train"))
    if overlap:
        meta["validation_in_train"] = overlap
    if meta != on_disk:
        write_atomic(tokens_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return meta


def _overlap(splits: dict[str, list[str]], done: dict, old: dict | None) -> dict | None:
    """meta.json's `validation_in_train`, recounted only when either split's stories changed.

    It describes the stories, not the token files, so it is no part of the up-to-date check: a
    meta.json without it (made before it existed) still loads and gets it on the next run, unencoded.
    """
    if "train" not in done or "validation" not in done:
        return None
    key = {f"{split}_sha256": done[split]["stories_sha256"] for split in ("train", "validation")}
    if old and all(old.get(k) == v for k, v in key.items()):
        return old
    if "train" not in splits or "validation" not in splits:
        return None
    return {"stories": validation_in_train(splits["train"], splits["validation"]), **key}


def open_split(
    tokens_dir: Path, split: str, expected_tokenizer: str | None = None, remake: str = ANY_DATA_COMMAND
) -> np.memmap:
    """Memory-map one split, refusing files that are missing, damaged or made by another tokenizer.

    `remake` is the command that makes them, named in every refusal.
    """
    meta = read_meta(tokens_dir, remake)
    if meta is None or split not in meta["splits"]:
        raise UserError(f"No {split} token files in {tokens_dir}. Make them with {remake}.")
    if expected_tokenizer is not None and meta["tokenizer_sha256"] != expected_tokenizer:
        raise UserError(
            f"The token files in {tokens_dir} were made by another tokenizer ({meta['tokenizer_name']}, "
            f"sha256 {meta['tokenizer_sha256'][:10]}) than the one this run uses (sha256 "
            f"{expected_tokenizer[:10]}). Re-make them with `tinystories-lab data --tokenizer_dir <your "
            "tokenizer>`, or point tokenizer_dir at the tokenizer that made them."
        )
    problem = split_problem(tokens_dir, meta, split)
    if problem:
        raise UserError(damaged(problem, remake))
    return np.memmap(tokens_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
