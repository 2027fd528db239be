"""Data pipeline: sources, tokenizer, token files and the DataModule, on the bundled sample."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from litgpt import Tokenizer

from tinystories_lab.cli import main
from tinystories_lab.data import TinyStories
from tinystories_lab.data.prepare import prepare
from tinystories_lab.data.sources import load_split, read_text_file, split_stories
from tinystories_lab.data.tokenizer import fingerprint, load_tokenizer, train_tokenizer
from tinystories_lab.data.tokens import read_meta, tokens_dir_for
from tinystories_lab.errors import UserError


def sample_tokenizer(data_dir):
    return Tokenizer(data_dir / "tokenizers" / "sample")


def connected_module(data_dir, batch_size=4, seq_len=64, **kwargs):
    module = TinyStories(source="sample", data_dir=data_dir, **kwargs)
    module.connect(sample_tokenizer(data_dir), batch_size=batch_size, max_seq_length=seq_len)
    module.setup()
    return module


# Sources


def test_split_stories_handles_both_separators():
    eot = "One story.\nSecond line.\n<|endoftext|>\nAnother story.\n<|endoftext|>\n"
    assert split_stories(eot, "eot") == ["One story.\nSecond line.", "Another story."]
    blank = "One story.\nSecond line.\n\n \nAnother story.\r\n\r\nThird.\n"
    assert split_stories(blank, "blank") == ["One story.\nSecond line.", "Another story.", "Third."]


def test_local_text_source_with_either_separator(tmp_path):
    stories = ["Tom saw a dog.\nThe dog ran.", "Sue had a red ball.", "The end came."]
    for separator, joiner in (("eot", "\n<|endoftext|>\n"), ("blank", "\n\n")):
        folder = tmp_path / separator
        folder.mkdir()
        (folder / "train.txt").write_text(joiner.join(stories * 20) + "\n")
        (folder / "validation.txt").write_text(joiner.join(stories) + "\n")
        assert load_split(str(folder), "validation", tmp_path, separator) == stories
        tokens_dir = prepare(
            source=str(folder), data_dir=tmp_path / f"data-{separator}", vocab_size=300, separator=separator
        )
        meta = read_meta(tokens_dir)
        assert meta["splits"]["train"]["stories"] == 60
        assert meta["splits"]["validation"]["stories"] == 3


def test_two_local_folders_of_one_name_never_share_files(tmp_path):
    made = []
    for parent, story in (("a", "Tom saw a dog."), ("b", "Sue had a red ball.")):
        folder = tmp_path / parent / "stories"
        folder.mkdir(parents=True)
        for split in ("train", "validation"):
            (folder / f"{split}.txt").write_text("\n<|endoftext|>\n".join([story] * 30) + "\n")
        made.append(prepare(source=str(folder), data_dir=tmp_path / "data", vocab_size=300))
    assert made[0] != made[1] and len(list((tmp_path / "data" / "tokenizers").iterdir())) == 2
    assert [read_meta(d)["splits"]["train"]["bytes"] for d in made] == [30 * 14, 30 * 19]


def test_missing_or_empty_text_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_text_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n")
    with pytest.raises(UserError, match="no stories"):
        read_text_file(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="Unknown data source"):
        load_split("no/such/folder", "train")


def test_binary_text_is_refused_in_one_line(tmp_path):
    (tmp_path / "image.bin").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "zeros.bin").write_bytes(bytes(1000))  # valid UTF-8, but not text
    for separator in ("eot", "blank", None):
        with pytest.raises(UserError, match=r"image.bin is not UTF-8 text \(invalid start byte: byte 0x80\)"):
            read_text_file(tmp_path / "image.bin", separator)
        with pytest.raises(UserError, match="zeros.bin holds NUL bytes: it is not a text file"):
            read_text_file(tmp_path / "zeros.bin", separator)
    with pytest.raises(UserError, match="is a folder, not a text file"):
        read_text_file(tmp_path)


def test_download_failure_says_so_and_names_offline_choices(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    cmd = [
        sys.executable,
        "-m",
        "tinystories_lab.cli",
        "data",
        "--source",
        "tinystories",
        "--data_dir",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Could not download roneneldan/TinyStories" in result.stderr
    assert "make data-sample" in result.stderr
    assert not (tmp_path / "tokens").exists()  # no silent fallback to other data


# Tokenizer


def test_tokenizer_folder_loads_in_litgpt_with_bos_and_eos(sample_data):
    folder = sample_data / "tokenizers" / "sample"
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).is_file()
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    tokenizer = Tokenizer(folder)
    assert tokenizer.vocab_size == 8192
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.encode("Once upon a time")[0].item() == 1  # LitGPT adds BOS by itself


def test_round_trip_text_ids_text(sample_data):
    tokenizer = sample_tokenizer(sample_data)
    for story in load_split("sample", "validation"):
        assert tokenizer.decode(tokenizer.encode(story, bos=False)) == story
    odd = 'Tom  had 1234 "apples".\n\nSue  said: café, 猫, 🐱!'
    assert tokenizer.decode(tokenizer.encode(odd)) == odd  # byte fallback, kept whitespace
    pieces = [tokenizer.processor.id_to_piece(i) for i in tokenizer.encode("1234", bos=False).tolist()]
    assert [p for p in pieces if p != "▁"] == ["1", "2", "3", "4"]  # digits split


def test_tokenizer_falls_back_to_the_largest_vocabulary_the_text_supports(tmp_path, capsys):
    stories = load_split("sample", "validation")
    vocab = train_tokenizer(stories, tmp_path / "tok", vocab_size=32000)
    assert 259 < vocab < 32000
    assert Tokenizer(tmp_path / "tok").vocab_size == vocab
    assert f"supports at most {vocab:,} tokens" in capsys.readouterr().out
    with pytest.raises(UserError, match="not empty"):
        train_tokenizer(stories, tmp_path / "tok", vocab_size=500)


def test_training_a_tokenizer_is_deterministic(tmp_path):
    stories = load_split("sample", "validation")
    train_tokenizer(stories, tmp_path / "a", vocab_size=1000)
    train_tokenizer(stories, tmp_path / "b", vocab_size=1000)
    assert fingerprint(Tokenizer(tmp_path / "a")) == fingerprint(Tokenizer(tmp_path / "b"))


# Token files


def test_every_story_is_wrapped_in_bos_and_eos_and_counts_match(sample_data):
    tokenizer = sample_tokenizer(sample_data)
    tokens_dir = tokens_dir_for(sample_data, "sample", tokenizer)
    meta = read_meta(tokens_dir)
    assert meta["tokenizer_sha256"] == fingerprint(tokenizer)
    assert meta["vocab_size"] == 8192 and meta["dtype"] == "uint16"
    for split in ("train", "validation"):
        stories = load_split("sample", split)
        tokens = np.fromfile(tokens_dir / f"{split}.bin", dtype=np.uint16)
        counts = meta["splits"][split]
        assert counts["tokens"] == tokens.size
        assert counts["stories"] == len(stories)
        assert counts["bytes"] == sum(len(s.encode()) for s in stories)
        bos = np.flatnonzero(tokens == tokenizer.bos_id)
        eos = np.flatnonzero(tokens == tokenizer.eos_id)
        assert len(bos) == len(eos) == len(stories)
        assert bos[0] == 0 and eos[-1] == tokens.size - 1
        assert np.all(bos[1:] == eos[:-1] + 1)  # each story starts right after the previous one ends
        first = tokens[bos[0] + 1 : eos[0]].astype(np.int64)
        assert tokenizer.decode(torch.from_numpy(first)) == stories[0]


def test_rerunning_is_a_no_op_and_another_tokenizer_gets_its_own_folder(sample_data, tmp_path, capsys):
    tokens_dir = tokens_dir_for(sample_data, "sample", sample_tokenizer(sample_data))
    mtimes = {p.name: p.stat().st_mtime_ns for p in tokens_dir.iterdir()}
    assert prepare(source="sample", data_dir=sample_data) == tokens_dir
    out = capsys.readouterr().out
    assert "up to date" in out
    assert "its vocabulary is 8,192; --vocab_size 32,000 applies only to a new tokenizer" in out
    assert {p.name: p.stat().st_mtime_ns for p in tokens_dir.iterdir()} == mtimes
    other = prepare(source="sample", data_dir=sample_data, tokenizer_dir=tmp_path / "small", vocab_size=1000)
    assert other != tokens_dir and other.parent == tokens_dir.parent
    assert {p.name: p.stat().st_mtime_ns for p in tokens_dir.iterdir()} == mtimes


# DataModule


def test_missing_token_files_name_the_command(tmp_path, sample_data):
    module = TinyStories(source="sample", data_dir=tmp_path)
    module.connect(sample_tokenizer(sample_data), batch_size=2, max_seq_length=16)
    with pytest.raises(UserError, match="make data-sample"):
        module.prepare_data()


def test_token_files_of_another_tokenizer_are_refused(sample_data, tmp_path):
    other = prepare(source="sample", data_dir=sample_data, tokenizer_dir=tmp_path / "other", vocab_size=700)
    module = TinyStories(source="sample", data_dir=sample_data, tokens_dir=other)
    module.connect(sample_tokenizer(sample_data), batch_size=2, max_seq_length=16)
    with pytest.raises(UserError, match="made by another tokenizer"):
        module.setup()


def test_train_batches_are_seeded_windows_of_seq_len_plus_one(sample_data):
    a = next(iter(connected_module(sample_data).train_dataloader()))
    b = next(iter(connected_module(sample_data).train_dataloader()))
    c = next(iter(connected_module(sample_data, seed=7).train_dataloader()))
    assert a.shape == (4, 65) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resumed_train_loader_yields_the_same_batches(sample_data):
    # The sample holds 41 windows of 10,001 tokens per epoch: 30 batches of 4 cross two epoch boundaries.
    module = connected_module(sample_data, seq_len=10_000)
    windows = module.train_dataloader().dataset.windows_per_epoch
    uninterrupted = [
        batch for _, batch in zip(range(30), connected_module(sample_data, seq_len=10_000).train_dataloader())
    ]
    first = module.train_dataloader()
    it = iter(first)
    seen = [next(it) for _ in range(13)]
    state = first.state_dict()
    resumed = connected_module(sample_data, seq_len=10_000).train_dataloader()
    resumed.load_state_dict(state)
    rest = [batch for _, batch in zip(range(17), resumed)]
    assert 30 * 4 > 2 * windows
    assert all(torch.equal(x, y) for x, y in zip(seen + rest, uninterrupted, strict=True))


def counted_targets(batches, seq_len):
    """The targets the project's validation counts in served batches: the last `new` of each window."""
    return [w[1 : seq_len + 1][seq_len - int(w[-1]) :] for b in batches for w in b]


