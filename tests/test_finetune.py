"""Fine-tuning a demo model on the offline instruction set with LitGPT's own commands."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from litgpt import GPT, Config

from tinystories_lab.cli import evaluate
from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.samples import INSTRUCTIONS, sample
from tinystories_lab.experiments.locks import RunLock
from tinystories_lab.export.exporter import export
from tinystories_lab.finetune.data import data_instruct, drawn_words, instruction, parse_instruct
from tinystories_lab.finetune.run import finetune
from tinystories_lab.models import load_trained

# A few small steps, no compilation, no loader workers: seconds, not minutes.
FEW_STEPS = (
    "--train.max_steps=6 --train.global_batch_size=8 --train.micro_batch_size=4 --train.lr_warmup_steps=1 "
    "--eval.interval=1000 --data.num_workers=0 --precision=32-true"
)


def test_the_offline_set_asks_for_words_of_each_story_and_holds_out_the_validation_stories(tmp_path):
    folder = data_instruct("sample", tmp_path)
    train, val = (json.loads((folder / f).read_text()) for f in ("train.json", "val.json"))
    assert (len(train), len(val)) == (2066, 250)
    for ex in train[:50] + val[:50]:
        words = ex["instruction"].removeprefix("Write a story that uses the words ").rstrip(".")
        words = words.replace(" and ", ", ").split(", ")
        assert len(words) == 3 and all(w in ex["output"] for w in words)
    assert not {ex["output"] for ex in train} & {ex["output"] for ex in val}
    again = data_instruct("sample", tmp_path / "again")
    assert (again / "train.json").read_text() == (folder / "train.json").read_text()  # fixed seed
    assert drawn_words("the the the", random.Random(0)) == []


def test_tinystories_instruct_blocks_become_instructions():
    lines = [
        "Features: Dialogue, BadEnding",
        "Words: quit, oak, gloomy",
        "Summary: Sara wanted to go home.",
        "Story: ",
        "",
        "Sara and Ben played.",
        '"Let\'s go," said Ben.',
        "<|endoftext|>",
        "Random sentence: The sun was hot.",
        "Story: A red cat ran.",
        "<|endoftext|>",
        "Words: no, story, here",
        "<|endoftext|>",
    ]
    first, second = parse_instruct(lines)
    assert first["output"] == 'Sara and Ben played.\n"Let\'s go," said Ben.'
    assert first["instruction"] == (
        "Write a story that uses the words quit, oak and gloomy. It has dialogue and a bad ending. "
        "Summary: Sara wanted to go home."
    )
    assert second == {
        "instruction": "Write a story. It contains the sentence: The sun was hot.",
        "input": "",
        "output": "A red cat ran.",
    }
    assert instruction(["dog"]) == "Write a story that uses the words dog."


def test_data_instruct_without_a_network_refuses_in_one_line(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    cmd = [sys.executable, "-m", "tinystories_lab.cli", "data-instruct", "--data_dir", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: Could not download roneneldan/TinyStoriesInstruct") and "DATA=sample" in last
    )
    assert not (tmp_path / "instruct").exists()


def litgpt_generate(checkpoint_dir: Path) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "litgpt"), "generate", str(checkpoint_dir),
           "--prompt", INSTRUCTIONS[0], "--max_new_tokens", "20", "--precision", "32-true"]  # fmt: skip
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_lowers_the_held_out_loss_and_loads_in_litgpt_generate(
    method, trained_demos, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")
    out = tmp_path / f"gpt_demo-sample-{method}"
    args = FEW_STEPS + (" --train.save_interval=3" if method == "full" else "")

    run = trained_demos["gpt_demo"].parent
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}

    def tune():
        return finetune(
            str(trained_demos["gpt_demo"]), "sample", method, args=args, out_dir=out, data_dir=tmp_path
        )

    final = tune()
    assert final == out / "final" and (final / "prompt_style.yaml").is_file()

    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # the run's folder is only read

    [result] = evaluate(model=str(out))
    assert result["instruction_loss_after"] < result["instruction_loss_before"]
    assert result["method"] == method and result["instruction_targets"] > 10_000
    assert json.loads((out / "eval.json").read_text()) == result

    generated = litgpt_generate(final)
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert "Instruct: " + INSTRUCTIONS[0] in generated.stdout  # LitGPT applied the saved prompt style

    # The tied head: the base weights carry the tied matrix under both names, so LitGPT's untied GPT (as
    # finetune and generate build it) is the pretrained model; our loader gives what LitGPT computes.
    base = torch.load(out / "base" / "lit_model.pth", weights_only=True)
    assert torch.equal(base["lm_head.weight"], base["transformer.wte.weight"])
    tuned = torch.load(final / "lit_model.pth", weights_only=True)
    tuned = tuned.get("model", tuned)
    plain = GPT(Config.from_file(final / "model_config.yaml"))
    plain.load_state_dict(tuned)
    ours = load_trained(final)
    x = torch.randint(0, 8192, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x), plain.eval()(x))
    heads_differ = not torch.equal(tuned["lm_head.weight"], tuned["transformer.wte.weight"])
    assert heads_differ == (method == "full")  # LoRA leaves both alone; full trains them separately

    [samples] = sample(model=str(out), max_new_tokens=16)
    assert samples["prompt_style"] == "Phi2" and [s["prompt"] for s in samples["samples"]] == INSTRUCTIONS

    with pytest.raises(UserError, match="fine-tuned already"):
        tune()
    if method == "lora":
        (final / "lit_model.pth").unlink()  # as if killed before LoRA's merge
        with pytest.raises(UserError, match="cannot resume"):
            tune()
        lock = RunLock(out)
        assert lock.acquire()
        with pytest.raises(UserError, match="being fine-tuned by another process"):
            tune()
        lock.release()
    else:
        export(str(out), out_dir=tmp_path / "hf")  # raises unless transformers reproduces the logits
        card = (tmp_path / "hf" / "README.md").read_text()
        assert "## Fine-tuning" in card and "litgpt finetune_full" in card
        # Killed while writing its last checkpoints: resume from the newest one that loads.
        (final / "prompt_style.yaml").unlink()
        for path in (final / "lit_model.pth", out / "step-000006" / "lit_model.pth"):
            path.write_bytes(path.read_bytes()[:1000])
        final = tune()
        log = sorted((out / "logs").glob("*.log"))[-1].read_text()
        assert "--resume=" + str(out / "step-000003" / "lit_model.pth") in log
        assert load_trained(final).model is not None
