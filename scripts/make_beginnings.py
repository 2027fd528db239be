"""Write src/tinystories_lab/evaluate/beginnings.json: the fixed story beginnings of `make quality`.

Stories spread evenly over the bundled sample's validation split (every len // 50-th), cut mid-sentence
(as the TinyStories paper's evaluation does) after about a third of its words (12 to 40 words), plus three
words of the whole story (`make finetune`'s sample rule) and the instruction asking a fine-tune for them.
Rerun only to make a new version (bump VERSION): quality results compare only between runs scored on the
same version.
"""

import json
import random
from pathlib import Path

from tinystories_lab.data.sources import load_split
from tinystories_lab.finetune.data import drawn_words, instruction

VERSION = 1
COUNT = 50
OUT = Path(__file__).resolve().parents[1] / "src/tinystories_lab/evaluate/beginnings.json"


def cut(story: str) -> str | None:
    """The story's first words up to a point inside a sentence, or None when no such point fits."""
    words = story.split()
    target = min(40, max(12, len(words) // 3))
    for n in list(range(target, 11, -1)) + list(range(target + 1, min(40, len(words) - 3) + 1)):
        before, after = words[n - 1], words[n]
        if before[-1] not in '.!?":,;' and after[0].isalpha():  # mid-sentence, between two plain words
            return " ".join(words[:n])
    return None


def main() -> None:
    stories = load_split("sample", "validation")
    rng = random.Random(VERSION)
    beginnings = []
    step = len(stories) // COUNT
    for story in stories[::step]:
        text = cut(story)
        if text is None or len(story.split()) < 40:
            continue
        words = sorted(drawn_words(story, rng))
        beginnings.append({"beginning": text, "words": words, "instruction": instruction(words)})
        if len(beginnings) == COUNT:
            break
    OUT.write_text(json.dumps({
        "version": VERSION,
        "source": f"data/sample/validation.txt: every {step}th story (of 40 words or more), cut mid-sentence",
        "beginnings": beginnings,
    }, indent=1) + "\n")  # fmt: skip
    print(f"{len(beginnings)} beginnings -> {OUT}")


if __name__ == "__main__":
    main()
