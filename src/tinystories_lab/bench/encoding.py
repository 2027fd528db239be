"""`tinystories-lab bench-data`: token-file encoding throughput with 1 thread and with every core."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tinystories_lab.data.sources import load_split
from tinystories_lab.data.tokenizer import load_tokenizer
from tinystories_lab.data.tokens import write_split
from tinystories_lab.hardware import cpu_count


def bench_data(
    source: str = "sample",
    tokenizer_dir: Path = Path("data/tokenizers/sample"),
    split: str = "train",
    repeats: int = 5,
) -> dict:
    """Time `write_split` (encode + write the token file) with 1 thread and with every core.

    Args:
        source: Stories to encode ('sample', 'tinystories' or a folder of .txt files).
        tokenizer_dir: Tokenizer to encode with (`make data-sample` makes the default one).
        split: Which split to encode.
        repeats: Runs per setting; the fastest counts.
    """
    tokenizer = load_tokenizer(tokenizer_dir)
    stories = load_split(source, split)
    n_bytes = sum(len(s.encode()) for s in stories)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for threads in sorted({1, cpu_count()}):
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                counts = write_split(
                    tokenizer, stories, Path(tmp) / "bench.bin", threads, desc=f"{threads} thr"
                )
                best = min(best, time.perf_counter() - t0)
            results[threads] = {
                "seconds": best,
                "MB_per_s": n_bytes / best / 1e6,
                "tokens_per_s": counts["tokens"] / best,
            }
    print(f"Encoding {len(stories):,} {source} stories ({n_bytes / 1e6:.1f} MB) with {tokenizer_dir}:")
    for threads, r in results.items():
        print(
            f"  {threads:>2} thread(s): {r['MB_per_s']:6.2f} MB/s  {r['tokens_per_s'] / 1e6:6.2f} M tokens/s"
        )
    if len(results) > 1:
        ratio = results[cpu_count()]["tokens_per_s"] / results[1]["tokens_per_s"]
        print(f"  scaling: {ratio:.2f}x with {cpu_count()} cores")
    return results
