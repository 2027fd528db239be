import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

# Under pytest-xdist each worker's processes get their share of the cores (as Lightning does for its DDP
# ranks): with two workers each training on every core, torch's threads wait on each other and the same
# tests used 1.7x the CPU time (3,542 s against ~2,100 s; `make test` took longer with two workers).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )

from tinystories_lab.cli import main  # noqa: E402  (torch reads OMP_NUM_THREADS when it loads)
from tinystories_lab.experiments.queue import Queue
from tinystories_lab.experiments.runs import read_curves

ROOT = Path(__file__).resolve().parents[1]
CONFIG_HUB = ROOT / "config_hub" / "pretrain" / "tiny_stories"
DEMO_CONFIGS = {name: CONFIG_HUB / "demo" / f"{name}.yaml" for name in ("gpt_demo", "llama_demo")}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """`make test` runs two pytest-xdist workers (--dist loadgroup); tests in one group share a worker, one
    after the other: the SLURM tests share the local cluster's CPUs, and the tests on `trained_demos`
    write into its run folders (eval.json, interp/) while others check that nothing there changed.
    pytest-xdist hands out the groups first, then single tests in collection order: there, the slow ones
    first, so that no long test starts last while the other worker has nothing left to do."""
    for item in items:
        if item.path.name == "test_slurm.py":
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif "trained_demos" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("trained_demos"))
    if "PYTEST_XDIST_WORKER" in os.environ:  # in one process, the files' own order
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow ones first


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook, run where its workers report their collections
def pytest_xdist_node_collection_finished(node, ids):
    """Stop where pytest-xdist drops the groups (it did, silently, with pytest 9.2:
    pytest-dev/pytest-xdist#1386) rather than run the SLURM tests side by side."""
    ungrouped = [i for i in ids if "test_slurm.py::" in i and not i.endswith("@slurm")]
    if node.config.getoption("dist") == "loadgroup" and ungrouped:
        raise pytest.UsageError(
            f"pytest-xdist did not group {ungrouped[0]} (pytest-dev/pytest-xdist#1386): "
            "install the pytest that pyproject.toml's dev extra asks for (make install)"
        )


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    """Configs use paths relative to the repository root, as the Makefile does."""
    monkeypatch.chdir(ROOT)


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A session fixture's folder, made once per test run. Under pytest-xdist (`make test` runs two
    workers) the workers share it: the first makes it under a file lock, the others wait and reuse it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / name  # this run's folder, above each worker's own
    with FileLock(f"{folder}.lock"):
        if not (folder / ".made").exists():  # absent too when a worker's attempt failed: make it again
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """A data folder holding the bundled sample's 8,192-token tokenizer and token files."""
    from tinystories_lab.data.prepare import prepare

    return made_once(
        tmp_path_factory, "data", lambda folder: prepare(source="sample", data_dir=folder, vocab_size=8192)
    )


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
    """Both demo models trained briefly (24 steps) on the sample: name -> checkpoint folder (`final/`).
    Its tests share one pytest-xdist worker (pytest_collection_modifyitems), so it is trained once."""
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


# The queue and the runner, for the runner, fault and cluster tests.

TOKENS_PER_STEP = 32 * 128  # the demo configs' global batch


def entry(name, tmp_path, data_dir, steps=12, save_interval=4, config="gpt_demo", extra=()):
    """A queue entry training a demo config on the sample for `steps` optimizer steps."""
    return {
        "name": name,
        "config": str(DEMO_CONFIGS[config]),
        "devices": 1,
        "environment": "local",
        "status": "todo",
        "out_dir": str(tmp_path / "runs" / name),
        "args": [
            f"--data.init_args.data_dir={data_dir}",
            f"--tokenizer_dir={data_dir / 'tokenizers' / 'sample'}",
            "--data.init_args.val_windows=64",
            f"--train.max_tokens={steps * TOKENS_PER_STEP}",
            f"--train.save_interval={save_interval}",
            "--eval.interval=1000",
            "--eval.initial_validation=false",
            *extra,
        ],
    }


def write_queue(path, entries):
    path.write_text(yaml.safe_dump({"experiments": entries}, sort_keys=False))
    return path


# As root, file permissions apply only without these capabilities (a user's mode-000 folder is unreadable).
UNPRIVILEGED = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


def _interruptible() -> None:
    """Ctrl-C reaches the child as in a terminal even when the tests run as a background job: its shell
    ignores SIGINT, the child would inherit that, and Python would then never raise KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def runner(verb, queue, *args, wait=True, unprivileged=False):
    """The real runner CLI in a subprocess (TORCH_COMPILE_DISABLE=1 keeps each LitGPT start short);
    `unprivileged`: as a user whom file permissions bind, even when the tests run as root."""
    cmd = [sys.executable, "-m", "tinystories_lab.cli", verb, "--queues", f"[{queue}]", *args]
    cmd = (UNPRIVILEGED if unprivileged else []) + cmd
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_interruptible,
        )
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def run_cli(argv, capsys):
    """The CLI in this process, for verbs that start no training (list, reset, refusals): no ~10 s start-up.
    Returns (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def status(queue, name):
    return next(e for e in Queue(queue).load() if e["name"] == name)


def wait_for(condition, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def losses_by_iter(out_dir):
    train, _ = read_curves(out_dir)
    return {p.iter: p.value for p in train}
