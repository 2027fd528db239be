"""The bare reference loop: the same `litgpt.GPT`, batches, precision, compile setting and optimizer as
`litgpt pretrain`, in the shortest fast PyTorch loop. Run in its own process by `bench` (as
`python -m tinystories_lab.bench.bare '<json settings>' <result.json>`) so its memory is measured alone;
it writes its measurements to the result file (its printed output is for people only).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from litgpt import GPT
from litgpt.pretrain import get_lr, initialize_weights
from litgpt.utils import chunked_cross_entropy, instantiate_torch_optimizer

from tinystories_lab.configs import model_config, parse_config
from tinystories_lab.data.tokenizer import load_tokenizer


def draw_batches(cfg, n: int) -> tuple[list[torch.Tensor], float]:
    """The first `n` training batches the config's DataModule yields, and the seconds each took."""
    data = cfg.data
    data.connect(load_tokenizer(cfg.tokenizer_dir), cfg.train.micro_batch_size, cfg.train.max_seq_length)
    data.setup()
    loader = iter(data.train_dataloader())
    t0 = time.perf_counter()
    batches = [next(loader) for _ in range(n)]
    return batches, (time.perf_counter() - t0) / n


def build_model(cfg, device: torch.device) -> GPT:
    """The config's GPT, initialised as `litgpt pretrain` does it (empty init, then GPT-NeoX init), so
    that from the same seed both paths start from the same weights."""
    config = model_config(cfg)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device)
    initialize_weights(SimpleNamespace(strategy=None), model, n_layer=config.n_layer, n_embd=config.n_embd)
    if cfg.train.tie_embeddings:
        model.transformer.wte.weight = model.lm_head.weight
    if cfg.precision == "bf16-true":
        model = model.to(torch.bfloat16)
    model.max_seq_length = cfg.train.max_seq_length
    return model


def train(settings: dict) -> dict:
    """Train `steps` optimizer steps after `warmup` ones; return tokens/s (from the median step time),
    losses and peak memory."""
    cfg = parse_config(settings["config"], *settings["overrides"])
    device = torch.device(settings["device"])
    accum = cfg.train.gradient_accumulation_iters(devices=1, num_nodes=1)
    warmup, steps = settings["warmup"], settings["steps"]
    batches, data_seconds = draw_batches(cfg, (warmup + steps) * accum)
    batches = [b.to(device) for b in batches]

    L.seed_everything(cfg.seed, verbose=False)
    model = build_model(cfg, device)
    if settings["compile"]:
        model = torch.compile(model)
    optimizer = instantiate_torch_optimizer(cfg.optimizer, model.parameters(), fused=device.type == "cuda")
    autocast = torch.autocast(device.type, torch.bfloat16) if cfg.precision == "bf16-mixed" else nullcontext()
    loss_autocast = torch.autocast(device.type, torch.bfloat16) if "bf16" in cfg.precision else nullcontext()
    lr, max_iters = (
        optimizer.defaults["lr"],
        cfg.train.max_tokens // (cfg.train.micro_batch_size * model.max_seq_length),
    )
    warmup_iters = cfg.train.warmup_iters(devices=1, num_nodes=1, max_iters=max_iters, train_dataloader=None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    losses, times, it = [], [], 0
    for _ in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(accum):
            for group in optimizer.param_groups:
                group["lr"] = get_lr(lr, it, warmup_iters, max_iters, cfg.train.min_lr)
            x = batches[it]
            with autocast:
                logits = model(x[:, :-1])
            with loss_autocast:  # bf16 logits: the cross-entropy in fp32, chunk by chunk
                loss = chunked_cross_entropy(logits, x[:, 1:])
            (loss / accum).backward()
            it += 1
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also synchronises, as LitGPT's logging does every step
        times.append(time.perf_counter() - t0)
    step_seconds = statistics.median(times[warmup:])  # robust to a passing disturbance
    return {
        "tokens_per_s": accum * cfg.train.micro_batch_size * cfg.train.max_seq_length / step_seconds,
        "step_seconds": step_seconds,
        "data_seconds_per_step": data_seconds * accum,
        "losses": losses,
        "peak_memory_gib": _peak_memory_gib(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")  # as the `litgpt` CLI sets it
    Path(sys.argv[2]).write_text(json.dumps(train(json.loads(sys.argv[1]))) + "\n")
