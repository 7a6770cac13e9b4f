"""A multi-process run rehearsed in this process as one of its ranks: torch's fake process group
(torch.testing._internal.distributed.fake_pg, what torchtitan's comm.mode=fake_backend uses: every
collective returns at once and carries nothing), the model on the meta device (shapes, no memory),
and the run's own code: the torchrun environment read by distenv.init_env, the strategy's own
wrapping (fully_shard, the pipeline stage, DDP). What a rank of 64 GPUs would hold is then read
from its real shards (FSDP2's DTensor local shapes) and its stage, not from arithmetic, and set
beside bench/memory.py's estimate. `bench run --dry-run` of a multi-process cell rehearses rank 0:
the busiest, as torch.chunk gives the first ranks the larger shards, and rank 0 evaluates.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch

from .config import RunConfig

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "TORCHELASTIC_RUN_ID")


@dataclass
class Rehearsal:
    """What one rank of the run would be and hold."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node: int
    device: str  # the device a real run of this rank would use
    params_local: int  # parameters this rank holds: its shards, its stage, or all of them
    params_total: int
    shards: list[tuple[int, int]] = field(default_factory=list)  # per optimised parameter: (global, local)
    stages: tuple[tuple[int, tuple[int, int]], ...] = ()  # pipeline: every stage it holds, (index, [start, end))

    @property
    def stage_blocks(self) -> tuple[int, int] | None:
        """Pipeline: [start, end) blocks of this rank's (first) stage."""
        return self.stages[0][1] if self.stages else None

    @property
    def weights_bytes(self) -> int:
        """Parameters, gradients and AdamW's two moments of what this rank holds, fp32: 16 B each."""
        return 16 * self.params_local


@contextlib.contextmanager
def _torchrun_environment(rank: int, world: int, per_node: int, nodes: int):
    """The variables torchrun gives rank `rank`, set for the rehearsal and put back after it."""
    values = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank % per_node, "LOCAL_WORLD_SIZE": per_node,
              "GROUP_RANK": rank // per_node, "GROUP_WORLD_SIZE": nodes, "TORCHELASTIC_RUN_ID": "rehearsal"}
    before = {k: os.environ.get(k) for k in TORCHRUN_VARS}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rehearse(cfg: RunConfig, rank: int = 0, device_type: str = "cpu") -> Rehearsal:
    """Rank `rank` of cfg's multi-process run, built in this process on the meta device."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from emotion_models.models import build_model

    from .distenv import init_env, local_device
    from .strategies import get_strategy

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process; rehearse in a fresh one")
    per_node = cfg.devices // cfg.nodes
    with _torchrun_environment(rank, cfg.devices, per_node, cfg.nodes):
        env = init_env(cfg, "cpu", backend="fake", store=FakeStore())
    try:
        model = build_model(cfg.model, size=cfg.model_size, dropout=cfg.dropout, device="meta")
        total = sum(p.numel() for p in model.parameters())
        plan = get_strategy(cfg.strategy).fn(model, env, cfg)
        shards = []
        for p in plan.parameters:
            local = p.to_local() if hasattr(p, "to_local") else p
            shards.append((p.numel(), local.numel()))
        held = ()
        if cfg.strategy == "pipeline":  # the stages the strategy gave this rank (interleaved: several)
            bounds = plan.info["stage_blocks"]
            held = tuple((s, tuple(bounds[s])) for s in plan.info["rank_stages"][str(env.rank)])
        return Rehearsal(env.rank, env.world_size, env.local_rank, env.local_world_size, rank // per_node,
                         str(local_device(device_type, env.local_rank)), sum(loc for _, loc in shards), total,
                         shards, held)
    finally:
        dist.destroy_process_group()


def estimated_weights_bytes(cfg: RunConfig, r: Rehearsal) -> int:
    """bench/memory.py's arithmetic for the rehearsed rank: its stage's parameters for a pipeline,
    the busiest device's otherwise (every rank's, for ddp; rank 0's shard, the largest, for fsdp)."""
    from . import memory

    if r.stages:
        per_block = memory._shape(cfg.model, cfg.model_size)[2]
        return 16 * sum(sum(per_block[a:b]) for _, (a, b) in r.stages)
    return memory.static_bytes(cfg)[0]


def text(cfg: RunConfig, r: Rehearsal) -> str:
    """One line: what the rehearsed rank holds, beside the arithmetic estimate."""
    gib = 2**30
    where = f"rank {r.rank} of {r.world_size} (node {r.node}, local rank {r.local_rank}, {r.device})"
    holds = f"{r.params_local / 1e6:,.1f} M of {r.params_total / 1e6:,.1f} M parameters"
    source = "its replica"
    if r.stages:
        holds += " (" + ", ".join(f"stage {s}: " + (f"blocks {a}-{b - 1}" if b - 1 > a else f"block {a}")
                                  for s, (a, b) in r.stages) + ")"
        source = "its stage" if len(r.stages) == 1 else "its stages"
    elif r.params_local < r.params_total:
        source = "its shards"
    return (f"rehearsed as {where} with torch's fake process group on the meta device: {holds}; params + grads + "
            f"AdamW {r.weights_bytes / gib:.2f} GiB from {source}, {estimated_weights_bytes(cfg, r) / gib:.2f} GiB "
            "by the estimate's arithmetic")
