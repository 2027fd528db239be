"""`python -m tinystories_lab.pretrain`: `litgpt pretrain` run on a Fabric this project builds.

It takes `litgpt pretrain`'s arguments, plus `--strategy auto|ddp|fsdp`, and runs LitGPT's own
`setup`, `main` and `fit` unchanged. Only what LitGPT fixes inside them is swapped, each for a reason:

- the Fabric: LitGPT always picks FSDP (HYBRID_SHARD) for several devices, which a CPU refuses and which
  crashes when `devices` is fewer than the GPUs visible. Here the strategy is `ddp` whenever the training
  state fits one device (all six variants), `fsdp` otherwise: Lightning's ModelParallelStrategy with
  FSDP2's `fully_shard` on every block and the root (`shard_blocks_and_root`), which runs on a CPU too and
  keeps the tied embedding one tensor. Its checkpoints are full state dicts, as DDP's are;
- tied embeddings: checked after `fabric.setup` and after a resume; a lost tie stops the run at once;
- bf16 precision: Fabric converts the model's outputs to fp32, so LitGPT computes the loss on an fp32 copy
  of the full logits, outside autocast (23% of a bf16-mixed step on a CPU, and micro x context x vocab x 4
  bytes of memory). Here the logits stay as computed (bf16) and the loss runs inside bf16 autocast, which
  computes the cross-entropy in fp32 one chunk at a time, as in a bare loop (bf16-true included: a loss
  computed in bf16 itself is off by ~0.02);
- `validate`: LitGPT averages per-batch means on rank 0 only; here it is the mean over every target token
  of the validation split, summed over all ranks, whatever their number (see `RankValWindows`);
- the logged training loss: LitGPT logs rank 0's; here the mean over all ranks, as one rank would log it;
- `--resume auto`: the newest checkpoint that loads (a truncated one is skipped), `final/` included;
- `hyperparameters.yaml`: saved from these arguments (LitGPT re-reads `sys.argv`, which holds ours too);
- SIGUSR1 (SLURM's warning before the time limit, or a preemption): every rank saves at the next step
  boundary, then exits with 75 (`tinystories_lab.preemption`).
- `--early_checkpoints true`: also a `step-*` checkpoint at steps 1, 2, 4, 8, ... below `train.save_interval`,
  for `interpret-timeline` (see `EarlySaves`).
- TF32: the `litgpt` command sets `torch.set_float32_matmul_precision("high")` at start; so does `main`.

Under SLURM each node's first process prints its node rank and the main address Fabric connects to.

For `MICRO=auto` and the benchmarks (`tinystories_lab.probe`), rank 0 writes its peak memory and the GPU's
total to `device.json` in the out_dir, and a run out of device memory exits with `OUT_OF_MEMORY_EXIT` (3).

Every rank takes a lock in the run folder (`RunLock`), so the runner knows a run is alive until all its
processes are gone, and dies with the process that started it (`experiments/lifeline.py`).
"""

from __future__ import annotations

# First, before the imports that take seconds: a training process whose parent dies goes with it.
import tinystories_lab.experiments.lifeline  # noqa: F401  # isort: skip

import argparse
import gc
import os
import sys
from dataclasses import replace
from functools import cache, partial
from pathlib import Path

import lightning
import litgpt.pretrain
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.precision import HalfPrecision, MixedPrecision
from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy
from litgpt.model import GPT
from litgpt.utils import CLI, chunked_cross_entropy, parse_devices, reset_parameters
from torchmetrics.aggregation import RunningMean

from tinystories_lab import preemption
from tinystories_lab.configs import check_training, pretrain_parser
from tinystories_lab.errors import UserError
from tinystories_lab.experiments.launch import Strategy, choose_strategy
from tinystories_lab.experiments.locks import RunLock
from tinystories_lab.experiments.runs import check_resumable, resume_point
from tinystories_lab.probe import OUT_OF_MEMORY_EXIT, write_device_file

gc.freeze()  # the imports' objects live until the process ends: no collection walks them (as in cli.py)

VALIDATION_CHUNK = 4096  # tokens whose logits validation turns into fp32 at a time
LITGPT_FIT = litgpt.pretrain.fit


