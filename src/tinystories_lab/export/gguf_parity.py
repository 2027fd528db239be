"""Proof that a GGUF file is the trained model in llama.cpp (through llama-cpp-python): same token ids, same
logits, same greedy story; and what quantizing costs in validation loss."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from litgpt.generate.base import generate
from litgpt.model import GPT, GptNeoxMLP

from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.perplexity import window_loss
from tinystories_lab.export.parity import ParityError, logit_batch
from tinystories_lab.models import TrainedModel

TOLERANCE = 1e-3  # max |logit difference| allowed in f32 (llama.cpp sums in another order than PyTorch)
GELU_TABLE_RANGE = 10.0  # ggml's GELU is 0 below -10 and the identity above 10, a table lookup between
GREEDY_TOKENS = 64
GREEDY_PROMPT = "Once upon a time"
QUANT_LOSS_TOLERANCE = 0.05  # nats: a quantized file that loses more than this is broken, not just rounded
INSTALL_HINT = "llama-cpp-python is not installed: run `make install-gguf` (pip install -e '.[gguf]')."


def load_llama(path: Path, context: int):
    """The GGUF file at `path` in llama.cpp, keeping every position's logits, quiet.

    The KV cache is f32: llama.cpp's default f16 cache alone moves the logits by about 1e-3, which would
    hide what the check is for (the file); `make serve` and the speed benchmark keep the default.
    """
    try:
        from llama_cpp import GGML_TYPE_F32, Llama
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return Llama(
        model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
        type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
        n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(), verbose=False,
    )  # fmt: skip


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of `ids` (a fresh sequence)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def check_tokenizer(llm, trained: TrainedModel, texts: list[str]) -> None:
    """llama.cpp must give LitGPT's ids (BOS included) for every text and decode them back to it."""
    tok = trained.tokenizer
    if (llm.token_bos(), llm.token_eos()) != (tok.bos_id, tok.eos_id):
        raise ParityError(
            f"BOS/EOS ids differ: llama.cpp {llm.token_bos()}/{llm.token_eos()}, "
            f"LitGPT {tok.bos_id}/{tok.eos_id}."
        )
    for text in texts:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        if ids != tok.encode(text, bos=True).tolist():
            raise ParityError(f"llama.cpp tokenizes {text[:40]!r} differently from LitGPT.")
        # llama-cpp-python drops the dummy-prefix space only after a leading BOS, so BOS goes in too
        if llm.detokenize(ids).decode(errors="replace") != text:
            raise ParityError(f"llama.cpp does not decode {text[:40]!r} back to itself.")


def llama_cpp_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU as llama.cpp computes it on a CPU in f32 (ggml-cpu/vec.h, GGML_GELU_FP16): the tanh approximation
    looked up in an f16 table, so input and output are rounded to f16."""
    y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -GELU_TABLE_RANGE, 0.0, torch.where(x >= GELU_TABLE_RANGE, x, y))


@contextmanager
def llama_cpp_gelu_in(model: GPT) -> Iterator[None]:
    """Inside the block, `model`'s GPT-NeoX MLPs use llama.cpp's GELU instead of LitGPT's exact one.

    LitGPT's GELU is exact (erf); llama.cpp's differs by up to ~1e-3 per activation, which moves a trained
    GPT's logits by about as much. Comparing against the model with llama.cpp's GELU separates that known
    difference of arithmetic from what the check is for: the file's weights, layout and graph. LLaMA
    models (SwiGLU) are unchanged.
    """
    mlps = [block.mlp for block in model.transformer.h if isinstance(block.mlp, GptNeoxMLP)]
    for mlp in mlps:
        mlp.forward = lambda x, mlp=mlp: mlp.proj(llama_cpp_gelu(mlp.fc(x)))
    try:
        yield
    finally:
        for mlp in mlps:
            del mlp.forward


@torch.no_grad()
def max_logit_diffs(llm, trained: TrainedModel, texts: list[str]) -> tuple[float, float, int]:
    """Largest |logit difference| of llama.cpp against LitGPT on fixed context-length windows: against the
    model as trained, and against the model with llama.cpp's GELU (`llama_cpp_gelu_in`); and how many
    tokens."""
    batch = logit_batch(trained, texts)
    model = trained.model.cpu()
    cpp = np.stack([llama_logits(llm, row.tolist()) for row in batch])
    as_trained = float(np.abs(cpp - model(batch).numpy()).max())
    with llama_cpp_gelu_in(model):
        same_gelu = float(np.abs(cpp - model(batch).numpy()).max())
    return as_trained, same_gelu, batch.numel()


@torch.no_grad()
def greedy_litgpt(trained: TrainedModel, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens from LitGPT's own `generate` (no stop at EOS)."""
    model = trained.model.cpu()
    model.set_kv_cache(batch_size=1)
    out = generate(model, torch.tensor(prompt), len(prompt) + n, temperature=0.0, include_prompt=False)
    model.clear_kv_cache()
    return out.tolist()


def greedy_llama(llm, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens from llama.cpp's own sampler (temperature 0: argmax)."""
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n:
            return out
    return out


def check_greedy(llm, trained: TrainedModel, n: int = GREEDY_TOKENS) -> list[int]:
    """LitGPT (with llama.cpp's GELU, as for the logits) and llama.cpp must continue the fixed prompt with
    the same `n` greedy tokens."""
    prompt = trained.tokenizer.encode(GREEDY_PROMPT, bos=True).tolist()
    n = min(n, trained.max_seq_length - len(prompt))
    with llama_cpp_gelu_in(trained.model):
        lit = greedy_litgpt(trained, prompt, n)
    cpp = greedy_llama(llm, prompt, n)
    if lit != cpp:
        first = next(
            (i for i, (a, b) in enumerate(zip(lit, cpp, strict=False)) if a != b), min(len(lit), len(cpp))
        )
        raise ParityError(f"greedy generation differs from LitGPT's at token {first} of {n}.")
    return lit


def llama_loss(llm, tokens: np.ndarray, context: int, desc: str) -> tuple[float, int]:
    """Mean next-token loss of llama.cpp over `tokens`, windowed exactly as `make eval` does."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.stack([llama_logits(llm, row.tolist()) for row in x]))

    return window_loss(forward, tokens, context, batch_size=1, desc=desc)
