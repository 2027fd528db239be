"""`interpret-timeline`: the instruments over every checkpoint of a run, and the dense early checkpoints."""

import json

import pytest
import torch
from conftest import entry, runner, write_queue

from tinystories_lab.evaluate.report import report
from tinystories_lab.interpret.timeline import icl_positions, in_context_score
from tinystories_lab.pretrain import EarlySaves


def test_in_context_score_on_hand_built_losses():
    assert icl_positions(512) == (50, 500)  # Olsson et al.'s tokens
    assert icl_positions(128) == (12, 125)  # the demos' context, scaled
    assert in_context_score([float(t) for t in range(1, 513)]) == 450.0  # loss = how many tokens were read
    losses = torch.full((128,), 4.0)
    losses[12 - 1], losses[125 - 1] = 5.0, 3.5  # only the two scored tokens count
    assert in_context_score(losses) == -1.5


def test_early_saves_add_powers_of_two_below_the_interval():
    # LitGPT saves when `step_count % save_interval == 0`
    assert [s for s in range(1, 260) if s % EarlySaves(50) == 0] == [
        1,
        2,
        4,
        8,
        16,
        32,
        50,
        100,
        150,
        200,
        250,
    ]
    assert [s for s in range(1, 20) if s % EarlySaves(4) == 0] == [1, 2, 4, 8, 12, 16]


def test_early_checkpoints_is_a_queue_flag(tmp_path):
    from tinystories_lab.errors import UserError
    from tinystories_lab.experiments.launch import launch_command
    from tinystories_lab.experiments.queue import validate

    e = {"name": "a", "config": "c.yaml", "status": "todo", "early_checkpoints": True}
    assert "--early_checkpoints=true" in launch_command(e, None, [])
    assert not any("early" in a for a in launch_command({**e, "early_checkpoints": False}, None, []))
    with pytest.raises(UserError, match="early_checkpoints must be true or false, not 'yes'"):
        validate([{**e, "early_checkpoints": "yes"}], tmp_path / "q.yaml", check_configs=False)


@pytest.mark.slow
def test_timeline_over_early_checkpoints_skips_a_damaged_one_and_matches_interpret(
    sample_data, tmp_path, capsys
):
    from tinystories_lab.cli import main

    e = entry("early", tmp_path, sample_data, steps=12, save_interval=8)
    e["early_checkpoints"] = True
    queue = write_queue(tmp_path / "queue.yaml", [e])
    result = runner("run-all", queue)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "early"
    assert sorted(p.name for p in run.glob("step-*")) == [f"step-{s:08d}" for s in (1, 2, 4, 8)]

    damaged = run / "step-00000002" / "lit_model.pth"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # a process killed while saving
    small = ["--stories", "2", "--repeats", "3", "--period", "8", "--windows", "3", "--queues", f"[{queue}]"]
    main(["interpret-timeline", "--model", "early", *small])
    out = capsys.readouterr()
    assert f"Skipping {damaged}: it does not load (truncated or corrupt)." in out.out + out.err
    assert "early: 4 checkpoints in" in out.out and "(4 computed, 0 kept, 1 skipped)" in out.out
    doc = json.loads((run / "interp" / "timeline.json").read_text())
    points = doc["checkpoints"]
    assert [c["checkpoint"] for c in points] == ["step-00000001", "step-00000004", "step-00000008", "final"]
    assert [c["step"] for c in points] == [1, 4, 8, 12]
    assert [c["tokens"] for c in points] == [s * 32 * 128 for s in (1, 4, 8, 12)]
    assert all(len(c["loss_by_position"]) == 128 for c in points)
    assert points[-1]["loss"] < points[0]["loss"]  # it learned something in 12 steps
    for name in ("timeline.png", "timeline_heads.png", "timeline_loss_by_position.png"):
        assert (run / "interp" / name).stat().st_size > 0

    # the final checkpoint's scores are `interpret`'s, on the same inputs
    main(["interpret", "early", *small, "--ablation_windows", "1", "--neurons", "2", "--top_k", "1"])
    interpreted = json.loads((run / "interp" / "head_scores.json").read_text())
    assert points[-1]["head_scores"] == interpreted
    lens = json.loads((run / "interp" / "logit_lens.json").read_text())
    assert points[-1]["loss"] == pytest.approx(lens["loss"][-1], abs=1e-5)  # the model's loss, same windows

    # a rerun computes only what is new: here nothing, the damaged checkpoint is tried again
    capsys.readouterr()
    main(["interpret-timeline", "--model", "early", *small])
    out = capsys.readouterr().out
    assert "(0 computed, 4 kept, 1 skipped)" in out

    text = report(queues=[queue], out_dir=tmp_path / "report").read_text()
    assert "## Induction heads across training" in text and (tmp_path / "report" / "timelines.png").is_file()
    assert "| 4L_4H_128D | [`early`](../runs/early/interp/timeline.png) | 4 | none by 49,152 tokens" in text
