"""What the instruments read: validation windows and stories from a model's token files, random repeated
sequences, and printable token labels."""

from __future__ import annotations

import numpy as np
import torch
from litgpt import Tokenizer

from tinystories_lab.data.datamodule import ValWindows
from tinystories_lab.errors import UserError
from tinystories_lab.models import TrainedModel, training_data


def validation_tokens(trained: TrainedModel) -> np.ndarray:
    """The validation split of the data the model was trained on (its `hyperparameters.yaml` names it)."""
    return training_data(trained).split("validation")  # refuses missing files, naming the command


def validation_windows(tokens: np.ndarray, seq_len: int, n: int) -> torch.Tensor:
    """The first `n` validation windows (the ones LitGPT validates on) as a tensor (n, seq_len + 1)."""
    windows = ValWindows(tokens, seq_len, limit=n)
    return torch.stack([windows[i] for i in range(len(windows))])


def validation_stories(tokens: np.ndarray, bos_id: int, n: int, max_len: int) -> list[torch.Tensor]:
    """The first `n` validation stories as token ids, each `[BOS] story [EOS]` cut to `max_len` tokens."""
    starts = np.flatnonzero(tokens == bos_id)
    if len(starts) == 0:
        raise UserError("The validation tokens hold no BOS token; re-make them with `make data`.")
    ends = np.append(starts[1:], len(tokens))
    return [
        torch.from_numpy(tokens[s : min(e, s + max_len)].astype(np.int64))
        for s, e in zip(starts[:n], ends[:n])
    ]


def repeated_tokens(
    n: int, period: int, vocab_size: int, bos_id: int, avoid: tuple[int, ...] = (), seed: int = 0
) -> torch.Tensor:
    """`n` sequences `[BOS] r r` of `2 * period + 1` tokens, r drawn without repeats from the vocabulary
    (special ids in `avoid` and BOS left out), for the induction and duplicate-token scores."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(vocab_size) if i != bos_id and i not in avoid])
    if len(allowed) < period:
        raise UserError(f"A vocabulary of {vocab_size} tokens cannot hold {period} distinct random tokens.")
    rows = []
    for _ in range(n):
        r = allowed[torch.randperm(len(allowed), generator=generator)[:period]]
        rows.append(torch.cat([torch.tensor([bos_id]), r, r]))
    return torch.stack(rows)


def score_inputs(
    trained: TrainedModel, tokens: np.ndarray, stories: int, repeats: int, period: int, seed: int, name: str
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What `head_scores` reads, as `interpret` and `interpret-timeline` use it: the first `stories`
    validation stories (cut to the model's context) and `repeats` random repeated sequences of `period`
    tokens."""
    if 2 * period + 1 > trained.max_seq_length:
        raise UserError(
            f"--period {period} makes sequences of {2 * period + 1} tokens; {name} reads "
            f"{trained.max_seq_length}."
        )
    tokenizer = trained.tokenizer
    avoid = (tokenizer.eos_id, 0)  # 0 is <unk> in SentencePiece vocabularies
    return (
        validation_stories(tokens, tokenizer.bos_id, stories, trained.max_seq_length),
        repeated_tokens(repeats, period, tokenizer.vocab_size, tokenizer.bos_id, avoid, seed),
    )


def token_labels(tokenizer: Tokenizer) -> list[str]:
    """A printable string for every token id, leading spaces kept (SentencePiece's '▁' becomes ' ')."""
    if tokenizer.backend == "sentencepiece":
        sp = tokenizer.processor
        return [_piece_text(sp.id_to_piece(i)) for i in range(sp.get_piece_size())]
    vocab = tokenizer.processor.get_vocab_size(with_added_tokens=True)
    return [tokenizer.decode(torch.tensor([i])) for i in range(vocab)]


def _piece_text(piece: str) -> str:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # a byte-fallback piece
        return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
    return piece.replace("▁", " ")


def label(labels: list[str], i: int) -> str:
    """The label of token id `i`, also for ids past the tokenizer's vocabulary (padded embedding rows)."""
    return labels[i] if i < len(labels) else f"<{i}>"
