"""`make data-instruct`: instruction sets in LitGPT's JSON format ({"instruction", "input", "output"}).

Two sources, both written as `train.json` and `val.json` (the held-out split) in data/instruct/<name>/:
- `tinystories`: roneneldan/TinyStoriesInstruct from the Hugging Face Hub. Each of its examples is a few
  `Key: value` lines (Features, Words, Summary, Random sentence) and then `Story:` and the story, ended by
  a line `<|endoftext|>`; the fields become the instruction and the story the response.
- `sample`: offline, from the bundled sample (data/sample): "Write a story that uses the words A, B and
  C." with three words drawn from the story with a fixed seed; the story is the response. Its training
  stories give train.json, its validation stories val.json.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from tinystories_lab.data.sources import EOT, hub_dataset, load_split
from tinystories_lab.errors import UserError
from tinystories_lab.files import write_atomic

INSTRUCT_DATASET = "roneneldan/TinyStoriesInstruct"
SPLIT_FILES = {"train": "train.json", "validation": "val.json"}  # LitGPT's JSON module reads these names
# TinyStories-Instruct's feature tags, as words in an instruction.
FEATURES = {
    "Dialogue": "dialogue",
    "BadEnding": "a bad ending",
    "MoralValue": "a moral value",
    "Twist": "a plot twist",
    "Foreshadowing": "foreshadowing",
    "Conflict": "a conflict",
}
# Words too common to be worth asking for.
COMMON = set(
    "the and was were are is his her him she he they them their you your our its for with that this then "
    "there had has have did not but all one day very said says saw see can could would will too out into "
    "from what when who how why where back also just like some what went got get let made make time upon "
    "because so now off over again wanted want after before each every other lot big little".split()
)


def listing(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def instruction(
    words: list[str], features: list[str] = (), summary: str | None = None, sentence: str | None = None
) -> str:
    """The instruction for a story with these fields, e.g. "Write a story that uses the words dog, ball
    and sun."; unknown feature tags are kept as they are."""
    text = "Write a story" + (f" that uses the words {listing(words)}" if words else "") + "."
    if features:
        text += f" It has {listing([FEATURES.get(f, f) for f in features])}."
    if sentence:
        text += f" It contains the sentence: {sentence}"
    if summary:
        text += f" Summary: {summary}"
    return text


def example(instruction_text: str, story: str) -> dict:
    return {"instruction": instruction_text, "input": "", "output": story}


def drawn_words(story: str, rng: random.Random, n: int = 3) -> list[str]:
    """`n` different words of the story (written in lower case, at least three letters, not among the
    commonest), in the order drawn."""
    seen = dict.fromkeys(w for w in re.findall(r"\b[a-z]{3,}\b", story) if w not in COMMON)
    candidates = list(seen)
    return rng.sample(candidates, min(n, len(candidates)))


def sample_examples(stories: list[str], seed: int) -> list[dict]:
    """One "uses the words" instruction per story, words drawn with a generator seeded once per split."""
    rng = random.Random(seed)
    return [example(instruction(drawn_words(s, rng)), s) for s in stories]


def parse_instruct(lines: Iterable[str]) -> Iterator[dict]:
    """TinyStories-Instruct's lines -> examples. A block ends at a line `<|endoftext|>`; in it `Features:`,
    `Words:`, `Summary:` and `Random sentence:` lines come in any order, then `Story:` and the story (on the
    same line or the following ones). Blocks without a story are skipped."""
    fields: dict[str, str] = {}
    story: list[str] | None = None
    for line in lines:
        line = line.rstrip("\n")
        if line.strip() == EOT:
            if story is not None and "\n".join(story).strip():
                yield instruct_example(fields, "\n".join(story).strip())
            fields, story = {}, None
        elif story is not None:
            story.append(line)
        elif line.startswith("Story:"):
            story = [line[len("Story:") :].strip()]
        elif ":" in line:
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
    if story is not None and "\n".join(story).strip():
        yield instruct_example(fields, "\n".join(story).strip())


def instruct_example(fields: dict[str, str], story: str) -> dict:
    words = [w.strip() for w in fields.get("words", "").split(",") if w.strip()]
    features = [f.strip() for f in fields.get("features", "").split(",") if f.strip()]
    text = instruction(words, features, fields.get("summary") or None, fields.get("random sentence") or None)
    return example(text, story)


def reservoir(items: Iterable[dict], k: int | None, seed: int) -> list[dict]:
    """A seeded uniform random choice of `k` items (all of them for None), in one pass, in their order."""
    if k is None:
        return list(items)
    rng = random.Random(seed)
    chosen: list[tuple[int, dict]] = []
    for i, item in enumerate(items):
        if i < k:
            chosen.append((i, item))
        elif (j := rng.randrange(i + 1)) < k:
            chosen[j] = (i, item)
    return [item for _, item in sorted(chosen, key=lambda c: c[0])]


def instruct_lines(split: str, cache_dir: Path) -> Iterator[str]:
    """The lines of one split of TinyStories-Instruct from the Hub (cached), with a progress bar."""
    offline = (
        "Without a network, use the offline instruction set built from the bundled sample: "
        "`make data-instruct-sample`, then `make finetune ... DATA=sample`."
    )
    ds = hub_dataset(INSTRUCT_DATASET, split, cache_dir, offline)
    with tqdm(total=len(ds), desc=f"{INSTRUCT_DATASET} {split}", unit="line") as bar:
        for batch in ds.iter(batch_size=100_000):
            yield from batch["text"]
            bar.update(len(batch["text"]))


def data_instruct(
    source: Literal["tinystories", "sample"] = "tinystories",
    data_dir: Path = Path("data"),
    max_train_examples: int | None = 200_000,
    seed: int = 42,
) -> Path:
    """Write an instruction set in LitGPT's JSON format: data_dir/instruct/<source>/{train,val}.json.

    Args:
        source: 'tinystories' (roneneldan/TinyStoriesInstruct from the Hub: its Features, Words, Summary and
            Random sentence become the instruction, the story the response) or 'sample' (offline: the bundled
            sample's stories, each with "Write a story that uses the words A, B and C.", three of its words
            drawn with a fixed seed; its validation stories are the held-out split).
        data_dir: The project's data folder (the Hub cache goes to data_dir/hf).
        max_train_examples: For 'tinystories', keep a seeded random choice of this many training examples
            (of about 2.5M; None keeps all). The validation split is kept whole.
        seed: Seed of the drawn words and of the choice of examples.
    """
    out = data_dir / "instruct" / source
    splits = {}
    for split, name in SPLIT_FILES.items():
        if source == "sample":
            examples = sample_examples(load_split("sample", split, data_dir), seed + (split == "validation"))
        elif source == "tinystories":
            parsed = parse_instruct(instruct_lines(split, data_dir / "hf"))
            examples = reservoir(parsed, max_train_examples if split == "train" else None, seed)
        else:
            raise UserError(f"Unknown instruction source {source!r}: choose 'tinystories' or 'sample'.")
        if not examples:
            raise UserError(f"No examples found in the {split} split of {source}.")
        splits[name] = examples
    out.mkdir(parents=True, exist_ok=True)
    for name, examples in splits.items():
        write_atomic(out / name, json.dumps(examples, indent=1, ensure_ascii=False) + "\n")
    counts = ", ".join(f"{len(e):,} in {n}" for n, e in splits.items())
    print(f"Instruction set {source}: {counts} -> {out}")
    return out