def test_validation_windows_cover_the_whole_split_once(sample_data, monkeypatch):
    from tinystories_lab.data import datamodule

    module = connected_module(sample_data, batch_size=8, seq_len=128)
    tokens = torch.from_numpy(module.val_tokens.astype(np.int64))
    batches = list(module.val_dataloader())
    assert (len(tokens) - 1) % 128, "the sample's split should end in a partial window"
    assert sum(len(b) for b in batches) == (len(tokens) - 1) // 128 + 1  # whole windows, then the tail
    assert all(b.shape[1] == 128 + 2 for b in batches)  # the window, then its count of new targets
    assert torch.equal(torch.cat(counted_targets(batches, 128)), tokens[1:])  # every target once, in order
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(datamodule, "_rank_and_world_size", lambda rank=rank: (rank, 2))
        per_rank.append(list(module.val_dataloader()))
    assert len(per_rank[0]) == len(per_rank[1])  # same number of batches on every rank
    interleaved = [w for pair in zip(*(counted_targets(b, 128) for b in per_rank)) for w in pair]
    assert torch.equal(
        torch.cat(interleaved), tokens[1:]
    )  # rank r has windows r, r + 2, ...; padding counts 0
    monkeypatch.undo()
    limited = connected_module(sample_data, batch_size=8, seq_len=128, val_windows=10)
    limited_batches = list(limited.val_dataloader())
    assert sum(len(b) for b in limited_batches) == 10
    assert torch.equal(torch.cat(counted_targets(limited_batches, 128)), tokens[1 : 1 + 10 * 128])


