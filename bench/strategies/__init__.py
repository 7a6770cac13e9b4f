"""Strategies: one small function each, registered by name, returning a Plan.

`def ddp(model, env, cfg) -> Plan` wraps the model for its parallelism and says how a step
runs. Precision, compile and activation checkpointing are applied around them in one fixed order
(bench/train.py): build (seeded, identical on every rank) -> move to device -> compile each block
in place -> --ac wraps blocks -> strategy wraps -> optimiser over plan.parameters. A strategy that
communicates gradients says how to hold them back for --grad-accum's micro-steps (Plan.sync).

Each strategy is a module of this package named after it ('-' as '_'), whose `@register(...)`
is its one registration, its listing order included. Modules are found by listing the package
and imported only when asked for: get_strategy imports the named strategy's module alone.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, RunConfig
from ..distenv import DistEnv


@dataclass
class Plan:
    model: nn.Module  # what the step calls: the wrapped model (DDP, FSDP module, DataParallel, ...)
    input_device: torch.device  # where batches go
    # step(x, y, precision) -> loss (a zero tensor on ranks that compute none); forward and
    # backward, not the optimiser step. Default: model(x) -> cross-entropy -> backward; pipeline
    # parallel replaces it with its schedule.
    step: Callable | None = None
    shard_batch: bool = True  # each rank trains on its own slice of the global batch
    # where ranks share a slice (a tensor-parallel group): (this rank's slice, slices), else None
    data_slice: tuple[int, int] | None = None
    # None: average the loss over ranks; else the rank that computes it, or the ranks (pipeline replicas'
    # last stages), averaged over them
    loss_rank: int | tuple[int, ...] | None = None
    autocast: bool = True  # wrap the forward in autocast for bf16/fp16 (False: the strategy casts itself)
    grad_scaler: Callable[[], object] | None = None  # fp16: factory of the scaler to use
    # collective: the full model (weights gathered) on rank 0 for evaluation, None on other ranks
    eval_module: Callable[[], nn.Module | None] | None = None
    info: dict = field(default_factory=dict)  # recorded in the result's config (schedule, bubble, ...)
    # every device this process computes on, where memory, busy % and energy are read: several for
    # dp and model-parallel, else the input device
    devices: list[torch.device] | None = None
    # sync(last) -> a context for one micro-step of --grad-accum: gradients are synchronised on the
    # last micro-step only (DDP's no_sync, FSDP2's set_requires_gradient_sync); default: nothing to hold
    sync: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext()
    # after an optimiser step's last backward, before the optimiser reads the gradients: what the strategy
    # must still do to them (tensor parallel reduces its partial gradients, once); default: nothing
    grads_ready: Callable[[], None] = lambda: None

    def __post_init__(self):
        if self.step is None:
            self.step = forward_backward(self.model)
        if self.devices is None:
            self.devices = [self.input_device]

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def forward_backward(model: nn.Module) -> Callable:
    """The step of every strategy whose model is called as model(x) -> logits."""

    def step(x: torch.Tensor, y: torch.Tensor, precision) -> torch.Tensor:
        with precision.autocast():
            loss = F.cross_entropy(model(x), y)
        precision.backward(loss)
        return loss

    return step


@dataclass(frozen=True)
class StrategySpec:
    name: str
    fn: Callable[[nn.Module, DistEnv, RunConfig], Plan]
    multiprocess: bool  # launched as one process per device through torchrun
    needs_cuda: bool  # cannot run on CPU at all
    summary: str
    check: Callable[[RunConfig, str], None] | None = None  # raises ConfigError before anything starts
    order: int = 0  # its place where strategies are listed, lowest first


STRATEGIES: dict[str, StrategySpec] = {}


def register(name: str, *, order: int, multiprocess: bool, needs_cuda: bool = False, summary: str, check=None):
    """Register a strategy function under its name (its module is the name with '_' for '-').
    order: its place where strategies are listed (all_strategies, `bench list`), lowest first."""

    def deco(fn):
        STRATEGIES[name] = StrategySpec(name, fn, multiprocess, needs_cuda, summary, check, order)
        return fn

    return deco


@functools.lru_cache(maxsize=1)
def _modules() -> tuple[str, ...]:
    """The strategy modules of this package (listed, not imported): every module that is not private."""
    return tuple(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg and not m.name.startswith("_"))


def get_strategy(name: str) -> StrategySpec:
    # only the named strategy's module (each is named after its strategy): importing pipelining
    # costs every worker of every other strategy 0.6 s of CPU
    module = name.replace("-", "_")
    if name not in STRATEGIES and module in _modules():
        importlib.import_module(f"{__name__}.{module}")
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}: choose one of {', '.join(all_strategies())}")
    return STRATEGIES[name]


def all_strategies() -> dict[str, StrategySpec]:
    """Every strategy of the package by name, in their registered order."""
    for mod in _modules():
        importlib.import_module(f"{__name__}.{mod}")
    return dict(sorted(STRATEGIES.items(), key=lambda item: (item[1].order, item[0])))


# a strategy preset's degrees on the mesh torchtitan's ParallelDims names (pp outermost, tp innermost)
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
_PRESET_DIM = {"ddp": "dp_replicate", "dp": "dp_replicate", "fsdp": "dp_shard", "pipeline": "pp",
               "model-parallel": "pp", "tp": "tp"}
# strategies whose runs are measurement anchors, not ways to train the model: never a verdict's winner
NOT_TRAINING = {"independent": "replicas that never exchange gradients (bench predict's contention anchor)",
                "tp-rank": "one rank's shapes of tensor parallel alone (bench predict's compute anchor)"}
SHARDED = ("fsdp", "hsdp")  # FSDP2 over a data-parallel mesh of 1 or 2 dimensions, TP beside it with --tp


def replicas(cfg: RunConfig) -> int:
    """FSDP2's replicate degree: --dp-replicate, or for hsdp without it one replica per node."""
    return cfg.dp_replicate if cfg.dp_replicate > 1 or cfg.strategy != "hsdp" else cfg.nodes


