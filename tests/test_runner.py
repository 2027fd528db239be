"""The queue and the runner, with the real runner and the real `litgpt pretrain` on the sample."""

import csv
import json
import shutil
import signal
import subprocess
import sys

import pytest
import yaml
from conftest import TOKENS_PER_STEP, entry, losses_by_iter, runner, status, wait_for, write_queue

from tinystories_lab.cli import main
from tinystories_lab.experiments.locks import run_is_alive
from tinystories_lab.experiments.queue import Queue
from tinystories_lab.experiments.runs import step_checkpoints, write_run_file

# Bad input: a clear message, a non-zero exit, and the queue byte-identical.

BAD_QUEUES = {  # what is wrong with entry "b" (None: the file itself), and the message
    "malformed YAML": (None, "not valid YAML"),
    "unknown status": ({"status": "paused"}, "unknown status 'paused'"),
    "duplicate names": ({"name": "a"}, "appears twice"),
    "missing config": ({"config": "config_hub/pretrain/tiny_stories/nope.yaml"}, "does not exist"),
    "unknown environment": ({"environment": "kubernetes"}, "environment 'kubernetes'"),
    "bad devices": ({"devices": 0}, "devices must be a positive integer"),
}


@pytest.mark.parametrize("case", BAD_QUEUES)
def test_bad_queue_is_refused_and_left_untouched(case, tmp_path, sample_data, capsys):
    change, message = BAD_QUEUES[case]
    queue = tmp_path / "q.yaml"
    if change is None:
        queue.write_text("experiments:\n  - name: [unclosed\n")
    else:
        write_queue(
            queue, [entry("a", tmp_path, sample_data), {**entry("b", tmp_path, sample_data), **change}]
        )
    before = queue.read_bytes()
    for argv in (
        ["run-next", "--queues", f"[{queue}]"],
        ["run-all", "--queues", f"[{queue}]"],
        ["run-specific", "a", "--queues", f"[{queue}]"],
        ["reset", "a", "--queues", f"[{queue}]"],
        ["list", "--queues", f"[{queue}]"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 1
        assert message in capsys.readouterr().err
        assert queue.read_bytes() == before


def test_unknown_model_lists_valid_names(tmp_path, sample_data, capsys):
    queue = write_queue(
        tmp_path / "q.yaml", [entry("a", tmp_path, sample_data), entry("b", tmp_path, sample_data)]
    )
    before = queue.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["run-specific", "nope", "--queues", f"[{queue}]"])
    assert exit_info.value.code == 1
    assert "Unknown experiment 'nope'. Valid names: a, b." in capsys.readouterr().err
    assert queue.read_bytes() == before


@pytest.mark.parametrize("missing", ["token files", "tokenizer"])
def test_unprepared_data_names_the_command(missing, tmp_path, sample_data, capsys):
    e = entry("a", tmp_path, sample_data)
    empty = tmp_path / "empty"
    if missing == "token files":
        e["args"][0] = f"--data.init_args.data_dir={empty}"
        expected = "make data-sample"
    else:
        e["args"][1] = f"--tokenizer_dir={empty}"
        expected = "No tokenizer in"
    queue = write_queue(tmp_path / "q.yaml", [e])
    before = queue.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["run-next", "--queues", f"[{queue}]"])
    assert exit_info.value.code == 1
    assert expected in capsys.readouterr().err
    assert queue.read_bytes() == before


def test_queue_edits_keep_comments_user_fields_and_order(tmp_path, sample_data):
    queue = tmp_path / "q.yaml"
    a, b = entry("a", tmp_path, sample_data), entry("b", tmp_path, sample_data)
    a["owner"] = "me"
    queue.write_text("# my queue\n" + yaml.safe_dump({"experiments": [a, b]}, sort_keys=False))
    with Queue(queue).edit() as entries:
        entries[1]["status"] = "failed"
    text = queue.read_text()
    assert text.startswith("# my queue\n")
    assert [e["name"] for e in Queue(queue).load()] == ["a", "b"]
    assert status(queue, "a")["owner"] == "me" and status(queue, "b")["status"] == "failed"


def test_reset_puts_back_to_todo_and_keeps_checkpoints_unless_asked(tmp_path, sample_data):
    e = entry("a", tmp_path, sample_data)
    e.update(status="failed", exit_code=1, error="boom", attempts=2)
    queue = write_queue(tmp_path / "q.yaml", [e])
    ckpt = tmp_path / "runs" / "a" / "step-00000004" / "lit_model.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    write_run_file(ckpt.parent.parent, "a", queue)
    main(["reset", "a", "--queues", f"[{queue}]"])
    assert {k: v for k, v in status(queue, "a").items() if k in ("status", "exit_code", "error")} == {
        "status": "todo"
    }
    assert ckpt.is_file()
    main(["reset", "a", "--queues", f"[{queue}]", "--delete_run_folder", "true"])
    assert not (tmp_path / "runs" / "a").exists()


