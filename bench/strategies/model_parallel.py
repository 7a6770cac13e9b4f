"""Naive model parallel: stage i on GPU i, activations moved between them, no micro-batches."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from . import Plan, register


class _Staged(nn.Module):
    def __init__(self, stages: list[nn.Module], devices: list[torch.device]):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.devices = devices

    def forward(self, x):
        for stage, dev in zip(self.stages, self.devices):
            moved = tuple(t.to(dev, non_blocking=True) for t in x) if isinstance(x, tuple) else x.to(dev, non_blocking=True)
            x = stage(moved)
        return x.to(self.devices[0])  # logits back where the labels are


def _check(cfg, device_type):
    if torch.cuda.device_count() < cfg.devices:
        raise ConfigError(f"--strategy model-parallel --gpus {cfg.devices}: this machine has "
                          f"{torch.cuda.device_count()} GPU(s)")


@register("model-parallel", order=60, multiprocess=False, needs_cuda=True, check=_check,
          summary="naive split: stage i on GPU i, activations moved, no micro-batches")
def model_parallel(model, env, cfg) -> Plan:
    devices = [torch.device("cuda", i) for i in range(cfg.devices)]
    stages = model.stages(cfg.devices)
    for stage, dev in zip(stages, devices):
        stage.to(dev)
    staged = _Staged(stages, devices)
    return Plan(model=staged, input_device=devices[0], eval_module=lambda: staged, devices=devices,
                info={"stage_blocks": [list(b) for b in model.stage_boundaries(cfg.devices)]})
