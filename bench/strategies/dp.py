"""torch.nn.DataParallel: one process scatters each batch over N GPUs (threads, not processes)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from . import Plan, register


def _check(cfg, device_type):
    if torch.cuda.device_count() < cfg.devices:
        raise ConfigError(f"--strategy dp --gpus {cfg.devices}: this machine has {torch.cuda.device_count()} GPU(s)")


@register("dp", multiprocess=False, needs_cuda=True, check=_check,
          summary="torch.nn.DataParallel: one process, batch scattered over N GPUs")
def dp(model, env, cfg) -> Plan:
    wrapped = nn.DataParallel(model, device_ids=list(range(cfg.devices)))
    return Plan(model=wrapped, input_device=torch.device("cuda", 0), eval_module=lambda: model)