def shard_blocks_and_root(model: GPT, mesh) -> GPT:
    """FSDP2 for LitGPT's GPT: materialise the meta model as DDP's path initialises it (the same values),
    tie the embedding again, then `fully_shard` each block and the root over every rank.

    `to_empty` gives every module a new Parameter, so a tied `wte`/`lm_head` would become two tensors
    (litgpt issue 1727); tied before `fully_shard`, the root's parameter group holds one sharded tensor that
    both modules share. Materialising before sharding holds the full fp32 weights (4 bytes per parameter)
    on each device once, at the start: gradients and AdamW's moments (12 of the 16 bytes) are only ever
    sharded.
    """
    from torch.distributed.fsdp import fully_shard

    mesh = mesh["data_parallel"]
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        shared = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            shared.setdefault(id(param), []).append(name)
        device = torch.device(mesh.device_type)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        model.to_empty(device=device)
        reset_parameters(model)  # LitGPT's initialisation, untied, in the order and with the seed DDP's has
        for first, *others in shared.values():  # then tied as LitGPT ties it: wte takes lm_head's tensor
            for name in others:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fabric_strategy(name: str, world: int) -> object:
    if name == "single":
        return "auto"
    if name == "ddp":
        return DDPStrategy()
    # One data-parallel dimension over every rank (FULL_SHARD, across nodes too); full-state checkpoints.
    return ModelParallelStrategy(
        shard_blocks_and_root, data_parallel_size=world, tensor_parallel_size=1,
        save_distributed_checkpoint=False,
    )  # fmt: skip


class _KeepOutputs:
    """A precision plugin that hands the model's outputs on as computed instead of converting them to fp32."""

    def convert_output(self, data):
        return data


class _MixedPrecision(_KeepOutputs, MixedPrecision):
    pass


class _HalfPrecision(_KeepOutputs, HalfPrecision):
    pass


def precision_plugin(precision: str | None) -> object | None:
    """The plugin for bf16 training (one device, DDP or FSDP2 alike); None for other precisions."""
    if precision == "bf16-mixed":
        return _MixedPrecision("bf16-mixed", "cuda" if torch.cuda.is_available() else "cpu")
    if precision == "bf16-true":
        return _HalfPrecision("bf16-true")
    return None


def check_tie(module: torch.nn.Module, when: str) -> None:
    """Stop unless LitGPT's output head is its embedding, the same tensor (every config ties them)."""
    model = getattr(module, "module", module)  # Fabric's wrapper
    model = getattr(model, "_orig_mod", model)  # torch.compile's
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise RuntimeError(f"the output head is no longer the embedding {when}: the tie was lost")


class _Fabric(lightning.Fabric):
    """Fabric, checking after `setup` and after a resume that a tied embedding is still one tensor."""

    tie_embeddings = False

    def setup(self, module, *args, **kwargs):
        module = super().setup(module, *args, **kwargs)
        if self.tie_embeddings:
            check_tie(module, "after setup")
            self.print("Tied embeddings: the output head is the embedding (after setup)")
        return module

    def load(self, path, state=None, strict=True, **kwargs):
        remainder = super().load(path, state, strict, **kwargs)
        if self.tie_embeddings and state is not None and "model" in state:
            check_tie(state["model"], "after the resume")
            self.print("Tied embeddings: the output head is the embedding (after the resume)")
        return remainder


class _Lightning:
    """Stands in for the `lightning` module inside `litgpt.pretrain`, whose only use of it is `L.Fabric`."""

    def __init__(self, strategy: str, tie_embeddings: bool = False) -> None:
        self.strategy = strategy
        self.tie_embeddings = tie_embeddings
        self.fabric: lightning.Fabric | None = None

    def Fabric(self, **kwargs) -> lightning.Fabric:  # noqa: N802 (the name litgpt.pretrain calls)
        plugin = precision_plugin(kwargs.get("precision"))
        if plugin is not None:
            kwargs.update(precision=None, plugins=[plugin])
        world = kwargs["devices"] * kwargs["num_nodes"]
        self.fabric = _Fabric(**{**kwargs, "strategy": fabric_strategy(self.strategy, world)})
        self.fabric.tie_embeddings = self.tie_embeddings
        return self.fabric

    def chunked_cross_entropy(
        self, logits: torch.Tensor, targets: torch.Tensor, *args, **kwargs
    ) -> torch.Tensor:
        """LitGPT's loss on bf16 logits inside bf16 autocast, which runs the cross-entropy in fp32 chunk by
        chunk (as a bare bf16 loop has it), instead of on an fp32 copy of all the logits."""
        if logits.dtype == torch.bfloat16:
            with torch.autocast(logits.device.type, dtype=torch.bfloat16):
                return chunked_cross_entropy(logits, targets, *args, **kwargs)
        return chunked_cross_entropy(logits, targets, *args, **kwargs)


