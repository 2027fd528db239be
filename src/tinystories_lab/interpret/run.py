"""`tinystories-lab interpret` and `interpret-compare`: every instrument on a trained model, written as files
and pages; then GPT and LLaMA side by side."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tinystories_lab.configs import architecture
from tinystories_lab.errors import UserError
from tinystories_lab.experiments.runs import is_current, out_dir_of
from tinystories_lab.hardware import resolve_device
from tinystories_lab.interpret import pages
from tinystories_lab.interpret.ablation import (
    ablation_effects,
    head_components,
    mlp_components,
    neuron_components,
    write_ablations,
)
from tinystories_lab.interpret.attention import attention_patterns, write_attention
from tinystories_lab.interpret.head_scores import head_scores, top_heads, write_head_scores
from tinystories_lab.interpret.inputs import (
    label,
    score_inputs,
    token_labels,
    validation_stories,
    validation_tokens,
    validation_windows,
)
from tinystories_lab.interpret.logit_lens import logit_lens, write_logit_lens
from tinystories_lab.interpret.neurons import neuron_stats, write_neurons
from tinystories_lab.models import TrainedModel, final_checkpoint_dir, load_trained, select_experiments

COMPARE_DIR = Path("experiments/report/interp")


def interp_dir(model: str, queues: list[Path] | None = None) -> Path:
    """Where `interpret` writes an experiment's results: experiments/tiny_stories/<name>/interp/."""
    return out_dir_of(select_experiments(model, queues)[0]) / "interp"


def interpret(
    model: str,
    story: int = 0,
    text: str | None = None,
    attention_tokens: int = 32,
    stories: int = 16,
    repeats: int = 16,
    period: int = 40,
    windows: int = 64,
    ablation_windows: int = 16,
    top_k: int = 8,
    neurons: int = 20,
    dead_threshold: float = 0.01,
    batch_size: int = 8,
    device: str = "auto",
    seed: int = 0,
    queues: list[Path] | None = None,
) -> Path:
    """Run every interpretability instrument on a trained model, into experiments/tiny_stories/<name>/interp/.

    Attention patterns of one story (PNG grid and interactive HTML), head scores, neuron statistics with top
    activating contexts, zero and mean ablations, and the logit lens, linked from interp/index.md.

    Args:
        model: The experiment's name in the queues; its run's final checkpoint is used.
        story: Which validation story (0 = the first) the attention patterns show.
        text: Show the attention patterns on this text instead of a validation story.
        attention_tokens: Tokens of that story shown (from its BOS on); labels get hard to read beyond ~48.
        stories: Validation stories the previous-token and BOS scores average over.
        repeats: Random repeated sequences the induction and duplicate-token scores average over.
        period: Length of the random sequence repeated in each of them (2 * period + 1 tokens with the BOS).
        windows: Validation windows (the model's context length each) for the neurons and the logit lens.
        ablation_windows: The first this many of them measure the ablations (two passes per component).
        top_k: Top activating contexts kept per neuron.
        neurons: How many of the most selective neurons neurons.md lists and the ablations remove.
        dead_threshold: A neuron whose strength never exceeds this on the windows counts as dead.
        batch_size: Sequences per forward pass.
        device: Where the model runs: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
        seed: Seed of the random repeated sequences.
        queues: Queue files that hold the experiment (default: experiments.yaml and experiments.demo.yaml).
    """
    start = time.perf_counter()
    device = resolve_device(device)
    entry = select_experiments(model, queues)[0]
    trained = load_trained(final_checkpoint_dir(entry), device=device)
    seq_len = trained.max_seq_length
    name = entry["name"]
    tokenizer = trained.tokenizer
    tokens = validation_tokens(trained)
    score_stories, repeated = score_inputs(trained, tokens, stories, repeats, period, seed, name)
    val_stories = validation_stories(tokens, tokenizer.bos_id, story + 1, seq_len)
    if story >= len(val_stories):
        raise UserError(f"--story {story}: the validation split holds {len(val_stories)} stories.")
    shown = (
        tokenizer.encode(text, bos=True)[:attention_tokens] if text else val_stories[story][:attention_tokens]
    )
    out = out_dir_of(entry) / "interp"
    out.mkdir(parents=True, exist_ok=True)
    inputs = Inputs(
        trained=trained,
        out=out,
        name=name,
        what=f"{name}: " + ("the given text" if text else f"validation story {story}"),
        labels=token_labels(tokenizer),
        shown=shown,
        stories=score_stories,
        repeated=repeated,
        windows=validation_windows(tokens, seq_len, windows),
        ablation_windows=ablation_windows,
        top_k=top_k,
        neurons=neurons,
        dead_threshold=dead_threshold,
        batch_size=batch_size,
    )

    results, files = {}, {}
    steps = tqdm(INSTRUMENTS, desc=f"interpret {name}", unit="instrument")
    for key, caption, instrument in steps:
        steps.set_postfix_str(caption)
        results[key], files[key] = instrument(inputs, results)

    settings = dict(
        story=None if text else story,
        text=text,
        attention_tokens=len(shown),
        stories=len(inputs.stories),
        repeats=repeats,
        period=period,
        windows=len(inputs.windows),
        ablation_windows=len(inputs.windows[:ablation_windows]),
        window_tokens=seq_len,
        top_k=top_k,
        neurons=neurons,
        dead_threshold=dead_threshold,
        seed=seed,
    )
    summary = interpret_summary(trained, name, settings, results, time.perf_counter() - start)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lens, stats = results["logit_lens"], results["neurons"]
    index = pages.write_index(out, summary, files, results["ablation"], lens, stats)
    n_files = sum(len(f) for f in files.values()) + 2
    induction, score = summary["top_heads"]["induction"][0]
    print(
        f"{name}: {n_files} files in {out}/ (start at {index.name}) in {time.perf_counter() - start:.0f} s; "
        f"loss {lens['loss'][-1]:.3f} on {len(inputs.windows)} windows, {summary['dead_fraction']:.1%} dead "
        f"neurons, top induction head {induction} ({score:.2f})"
    )
    return out