def test_reset_deletes_only_a_run_folder(tmp_path, sample_data, capsys):
    queue = write_queue(
        tmp_path / "q.yaml", [{**entry("a", tmp_path, sample_data), "out_dir": str(tmp_path)}]
    )
    before = queue.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["reset", "a", "--queues", f"[{queue}]", "--delete_run_folder", "true"])
    assert exit_info.value.code == 1 and "holds the current folder or the queue" in capsys.readouterr().err
    assert queue.read_bytes() == before  # and the folder, queue included, is still there


def test_an_outcome_is_recorded_though_another_entry_lost_its_config(tmp_path, sample_data):
    from tinystories_lab.experiments.outcomes import finish

    b = {**entry("b", tmp_path, sample_data), "config": "config_hub/pretrain/tiny_stories/gone.yaml"}
    queue = write_queue(tmp_path / "q.yaml", [{**entry("a", tmp_path, sample_data), "status": "running"}, b])
    queue.chmod(0o664)  # a queue shared by a group stays readable by it
    finish(Queue(queue), "a", status="done", exit_code=0)
    a = yaml.safe_load(queue.read_text())["experiments"][0]
    assert a["status"] == "done" and a["exit_code"] == 0
    assert queue.stat().st_mode & 0o777 == 0o664


# The real thing.


