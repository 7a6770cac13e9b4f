"""Precision as one object: its autocast context, its loss scaling and its optimiser step.

Decided once before the loop, so a step never asks which precision it runs in:

    with precision.autocast(): loss = ...
    precision.backward(loss); precision.step(optimizer)
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device, *, autocast: bool = True,
                 scaler_factory: Callable[[], object] | None = None):
        self.name = name
        self.dtype = DTYPES.get(name)
        # strategies that cast themselves (FSDP2's MixedPrecisionPolicy) say autocast=False
        self.autocast: Callable[[], contextlib.AbstractContextManager] = (
            functools.partial(torch.autocast, device.type, dtype=self.dtype) if self.dtype and autocast
            else contextlib.nullcontext)
        self.scaler = None
        if name == "fp16":
            self.scaler = scaler_factory() if scaler_factory else torch.amp.GradScaler(device.type)
        # fp16: the fused AdamW reads GradScaler's found_inf on the device; with the default
        # implementation GradScaler.step() calls .item() every step, a host sync in the timed
        # window. (FSDP2's ShardedGradScaler keeps its own path: DTensor parameters.)
        self.fused_optimizer = self.scaler is not None and scaler_factory is None and device.type == "cuda"
        if self.scaler is None:
            self.backward = torch.Tensor.backward
            self.step = lambda optimizer: optimizer.step()
        else:
            self.backward = lambda loss: self.scaler.scale(loss).backward()
            self.step = self._scaled_step

    def _scaled_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)
        self.scaler.update()

    def optimizer(self, params, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=self.fused_optimizer or None)
