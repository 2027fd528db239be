"""One command, `tinystories-lab <verb>`, behind every Makefile target (built like `litgpt`'s own CLI)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from jsonargparse import CLI, set_parsing_settings

from tinystories_lab.bench.encoding import bench_data
from tinystories_lab.bench.generation import bench_generate
from tinystories_lab.bench.gpu_check import gpu_check
from tinystories_lab.bench.memory import step_memory
from tinystories_lab.bench.precision import precision
from tinystories_lab.bench.training import bench, bench_sweep
from tinystories_lab.configs import configs
from tinystories_lab.data.prepare import prepare
from tinystories_lab.data.sources import Separator
from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.perplexity import evaluate_runs
from tinystories_lab.evaluate.quality import quality
from tinystories_lab.evaluate.reference import eval_hf, eval_reference
from tinystories_lab.evaluate.report import report
from tinystories_lab.evaluate.samples import sample
from tinystories_lab.evaluate.speculative import speculative
from tinystories_lab.experiments.listing import list_experiments
from tinystories_lab.experiments.runner import cancel, reset, run_all, run_next, run_specific, slurm_record
from tinystories_lab.export.exporter import export
from tinystories_lab.export.gguf_exporter import gguf
from tinystories_lab.export.publish import publish
from tinystories_lab.export.serve import serve
from tinystories_lab.finetune.data import data_instruct
from tinystories_lab.finetune.evaluate import evaluate_finetunes
from tinystories_lab.finetune.run import finetune
from tinystories_lab.hardware import resolve_device
from tinystories_lab.interpret.run import interpret, interpret_compare
from tinystories_lab.interpret.timeline import interpret_timeline
from tinystories_lab.models import is_finetune, select_checkpoints

# What the imports made lives as long as the process: the garbage collector leaves it alone from here on.
# Lightning's imports leave ~400,000 objects, and every full collection walked them, the several at the
# interpreter's exit included: ~0.7 s more for each command (a training process does the same).
gc.freeze()


def evaluate(
    model: str | None = None,
    text: Path | None = None,
    separator: Separator | None = None,
    queues: list[Path] | None = None,
    batch_size: int = 16,
    device: str = "auto",
) -> list[dict]:
    """Evaluate finished experiments on their final checkpoint; write eval.json next to each run.

    Loss and perplexity cover the whole validation split (every token predicted once); bits per byte
    divides the total loss in bits by the UTF-8 bytes of the evaluated stories, so it compares across
    tokenizers. Training throughput, training-loop time and the tokens needed to first reach a few validation
    losses come from the run's metrics. A fine-tune (`make finetune`) is evaluated against the weights it
    started from: loss per response token on its held-out instructions, and loss on stories, before and after.

    Args:
        model: One experiment's name, or a checkpoint folder (a run's, or a fine-tune's under
            experiments/finetune/) (default: every `done` experiment in the queues).
        text: Evaluate this text file instead of the validation split; written to eval-<file name>.json.
        separator: How stories are separated in `text`: 'eot' or 'blank' (default: 'eot' if the file
            holds <|endoftext|> lines, else 'blank').
        queues: Queue files to look in (default: experiments.yaml and experiments.demo.yaml).
        batch_size: Windows per forward pass.
        device: 'auto' (cuda if available, else cpu), 'cpu' or 'cuda'.
    """
    device = resolve_device(device)
    checkpoints = [checkpoint_dir for _, checkpoint_dir in select_checkpoints(model, queues)]
    tuned = [c for c in checkpoints if is_finetune(c)]
    runs = [c for c in checkpoints if c not in tuned]
    return evaluate_runs(runs, text, separator, batch_size, device) + evaluate_finetunes(
        tuned, text, separator, batch_size, device
    )


COMMANDS = {
    "configs": configs,
    "data": prepare,
    "bench-data": bench_data,
    "list": list_experiments,
    "run-next": run_next,
    "run-specific": run_specific,
    "run-all": run_all,
    "reset": reset,
    "cancel": cancel,
    "slurm-record": slurm_record,
    "eval": evaluate,
    "eval-hf": eval_hf,
    "eval-reference": eval_reference,
    "sample": sample,
    "quality": quality,
    "report": report,
    "speculative": speculative,
    "data-instruct": data_instruct,
    "finetune": finetune,
    "bench": bench,
    "bench-sweep": bench_sweep,
    "bench-generate": bench_generate,
    "precision": precision,
    "step-memory": step_memory,
    "gpu-check": gpu_check,
    "export": export,
    "publish": publish,
    "gguf": gguf,
    "serve": serve,
    "interpret": interpret,
    "interpret-compare": interpret_compare,
    "interpret-timeline": interpret_timeline,
}


def main(argv: list[str] | None = None) -> None:
    """Run a verb; a `UserError` becomes one line on stderr and exit status 1."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        CLI(COMMANDS, args=argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
