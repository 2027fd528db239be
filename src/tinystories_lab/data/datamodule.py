"""The LitGPT DataModule every config in the pack names: `tinystories_lab.data.TinyStories`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from litgpt import Tokenizer
from litgpt.data import DataModule
from torch.utils.data import DataLoader, Dataset, IterableDataset

from tinystories_lab.data.sources import data_command, source_name
from tinystories_lab.data.tokenizer import fingerprint
from tinystories_lab.data.tokens import open_split, read_meta, tokens_dir_for
from tinystories_lab.errors import UserError


class TrainWindows(IterableDataset):
    """An endless, seeded stream of `seq_len + 1`-token windows over the training tokens.

    Epoch e shifts all window starts by a seeded offset in [0, seq_len) and visits the windows in a
    seeded permutation, so the stream is a pure function of (seed, position). With several processes,
    rank r of w takes positions r, r + w, r + 2w, ... The position is the loader's whole state.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.windows_per_epoch = len(tokens) // seq_len - 1
        if self.windows_per_epoch < 1:
            raise UserError(
                f"The training split has {len(tokens):,} tokens, too few for one window of "
                f"{seq_len + 1}; use more data or a shorter max_seq_length."
            )
        self.consumed = 0  # windows this rank has handed out
        self._epoch: int | None = None

    def window_start(self, position: int) -> int:
        """Token offset of the window at a global stream position."""
        epoch, k = divmod(position, self.windows_per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._offset = int(rng.integers(self.seq_len))
            self._order = rng.permutation(self.windows_per_epoch)
            self._epoch = epoch
        return self._offset + int(self._order[k]) * self.seq_len

    def __iter__(self):
        rank, world = _rank_and_world_size()
        while True:
            start = self.window_start(self.consumed * world + rank)
            self.consumed += 1  # counted before the yield: exact when the loader runs in this process
            yield torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))

    def state_dict(self) -> dict:
        _, world = _rank_and_world_size()
        return {"position": self.consumed * world, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["seq_len"]) != (self.seed, self.seq_len):
            raise UserError(
                f"The checkpoint's data stream used seed {state['seed']} and max_seq_length "
                f"{state['seq_len']}; this run uses {self.seed} and {self.seq_len}."
            )
        _, world = _rank_and_world_size()
        self.consumed = state["position"] // world


class ValWindows(Dataset):
    """The validation split as windows of `seq_len + 1` tokens, stride `seq_len`: every token a target once.

    Whole windows come first; a last window ending at the split's end covers the remaining targets (it
    overlaps its predecessor, and `new_targets(i)` says how many of its targets, counted from its end, no
    earlier window holds). `limit` keeps the first `limit` whole windows only.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, limit: int | None = None) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        whole = (len(tokens) - 1) // seq_len
        if whole < 1:
            raise UserError(
                f"The validation split has {len(tokens):,} tokens, too few for one window of {seq_len + 1}."
            )
        self.tail = (len(tokens) - 1) % seq_len if limit is None else 0  # targets after the whole windows
        self.n = whole + (self.tail > 0) if limit is None else min(whole, limit)

    def __len__(self) -> int:
        return self.n

    def start(self, i: int) -> int:
        if self.tail and i == self.n - 1:
            return len(self.tokens) - self.seq_len - 1
        return i * self.seq_len

    def new_targets(self, i: int) -> int:
        return self.tail if self.tail and i == self.n - 1 else self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        start = self.start(i)
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))


class RankValWindows(IterableDataset):
    """`ValWindows` split over the ranks, as the validation loader serves them.

    Each item is a window followed by one more entry, its count of new targets (`ValWindows.new_targets`):
    LitGPT's own `validate` reads only the first `seq_len + 1` entries, while the project's
    (`tinystories_lab.pretrain`) counts each target once. Rank r of w takes windows r, r + w, ...; a rank
    with one window fewer gets a copy counted 0, so every rank runs the same number of batches (DDP and
    FSDP forwards are collective).
    """

    def __init__(self, windows: ValWindows) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return -(-len(self.windows) // _rank_and_world_size()[1])

    def __iter__(self):
        rank, world = _rank_and_world_size()
        for i in range(rank, len(self) * world, world):
            counted = i < len(self.windows)
            i = min(i, len(self.windows) - 1)
            new = self.windows.new_targets(i) if counted else 0
            yield torch.cat([self.windows[i], torch.tensor([new])])


class ResumableLoader(DataLoader):
    """A DataLoader whose position Fabric saves in checkpoints and restores on resume."""

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


@dataclass
class TinyStories(DataModule):
    """TinyStories token files made by `tinystories-lab data`, with BOS and EOS around every story."""

    source: str = "tinystories"
    """Prepared data to read: 'tinystories' (Hugging Face), 'sample' (bundled), or a folder of .txt files."""
    data_dir: Path = Path("data")
    """The project's data folder, holding tokens/<source>-<tokenizer hash>/."""
    tokens_dir: Path | None = None
    """Read token files from this folder instead of the one made for this source and tokenizer."""
    seed: int = 42
    """Seed of the training window order."""
    val_windows: int | None = None
    """Validate on the first N windows only (default: the whole validation split)."""

    tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)
    batch_size: int = field(default=1, init=False, repr=False)
    max_seq_length: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__()
        self.data_dir = Path(self.data_dir)  # also when built from a saved hyperparameters.yaml
        self.tokens_dir = Path(self.tokens_dir) if self.tokens_dir is not None else None

    def connect(
        self,
        tokenizer: Tokenizer | None = None,
        batch_size: int = 1,
        max_seq_length: int | None = None,
        **kwargs,
    ) -> None:
        if tokenizer is None:
            raise UserError("TinyStories needs a tokenizer: set `tokenizer_dir` in the config.")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length

    def resolved_tokens_dir(self) -> Path:
        """The token folder this module reads."""
        if self.tokens_dir is not None:
            return self.tokens_dir
        return tokens_dir_for(self.data_dir, source_name(self.source), self.tokenizer)

    def remake_command(self) -> str:
        """The command that makes this module's token files, named when they are missing or damaged."""
        return data_command(self.source, self.data_dir)

    def split(self, split: str) -> np.ndarray:
        """The memory-mapped tokens of a split, checked against the connected tokenizer."""
        return open_split(
            self.resolved_tokens_dir(), split, fingerprint(self.tokenizer), remake=self.remake_command()
        )

    def meta(self) -> dict:
        """The token folder's meta.json (story, token and byte counts per split); call `split` first."""
        return read_meta(self.resolved_tokens_dir(), self.remake_command())

    def prepare_data(self) -> None:
        self.split("train"), self.split("validation")  # fail early, with the command that makes them

    def setup(self, stage: str = "") -> None:
        self.train_tokens = self.split("train")
        self.val_tokens = self.split("validation")

    def train_dataloader(self) -> DataLoader:
        windows = TrainWindows(self.train_tokens, self.max_seq_length, self.seed)
        # num_workers=0: slicing a memmap is cheap, and no prefetching keeps the saved position exact.
        return ResumableLoader(windows, batch_size=self.batch_size, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        windows = ValWindows(self.val_tokens, self.max_seq_length, self.val_windows)
        return DataLoader(RankValWindows(windows), batch_size=self.batch_size, num_workers=0)


def _rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
