"""Loading trained checkpoints for analysis."""

from pathlib import Path

import pytest
import torch

from tinystories_lab.errors import UserError
from tinystories_lab.models import final_checkpoint_dir, load_trained, select_experiments


@pytest.mark.slow
def test_load_trained_ties_embeddings_and_reproduces_the_logged_validation_loss(trained_demos, sample_data):
    from tinystories_lab.data import TinyStories
    from tinystories_lab.experiments.runs import read_curves

    trained = load_trained(trained_demos["gpt_demo"])
    assert trained.tie_embeddings and trained.model.lm_head.weight is trained.model.transformer.wte.weight
    assert trained.max_seq_length == 128 and not trained.model.training
    data = TinyStories(source="sample", data_dir=sample_data, val_windows=64)
    data.connect(trained.tokenizer, batch_size=32, max_seq_length=128)
    data.setup()
    with torch.no_grad():
        losses = [
            torch.nn.functional.cross_entropy(trained.model(b[:, :128]).flatten(0, 1), b[:, 1:129].flatten())
            for b in data.val_dataloader()
        ]
    _, val = read_curves(trained_demos["gpt_demo"].parent)
    assert torch.stack(losses).mean().item() == pytest.approx(val[-1].value, abs=1e-4)


@pytest.mark.slow
def test_a_checkpoint_whose_tied_embeddings_differ_is_refused_with_numbers(trained_demos, tmp_path):
    import shutil

    folder = tmp_path / "final"
    shutil.copytree(trained_demos["gpt_demo"], folder)
    state = torch.load(folder / "lit_model.pth", weights_only=True)
    state["model"]["lm_head.weight"] = state["model"]["lm_head.weight"].clone() + 0.5  # untied, as FSDP can
    torch.save(state, folder / "lit_model.pth")
    with pytest.raises(UserError, match=r"wte and lm_head differ \(max \|diff\| 0.5"):
        load_trained(folder)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="No checkpoint in"):
        load_trained(tmp_path)


def test_no_finished_experiment_is_a_clear_error(tmp_path):
    from tinystories_lab.cli import main

    queue = tmp_path / "q.yaml"
    config = "config_hub/pretrain/tiny_stories/demo/gpt_demo.yaml"
    queue.write_text(f"experiments:\n  - {{name: a, config: {config}, status: todo}}\n")
    for verb in ("eval", "sample"):
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--queues", f"[{queue}]"])
        assert exit_info.value.code == 1
    with pytest.raises(UserError, match=f"No finished experiment in {queue}: train one first"):
        select_experiments(queues=[queue])


def test_an_unfinished_run_names_the_command_with_its_queue(tmp_path, monkeypatch, capsys):
    from tinystories_lab.cli import main

    config = Path("config_hub/pretrain/tiny_stories/demo/gpt_demo.yaml").resolve()
    entry = f"experiments:\n  - {{name: a, config: {config}, status: todo, out_dir: {tmp_path / 'a'}}}\n"
    queue = tmp_path / "q.yaml"
    queue.write_text(entry)
    with pytest.raises(UserError, match=f"train it first: `make run-specific MODEL=a QUEUE={queue}`"):
        final_checkpoint_dir(select_experiments("a", [queue])[0])
    with pytest.raises(SystemExit):
        main(["sample", "--model", "a", "--queues", f"[{queue}]"])
    assert f"`make run-specific MODEL=a QUEUE={queue}`" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # the Makefile's default queue needs no QUEUE=
    Path("experiments.yaml").write_text(entry)
    with pytest.raises(UserError, match="train it first: `make run-specific MODEL=a`."):
        final_checkpoint_dir(select_experiments("a", [Path("experiments.yaml")])[0])
