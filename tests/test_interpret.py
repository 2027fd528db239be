"""The interpretability instruments, proven on real (briefly) trained demo models in fp32."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
import yaml

from tinystories_lab.interpret import (
    ablate,
    ablation_effects,
    attention_patterns,
    bos_score,
    duplicate_token_score,
    head_components,
    hooks,
    induction_score,
    logit_lens,
    loss,
    neuron_stats,
    pattern_from_qk,
    previous_token_score,
    record,
    recording_qkv,
    repeated_tokens,
    validation_tokens,
    validation_windows,
)
from tinystories_lab.models import load_trained

DEMOS = ("gpt_demo", "llama_demo")


@pytest.fixture(scope="module", params=DEMOS)
def demo(request, trained_demos):
    """A trained demo model (fp32, eval mode) and 4 validation windows of its context length."""
    trained = load_trained(trained_demos[request.param])
    return trained, validation_windows(validation_tokens(trained), trained.max_seq_length, 4)


def forward_recording_attention(gpt, x):
    """Every attention module's output, and the q, k, v that entered its fused attention."""
    outputs = {}
    handles = [
        block.attn.register_forward_hook(lambda m, args, out, layer=layer: outputs.__setitem__(layer, out))
        for layer, block in enumerate(gpt.transformer.h)
    ]
    try:
        with torch.no_grad(), recording_qkv(gpt) as qkv:
            gpt(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, qkv


@pytest.mark.slow
def test_recomputed_attention_pattern_times_v_reproduces_the_attention_output(demo):
    trained, windows = demo
    gpt, x = trained.model, windows[:2, :-1]
    outputs, qkv = forward_recording_attention(gpt, x)
    patterns = attention_patterns(trained, x)
    assert patterns.shape == (gpt.config.n_layer, 2, gpt.config.n_head, x.shape[1], x.shape[1])
    for layer, block in enumerate(gpt.transformer.h):
        q, k, v = qkv[layer]
        pattern = pattern_from_qk(q, k, block.attn)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        assert pattern.triu(1).abs().max() == 0  # causal
        heads = (pattern @ v).transpose(1, 2).flatten(2)  # (B, T, n_head * head_size), the input of proj
        torch.testing.assert_close(block.attn.proj(heads), outputs[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(patterns[layer], pattern)
    assert not any("scaled_dot_product_attention" in vars(b.attn) for b in gpt.transformer.h)  # unpatched


@pytest.mark.slow
def test_hook_ablation_of_a_head_equals_zeroing_its_slice_of_the_output_projection_input(demo):
    trained, windows = demo
    gpt, config = trained.model, trained.config
    layer, head = 1, 2
    head_2 = head_components(config)[layer * config.n_head + head]
    assert head_2.index == slice(head * config.head_size, (head + 1) * config.head_size)
    x = windows[:2, :-1]
    with torch.no_grad():
        clean = gpt(x)
        with hooks(gpt, {(layer, "attn.z"): ablate(head_2)}):
            hooked = gpt(x)
        # By hand: a projection whose weight ignores the head's slice of its input, as if it were zero.
        surgery = copy.deepcopy(gpt)
        surgery.transformer.h[layer].attn.proj.weight[:, head_2.index] = 0
        expected = surgery(x)
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=0)
    assert (hooked - clean).abs().max() > 1e-3  # the head mattered
    hooked_loss = loss(gpt, windows[:2], fns={(layer, "attn.z"): ablate(head_2)})
    assert hooked_loss == pytest.approx(loss(surgery, windows[:2]), abs=1e-5)
    assert torch.equal(gpt(x), clean)  # hooks removed


@pytest.mark.slow
def test_mean_ablation_leaves_the_loss_unchanged_when_the_head_output_is_constant(demo):
    trained, windows = demo
    config, batch = trained.config, windows[:2]
    layer, head = 1, 2
    head_2 = head_components(config)[layer * config.n_head + head]
    assert abs(ablation_effects(trained, batch, [head_2]).rows[0]["mean"]) > 1e-5  # a normal head: it matters

    # Give the head constant values v = 0 x + b: its output, a weighted mean of v, is then b everywhere.
    gpt = copy.deepcopy(trained.model)
    attn = gpt.transformer.h[layer].attn
    hs, group = config.head_size, head // (config.n_head // config.n_query_groups)
    v_rows = slice(
        (config.n_head + config.n_query_groups + group) * hs,
        (config.n_head + config.n_query_groups + group + 1) * hs,
    )
    qkv = torch.nn.Linear(attn.qkv.in_features, attn.qkv.out_features, bias=True)
    with torch.no_grad():
        qkv.weight.copy_(attn.qkv.weight)
        qkv.bias.zero_()
        qkv.weight[v_rows] = 0
        qkv.bias[v_rows] = torch.randn(hs, generator=torch.Generator().manual_seed(0))
    attn.qkv = qkv
    with torch.no_grad(), record(gpt, [(layer, "attn.z")]) as acts:
        gpt(batch[:, :-1])
    z = acts[(layer, "attn.z")][..., head_2.index]
    torch.testing.assert_close(z, qkv.bias[v_rows].detach().expand_as(z))  # constant indeed
    (row,) = ablation_effects(gpt, batch, [head_2], batch_size=1).rows  # mean over both windows
    assert abs(row["mean"]) < 1e-5
    assert abs(row["zero"]) > 1e-3  # the constant is not nothing: removing it changes the loss


def test_head_scores_are_one_on_hand_built_patterns():
    T, period = 9, 4  # [BOS] r r with r of 4 tokens
    rows = torch.arange(T)

    def attending(cols: torch.Tensor) -> torch.Tensor:
        pattern = torch.zeros(T, T)
        pattern[rows, cols] = 1.0
        return pattern

    previous = attending((rows - 1).clamp_min(0))
    assert previous_token_score(previous).item() == 1.0
    assert bos_score(previous).item() == pytest.approx(1 / (T - 1))  # only position 1 looks at position 0
    uniform = torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]
    assert previous_token_score(uniform).item() == pytest.approx(
        sum(1 / (t + 1) for t in range(1, T)) / (T - 1)
    )
    assert bos_score(attending(torch.zeros(T, dtype=torch.long))).item() == 1.0

    second = rows > period  # the repeat: positions period + 1 .. 2 * period
    induction = attending(torch.where(second, rows - period + 1, 0))
    duplicate = attending(torch.where(second, rows - period, 0))
    assert induction_score(induction, period).item() == 1.0
    assert duplicate_token_score(induction, period).item() == 0.0
    assert duplicate_token_score(duplicate, period).item() == 1.0
    assert induction_score(duplicate, period).item() == 0.0
    batched = torch.stack([previous, uniform])[:, None].expand(2, 3, T, T)  # (batch, head, T, T)
    assert previous_token_score(batched).shape == (2, 3)


def test_repeated_tokens_repeat_distinct_random_tokens_after_bos():
    seqs = repeated_tokens(5, period=7, vocab_size=50, bos_id=1, avoid=(0, 2), seed=3)
    assert seqs.shape == (5, 15)
    assert (seqs[:, 0] == 1).all()
    assert torch.equal(seqs[:, 1:8], seqs[:, 8:])
    assert all(len(set(s[1:8].tolist())) == 7 for s in seqs)
    assert not torch.isin(seqs[:, 1:], torch.tensor([0, 1, 2])).any()
    assert torch.equal(seqs, repeated_tokens(5, period=7, vocab_size=50, bos_id=1, avoid=(0, 2), seed=3))


@pytest.mark.slow
def test_logit_lens_at_the_last_layer_equals_the_models_own_loss(demo):
    trained, windows = demo
    lens = logit_lens(trained, windows, batch_size=3)  # batches of 3 and 1
    with torch.no_grad():
        logits = trained.model(windows[:, :-1])
    targets = windows[:, 1:]
    own = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    assert len(lens["loss"]) == len(lens["accuracy"]) == trained.config.n_layer + 1
    assert lens["loss"][-1] == pytest.approx(own, abs=1e-5)
    assert lens["accuracy"][-1] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    assert loss(trained, windows) == pytest.approx(own, abs=1e-5)
    assert lens["loss"][0] > lens["loss"][-1]


@pytest.mark.slow
def test_neuron_stats_match_the_mlp_computed_by_hand(demo):
    trained, windows = demo
    gpt, layer, threshold = trained.model, 1, 0.05
    stats = neuron_stats(
        trained, windows, k=3, threshold=threshold, batch_size=1
    )  # top-k merged over batches
    mlp = gpt.transformer.h[layer].mlp
    inputs = []
    handle = mlp.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with torch.no_grad():
        gpt(windows[:, :-1])
    handle.remove()
    (h,) = inputs
    with torch.no_grad():
        if trained.config.mlp_class_name == "LLaMAMLP":
            act = F.silu(mlp.fc_1(h)) * mlp.fc_2(h)
            strength = act.abs()
        else:
            act = F.gelu(mlp.fc(h))
            strength = act
    act, strength = act.flatten(0, 1), strength.flatten(0, 1)  # (tokens, neurons)
    assert stats.tokens == act.shape[0]
    torch.testing.assert_close(stats.mean[layer], strength.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.std[layer], strength.std(0, correction=0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.max[layer], strength.amax(0))
    torch.testing.assert_close(stats.fire_rate[layer], (strength > threshold).float().mean(0))
    at_top = stats.top_tokens[layer].T  # (k, neurons); compared by value, as equal activations may tie
    torch.testing.assert_close(strength.gather(0, at_top), strength.topk(3, dim=0).values)
    torch.testing.assert_close(stats.top_values[layer], act.gather(0, at_top).T)
    assert torch.equal(stats.dead, stats.max <= threshold)
    selectivity = stats.selectivity
    assert torch.isnan(selectivity[stats.dead]).all() and not torch.isnan(selectivity[~stats.dead]).any()


@pytest.mark.slow
def test_interpret_and_compare_write_every_file_and_link_them(trained_demos, tmp_path, capsys):
    from conftest import DEMO_CONFIGS

    from tinystories_lab.cli import main

    queue = tmp_path / "queue.yaml"
    entries = [
        dict(name=n, config=str(DEMO_CONFIGS[n]), status="done", out_dir=str(trained_demos[n].parent))
        for n in DEMOS
    ]
    queue.write_text(yaml.safe_dump({"experiments": entries}))
    small = "--windows 2 --ablation_windows 1 --stories 2 --repeats 2 --period 8 --attention_tokens 12"
    small = [*small.split(), "--neurons", "3", "--top_k", "2", "--queues", f"[{queue}]"]
    with pytest.raises(SystemExit) as refused:
        main(["interpret", "gpt_demo", "--period", "100", "--queues", f"[{queue}]"])
    err = capsys.readouterr().err
    assert refused.value.code == 1, err  # a refusal, not a crash (2 is a usage error, None success)
    assert "error: --period 100 makes sequences of 201 tokens; gpt_demo reads 128." in err
    for name in DEMOS:
        main(["interpret", name, *small])
    report = tmp_path / "report"
    main(["interpret-compare", "gpt_demo", "llama_demo", "--out_dir", str(report), "--queues", f"[{queue}]"])
    assert "gpt_demo: 13 files in" in capsys.readouterr().out  # the summary line

    expected = {
        "index.md", "summary.json", "attention.png", "attention.html", "head_scores.png", "head_scores.json",
        "neurons.md", "neurons.json", "ablation.md", "ablation.json", "ablation.png", "logit_lens.png",
        "logit_lens.json",
    }  # fmt: skip
    for name in DEMOS:
        interp = trained_demos[name].parent / "interp"
        files = {p.name: p for p in interp.iterdir()}
        assert set(files) == expected
        assert all(p.stat().st_size > 0 for p in files.values())
        linked = set(re.findall(r"\]\(([^)#]+)\)", (interp / "index.md").read_text()))
        assert linked == expected - {"index.md"}
        page = (interp / "attention.html").read_text()
        assert "CircuitsVis.render" in page and not re.search(r"<script[^>]*\ssrc=", page)
        assert "unpkg.com" not in page  # circuitsvis's CDN: the view must work offline
        neurons = (interp / "neurons.md").read_text()
        assert "(neurons.json)" in neurons and neurons.count("\n### L") == 3

    page = report / "gpt_demo-vs-llama_demo.md"
    links = re.findall(r"\]\(([^)]+)\)", page.read_text())
    assert {f"gpt_demo-vs-llama_demo-{k}.png" for k in ("head_scores", "ablation", "logit_lens")} <= set(
        links
    )
    assert sum(link.endswith("interp/index.md") for link in links) == 2
    assert all((report / link).is_file() and (report / link).stat().st_size > 0 for link in links)
