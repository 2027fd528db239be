"""`eval-hf` and `eval-reference`: transformers models scored on the same stories as `make eval`, the
report's measured reference rows, and the validation/training overlap count of `tinystories-lab data`."""

import json
import math
import shutil
import time

import pytest
import torch
import yaml
from huggingface_hub import constants

from tinystories_lab.cli import main
from tinystories_lab.data.prepare import prepare
from tinystories_lab.data.sources import EOT, load_split
from tinystories_lab.data.tokens import open_split, read_meta, stories_fingerprint
from tinystories_lab.errors import UserError
from tinystories_lab.evaluate.reference import eval_hf, select_references

DEMOS = ("gpt_demo", "llama_demo")


@pytest.fixture(scope="module")
def gpt_neo_style(tmp_path_factory):
    """A tiny random GPT-Neo with its own byte-level BPE tokenizer (trained on the sample) whose BOS and
    EOS are both <|endoftext|>, saved as a transformers folder: (folder, `tokenizers` tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-neo")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[EOT], initial_alphabet=alphabet)
    tk.train_from_iterator(load_split("sample", "train"), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=EOT, eos_token=EOT).save_pretrained(folder)
    eot = tk.token_to_id(EOT)
    config = GPTNeoConfig(
        vocab_size=tk.get_vocab_size(), max_position_embeddings=512, hidden_size=32, num_layers=2,
        num_heads=2, attention_types=[[["global", "local"], 1]], window_size=16, intermediate_size=64,
        bos_token_id=eot, eos_token_id=eot,
    )  # fmt: skip
    torch.manual_seed(0)
    GPTNeoForCausalLM(config).save_pretrained(folder)
    return folder, tk


def test_a_gpt_neo_style_model_is_scored_with_its_own_tokenizer_and_boundary(gpt_neo_style, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, tk = gpt_neo_style
    stories = load_split("sample", "validation")[:20]
    text = tmp_path / "stories.txt"
    text.write_text("".join(f"{s}\n{EOT}\n" for s in stories))
    result = eval_hf(
        str(folder), text=text, context=64, out_dir=tmp_path / "ref", device="auto", batch_size=4
    )

    # Direct computation: <|endoftext|> first, then every story followed by <|endoftext|>.
    eot = tk.token_to_id(EOT)
    stream = [eot] + [t for s in stories for t in [*tk.encode(s).ids, eot]]
    assert result["boundary"] == "eos" and result["context"] == 64
    assert result["bytes_evaluated"] == sum(len(s.encode("utf-8")) for s in stories)
    assert result["tokens_evaluated"] == len(stream) - 1 == sum(len(tk.encode(s).ids) + 1 for s in stories)
    assert result["windows"] == math.ceil((len(stream) - 1) / 64)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    full = (len(stream) - 1) // 64  # windows of 65 tokens, stride 64, then the shorter rest
    windows = [torch.tensor(stream[i * 64 : i * 64 + 65])[None] for i in range(full)]
    windows = [torch.cat(windows)] + (
        [torch.tensor(stream[full * 64 :])[None]] if len(stream) > full * 64 + 1 else []
    )
    with torch.no_grad():
        total = sum(
            torch.nn.functional.cross_entropy(
                model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"
            )
            for x in windows
        )
    assert result["loss"] == pytest.approx(total.item() / result["tokens_evaluated"], rel=1e-5)
    bpb = result["loss"] / math.log(2) * result["tokens_evaluated"] / result["bytes_evaluated"]
    assert result["bits_per_byte"] == pytest.approx(bpb)
    assert result["tokens_per_byte"] == pytest.approx(result["tokens_evaluated"] / result["bytes_evaluated"])
    assert result["parameters"] == sum(p.numel() for p in model.parameters())  # tied wte/lm_head once
    assert result["stories"] == 20 and result["stories_sha256"] == stories_fingerprint(stories)
    written = json.loads((tmp_path / "ref" / f"{folder.name}-stories.json").read_text())
    assert written == result


def test_eval_hf_refusals_are_one_line(gpt_neo_style, tmp_path, capsys):
    folder, _ = gpt_neo_style
    text = tmp_path / "three.txt"
    text.write_text("\n\n".join(load_split("sample", "validation")[:3]))
    cases = [
        (["eval-hf", ""], "Name a model"),
        (["eval-hf", str(tmp_path / "missing" / "model")], "No folder"),
        (["eval-hf", str(folder), "--revision", "main"], "local folder"),
        (["eval-hf", str(folder), "--context", "513"], "exceeds"),
        (["eval-hf", str(folder), "--boundary", "bos_eos", "--text", str(text)], None),  # works: BOS = EOS
    ]
    for argv, message in cases:
        argv += ["--out_dir", str(tmp_path / "ref")] + ([] if "--text" in argv else ["--text", str(text)])
        if message is None:
            main([*argv, "--device", "cpu"])
            continue
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars
        assert exit_info.value.code == 1 and err.startswith("error: ") and message in err, err
    assert json.loads((tmp_path / "ref" / f"{folder.name}-three.json").read_text())["boundary"] == "bos_eos"


def test_eval_reference_refuses_at_once_without_a_network(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ref"
    argv = ["eval-reference", "--cache_dir", str(tmp_path / "hf-cache"), "--out_dir", str(out)]
    start = time.monotonic()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "\n" not in err
    assert "must download 8 model(s)" in err and "HF_HUB_OFFLINE is set" in err and "make eval-hf" in err
    # Not in offline mode, but no Hub answers (a closed local port stands in for a missing network).
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(SystemExit):
        main([*argv, "--model", "roneneldan/TinyStories-1M"])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "must download 1 model(s)" in err
    assert "http://127.0.0.1:9 cannot be reached" in err or constants.HF_HUB_OFFLINE
    assert time.monotonic() - start < 20 and not out.exists()
    with pytest.raises(UserError, match="Not a reference model: gpt2"):
        select_references("gpt2")


def test_eval_reference_runs_offline_from_the_hugging_face_cache(
    gpt_neo_style, tmp_path, monkeypatch, capsys
):
    """The tiny GPT-Neo filed in a Hugging Face cache as roneneldan/TinyStories-1M (weights) and
    EleutherAI/gpt-neo-125M (tokenizer) at their pinned revisions: a real `eval-reference` run, offline."""
    from tinystories_lab.evaluate.reference import REFERENCES

    folder, _ = gpt_neo_style
    ref = next(r for r in REFERENCES if r.repo == "roneneldan/TinyStories-1M")
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    filed = [
        (ref.repo, ref.revision, ["config.json", "model.safetensors"]),
        (ref.tokenizer, ref.tokenizer_revision, ["config.json", "tokenizer.json", "tokenizer_config.json"]),
    ]
    for repo, revision, files in filed:
        base = cache / f"models--{repo.replace('/', '--')}"
        snapshot = base / "snapshots" / (revision if len(revision) == 40 else commit)
        snapshot.mkdir(parents=True)
        for name in files:
            shutil.copy(folder / name, snapshot / name)
        (base / "refs").mkdir()
        (base / "refs" / revision).write_text(snapshot.name)
    text = tmp_path / "five.txt"
    text.write_text("\n\n".join(load_split("sample", "validation")[:5]))
    out = tmp_path / "ref"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # so nothing is fetched, even where there is a network
    argv = ["eval-reference", "--model", ref.repo, "--text", str(text), "--cache_dir", str(cache),
            "--out_dir", str(out), "--device", "cpu"]  # fmt: skip
    main(argv)
    result = json.loads((out / "roneneldan--TinyStories-1M-five.json").read_text())
    assert (result["model"], result["tokenizer"], result["context"]) == (ref.repo, ref.tokenizer, 512)
    assert result["boundary"] == "eos" and result["commit"] == (
        ref.revision if len(ref.revision) == 40 else commit
    )
    assert result["stories"] == 5 and "roneneldan/TinyStories-1M" in capsys.readouterr().out


def test_data_counts_validation_stories_found_in_training(sample_data, tmp_path, capsys):
    train = load_split("sample", "train")[:30]
    validation = load_split("sample", "validation")[:10]
    validation[3] = "  " + train[5].replace(" ", "\n ", 2) + "\n"  # the same story, other whitespace
    validation[7] = train[0]
    folder = tmp_path / "stories"
    folder.mkdir()
    for split, stories in (("train", train), ("validation", validation)):
        (folder / f"{split}.txt").write_text("".join(f"{s}\n{EOT}\n" for s in stories))
    tokenizer = sample_data / "tokenizers" / "sample"
    tokens_dir = prepare(source=str(folder), data_dir=tmp_path / "data", tokenizer_dir=tokenizer)
    assert "validation: 2 of 10 stories (20.0%) also occur in the training split" in capsys.readouterr().out
    meta = read_meta(tokens_dir)
    assert meta["validation_in_train"]["stories"] == 2
    # A meta.json from before the count still loads, and the next run adds the count without re-encoding.
    del meta["validation_in_train"]
    (tokens_dir / "meta.json").write_text(json.dumps(meta))
    bins = {p: p.stat().st_mtime_ns for p in tokens_dir.glob("*.bin")}
    assert (
        open_split(tokens_dir, "validation", meta["tokenizer_sha256"]).size
        == meta["splits"]["validation"]["tokens"]
    )
    prepare(source=str(folder), data_dir=tmp_path / "data", tokenizer_dir=tokenizer)
    assert read_meta(tokens_dir)["validation_in_train"]["stories"] == 2
    assert {p: p.stat().st_mtime_ns for p in tokens_dir.glob("*.bin")} == bins


# The demo models, exported: eval-hf and make eval agree, and the report shows measured references.


@pytest.fixture(scope="module")
def scored(trained_demos, tmp_path_factory) -> dict:
    """Both demo runs evaluated by `make eval` (eval.json) and exported, their exports scored by eval-hf."""
    from tinystories_lab.cli import evaluate
    from tinystories_lab.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("scored")
    config = "config_hub/pretrain/tiny_stories/demo/{}.yaml"
    entries = [
        {"name": n, "config": config.format(n), "status": "done", "out_dir": str(trained_demos[n].parent)}
        for n in DEMOS
    ]
    queue = out / "q.yaml"
    queue.write_text(yaml.safe_dump({"experiments": entries}, sort_keys=False))
    lit = {r["name"]: r for r in evaluate(queues=[queue])}
    hf = {}
    for name in DEMOS:
        export_checkpoint(trained_demos[name], out / name / "hf")
        hf[name] = eval_hf(str(out / name / "hf"), source="sample", out_dir=out / "reference", device="cpu")
    return {"queue": queue, "lit": lit, "hf": hf, "reference_dir": out / "reference"}


@pytest.mark.slow
@pytest.mark.parametrize("name", DEMOS)
def test_eval_hf_on_an_export_gives_make_evals_bits_per_byte(scored, name):
    lit, hf = scored["lit"][name], scored["hf"][name]
    assert hf["boundary"] == "bos_eos" and hf["context"] == lit["context"] == 128
    for key in ("tokens_evaluated", "bytes_evaluated", "windows", "stories", "stories_sha256", "eval_text"):
        assert hf[key] == lit[key], key
    assert abs(hf["bits_per_byte"] / lit["bits_per_byte"] - 1) < 1e-4
    if name == "llama_demo":  # no zero biases added: the same true parameter count
        assert hf["parameters"] == lit["parameters"]
    assert json.loads((scored["reference_dir"] / f"{name}-sample.json").read_text()) == hf


@pytest.mark.slow
def test_report_shows_measured_references_beside_the_runs(scored, tmp_path):
    from tinystories_lab.evaluate.report import report

    refs = shutil.copytree(scored["reference_dir"], tmp_path / "reference")
    measured = scored["hf"]["llama_demo"]
    # The same numbers filed as llama2.c's stories15M, and one on other stories, which must stay out.
    stand_in = measured | {"model": "Xenova/llama2.c-stories15M", "parameters": 15_191_712}
    (refs / "stand-in.json").write_text(json.dumps(stand_in))
    other = measured | {"model": "other/model", "stories_sha256": "0" * 64, "eval_text": "other.txt"}
    (refs / "other.json").write_text(json.dumps(other))
    out = tmp_path / "report"
    text = report(queues=[scored["queue"]], out_dir=out, reference_dir=refs).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `") and "*reference*" in line]
    assert len(rows) == 3 and "other/model" not in text  # sorted by parameters
    assert rows[1].startswith(f"| `{scored['queue'].parent / 'llama_demo' / 'hf'}` *reference* | llama |")
    assert f"| {measured['bits_per_byte']:.3f} |" in rows[1]
    assert rows[2].startswith("| `Xenova/llama2.c-stories15M` *reference* | llama | 4L_4H_128D | 15.19M |")
    assert "Published reference results (quoted)" in text and "| llama2.c stories42M |" in text
    assert "| llama2.c stories15M |" not in text and "so not quoted: llama2.c stories15M." in text
    assert "validation split of sample: 0 of 250 stories also occur in the training split" in text
    assert (out / "scaling.png").stat().st_size > 10_000
