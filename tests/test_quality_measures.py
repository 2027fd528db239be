"""The judge-free story measures on hand-made texts whose values are known."""

import json

import pytest
import yaml

from tinystories_lab.data.sources import load_split
from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.measures import (
    TrainingNgrams,
    distinct_n,
    judge_free,
    mean_interval,
    rep_n,
    uses_words,
    words,
)
from tinystories_lab.evaluate.quality import BEGINNINGS, load_beginnings, training_stories


def test_words_ignore_case_and_punctuation():
    assert words('Tom said, "Hi, Sue!" Don\'t go.') == ["tom", "said", "hi", "sue", "don't", "go"]


def test_rep_n_counts_repeated_ngrams_within_one_text():
    assert rep_n("a b c d", 1) == 0
    assert rep_n("the dog the dog the dog", 2) == pytest.approx(1 - 2 / 5)  # ab ba ab ba ab: 2 distinct of 5
    assert rep_n("The dog. THE DOG!", 1) == 0.5
    assert rep_n("one", 2) is None


def test_distinct_n_pools_all_texts():
    assert distinct_n(["a b", "a b"], 1) == 0.5
    assert distinct_n(["a b c", "c d"], 2) == 1.0
    assert distinct_n(["a b", "a c"], 2) == 1.0
    assert distinct_n(["x"], 2) is None


def test_required_words_are_whole_words_in_any_case():
    assert uses_words("The Dog ran to the ball.", ["dog", "ball"])
    assert not uses_words("The dogs ran to the ball.", ["dog", "ball"])  # no inflections
    assert not uses_words("A doghouse.", ["dog"])


def test_rouge_precision_and_longest_overlap_against_training_stories():
    training = TrainingNgrams(["The cat sat on the mat and purred.", "A dog ran in the park."], k=3)
    assert training.rouge_precision("The cat sat on the mat and purred.") == 1.0
    # trigrams: the cat sat | cat sat on | sat on a | on a log: 2 of 4 occur
    assert training.rouge_precision("The cat sat on a log") == 0.5
    assert training.longest_overlap("The cat sat on a log") == 4  # "the cat sat on"
    assert training.longest_overlap("Birds sing loudly today") == 0
    # no k-gram crosses a story's end: "purred a dog" is not a training trigram
    assert training.rouge_precision("and purred a dog ran") == pytest.approx(1 / 3)
    assert training.rouge_precision("ab") is None


def test_mean_interval_is_mean_plus_minus_1_96_standard_errors():
    m = mean_interval([2.0, 4.0, 6.0, 8.0])
    sd = (20 / 3) ** 0.5  # sample standard deviation of 2, 4, 6, 8
    assert m["mean"] == 5.0 and m["n"] == 4
    assert m["low"] == pytest.approx(5 - 1.96 * sd / 2) and m["high"] == pytest.approx(5 + 1.96 * sd / 2)
    assert mean_interval([])["mean"] is None


def test_judge_free_summary_of_known_completions():
    completions = [
        {"completion": "the dog ran and ran", "tokens": 6, "stopped_at_eos": True},
        {"completion": "a ball", "tokens": 3, "stopped_at_eos": False},
    ]
    training = TrainingNgrams(["the dog ran home"], k=2)
    m = judge_free(completions, training, required=[["dog", "ball"], ["ball"]])
    assert m["completions"] == 2 and m["eos_share"] == 0.5 and m["mean_tokens"] == 4.5
    assert m["mean_words"] == 3.5
    assert m["rep_1"] == pytest.approx((1 - 4 / 5 + 0) / 2)
    assert m["distinct_1"] == pytest.approx(6 / 7)  # the dog ran and a ball (6 distinct) of 7 words
    assert m["uses_all_required_words"] == 0.5
    # bigrams of the first: the dog, dog ran (found), ran and, and ran (not): 0.5; the second: 0
    assert m["rouge_2_precision"] == 0.25
    assert m["longest_overlap_words"] == {"mean": 1.5, "max": 3}


def test_the_beginnings_are_versioned_and_cut_mid_sentence(tmp_path):
    found = load_beginnings()
    assert found["version"] == 1 and len(found["beginnings"]) == 50
    for b in found["beginnings"]:
        assert b["beginning"][-1] not in '.!?"' and len(b["words"]) == 3
        assert (
            b["instruction"]
            == f"Write a story that uses the words {b['words'][0]}, {b['words'][1]} and {b['words'][2]}."
        )
        assert 12 <= len(b["beginning"].split()) <= 40
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"version": 1, "beginnings": [{"text": "x"}]}))
    with pytest.raises(UserError, match="is not a beginnings file"):
        load_beginnings(bad)
    assert BEGINNINGS.name == "beginnings.json"


def test_memorization_compares_with_the_runs_training_split_and_a_fine_tunes_base(tmp_path):
    base, tuned, other = tmp_path / "base", tmp_path / "tuned", tmp_path / "other"
    data = {"class_path": "tinystories_lab.data.TinyStories", "init_args": {"source": "sample"}}
    for folder, hparams in (
        (base, {"data": data}),
        (tuned, {"checkpoint_dir": str(base), "data": {"class_path": "litgpt.data.JSON"}}),
        (other, {"data": {"class_path": "litgpt.data.TinyStories"}}),
    ):
        folder.mkdir()
        (folder / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams))
    stories, described = training_stories(tuned, 10)
    assert stories == load_split("sample", "train")[:10]
    assert described == "sample train split, 10 of 2,066 stories"
    with pytest.raises(UserError, match="so its training stories are unknown: run with --memorization false"):
        training_stories(other, 10)
