"""Interpretability instruments for LitGPT's `GPT`, offline and on CPU: attention patterns, head scores,
neurons, ablations and the logit lens. Each takes a `TrainedModel` (see `tinystories_lab.models`) or a
`litgpt.GPT`; `tinystories-lab interpret` runs them all and writes the pages.

    from tinystories_lab.interpret import attention_patterns, logit_lens, validation_tokens
    from tinystories_lab.interpret import validation_windows
    from tinystories_lab.models import load_trained

    trained = load_trained("experiments/tiny_stories/gpt_demo/final")
    windows = validation_windows(validation_tokens(trained), trained.max_seq_length, 8)
    patterns = attention_patterns(trained, windows[:2, :-1])   # (n_layer, 2, n_head, T, T)
    lens = logit_lens(trained, windows)                         # loss and accuracy after each layer
"""

from tinystories_lab.interpret.ablation import (
    Ablations,
    Component,
    ablate,
    ablation_effects,
    head_components,
    loss,
    mean_activations,
    mlp_components,
    neuron_components,
)
from tinystories_lab.interpret.attention import attention_patterns, pattern_from_qk, recording_qkv
from tinystories_lab.interpret.head_scores import (
    SCORES,
    bos_score,
    duplicate_token_score,
    head_scores,
    induction_score,
    previous_token_score,
)
from tinystories_lab.interpret.hooks import SITES, gpt_of, hooks, record
from tinystories_lab.interpret.inputs import (
    repeated_tokens,
    token_labels,
    validation_stories,
    validation_tokens,
    validation_windows,
)
from tinystories_lab.interpret.logit_lens import logit_lens, unembed
from tinystories_lab.interpret.neurons import NeuronStats, neuron_stats
from tinystories_lab.interpret.run import interpret, interpret_compare
from tinystories_lab.interpret.timeline import in_context_score, interpret_timeline, loss_by_position

__all__ = [
    "SCORES",
    "SITES",
    "Ablations",
    "Component",
    "NeuronStats",
    "ablate",
    "ablation_effects",
    "attention_patterns",
    "bos_score",
    "duplicate_token_score",
    "gpt_of",
    "head_components",
    "head_scores",
    "hooks",
    "in_context_score",
    "induction_score",
    "interpret",
    "interpret_compare",
    "interpret_timeline",
    "logit_lens",
    "loss_by_position",
    "loss",
    "mean_activations",
    "mlp_components",
    "neuron_components",
    "neuron_stats",
    "pattern_from_qk",
    "previous_token_score",
    "record",
    "recording_qkv",
    "repeated_tokens",
    "token_labels",
    "unembed",
    "validation_stories",
    "validation_tokens",
    "validation_windows",
]
