"""Hugging Face export: config mapping, weights, tokenizer, parity, the model card, and refusals."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIG_HUB, ROOT
from litgpt import GPT, Config

from tinystories_lab.errors import UserError
from tinystories_lab.export.hf import hf_config, hf_state_dict, write_model, write_tokenizer
from tinystories_lab.export.parity import EDGE_CASES, TOLERANCE, ParityError

DEMOS = {"gpt_demo": "GPTNeoXForCausalLM", "llama_demo": "LlamaForCausalLM"}
PROMPT = "Once upon a time, there was a little"
EVAL = {
    "name": "gpt_demo", "checkpoint": "experiments/tiny_stories/gpt_demo/final", "arch": "gpt",
    "parameters": 1837312, "tokens_trained": 98304, "steps": 24, "eval_text": "sample validation",
    "context": 128, "windows": 120, "tokens_evaluated": 15360, "bytes_evaluated": 61000, "loss": 3.4567,
    "perplexity": 31.71, "bits_per_byte": 1.2345, "train_tokens_per_s": 25000.0, "train_wall_time_s": 120.0,
    "tokens_to_val_loss": {"4.0": 65536, "2.0": None},
}  # fmt: skip
SAMPLES = {
    "name": "gpt_demo", "checkpoint": "final", "temperature": 0.8, "top_k": 50, "max_new_tokens": 100,
    "samples": [
        {"prompt": "Once upon a time", "seed": 1, "text": "Once upon a time, a cat sat.\nThe end.",
         "tokens": 12, "stopped_at_eos": True},
        {"prompt": "", "seed": 2, "text": "The dog ran.", "tokens": 4, "stopped_at_eos": False},
    ],
}  # fmt: skip


def pack_config(path: Path) -> Config:
    return Config(**yaml.safe_load(path.read_text())["model_config"])


def tiny(**changes) -> Config:
    """A tiny GPT-style config; `changes` turn it into the variant under test."""
    base = dict(
        name="tiny", block_size=32, vocab_size=96, padded_vocab_size=96, n_layer=2, n_head=4, n_embd=32,
        rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP", intermediate_size=64,
    )  # fmt: skip
    return Config(**{**base, **changes})


def snapshot(folder: Path) -> dict:
    """Every file's bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# The config mapping: the class follows the MLP, and every field that changes the maths is carried over.


