"""Pipeline parallel (torch.distributed.pipelining): micro-batches through stages, one per rank (GPipe,
1F1B) or --stages-per-rank V of them, looped (rank r holds stages r, r + P, ...: interleaved 1F1B,
interleaved zero bubble). --pp P below --gpus N: N / P pipelines of P ranks on a pp x dp_replicate
mesh (pp outermost, as torchtitan's), each on its slice of the batch, every stage module wrapped in
DDP over its replicas (torch's PipelineStage holds DDP's gradient sync to the last micro-batch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from emotion_models.models import build_model, rebuild

from .. import control
from ..config import MULTI_STAGE, ConfigError
from . import Plan, register


def _schedule_class(name: str):
    """torch.distributed.pipelining's schedule (imported here, not at the top: bench list and every
    command that only names the strategies would pay half a second for it)."""
    from torch.distributed.pipelining import (Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                              ScheduleInterleavedZeroBubble)

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
            "zero-bubble": ScheduleInterleavedZeroBubble}[name]


def pipeline_degree(cfg) -> int:
    """P: ranks of one pipeline (--pp, else every device)."""
    return cfg.pp if cfg.pp > 1 else cfg.devices


def num_microbatches(cfg) -> int:
    return cfg.microbatches or 2 * pipeline_degree(cfg)


def stages_per_rank(cfg) -> int:
    return cfg.stages_per_rank if cfg.schedule in MULTI_STAGE else 1


def _check(cfg, device_type):
    blocks = len(build_model(cfg.model, size=cfg.model_size, device="meta").blocks)
    v, p = stages_per_rank(cfg), pipeline_degree(cfg)
    flag = f"--pp {p}" if p < cfg.devices else f"--gpus {cfg.devices}"
    if p * v > blocks:
        stages = f"{p} x {v} stages" if v > 1 else f"{p} stages"
        raise ConfigError(f"--strategy pipeline {flag}{f' --stages-per-rank {v}' if v > 1 else ''}: "
                          f"{stages}, but {cfg.model} has {blocks} blocks, so at most {blocks} stages")
    m, replicas = num_microbatches(cfg), cfg.devices // p
    if cfg.global_batch_size % (m * replicas):
        what = f"{replicas} pipelines x {m} micro-batches" if replicas > 1 else f"{m} micro-batches"
        raise ConfigError(f"global batch {cfg.global_batch_size} does not split into {what}: "
                          "change --microbatches or --batch-size")
    rounds = max(1, m // p)
    if cfg.schedule in MULTI_STAGE and m % rounds:
        raise ConfigError(f"--schedule {cfg.schedule}: {m} micro-batches are not a multiple of their rounds "
                          f"({rounds} = micro-batches // ranks), as torch's schedule needs: use a multiple of "
                          f"{flag}")
    if replicas > 1 and cfg.schedule == "zero-bubble":
        raise ConfigError(f"--schedule zero-bubble with --pp {p} below --gpus {cfg.devices}: its split backward does "
                          "not run under DDP; use interleaved-1f1b or 1f1b beside data parallel")
    if cfg.schedule == "zero-bubble" and cfg.compile:
        raise ConfigError("--schedule zero-bubble splits each backward into input and weight parts, which "
                          "torch.compile does not support: drop --compile or use interleaved-1f1b")
    if cfg.precision == "fp16":
        raise ConfigError("--strategy pipeline supports fp32 and bf16 (no GradScaler across pipeline stages)")
    if cfg.grad_accum > 1:
        raise ConfigError(f"--strategy pipeline --grad-accum {cfg.grad_accum}: the schedule accumulates over its "
                          "micro-batches already; raise --microbatches (and --batch-size) instead")


class _Contiguous(torch.nn.Module):
    def forward(self, x):
        return tuple(t.contiguous() for t in x) if isinstance(x, tuple) else x.contiguous()


@register("pipeline", order=50, multiprocess=True, check=_check,
          summary="torch.distributed.pipelining, stages from model.stages(N x V); --schedule gpipe, 1f1b, "
                  "interleaved-1f1b or zero-bubble")
def pipeline(model, env, cfg) -> Plan:
    from torch.distributed.pipelining import PipelineStage

    p, v = pipeline_degree(cfg), stages_per_rank(cfg)
    replicas = env.world_size // p
    rank, dp, group, dp_group = _mesh(env, p, replicas)  # rank: the pipeline's own (stage) rank
    total = p * v
    bounds = model.stage_boundaries(total)
    mine = list(range(rank, total, p))  # looped: stage s on rank s % p, so the last stage is on rank p - 1
    modules = model.stages(total)
    local = [modules[s] for s in mine]
    stages = [PipelineStage(module, s, total, env.device, group=group)
              for s, module in zip(mine, _stage_modules(local, mine, total, env, dp_group if replicas > 1 else None))]
    m = num_microbatches(cfg)
    kind = _schedule_class(cfg.schedule)
    # grads averaged over m either way (and over the replicas by DDP)
    schedule = (kind(stages, n_microbatches=m, loss_fn=F.cross_entropy) if cfg.schedule in MULTI_STAGE
                else kind(stages[0], n_microbatches=m, loss_fn=F.cross_entropy))
    held = torch.nn.ModuleList(local)  # what the optimiser steps: this rank's stages

    zero = torch.zeros((), device=env.device)

    def step(x, y, precision):
        losses: list[torch.Tensor] = []
        with precision.autocast():
            if rank == 0 and rank == p - 1:
                schedule.step(x, target=y, losses=losses)
            elif rank == 0:
                schedule.step(x)
            elif rank == p - 1:
                schedule.step(target=y, losses=losses)
            else:
                schedule.step()
        return torch.stack(losses).mean() if losses else zero

    def eval_module():
        # every rank of the first pipeline contributes its stages; rank 0 assembles the full model
        own = {f"blocks.{bounds[s][0] + int(k.split('.', 1)[0])}.{k.split('.', 1)[1]}": t.detach().cpu()
               for s, module in zip(mine, local) for k, t in module.state_dict().items()} if dp == 0 else {}
        gathered = control.gather_objects(own, env)
        if env.rank != 0:
            return None
        full = rebuild(model)
        full.load_state_dict({k: v for part in gathered for k, v in part.items()})
        return full.to(env.device)

    info = _info(cfg, bounds, p, replicas, env.world_size)
    # stages other than this rank's were built only for identical initialisation: free them
    held_blocks = {i for s in mine for i in range(*bounds[s])}
    for i, block in enumerate(model.blocks):
        if i not in held_blocks:
            block.to("meta")
    last = tuple(r for r in range(env.world_size) if r // replicas == p - 1)  # each pipeline's last stage
    return Plan(model=held, input_device=env.device, step=step, shard_batch=False,
                loss_rank=last if replicas > 1 else p - 1, eval_module=eval_module, info=info,
                data_slice=(dp, replicas) if replicas > 1 else None)


def _stage_modules(local: list, mine: list[int], total: int, env, dp_group) -> list:
    """This rank's stage modules as PipelineStage runs them: every stage but the last sends contiguous
    tensors (gloo needs them); beside data parallel (dp_group) each is a DDP module over its replicas."""
    for s, module in zip(mine, local):
        if s < total - 1:
            module.append(_Contiguous())  # no parameters, no state keys
    if dp_group is None:
        return local
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    # (init_sync: no broadcast under a rehearsal's fake group, whose meta parameters hold no data)
    return [DDP(module, device_ids=ids, process_group=dp_group, init_sync=env.backend != "fake") for module in local]


def _info(cfg, bounds, p: int, replicas: int, world: int) -> dict:
    """What the result records of the pipeline: schedule, micro-batches, each rank's stages, the bubble."""
    m, v, total = num_microbatches(cfg), stages_per_rank(cfg), len(bounds)
    return {"num_microbatches": m, "schedule": cfg.schedule, "microbatch_size": cfg.global_batch_size // (m * replicas),
            "stage_blocks": [list(b) for b in bounds], "stages_per_rank": v, "pipelines": replicas,
            "rank_stages": {str(r): list(range(r // replicas, total, p)) for r in range(world)},
            # idle share of each rank's time: (p - 1) / (m + p - 1) under GPipe and 1F1B alike, and
            # (p - 1) / (V m + p - 1) interleaved (Megatron's count: each of V chunks is 1/V of the
            # work); zero bubble fills the bubble with weight gradients, ideally to none: not counted
            "bubble_fraction": (None if cfg.schedule == "zero-bubble" else (p - 1) / (v * m + p - 1))}


def _mesh(env, p: int, replicas: int):
    """(this rank's stage rank, its pipeline's index, the pipeline's process group, the replicas' group):
    the default group for one pipeline; else a pp x dp_replicate mesh, pp outermost (rank = stage rank x
    replicas + pipeline index, as strategies.parallelism records the coordinates)."""
    if replicas == 1:
        return env.rank, 0, None, None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (p, replicas), mesh_dim_names=("pp", "dp_replicate"))
    return (mesh.get_local_rank("pp"), mesh.get_local_rank("dp_replicate"), mesh.get_group("pp"),
            mesh.get_group("dp_replicate"))
