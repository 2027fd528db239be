"""Seeds as part of the queue, and the report's statistics across seeds."""

import hashlib
import json

import pytest
import torch
import yaml
from conftest import entry, runner, status, write_queue

from tinystories_lab.cli import main
from tinystories_lab.configs import parse_config
from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.judge import CRITERIA
from tinystories_lab.evaluate.report import load_runs, quality_seeds_section, report
from tinystories_lab.evaluate.seeds import summarize, t_quantile, welch
from tinystories_lab.experiments.queue import Queue, set_seeds

# Known values, from SciPy 1.17.1: scipy.stats.t.ppf, t.interval and ttest_ind(equal_var=False).
GPT = [3.830, 3.845, 3.821]
LLAMA = [3.746, 3.760, 3.739]
WELCH_T, WELCH_DF, WELCH_P = 8.96428571428574, 3.9384615384615316, 0.000920047702614958


def test_t_quantiles_intervals_and_welch_match_known_values():
    assert t_quantile(0.975, 2) == pytest.approx(4.302652729749462, rel=1e-12)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451051977934, rel=1e-12)
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert (s.n, s.mean) == (4, 2.5) and s.sd == pytest.approx(1.2909944487358056)
    assert (s.low, s.high) == pytest.approx((0.4457397432394794, 4.554260256760521), rel=1e-12)
    assert welch(GPT, LLAMA) == pytest.approx((WELCH_T, WELCH_DF, WELCH_P), rel=1e-10)
    # Unequal sizes and spreads, not significant at 5%.
    assert welch([1.0, 2.0, 3.0, 4.0], [2.5, 3.5, 4.5, 6.0, 7.0]) == pytest.approx(
        (-2.1153194253318914, 6.946661847188643, 0.07252100711561206), rel=1e-10
    )
    assert summarize([3.8]).sd is None


def seeded(tmp_path, data_dir, seeds, name="a", **kwargs):
    return {**entry(name, tmp_path, data_dir, **kwargs), "seeds": seeds}


def test_seeds_expand_into_distinct_runs_sharing_the_config(tmp_path, sample_data):
    queue = write_queue(
        tmp_path / "q.yaml", [seeded(tmp_path, sample_data, [42, 43, 44]), entry("b", tmp_path, sample_data)]
    )
    runs = Queue(queue).load()
    assert [r["name"] for r in runs] == ["a", "a-seed43", "a-seed44", "b"]
    assert [r["out_dir"] for r in runs[:3]] == [
        str(tmp_path / "runs" / n) for n in ("a", "a-seed43", "a-seed44")
    ]
    configs = [parse_config(r["config"], *r["args"]) for r in runs[:3]]
    assert [(c.seed, c.data.seed) for c in configs] == [(42, 42), (43, 43), (44, 44)]
    for c in configs[1:]:  # the same config but for the seed
        assert (c.model_config, c.train, c.optimizer) == (
            configs[0].model_config,
            configs[0].train,
            configs[0].optimizer,
        )
    # Each seed's status is its own: the first is the entry's, the others live under seed_runs.
    with Queue(queue).edit() as entries:
        next(e for e in entries if e["name"] == "a-seed43").update(status="done", attempts=1)
    assert [status(queue, n)["status"] for n in ("a", "a-seed43", "a-seed44")] == ["todo", "done", "todo"]
    raw = yaml.safe_load(queue.read_text())["experiments"][0]
    assert raw["status"] == "todo" and raw["seed_runs"] == {43: {"status": "done", "attempts": 1}}


def test_seeds_n_extends_an_experiment_and_keeps_its_first_run(tmp_path, sample_data):
    done = {**entry("a", tmp_path, sample_data), "status": "done", "attempts": 1}
    queue = write_queue(tmp_path / "q.yaml", [done])
    assert set_seeds(Queue(queue), "a", 3, base=42) == ["a", "a-seed43", "a-seed44"]
    assert "    seeds: [42, 43, 44]\n" in queue.read_text()  # flow style, after config
    assert [status(queue, n)["status"] for n in ("a", "a-seed43", "a-seed44")] == ["done", "todo", "todo"]
    assert status(queue, "a")["attempts"] == 1
    before = queue.read_bytes()
    for name, count, message in (("a", 2, "has 3 seeds"), ("a-seed43", 3, "MODEL=a."), ("b", 3, "Unknown")):
        with pytest.raises(UserError, match=message):
            set_seeds(Queue(queue), name, count, base=42)
    assert queue.read_bytes() == before


