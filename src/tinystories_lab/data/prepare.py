"""`tinystories-lab data`: stories -> tokenizer -> token files, each step skipped when already done."""

from __future__ import annotations

from pathlib import Path

from tinystories_lab.data.sources import SPLITS, Separator, load_split, source_name
from tinystories_lab.data.tokenizer import is_tokenizer_dir, load_tokenizer, train_tokenizer
from tinystories_lab.data.tokens import tokens_dir_for, write_tokens


def prepare(
    source: str = "tinystories",
    data_dir: Path = Path("data"),
    tokenizer_dir: Path | None = None,
    vocab_size: int = 32000,
    tokenizer_max_chars: int = 200_000_000,
    separator: Separator = "eot",
    threads: int | None = None,
    seed: int = 42,
) -> Path:
    """Prepare a dataset for training: download or read stories, train a tokenizer, write token files.

    Also counts the validation stories that occur in the training split too (exact match after
    whitespace normalisation), prints the count and records it in meta.json.

    Args:
        source: 'tinystories' (the Hugging Face dataset roneneldan/TinyStories), 'sample' (the bundled
            sample, no network) or a folder holding train.txt and validation.txt.
        data_dir: The project's data folder (tokenizers/, tokens/, and the download cache hf/).
        tokenizer_dir: Tokenizer folder. An existing LitGPT tokenizer folder (for example Llama 2's) is
            used as-is; otherwise a new tokenizer is trained there. Default: data_dir/tokenizers/<source>.
        vocab_size: Vocabulary size of a newly trained tokenizer (lowered, with a message, when the text
            cannot support it).
        tokenizer_max_chars: Train the tokenizer on a seeded random subset of at most this many characters.
        separator: How stories are separated in local text files: 'eot' (<|endoftext|> lines) or 'blank'.
        threads: Encoding threads (default: every core).
        seed: Seed of the tokenizer's training subset.

    Returns the folder of the token files.
    """
    name = source_name(source)
    tokenizer_dir = tokenizer_dir or data_dir / "tokenizers" / name
    splits = {split: load_split(source, split, data_dir, separator) for split in SPLITS}
    for split, stories in splits.items():
        print(f"{split}: {len(stories):,} stories from {source}")
    reused = is_tokenizer_dir(tokenizer_dir)
    if reused:
        print(f"Using the tokenizer in {tokenizer_dir}")
    else:
        print(f"Training a {vocab_size:,}-token BPE tokenizer on {name} -> {tokenizer_dir}")
        train_tokenizer(splits["train"], tokenizer_dir, vocab_size, tokenizer_max_chars, seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    if reused and tokenizer.vocab_size != vocab_size:
        print(
            f"Note: its vocabulary is {tokenizer.vocab_size:,}; --vocab_size {vocab_size:,} applies only to "
            "a new tokenizer (pass another --tokenizer_dir, or delete this one, to train it)."
        )
    tokens_dir = tokens_dir_for(data_dir, name, tokenizer)
    meta = write_tokens(tokenizer, splits, tokens_dir, threads)
    if "validation_in_train" in meta:
        n, of = meta["validation_in_train"]["stories"], meta["splits"]["validation"]["stories"]
        print(
            f"validation: {n:,} of {of:,} stories ({n / of:.1%}) also occur in the training split "
            "(exact match after whitespace normalisation)"
        )
    print(
        f"Token files ready in {tokens_dir} (tokenizer {tokenizer_dir}, vocabulary {tokenizer.vocab_size:,})"
    )
    return tokens_dir
