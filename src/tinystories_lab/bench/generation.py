"""`make bench-generate`: greedy generation speed of one model through LitGPT, `transformers` and llama.cpp.

Each variant gets random weights (speed does not depend on them) and is run, in one process, through
LitGPT's `generate` with its KV cache, `transformers`' `generate`, and llama.cpp (llama-cpp-python) from
f32 and q8_0 GGUF files written by `make gguf`'s writer. Every engine continues the same prompt
greedily for the same number of tokens without stopping at EOS, on all cores; tokens/s is new tokens
over the wall time of the call (prompt processing included: the prompt is 5 tokens), the median of
`repeats` timed runs after one untimed warm-up.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from importlib.metadata import version
from pathlib import Path

import torch
from litgpt import GPT, Config
from litgpt.generate.base import generate
from tqdm import tqdm

from tinystories_lab.bench.training import RESULTS_DIR, device_name, resolve_config
from tinystories_lab.configs import count_parameters, model_config, parse_config
from tinystories_lab.errors import UserError
from tinystories_lab.export.gguf import write_gguf
from tinystories_lab.export.gguf_parity import INSTALL_HINT, greedy_llama
from tinystories_lab.export.hf import hf_config, hf_state_dict, write_model
from tinystories_lab.render import markdown_table

PROMPT = [1, 400, 300, 200, 100]  # BOS and four fixed ids: below every config's vocabulary
ENGINES = ("litgpt", "transformers", "llama.cpp f32", "llama.cpp q8_0")


def timed(run: Callable[[], list[int]], n: int, repeats: int) -> dict:
    """Median tokens/s of `run` (which returns its `n` new tokens) over `repeats` runs after a warm-up."""
    out = run()
    if len(out) != n:
        raise RuntimeError(f"expected {n} new tokens, got {len(out)}")
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(n / (time.perf_counter() - start))
    return {"tokens_per_s": statistics.median(rates), "runs": rates}


def engines(config: Config, model: GPT, tokenizer_model: Path, folder: Path, n: int) -> dict[str, Callable]:
    """name -> a function generating `n` greedy tokens after PROMPT with that engine."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    prompt = torch.tensor(PROMPT)

    @torch.inference_mode()
    def litgpt() -> list[int]:
        model.set_kv_cache(batch_size=1)
        out = generate(model, prompt, len(PROMPT) + n, temperature=0.0, include_prompt=False)
        model.clear_kv_cache()
        return out.tolist()

    cfg = hf_config(config, True, bos_id=1, eos_id=2)
    (folder / "hf").mkdir()
    write_model(folder / "hf", cfg, hf_state_dict(config, model.state_dict(), cfg))
    hf_model = AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32).eval()

    @torch.inference_mode()
    def transformers() -> list[int]:
        out = hf_model.generate(
            prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2,
        )  # fmt: skip
        return out[0, len(PROMPT) :].tolist()

    runs = {"litgpt": litgpt, "transformers": transformers}
    for quant in ("f32", "q8_0"):
        path = folder / f"model-{quant}.gguf"
        write_gguf(path, config, model.state_dict(), True, tokenizer_model, 1, 2, quant)
        llm = Llama(model_path=str(path), n_ctx=config.block_size, n_threads=os.cpu_count(), verbose=False)
        runs[f"llama.cpp {quant}"] = lambda llm=llm: greedy_llama(llm, PROMPT, n)
    return runs


def bench_variant(config_path: Path, tokenizer_model: Path, new_tokens: int, repeats: int) -> dict:
    """Tokens/s of every engine for one config with random weights."""
    config = model_config(parse_config(config_path))
    n = min(new_tokens, config.block_size - len(PROMPT))
    torch.manual_seed(0)
    model = GPT(config).eval()
    model.lm_head.weight = model.transformer.wte.weight  # tied, as every config here trains
    with tempfile.TemporaryDirectory() as tmp:
        runs = engines(config, model, tokenizer_model, Path(tmp), n)
        speeds = {name: timed(run, n, repeats) for name, run in runs.items()}
    return {
        "model": config.name,
        "parameters": count_parameters(config, tie_embeddings=True),
        "new_tokens": n,
        "engines": speeds,
    }


def bench_generate(
    model: str = "gpt_demo,llama_demo,llama_6L_6H_288D",
    new_tokens: int = 100,
    repeats: int = 3,
    data_dir: Path = Path("data"),
    out_dir: Path = RESULTS_DIR,
    queues: list[Path] | None = None,
) -> dict:
    """Greedy tokens/s through LitGPT, transformers and llama.cpp (f32, q8_0) for each variant, random
    weights, on this CPU; written to out_dir/<device>-<date>-generate.json and .md.

    Args:
        model: Comma-separated experiment names (or config paths).
        new_tokens: Tokens generated per run (fewer if the context is shorter).
        repeats: Timed runs per engine; the median counts.
        data_dir: Data folder holding the sample's tokenizer (`make data-sample`), padded into each GGUF.
        out_dir: Where the results go.
        queues: Queue files to look experiment names up in.
    """
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    load_before = os.getloadavg()[0]  # on a shared machine the numbers mean little without it
    tokenizer_model = data_dir / "tokenizers" / "sample" / "tokenizer.model"
    if not tokenizer_model.is_file():
        raise UserError(f"{tokenizer_model} is missing: run `make data-sample` first.")
    results = [
        bench_variant(resolve_config(m, queues), tokenizer_model, new_tokens, repeats)
        for m in tqdm(model.split(","), desc="bench-generate", unit="model")
    ]
    report = {
        "device": device_name(torch.device("cpu")),
        "date": date.today().isoformat(),
        "threads": {"torch": torch.get_num_threads(), "llama.cpp": os.cpu_count()},
        "versions": {p: version(p) for p in ("torch", "litgpt", "transformers", "llama-cpp-python")},
        "repeats": repeats,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "results": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report['device']}-{report['date']}-generate"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(generate_page(report) + "\n")
    print(generate_page(report))
    print(f"Results: {out_dir / stem}.json and .md")
    return report


def generate_page(report: dict) -> str:
    """The report as Markdown: one row per model, one column per engine."""
    rows = [
        [r["model"], f"{r['parameters'] / 1e6:.2f}M", r["new_tokens"]]
        + [f"{r['engines'][e]['tokens_per_s']:,.0f}" for e in ENGINES]
        for r in report["results"]
    ]
    caption = (
        f"Greedy generation, tokens/s, random weights. Device: {report['device']}, {report['date']}; "
        f"threads: torch {report['threads']['torch']}, llama.cpp {report['threads']['llama.cpp']}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + f". Median of {report['repeats']} runs after a warm-up. 1-minute load average "
        + "{before:.1f} before, {after:.1f} after.".format(**report["load_average_1min"])
    )
    return "\n".join([caption, "", markdown_table(["model", "parameters", "new tokens", *ENGINES], rows)])