@pytest.mark.parametrize(
    "seeds, message",
    [
        ([], "distinct non-negative integers"),
        ([1, 1], "distinct"),
        (["x"], "distinct"),
        ([1, 2], "like another"),
    ],
)
def test_bad_seeds_are_refused(seeds, message, tmp_path, sample_data, capsys):
    queue = write_queue(
        tmp_path / "q.yaml", [seeded(tmp_path, sample_data, seeds), entry("a-seed2", tmp_path, sample_data)]
    )
    before = queue.read_bytes()
    with pytest.raises(SystemExit):
        main(["list", "--queues", f"[{queue}]"])
    assert message in capsys.readouterr().err and queue.read_bytes() == before


def files_of(folder):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.mark.slow
def test_seeds_train_distinct_weights_and_resuming_one_leaves_the_others_untouched(tmp_path, sample_data):
    queue = write_queue(tmp_path / "q.yaml", [entry("a", tmp_path, sample_data, steps=2, save_interval=2)])
    result = runner("run-specific", queue, "a", "--seeds", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert yaml.safe_load(queue.read_text())["experiments"][0]["seeds"] == [42, 43]
    runs = {n: tmp_path / "runs" / n for n in ("a", "a-seed43")}
    assert [status(queue, n)["status"] for n in runs] == ["done", "done"]
    weights = {
        n: torch.load(d / "final" / "lit_model.pth", weights_only=True)["model"] for n, d in runs.items()
    }
    assert not torch.equal(weights["a"]["lm_head.weight"], weights["a-seed43"]["lm_head.weight"])
    hparams = {n: yaml.safe_load((d / "final" / "hyperparameters.yaml").read_text()) for n, d in runs.items()}
    assert [(h["seed"], h["data"]["init_args"]["seed"]) for h in hparams.values()] == [(42, 42), (43, 43)]
    run_file = yaml.safe_load((runs["a-seed43"] / "run.yaml").read_text())
    assert run_file["seed_sets"] == {"initialisation": "--seed=43", "data order": "--data.init_args.seed=43"}

    # Extend one seed: only its folder and its record change.
    before = files_of(runs["a"]), status(queue, "a")
    main(["reset", "a-seed43", "--queues", f"[{queue}]"])
    result = runner("run-specific", queue, "a-seed43", "--args=--train.max_tokens=16384")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert status(queue, "a-seed43")["last_step"] == 4 and status(queue, "a-seed43")["status"] == "done"
    assert (files_of(runs["a"]), status(queue, "a")) == before


def fake_run(folder, loss, bpb):
    """A finished, evaluated run folder with hand-made numbers (final checkpoint, curves, eval.json)."""
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "lit_model.pth").write_bytes(b"weights")
    csv = folder / "logs" / "csv" / "version_0" / "metrics.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text(
        "iter,loss,total_tokens,step,val_loss\n"
        f"1,9.0,4096,1,\n2,{loss + 1},8192,2,\n,,,0,{loss + 0.5}\n,,,2,{loss}\n"
    )
    result = {"loss": loss, "perplexity": 2.718**loss, "bits_per_byte": bpb, "tokens_trained": 8192,
              "tokens_to_val_loss": {}, "eval_text": "hand-made", "stories": 1}  # fmt: skip
    (folder / "eval.json").write_text(json.dumps(result))


def test_report_gives_intervals_and_welch_across_seeds(tmp_path):
    config = "config_hub/pretrain/tiny_stories/demo/{}.yaml"
    entries = []
    for name, losses in (("gpt_demo", GPT), ("llama_demo", LLAMA)):
        seeds = [42, 43, 44]
        runs = {s: {"status": "done"} for s in seeds[1:]}
        entries.append({"name": name, "config": config.format(name), "status": "done", "seeds": seeds,
                        "out_dir": str(tmp_path / name), "seed_runs": runs})  # fmt: skip
        for seed, loss in zip(seeds, losses):
            fake_run(tmp_path / (name if seed == 42 else f"{name}-seed{seed}"), loss, loss / 3)
    queue = write_queue(tmp_path / "q.yaml", entries)
    text = report(queues=[queue], out_dir=tmp_path / "report", reference_dir=tmp_path / "none").read_text()
    s = summarize(GPT)
    assert (
        f"| `gpt_demo` | 3 (42, 43, 44) | {s.mean:.4f} +- {s.sd:.4f} | [{s.low:.4f}, {s.high:.4f}] |" in text
    )
    assert "| `gpt_demo-seed43` (seed 43) |" in text
    assert f"| p = {WELCH_P:.2g} / " in text and "| one seed: not tested |" not in text
    assert (tmp_path / "report" / "loss_curves.png").stat().st_size > 10_000
    # One seed of each: not tested.
    for e in entries:
        e["seeds"] = [42]
    write_queue(queue, entries)
    text = report(queues=[queue], out_dir=tmp_path / "report", reference_dir=tmp_path / "none").read_text()
    assert "| one seed: not tested |" in text and "Across seeds" not in text