class _RunningMeanOverRanks(RunningMean):
    """LitGPT's running training loss, averaged over every rank when computed.

    LitGPT asks for `sync_on_compute=False`, so each rank would log its own loss; this always syncs.
    """

    def __init__(self, window: int, **kwargs) -> None:
        super().__init__(window=window, **{**kwargs, "sync_on_compute": True})


@torch.no_grad()
def validate(
    fabric: lightning.Fabric, model: torch.nn.Module, val_dataloader, max_iters: int, verbose: bool = True
) -> torch.Tensor:
    """LitGPT's `validate`, exact: the mean loss over every counted target on every rank together.

    Batches from `RankValWindows` carry one extra column, the number of targets (counted from the end of
    each window) that no other window holds; other batches count every target.
    """
    fabric.barrier()
    if verbose:
        fabric.print("Validating ...")
    model.eval()
    seq_len = model.max_seq_length
    total = torch.zeros(2, dtype=torch.float64, device=fabric.device)  # loss sum, targets
    for k, batch in enumerate(val_dataloader):
        if k >= max_iters:
            break
        input_ids = batch[:, :seq_len].contiguous().long()
        targets = batch[:, 1 : seq_len + 1].contiguous().long()
        if batch.shape[1] > seq_len + 1:
            new = batch[:, seq_len + 1 :]
            targets[torch.arange(seq_len, device=targets.device) < seq_len - new] = -100
        logits = model(input_ids).flatten(0, 1)
        for chunk, chunk_targets in zip(
            logits.split(VALIDATION_CHUNK), targets.flatten().split(VALIDATION_CHUNK)
        ):
            loss = torch.nn.functional.cross_entropy(chunk.float(), chunk_targets, reduction="sum")
            total += torch.stack([loss.double(), (chunk_targets != -100).sum().double()])
    total = fabric.all_reduce(total, reduce_op="sum")
    model.train()
    fabric.barrier()
    return (total[0] / total[1]).float()


class EarlySaves(int):
    """LitGPT's `train.save_interval` (every this many steps) that also says yes at powers of two below it.

    LitGPT saves when `step_count % save_interval == 0`; as a subclass of int with its own `__rmod__`, this is
    asked first (Python's rule for reflected operators), so the loop itself needs no change.
    """

    def __rmod__(self, step: int) -> int:
        return 0 if 0 < step < self and step & (step - 1) == 0 else step % int(self)


def _fit_saving_early(fit, *args, train, **kwargs):
    """LitGPT's `fit`, its save interval turned into `EarlySaves`."""
    if train.save_interval:
        train = replace(train, save_interval=EarlySaves(train.save_interval))
    return fit(*args, train=train, **kwargs)


def rank_from_env(devices_per_node: int) -> int:
    """This process's global rank, as its launcher (SLURM, torchrun, or Fabric's rank 0) set it; 0 by hand."""
    env = os.environ
    if "SLURM_PROCID" in env or "RANK" in env:
        return int(env.get("SLURM_PROCID", env.get("RANK")))
    return int(env.get("NODE_RANK", 0)) * devices_per_node + int(env.get("LOCAL_RANK", 0))


def check_nodes(num_nodes: int) -> None:
    """Refuse several nodes without a launcher that gives each its node rank and the main address (Fabric
    would wait 30 minutes for peers that never come)."""
    env = os.environ
    if num_nodes > 1 and "SLURM_NTASKS" not in env and not {"MASTER_ADDR", "NODE_RANK"} <= env.keys():
        raise UserError(
            f"--num_nodes={num_nodes} needs a cluster launcher: use `environment: slurm`, or start one "
            "process group per node with MASTER_ADDR, MASTER_PORT and NODE_RANK set."
        )


def say_where(devices: int, num_nodes: int) -> None:
    """Under SLURM, on each node's first process: its node rank and the main address Fabric connects to."""
    if not SLURMEnvironment.detect() or int(os.environ.get("SLURM_LOCALID", 0)) != 0:
        return
    where = SLURMEnvironment()
    print(
        f"Node rank {where.node_rank()} of {num_nodes} ({os.environ.get('SLURMD_NODENAME', '?')}, "
        f"{devices} process(es), {len(os.sched_getaffinity(0))} CPU(s) each): main address "
        f"{where.main_address}:{where.main_port}",
        flush=True,
    )


