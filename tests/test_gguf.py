"""GGUF export for llama.cpp: weights and tokenizer, parity through llama-cpp-python, the server, the speed
benchmark. Needs the gguf extra (`make install-gguf`), which CI installs."""

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from litgpt import GPT, Config

from tinystories_lab.errors import UserError

llama_cpp = pytest.importorskip("llama_cpp", reason="the gguf extra is not installed: make install-gguf")

from tinystories_lab.export.gguf import permute_rope, write_gguf  # noqa: E402
from tinystories_lab.export.gguf_exporter import export_gguf  # noqa: E402
from tinystories_lab.export.gguf_parity import (  # noqa: E402
    TOLERANCE,
    llama_cpp_gelu,
    llama_logits,
    load_llama,
)
from tinystories_lab.export.parity import EDGE_CASES  # noqa: E402


def tiny(**changes) -> Config:
    """A tiny GPT-style config over the sample's 8,192-token vocabulary; `changes` make the variant."""
    base = dict(
        name="tiny", block_size=32, vocab_size=8192, padded_vocab_size=8192, n_layer=2, n_head=4, n_embd=64,
        rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP", intermediate_size=128,
    )  # fmt: skip
    return Config(**{**base, **changes})


def test_rope_permutation_puts_each_rotated_pair_side_by_side():
    # LitGPT rotates element i with i + d/2 of each head; llama.cpp's llama RoPE rotates 2i with 2i + 1.
    rows = torch.arange(2 * 8).float()[:, None]  # two heads of eight rows
    assert permute_rope(rows, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_llama_cpp_gelu_is_the_tanh_approximation_through_an_f16_table():
    x = torch.tensor([-11.0, -1.0, 0.5, 1.0, 3.0, 11.0])
    y = llama_cpp_gelu(x)
    assert y[0] == 0 and y[-1] == 11  # outside the table: 0 and the identity
    assert torch.equal(y, y.half().float())  # every value an f16
    assert y[3].item() == 0.84130859375  # tanh GELU(1) = 0.841192, the nearest f16; exact GELU(1) = 0.841345
    assert 0 < (y - torch.nn.functional.gelu(x)).abs().max() < 2e-3


@pytest.mark.parametrize(
    "changes",
    [
        {},
        dict(mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm"),
        dict(parallel_residual=True, rotary_percentage=0.25, bias=True),  # pythia-70m's features
        dict(mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm", n_head=8, n_query_groups=2, head_size=8),
    ],
    ids=["gpt", "llama", "parallel-rotary-bias", "llama-gqa"],
)
def test_random_tiny_models_give_litgpt_logits_in_llama_cpp(changes, sample_data, tmp_path):
    config = tiny(**changes)
    torch.manual_seed(0)
    model = GPT(config).eval()
    model.transformer.wte.weight = model.lm_head.weight
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms and biases away from 1 and 0, so a dropped one shows
            if p.ndim == 1:
                p.copy_(1 + torch.randn_like(p) * 0.3 if "norm" in name else torch.randn_like(p) * 0.1)
    path = tmp_path / "tiny.gguf"
    write_gguf(
        path, config, model.state_dict(), True, sample_data / "tokenizers/sample/tokenizer.model", 1, 2
    )
    ids = torch.randint(0, 8192, (32,))
    with torch.no_grad():
        lit = model(ids[None])[0].numpy()
    llm = load_llama(path, 32)
    assert np.abs(llama_logits(llm, ids.tolist()) - lit).max() <= TOLERANCE
    llm.close()


def test_an_unknown_quant_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="QUANT 'q4'"):
        export_gguf(tmp_path / "none", tmp_path / "gguf", "x", quant="q4")
    assert not (tmp_path / "gguf").exists()


@pytest.fixture(scope="module")
def ggufs(trained_demos, tmp_path_factory) -> dict:
    """Both demos exported in f32, and llama_demo in q8_0 (scored on the first 2,048 validation tokens)."""
    out = tmp_path_factory.mktemp("gguf")
    records = {}
    for name in ("gpt_demo", "llama_demo"):
        records[name] = export_gguf(trained_demos[name], out / name, name, "f32")
    records["q8_0"] = export_gguf(trained_demos["llama_demo"], out / "llama_demo", "llama_demo", "q8_0", 2048)
    return {"dir": out, **records}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_demo", "llama_demo"])
def test_demo_models_export_to_gguf_and_pass_parity(ggufs, name):
    record = ggufs[name]
    folder = ggufs["dir"] / name
    assert record["max_abs_logit_diff_f32"] <= TOLERANCE and record["logit_tokens"] == 4 * 128
    exact_gelu = record["max_abs_logit_diff_f32_exact_gelu"]
    if name == "llama_demo":  # no GELU: both comparisons are the same
        assert exact_gelu == record["max_abs_logit_diff_f32"]
    else:  # llama.cpp's GELU is most of the difference to the model as trained
        assert exact_gelu > 2 * record["max_abs_logit_diff_f32"]
    assert record["greedy_tokens_identical"] == 64 and record["tokenizer_texts_identical"] == 8 + len(
        EDGE_CASES
    )
    assert record["architecture"] == {"gpt_demo": "gptneox", "llama_demo": "llama"}[name]
    assert json.loads((folder / f"{name}-f32.json").read_text()) == record
    files = {p.name for p in folder.iterdir()}  # no staging folder left behind
    expected = {f"{name}-f32.gguf", f"{name}-f32.json"} | (
        {"llama_demo-q8_0.gguf", "llama_demo-q8_0.json"} if name == "llama_demo" else set()
    )
    assert files == expected


@pytest.mark.slow
def test_q8_0_records_its_validation_loss_change_and_is_smaller(ggufs):
    q8, f32 = ggufs["q8_0"], ggufs["llama_demo"]
    assert q8["eval_tokens"] == 2047 and abs(q8["loss_change"]) < 0.05
    assert q8["loss_change"] == pytest.approx(q8["loss_q8_0"] - q8["loss_f32"])
    assert q8["bytes"] < 0.45 * f32["bytes"]


@pytest.mark.slow
def test_a_file_that_fails_its_check_is_not_left_behind(trained_demos, tmp_path, monkeypatch):
    import tinystories_lab.export.gguf_exporter as exporter

    monkeypatch.setattr(exporter, "TOLERANCE", -1.0)  # no file can pass
    with pytest.raises(UserError, match="logits differ"):
        export_gguf(trained_demos["llama_demo"], tmp_path / "gguf", "llama_demo", "f32")
    assert list((tmp_path / "gguf").iterdir()) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_answers_openai_requests_and_streams(ggufs, tmp_path):
    import httpx

    run = tmp_path / "llama_demo"
    shutil.copytree(Path(ggufs["q8_0"]["checkpoint"]), run / "final")
    shutil.copytree(ggufs["dir"] / "llama_demo", run / "gguf")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "tinystories-lab"), "serve", str(run), "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(120):
            try:
                models = httpx.get(f"{url}/models").json()
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        assert [m["id"] for m in models["data"]] == ["llama_demo"]
        request = {"model": "llama_demo", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
        whole = httpx.post(f"{url}/completions", json=request, timeout=60).json()["choices"][0]["text"]
        chunks = []
        with httpx.stream("POST", f"{url}/completions", json={**request, "stream": True}, timeout=60) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:])["choices"][0]["text"])
        assert len(chunks) > 5 and "".join(chunks) == whole and whole.strip()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_without_a_gguf_file_names_the_command_that_makes_it(trained_demos, tmp_path):
    run = tmp_path / "gpt_demo"
    shutil.copytree(trained_demos["gpt_demo"], run / "final")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "tinystories-lab"), "serve", str(run), "--quant", "q8_0"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and f"make gguf MODEL={run} QUANT=q8_0" in out.stderr


@pytest.mark.slow
def test_generation_benchmark_times_every_engine_on_one_config(sample_data, tmp_path):
    from tinystories_lab.bench.generation import ENGINES, bench_generate

    report = bench_generate(
        "config_hub/pretrain/tiny_stories/demo/gpt_demo.yaml", new_tokens=8, repeats=1, data_dir=sample_data,
        out_dir=tmp_path,
    )  # fmt: skip
    speeds = report["results"][0]["engines"]
    assert set(speeds) == set(ENGINES) and all(s["tokens_per_s"] > 0 for s in speeds.values())
    assert len(list(tmp_path.glob("*-generate.md"))) == 1