def test_ranks_split_one_stream_between_them(sample_data, monkeypatch):
    from tinystories_lab.data import datamodule

    tokens = connected_module(sample_data).train_tokens
    single = datamodule.TrainWindows(tokens, 64, seed=42)
    expected = [w for _, w in zip(range(12), single)]
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(datamodule, "_rank_and_world_size", lambda rank=rank: (rank, 2))
        per_rank.append([w for _, w in zip(range(6), datamodule.TrainWindows(tokens, 64, seed=42))])
    interleaved = [w for pair in zip(*per_rank) for w in pair]
    assert all(torch.equal(a, b) for a, b in zip(interleaved, expected, strict=True))


# Damaged files: one line naming the command that re-makes them; `data` rewrites what is damaged


def copy_of_sample(sample_data, tmp_path):
    """A data folder of this test's own holding the sample's tokenizer and token files."""
    data_dir = tmp_path / "data"
    shutil.copytree(sample_data / "tokenizers" / "sample", data_dir / "tokenizers" / "sample")
    tokens_dir = tokens_dir_for(data_dir, "sample", sample_tokenizer(data_dir))
    shutil.copytree(tokens_dir_for(sample_data, "sample", sample_tokenizer(data_dir)), tokens_dir)
    return data_dir, tokens_dir


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


