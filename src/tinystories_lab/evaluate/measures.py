"""Story measures that need no judge: repetition, diversity, endings, length, required words, memorization.

Texts are compared as words: lower-case runs of letters, digits and apostrophes (`words`), so punctuation and
spacing never count. Definitions:
- rep-n (Welleck et al., 2019): within one completion, 1 - distinct n-grams / n-grams; 0 = no n-gram
  repeated. Averaged over completions.
- distinct-n (Li et al., 2016): over all completions together, distinct n-grams / n-grams; 1 = never repeats.
- Rouge-k precision (the TinyStories paper's memorization check): the share of a completion's k-grams that
  occur in the training stories; `longest_overlap`: the longest run of words whose every k-gram occurs
  there (an upper bound on the longest passage copied from one story: neighbouring k-grams may come from
  different stories).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np

WORD = re.compile(r"[a-z0-9']+")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the k-gram hash


def words(text: str) -> list[str]:
    """The words of a text, lower-cased, without punctuation."""
    return WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def rep_n(text: str, n: int) -> float | None:
    """1 - distinct n-grams / n-grams of one text; None when it has no n-gram."""
    grams = ngrams(words(text), n)
    return 1 - len(set(grams)) / len(grams) if grams else None


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct n-grams / n-grams over all texts together; None when they have no n-gram."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def uses_words(text: str, required: list[str]) -> bool:
    """Whether the text uses every required word as a whole word (any case; no other inflection)."""
    present = set(words(text))
    return all(w.lower() in present for w in required)


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def mean_interval(values: list[float]) -> dict:
    """Mean and 95% interval (normal approximation: mean +- 1.96 standard errors) of a sample."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None}
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {"n": n, "mean": m, "low": m - half, "high": m + half}


class TrainingNgrams:
    """The k-grams of the training stories, hashed, for fast membership tests (no k-gram crosses a story's
    end). Memory: 8 bytes per training word."""

    def __init__(self, stories: Iterable[str], k: int):
        self.k = k
        self.ids: dict[str, int] = {}
        hashes = [
            self._hashes([self.ids.setdefault(w, len(self.ids) + 1) for w in words(s)]) for s in stories
        ]
        self.hashes = np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)

    def _hashes(self, ids: list[int]) -> np.ndarray:
        a = np.asarray(ids, dtype=np.uint64)
        if len(a) < self.k:
            return np.zeros(0, np.uint64)
        h = np.zeros(len(a) - self.k + 1, np.uint64)
        with np.errstate(over="ignore"):  # the hash wraps around 2**64 on purpose
            for j in range(self.k):
                h = h * _MULT + a[j : j + len(h)]
        return h

    def found(self, text: str) -> np.ndarray:
        """For each k-gram of the text, in order: whether it occurs in the training stories."""
        ids = [self.ids.get(w, 0) for w in words(text)]  # 0: a word never seen in training
        h = self._hashes(ids)
        pos = np.searchsorted(self.hashes, h).clip(max=max(len(self.hashes) - 1, 0))
        hit = self.hashes[pos] == h if len(self.hashes) else np.zeros(len(h), bool)
        known = np.array([all(ids[i : i + self.k]) for i in range(len(h))], dtype=bool)
        return hit & known

    def rouge_precision(self, text: str) -> float | None:
        """The share of the text's k-grams found in training; None when it has no k-gram."""
        found = self.found(text)
        return float(found.mean()) if len(found) else None

    def longest_overlap(self, text: str) -> int:
        """The longest run of the text's words whose every k-gram occurs in training (0 if none does)."""
        best = run = 0
        for hit in self.found(text):
            run = run + 1 if hit else 0
            best = max(best, run)
        return best + self.k - 1 if best else 0


def judge_free(
    completions: list[dict], training: TrainingNgrams | None, required: list[list[str]] | None = None
) -> dict:
    """The judge-free measures of a model's completions (dicts with `completion`, `tokens`,
    `stopped_at_eos`); `required`: each completion's required words (fine-tunes)."""
    texts = [c["completion"] for c in completions]
    out = {
        "completions": len(texts),
        "eos_share": mean(float(c["stopped_at_eos"]) for c in completions),
        "mean_tokens": mean(c["tokens"] for c in completions),
        "mean_words": mean(len(words(t)) for t in texts),
    }
    for n in (1, 2, 3, 4):
        out[f"rep_{n}"] = mean(rep_n(t, n) for t in texts)
    for n in (1, 2, 3):
        out[f"distinct_{n}"] = distinct_n(texts, n)
    if required is not None:
        out["uses_all_required_words"] = mean(float(uses_words(t, r)) for t, r in zip(texts, required))
    if training is not None:
        out[f"rouge_{training.k}_precision"] = mean(training.rouge_precision(t) for t in texts)
        overlaps = [training.longest_overlap(t) for t in texts]
        out["longest_overlap_words"] = {"mean": mean(overlaps), "max": max(overlaps, default=0)}
    return out
