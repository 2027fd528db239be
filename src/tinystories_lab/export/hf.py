"""A trained LitGPT model as a Hugging Face `transformers` folder: config, weights, tokenizer files.

GptNeoxMLP models become `GPTNeoXForCausalLM`, LLaMAMLP models `LlamaForCausalLM`. The weight layout
comes from LitGPT's own converter (`litgpt convert_from_litgpt`); this module adds what that converter
leaves out: the config, zero biases where `transformers` has biases and the model has none, tied
embeddings, and a tokenizer `AutoTokenizer` loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from litgpt import Config, Tokenizer
from litgpt.scripts.convert_lit_checkpoint import copy_weights_gpt_neox, copy_weights_llama
from safetensors.torch import save_file

from tinystories_lab.errors import UserError

ARCHITECTURES = {"GptNeoxMLP": "GPTNeoXForCausalLM", "LLaMAMLP": "LlamaForCausalLM"}
# The output matrix each architecture drops from its weights file when it is tied to the input embedding.
OUTPUT_WEIGHT = {"GPTNeoXForCausalLM": "embed_out.weight", "LlamaForCausalLM": "lm_head.weight"}
# How this project's token files mark stories ([BOS] story [EOS]), written into config.json so that
# `make eval-hf` scores an export as it was trained (transformers keeps unknown keys as attributes).
BOUNDARY_KEY = "tinystories_lab_story_boundary"
GELU = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}  # LitGPT's `gelu_approximate` -> HF `hidden_act`
# LitGPT options neither architecture has: exporting needs them at their defaults.
UNMAPPED_OPTIONS = (
    "norm_qk", "post_attention_norm", "post_mlp_norm", "shared_attention_norm", "attention_scores_scalar",
    "sliding_window_size", "attention_logit_softcapping", "final_logit_softcapping", "rope_condense_ratio",
    "rope_adjustments", "rope_interleave", "scale_embeddings", "lm_head_bias", "n_expert", "latent_attention",
    "rope_local_base_freq", "norm_1", "norm_2",
)  # fmt: skip


def unsupported(config: Config) -> list[str]:
    """What in `config` its `transformers` class cannot represent (empty if nothing)."""
    reasons = []
    if config.mlp_class_name not in ARCHITECTURES:
        reasons.append(f"mlp_class_name {config.mlp_class_name} (only GptNeoxMLP and LLaMAMLP export)")
    elif config.mlp_class_name == "GptNeoxMLP":
        if config.norm_class_name != "LayerNorm":
            reasons.append("GPT-NeoX needs LayerNorm")
        if config.n_query_groups != config.n_head:
            reasons.append("GPT-NeoX has no grouped-query attention (n_query_groups != n_head)")
        if config.n_head * config.head_size != config.n_embd:
            reasons.append("GPT-NeoX needs head_size * n_head == n_embd")
        if config.gelu_approximate not in GELU:
            reasons.append(f"gelu_approximate {config.gelu_approximate}")
    else:
        if config.norm_class_name != "RMSNorm":
            reasons.append("Llama needs RMSNorm")
        if config.parallel_residual:
            reasons.append("Llama has no parallel residual")
        if config.bias or config.attn_bias:
            reasons.append("LitGPT's Llama weight mapping has no biases")
        if config.rotary_percentage != 1.0:
            reasons.append("Llama rotates whole heads (rotary_percentage must be 1.0)")
    defaults = Config()
    reasons += [
        f"{o}={getattr(config, o)}" for o in UNMAPPED_OPTIONS if getattr(config, o) != getattr(defaults, o)
    ]
    if "Gemma" in config.name or "OLMo" in config.name:  # LitGPT changes its norms for these names
        reasons.append(f"the name {config.name!r}")
    return reasons


def hf_config(config: Config, tie_embeddings: bool, bos_id: int, eos_id: int) -> dict:
    """The `config.json` of `config` (refusing what the target architecture cannot represent)."""
    reasons = unsupported(config)
    if reasons:
        raise UserError(f"Cannot export {config.name} to transformers: {'; '.join(reasons)}.")
    common = {
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.block_size,
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": "float32",
        BOUNDARY_KEY: "bos_eos",
    }
    rope = {"rope_type": "default", "rope_theta": config.rope_base}
    if config.mlp_class_name == "GptNeoxMLP":
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            **common,
            "hidden_act": GELU[config.gelu_approximate],
            "layer_norm_eps": config.norm_eps,
            "use_parallel_residual": config.parallel_residual,
            # transformers 5.3 reads the rotary fraction from `rotary_pct` only (0.25 when it is missing,
            # whatever `rope_parameters` says); `rotary_emb_base` is the classic key beside it.
            "rotary_pct": config.rotary_percentage,
            "rotary_emb_base": config.rope_base,
            "rope_parameters": {**rope, "partial_rotary_factor": config.rotary_percentage},
            # Always on (zero for bias-free models): tools that read GPT-NeoX, e.g. TransformerLens's
            # adapter, expect a query_key_value bias.
            "attention_bias": True,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **common,
        "hidden_act": "silu",
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_parameters": rope,
        "attention_bias": False,
        "mlp_bias": False,
    }


def hf_state_dict(
    config: Config, lit_state: dict[str, torch.Tensor], hf_cfg: dict
) -> dict[str, torch.Tensor]:
    """LitGPT weights under `transformers` names, with zero biases where `transformers` expects some.

    Checked against the keys and shapes of the `transformers` model built from `hf_cfg`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    copy = copy_weights_gpt_neox if config.mlp_class_name == "GptNeoxMLP" else copy_weights_llama
    state: dict[str, torch.Tensor] = {}
    copy(config, state, lit_state)
    arch = hf_cfg["architectures"][0]
    if hf_cfg["tie_word_embeddings"]:
        del state[OUTPUT_WEIGHT[arch]]
    auto_config = AutoConfig.for_model(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(auto_config).state_dict()
    if hf_cfg["tie_word_embeddings"]:
        del expected[OUTPUT_WEIGHT[arch]]
    for name, meta in expected.items():
        if name not in state and name.endswith(".bias"):
            state[name] = torch.zeros(meta.shape, dtype=torch.float32)  # a bias-free layer, exactly
    missing, extra = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong = [n for n in expected.keys() & state.keys() if expected[n].shape != state[n].shape]
    if missing or extra or wrong:
        raise RuntimeError(
            f"the weight mapping is off: missing {missing}, unexpected {extra}, wrong shape {wrong}"
        )
    return {name: t.detach().to(torch.float32).contiguous().clone() for name, t in state.items()}


def write_model(folder: Path, hf_cfg: dict, state: dict[str, torch.Tensor]) -> None:
    """`config.json`, `model.safetensors` and `generation_config.json` in `folder`."""
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    bos, eos = hf_cfg["bos_token_id"], hf_cfg["eos_token_id"]
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}  # no pad token: use EOS
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def write_tokenizer(tokenizer: Tokenizer, tokenizer_dir: Path, folder: Path, model_max_length: int) -> None:
    """Tokenizer files `AutoTokenizer` loads: LitGPT's `tokenizer.json`, or one converted from its
    `tokenizer.model` (copied too), and a `tokenizer_config.json` naming BOS and EOS."""
    bos, eos = token_name(tokenizer, tokenizer.bos_id), token_name(tokenizer, tokenizer.eos_id)
    if (tokenizer_dir / "tokenizer.json").is_file():  # LitGPT prefers it too
        shutil.copy(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    else:
        sentencepiece_to_tokenizers(tokenizer_dir / "tokenizer.model", bos).save(
            str(folder / "tokenizer.json")
        )
        shutil.copy(tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    tokenizer_config = {
        # The generic fast class loads tokenizer.json as it is; transformers 5's LlamaTokenizer would
        # rebuild the pipeline and lose leading spaces.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def token_name(tokenizer: Tokenizer, token_id: int) -> str:
    """The text of a token id, e.g. "<s>"."""
    if tokenizer.backend == "sentencepiece":
        return tokenizer.processor.id_to_piece(token_id)
    return tokenizer.processor.id_to_token(token_id)


def sentencepiece_to_tokenizers(model_file: Path, bos: str):
    """A `tokenizers.Tokenizer` that encodes and decodes exactly as the SentencePiece BPE model does
    (with BOS added, as LitGPT does)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec = proto.normalizer_spec
    if (
        proto.trainer_spec.model_type != proto.trainer_spec.BPE
        or spec.name != "identity"
        or spec.remove_extra_whitespaces
        or any(p.type == p.USER_DEFINED for p in proto.pieces)
    ):
        raise UserError(
            f"{model_file} does not convert to tokenizer.json: only SentencePiece BPE models with identity "
            "normalisation, kept whitespace and no user-defined pieces do (as this project's tokenizers)."
        )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # SentencePiece BPE merges the adjacent pair whose union scores highest; pieces are stored in score
    # order, so ranking every split of a normal piece by the piece's id gives the same merges.
    merges = []
    for p in proto.pieces:
        if p.type == p.NORMAL:
            splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))]
            splits = [(a, b) for a, b in splits if a in vocab and b in vocab]
            merges += sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )
    # SentencePiece's `add_dummy_prefix` prepends "▁" to every text, even one that starts with spaces;
    # the Metaspace pre-tokenizer transformers uses for Llama skips it there, and loses a space.
    prefix = [normalizers.Prepend("▁")] if spec.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    specials = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return tokenizer
