import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_HUB = ROOT / "config_hub" / "pretrain" / "tiny_stories"
DEMO_CONFIGS = {name: CONFIG_HUB / "demo" / f"{name}.yaml" for name in ("gpt_demo", "llama_demo")}


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    """Configs use paths relative to the repository root, as the Makefile does."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """A data folder holding the bundled sample's 8,192-token tokenizer and token files."""
    from tinystories_lab.data.prepare import prepare

    data_dir = tmp_path_factory.mktemp("data")
    prepare(source="sample", data_dir=data_dir, vocab_size=8192)
    return data_dir


def litgpt_pretrain(
    config: Path, data_dir: Path, out_dir: Path, *args: str, compile: bool = False, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run the real `litgpt pretrain --config` on the sample data in `data_dir`.

    `compile=False` sets TORCH_COMPILE_DISABLE=1: on a CPU it saves ~20 s of compilation per run, far more
    than compiling gains over a short run (3-9% per step for the demos, README Benchmarks).
    """
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "0" if compile else "1"}
    cmd = [
        str(Path(sys.executable).parent / "litgpt"),
        "pretrain",
        "--config",
        str(config),
        f"--out_dir={out_dir}",
        f"--data.init_args.data_dir={data_dir}",
        f"--tokenizer_dir={data_dir / 'tokenizers' / 'sample'}",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained_demos(sample_data, tmp_path_factory) -> dict[str, Path]:
    """Both demo models trained briefly (24 steps) on the sample: name -> checkpoint folder (`final/`)."""
    out = tmp_path_factory.mktemp("trained")
    folders = {}
    for name, config in DEMO_CONFIGS.items():
        result = litgpt_pretrain(
            config, sample_data, out / name,
            f"--train.max_tokens={24 * 32 * 128}", "--train.save_interval=12", "--eval.interval=12",
            "--data.init_args.val_windows=64", "--eval.initial_validation=false",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        folders[name] = out / name / "final"
    return folders
