"""torch.nn.DataParallel: one process scatters each batch over N GPUs (threads, not processes)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from ..precision import DTYPES
from . import Plan, register


def _check(cfg, device_type):
    if torch.cuda.device_count() < cfg.devices:
        raise ConfigError(f"--strategy dp --gpus {cfg.devices}: this machine has {torch.cuda.device_count()} GPU(s)")
    if cfg.compile and cfg.devices > 1:
        # Module.compile stores torch.compile(self._call_impl), a method bound to the original module,
        # in its __dict__; DataParallel's replicas copy that __dict__, so every replica would run the
        # original's (cuda:0's) weights on its own GPU's inputs
        raise ConfigError(f"--strategy dp --compile --gpus {cfg.devices}: DataParallel's replicas would all run "
                          "cuda:0's compiled module; use --strategy ddp --compile (or dp without --compile)")


class CastInReplica(nn.Module):
    """Autocast entered by each replica itself, its dtype named.

    DataParallel runs every replica's forward in a thread of its own and enters autocast there
    again without a dtype (torch/nn/parallel/parallel_apply.py: `torch.amp.autocast(device_type,
    enabled=autocast_enabled)`). The autocast dtype is per thread and a new thread's is the
    default, fp16 on CUDA: without this wrapper the replicas of a bf16 run would compute in fp16,
    with no GradScaler. One GPU runs no threads, so one GPU cannot show it. Logits leave in fp32,
    as cross-entropy under autocast computes them.
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.device_type, self.dtype = device_type, dtype

    def forward(self, x):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(x).float()


@register("dp", order=20, multiprocess=False, needs_cuda=True, check=_check,
          summary="torch.nn.DataParallel: one process, batch scattered over N GPUs")
def dp(model, env, cfg) -> Plan:
    dtype = DTYPES.get(cfg.precision)
    inner = CastInReplica(model, "cuda", dtype) if dtype else model
    wrapped = nn.DataParallel(inner, device_ids=list(range(cfg.devices)))
    return Plan(model=wrapped, input_device=torch.device("cuda", 0), eval_module=lambda: model,
                devices=[torch.device("cuda", i) for i in range(cfg.devices)])
