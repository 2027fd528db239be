"""`tinystories-lab interpret` and `interpret-compare`: every instrument on a trained model, written as files
and pages; then GPT and LLaMA side by side."""

from __future__ import annotations

import json
import time
from pathlib import Path

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
    repeated_tokens,
    token_labels,
    validation_stories,
    validation_tokens,
    validation_windows,
)
from tinystories_lab.interpret.logit_lens import logit_lens, write_logit_lens
from tinystories_lab.interpret.neurons import neuron_stats, write_neurons
from tinystories_lab.models import final_checkpoint_dir, load_trained, select_experiments

REPORT_DIR = Path("experiments/report/interp")


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
        model: Experiment name, as in experiments.yaml or experiments.demo.yaml; its final checkpoint is used.
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
    config, tokenizer = trained.config, trained.tokenizer
    seq_len = trained.max_seq_length
    if 2 * period + 1 > seq_len:
        raise UserError(
            f"--period {period} makes sequences of {2 * period + 1} tokens; {model} reads {seq_len}."
        )
    out = out_dir_of(entry) / "interp"
    out.mkdir(parents=True, exist_ok=True)
    name = entry["name"]

    tokens = validation_tokens(trained)
    labels = token_labels(tokenizer)
    val_stories = validation_stories(tokens, tokenizer.bos_id, max(stories, story + 1), seq_len)
    if story >= len(val_stories):
        raise UserError(f"--story {story}: the validation split holds {len(val_stories)} stories.")
    shown = (
        tokenizer.encode(text, bos=True)[:attention_tokens] if text else val_stories[story][:attention_tokens]
    )
    val_windows = validation_windows(tokens, seq_len, windows)
    avoid = (tokenizer.eos_id, 0)  # 0 is <unk> in SentencePiece vocabularies
    repeated = repeated_tokens(repeats, period, tokenizer.vocab_size, tokenizer.bos_id, avoid, seed)

    steps = tqdm(total=5, desc=f"interpret {name}", unit="instrument")
    files = {}
    steps.set_postfix_str("attention")
    pattern = attention_patterns(trained, shown[None].long())[:, 0]
    what = f"{name}: " + ("the given text" if text else f"validation story {story}")
    files["attention"] = write_attention(pattern, [label(labels, i) for i in shown.tolist()], out, what)
    steps.update()

    steps.set_postfix_str("head scores")
    scores = head_scores(trained, val_stories[:stories], repeated, batch_size)
    files["head_scores"] = write_head_scores(scores, out, name)
    steps.update()

    steps.set_postfix_str("neurons")
    stats = neuron_stats(trained, val_windows, top_k, dead_threshold, batch_size)
    files["neurons"] = write_neurons(stats, val_windows, labels, out, name, listed=neurons)
    steps.update()

    steps.set_postfix_str("ablations")
    selective = neuron_components(stats.most_selective(neurons))
    components = head_components(config) + mlp_components(config) + selective
    ablations = ablation_effects(trained, val_windows[:ablation_windows], components, batch_size)
    files["ablation"] = write_ablations(ablations, out, name)
    steps.update()

    steps.set_postfix_str("logit lens")
    lens = logit_lens(trained, val_windows, batch_size)
    files["logit_lens"] = write_logit_lens(lens, out, name)
    steps.update()
    steps.close()

    summary = dict(
        name=name,
        arch=architecture(config),
        shape=dict(
            n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, d_mlp=config.intermediate_size
        ),
        checkpoint=str(trained.checkpoint_dir),
        settings=dict(
            story=None if text else story,
            text=text,
            attention_tokens=len(shown),
            stories=min(stories, len(val_stories)),
            repeats=repeats,
            period=period,
            windows=len(val_windows),
            ablation_windows=len(val_windows[:ablation_windows]),
            window_tokens=seq_len,
            top_k=top_k,
            neurons=neurons,
            dead_threshold=dead_threshold,
            seed=seed,
        ),
        clean_loss=ablations.clean_loss,
        dead_fraction=stats.dead.float().mean().item(),
        top_heads=top_heads(scores),
        seconds=round(time.perf_counter() - start, 1),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    index = pages.write_index(out, summary, files, ablations, lens, stats)
    n_files = sum(len(f) for f in files.values()) + 2
    induction, score = summary["top_heads"]["induction"][0]
    print(
        f"{name}: {n_files} files in {out}/ (start at {index.name}) in {time.perf_counter() - start:.0f} s; "
        f"loss {lens['loss'][-1]:.3f} on {len(val_windows)} windows, {summary['dead_fraction']:.1%} dead "
        f"neurons, top induction head {induction} ({score:.2f})"
    )
    return out


def interpret_compare(
    gpt: str, llama: str, device: str = "auto", out_dir: Path = REPORT_DIR, queues: list[Path] | None = None
) -> Path:
    """Put two models (a GPT and a LLaMA of one size) side by side: head scores, ablations, logit lens.

    Writes <out_dir>/<gpt>-vs-<llama>.md with its PNGs next to it. A model without interpret results, or
    whose results predate its final checkpoint, gets them first, with the default settings.

    Args:
        gpt: The first experiment (normally the GPT-style one).
        llama: The second experiment (normally the LLaMA-style one of the same size).
        device: Where to run `interpret` for a model that has no results yet: 'auto' (cuda if available,
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
