"""experiments.yaml: the queue of runs. Loaded and validated strictly; updated under a lock, atomically.

The file is edited by people too, so it is read and written with ruamel.yaml, which keeps comments,
field order and entry order; the runner only adds its own fields (RUNNER_FIELDS) to entries.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from tinystories_lab.errors import UserError
from tinystories_lab.experiments.locks import Lock
from tinystories_lab.files import write_atomic

STATUSES = ("todo", "running", "done", "failed")
ENVIRONMENTS = ("local", "slurm")
STRATEGIES = ("auto", "ddp", "fsdp")
REQUIRED = ("name", "config", "status")
NAME_RULE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # a folder name: no separators, no leading dot
SLURM_FIELDS = {  # the optional `slurm:` mapping of an entry
    "partition": str, "time": str, "account": str, "gpus_per_node": int, "cpus_per_task": int,
    "sbatch_args": list,
}  # fmt: skip
RUN_RECORD = (  # what the runner records of a run: cleared when a new run starts
    "host", "pid", "started_at", "finished_at", "last_step", "exit_code", "error", "log", "note", "slurm_job",
    "cuda_visible_devices",
)  # fmt: skip
RUNNER_FIELDS = (*RUN_RECORD, "attempts", "run_args", "run_logger")
DEFAULT_QUEUES = [Path("experiments.yaml"), Path("experiments.demo.yaml")]  # what read-only verbs look in
RUN_QUEUES = [Path("experiments.yaml")]  # what the run verbs take experiments from (they write status back)

_yaml = YAML()  # round-trip mode
_yaml.indent(mapping=2, sequence=4, offset=2)
_yaml.width = 4096  # keep long error summaries on one line


class Queue:
    """One queue file. `load()` reads and validates it; `edit()` is a locked read-modify-write."""

    LOCK_TIMEOUT_S = 120  # edits take well under a second; a longer wait means a stuck or stopped holder
    LOCK_NOTICE_S = 5

    def __init__(self, path: Path | str = "experiments.yaml") -> None:
        self.path = Path(path)
        self.target = self.path.resolve()  # a symlinked queue is rewritten (and locked) through its target
        self._lock = Lock(str(self.target) + ".lock")

    def load(self) -> list[dict]:
        """The validated entries, in file order (ruamel maps: edits keep comments and order)."""
        return self._read()["experiments"]

    @contextmanager
    def edit(self, check_configs: bool = True) -> Iterator[list[dict]]:
        """Lock the file, yield its entries for changes, and write them back atomically.

        `check_configs=False` lets the runner record an outcome even when, during a long run, someone
        pointed another entry at a config that does not exist."""
        self._lock.wait(f"the lock of {self.path}", self.LOCK_TIMEOUT_S, self.LOCK_NOTICE_S)
        with self._lock:
            original = self._text()
            doc = self._read(original, check_configs)
            yield doc["experiments"]
            validate(doc["experiments"], self.path, check_configs)
            buffer = io.StringIO()
            _yaml.dump(doc, buffer)
            if buffer.getvalue() != original:
                write_atomic(self.target, buffer.getvalue())

    def _text(self) -> str:
        if not self.path.is_file():
            raise UserError(f"Queue file {self.path} does not exist.")
        try:
            return self.path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"Cannot read queue file {self.path}: {e}.") from None

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
        if not (isinstance(name, str) and NAME_RULE.fullmatch(name)):
            raise UserError(
                f"{where} has name {name!r}; a name becomes a folder name: use letters, digits, '.', '_' and "
                "'-', not starting with a dot (quote names that YAML reads as numbers)."
            )
        where = f"{path}: experiment {name!r}"
        if name in seen:
            raise UserError(f"{where} appears twice; experiment names must be unique.")
        seen.add(name)
        _validate_fields(entry, where, check_configs)


def _validate_fields(entry: dict, where: str, check_configs: bool) -> None:
    def choice(field: str, choices: tuple, default: str) -> None:
        if entry.get(field, default) not in choices:
            raise UserError(f"{where} has unknown {field} {entry[field]!r}; use one of {', '.join(choices)}.")

    choice("status", STATUSES, "todo")
    choice("environment", ENVIRONMENTS, "local")
    choice("strategy", STRATEGIES, "auto")
    for field in ("devices", "num_nodes"):
        value = entry.get(field, 1)
        if not (type(value) is int and value >= 1):
            raise UserError(f"{where}: {field} must be a positive integer, not {value!r}.")
    for field in ("optional", "early_checkpoints"):
        if type(entry.get(field, False)) is not bool:
            raise UserError(f"{where}: {field} must be true or false, not {entry[field]!r}.")
    if check_configs and not Path(entry["config"]).is_file():
        raise UserError(f"{where} names config {entry['config']}, which does not exist.")
    if not isinstance(entry.get("out_dir", ""), str):
        raise UserError(f"{where}: out_dir must be a path.")
    args = entry.get("args", [])
    if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        raise UserError(f"{where}: args must be a list of strings such as '--train.max_tokens=1000000'.")
    gpus = entry.get("gpus")
    if gpus is not None and not (
        isinstance(gpus, list) and len(gpus) == entry.get("devices", 1) and all(type(g) is int for g in gpus)
    ):
        raise UserError(f"{where}: gpus must list one GPU index per device, such as [0, 1] for devices: 2.")
    slurm = entry.get("slurm")
    if slurm is not None:
        if entry.get("environment") != "slurm":
            raise UserError(
                f"{where} has a slurm: mapping but environment {entry.get('environment', 'local')!r}."
            )
        if not isinstance(slurm, dict):
            raise UserError(f"{where}: slurm must be a mapping of {', '.join(SLURM_FIELDS)}.")
        for key, value in slurm.items():
            kind = SLURM_FIELDS.get(key)
            if kind is None:
                raise UserError(f"{where}: unknown slurm field {key!r}; use {', '.join(SLURM_FIELDS)}.")
            if type(value) is not kind and not (kind is str and type(value) is int):
                raise UserError(f"{where}: slurm.{key} must be a {kind.__name__}, not {value!r}.")


def queue_files(queues: list[Path] | None = None) -> list[Path]:
    """`queues`, or else those of DEFAULT_QUEUES that exist (refusing when none does)."""
    if queues:
        return [Path(q) for q in queues]
    found = [q for q in DEFAULT_QUEUES if q.is_file()]
    if not found:
        raise UserError(
            f"No queue file found ({' or '.join(map(str, DEFAULT_QUEUES))}); name one with --queues '[FILE]' "
            "(make: QUEUE=FILE)."
        )
    return found


def load_entries(queues: list[Path] | None = None) -> list[dict]:
    """The entries of the queue files (default: `queue_files()`), in file order; each a copy that also
    records the file it came from (`queue`)."""
    return [{**e, "queue": q} for q in queue_files(queues) for e in Queue(q).load()]


def queue_of(name: str, queues: list[Path]) -> Queue:
    """The (first) queue file holding experiment `name`, or a UserError listing the valid names."""
    return Queue(find(load_entries(queues), name)["queue"])


def find(entries: list[dict], name: str) -> dict:
    """The entry called `name`, or a UserError listing the valid names."""
    for entry in entries:
        if entry["name"] == name:
            return entry
    raise UserError(f"Unknown experiment {name!r}. Valid names: {', '.join(e['name'] for e in entries)}.")
