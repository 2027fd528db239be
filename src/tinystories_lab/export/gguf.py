"""A trained LitGPT model as a GGUF file for llama.cpp (and ollama, LM Studio), written with gguf-py.

Both architectures go through gguf-py's `GGUFWriter` directly, following llama.cpp's own converter
(`convert_hf_to_gguf.py` in the llama-cpp-python 0.3.36 source package):

- LLaMAMLP models become llama.cpp's `llama` architecture. Its RoPE rotates interleaved pairs while
  LitGPT (like `transformers`) rotates halves, so the query and key rows are permuted exactly as the
  converter's `LlamaModel.permute` does. A tied output matrix is left out: llama.cpp reuses
  `token_embd`.
- GptNeoxMLP models become `gptneox`. The converter cannot be used here: it hashes the tokenizer as GPT-2
  BPE, writes no rope theta, and needs a separate `output.weight`. So the output matrix is written even
  when tied, bias-free layers get zero biases (llama.cpp requires them), and LitGPT's fused qkv rows are
  already in the [q; k; v] order llama.cpp slices.

The tokenizer is llama.cpp's `llama` model (SentencePiece): every piece with its score and type (byte
pieces marked as bytes, so byte fallback works), padded to the model's vocabulary as the converter does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from litgpt import Config

from tinystories_lab.errors import UserError
from tinystories_lab.export.hf import unsupported

QUANTS = ("f32", "f16", "q8_0")


def gguf_arch(config: Config) -> str:
    """llama.cpp's architecture name for `config` (refusing what it cannot represent)."""
    reasons = unsupported(config)  # the same maths as the transformers classes, so the same limits
    if reasons:
        raise UserError(f"Cannot export {config.name} to GGUF: {'; '.join(reasons)}.")
    return "gptneox" if config.mlp_class_name == "GptNeoxMLP" else "llama"


def permute_rope(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Half-split RoPE rows (LitGPT, transformers) in llama.cpp's interleaved order (the converter's
    `permute`)."""
    return (
        rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def gguf_tensors(config: Config, lit_state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """LitGPT weights under llama.cpp's tensor names, in fp32 (PyTorch's [out, in] layout, as gguf-py
    takes it)."""
    arch = gguf_arch(config)
    s = {k: v.detach().float().cpu() for k, v in lit_state.items()}

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return s[name] if name in s else torch.zeros(shape)  # a bias-free layer, exactly

    q_rows, kv_rows = config.n_head * config.head_size, config.n_query_groups * config.head_size
    out = {
        "token_embd.weight": s["transformer.wte.weight"],
        "output_norm.weight": s["transformer.ln_f.weight"],
    }
    if arch == "gptneox" or not tied:
        out["output.weight"] = s["lm_head.weight"]
    for i in range(config.n_layer):
        lit, blk = f"transformer.h.{i}.", f"blk.{i}."
        qkv = s[lit + "attn.qkv.weight"]
        if arch == "llama":
            q, k, v = qkv.split([q_rows, kv_rows, kv_rows])
            out |= {
                blk + "attn_norm.weight": s[lit + "norm_1.weight"],
                blk + "attn_q.weight": permute_rope(q, config.n_head),
                blk + "attn_k.weight": permute_rope(k, config.n_query_groups),
                blk + "attn_v.weight": v,
                blk + "attn_output.weight": s[lit + "attn.proj.weight"],
                blk + "ffn_norm.weight": s[lit + "norm_2.weight"],
                blk + "ffn_gate.weight": s[lit + "mlp.fc_1.weight"],
                blk + "ffn_up.weight": s[lit + "mlp.fc_2.weight"],
                blk + "ffn_down.weight": s[lit + "mlp.proj.weight"],
            }
            continue
        n, ff = config.n_embd, config.intermediate_size
        out |= {
            blk + "attn_norm.weight": s[lit + "norm_1.weight"],
            blk + "attn_norm.bias": get(lit + "norm_1.bias", (n,)),
            blk + "attn_qkv.weight": qkv,
            blk + "attn_qkv.bias": get(lit + "attn.qkv.bias", (qkv.shape[0],)),
            blk + "attn_output.weight": s[lit + "attn.proj.weight"],
            blk + "attn_output.bias": get(lit + "attn.proj.bias", (n,)),
            blk + "ffn_norm.weight": s[lit + "norm_2.weight"],
            blk + "ffn_norm.bias": get(lit + "norm_2.bias", (n,)),
            blk + "ffn_up.weight": s[lit + "mlp.fc.weight"],
            blk + "ffn_up.bias": get(lit + "mlp.fc.bias", (ff,)),
            blk + "ffn_down.weight": s[lit + "mlp.proj.weight"],
            blk + "ffn_down.bias": get(lit + "mlp.proj.bias", (n,)),
        }
    if arch == "gptneox":
        out["output_norm.bias"] = get("transformer.ln_f.bias", (config.n_embd,))
    return out


def sentencepiece_vocab(
    model_file: Path, vocab_size: int
) -> tuple[list[bytes], list[float], list[int], object]:
    """Pieces, scores and llama.cpp token types of a SentencePiece model, padded to `vocab_size` with
    unused `[PAD<i>]` pieces as the converter's `_create_vocab_sentencepiece` does; and the model's proto."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec = proto.normalizer_spec
    if spec.name != "identity" or spec.remove_extra_whitespaces:
        raise UserError(
            f"{model_file} normalises text ({spec.name}), which llama.cpp's tokenizer does not: only "
            "SentencePiece models with identity normalisation and kept whitespace export to GGUF."
        )
    if len(proto.pieces) > vocab_size:
        raise UserError(
            f"{model_file} has {len(proto.pieces)} pieces, more than the model's {vocab_size} rows."
        )
    kinds = {
        proto.SentencePiece.NORMAL: gguf.TokenType.NORMAL,
        proto.SentencePiece.UNKNOWN: gguf.TokenType.UNKNOWN,
        proto.SentencePiece.CONTROL: gguf.TokenType.CONTROL,
        proto.SentencePiece.USER_DEFINED: gguf.TokenType.USER_DEFINED,
        proto.SentencePiece.UNUSED: gguf.TokenType.UNUSED,
        proto.SentencePiece.BYTE: gguf.TokenType.BYTE,
    }
    tokens = [p.piece.encode() for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(kinds[p.type]) for p in proto.pieces]
    pad = range(1, vocab_size - len(tokens) + 1)
    tokens += [f"[PAD{i}]".encode() for i in pad]
    scores += [-1000.0] * len(pad)
    types += [int(gguf.TokenType.UNUSED)] * len(pad)
    return tokens, scores, types, proto


