"""One command, `tinystories-lab <verb>`, behind every Makefile target (built like `litgpt`'s own CLI)."""

from __future__ import annotations

import sys

from jsonargparse import CLI, set_docstring_parse_options

from tinystories_lab.bench.encoding import bench_data
from tinystories_lab.bench.gpu_check import gpu_check
from tinystories_lab.bench.memory import step_memory
from tinystories_lab.bench.precision import precision
from tinystories_lab.bench.training import bench, bench_sweep
from tinystories_lab.configs import configs
from tinystories_lab.data.prepare import prepare
from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.perplexity import evaluate
from tinystories_lab.evaluate.reference import eval_hf, eval_reference
from tinystories_lab.evaluate.report import report
from tinystories_lab.evaluate.samples import sample
from tinystories_lab.evaluate.speculative import speculative
from tinystories_lab.experiments.listing import list_experiments
from tinystories_lab.experiments.runner import cancel, reset, run_all, run_next, run_specific, slurm_record
from tinystories_lab.export.exporter import export
from tinystories_lab.export.publish import publish
from tinystories_lab.finetune.data import data_instruct
from tinystories_lab.finetune.run import finetune
from tinystories_lab.interpret.run import interpret, interpret_compare
from tinystories_lab.interpret.timeline import interpret_timeline

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
    "report": report,
    "speculative": speculative,
    "data-instruct": data_instruct,
    "finetune": finetune,
    "bench": bench,
    "bench-sweep": bench_sweep,
    "precision": precision,
    "step-memory": step_memory,
    "gpu-check": gpu_check,
    "export": export,
    "publish": publish,
    "interpret": interpret,
    "interpret-compare": interpret_compare,
    "interpret-timeline": interpret_timeline,
}


def main(argv: list[str] | None = None) -> None:
    """Run a verb; a `UserError` becomes one line on stderr and exit status 1."""
    set_docstring_parse_options(attribute_docstrings=True)
    try:
        CLI(COMMANDS, args=argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
