"""Pipeline parallel (torch.distributed.pipelining): one stage per rank, micro-batches, GPipe or 1F1B."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from emotion_models.models import build_model, rebuild

from .. import control
from ..config import ConfigError
from . import Plan, register



def _schedule_class(name: str):
    """torch.distributed.pipelining's schedule (imported here, not at the top: bench list and every
    command that only names the strategies would pay half a second for it)."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]


def num_microbatches(cfg) -> int:
    return cfg.microbatches or 2 * cfg.devices


def _check(cfg, device_type):
    blocks = len(build_model(cfg.model, size=cfg.model_size, device="meta").blocks)
    if cfg.devices > blocks:
        raise ConfigError(f"--strategy pipeline --gpus {cfg.devices}: {cfg.model} has {blocks} blocks, "
                          f"so at most {blocks} stages")
    m = num_microbatches(cfg)
    if cfg.global_batch_size % m:
        raise ConfigError(f"global batch {cfg.global_batch_size} does not split into {m} micro-batches: "
                          "change --microbatches or --batch-size")
    if cfg.precision == "fp16":
        raise ConfigError("--strategy pipeline supports fp32 and bf16 (no GradScaler across pipeline stages)")


class _Contiguous(torch.nn.Module):
    def forward(self, x):
        return tuple(t.contiguous() for t in x) if isinstance(x, tuple) else x.contiguous()


@register("pipeline", order=50, multiprocess=True, check=_check,
          summary="torch.distributed.pipelining, one stage per rank from model.stages(N), --schedule gpipe|1f1b")
def pipeline(model, env, cfg) -> Plan:
    n, rank = env.world_size, env.rank
    bounds = model.stage_boundaries(n)
    first_block = bounds[rank][0]
    stage_module = model.stages(n)[rank]
    if rank < n - 1:
        stage_module.append(_Contiguous())  # gloo sends only contiguous tensors; no parameters, no state keys
    from torch.distributed.pipelining import PipelineStage

    stage = PipelineStage(stage_module, rank, n, env.device)
    m = num_microbatches(cfg)
    schedule = _schedule_class(cfg.schedule)(stage, n_microbatches=m, loss_fn=F.cross_entropy)  # grads averaged over m

    zero = torch.zeros((), device=env.device)

    def step(x, y, precision):
        losses: list[torch.Tensor] = []
        with precision.autocast():
            if rank == 0 and rank == n - 1:
                schedule.step(x, target=y, losses=losses)
            elif rank == 0:
                schedule.step(x)
            elif rank == n - 1:
                schedule.step(target=y, losses=losses)
            else:
                schedule.step()
        return torch.stack(losses).mean() if losses else zero

    def eval_module():
        # every rank contributes its stage; rank 0 assembles the full model
        local = {f"blocks.{first_block + int(k.split('.', 1)[0])}.{k.split('.', 1)[1]}": v.detach().cpu()
                 for k, v in stage_module.state_dict().items()}
        gathered = control.gather_objects(local, env)
        if rank != 0:
            return None
        full = rebuild(model)
        full.load_state_dict({k: v for part in gathered for k, v in part.items()})
        return full.to(env.device)

    info = {"num_microbatches": m, "schedule": cfg.schedule, "microbatch_size": cfg.global_batch_size // m,
            "stage_blocks": [list(b) for b in bounds],
            # idle share of each stage's time under GPipe and 1F1B alike: (p - 1) / (m + p - 1)
            "bubble_fraction": (n - 1) / (m + n - 1)}
    # stages other than this rank's were built only for identical initialisation: free them
    for i, block in enumerate(model.blocks):
        if not bounds[rank][0] <= i < bounds[rank][1]:
            block.to("meta")
    return Plan(model=stage_module, input_device=env.device, step=step, shard_batch=False, loss_rank=n - 1,
                eval_module=eval_module, info=info)