def degrees(cfg: RunConfig) -> dict[str, int]:
    """The run's degree on each mesh dimension: a preset strategy is one dimension of N (single and
    independent none: independent's replicas never meet); fsdp and hsdp are R replicas x S shards x T
    tensor-parallel ranks, S what --gpus leaves (torchtitan's dp_shard = -1)."""
    d = dict.fromkeys(MESH_DIMS, 1)
    if cfg.strategy in SHARDED:
        r = replicas(cfg)
        d.update(dp_replicate=r, dp_shard=max(cfg.devices // (r * cfg.tp), 1), tp=cfg.tp)
    elif cfg.strategy == "pipeline" and 1 < cfg.pp < cfg.devices:  # --pp P: N / P pipeline replicas
        d.update(pp=cfg.pp, dp_replicate=cfg.devices // cfg.pp)
    elif (dim := _PRESET_DIM.get(cfg.strategy)) and cfg.devices > 1:
        d[dim] = cfg.devices
    return d


def parse_cell(text: str) -> tuple[str, dict, str | None]:
    """'fsdp:tp2' -> ('fsdp', {'tp': 2, 'dp_replicate': 1}, None); 'hsdp:rep2:tp2'; 'pipeline:gpipe' ->
    a schedule; 'pipeline:pp2': pipelines of 2 stages replicated over the rest ({'pp': 2}); ':nosp':
    tensor parallel without sequence parallel ({'sequence_parallel': False} among the mesh's
    settings). How bench parity, sweep and predict name a cell of a mesh."""
    strategy, *rest = text.split(":")
    mesh: dict = {"tp": 1, "dp_replicate": 1}
    schedule = None
    for part in rest:
        if m := re.fullmatch(r"(tp|rep|pp)(\d+)", part):
            mesh[{"tp": "tp", "rep": "dp_replicate", "pp": "pp"}[m[1]]] = int(m[2])
        elif part == "nosp":
            mesh["sequence_parallel"] = False
        elif strategy == "pipeline":
            schedule = part
        else:  # 'fsdp:gpipe' ran plain fsdp under a name that said otherwise
            raise ConfigError(f"{text}: {part!r} is not a mesh part (tpN, repN, ppN, nosp); a schedule names a "
                              "pipeline's, as pipeline:gpipe")
    return strategy, mesh, schedule


def data_parallel(cfg: RunConfig) -> int:
    """Ranks that train on different samples: each tensor-parallel group and each pipeline shares its batch."""
    if cfg.strategy == "independent":  # replicas side by side, each on its slice, as ddp's
        return cfg.devices
    d = degrees(cfg)
    return d["dp_replicate"] * d["dp_shard"] if cfg.strategy != "single" else 1


def parallelism(cfg: RunConfig) -> dict:
    """The run's parallelism as a mesh of degrees (degrees()). The mesh shape lists every dimension of
    more than 1 in MESH_DIMS's order, and each rank's coordinates on it (row-major: the innermost
    dimension's ranks are neighbours, as init_device_mesh lays them out)."""
    d = degrees(cfg)
    shape = [(dim, d[dim]) for dim in MESH_DIMS if d[dim] > 1]
    coords = {}  # by rank (dp, model-parallel: by device of their one process)
    for rank in range(max(1, cfg.devices)):
        left, at = rank, {}
        for dim, size in reversed(shape):
            left, at[dim] = divmod(left, size)
        coords[str(rank)] = {dim: at[dim] for dim, _ in shape}
    return {"degrees": d, "mesh_shape": [size for _, size in shape], "mesh_dims": [dim for dim, _ in shape],
            "rank_coords": coords, "grad_accum": cfg.grad_accum, "ac": cfg.ac,
            "replicas": cfg.devices if cfg.strategy == "independent" else 1}


def check_strategy(cfg: RunConfig, device_type: str) -> StrategySpec:
    """Everything that can be known before a process starts: one clear ConfigError if not."""
    spec = get_strategy(cfg.strategy)
    if spec.needs_cuda and device_type != "cuda":
        raise ConfigError(f"--strategy {cfg.strategy} needs CUDA GPUs and this run is on CPU: "
                          "use --strategy ddp for multi-process training on CPU")
    if not spec.multiprocess and not spec.needs_cuda and cfg.devices > 1 and not spec.check:
        raise ConfigError(f"--strategy {cfg.strategy} uses one device; for --gpus {cfg.devices} use ddp, fsdp or pipeline")
    if not spec.multiprocess and cfg.nodes > 1:
        raise ConfigError(f"--strategy {cfg.strategy} runs in one process and cannot span --nnodes {cfg.nodes}")
    if cfg.precision == "fp16" and device_type != "cuda":
        raise ConfigError("--precision fp16 needs CUDA (fp16 autocast with a GradScaler); on CPU use bf16 or fp32")
    if cfg.sync_bn and cfg.strategy != "ddp":
        raise ConfigError("--sync-bn applies to --strategy ddp only")
    if spec.check:
        spec.check(cfg, device_type)
    return spec
