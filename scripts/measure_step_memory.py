"""Peak host memory of one training step of a config, on the CPU: an upper bound for its GPU memory.

Runs forward, backward and an AdamW step under bf16 autocast in eager mode. On a CPU attention is
materialised and nothing is fused, so a GPU with flash attention and torch.compile needs less. This is
how the micro batch sizes in the config pack were chosen (see the comment above each one).

    python scripts/measure_step_memory.py config_hub/pretrain/tiny_stories/gpt_6L_6H_288D.yaml [MICRO]
"""

import resource
import sys

import torch
from litgpt import GPT
from litgpt.utils import chunked_cross_entropy

from tinystories_lab.configs import model_config, parse_config


def main(path: str, micro_batch: int | None = None) -> None:
    cfg = parse_config(path)
    config = model_config(cfg)
    micro_batch = micro_batch or cfg.train.micro_batch_size
    model = GPT(config)
    if cfg.train.tie_embeddings:
        model.transformer.wte.weight = model.lm_head.weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seq_len = cfg.train.max_seq_length
    batch = torch.randint(0, config.vocab_size, (micro_batch, seq_len + 1))
    for _ in range(2):  # the second step has AdamW's state allocated
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    print(f"{path}: micro batch {micro_batch} x {seq_len} tokens, peak {peak_gib:.1f} GiB")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
