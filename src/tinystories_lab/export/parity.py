"""Proof that an exported folder is the trained model: same tokens and same logits in `transformers`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tinystories_lab.data.sources import load_split
from tinystories_lab.errors import UserError
from tinystories_lab.models import TrainedModel

TOLERANCE = 1e-4  # max |logit difference| allowed in fp32
# Texts where a converted tokenizer most easily drifts from SentencePiece: leading, repeated and
# trailing whitespace, newlines, and characters only byte fallback encodes.
EDGE_CASES = (
    "  Two leading spaces.",
    "\nA newline first, and one last.\n",
    "Tabs\tand  double  spaces ",
    "Ünïcödé, emoji 🦄 and 数字 123.",
    "",
)


class ParityError(UserError):
    """The exported folder does not reproduce LitGPT's tokens or logits (so the export writes nothing)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"Parity check failed, nothing exported: {detail}")


@dataclass
class Parity:
    """The outcome of a passed check."""

    max_abs_diff: float
    logit_tokens: int
    texts: int

    def summary(self) -> str:
        return (
            f"parity: max |logit diff| {self.max_abs_diff:.2e} < {TOLERANCE:.0e} over {self.logit_tokens:,} "
            f"tokens; tokenization identical on {self.texts} texts"
        )


def parity_texts(n_stories: int = 8) -> list[str]:
    """A fixed set of texts: the first stories of the bundled sample's validation split, and edge cases."""
    return load_split("sample", "validation")[:n_stories] + list(EDGE_CASES)


def logit_batch(trained: TrainedModel, texts: list[str], rows: int = 4) -> torch.Tensor:
    """`rows` windows of the model's context length, cut from `[BOS] text [EOS]` repeated (as in training)."""
    tok = trained.tokenizer
    stream: list[int] = []
    while len(stream) < rows * trained.max_seq_length:
        for text in texts:
            stream += tok.encode(text, bos=True, eos=True).tolist()
    return torch.tensor(stream[: rows * trained.max_seq_length]).view(rows, trained.max_seq_length)


@torch.no_grad()
def check_parity(trained: TrainedModel, folder: Path, texts: list[str], device: str = "cpu") -> Parity:
    """Load `folder` with `transformers` and compare it with `trained` (fp32, on `device`).

    Tokenization: `AutoTokenizer` must give LitGPT's ids (BOS included) for every text and decode them
    back to the text. Logits: on a fixed batch the largest absolute difference must be under TOLERANCE.
    Raises `ParityError` otherwise.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # the export prints one summary line, not a loading bar
    hf_tok = AutoTokenizer.from_pretrained(folder)
    lit_tok = trained.tokenizer
    if (hf_tok.bos_token_id, hf_tok.eos_token_id) != (lit_tok.bos_id, lit_tok.eos_id):
        raise ParityError(
            f"BOS/EOS ids differ: transformers {hf_tok.bos_token_id}/{hf_tok.eos_token_id}, "
            f"LitGPT {lit_tok.bos_id}/{lit_tok.eos_id}."
        )
    for text in texts:
        ids = hf_tok(text, verbose=False)["input_ids"]  # no warning for stories longer than the context
        if ids != lit_tok.encode(text, bos=True).tolist():
            raise ParityError(f"tokenization differs from LitGPT's on {text[:40]!r}.")
        if hf_tok.decode(ids, skip_special_tokens=True) != text:
            raise ParityError(f"transformers does not decode {text[:40]!r} back to itself.")

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise ParityError(f"transformers did not load every weight exactly: {info}.")
    batch = logit_batch(trained, texts).to(device)
    diff = (model.to(device).eval()(batch).logits - trained.model.to(device)(batch)).abs().max().item()
    if not diff < TOLERANCE:  # also catches NaN
        raise ParityError(f"logits differ from LitGPT's by up to {diff:.3g} (allowed {TOLERANCE:.0e}).")
    return Parity(max_abs_diff=diff, logit_tokens=batch.numel(), texts=len(texts))