DAMAGES = {  # file, how it is damaged, what the refusal says
    "truncated": (
        "train.bin",
        lambda p: _truncate(p, 100_000),
        "train.bin holds 50,000 tokens but meta.json",
    ),
    "empty": ("train.bin", lambda p: _truncate(p, 0), "train.bin is empty"),
    "odd size": ("train.bin", lambda p: _truncate(p, 100_001), "100,001 bytes, not a whole number of uint16"),
    "missing": ("validation.bin", lambda p: p.unlink(), "validation.bin is missing"),
    "meta not JSON": ("meta.json", lambda p: p.write_text("garbage\n"), "meta.json is not valid JSON"),
    "meta {}": ("meta.json", lambda p: p.write_text("{}\n"), "meta.json lacks format_version"),
    "meta dtype": (
        "meta.json",
        lambda p: p.write_text(p.read_text().replace('"uint16"', '"float64"')),
        "meta.json says dtype 'float64'",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_token_files_are_one_line_naming_the_command_for_their_source(damage, sample_data, tmp_path):
    data_dir, tokens_dir = copy_of_sample(sample_data, tmp_path)
    name, harm, says = DAMAGES[damage]
    harm(tokens_dir / name)
    folder = tmp_path / "my stories"
    commands = {
        "sample": f"`make data-sample DATA_DIR={data_dir}`",
        "tinystories": f"`make data DATA_DIR={data_dir}`",
        str(folder): f"`tinystories-lab data --source '{folder}' --data_dir {data_dir}`",
    }
    for source, command in commands.items():
        module = TinyStories(source=source, data_dir=data_dir, tokens_dir=tokens_dir)
        module.connect(sample_tokenizer(data_dir), batch_size=2, max_seq_length=16)
        with pytest.raises(UserError) as refused:
            module.prepare_data()
        message = str(refused.value)
        assert says in message and command in message and "\n" not in message, message
    module = TinyStories(source="sample")
    module.connect(sample_tokenizer(data_dir), batch_size=2, max_seq_length=16)
    assert module.remake_command() == "`make data-sample`"  # the default data folder needs no DATA_DIR


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_data_command_rewrites_damaged_token_files_and_says_so(damage, sample_data, tmp_path, capsys):
    data_dir, tokens_dir = copy_of_sample(sample_data, tmp_path)
    good = {p.name: p.read_bytes() for p in tokens_dir.iterdir()}
    name, harm, says = DAMAGES[damage]
    harm(tokens_dir / name)
    before = {p.name: p.stat().st_mtime_ns for p in tokens_dir.iterdir()}
    assert prepare(source="sample", data_dir=data_dir, vocab_size=8192) == tokens_dir
    out = capsys.readouterr().out
    assert says in out and "rewriting" in out, out
    assert {p.name: p.read_bytes() for p in tokens_dir.iterdir()} == good
    if name == "train.bin":  # only what is damaged is rewritten
        assert "validation.bin is up to date" in out
        assert tokens_dir.joinpath("validation.bin").stat().st_mtime_ns == before["validation.bin"]


def test_the_data_command_notices_a_token_file_changed_in_place(sample_data, tmp_path, capsys):
    data_dir, tokens_dir = copy_of_sample(sample_data, tmp_path)
    good = (tokens_dir / "train.bin").read_bytes()
    (tokens_dir / "train.bin").write_bytes(bytes(len(good)))  # the right size, the wrong tokens
    prepare(source="sample", data_dir=data_dir, vocab_size=8192)
    assert "train.bin does not match its sha256 in meta.json: rewriting it" in capsys.readouterr().out
    assert (tokens_dir / "train.bin").read_bytes() == good


@pytest.mark.parametrize("file", ["tokenizer.model", "tokenizer_config.json"])
def test_a_garbage_tokenizer_is_one_line_naming_the_fix(file, sample_data, tmp_path, capsys):
    data_dir, _ = copy_of_sample(sample_data, tmp_path)
    folder = data_dir / "tokenizers" / "sample"
    (folder / file).write_bytes(b"\x00\xffnot a tokenizer" * 100)
    with pytest.raises(UserError, match=f"The tokenizer in {folder} does not load") as refused:
        load_tokenizer(folder)
    assert f"Delete {folder} and re-make it with `make data-sample DATA_DIR={data_dir}`" in str(refused.value)
    # `data` on the same folder, and a training run pointed at it, refuse with that one line
    queue = tmp_path / "q.yaml"
    config = "config_hub/pretrain/tiny_stories/demo/gpt_demo.yaml"
    args = f"['--tokenizer_dir={folder}', '--data.init_args.data_dir={data_dir}']"
    entry = f"{{name: a, config: {config}, status: todo, out_dir: {tmp_path / 'a'}, args: {args}}}"
    queue.write_text(f"experiments:\n  - {entry}\n")
    for argv in (
        ["data", "--source", "sample", "--data_dir", str(data_dir)],
        ["run-next", "--queues", f"[{queue}]"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.count("\n") == 1 and "does not load" in err, err
    assert "status: todo" in queue.read_text()
