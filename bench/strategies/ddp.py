"""DistributedDataParallel: one process per device, each on its slice of the global batch."""
from __future__ import annotations

import contextlib

from torch.nn.parallel import DistributedDataParallel as DDP

from ..config import ConfigError
from . import Plan, register


def _check(cfg, device_type):
    if cfg.sync_bn and device_type != "cuda":
        # torch's SyncBatchNorm kernels are CUDA-only
        raise ConfigError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernels); drop it on CPU")


@register("ddp", order=30, multiprocess=True, check=_check,
          summary="DistributedDataParallel, DistributedSampler; NCCL on GPU, gloo on CPU")
def ddp(model, env, cfg) -> Plan:
    # init_sync broadcasts rank 0's parameters; a rehearsal's fake group (bench.rehearse) carries no
    # data, and its meta parameters have none to send
    wrapped = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                  init_sync=env.backend != "fake")
    # every replica holds the full model: rank 0 evaluates its own copy. --grad-accum: no_sync keeps
    # each micro-step's gradients local; the last micro-step's backward all-reduces their sum
    return Plan(model=wrapped, input_device=env.device, eval_module=lambda: model if env.is_main else None,
                sync=lambda last: contextlib.nullcontext() if last else wrapped.no_sync())