def test_report_gives_story_quality_intervals_across_seeds(tmp_path):
    config = "config_hub/pretrain/tiny_stories/demo/gpt_demo.yaml"
    seeds, grades = [42, 43, 44], [6.0, 7.0, 9.0]
    runs = {s: {"status": "done"} for s in seeds[1:]}
    entries = [{"name": "gpt_demo", "config": config, "status": "done", "seeds": seeds,
                "out_dir": str(tmp_path / "gpt_demo"), "seed_runs": runs}]  # fmt: skip
    for seed, rep_2, grade in zip(seeds, [1.0, 2.0, 3.0], grades):
        folder = tmp_path / ("gpt_demo" if seed == 42 else f"gpt_demo-seed{seed}")
        fake_run(folder, 3.8, 1.36)
        measures = {
            "completions": 50,
            "eos_share": 0.5,
            "mean_tokens": 80.0,
            "rep_2": rep_2,
            "distinct_2": None,
        }
        summary = {"n": 50, "mean": grade, "low": grade - 0.5, "high": grade + 0.5}
        judge = {"model": "qwen-judge", "unparseable": 0, "criteria": dict.fromkeys(CRITERIA, summary)}
        quality = {"beginnings_version": 1, "measures": measures, "judge": judge}
        (folder / "quality.json").write_text(json.dumps(quality))
    queue = write_queue(tmp_path / "q.yaml", entries)
    text = report(queues=[queue], out_dir=tmp_path / "report", reference_dir=tmp_path / "none").read_text()

    def table(lines):
        rows = lines.split("### Story quality across seeds")[1].split("\n\n")[1].splitlines()[2:]
        return {row.split(" | ")[2]: row.split(" | ")[3:] for row in rows}

    # By hand: 1, 2, 3 -> mean 2, sd 1, 2 +- t(0.975, 2) / sqrt(3) = 2 +- 4.302653 / 1.732051 = 2 +- 2.484138.
    rows = table(text)
    assert rows["rep-2"] == ["2.0000 +- 1.0000", "[-0.4841, 4.4841] |"]
    assert rows["ended (EOS)"] == ["0.5000 +- 0.0000", "[0.5000, 0.5000] |"]
    # 6, 7, 9 -> mean 22/3, sd sqrt(7/3) = 1.527525, half width 4.302653 x 1.527525 / 1.732051 = 3.794583.
    assert rows["grammar (`qwen-judge`)"] == ["7.3333 +- 1.5275", "[3.5388, 11.1279] |"]
    assert "distinct-2" not in rows  # missing for a seed: left out
    # Another judge for one seed: its grades are not averaged with the others'.
    runs = load_runs([queue])
    runs[2].quality["judge"]["model"] = "other-judge"
    rows = table("\n".join(quality_seeds_section(runs)))
    assert "rep-2" in rows and not any("judge" in k for k in rows)
    # Other beginnings for one seed: nothing averaged, and why.
    runs[2].quality["beginnings_version"] = 2
    rows = table("\n".join(quality_seeds_section(runs)))
    assert list(rows) == ["beginnings versions differ (v1, v2): rerun `make quality`"]
    assert quality_seeds_section(runs[:1]) == []  # one seed: nothing across seeds
    # `make quality` without a judge (as after the demo): the measures per run and across seeds, no grades.
    for folder in tmp_path.glob("gpt_demo*"):
        quality = json.loads((folder / "quality.json").read_text())
        (folder / "quality.json").write_text(json.dumps({**quality, "judge": None}))
    text = report(queues=[queue], out_dir=tmp_path / "report", reference_dir=tmp_path / "none").read_text()
    rows = table(text)
    assert rows["rep-2"] == ["2.0000 +- 1.0000", "[-0.4841, 4.4841] |"] and "grammar" not in str(rows)
    assert text.count("| - | - | - | - | - | - |") == 3  # each run's row: no judge, no grades
