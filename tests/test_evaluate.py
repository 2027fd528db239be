"""Evaluation, samples and the report, on briefly trained demo models."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from litgpt import Tokenizer

from tinystories_lab.cli import evaluate, main
from tinystories_lab.data.sources import load_split
from tinystories_lab.data.tokens import tokens_dir_for
from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.report import report
from tinystories_lab.evaluate.samples import sample
from tinystories_lab.models import load_trained

pytestmark = pytest.mark.slow


@pytest.fixture
def queue(trained_demos, tmp_path):
    """A queue holding both trained demo runs (done) and one that never ran."""
    config = "config_hub/pretrain/tiny_stories/demo/{}.yaml"
    entries = [
        {"name": name, "config": config.format(name), "status": "done", "out_dir": str(final.parent)}
        for name, final in trained_demos.items()
    ]
    never = {"name": "never_ran", "config": config.format("gpt_demo"), "status": "todo"}
    entries.append(never | {"out_dir": str(tmp_path / "never_ran")})
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump({"experiments": entries}, sort_keys=False))
    return path


def direct_loss(trained, tokens: np.ndarray) -> tuple[float, int]:
    """Mean next-token loss over windows of context + 1 with stride context, computed plainly."""
    t = trained.max_seq_length
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, t):
            x = torch.from_numpy(tokens[start : start + t + 1].astype(np.int64))[None]
            logits = trained.model(x[:, :-1])
            total += torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
            count += x.shape[1] - 1
    return total / count, count


def test_eval_matches_a_direct_computation_and_its_definitions(queue, trained_demos, sample_data):
    [result] = evaluate(model="gpt_demo", queues=[queue])
    written = json.loads((trained_demos["gpt_demo"].parent / "eval.json").read_text())
    assert written == result
    trained = load_trained(trained_demos["gpt_demo"])
    tokens_dir = tokens_dir_for(sample_data, "sample", Tokenizer(trained_demos["gpt_demo"]))
    meta = json.loads((tokens_dir / "meta.json").read_text())
    tokens = np.fromfile(tokens_dir / "validation.bin", dtype=np.uint16)
    loss, count = direct_loss(trained, tokens)
    assert result["loss"] == pytest.approx(loss, abs=1e-5)
    assert result["tokens_evaluated"] == count == len(tokens) - 1  # the whole split
    assert result["stories"] == meta["splits"]["validation"]["stories"] == 250
    assert result["bytes_evaluated"] == meta["splits"]["validation"]["bytes"]
    assert result["bytes_evaluated"] == sum(len(s.encode()) for s in load_split("sample", "validation"))
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    bpb = result["loss"] / math.log(2) * result["tokens_evaluated"] / result["bytes_evaluated"]
    assert result["bits_per_byte"] == pytest.approx(bpb)
    assert result["tokens_trained"] == 24 * 32 * 128 and result["steps"] == 24
    assert result["train_tokens_per_s"] > 0 and result["train_wall_time_s"] > 0
    assert result["parameters"] == 1_837_312


def test_eval_on_a_text_file_with_either_separator(queue, trained_demos, tmp_path):
    stories = load_split("sample", "validation")[:20]
    eot = tmp_path / "eot.txt"
    eot.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n".join(stories) + "\n")
    [a] = evaluate(model="llama_demo", text=eot, queues=[queue])
    [b] = evaluate(model="llama_demo", text=blank, queues=[queue])
    assert a["stories"] == b["stories"] == 20
    assert a["loss"] == pytest.approx(b["loss"]) and a["bytes_evaluated"] == b["bytes_evaluated"]
    assert (trained_demos["llama_demo"].parent / "eval-eot.json").is_file()
    with pytest.raises(UserError, match="does not exist"):
        evaluate(model="llama_demo", text=tmp_path / "missing.txt", queues=[queue])
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 8)
    for bad in ("empty.txt", "binary.txt"):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--model", "llama_demo", "--text", str(tmp_path / bad), "--queues", f"[{queue}]"])
        assert exit_info.value.code == 1
    with pytest.raises(UserError, match="binary.txt is not UTF-8 text"):
        evaluate(model="llama_demo", text=tmp_path / "binary.txt", queues=[queue])


def test_a_checkpoint_with_a_garbage_tokenizer_is_one_line_naming_the_fix(trained_demos, tmp_path):
    checkpoint = tmp_path / "final"
    shutil.copytree(trained_demos["gpt_demo"], checkpoint)
    (checkpoint / "tokenizer.model").write_bytes(b"not a tokenizer" * 100)
    tokenizer_dir = yaml.safe_load((checkpoint / "hyperparameters.yaml").read_text())["tokenizer_dir"]
    with pytest.raises(UserError, match=f"The tokenizer in {checkpoint} does not load") as refused:
        load_trained(checkpoint)
    assert f"Copy the tokenizer files of {tokenizer_dir} (the run's tokenizer_dir) into it" in str(
        refused.value
    )


def test_samples_stop_at_eos_or_the_length_limit_and_are_reproducible(queue, trained_demos):
    prompts = ["", "Once upon a time"]
    [first] = sample(model="gpt_demo", prompts=prompts, seeds=[1, 2], max_new_tokens=20, queues=[queue])
    [again] = sample(model="gpt_demo", prompts=prompts, seeds=[1, 2], max_new_tokens=20, queues=[queue])
    assert first == again
    assert len(first["samples"]) == 4
    tokenizer = load_trained(trained_demos["gpt_demo"]).tokenizer
    for s in first["samples"]:
        assert s["text"].startswith(s["prompt"])
        assert s["stopped_at_eos"] or s["tokens"] == 20
        assert s["tokens"] <= 20
        assert tokenizer.eos_id not in tokenizer.encode(s["text"], bos=False).tolist()
    run_dir = trained_demos["gpt_demo"].parent
    assert json.loads((run_dir / "samples.json").read_text())["temperature"] == 0.8
    assert "Once upon a time" in (run_dir / "samples.md").read_text()


def test_report_compares_every_finished_run_and_lists_the_rest(queue, tmp_path):
    evaluate(queues=[queue])
    sample(queues=[queue], prompts=["Once upon a time"], max_new_tokens=10)
    out = tmp_path / "report"
    text = report(queues=[queue], out_dir=out).read_text()
    for name in ("gpt_demo", "llama_demo"):
        assert f"| `{name}` | {name.split('_')[0]} |" in text  # a row of the results table
    assert "| `never_ran` | todo | not trained yet |" in text
    for figure in ("loss_curves", "gpt_vs_llama", "scaling", "throughput"):
        assert (out / f"{figure}.png").stat().st_size > 10_000
        assert f"({figure}.png)" in text
    assert "Samples, side by side" in text and "llama2.c stories15M" in text