def write_gguf(
    path: Path,
    config: Config,
    lit_state: dict[str, torch.Tensor],
    tied: bool,
    tokenizer_model: Path,
    bos_id: int,
    eos_id: int,
    quant: str = "f32",
    context: int | None = None,
) -> None:
    """Write `path`: the model's hyperparameters, tokenizer and weights (`quant`: f32, f16 or q8_0).

    As in the converter, 1-D tensors (norms, biases) stay f32; a matrix whose rows q8_0 cannot split into
    blocks of 32 is written in f16 instead.
    """
    import gguf

    if quant not in QUANTS:
        raise UserError(f"Unknown QUANT {quant!r}: choose one of {', '.join(QUANTS)}.")
    arch = gguf_arch(config)
    tensors = gguf_tensors(config, lit_state, tied)
    tokens, scores, types, proto = sentencepiece_vocab(tokenizer_model, config.padded_vocab_size)

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(config.name)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[quant]
    )
    writer.add_context_length(context or config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_rope_freq_base(float(config.rope_base))
    if arch == "llama":
        writer.add_head_count_kv(config.n_query_groups)
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
        writer.add_rope_dimension_count(config.head_size)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.padded_vocab_size)
    else:
        writer.add_rope_dimension_count(int(config.rotary_percentage * config.head_size))
        writer.add_parallel_residual(config.parallel_residual)
        writer.add_layer_norm_eps(config.norm_eps)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_unk_token_id(proto.trainer_spec.unk_id)
    writer.add_add_bos_token(True)  # every story was trained as [BOS] story [EOS]
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)

    for name, tensor in tensors.items():
        data = tensor.contiguous().numpy().astype(np.float32)
        qtype = gguf.GGMLQuantizationType.F32
        if data.ndim > 1 and quant == "f16":
            qtype = gguf.GGMLQuantizationType.F16
        elif data.ndim > 1 and quant == "q8_0":
            qtype = gguf.GGMLQuantizationType.Q8_0
            if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                qtype = gguf.GGMLQuantizationType.F16
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