@pytest.mark.slow
def test_run_next_trains_a_todo_entry_to_done(tmp_path, sample_data):
    queue = write_queue(
        tmp_path / "q.yaml", [entry("a", tmp_path, sample_data), entry("b", tmp_path, sample_data)]
    )
    result = runner("run-next", queue)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a = status(queue, "a")
    assert a["status"] == "done" and a["exit_code"] == 0 and a["last_step"] == 12 and a["attempts"] == 1
    assert status(queue, "b")["status"] == "todo"
    out = tmp_path / "runs" / "a"
    assert [c.step for c in step_checkpoints(out)] == [12, 8, 4]
    assert (out / "final" / "lit_model.pth").is_file()
    log = (out / "logs").glob("*.log")
    assert "--resume=auto" in next(log).read_text()
    measured = json.loads((out / "device.json").read_text())  # rank 0's peak, for MICRO=auto (probe.py)
    assert (
        set(measured) == {"peak_memory_gib", "device_memory_gib"} and 0.1 < measured["peak_memory_gib"] < 16
    )
    listing = subprocess.run(
        [sys.executable, "-m", "tinystories_lab.cli", "list", "--queues", f"[{queue}]"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    row = next(line for line in listing.splitlines() if line.startswith("a "))
    assert "done" in row and "49.15k / 49.15k (100%)" in row


@pytest.mark.slow
def test_sigkill_then_run_next_resumes_and_matches_an_uninterrupted_run(tmp_path, sample_data):
    queue = write_queue(
        tmp_path / "q.yaml",
        [
            entry("straight", tmp_path, sample_data, steps=16),
            entry("killed", tmp_path, sample_data, steps=16),
        ],
    )
    assert runner("run-specific", queue, "straight").returncode == 0

    proc = runner("run-specific", queue, "killed", wait=False)
    out = tmp_path / "runs" / "killed"
    wait_for(lambda: max(losses_by_iter(out), default=0) >= 6)  # past the step-4 checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not run_is_alive(out), timeout=30)  # LitGPT died with its runner
    assert status(queue, "killed")["status"] == "running"  # left behind, stale

    result = runner("run-next", queue)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "which is gone: resuming it" in result.stdout
    assert "Resuming training from" in result.stdout
    killed = status(queue, "killed")
    assert killed["status"] == "done" and killed["attempts"] == 2 and killed["last_step"] == 16

    versions = sorted((out / "logs" / "csv").glob("version_*"))
    assert len(versions) == 2
    resumed_iters = logged_iters(versions[1])
    assert resumed_iters[0] in (5, 9) and resumed_iters[-1] == 16  # the step count continues
    expected = losses_by_iter(tmp_path / "runs" / "straight")
    got = losses_by_iter(out)
    assert sorted(got) == list(range(1, 17))
    for it, loss in got.items():
        assert loss == pytest.approx(expected[it], abs=1e-4), it


def logged_iters(version_dir):
    """Training iterations logged in one CSV log version."""
    with open(version_dir / "metrics.csv", newline="") as f:
        return [int(r["iter"]) for r in csv.DictReader(f) if r.get("loss")]


@pytest.mark.slow
def test_truncated_newest_checkpoint_is_skipped(tmp_path, sample_data):
    queue = write_queue(tmp_path / "q.yaml", [entry("a", tmp_path, sample_data, steps=8)])
    assert runner("run-next", queue).returncode == 0
    out = tmp_path / "runs" / "a"
    shutil.rmtree(out / "final")  # as if killed while saving step 8, before final/ was written
    newest = out / "step-00000008" / "lit_model.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    truncated = newest.stat().st_size
    main(["reset", "a", "--queues", f"[{queue}]"])
    result = runner("run-next", queue, f"--args=--train.max_tokens={12 * TOKENS_PER_STEP}")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "step-00000008 does not load (truncated or corrupt): resuming from step-00000004" in result.stdout
    assert "Resuming training from" in result.stdout and "step-00000004" in result.stdout
    assert status(queue, "a")["last_step"] == 12
    assert newest.stat().st_size > truncated  # step 8 was saved again, whole


@pytest.mark.slow
def test_two_runners_started_together_train_different_experiments(tmp_path, sample_data):
    queue = write_queue(
        tmp_path / "q.yaml",
        [
            entry("a", tmp_path, sample_data, steps=6),
            entry("b", tmp_path, sample_data, steps=6, config="llama_demo"),
        ],
    )
    procs = [runner("run-next", queue, wait=False) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert status(queue, "a")["status"] == status(queue, "b")["status"] == "done"
    assert status(queue, "a")["attempts"] == status(queue, "b")["attempts"] == 1
    assert status(queue, "a")["pid"] != status(queue, "b")["pid"]


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_the_resume_keeps_the_run_arguments(tmp_path, sample_data):
    queue = write_queue(tmp_path / "q.yaml", [entry("a", tmp_path, sample_data, steps=40)])
    max_tokens = f"--train.max_tokens={24 * TOKENS_PER_STEP}"  # replaces the entry's 40 steps
    proc = runner("run-next", queue, f"--args={max_tokens}", "--logger=csv", wait=False)
    out = tmp_path / "runs" / "a"
    wait_for(lambda: (out / "step-00000004" / "lit_model.pth").is_file())
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert not run_is_alive(out)  # LitGPT is gone too
    a = status(queue, "a")
    assert a["status"] == "todo" and "SIGTERM" in a["note"]
    assert a["run_args"] == [max_tokens] and a["run_logger"] == "csv"
    resumed = runner("run-next", queue)  # no arguments: the run's own come back, not the config's
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming with the arguments it started with: {max_tokens} --logger_name=csv" in resumed.stdout
    assert status(queue, "a")["status"] == "done" and status(queue, "a")["last_step"] == 24


@pytest.mark.slow
def test_run_all_goes_past_a_failure_and_reports_every_outcome(tmp_path, sample_data):
    broken = entry(
        "broken", tmp_path, sample_data, steps=2, extra=["--eval.max_new_tokens=5"]
    )  # LitGPT rejects
    queue = write_queue(tmp_path / "q.yaml", [broken, entry("fine", tmp_path, sample_data, steps=2)])
    result = runner("run-all", queue)
    assert result.returncode == 1
    assert "broken: failed (exit 1)" in result.stdout and "fine: done" in result.stdout
    failed = status(queue, "broken")
    assert failed["status"] == "failed" and failed["exit_code"] == 1
    assert "max_new_tokens" in failed["error"]
    assert status(queue, "fine")["status"] == "done"


def test_logger_choice_and_offline_wandb(tmp_path, monkeypatch):
    from tinystories_lab.experiments.launch import child_env, launch_command

    e = {"name": "a", "config": "c.yaml", "devices": 2, "num_nodes": 1, "args": ["--seed=1"]}
    cmd = launch_command(e, "tensorboard", ["--train.max_tokens=10"])
    assert cmd[-3:] == ["--logger_name=tensorboard", "--seed=1", "--train.max_tokens=10"]
    assert "--devices=2" in cmd and "--resume=auto" in cmd and "--out_dir=experiments/tiny_stories/a" in cmd
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    env = child_env("wandb", tmp_path / "out")
    assert env["WANDB_MODE"] == "offline" and env["WANDB_DIR"] == str(tmp_path / "out")
    monkeypatch.setenv("WANDB_API_KEY", "key")
    assert "WANDB_MODE" not in child_env("wandb", tmp_path / "out")
