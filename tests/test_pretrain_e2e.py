"""The real `litgpt pretrain --config` trains a demo config on the bundled sample."""

import csv

import pytest
from conftest import DEMO_CONFIGS, litgpt_pretrain


@pytest.mark.slow
def test_litgpt_pretrain_demo_config_writes_checkpoint_and_learns(sample_data, tmp_path):
    out = tmp_path / "gpt_demo"
    # 40 optimizer steps of 32 x 128 tokens, with torch.compile as LitGPT always applies it.
    result = litgpt_pretrain(
        DEMO_CONFIGS["gpt_demo"],
        sample_data,
        out,
        "--train.max_tokens=163840",
        "--train.save_interval=20",
        "--eval.interval=20",
        compile=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for folder in ("step-00000020", "step-00000040", "final"):
        assert (out / folder / "lit_model.pth").is_file()
        assert (out / folder / "tokenizer.model").is_file()
    rows = list(csv.DictReader(open(next((out / "logs" / "csv").rglob("metrics.csv")))))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert losses[0] > 8.5  # ~ln(8192) = 9.0 at initialisation
    assert losses[-1] < losses[0] - 3  # it learns
    assert val[-1] < val[0]
