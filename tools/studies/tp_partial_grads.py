"""What tensor parallel's optimiser step all-reduces, with the partial gradients left as backward
gives them and with them summed first (bench/strategies/tp.py reduce_partial_grads, what the tp
plan does): two gloo processes, the base transformer over tp x2 with sequence parallel, 4 AdamW
steps each way from the same seed and batches.

    python tools/studies/tp_partial_grads.py

Prints, each way, the all-reduces `torch.profiler` records in the last step's `opt.step()`
(events named gloo:all_reduce) and each step's milliseconds (profiled: the profiler's own cost is
in them), then the largest difference between the two ways' parameters after the 4 steps. Left
partial, DTensor all-reduces a gradient wherever AdamW reads it: 48 a step here, 3 for each of the
16 layer-norm parameters. About 30 s on 2 cores.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _steps(rank: int, summed_first: bool, mesh) -> tuple[int, list[float], dict]:
    from torch.distributed.tensor import DTensor

    from bench.strategies import tp
    from emotion_models.models import build_model

    torch.manual_seed(0)
    m = build_model("transformer", dropout=0.0)
    tp.parallelize(m, mesh, sequence=True)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    times, count = [], 0
    for _ in range(4):
        m(torch.randn(4, 64, 301, generator=g)).sum().backward()
        start = time.perf_counter()
        if summed_first:
            tp.reduce_partial_grads(list(m.parameters()))
        with torch.profiler.profile() as prof:
            opt.step()
        times.append((time.perf_counter() - start) * 1000)
        count = sum(e.name == "gloo:all_reduce" for e in prof.events())
        opt.zero_grad()
    return count, times, {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                          for k, v in m.state_dict().items()}


def work(rank: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    params = {}
    for summed_first in (False, True):
        count, times, params[summed_first] = _steps(rank, summed_first, mesh)
        if rank == 0:
            way = "summed first (the tp plan)" if summed_first else "left partial"
            print(f"{way}: {count} all-reduces in the last opt.step(); step ms (profiled) "
                  + ", ".join(f"{t:.0f}" for t in times), flush=True)
    if rank == 0:
        diff = max((params[False][k] - params[True][k]).abs().max().item() for k in params[False])
        print(f"largest parameter difference after 4 steps: {diff:.3g}", flush=True)
    from bench.control import leave_group

    leave_group()  # barrier, destroy_process_group, exit without interpreter finalisation


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.spawn(work, args=(free,), nprocs=2)
