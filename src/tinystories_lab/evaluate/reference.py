"""`make eval-hf` and `make eval-reference`: any `transformers` causal LM scored on the same stories as
`make eval`, in bits per byte, so models with other tokenizers (the published TinyStories models) sit
beside this project's runs. docs/reference-models.md explains the choices.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from tinystories_lab.data.sources import Separator, load_split, read_text_file, source_name
from tinystories_lab.data.tokens import stories_fingerprint
from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.perplexity import validation_text, window_loss
from tinystories_lab.export.hf import BOUNDARY_KEY
from tinystories_lab.files import write_atomic
from tinystories_lab.hardware import resolve_device
from tinystories_lab.render import text_table

REFERENCE_DIR = Path("experiments/reference")
Boundary = Literal["auto", "bos", "eos", "bos_eos"]
# What each story boundary puts around the stories, as `make eval-hf` and the docs describe it.
BOUNDARIES = {
    "bos": "[BOS] story, for every story (llama2.c)",
    "eos": "[EOS] first, then story [EOS] for every story (GPT-2 / GPT-Neo's <|endoftext|>)",
    "bos_eos": "[BOS] story [EOS], for every story (this project's token files)",
}

# Revisions of the published models. Pinned without network access: only the stories15M hash was
# found (pinned by other projects); the others follow `main` until someone checks the hash on the Hub
# ("Files and versions" > "History") and writes it here. Every result records the commit it loaded.
TINYSTORIES_1M_REVISION = "main"
TINYSTORIES_3M_REVISION = "main"
TINYSTORIES_8M_REVISION = "main"
TINYSTORIES_28M_REVISION = "main"
TINYSTORIES_33M_REVISION = "main"
GPT_NEO_TOKENIZER_REVISION = "main"  # EleutherAI/gpt-neo-125M, the tokenizer the TinyStories cards name
LLAMA2C_STORIES15M_REVISION = "17c2f1eabe1e163acc15ad35e225794e7b907682"
LLAMA2C_STORIES42M_REVISION = "main"
LLAMA2C_STORIES110M_REVISION = "main"


@dataclass(frozen=True)
class Reference:
    """A published model and how it was trained: its context and its story boundary."""

    repo: str
    revision: str
    context: int
    boundary: Boundary
    tokenizer: str | None = None  # another repository's tokenizer, where the model card says so
    tokenizer_revision: str | None = None


def _tinystories(size: str, revision: str) -> Reference:
    # GPT-Neo, trained with a 512-token context (2048 positions) on stories separated by <|endoftext|>.
    return Reference(
        f"roneneldan/TinyStories-{size}", revision, 512, "eos", "EleutherAI/gpt-neo-125M",
        GPT_NEO_TOKENIZER_REVISION,
    )  # fmt: skip


REFERENCES = [
    _tinystories("1M", TINYSTORIES_1M_REVISION),
    _tinystories("3M", TINYSTORIES_3M_REVISION),
    _tinystories("8M", TINYSTORIES_8M_REVISION),
    _tinystories("28M", TINYSTORIES_28M_REVISION),
    _tinystories("33M", TINYSTORIES_33M_REVISION),
    # llama2.c's checkpoints: BOS before every story, no EOS; contexts 256 / 1024 / 1024.
    Reference("Xenova/llama2.c-stories15M", LLAMA2C_STORIES15M_REVISION, 256, "bos"),
    Reference("Xenova/llama2.c-stories42M", LLAMA2C_STORIES42M_REVISION, 1024, "bos"),
    Reference("Xenova/llama2.c-stories110M", LLAMA2C_STORIES110M_REVISION, 1024, "bos"),
]


def load_stories(
    source: str, data_dir: Path, text: Path | None, separator: Separator | None
) -> tuple[list[str], str]:
    """The stories `make eval` scores (a source's validation split, or a text file) and their description."""
    if text is not None:
        return read_text_file(text, separator), str(text)
    offline = (
        "Without a network, score the bundled sample's validation stories: SOURCE=sample "
        "(`--source sample`), or a text file: TEXT=path."
    )
    return load_split(source, "validation", data_dir, separator or "eot", offline), validation_text(source)


def load_hf(
    hf: str,
    revision: str | None = None,
    tokenizer: str | None = None,
    tokenizer_revision: str | None = None,
    cache_dir: Path | None = None,
):
    """A causal LM (fp32, eval mode) and its tokenizer from a local folder or the Hugging Face Hub.

    Refuses, in one line, what does not load, and a checkpoint missing weights (which `transformers` would
    otherwise fill with random numbers, e.g. an output layer a config wrongly declares untied).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_name(hf, revision)
    offline = hub_offline()  # then from the cache only
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            hf, revision=revision, dtype=torch.float32, cache_dir=cache_dir, local_files_only=offline,
            output_loading_info=True,
        )  # fmt: skip
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: httpx's, for a connection lost midway
        raise UserError(f"Could not load the model {hf}: {_first_line(e)}") from None
    if info["missing_keys"]:
        raise UserError(
            f"{hf} lacks weights its config needs ({', '.join(sorted(info['missing_keys']))}); "
            "transformers would fill them randomly. Try another --revision."
        )
    source = tokenizer or hf
    try:
        tok = AutoTokenizer.from_pretrained(
            source, revision=tokenizer_revision if tokenizer else revision, cache_dir=cache_dir,
            local_files_only=offline,
        )  # fmt: skip
    except (OSError, ValueError, TypeError) as e:
        raise UserError(
            f"Could not load a tokenizer from {source}: {_first_line(e)}. Name the one the model was "
            "trained with: --tokenizer HUB_ID_OR_FOLDER."
        ) from None
    return model.eval(), tok


def check_downloadable(hf: str, revision: str | None, cache_dir: Path | None = None) -> None:
    """Refuse at once a Hub model that is not cached while the Hub cannot be reached."""
    from huggingface_hub import try_to_load_from_cache

    if Path(hf).is_dir():
        return
    cached = try_to_load_from_cache(hf, "config.json", cache_dir=cache_dir, revision=revision or "main")
    reason = None if isinstance(cached, str) else hub_unreachable()
    if reason:
        raise UserError(
            f"{hf} must be downloaded from the Hugging Face Hub, but {reason}. Run it where there is a "
            "network (it stays cached for later offline runs), or score a local model folder: HF=path."
        )


def check_model_name(hf: str, revision: str | None) -> None:
    """Refuse, before anything is loaded, a model name that can be neither a folder nor a Hub id."""
    if not hf.strip():
        raise UserError("Name a model: HF=owner/name (a Hugging Face Hub id) or HF=path/to/model-folder.")
    local = Path(hf).is_dir()
    if local and revision:
        raise UserError(f"{hf} is a local folder: --revision applies to Hugging Face Hub ids only.")
    if not local and (hf.startswith((".", "/", "~")) or hf.count("/") > 1):
        raise UserError(f"No folder {hf}: give a model folder or a Hugging Face Hub id (owner/name).")


def detect_boundary(model, tok) -> Boundary:
    """The story boundary a model was trained with, as far as its files tell: this project's exports
    say so in config.json; a tokenizer whose BOS is its EOS (or that has no BOS) separates stories
    with EOS (GPT-2, GPT-Neo); otherwise BOS before each story (Llama-style, llama2.c)."""
    marked = getattr(model.config, BOUNDARY_KEY, None)
    if marked in BOUNDARIES:
        return marked
    bos, eos = _special_ids(model, tok)
    return "eos" if bos is None or bos == eos else "bos"


def story_stream(tok, stories: list[str], boundary: Boundary, bos: int | None, eos: int | None) -> np.ndarray:
    """Every story encoded with the tokenizer (no special tokens of its own), joined with the boundary."""
    needed = {"bos": [bos], "eos": [eos], "bos_eos": [bos, eos]}[boundary]
    if None in needed:
        raise UserError(
            f"The tokenizer has no {'BOS' if bos is None else 'EOS'} token, which the {boundary!r} story "
            "boundary needs; choose another --boundary."
        )
    ids = tok(stories, add_special_tokens=False)["input_ids"]
    if boundary == "bos":
        parts = [[bos, *s] for s in ids]
    elif boundary == "eos":
        parts = [[eos]] + [[*s, eos] for s in ids]
    else:
        parts = [[bos, *s, eos] for s in ids]
    return np.fromiter((t for part in parts for t in part), dtype=np.int64, count=sum(map(len, parts)))


def score_hf(
    hf: str,
    stories: list[str],
    described: str,
    revision: str | None = None,
    tokenizer: str | None = None,
    tokenizer_revision: str | None = None,
    context: int | None = None,
    boundary: Boundary = "auto",
    batch_size: int = 8,
    device: str = "auto",
    cache_dir: Path | None = None,
) -> dict:
    """Loss per token, bits per byte and tokens per byte of a `transformers` model on `stories`."""
    device = resolve_device(device)
    known = next((r for r in REFERENCES if r.repo == hf), None)
    if known is not None:  # a published model: its pin, its training context, boundary and tokenizer
        revision = revision or known.revision
        context = context or known.context
        boundary = known.boundary if boundary == "auto" else boundary
        if tokenizer is None and known.tokenizer:
            tokenizer, tokenizer_revision = known.tokenizer, known.tokenizer_revision
    model, tok = load_hf(hf, revision, tokenizer, tokenizer_revision, cache_dir)
    positions = _max_positions(model, tok)
    context = context or positions
    if context is None:
        raise UserError(f"{hf} does not say its context length; pass --context N.")
    if positions is not None and context > positions:
        raise UserError(f"--context {context} exceeds {hf}'s {positions} positions.")
    boundary = detect_boundary(model, tok) if boundary == "auto" else boundary
    bos, eos = _special_ids(model, tok)
    tokens = story_stream(tok, stories, boundary, bos, eos)
    n_bytes = sum(len(s.encode()) for s in stories)
    model.to(device)
    loss, n_tokens = window_loss(
        lambda x: model(input_ids=x).logits, tokens, context, batch_size, device, desc=f"eval {hf}"
    )
    cfg = model.config
    return {
        "name": hf,
        "model": hf,
        "revision": revision,
        "commit": getattr(cfg, "_commit_hash", None),
        "tokenizer": tokenizer or hf,
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "model_type": cfg.model_type,
        "size": f"{cfg.num_hidden_layers}L_{cfg.num_attention_heads}H_{cfg.hidden_size}D",
        "parameters": sum(p.numel() for p in model.parameters()),  # tied matrices once
        "vocab_size": len(tok),
        "eval_text": described,
        "stories": len(stories),
        "stories_sha256": stories_fingerprint(stories),
        "boundary": boundary,
        "boundary_tokens": BOUNDARIES[boundary],
        "context": context,
        "windows": math.ceil(n_tokens / context),
        "tokens_evaluated": n_tokens,
        "bytes_evaluated": n_bytes,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": loss / math.log(2) * n_tokens / n_bytes,
        "tokens_per_byte": n_tokens / n_bytes,
        "device": device,
    }


def result_name(hf: str, source: str, text: Path | None) -> str:
    """The file name of a result: the Hub id (owner--name) or the folder's name (its run's, for an
    export in <run>/hf), then the text when it is not TinyStories' validation split."""
    path = Path(hf)
    if path.is_dir():
        path = path.resolve()
        name = path.parent.name if path.name == "hf" else path.name
    else:
        name = hf.replace("/", "--")
    if text is not None:
        return f"{name}-{text.stem}"
    return name if source == "tinystories" else f"{name}-{source_name(source)}"