@pytest.mark.parametrize("path", sorted(CONFIG_HUB.rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_in_the_pack_maps_to_its_transformers_class(path):
    config = pack_config(path)
    cfg = hf_config(config, tie_embeddings=True, bos_id=1, eos_id=2)
    assert cfg["vocab_size"] == config.padded_vocab_size and cfg["tie_word_embeddings"] is True
    if config.mlp_class_name == "GptNeoxMLP":
        assert cfg["architectures"] == ["GPTNeoXForCausalLM"]
        assert cfg["use_parallel_residual"] == config.parallel_residual
        assert (
            cfg["rotary_pct"] == cfg["rope_parameters"]["partial_rotary_factor"] == config.rotary_percentage
        )
        assert (cfg["hidden_act"], cfg["layer_norm_eps"]) == ("gelu", config.norm_eps)
    else:
        assert cfg["architectures"] == ["LlamaForCausalLM"]
        assert (cfg["num_key_value_heads"], cfg["head_dim"]) == (config.n_query_groups, config.head_size)
        assert (cfg["hidden_act"], cfg["rms_norm_eps"]) == ("silu", config.norm_eps)


def test_baselines_keep_what_sets_them_apart():
    pythia = hf_config(pack_config(CONFIG_HUB / "baselines" / "pythia-70m.yaml"), True, 1, 2)
    assert pythia["use_parallel_residual"] and pythia["rotary_pct"] == 0.25 and pythia["attention_bias"]
    gpt = hf_config(pack_config(CONFIG_HUB / "demo" / "gpt_demo.yaml"), True, 1, 2)
    assert not gpt["use_parallel_residual"] and gpt["rotary_pct"] == 1.0
    assert gpt["attention_bias"]  # zeros, but present: TransformerLens's GPT-NeoX adapter needs them
    llama = hf_config(pack_config(CONFIG_HUB / "baselines" / "tiny-llama-1.1b.yaml"), True, 1, 2)
    assert (llama["num_attention_heads"], llama["num_key_value_heads"]) == (32, 4)


@pytest.mark.parametrize(
    "config, reason",
    [
        (tiny(n_query_groups=2), "grouped-query"),
        (tiny(mlp_class_name="LLaMAMLP", norm_class_name="LayerNorm"), "RMSNorm"),
        (tiny(mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm", parallel_residual=True), "parallel"),
        (
            tiny(mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm", rotary_percentage=0.5),
            "rotary_percentage",
        ),
        (tiny(attention_logit_softcapping=30.0), "softcapping"),
    ],
    ids=["neox-gqa", "llama-layernorm", "llama-parallel", "llama-partial-rope", "softcapping"],
)
def test_what_transformers_cannot_represent_is_refused(config, reason):
    with pytest.raises(UserError, match=reason):
        hf_config(config, True, 1, 2)


# Parity on tiny random models, including the baselines' features that the demos lack.


@pytest.mark.parametrize(
    "changes",
    [
        {},
        dict(mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm"),
        dict(parallel_residual=True, rotary_percentage=0.25, bias=True),  # pythia-70m's features
        dict(mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm", n_head=8, n_query_groups=2, head_size=8),
        dict(gelu_approximate="tanh", norm_eps=1e-6, rope_base=500),
    ],
    ids=["gpt", "llama", "parallel-rotary-bias", "llama-gqa", "tanh-eps-base"],
)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_random_tiny_models_give_litgpt_logits_in_transformers(changes, tie, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny(**changes)
    torch.manual_seed(0)
    model = GPT(config)
    if tie:
        model.transformer.wte.weight = model.lm_head.weight
    with torch.no_grad():
        for p in model.parameters():  # norm weights and biases away from 1 and 0, so a dropped one shows
            p.copy_(torch.randn_like(p) * 0.3)
    cfg = hf_config(config, tie, 1, 2)
    write_model(tmp_path, cfg, hf_state_dict(config, model.state_dict(), cfg))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        assert (hf(x).logits - model.eval()(x)).abs().max() < TOLERANCE
    shared = hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert shared == tie


def test_converted_tokenizer_matches_sentencepiece_on_every_sample_story(sample_data, tmp_path):
    from litgpt import Tokenizer
    from transformers import AutoTokenizer

    from tinystories_lab.data.sources import load_split

    lit = Tokenizer(sample_data / "tokenizers" / "sample")
    write_tokenizer(lit, sample_data / "tokenizers" / "sample", tmp_path, model_max_length=128)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token, hf.bos_token_id, hf.eos_token, hf.eos_token_id) == ("<s>", 1, "</s>", 2)
    for text in load_split("sample", "validation") + [*EDGE_CASES, " ", "\n\n", "a  b   c"]:
        ids = hf(text, verbose=False)["input_ids"]
        assert ids == lit.encode(text, bos=True).tolist(), text
        assert hf.decode(ids, skip_special_tokens=True) == text


# Refusals that need no trained model.


def test_an_experiment_without_checkpoint_fails_and_writes_nothing(tmp_path):
    from tinystories_lab.export.exporter import export

    entry = dict(
        name="untrained", config=str(CONFIG_HUB / "demo" / "gpt_demo.yaml"), out_dir=str(tmp_path / "run"),
        devices=1, environment="local", status="todo",
    )  # fmt: skip
    (tmp_path / "queue.yaml").write_text(yaml.safe_dump({"experiments": [entry]}))
    with pytest.raises(UserError, match="untrained has no final checkpoint.*run-specific MODEL=untrained"):
        export("untrained", queues=[tmp_path / "queue.yaml"])
    assert [p.name for p in tmp_path.iterdir()] == ["queue.yaml"]


def test_publish_refuses_without_a_repository_or_a_token(tmp_path):
    from tinystories_lab.export.publish import publish

    with pytest.raises(UserError, match="Name the Hub repository: `make publish MODEL=gpt_demo REPO="):
        publish("gpt_demo", "")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env["HF_HOME"] = str(tmp_path)  # no cached login there
    cmd = [Path(sys.executable).parent / "tinystories-lab", "publish", "gpt_demo", "someone/gpt_demo"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: No Hugging Face token: set HF_TOKEN or run `.venv/bin/hf auth login`, then publish again."
    ]


# The demo models, trained briefly: export and parity, tokenizer, generation, the card, refusals.


@pytest.fixture(scope="module")
def exported(trained_demos, tmp_path_factory) -> dict:
    """Both demo models exported: name -> (hf folder, parity result)."""
    from tinystories_lab.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("exported")
    exported = {}
    for name in DEMOS:  # a private copy of the run, so eval.json written by other tests cannot reach the card
        checkpoint = shutil.copytree(trained_demos[name], out / name / "run" / "final")
        exported[name] = (out / name / "hf", export_checkpoint(checkpoint, out / name / "hf"))
    return exported


@pytest.mark.slow
@pytest.mark.parametrize("name", DEMOS)
def test_demo_models_export_and_pass_the_parity_check(exported, name):
    from safetensors import safe_open

    folder, parity = exported[name]
    assert parity.max_abs_diff < TOLERANCE and parity.logit_tokens == 4 * 128
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json",
    ]  # fmt: skip
    assert sorted(p.name for p in folder.parent.iterdir()) == ["hf", "run"]  # no staging folder left behind
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == [DEMOS[name]] and cfg["tie_word_embeddings"] is True
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert not {"embed_out.weight", "lm_head.weight"} & set(f.keys())  # tied: stored once
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n") and f"\n# {name}\n" in card
    for text in (
        "| tokens seen | 98,304 (24 micro-batches", f"run `make eval MODEL={name}`", "CDLA-Sharing-1.0",
        "arXiv:2305.07759", f"at most {parity.max_abs_diff:.2e} (fp32)",
    ):  # fmt: skip
        assert text in card


@pytest.mark.slow
@pytest.mark.parametrize("name", DEMOS)
def test_autotokenizer_round_trips_sample_stories(exported, trained_demos, name):
    from litgpt import Tokenizer
    from transformers import AutoTokenizer

    from tinystories_lab.data.sources import load_split

    hf = AutoTokenizer.from_pretrained(exported[name][0])
    lit = Tokenizer(trained_demos[name])
    for story in load_split("sample", "validation")[:50]:
        ids = hf(story, verbose=False)["input_ids"]
        assert ids[0] == hf.bos_token_id == 1 and ids == lit.encode(story, bos=True).tolist()
        assert hf.decode(ids, skip_special_tokens=True) == story


@pytest.mark.slow
@pytest.mark.parametrize("name", DEMOS)
def test_greedy_continuation_is_the_same_in_transformers(exported, trained_demos, name):
    from litgpt.generate.base import generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinystories_lab.models import load_trained

    trained = load_trained(trained_demos[name])
    prompt = trained.tokenizer.encode(PROMPT, bos=True)
    trained.model.set_kv_cache(batch_size=1)
    lit = generate(trained.model, prompt, max_returned_tokens=100, temperature=0.0, eos_id=2)
    folder = exported[name][0]
    inputs = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt")
    hf = AutoModelForCausalLM.from_pretrained(folder).generate(**inputs, max_length=100, do_sample=False)
    assert hf[0].tolist() == lit.tolist()
    assert len(lit) > len(prompt) + 10  # it did generate


@pytest.mark.slow
def test_model_card_shows_evaluation_and_samples_when_present(exported, trained_demos, tmp_path):
    from tinystories_lab.export.card import model_card
    from tinystories_lab.models import load_trained

    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    (tmp_path / "samples.json").write_text(json.dumps(SAMPLES))
    folder, parity = exported["gpt_demo"]
    cfg = json.loads((folder / "config.json").read_text())
    card = model_card(load_trained(trained_demos["gpt_demo"]), cfg, parity, run_dir=tmp_path)
    for text in (
        "| loss | 3.4567 nats/token |", "| bits per byte | 1.2345 |", "| tokens to val loss 4.0 | 65,536 |",
        "| val loss not reached | 2.0 |", "> **Once upon a time**, a cat sat.\n> The end.",
        "(seed 1, 12 new tokens, ended at EOS)", "> The dog ran.",
        "(no prompt, from BOS alone; seed 2, 4 new tokens, cut at the token limit)",
    ):  # fmt: skip
        assert text in card
    assert "Not evaluated" not in card and "None (since" not in card
    # Results from before the run was extended (its final checkpoint is newer) are not shown as current.
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "lit_model.pth").write_bytes(b"")
    os.utime(tmp_path / "final" / "lit_model.pth", (time.time() + 60,) * 2)
    card = model_card(load_trained(trained_demos["gpt_demo"]), cfg, parity, run_dir=tmp_path)
    assert "Not evaluated (since its final checkpoint): run `make eval MODEL=gpt_demo`" in card
    assert "None (since its final checkpoint): run `make sample MODEL=gpt_demo`" in card


@pytest.mark.slow
def test_exporting_into_a_folder_holding_another_model_changes_nothing(exported, trained_demos, tmp_path):
    from tinystories_lab.export.exporter import export_checkpoint

    shutil.copytree(exported["gpt_demo"][0], tmp_path / "hf")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for folder in (tmp_path / "hf", tmp_path / "other"):
        before = snapshot(folder)
        with pytest.raises(UserError, match="already holds something other than this model"):
            export_checkpoint(trained_demos["llama_demo"], folder)
        assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "other"]


@pytest.mark.slow
def test_a_failed_check_writes_nothing_and_reexport_replaces_the_same_model(
    exported, trained_demos, tmp_path, monkeypatch
):
    from tinystories_lab.export import parity
    from tinystories_lab.export.exporter import export_checkpoint

    target = tmp_path / "hf"
    shutil.copytree(exported["gpt_demo"][0], target)
    (target / "README.md").write_text("a stale card")
    before = snapshot(target)
    monkeypatch.setattr(parity, "TOLERANCE", -1.0)  # no model passes
    for folder in (target, tmp_path / "new" / "hf"):
        with pytest.raises(ParityError, match="logits differ from LitGPT's"):
            export_checkpoint(trained_demos["gpt_demo"], folder)
    assert snapshot(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "new"]
    assert not any((tmp_path / "new").iterdir())
    monkeypatch.undo()
    export_checkpoint(trained_demos["gpt_demo"], target)  # the same weights: the folder is replaced
    assert (target / "model.safetensors").read_bytes() == before["model.safetensors"][0]
    assert (target / "README.md").read_text().startswith("---\nlicense: apache-2.0")
