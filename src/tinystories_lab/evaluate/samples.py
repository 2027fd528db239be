"""`make sample`: stories from each model for fixed prompts and seeds, generated with LitGPT's sampler."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from litgpt.generate.base import generate
from litgpt.prompts import PromptStyle, has_prompt_style, load_prompt_style

from tinystories_lab.errors import UserError
from tinystories_lab.hardware import resolve_device
from tinystories_lab.models import TrainedModel, load_trained, results_dir, select_checkpoints

PROMPTS = [
    "",  # from BOS alone: the model's own idea of a story
    "Once upon a time",
    "Tom and Lily went to the park.",
    "The little dog was sad because",
    "One day, a girl named Sue found a big box.",
]
# For fine-tuned models (their checkpoint has a prompt style): instructions like those of `make finetune`.
INSTRUCTIONS = [
    "Write a story that uses the words dog, ball and happy.",
    "Write a story that uses the words tree, climb and scared.",
    "Write a story that uses the words rain, boat and friend.",
    "Write a story that uses the words cake, share and sister.",
    "Write a story that uses the words moon, dream and sleep.",
]


@torch.inference_mode()
def sample_story(
    trained: TrainedModel,
    prompt: str,
    seed: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    style: PromptStyle | None = None,
) -> dict:
    """One story: [BOS] prompt, then sampled tokens until EOS or the length limit. With a prompt `style` (a
    fine-tune's), the prompt is an instruction put into that template, and the text is the response alone."""
    tokenizer = trained.tokenizer
    device = trained.model.lm_head.weight.device
    ids = tokenizer.encode(prompt if style is None else style.apply(prompt), device=device, bos=True)
    room = trained.max_seq_length - len(ids)
    if room < 1:
        raise UserError(f"The prompt {prompt!r} fills the model's whole context of {trained.max_seq_length}.")
    trained.model.set_kv_cache(batch_size=1, device=device)
    torch.manual_seed(seed)
    out = generate(
        trained.model, ids, len(ids) + min(max_new_tokens, room),
        temperature=temperature, top_k=top_k, eos_id=tokenizer.eos_id, include_prompt=False,
    )  # fmt: skip
    trained.model.clear_kv_cache()
    stopped_at_eos = len(out) > 0 and out[-1].item() == tokenizer.eos_id
    story = out[:-1] if stopped_at_eos else out
    # the prompt and its continuation, or an instruction's response alone
    text = tokenizer.decode(story if style else torch.cat([ids[1:].long(), story.long()]))
    # what the model wrote, decoded with the prompt so that the space between them is kept
    if style:
        continuation = text
    else:
        continuation = text[len(prompt) :] if text.startswith(prompt) else tokenizer.decode(story)
    return {
        "prompt": prompt,
        "seed": seed,
        "text": text,
        "continuation": continuation,
        "tokens": len(out),
        "stopped_at_eos": stopped_at_eos,
    }


def samples_markdown(result: dict) -> str:
    """The samples of one model as Markdown."""
    lines = [
        f"# Samples from {result['name']}",
        "",
        f"Checkpoint `{result['checkpoint']}`; temperature {result['temperature']}, top-k {result['top_k']}, "
        f"at most {result['max_new_tokens']} new tokens, one fixed seed per sample.",
        "",
    ]
    for s in result["samples"]:
        end = "ended with EOS" if s["stopped_at_eos"] else "hit the length limit"
        lines += [f"## Prompt: {s['prompt']!r} (seed {s['seed']}, {s['tokens']} tokens, {end})", ""]
        lines += ["> " + line for line in s["text"].splitlines()] + [""]
    return "\n".join(lines)


def sample(
    model: str | None = None,
    prompts: list[str] | None = None,
    seeds: list[int] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: int | None = 50,
    queues: list[Path] | None = None,
    device: str = "auto",
) -> list[dict]:
    """Generate stories from finished experiments; write samples.md and samples.json next to each run.

    Args:
        model: One experiment's name, or a checkpoint folder (a run's, or a fine-tune's under
            experiments/finetune/) (default: every `done` experiment in the queues).
        prompts: Prompts to continue; "" starts from BOS alone (default: five fixed story openings; for a
            fine-tune, five fixed instructions, put into its prompt style).
        seeds: Random seeds; every prompt is sampled once per seed (default: [1]).
        max_new_tokens: Stop after this many new tokens (or at EOS, or at the model's context length).
        temperature: Sampling temperature.
        top_k: Sample among the k most likely tokens.
        queues: Queue files to look in (default: experiments.yaml and experiments.demo.yaml).
        device: 'auto' (cuda if available, else cpu), 'cpu' or 'cuda'.
    """
    device = resolve_device(device)
    results = []
    for name, checkpoint_dir in select_checkpoints(model, queues):
        trained = load_trained(checkpoint_dir, device=device)
        style = load_prompt_style(checkpoint_dir) if has_prompt_style(checkpoint_dir) else None
        default = PROMPTS if style is None else INSTRUCTIONS
        result = {
            "name": name,
            "checkpoint": str(checkpoint_dir),
            "temperature": temperature,
            "top_k": top_k,
            "max_new_tokens": max_new_tokens,
            "prompt_style": None if style is None else type(style).__name__,
            "samples": [
                sample_story(trained, p, seed, max_new_tokens, temperature, top_k, style)
                for p in (default if prompts is None else prompts)
                for seed in (seeds or [1])
            ],
        }
        run_dir = results_dir(checkpoint_dir)
        (run_dir / "samples.json").write_text(json.dumps(result, indent=2) + "\n")
        (run_dir / "samples.md").write_text(samples_markdown(result) + "\n")
        ended = sum(s["stopped_at_eos"] for s in result["samples"])
        print(f"{name}: {len(result['samples'])} samples, {ended} ended at EOS: {run_dir}/samples.md")
        results.append(result)
    return results