@dataclass
class Inputs:
    """What the instruments run on: the model, where its files go, and the tokens each one reads."""

    trained: TrainedModel
    out: Path
    name: str
    what: str  # what the attention patterns show, in words
    labels: list[str]
    shown: torch.Tensor  # the tokens whose attention patterns are drawn
    stories: list[torch.Tensor]  # validation stories for the previous-token and BOS scores
    repeated: torch.Tensor  # random repeated sequences for the induction and duplicate-token scores
    windows: torch.Tensor  # validation windows for the neurons, ablations and logit lens
    ablation_windows: int
    top_k: int
    neurons: int
    dead_threshold: float
    batch_size: int


# Each instrument measures, writes its files, and returns (result, files); `done` holds earlier results.
def _attention(x: Inputs, done: dict) -> tuple:
    pattern = attention_patterns(x.trained, x.shown[None].long())[:, 0]
    return pattern, write_attention(pattern, [label(x.labels, i) for i in x.shown.tolist()], x.out, x.what)


def _head_scores(x: Inputs, done: dict) -> tuple:
    scores = head_scores(x.trained, x.stories, x.repeated, x.batch_size)
    return scores, write_head_scores(scores, x.out, x.name)


def _neurons(x: Inputs, done: dict) -> tuple:
    stats = neuron_stats(x.trained, x.windows, x.top_k, x.dead_threshold, x.batch_size)
    return stats, write_neurons(stats, x.windows, x.labels, x.out, x.name, listed=x.neurons)


def _ablations(x: Inputs, done: dict) -> tuple:
    config = x.trained.config
    selective = neuron_components(done["neurons"].most_selective(x.neurons))
    components = head_components(config) + mlp_components(config) + selective
    ablations = ablation_effects(x.trained, x.windows[: x.ablation_windows], components, x.batch_size)
    return ablations, write_ablations(ablations, x.out, x.name)


def _logit_lens(x: Inputs, done: dict) -> tuple:
    lens = logit_lens(x.trained, x.windows, x.batch_size)
    return lens, write_logit_lens(lens, x.out, x.name)


INSTRUMENTS = [  # (key in `files` and the results, progress label, instrument), in the order they run
    ("attention", "attention", _attention),
    ("head_scores", "head scores", _head_scores),
    ("neurons", "neurons", _neurons),
    ("ablation", "ablations", _ablations),
    ("logit_lens", "logit lens", _logit_lens),
]


def interpret_summary(
    trained: TrainedModel, name: str, settings: dict, results: dict, seconds: float
) -> dict:
    """summary.json: the model, the settings, and the headline numbers of the instruments."""
    config = trained.config
    return dict(
        name=name,
        arch=architecture(config),
        shape=dict(
            n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, d_mlp=config.intermediate_size
        ),
        checkpoint=str(trained.checkpoint_dir),
        settings=settings,
        clean_loss=results["ablation"].clean_loss,
        dead_fraction=results["neurons"].dead.float().mean().item(),
        top_heads=top_heads(results["head_scores"]),
        seconds=round(seconds, 1),
    )


def interpret_compare(
    gpt: str, llama: str, device: str = "auto", out_dir: Path = COMPARE_DIR, queues: list[Path] | None = None
) -> Path:
    """Put two runs (a GPT and a LLaMA of one size) side by side: head scores, ablations, logit lens.

    Writes <out_dir>/<gpt>-vs-<llama>.md with its PNGs next to it. A model without interpret results, or
    whose results predate its final checkpoint, gets them first, with the default settings.

    Args:
        gpt: The first experiment (normally the GPT-style one).
        llama: The second experiment (normally the LLaMA-style one of the same size).
        device: Where to run `interpret` for a run that has no results yet: 'auto' (cuda if available,
            else cpu), 'cpu' or 'cuda'.
        out_dir: Folder of the comparison pages (the report links every page in it).
        queues: Queue files that hold the experiments (default: experiments.yaml and experiments.demo.yaml).
    """
    device = resolve_device(device)
    dirs = {}
    for name in (gpt, llama):
        folder = interp_dir(name, queues)
        if not is_current(folder / "summary.json", folder.parent):
            print(f"{name} has no interpret results of its final checkpoint: running `interpret {name}`.")
            interpret(name, device=device, queues=queues)
        dirs[name] = folder
    page = pages.write_comparison(dirs, out_dir)
    print(f"Comparison of {gpt} and {llama}: {page}")
    return page