def write_result(result: dict, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    write_atomic(path, json.dumps(result, indent=2) + "\n")
    return path


def print_table(results: list[dict]) -> None:
    header = ["model", "params", "text", "boundary", "context", "tokens", "bytes", "loss/token",
              "bits/byte", "tokens/byte"]  # fmt: skip
    rows = [
        [r["model"], f"{r['parameters'] / 1e6:.2f}M", r["eval_text"], r["boundary"], r["context"],
         f"{r['tokens_evaluated']:,}", f"{r['bytes_evaluated']:,}", f"{r['loss']:.4f}",
         f"{r['bits_per_byte']:.4f}", f"{r['tokens_per_byte']:.4f}"]
        for r in results
    ]  # fmt: skip
    print(text_table(header, rows))


def eval_hf(
    hf: str,
    text: Path | None = None,
    separator: Separator | None = None,
    source: str = "tinystories",
    data_dir: Path = Path("data"),
    revision: str | None = None,
    tokenizer: str | None = None,
    tokenizer_revision: str | None = None,
    context: int | None = None,
    boundary: Boundary = "auto",
    batch_size: int = 8,
    device: str = "auto",
    name: str | None = None,
    out_dir: Path = REFERENCE_DIR,
    cache_dir: Path | None = None,
) -> dict:
    """Score any `transformers` causal LM on the validation stories `make eval` uses, in bits per byte.

    The model keeps its own conventions: its tokenizer, its context (windows with stride = context,
    every token predicted once, as `make eval`), its story boundary. Writes loss per token, bits per byte,
    tokens per byte and the parameter count to out_dir/<name>.json and prints a table.

    Args:
        hf: A Hugging Face Hub id (e.g. roneneldan/TinyStories-33M) or a local model folder (e.g. the
            hf/ folder `make export` writes).
        text: Score this text file instead of the validation split.
        separator: How stories are separated in `text` or a local source folder: 'eot' or 'blank'
            (default: detected in `text`, 'eot' for a source).
        source: Whose validation split to score: 'tinystories', 'sample' or a local folder, as
            `tinystories-lab data --source` (make eval uses the split of the source each run trained on).
        data_dir: The project's data folder (the TinyStories download is cached in data_dir/hf).
        revision: The Hub revision (commit hash, branch or tag) of the model and its tokenizer (default:
            the pinned one for the published models, else main).
        tokenizer: Load the tokenizer from this Hub id or folder instead of the model's.
        tokenizer_revision: The Hub revision of `tokenizer`.
        context: Window length in tokens (default: the published models' training context, else the
            model's number of positions).
        boundary: What separates stories: 'bos' ([BOS] story), 'eos' (<|endoftext|> between stories,
            GPT-2/GPT-Neo), 'bos_eos' ([BOS] story [EOS], this project's) or 'auto' (from the model's
            files: see docs/reference-models.md).
        batch_size: Windows per forward pass.
        device: 'auto' (cuda if available, else cpu), 'cpu' or 'cuda'.
        name: The result's file name (default: from the model id or folder, and the text).
        out_dir: Where results go.
        cache_dir: The Hugging Face cache (default: its usual place, ~/.cache/huggingface/hub).
    """
    check_model_name(hf, revision)
    stories, described = load_stories(source, data_dir, text, separator)
    check_downloadable(hf, revision, cache_dir)
    result = score_hf(
        hf, stories, described, revision, tokenizer, tokenizer_revision, context, boundary, batch_size,
        device, cache_dir,
    )  # fmt: skip
    result["name"] = name or result_name(hf, source, text)
    path = write_result(result, out_dir, result["name"])
    print_table([result])
    print(f"-> {path}")
    return result


def eval_reference(
    model: str | None = None,
    source: str = "tinystories",
    data_dir: Path = Path("data"),
    text: Path | None = None,
    separator: Separator | None = None,
    batch_size: int = 8,
    device: str = "auto",
    out_dir: Path = REFERENCE_DIR,
    cache_dir: Path | None = None,
) -> list[dict]:
    """Score the published TinyStories models, each at its pinned revision, as `make eval-hf` does.

    roneneldan/TinyStories-1M, -3M, -8M, -28M, -33M (GPT-Neo) and llama2.c's stories15M, 42M and 110M
    (Xenova/llama2.c-stories*). The first run downloads them (over 1 GB) into the Hugging Face cache;
    later runs need no network. Without a network and without them cached, it refuses at once.

    Args:
        model: Only these, comma-separated (e.g. roneneldan/TinyStories-1M); default: all of them.
        source: Whose validation split to score: 'tinystories' (the default), 'sample' or a folder.
        data_dir: The project's data folder.
        text: Score this text file instead.
        separator: How stories are separated in `text` or a local source folder: 'eot' or 'blank'.
        batch_size: Windows per forward pass.
        device: 'auto' (cuda if available, else cpu), 'cpu' or 'cuda'.
        out_dir: Where results go, one <owner>--<name>.json per model.
        cache_dir: The Hugging Face cache (default: its usual place).
    """
    refs = select_references(model)
    missing = [r for r in refs if not is_cached(r, cache_dir)]
    if missing:
        reason = hub_unreachable()
        if reason:
            raise UserError(
                f"eval-reference must download {len(missing)} model(s) from the Hugging Face Hub, but "
                f"{reason}. Run it where there is a network (the models stay cached for later offline "
                "runs), or score a local model folder with `make eval-hf HF=path/to/folder`."
            )
    stories, described = load_stories(source, data_dir, text, separator)
    results = []
    for ref in refs:
        result = score_hf(
            ref.repo, stories, described, batch_size=batch_size, device=device, cache_dir=cache_dir
        )
        result["name"] = result_name(ref.repo, source, text)
        write_result(result, out_dir, result["name"])
        results.append(result)
    print_table(results)
    print(f"-> {out_dir}/")
    return results


def select_references(model: str | None) -> list[Reference]:
    if model is None:
        return list(REFERENCES)
    names = [m.strip() for m in model.split(",") if m.strip()]
    known = {r.repo: r for r in REFERENCES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(
            f"Not a reference model: {', '.join(unknown)}. Choose from {', '.join(known)} "
            "(any other model: `make eval-hf HF=...`)."
        )
    return [known[n] for n in names]


def is_cached(ref: Reference, cache_dir: Path | None = None) -> bool:
    """Whether the model's config at its revision is in the Hugging Face cache (so no download is needed)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.repo, "config.json", cache_dir=cache_dir, revision=ref.revision)
    return isinstance(found, str)


def hub_offline() -> bool:
    """Whether Hugging Face's offline mode is on, now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE) or now


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached (offline mode, or no answer within `timeout` s), or None."""
    import httpx
    from huggingface_hub import constants, get_session

    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=timeout)
    except (httpx.HTTPError, OSError) as e:
        return f"{endpoint} cannot be reached ({type(e).__name__})"
    return None


def _special_ids(model, tok) -> tuple[int | None, int | None]:
    """BOS and EOS ids: the tokenizer's, else the model config's."""
    ids = []
    for key in ("bos_token_id", "eos_token_id"):
        value = getattr(tok, key, None)
        value = getattr(model.config, key, None) if value is None else value
        ids.append(value[0] if isinstance(value, list) and value else value)  # configs may list several
    return ids[0], ids[1]


def _max_positions(model, tok) -> int | None:
    """How many positions the model has: its config's, else the tokenizer's limit (if it is a real one)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tok, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__).rstrip(".")
