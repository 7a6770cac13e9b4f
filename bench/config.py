"""Run configuration: one frozen, keyword-only dataclass; every field documented with its unit."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "fp16")
SCALINGS = ("weak", "strong")
SCHEDULES = ("gpipe", "1f1b")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A flag or combination that cannot run; the message is the one line users see."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    strategy: str = "single"  # registered strategy name (bench list)
    devices: int = 1  # devices in the whole run (--gpus/--devices); CPU worker processes without CUDA
    nodes: int = 1  # machines taking part (torchrun --nnodes)
    node_rank: int = 0  # this machine's index among nodes
    rdzv_endpoint: str | None = None  # HOST:PORT of the rendezvous, multi-node only
    model: str = "cnn"  # model zoo name
    model_size: str = "base"  # small | base | large
    dropout: float = 0.1  # model dropout probability
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler)
    compile: bool = False  # torch.compile each block before wrapping
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager compiles in seconds)
    batch_size: int = 32  # samples; per device with weak scaling, global with strong scaling
    scaling: str = "weak"  # weak (fixed per-device batch) | strong (fixed global batch)
    epochs: int = 8  # passes over the training split
    max_steps: int | None = None  # stop after this many optimiser steps (parity checks); None: all epochs
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 1e-2  # AdamW weight decay
    seed: int = 0  # model init, batch order and crops
    data_seed: int = 0  # synthetic data and the speaker split: the same for every run by default
    dataset: str = "synthetic"  # synthetic, or a folder of WAV files (Kaggle merge or original corpora)
    size: str = "small"  # synthetic size: tiny | small | medium | full | a clip count
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    warmup_steps: int = 5  # steps run before the timed window
    target_f1: float | None = None  # val macro-F1 whose first epoch reaching it is timed
    schedule: str = "1f1b"  # pipeline schedule: gpipe | 1f1b
    microbatches: int | None = None  # pipeline micro-batches per step; None: 2 x stages
    sync_bn: bool = False  # ddp: convert BatchNorm to SyncBatchNorm
    threads: int | None = None  # torch threads per process; None: cores / local processes
    timeout_s: float = 300.0  # seconds a collective may wait before the run is failed (hung peer)
    peak_tflops: float | None = None  # override the per-device peak used for MFU, TFLOP/s
    eval_each_epoch: bool = True  # val macro-F1 after every epoch (outside the timed window)
    save_params: str | None = None  # write the final full state dict here (bench parity)
    repeat: int = 0  # index of this repeat of a sweep cell (its seed differs per repeat)
    out_dir: str = "results/runs"  # where <run_id>.json goes
    run_id: str | None = None  # set by the launcher; derived when None

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.devices if self.scaling == "weak" else self.batch_size

    def validate(self) -> None:
        """Checks that need no hardware; strategy-specific checks live with the strategies."""
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision} is not one of {', '.join(PRECISIONS)}")
        if self.scaling not in SCALINGS:
            raise ConfigError(f"--scaling {self.scaling} is not one of {', '.join(SCALINGS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule} is not one of {', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device {self.device} is not one of {', '.join(DEVICES)}")
        for name in ("devices", "nodes", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.warmup_steps < 0:
            raise ConfigError("--warmup-steps must be 0 or more")
        if self.devices % self.nodes:
            raise ConfigError(f"--gpus {self.devices} does not divide over --nnodes {self.nodes}: "
                              "give the total device count, a multiple of the node count")
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        if self.scaling == "strong" and self.batch_size % self.devices:
            raise ConfigError(f"strong scaling splits --batch-size {self.batch_size} over {self.devices} devices: "
                              "use a multiple of the device count")
        if self.dataset != "synthetic" and not os.path.exists(self.dataset):
            raise ConfigError(f"--dataset {self.dataset}: no such folder; pass 'synthetic' or a folder of WAV files")
