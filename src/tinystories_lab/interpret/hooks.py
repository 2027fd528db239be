"""Hook points on LitGPT's `GPT`: read or replace activations during a forward pass, on the model as it is.

A site names one activation of block `layer` (shapes for a batch of B sequences of T tokens):

    resid.pre   the residual stream entering the block                     (B, T, n_embd)
    attn.z      every head's output side by side: the input of `attn.proj`  (B, T, n_head * head_size)
    mlp.act     the MLP's neurons: the input of `mlp.proj`                   (B, T, intermediate_size)
                (GptNeoxMLP: gelu(fc x); LLaMAMLP: silu(fc_1 x) * fc_2 x)
    mlp.out     the MLP's output, before it is added to the residual stream (B, T, n_embd)
    resid.post  the residual stream leaving the block                       (B, T, n_embd)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Literal

import torch
from litgpt import GPT
from litgpt.model import CausalSelfAttention, GptNeoxMLP, LLaMAMLP

from tinystories_lab.errors import UserError
from tinystories_lab.models import TrainedModel

Site = Literal["resid.pre", "attn.z", "mlp.act", "mlp.out", "resid.post"]
Hook = Callable[[torch.Tensor], "torch.Tensor | None"]
"""Called with a site's activation; returns a tensor to use in its place, or None to leave it as it is."""

# site -> (submodule of the block, whether the activation is that submodule's input or its output)
SITES: dict[str, tuple[str, bool]] = {
    "resid.pre": ("", True),
    "attn.z": ("attn.proj", True),
    "mlp.act": ("mlp.proj", True),
    "mlp.out": ("mlp", False),
    "resid.post": ("", False),
}


def gpt_of(model: GPT | TrainedModel) -> GPT:
    """The LitGPT module inside `model`, checked to be a shape the instruments understand."""
    gpt = model.model if isinstance(model, TrainedModel) else model
    c = gpt.config
    unsupported = [
        (c.latent_attention, "latent attention"),
        (c.sliding_window_size is not None, "sliding-window attention"),
        (c.attention_logit_softcapping is not None, "attention logit softcapping"),
        (c.final_logit_softcapping is not None, "final logit softcapping"),
        (not all(isinstance(b.attn, CausalSelfAttention) for b in gpt.transformer.h), "custom attention"),
        (
            not all(isinstance(b.mlp, (GptNeoxMLP, LLaMAMLP)) for b in gpt.transformer.h),
            "a mixture of experts",
        ),
    ]
    for found, what in unsupported:
        if found:
            raise UserError(
                f"{c.name} uses {what}; the interpretability instruments support GPT and LLaMA blocks."
            )
    return gpt


def is_gated(model: GPT | TrainedModel) -> bool:
    """Whether the MLP is gated (LLaMAMLP: SwiGLU), as opposed to GptNeoxMLP's plain GELU."""
    return isinstance(gpt_of(model).transformer.h[0].mlp, LLaMAMLP)


@contextmanager
def hooks(model: GPT | TrainedModel, fns: dict[tuple[int, Site], Hook]) -> Iterator[None]:
    """Call `fns[(layer, site)]` on that activation in every forward pass inside the `with` block."""
    gpt = gpt_of(model)
    handles = []
    try:
        for (layer, site), fn in fns.items():
            if site not in SITES:
                raise ValueError(f"Unknown site {site!r}; choose one of {', '.join(SITES)}.")
            path, is_input = SITES[site]
            module = gpt.transformer.h[layer].get_submodule(path)
            if is_input:
                handles.append(module.register_forward_pre_hook(partial(_on_input, fn)))
            else:
                handles.append(module.register_forward_hook(partial(_on_output, fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record(
    model: GPT | TrainedModel, sites: Iterable[tuple[int, Site]]
) -> Iterator[dict[tuple[int, Site], torch.Tensor]]:
    """Keep the activation at each (layer, site), detached, from the last forward pass inside the block."""
    acts: dict[tuple[int, Site], torch.Tensor] = {}

    def keep(key: tuple[int, Site], x: torch.Tensor) -> None:
        acts[key] = x.detach()

    with hooks(model, {key: partial(keep, key) for key in sites}):
        yield acts


def _on_input(fn: Hook, module: torch.nn.Module, args: tuple) -> tuple | None:
    # LitGPT passes activations positionally: args[0] is the activation, the rest (RoPE, masks) stays.
    out = fn(args[0])
    return None if out is None else (out, *args[1:])


def _on_output(fn: Hook, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    return fn(output)
