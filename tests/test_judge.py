"""The judge client against real server processes on 127.0.0.1: a stdlib server that answers well, late or
in garbage, and (slow) `litgpt serve --openai_spec true` on a demo checkpoint, through `make quality`."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tinystories_lab.cli import main
from tinystories_lab.evaluate.judge import CRITERIA, GradeCache, Judge, JudgeError, cache_key, parse_grades
from tinystories_lab.evaluate.quality import CACHE_NAME, grade_all, quality
from tinystories_lab.evaluate.report import report

FAKE = Path(__file__).with_name("fake_judge.py")
GOOD = "Grammar: 8/10\nCreativity: 6/10\nConsistency: 7/10\nPlot: 5/10\nAge group: C"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else "server exited"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} not up within {timeout} s")


@pytest.fixture
def fake():
    """Start the stdlib fake judge in a mode: gives (its base url, a function giving its request count)."""
    started = []

    def start(mode: str, n: int = 0):
        port = free_port()
        p = subprocess.Popen([sys.executable, str(FAKE), str(port), mode, str(n)])
        started.append(p)
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base + "/count", p, 20)

        def count() -> int:
            return json.loads(urllib.request.urlopen(base + "/count").read())["count"]

        return base + "/v1", count

    yield start
    for p in started:
        p.kill()
        p.wait()


def test_grades_are_parsed_strictly():
    assert parse_grades(GOOD) == {
        "grammar": 8,
        "creativity": 6,
        "consistency": 7,
        "plot": 5,
        "age_group": "C",
    }
    assert parse_grades("Here they are:\n" + GOOD.lower() + "\n")["age_group"] == "C"  # other lines may come
    assert parse_grades(GOOD.replace("Plot: 5/10\n", "")) is None  # a criterion missing
    assert parse_grades(GOOD + "\nPlot: 6/10") is None  # twice
    assert parse_grades(GOOD.replace("8/10", "11/10")) is None  # out of range
    assert parse_grades(GOOD.replace("8/10", "0/10")) is None
    assert parse_grades(GOOD.replace("8/10", "8")) is None  # not N/10
    assert parse_grades(GOOD.replace("Age group: C", "Age group: 6-7")) is None
    assert parse_grades("The grammar is 8/10, creativity 6/10, consistency 7/10, plot 5/10. C") is None


def test_a_well_formed_answer_costs_two_calls(fake):
    url, count = fake("good")
    result = Judge(url, "m").grade("Tom went to the", " park and played.")
    assert result["status"] == "graded" and result["grammar"] == 8 and result["age_group"] == "C"
    assert count() == 2 and len(result["answers"]) == 2


def test_another_format_is_asked_once_more_then_unparseable_never_zero(fake):
    url, count = fake("retry")
    result = Judge(url, "m").grade("Tom went to the", " park.")
    assert result["status"] == "graded" and result["plot"] == 5 and count() == 3
    url, count = fake("chatty")
    result = Judge(url, "m").grade("Tom went to the", " park.")
    assert result == {"status": "unparseable", "answers": result["answers"]} and len(result["answers"]) == 3
    assert count() == 3


@pytest.mark.parametrize(
    "mode, message",
    [
        (
            "garbage",
            "does not answer as an OpenAI-compatible chat endpoint (got '<html>502 Bad Gateway</html>')",
        ),
        ("sleep", "did not answer within 1 s"),
    ],
)
def test_garbage_or_a_slow_server_is_one_line(fake, mode, message):
    url, _ = fake(mode)
    with pytest.raises(JudgeError, match="^The judge at .*/v1/chat/completions ") as e:
        Judge(url, "m", timeout=1).grade("a", "b")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_down_server_is_one_line():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(JudgeError, match=r"cannot be reached \(.*refused.*\); is it running\?$"):
        Judge(url, "m").chat([{"role": "user", "content": "hi"}])


def test_a_failing_judge_loses_no_cached_answer_and_a_rerun_asks_only_what_is_missing(fake, tmp_path):
    completions = [{"beginning": f"Story {i} began", "completion": f" and went on {i}."} for i in range(4)]
    cache_path = tmp_path / CACHE_NAME
    url, _ = fake("good_then_garbage", 4)  # two stories graded, then garbage
    with pytest.raises(
        JudgeError, match=f"2 graded stories are kept in {cache_path}; rerun to grade the other 2"
    ):
        grade_all(completions, Judge(url, "m"), "run", GradeCache(cache_path), "beginning")
    assert len(cache_path.read_text().splitlines()) == 2
    with open(cache_path, "a") as f:
        f.write('{"key": "cut sh')  # a line a crash cut short
    url, count = fake("good")
    grades = grade_all(completions, Judge(url, "m"), "run", GradeCache(cache_path), "beginning")
    assert [g["status"] for g in grades] == ["graded"] * 4 and count() == 4  # 2 stories x 2 calls
    again = grade_all(completions, Judge(url, "m"), "run", GradeCache(cache_path), "beginning")
    assert again == grades and count() == 4  # all from the cache
    assert len(GradeCache(cache_path).entries) == 4
    other = cache_key("run", "Story 0 began", " and went on 0.", "another-judge")
    assert GradeCache(cache_path).get(other) is None  # another judge model is graded anew


def test_the_api_key_is_sent_but_never_written(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", "sk-secret-123")
    url, _ = fake("good")
    cache = GradeCache(tmp_path / CACHE_NAME)
    grade_all([{"beginning": "a", "completion": "b"}], Judge(url, "m"), "run", cache, "beginning")
    assert "sk-secret-123" not in cache.path.read_text()


# The real thing: `litgpt serve` as the judge, `make quality`'s verb end to end, and the report.


@pytest.fixture
def served_demo(trained_demos, tmp_path):
    """`litgpt serve --openai_spec true` on a copy of the trained gpt_demo checkpoint whose block size is
    raised to hold the judge's prompt (RoPE; the weights do not depend on it). Yields the API's base URL."""
    judge_dir = tmp_path / "judge"
    shutil.copytree(trained_demos["gpt_demo"], judge_dir)
    config = yaml.safe_load((judge_dir / "model_config.yaml").read_text())
    (judge_dir / "model_config.yaml").write_text(yaml.safe_dump(config | {"block_size": 2048}))
    port = free_port()
    litgpt = Path(sys.executable).parent / "litgpt"
    cmd = [str(litgpt), "serve", str(judge_dir), "--openai_spec", "true", "--port", str(port),
           "--accelerator", "cpu", "--max_new_tokens", "12"]  # fmt: skip
    log = open(tmp_path / "serve.log", "w")
    # its own process group: litserve's workers are child processes that keep the port open
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", p, 240)
        yield f"http://127.0.0.1:{port}/v1", stop
    finally:
        stop()


@pytest.mark.slow
def test_quality_with_litgpt_serve_as_the_judge(served_demo, trained_demos, tmp_path, capsys):
    url, stop_server = served_demo
    beginnings = tmp_path / "beginnings.json"
    found = json.loads((Path("src/tinystories_lab/evaluate/beginnings.json")).read_text())
    beginnings.write_text(json.dumps(found | {"beginnings": found["beginnings"][:2]}))
    run = trained_demos["gpt_demo"]
    args = dict(model=str(run), judge_url=url, judge_model="gpt_demo", beginnings=beginnings,
                max_new_tokens=20, device="cpu")  # fmt: skip
    [result] = quality(**args)
    written = json.loads((run.parent / "quality.json").read_text())
    assert written == result and written["beginnings_version"] == 1
    judge = result["judge"]
    assert judge["model"] == "gpt_demo" and judge["graded"] + judge["unparseable"] == 2
    for c in result["completions"]:
        assert c["grades"]["status"] in ("graded", "unparseable")
        assert c["grades"]["status"] == "graded" or set(c["grades"]) == {"status"}  # never a 0 score
    cached = [json.loads(line) for line in (run.parent / CACHE_NAME).read_text().splitlines()]
    assert len(cached) == 2 and all(len(e["result"]["answers"]) in (2, 3) for e in cached)
    # the server gone, a rerun costs nothing: every answer comes from the cache
    stop_server()
    [again] = quality(**args)
    assert again["judge"] == judge
    assert "0 stories graded now, 2 from the cache" in capsys.readouterr().out
    # a new completion with the server down: one line, exit 1, the cache intact
    with pytest.raises(SystemExit) as e:
        main(["quality", "--model", str(run), "--judge_url", url, "--judge_model", "gpt_demo", "--beginnings",
              str(beginnings), "--seed", "7", "--max_new_tokens", "20", "--device", "cpu"])  # fmt: skip
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert err.startswith("error: The judge at ") and "cannot be reached" in err
    assert "2 graded stories are kept" in err
    assert len((run.parent / CACHE_NAME).read_text().splitlines()) == 2


def test_the_report_puts_quality_beside_bits_per_byte_naming_the_judge(tmp_path):
    config = "config_hub/pretrain/tiny_stories/demo/{}.yaml"
    entries = []
    for name, bpb, grammar in (("gpt_demo", 1.363, 3.0), ("llama_demo", 1.333, 4.0)):
        out = tmp_path / name
        (out / "final").mkdir(parents=True)
        (out / "final" / "lit_model.pth").write_bytes(b"")
        evaluation = {"tokens_trained": 1000, "loss": 3.8, "perplexity": 45.0, "bits_per_byte": bpb,
                      "tokens_to_val_loss": {}, "eval_text": "sample"}  # fmt: skip
        (out / "eval.json").write_text(json.dumps(evaluation))
        summary = {"n": 50, "mean": grammar, "low": grammar - 0.5, "high": grammar + 0.5}
        measures = {"completions": 50, "eos_share": 0.42, "mean_tokens": 80.0, "rep_2": 0.05}
        measures |= {"distinct_2": 0.6, "rouge_4_precision": 0.3, "longest_overlap_words": {"max": 11}}
        judge = {"model": "qwen-judge", "unparseable": 2, "criteria": dict.fromkeys(CRITERIA, summary)}
        quality_json = {"beginnings_version": 1, "measures": measures, "judge": judge}
        (out / "quality.json").write_text(json.dumps(quality_json))
        entries.append({"name": name, "config": config.format(name), "status": "done", "out_dir": str(out)})
    queue = tmp_path / "q.yaml"
    queue.write_text(yaml.safe_dump({"experiments": entries}))
    text = report(queues=[queue], out_dir=tmp_path / "report").read_text()
    assert "## Story quality" in text
    rows = [line for line in text.splitlines() if line.startswith("| `") and "qwen-judge" in line]
    assert rows[0].startswith(
        "| `gpt_demo` | gpt | 4L_4H_128D | 1.363 | 50 (v1) | 42% | 80.0 | 0.050 | 0.600"
    )
    assert "| 0.300 | 11 | `qwen-judge` | 3.00 [2.50, 3.50] |" in rows[0] and rows[0].endswith("| 2 |")
    assert (
        rows[1].startswith("| `llama_demo` | llama | 4L_4H_128D | 1.333 |") and "4.00 [3.50, 4.50]" in rows[1]
    )
