"""`make quality`: how well a run writes stories, as the TinyStories paper measures it.

The model completes fixed story beginnings (beginnings.json, versioned); the completions get judge-free
measures (measures.py) always, and the paper's grades from an OpenAI-compatible judge (judge.py) when one is
given. A fine-tune (a checkpoint with a prompt style) gets instead one instruction per beginning, asking for
that beginning's three words. Everything goes to quality.json in the run's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from litgpt.prompts import has_prompt_style, load_prompt_style
from tqdm import tqdm

from tinystories_lab.data.sources import load_split
from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.judge import AGE_GROUPS, CRITERIA, GradeCache, Judge, JudgeError, cache_key
from tinystories_lab.evaluate.measures import TrainingNgrams, judge_free, mean_interval
from tinystories_lab.evaluate.samples import sample_story
from tinystories_lab.files import write_atomic
from tinystories_lab.hardware import resolve_device
from tinystories_lab.models import TrainedModel, load_trained, results_dir, select_checkpoints

BEGINNINGS = Path(__file__).with_name("beginnings.json")
CACHE_NAME = "quality-judge-cache.jsonl"


def load_beginnings(path: Path = BEGINNINGS) -> dict:
    """The versioned beginnings file: {'version', 'source', 'beginnings': [{'beginning', 'words',
    'instruction'}]}: a story's start, three of its words, and the instruction asking a fine-tune for them."""
    try:
        found = json.loads(Path(path).read_text())
        assert all(
            isinstance(b["beginning"], str) and b["words"] and b["instruction"] for b in found["beginnings"]
        )
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(
            f"{path} is not a beginnings file (JSON with 'version' and 'beginnings': [{{'beginning', "
            "'words', 'instruction'}]); see src/tinystories_lab/evaluate/beginnings.json."
        ) from None
    return found


def training_stories(checkpoint_dir: Path, limit: int | None) -> tuple[list[str], str]:
    """The training split the run (or the run a fine-tune started from) was trained on, its first `limit`
    stories, and a description of them."""
    hparams = yaml.safe_load((checkpoint_dir / "hyperparameters.yaml").read_text())
    data = hparams.get("data") or {}
    if isinstance(data, dict) and data.get("class_path") == "litgpt.data.JSON":  # a fine-tune: its base's
        return training_stories(Path(hparams["checkpoint_dir"]), limit)
    if not isinstance(data, dict) or data.get("class_path") != "tinystories_lab.data.TinyStories":
        raise UserError(
            f"{checkpoint_dir} was not trained with tinystories_lab.data.TinyStories, so its training "
            "stories are unknown: run with --memorization false."
        )
    args = data.get("init_args") or {}
    source, data_dir = args.get("source", "tinystories"), Path(args.get("data_dir", "data"))
    stories = load_split(source, "train", data_dir)
    kept = stories[:limit] if limit else stories
    return kept, f"{source} train split, {len(kept):,} of {len(stories):,} stories"


@torch.inference_mode()
def complete(
    trained: TrainedModel, beginnings: list[dict], seed: int, max_new_tokens: int, temperature: float,
    top_k: int | None, name: str,
) -> list[dict]:  # fmt: skip
    """Each beginning continued (or, for a fine-tune, each beginning's instruction answered) with seed
    `seed + i` for the i-th."""
    cp = trained.checkpoint_dir
    style = load_prompt_style(cp) if has_prompt_style(cp) else None
    out = []
    for i, b in enumerate(tqdm(beginnings, desc=f"completions {name}", unit="story")):
        prompt = b["beginning"] if style is None else b["instruction"]
        s = sample_story(trained, prompt, seed + i, max_new_tokens, temperature, top_k, style)
        out.append({
            "beginning": prompt, "completion": s["continuation"], "words": b["words"], "seed": s["seed"],
            "tokens": s["tokens"], "stopped_at_eos": s["stopped_at_eos"],
        })  # fmt: skip
    return out


def judge_summary(grades: list[dict], judge: Judge) -> dict:
    """Per criterion: mean and 95% interval over the graded completions; the age groups guessed."""
    graded = [g for g in grades if g["status"] == "graded"]
    return {
        "url": judge.url,
        "model": judge.model,
        "graded": len(graded),
        "unparseable": len(grades) - len(graded),
        "criteria": {c: mean_interval([g[c] for g in graded]) for c in CRITERIA},
        "age_groups": {k: sum(g["age_group"] == k for g in graded) for k in AGE_GROUPS},
    }


