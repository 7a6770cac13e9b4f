"""The distributed environment of one process: rank, world, device, backend."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError, RunConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None when there is no process group

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def resolve_device_type(cfg: RunConfig) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def thread_count(cfg: RunConfig, local_processes: int) -> tuple[int, str]:
    """Torch threads per process, and what decided it: --threads first, then a user's own
    OMP_NUM_THREADS, then the cores split between the processes of this machine (so workers do
    not oversubscribe)."""
    if cfg.threads:
        return cfg.threads, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = os.cpu_count() or 1
    return max(1, cores // local_processes), f"default: {cores} cores / {local_processes} process(es)"


def set_threads(cfg: RunConfig, local_processes: int) -> int:
    threads, _ = thread_count(cfg, local_processes)
    torch.set_num_threads(threads)
    return threads


def local_device(device_type: str, local_rank: int) -> torch.device:
    """The device of a node's local rank: cuda:<local rank>, or the CPU for every CPU worker."""
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def init_env(cfg: RunConfig, device_type: str, *, backend: str | None = None, store=None) -> DistEnv:
    """Join the process group when launched by torchrun; a plain process is rank 0 of 1.

    backend and store: another process group than the device's own (bench.rehearse passes torch's
    fake one, which communicates nothing)."""
    if not under_torchrun():
        return DistEnv(0, 1, 0, 1, torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu"), None)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    device = local_device(device_type, local_rank)
    if device_type == "cuda" and backend is None:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                              "lower --gpus or --nproc-per-node")
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    if not dist.is_initialized():
        if store is not None:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=cfg.timeout_s))
        else:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s),
                                    device_id=device if backend == "nccl" else None)
    return DistEnv(rank, world, local_rank, local_world, device, backend)