def check_gpus(gpus_per_node: int) -> None:
    """Fail at once when the job asked for GPUs but this process sees fewer (it would train on CPUs)."""
    seen = torch.cuda.device_count()
    if gpus_per_node > seen:
        raise UserError(
            f"this job asked for {gpus_per_node} GPU(s) per node but sees {seen} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): check the partition "
            "has GPUs and grants them, or set `slurm: {gpus_per_node: 0}` for a CPU partition."
        )


def _save_hyperparameters(args: list[str], function, checkpoint_dir: Path) -> None:
    """LitGPT's `save_hyperparameters`, from the `litgpt pretrain` arguments instead of `sys.argv`."""
    (checkpoint_dir / "hyperparameters.yaml").write_text(_hyperparameters(tuple(args), function))


@cache
def _hyperparameters(args: tuple[str, ...], function) -> str:
    """The hyperparameters.yaml text, made once per process: building the parser is ~90% of a small model's
    checkpoint save (0.7 s of CPU for a demo model), and every save writes the same text."""
    from jsonargparse import capture_parser

    parser = capture_parser(lambda: CLI(function))
    return parser.dump(parser.parse_args(list(args)))


def pretrain(args: list[str], strategy: Strategy = "auto", early_checkpoints: bool = False) -> None:
    """Check the arguments, choose the strategy and resume point, then run LitGPT's `setup`."""
    parser = pretrain_parser()
    try:
        cfg = parser.instantiate_classes(parser.parse_args(args))
    except SystemExit:  # jsonargparse has printed why
        raise UserError("`litgpt pretrain` rejects these arguments: see the reason above.") from None
    devices = parse_devices(cfg.devices)
    world = devices * cfg.num_nodes
    check_training(cfg.train, world)
    check_nodes(cfg.num_nodes)
    say_where(devices, cfg.num_nodes)
    rank = rank_from_env(devices)
    lock = RunLock(cfg.out_dir, f"rank-{rank}")  # held until this process ends
    if not lock.acquire():
        raise UserError(f"{cfg.out_dir} is being trained by another process (its lock is held).")
    point = None
    if cfg.resume == "auto":
        point = resume_point(cfg.out_dir, say=print if rank == 0 else lambda _: None)
        args = [*args, f"--resume={point or False}"]
    elif isinstance(cfg.resume, Path):
        point = cfg.resume
    chosen = choose_strategy(cfg, world, strategy)
    if point:
        check_resumable(point, chosen)
    if rank == 0 and world > 1:
        print(f"Strategy: {chosen} over {world} processes")

    lp = litgpt.pretrain
    lp.L = _Lightning(chosen, cfg.train.tie_embeddings)
    lp.chunked_cross_entropy = lp.L.chunked_cross_entropy
    lp.validate = validate
    lp.RunningMean = _RunningMeanOverRanks
    lp.save_hyperparameters = partial(_save_hyperparameters, args)
    fit = preemption.saving_fit(LITGPT_FIT)
    lp.fit = partial(_fit_saving_early, fit) if early_checkpoints else fit
    CLI(lp.setup, args=args)
    if rank == 0:  # for `MICRO=auto` and the benchmarks (probe.py)
        write_device_file(cfg.out_dir)


def main(argv: list[str] | None = None) -> None:
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], default="auto")
    own.add_argument("--gpus_per_node", type=int, default=0, help="GPUs the job asked for: fail without them")
    own.add_argument("--early_checkpoints", choices=["true", "false"], default="false")
    ours, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    preemption.install()
    torch.set_float32_matmul_precision("high")  # as the `litgpt` command sets it: TF32 matmuls on a GPU
    try:
        check_gpus(ours.gpus_per_node)
        pretrain(rest, ours.strategy, ours.early_checkpoints == "true")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:  # the probe (MICRO=auto) reads the exit code, never the message
        if not out_of_memory(e):
            raise
        print(f"error: out of memory: {e}", file=sys.stderr)
        sys.exit(OUT_OF_MEMORY_EXIT)


def out_of_memory(e: RuntimeError) -> bool:
    """The caching allocator raises OutOfMemoryError; a CUDA library finding no memory (cuBLAS's workspace,
    a kernel launch) raises a RuntimeError naming the CUDA error instead."""
    return isinstance(e, torch.OutOfMemoryError) or "CUDA error: out of memory" in str(e)


if __name__ == "__main__":
    main()