def grade_all(completions: list[dict], judge: Judge, run: str, cache: GradeCache, kind: str) -> list[dict]:
    """The judge's grades of every completion, from the cache where it has them; on a judge failure, one
    line saying how many answers are safe in the cache."""
    grades = []
    asked = 0
    for c in tqdm(completions, desc=f"judge {judge.model}", unit="story"):
        key = cache_key(run, c["beginning"], c["completion"], judge.model)
        result = cache.get(key)
        if result is None:
            try:
                result = judge.grade(c["beginning"], c["completion"], kind)
            except JudgeError as e:
                raise JudgeError(
                    f"{e} {len(cache.entries)} graded stories are kept in {cache.path}; rerun to grade the "
                    f"other {len(completions) - len(grades)}."
                ) from None
            cache.put(key, result, run=run, judge_model=judge.model)
            asked += 1
        grades.append(result)
    print(f"judge {judge.model}: {asked} stories graded now, {len(grades) - asked} from the cache")
    return grades


def quality(
    model: str | None = None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    judge_timeout: float = 120.0,
    beginnings: Path = BEGINNINGS,
    seed: int = 1,
    max_new_tokens: int = 300,
    temperature: float = 0.8,
    top_k: int | None = 50,
    memorization: bool = True,
    memorization_k: int = 4,
    train_stories: int | None = 200_000,
    queues: list[Path] | None = None,
    device: str = "auto",
) -> list[dict]:
    """Story quality of finished runs: completions of fixed beginnings, judge-free measures, and the
    TinyStories paper's grades when a judge is given; writes quality.json next to each run.

    Args:
        model: One experiment's name, or a checkpoint folder (a run's, or a fine-tune's) (default: every
            `done` experiment in the queues).
        judge_url: An OpenAI-compatible chat endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp's
            server, ollama, a hosted API); its key, if any, from the environment variable JUDGE_API_KEY.
            Without it, only the judge-free measures.
        judge_model: The judge model's name as the endpoint knows it (required with judge_url).
        judge_timeout: Seconds to wait for one answer of the judge.
        beginnings: The versioned file of story beginnings (default: the project's, 50 beginnings).
        seed: The i-th beginning is completed with seed `seed + i`.
        max_new_tokens: At most this many new tokens per completion (and no more than the context holds).
        temperature: Sampling temperature.
        top_k: Sample among the k most likely tokens.
        memorization: Compare completions with the training stories (Rouge-k precision, longest overlap).
        memorization_k: The k of Rouge-k and of the overlap's k-grams, in words.
        train_stories: Compare with the first this many training stories (None: all of them; about 8 bytes
            of memory per training word).
        queues: Queue files to look in (default: experiments.yaml and experiments.demo.yaml).
        device: 'auto' (cuda if available, else cpu), 'cpu' or 'cuda'.
    """
    if bool(judge_url) != bool(judge_model):
        raise UserError("A judge needs both JUDGE_URL and JUDGE_MODEL (the model's name at that endpoint).")
    judge = Judge(judge_url, judge_model, timeout=judge_timeout) if judge_url else None
    found = load_beginnings(beginnings)
    device = resolve_device(device)
    results = []
    for name, checkpoint_dir in select_checkpoints(model, queues):
        trained = load_trained(checkpoint_dir, device=device)
        tuned = has_prompt_style(checkpoint_dir)
        completions = complete(trained, found["beginnings"], seed, max_new_tokens, temperature, top_k, name)
        training, described = None, None
        if memorization:
            stories, described = training_stories(checkpoint_dir, train_stories)
            training = TrainingNgrams(tqdm(stories, desc="training k-grams", unit="story"), memorization_k)
        measures = judge_free(completions, training, [c["words"] for c in completions] if tuned else None)
        run_dir = results_dir(checkpoint_dir)
        result = {
            "name": name,
            "checkpoint": str(checkpoint_dir),
            "kind": "instruction" if tuned else "beginning",
            "beginnings_version": found["version"],
            "settings": {
                "seed": seed,
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_k": top_k,
                "context": trained.max_seq_length,
            },  # fmt: skip
            "memorization_against": described,
            "measures": measures,
            "judge": None,
            "completions": completions,
        }
        if judge is not None:
            cache = GradeCache(run_dir / CACHE_NAME)
            grades = grade_all(completions, judge, name, cache, result["kind"])
            result["judge"] = judge_summary(grades, judge)
            for c, g in zip(completions, grades):
                c["grades"] = {k: v for k, v in g.items() if k != "answers"}
        write_atomic(run_dir / "quality.json", json.dumps(result, indent=2) + "\n")
        print(summary_line(result) + f": {run_dir / 'quality.json'}")
        results.append(result)
    return results


def summary_line(result: dict) -> str:
    m = result["measures"]
    parts = [f"{m['completions']} completions", f"EOS {m['eos_share']:.0%}", f"rep-2 {m['rep_2']:.3f}",
             f"distinct-2 {m['distinct_2']:.3f}"]  # fmt: skip
    if "uses_all_required_words" in m:
        parts.append(f"all words used {m['uses_all_required_words']:.0%}")
    j = result["judge"]
    if j:
        g = j["criteria"]["grammar"]
        parts.append(f"grammar {g['mean']:.2f}" if g["mean"] is not None else "grammar -")
        parts.append(f"{j['unparseable']} unparseable")
    return f"{result['name']}: " + ", ".join(parts)
