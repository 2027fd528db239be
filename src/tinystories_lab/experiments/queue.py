"""experiments.yaml: the queue of runs. Loaded and validated strictly; updated under a lock, atomically.

The file is edited by people too, so it is read and written with ruamel.yaml, which keeps comments,
field order and entry order; the runner only adds its own fields (RUNNER_FIELDS) to entries.

An entry with `seeds: [42, 43, 44]` is one run per seed (`SeedRun`). The first seed's run is the entry
itself: its name, folder and status fields, as without seeds. Every other seed s is the run
`<name>-seed<s>`, in its own folder, whose status and runner fields live in the entry under
`seed_runs: {s: {...}}`. All of them share the entry's config and arguments, plus their seed.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
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
    "host", "pid", "started_at", "finished_at", "last_step", "exit_code", "failure_reason", "error", "log",
    "note", "slurm_job", "cuda_visible_devices", "start_step",
)  # fmt: skip
RUNNER_FIELDS = (*RUN_RECORD, "attempts", "run_args", "run_logger")
RECORD_FIELDS = ("status", *RUNNER_FIELDS)  # what each seed of an experiment has for itself
# What a seed sets: LitGPT seeds torch with `seed` before building the model (the initialisation); the
# DataModule's own seed orders the training windows (LitGPT does not pass its seed to the data).
SEED_ARGS = {"initialisation": "--seed={}", "data order": "--data.init_args.seed={}"}
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
        """The validated runs, in file order: the entries, each seeded one as one run per seed (ruamel maps
        and `SeedRun`s: edits keep comments and order)."""
        return expand(self._read()["experiments"])

    @contextmanager
    def edit(self, check_configs: bool = True) -> Iterator[list[dict]]:
        """Lock the file, yield its entries for changes, and write them back atomically.

        `check_configs=False` lets the runner record an outcome even when, during a long run, someone
        pointed another entry at a config that does not exist."""
        self._lock.wait(f"the lock of {self.path}", self.LOCK_TIMEOUT_S, self.LOCK_NOTICE_S)
        with self._lock:
            original = self._text()
            doc = self._read(original, check_configs)
            yield expand(doc["experiments"])
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
        if "seeds" in entry:
            _validate_seeds(entry, where)
    for entry in entries:  # a seed's run name must not be another run's
        for seed in entry.get("seeds", [])[1:]:
            name = seed_run_name(entry["name"], seed)
            if name in seen:
                raise UserError(
                    f"{path}: experiment {entry['name']!r}: its seed {seed} run is named {name!r}, like "
                    "another experiment's run; rename one of them."
                )
            seen.add(name)


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
            # isinstance: YAML loads lists as a list subclass; bool is an int subclass, never meant here.
            if isinstance(value, bool) or not (
                isinstance(value, kind) or (kind is str and isinstance(value, int))
            ):
                raise UserError(f"{where}: slurm.{key} must be a {kind.__name__}, not {value!r}.")
        if not all(isinstance(a, str) for a in slurm.get("sbatch_args", [])):
            raise UserError(f"{where}: slurm.sbatch_args must be a list of strings such as ['--exclusive'].")


def _validate_seeds(entry: dict, where: str) -> None:
    seeds = entry["seeds"]
    if not (
        isinstance(seeds, list)
        and seeds
        and all(type(s) is int and s >= 0 for s in seeds)
        and len(set(seeds)) == len(seeds)
    ):
        raise UserError(f"{where}: seeds must list distinct non-negative integers, such as [42, 43, 44].")
    runs = entry.get("seed_runs", {})
    if not (isinstance(runs, dict) and all(type(s) is int and isinstance(r, dict) for s, r in runs.items())):
        raise UserError(f"{where}: seed_runs must map each seed to its run's fields (the runner writes it).")
    for seed, record in runs.items():
        if record.get("status", "todo") not in STATUSES:
            raise UserError(
                f"{where}: seed {seed} has unknown status {record['status']!r}; use one of "
                f"{', '.join(STATUSES)}."
            )


def seed_run_name(name: str, seed: int) -> str:
    """The run of an experiment's seed after its first."""
    return f"{name}-seed{seed}"


