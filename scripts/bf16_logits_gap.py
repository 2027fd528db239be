"""Why `litgpt pretrain` trails a bare loop in bf16-mixed: measure the cost of fp32 logits.

Lightning Fabric's bf16-mixed plugin converts a model's outputs to fp32, so `litgpt pretrain` computes
the cross-entropy over the 32,000-way vocabulary in fp32, outside autocast. The bare loop of `make bench`
keeps the loss inside autocast. This script times one 6L variant both ways, nothing else different:

    .venv/bin/python scripts/bf16_logits_gap.py inside   # loss in autocast (the bare loop)
    .venv/bin/python scripts/bf16_logits_gap.py fabric   # logits.float(), loss outside (LitGPT via Fabric)

Run one mode per process (the peak is the process's maximum resident memory) after `make data-sample`.
"""

import resource
import statistics
import sys
import time

import lightning as L
import torch
from litgpt.utils import chunked_cross_entropy

from tinystories_lab.bench.bare import build_model, draw_batches
from tinystories_lab.configs import parse_config

CONFIG = "config_hub/pretrain/tiny_stories/gpt_6L_6H_288D.yaml"
MICRO_BATCH, STEPS, WARMUP = 16, 12, 3


def main(mode: str) -> None:
    if mode not in ("inside", "fabric"):
        sys.exit(f"usage: {sys.argv[0]} inside|fabric")
    torch.set_float32_matmul_precision("high")
    cfg = parse_config(
        CONFIG, "--data.init_args.source=sample", "--tokenizer_dir=data/tokenizers/sample",
        "--precision=bf16-mixed", f"--train.micro_batch_size={MICRO_BATCH}",
        f"--train.global_batch_size={MICRO_BATCH}",
    )  # fmt: skip
    batches, _ = draw_batches(cfg, STEPS)
    L.seed_everything(42, verbose=False)
    model = torch.compile(build_model(cfg, torch.device("cpu")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1, betas=(0.9, 0.95))
    times = []
    for x in batches:
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(x[:, :-1])
            if mode == "inside":
                loss = chunked_cross_entropy(logits, x[:, 1:])
        if mode == "fabric":
            loss = chunked_cross_entropy(logits.float(), x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    tokens_per_s = MICRO_BATCH * cfg.train.max_seq_length / statistics.median(times[WARMUP:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{mode}: {tokens_per_s:,.0f} tok/s, peak resident memory {peak:.2f} GiB, loss {loss.item():.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
