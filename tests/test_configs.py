"""The config pack: every config parses through LitGPT's own CLI and matches the recipe (docs/recipe.md)."""

import pytest
from conftest import CONFIG_HUB
from litgpt import Config
from litgpt.args import TrainArgs

from tinystories_lab.configs import count_parameters, model_config, parse_config

# docs/recipe.md, Models: layers, heads, dim, head size, MLP hidden, context.
SHAPES = {
    "6L_6H_288D": dict(n_layer=6, n_head=6, n_embd=288, head_size=48, intermediate_size=768, block_size=256),
    "8L_8H_768D": dict(n_layer=8, n_head=8, n_embd=768, head_size=96, intermediate_size=3072, block_size=512),
    "12L_8H_1024D": dict(
        n_layer=12, n_head=8, n_embd=1024, head_size=128, intermediate_size=4096, block_size=512
    ),
}
GPT_PARAMS = {"6L_6H_288D": 13.8e6, "8L_8H_768D": 81.2e6, "12L_8H_1024D": 184.0e6}
LLAMA_PARAMS = {"6L_6H_288D": 15.2e6, "8L_8H_768D": 100.1e6, "12L_8H_1024D": 234.1e6}
VARIANTS = [f"{arch}_{shape}" for shape in SHAPES for arch in ("gpt", "llama")]
BASELINES = ["pythia-70m", "micro-llama-300M", "tiny-llama-1.1b"]
ALL_CONFIGS = sorted(CONFIG_HUB.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses_through_litgpt_cli(path):
    cfg = parse_config(path)
    assert isinstance(cfg.model_config, Config)
    assert isinstance(cfg.train, TrainArgs)
    assert cfg.model_name == cfg.model_config.name == path.stem
    assert cfg.train.tie_embeddings is True
    assert type(cfg.data).__module__.startswith("tinystories_lab.data")
    assert cfg.out_dir.as_posix() == f"experiments/tiny_stories/{path.stem}"
    assert cfg.train.max_seq_length == cfg.model_config.block_size
    assert cfg.model_config.padded_vocab_size >= cfg.model_config.vocab_size


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_matches_the_recipe(name):
    arch, shape = name.split("_", 1)
    cfg = parse_config(CONFIG_HUB / f"{name}.yaml")
    config = model_config(cfg)
    for field, value in SHAPES[shape].items():
        assert getattr(config, field) == value, field
    assert config.padded_vocab_size == 32000
    assert config.rotary_percentage == 1.0 and config.parallel_residual is False and config.bias is False
    expected_blocks = ("LayerNorm", "GptNeoxMLP") if arch == "gpt" else ("RMSNorm", "LLaMAMLP")
    assert (config.norm_class_name, config.mlp_class_name) == expected_blocks
    assert cfg.tokenizer_dir.as_posix() == "data/tokenizers/tinystories"
    assert cfg.data.source == "tinystories"
    assert_recipe_training(cfg)


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_use_the_project_tokenizer_and_settings(name):
    cfg = parse_config(CONFIG_HUB / "baselines" / f"{name}.yaml")
    assert cfg.model_config.padded_vocab_size == 32000
    assert cfg.model_config.block_size == 512
    assert_recipe_training(cfg)


def assert_recipe_training(cfg):
    train = cfg.train
    assert train.global_batch_size == 512
    assert 512 % train.micro_batch_size == 0
    assert train.lr_warmup_steps == 1000
    assert train.max_tokens == 9_700_000_000
    assert train.min_lr == 0.0 and train.max_norm == 1.0
    assert cfg.optimizer["class_path"] == "torch.optim.AdamW"
    assert cfg.optimizer["init_args"]["lr"] == 5e-4
    assert cfg.optimizer["init_args"]["weight_decay"] == 0.1
    assert list(cfg.optimizer["init_args"]["betas"]) == [0.9, 0.95]
    assert cfg.precision == "bf16-mixed"
    assert cfg.seed == 42


@pytest.mark.parametrize("shape", SHAPES)
def test_true_parameter_counts(shape):
    gpt = model_config(parse_config(CONFIG_HUB / f"gpt_{shape}.yaml"))
    llama = model_config(parse_config(CONFIG_HUB / f"llama_{shape}.yaml"))
    n_gpt, n_llama = count_parameters(gpt, tie_embeddings=True), count_parameters(llama, tie_embeddings=True)
    assert abs(n_gpt - GPT_PARAMS[shape]) / GPT_PARAMS[shape] < 0.005
    assert abs(n_llama - LLAMA_PARAMS[shape]) / LLAMA_PARAMS[shape] < 0.005
    # Untied, the embedding matrix would be counted twice.
    assert count_parameters(gpt, tie_embeddings=False) - n_gpt == 32000 * gpt.n_embd


def test_configs_command_prints_every_config(capsys):
    from tinystories_lab.cli import main

    main(["configs"])
    out = capsys.readouterr().out
    for path in ALL_CONFIGS:
        assert path.stem in out
    assert "13.87M" in out and "183.81M" in out
