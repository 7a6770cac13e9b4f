"""Control messages between ranks: the finite-loss flag, what each rank measured, timing probes,
the pieces of an evaluation copy, barriers. Every tensor such a message travels in is made here.

The process group serves one kind of device: gloo the CPU, NCCL CUDA alone. A CPU tensor handed to
an NCCL group fails ("No backend type associated with device type cpu"), and on a GPU machine
every multi-process run would die at its first control message. So no other module calls a
torch.distributed collective on a tensor it built itself (tests/test_control.py reads the code of
bench/ for it): it asks this module, which puts the values on the device the group serves and
brings the answer back to the host. The payloads `bench comm` measures are the one exception:
they are made on the run's device by bench/comm.py `_op`, which is what it measures.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import torch
import torch.distributed as dist

from .distenv import DistEnv


def device(env: DistEnv) -> torch.device:
    """Where a control message's tensor must live for this run's process group."""
    return env.device if env.backend == "nccl" else torch.device("cpu")


def _tensor(values: Sequence[float] | torch.Tensor, env: DistEnv) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(device=device(env), dtype=torch.float64).flatten().clone()
    return torch.tensor(list(values), dtype=torch.float64, device=device(env))


def max_over_ranks(values: Sequence[float] | torch.Tensor, env: DistEnv) -> list[float]:
    """Element-wise maximum over ranks (each rank gives as many values)."""
    t = _tensor(values, env)
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def mean_over_ranks(values: Sequence[float] | torch.Tensor, env: DistEnv) -> list[float]:
    """Element-wise mean over ranks (gloo has no AVG: a sum, then a division)."""
    t = _tensor(values, env)
    if env.distributed:
        dist.all_reduce(t)
        t /= env.world_size
    return t.cpu().tolist()


def from_rank(values: Sequence[float] | torch.Tensor, src: int, env: DistEnv) -> list[float]:
    """Rank src's values on every rank (the others give as many values, which are replaced)."""
    t = _tensor(values, env)
    if env.distributed:
        dist.broadcast(t, src=src)
    return t.cpu().tolist()


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when it is true on one."""
    return max_over_ranks([1.0 if flag else 0.0], env)[0] > 0


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's picklable object, in rank order, on every rank ([obj] without a group). Object
    collectives pick their own device (the current CUDA device under NCCL, set by distenv)."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    """Every rank waits for the others (nothing without a group). NCCL's barrier runs on the device
    the group was bound to at init (distenv passes device_id)."""
    if env.distributed:
        dist.barrier()


def leave_group(code: int = 0) -> NoReturn:
    """Leave a rank of a gloo or NCCL group that is done with it: meet the peers at a barrier (a rank
    that tears down gloo while its peer still uses the connection makes the peer abort), destroy the
    process group, then bench.launch.worker_exit. For processes outside bench's own workers (tests,
    studies)."""
    from .launch import worker_exit

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    worker_exit(code)
