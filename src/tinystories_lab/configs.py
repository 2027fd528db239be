"""The LitGPT config pack: parse configs exactly as `litgpt pretrain` does, and describe them."""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser, capture_parser
from litgpt import GPT, Config

from tinystories_lab.errors import UserError
from tinystories_lab.render import text_table

CONFIG_HUB = Path("config_hub/pretrain/tiny_stories")


def pretrain_parser() -> ArgumentParser:
    """The jsonargparse parser `litgpt pretrain` itself builds from `litgpt.pretrain.setup`."""
    from litgpt.pretrain import setup
    from litgpt.utils import CLI

    return capture_parser(lambda: CLI(setup))


def parse_config(path: Path | str, *overrides: str) -> Namespace:
    """Parse a pretrain config (plus command-line style overrides) into LitGPT's objects.

    Returns the namespace `litgpt pretrain` would run with: `model_config` is a `litgpt.Config`,
    `train` a `TrainArgs`, `data` an instantiated DataModule. Raises `UserError` on a missing or
    malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist. The config pack lives in {CONFIG_HUB}/.")
    try:
        yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"Config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    parser = pretrain_parser()
    try:
        cfg = parser.parse_args(["--config", str(path), *overrides], _skip_validation=False)
    except SystemExit:  # jsonargparse has printed why
        given = f" with {' '.join(overrides)}" if overrides else ""
        raise UserError(f"`litgpt pretrain` rejects config {path}{given}: see the reason above.") from None
    return parser.instantiate_classes(cfg)


MAX_TOKENS_LIMIT = 10**15  # LitGPT's remaining-time display overflows a timedelta far below 2**63 tokens


def check_training(train, world: int) -> None:
    """Refuse `train` settings LitGPT would fail on late or silently change, for `world` processes.

    LitGPT accumulates `global_batch_size // world // micro_batch_size` micro batches per step: a global
    batch that is not a multiple of world x micro batch silently shrinks, one smaller than it fails after
    the initial validation.
    """
    if not isinstance(train.max_tokens, int) or not 0 < train.max_tokens <= MAX_TOKENS_LIMIT:
        raise UserError(
            f"train.max_tokens must be a positive number of tokens up to {MAX_TOKENS_LIMIT:.0e}, "
            f"not {train.max_tokens!r}."
        )
    batch, micro = train.global_batch_size, train.micro_batch_size
    if batch % (world * micro):
        whole = batch // world // micro * world * micro
        effect = f"train on batches of {whole}" if whole else "fail after its first validation"
        fits = ", ".join(str(d) for d in range(1, 65) if batch % (d * micro) == 0)
        raise UserError(
            f"global_batch_size {batch} is not a multiple of processes x micro_batch_size "
            f"({world} x {micro}), so LitGPT would {effect}. With micro batch {micro}, devices x num_nodes "
            f"must be one of {fits}; or change train.micro_batch_size."
        )


def model_config(cfg: Namespace) -> Config:
    """The model's `litgpt.Config`, from `model_config` or, failing that, from `model_name`."""
    return cfg.model_config if cfg.model_config is not None else Config.from_name(cfg.model_name)


def count_parameters(config: Config, tie_embeddings: bool) -> int:
    """True number of trainable parameters; tied embeddings are counted once."""
    with torch.device("meta"):
        model = GPT(config)
    if tie_embeddings:
        model.transformer.wte.weight = model.lm_head.weight
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


def architecture(config: Config) -> str:
    """'gpt' for LayerNorm + GELU MLP models, 'llama' for RMSNorm + SwiGLU ones."""
    return "llama" if config.mlp_class_name == "LLaMAMLP" else "gpt"


@dataclass
class ConfigSummary:
    """What a config trains: its shape, context, batch and true parameter count."""

    name: str
    path: Path
    arch: str
    n_layer: int
    n_head: int
    n_embd: int
    head_size: int
    intermediate_size: int
    block_size: int
    micro_batch_size: int
    parameters: int
    tie_embeddings: bool

    @classmethod
    def from_file(cls, path: Path | str) -> ConfigSummary:
        cfg = parse_config(path)
        config = model_config(cfg)
        return cls(
            name=Path(path).stem,
            path=Path(path),
            arch=architecture(config),
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            head_size=config.head_size,
            intermediate_size=config.intermediate_size,
            block_size=cfg.train.max_seq_length or config.block_size,
            micro_batch_size=cfg.train.micro_batch_size,
            parameters=count_parameters(config, cfg.train.tie_embeddings),
            tie_embeddings=bool(cfg.train.tie_embeddings),
        )


def configs(paths: list[Path] | None = None) -> None:
    """Print each config's shape and true parameter count (tied embeddings counted once).

    Args:
        paths: Config files to describe (default: every YAML file in the config pack).
    """
    paths = paths or sorted(CONFIG_HUB.rglob("*.yaml"))
    summaries = [ConfigSummary.from_file(p) for p in paths]
    header = ["config", "arch", "layers", "heads", "dim", "head", "mlp", "context", "micro", "params"]
    rows = [
        [
            str(s.path.relative_to(CONFIG_HUB) if s.path.is_relative_to(CONFIG_HUB) else s.path),
            s.arch,
            s.n_layer,
            s.n_head,
            s.n_embd,
            s.head_size,
            s.intermediate_size,
            s.block_size,
            s.micro_batch_size,
            f"{s.parameters / 1e6:.2f}M",
        ]
        for s in summaries
    ]
    print(text_table(header, rows))