class SeedRun(MutableMapping):
    """One seed of an experiment with `seeds:`, as a queue entry: the experiment's fields, its own name,
    folder, `seed`, `experiment` (the entry's name) and arguments that set the seed, and its own status and
    runner fields (RECORD_FIELDS), read from and written to the entry (the first seed) or its `seed_runs`."""

    def __init__(self, entry: dict, seed: int) -> None:
        self.entry = entry
        self.seed = seed
        self.first = seed == entry["seeds"][0]
        self.name = entry["name"] if self.first else seed_run_name(entry["name"], seed)

    def _record(self, create: bool = False) -> dict:
        if self.first:
            return self.entry
        if create and "seed_runs" not in self.entry:
            self.entry["seed_runs"] = CommentedMap()
        runs = self.entry.get("seed_runs", {})
        if create and self.seed not in runs:
            runs[self.seed] = CommentedMap(status="todo")
        return runs.get(self.seed, {})

    def _view(self) -> dict:
        shared = {k: v for k, v in self.entry.items() if k not in ("seeds", "seed_runs", *RECORD_FIELDS)}
        args = [*self.entry.get("args", []), *(a.format(self.seed) for a in SEED_ARGS.values())]
        view = {
            **shared,
            "name": self.name,
            "experiment": self.entry["name"],
            "seed": self.seed,
            "args": args,
        }
        if not self.first and "out_dir" in self.entry:
            view["out_dir"] = f"{self.entry['out_dir']}-seed{self.seed}"
        record = self._record()
        view.update({k: v for k, v in record.items() if k in RECORD_FIELDS})
        view.setdefault("status", "todo")
        return view

    def __getitem__(self, key: str):
        return self._view()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view())

    def __len__(self) -> int:
        return len(self._view())

    def __setitem__(self, key: str, value) -> None:
        if key not in RECORD_FIELDS:
            raise TypeError(f"{key} is shared by every seed of {self.entry['name']}; edit the experiment.")
        self._record(create=True)[key] = value

    def __delitem__(self, key: str) -> None:
        record = self._record()
        if key not in RECORD_FIELDS or key not in record:
            raise KeyError(key)
        del record[key]


def expand(entries: list[dict]) -> list[dict]:
    """The runs of a queue's entries: an entry with `seeds:` becomes one `SeedRun` per seed."""
    return [run for e in entries for run in ([SeedRun(e, s) for s in e["seeds"]] if "seeds" in e else [e])]


def set_seeds(queue: Queue, name: str, count: int, base: int) -> list[str]:
    """Give experiment `name` `count` seeds (`SEEDS=N`): the seeds it has, then the integers after the largest
    (from `base`, its config's seed, when it has none). Returns the names of its seeds' runs."""
    if count < 1:
        raise UserError(f"SEEDS must be a positive number of seeds, not {count}.")
    with queue.edit() as runs:
        run = find(runs, name)
        entry = run.entry if isinstance(run, SeedRun) else run
        if entry["name"] != name:
            raise UserError(f"SEEDS= takes an experiment, not one seed's run: MODEL={entry['name']}.")
        seeds = list(entry.get("seeds", [base]))
        if count < len(seeds):
            raise UserError(
                f"{name} has {len(seeds)} seeds ({', '.join(map(str, seeds))}); to drop some, edit its "
                "seeds: in the queue."
            )
        while len(seeds) < count:
            seeds.append(max(seeds) + 1)
        if seeds != entry.get("seeds"):
            flow = CommentedSeq(seeds)
            flow.fa.set_flow_style()
            _insert_after(entry, "seeds", flow, after="config")
    return [r.name for r in expand([entry])]


def _insert_after(entry: CommentedMap, key: str, value, after: str) -> None:
    if key in entry:
        entry[key] = value
    else:
        entry.insert(list(entry).index(after) + 1, key, value)


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
