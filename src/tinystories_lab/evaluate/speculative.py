"""`make speculative`: a small run drafts, a larger one verifies (LitGPT's speculative decoding), on the
fixed prompts; acceptance rate and tokens/s against the target alone.

Every round is LitGPT 0.5.13's own `speculative_decoding` (draft k tokens, check them with one forward
pass of the target, keep the agreed prefix plus one target token). The loop around the rounds is
LitGPT's `generate` from the same module with one fix: LitGPT's loop drops the first token the target
picks after the prompt (Lightning-AI/litgpt#2307, fix proposed in #2308), so its output is not the
target's own. Greedy decoding uses top-k 1: LitGPT accepts or rejects a draft token by comparing the
two models' probabilities after top-k, and only with k = 1 are those exactly the argmax, which makes
the output exactly the target's own greedy output.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from litgpt.generate.base import generate as generate_alone
from litgpt.generate.speculative_decoding import next_token, speculative_decoding
from tqdm import tqdm

from tinystories_lab.configs import architecture, count_parameters
from tinystories_lab.data.tokenizer import fingerprint
from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.samples import PROMPTS
from tinystories_lab.hardware import resolve_device
from tinystories_lab.models import TrainedModel, load_trained, select_checkpoints
from tinystories_lab.render import escape, markdown_table, text_table

SPECULATIVE_DIR = Path("experiments/report/speculative")
SEED = 1234


@torch.inference_mode()
def generate_speculatively(
    draft: TrainedModel,
    target: TrainedModel,
    prompt: torch.Tensor,
    max_new_tokens: int,
    k: int,
    temperature: float = 0.0,
    top_k: int | None = 1,
) -> tuple[torch.Tensor, dict]:
    """New tokens (without the prompt, stopping before EOS) and the counts: draft tokens proposed and
    accepted, and rounds (target forward passes after the prompt's)."""
    eos = target.tokenizer.eos_id
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": 1.0}
    for m in (draft.model, target.model):
        m.set_kv_cache(batch_size=1, device=prompt.device)
    n = prompt.size(0)
    input_pos = torch.arange(0, n, device=prompt.device, dtype=torch.int64)
    next_token(draft.model, input_pos, prompt.view(1, -1), input_pos_maxp1=n, **sampling)  # fill its cache
    token = next_token(target.model, input_pos, prompt.view(1, -1), input_pos_maxp1=n, **sampling)
    tokens, proposed, accepted, rounds = [token], 0, 0, 0
    input_pos = torch.tensor([n], device=prompt.device, dtype=torch.int64)  # where `token` goes
    while tokens[-1].item() != eos and len(tokens) < max_new_tokens:
        round_k = max(1, min(k, max_new_tokens - len(tokens) - 1))
        new = speculative_decoding(
            draft.model, target.model, token, input_pos, int(input_pos) + 1, round_k, **sampling
        )
        proposed, accepted, rounds = proposed + round_k, accepted + len(new) - 1, rounds + 1
        tokens += list(new.split(1))
        input_pos.add_(len(new))
        token = new[-1:]
    for m in (draft.model, target.model):
        m.clear_kv_cache()
    out = torch.cat(tokens)[:max_new_tokens]
    hit = (out == eos).nonzero()
    out = out[: hit[0, 0]] if len(hit) else out
    return out, {"proposed": proposed, "accepted": accepted, "rounds": rounds}


@torch.inference_mode()
def generate_target_alone(
    target: TrainedModel,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = 1,
) -> torch.Tensor:
    """The target's own output with LitGPT's plain `generate` (new tokens, stopping before EOS)."""
    target.model.set_kv_cache(batch_size=1, device=prompt.device)
    eos = target.tokenizer.eos_id
    out = generate_alone(
        target.model, prompt, prompt.size(0) + max_new_tokens,
        temperature=temperature, top_k=top_k, eos_id=eos, include_prompt=False,
    )  # fmt: skip
    target.model.clear_kv_cache()
    return out[:-1] if len(out) and out[-1].item() == eos else out


def check_pair(draft: TrainedModel, target: TrainedModel, draft_name: str, target_name: str) -> None:
    """Refuse two models that do not share a tokenizer and an output vocabulary."""
    if fingerprint(draft.tokenizer) != fingerprint(target.tokenizer):
        raise UserError(
            f"{draft_name} and {target_name} use different tokenizers; speculative decoding needs one shared "
            "vocabulary (train both on the same tokenizer_dir)."
        )
    if draft.config.padded_vocab_size != target.config.padded_vocab_size:
        raise UserError(
            f"{draft_name} and {target_name} have output layers of different sizes "
            f"({draft.config.padded_vocab_size:,} and {target.config.padded_vocab_size:,}); speculative "
            "decoding compares their probabilities token by token, so they must match."
        )


def timed(fns: list, repeats: int) -> list[tuple]:
    """Each function's result and its fastest time over `repeats` calls, the functions taking turns so a
    change in the machine's other load hits them alike (the fastest run is the least disturbed)."""
    results, times = [None] * len(fns), [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            results[i] = fn()
            times[i] = min(times[i], time.perf_counter() - t0)
    return list(zip(results, times))


def measure_prompt(
    draft: TrainedModel, target: TrainedModel, prompt: str, k: int, max_new_tokens: int, repeats: int,
    temperature: float, top_k: int | None, device: str,
) -> dict:  # fmt: skip
    """One prompt: the speculative and the target-alone outputs, their best times, and the counts."""
    ids = target.tokenizer.encode(prompt, device=torch.device(device), bos=True)
    room = min(draft.max_seq_length, target.max_seq_length) - len(ids)
    if room < 2:
        raise UserError(f"The prompt {prompt!r} leaves no room in the models' context.")
    new = min(max_new_tokens, room)

    def spec_run():
        torch.manual_seed(SEED)  # the same draws every time, so sampled outputs repeat too
        return generate_speculatively(draft, target, ids, new, k, temperature, top_k)

    def alone_run():
        torch.manual_seed(SEED)
        return generate_target_alone(target, ids, new, temperature, top_k)

    ((spec, counts), spec_s), (alone, alone_s) = timed([spec_run, alone_run], repeats)
    return {
        "prompt": prompt,
        "tokens": len(spec),
        "target_tokens": len(alone),
        **counts,
        "acceptance_rate": counts["accepted"] / counts["proposed"] if counts["proposed"] else None,
        "speculative_s": spec_s,
        "target_s": alone_s,
        "speculative_tokens_per_s": len(spec) / spec_s,
        "target_tokens_per_s": len(alone) / alone_s,
        "speed_up": (len(spec) / spec_s) / (len(alone) / alone_s) if len(alone) else None,
        "same_as_target": torch.equal(spec.cpu(), alone.cpu()),
        "text": target.tokenizer.decode(spec),
    }


def speculative_markdown(result: dict) -> str:
    """The result as a Markdown page."""
    o = result["overall"]
    mode = (
        "greedy (top-k 1)"
        if result["greedy"]
        else f"temperature {result['temperature']}, top-k {result['top_k']}"
    )
    rows = [
        [escape(repr(p["prompt"])), p["tokens"],
         "-" if p["acceptance_rate"] is None else f"{p['acceptance_rate']:.3f}",
         f"{p['tokens'] / max(p['rounds'] + 1, 1):.2f}", f"{p['speculative_tokens_per_s']:,.1f}",
         f"{p['target_tokens_per_s']:,.1f}", f"{p['speed_up']:.2f}x" if p["speed_up"] else "-",
         "yes" if p["same_as_target"] else "no"]
        for p in result["prompts"]
    ]  # fmt: skip
    rows.append(
        ["**overall**", o["tokens"], f"{o['acceptance_rate']:.3f}", f"{o['tokens_per_target_pass']:.2f}",
         f"{o['speculative_tokens_per_s']:,.1f}", f"{o['target_tokens_per_s']:,.1f}", f"{o['speed_up']:.2f}x",
         "yes" if o["same_as_target"] else "no"]
    )  # fmt: skip
    header = ["prompt", "tokens", "acceptance", "tokens / target pass", "speculative tok/s",
              "target alone tok/s", "speed-up", "same output"]  # fmt: skip
    lines = [
        f"# Speculative decoding: `{result['draft']}` drafts for `{result['target']}`",
        "",
        f"Draft `{result['draft_checkpoint']}` ({result['draft_parameters'] / 1e6:.2f}M parameters), target "
        f"`{result['target_checkpoint']}` ({result['target_parameters'] / 1e6:.2f}M). {result['k']} draft "
        f"tokens per round, {mode}, at most {result['max_new_tokens']} new tokens per prompt, fastest of "
        f"{result['repeats']} runs each; {result['device']}, torch {result['torch']}.",
        "",
        markdown_table(header, rows, "lrrrrrrl"),
        "",
        "Acceptance: draft tokens the target kept / draft tokens proposed. Tokens / target pass: new tokens "
        "per forward pass of the target (the prompt's included); the target alone makes one per pass. "
        "Speed-up: speculative tokens/s over the target's own. Same output: the new tokens equal the "
        "target's own (guaranteed for greedy decoding).",
        "",
    ]
    for p in result["prompts"]:
        lines += [f"## {p['prompt']!r}", ""] + ["> " + line for line in p["text"].splitlines()] + [""]
    return "\n".join(lines)


def speculative(
    draft: str,
    target: str,
    k: int = 4,
    max_new_tokens: int = 200,
    prompts: list[str] | None = None,
    repeats: int = 3,
    temperature: float = 0.0,
    top_k: int | None = 1,
    queues: list[Path] | None = None,
    device: str = "auto",
    out_dir: Path = SPECULATIVE_DIR,
) -> dict:
    """Speculative decoding with LitGPT: `draft` proposes k tokens, `target` checks them in one pass.

    On the fixed prompts of `make sample`, measures the acceptance rate and tokens/s against the target
    decoding alone (LitGPT's `generate`, same settings), per prompt and overall, and checks that the output
    equals the target's own. Writes experiments/report/speculative/<draft>-<target>.json and .md.

    Args:
        draft: The smaller run: an experiment's name, or a checkpoint folder (a run or a fine-tune).
        target: The larger run, likewise. Both must share a tokenizer.
        k: Draft tokens per round.
        max_new_tokens: New tokens per prompt at most (fewer at EOS or at the smaller context length).
        prompts: Prompts to continue (default: the five fixed prompts of `make sample`).
        repeats: Time each generation this many times (taking turns with the target alone) and keep the
            fastest.
        temperature: 0 for greedy decoding (the output is then exactly the target's own); above 0 samples.
        top_k: Sample among the k most likely tokens; greedy decoding needs 1 (see docs/speculative.md).
        queues: Queue files to look names up in (default: experiments.yaml and experiments.demo.yaml).
        device: 'auto' (cuda if available, else cpu), 'cpu' or 'cuda'.
        out_dir: Where the .json and .md go.
    """
    if k < 1:
        raise UserError(f"k must be at least 1, not {k}.")
    device = resolve_device(device)
    (draft_name, draft_dir), (target_name, target_dir) = (
        select_checkpoints(m, queues)[0] for m in (draft, target)
    )
    d, t = load_trained(draft_dir, device=device), load_trained(target_dir, device=device)
    check_pair(d, t, draft_name, target_name)
    greedy = top_k == 1
    measured = []
    # One untimed round first: the first calls pay for allocations and kernel selection.
    measure_prompt(d, t, "Once upon a time", k, 8, 1, temperature, top_k, device)
    for prompt in tqdm(
        PROMPTS if prompts is None else prompts, desc=f"{draft_name} -> {target_name}", unit="prompt"
    ):
        measured.append(measure_prompt(d, t, prompt, k, max_new_tokens, repeats, temperature, top_k, device))
    tokens = sum(p["tokens"] for p in measured)
    spec_s, alone_s = sum(p["speculative_s"] for p in measured), sum(p["target_s"] for p in measured)
    proposed = sum(p["proposed"] for p in measured)
    overall = {
        "tokens": tokens,
        "acceptance_rate": sum(p["accepted"] for p in measured) / proposed if proposed else 0.0,
        "tokens_per_target_pass": tokens / sum(p["rounds"] + 1 for p in measured),
        "speculative_tokens_per_s": tokens / spec_s,
        "target_tokens_per_s": sum(p["target_tokens"] for p in measured) / alone_s,
        "same_as_target": all(p["same_as_target"] for p in measured),
    }
    overall["speed_up"] = overall["speculative_tokens_per_s"] / overall["target_tokens_per_s"]
    result = {
        "draft": draft_name,
        "target": target_name,
        "draft_checkpoint": str(draft_dir),
        "target_checkpoint": str(target_dir),
        "draft_parameters": count_parameters(d.config, d.tie_embeddings),
        "target_parameters": count_parameters(t.config, t.tie_embeddings),
        "draft_arch": architecture(d.config),
        "target_arch": architecture(t.config),
        "k": k,
        "max_new_tokens": max_new_tokens,
        "greedy": greedy,
        "temperature": temperature,
        "top_k": top_k,
        "repeats": repeats,
        "device": describe_device(device),
        "torch": torch.__version__,
        "overall": overall,
        "prompts": measured,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{draft_name}-{target_name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(speculative_markdown(result))
    header = ["prompt", "tokens", "acceptance", "spec tok/s", "target tok/s", "speed-up", "same"]
    rows = [
        [repr(p["prompt"])[:32], p["tokens"], f"{p['acceptance_rate'] or 0:.3f}",
         f"{p['speculative_tokens_per_s']:.1f}",
         f"{p['target_tokens_per_s']:.1f}", f"{p['speed_up'] or 0:.2f}x", p["same_as_target"]]
        for p in measured
    ]  # fmt: skip
    print(text_table(header, rows))
    print(
        f"{draft_name} -> {target_name}: acceptance {overall['acceptance_rate']:.3f}, "
        f"{overall['speculative_tokens_per_s']:.1f} vs {overall['target_tokens_per_s']:.1f} tokens/s alone "
        f"({overall['speed_up']:.2f}x), same output as the target: {overall['same_as_target']}; {stem}.md"
    )
    return result


def describe_device(device: str) -> str:
    """The device in words, for the record."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        name = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in cpuinfo.read_text().splitlines()
                if ln.startswith("model name")
            ),
            name,
        )
    return f"CPU: {name}, {torch.get_num_threads()} threads"
