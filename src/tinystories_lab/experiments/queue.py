"""experiments.yaml: the queue of runs. Loaded and validated strictly; updated under a lock, atomically.

The file is edited by people too, so it is read and written with ruamel.yaml, which keeps comments,
field order and entry order; the runner only adds its own fields (RUNNER_FIELDS) to entries.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from tinystories_lab.errors import UserError

STATUSES = ("todo", "running", "done", "failed")
ENVIRONMENTS = ("local",)  # a cluster scheduler (e.g. slurm) can be added here later
REQUIRED = ("name", "config", "status")
RUNNER_FIELDS = (
    "host", "pid", "attempts", "started_at", "finished_at", "last_step", "exit_code", "error", "log", "note",
    "run_args", "run_logger",
)  # fmt: skip

_yaml = YAML()  # round-trip mode
_yaml.indent(mapping=2, sequence=4, offset=2)
_yaml.width = 4096  # keep long error summaries on one line


class Queue:
    """One queue file. `load()` reads and validates it; `edit()` is a locked read-modify-write."""

    def __init__(self, path: Path | str = "experiments.yaml") -> None:
        self.path = Path(path)
        self._lock = FileLock(str(self.path) + ".lock")

    def load(self) -> list[dict]:
        """The validated entries, in file order (ruamel maps: edits keep comments and order)."""
        return self._read()["experiments"]

    @contextmanager
    def edit(self, check_configs: bool = True) -> Iterator[list[dict]]:
        """Lock the file, yield its entries for changes, and write them back atomically.

        `check_configs=False` lets the runner record an outcome even when, during a long run, someone
        pointed another entry at a config that does not exist."""
        with self._lock:
            original = self._text()
            doc = self._read(original, check_configs)
            yield doc["experiments"]
            validate(doc["experiments"], self.path, check_configs)
            buffer = io.StringIO()
            _yaml.dump(doc, buffer)
            if buffer.getvalue() != original:
                write_atomic(self.path, buffer.getvalue())

    def _text(self) -> str:
        if not self.path.is_file():
            raise UserError(f"Queue file {self.path} does not exist.")
        return self.path.read_text()

    def _read(self, text: str | None = None, check_configs: bool = True) -> dict:
        try:
            doc = _yaml.load(self._text() if text is None else text)
        except YAMLError as e:
            raise UserError(f"{self.path} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("experiments"), list):
            raise UserError(f"{self.path} must hold a mapping with a list under 'experiments:'.")
        validate(doc["experiments"], self.path, check_configs)
        return doc


def validate(entries: list, path: Path, check_configs: bool = True) -> None:
    """Refuse a queue a runner cannot act on safely, naming the entry and the fix."""
    seen = set()
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i + 1}"
        if not isinstance(entry, dict):
            raise UserError(f"{where} is not a mapping of fields.")
        missing = [f for f in REQUIRED if f not in entry]
        if missing:
            raise UserError(f"{where} lacks {', '.join(missing)}.")
        name = entry["name"]
        where = f"{path}: experiment {name!r}"
        if name in seen:
            raise UserError(f"{where} appears twice; experiment names must be unique.")
        seen.add(name)
        if entry["status"] not in STATUSES:
            raise UserError(
                f"{where} has unknown status {entry['status']!r}; use one of {', '.join(STATUSES)}."
            )
        environment = entry.get("environment", "local")
        if environment not in ENVIRONMENTS:
            raise UserError(
                f"{where} has environment {environment!r}, which this runner does not support yet; "
                f"use {' or '.join(ENVIRONMENTS)}."
            )
        for field in ("devices", "num_nodes"):
            value = entry.get(field, 1)
            if not (isinstance(value, int) and value >= 1):
                raise UserError(f"{where}: {field} must be a positive integer, not {value!r}.")
        if check_configs and not Path(entry["config"]).is_file():
            raise UserError(f"{where} names config {entry['config']}, which does not exist.")
        if not isinstance(entry.get("out_dir", ""), str):
            raise UserError(f"{where}: out_dir must be a path.")
        args = entry.get("args", [])
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
            raise UserError(f"{where}: args must be a list of strings such as '--train.max_tokens=1000000'.")


def find(entries: list[dict], name: str) -> dict:
    """The entry called `name`, or a UserError listing the valid names."""
    for entry in entries:
        if entry["name"] == name:
            return entry
    raise UserError(f"Unknown experiment {name!r}. Valid names: {', '.join(e['name'] for e in entries)}.")


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        if path.exists():  # keep the file's permissions (mkstemp makes it private to its owner)
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
