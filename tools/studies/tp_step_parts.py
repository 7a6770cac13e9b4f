"""Where a tensor-parallel rank's step goes, without the profiler: the base transformer, tp x2 with
sequence parallel on two gloo processes, beside the runs bench predict builds it from, each on the
same machine in the same few seconds.

    python tools/studies/tp_step_parts.py [--rounds 3]

Each round trains 14 steps (the first 4 left out) of, in turn:
  full x1  the model alone at batch 32 (single);
  tp x1    tensor parallel over one process: DTensor's own cost, no communication (torch's
           redistribute takes its shortcut on a mesh of one);
  rank x1  one rank's shapes of tp x2 (bench/strategies/tp.py localize) alone at batch 64 (tp-rank);
  rank x2  two of those side by side: the contention of a tp rank's own work;
  tp x2    the real thing, batch 64 shared by 2 ranks.
It prints the slowest rank's median forward + backward and optimiser step (ms), and for tp the time
spent inside DTensor's redistribute_local_tensor (every tensor-parallel collective goes through it;
each call is waited for there, so the collective is timed whole) and the rest, "outside". Each tp x2
collective kind is listed with its calls a step and ms each: set them beside `bench comm`'s raw and
tp_ fits at that size. About 2 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _timed_redistribute(spent: dict, count: collections.Counter):
    """Wrap DTensor's redistribute_local_tensor where torch looks it up (its module and the two that
    import it by name), each call waited for and timed per (placements, local shape)."""
    import torch.distributed.tensor._api as api
    import torch.distributed.tensor._dispatch as dispatch
    import torch.distributed.tensor._redistribute as redistribute
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    original = redistribute.redistribute_local_tensor

    def timed(local, current, target, *args, **kwargs):
        start = time.perf_counter()
        out = original(local, current, target, *args, **kwargs)
        if isinstance(out, AsyncCollectiveTensor):
            out = out.wait()
        took = time.perf_counter() - start  # the key's formatting left out
        key = (f"{''.join(map(str, current.placements))} -> {''.join(map(str, target.placements))} "
               f"{tuple(local.shape)}")
        spent[key] += took
        count[key] += 1
        return out

    redistribute.redistribute_local_tensor = dispatch.redistribute_local_tensor = api.redistribute_local_tensor = timed


def work(rank: int, port: int, mode: str, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from bench.strategies import tp
    from emotion_models.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    spent: dict = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    _timed_redistribute(spent, count)
    torch.manual_seed(0)
    m = build_model("transformer", size="base")
    if mode == "rank":
        tp.localize(m, 2, sequence=True)
    elif mode == "tp":
        tp.parallelize(m, init_device_mesh("cpu", (world,)), sequence=True)
    batch = 64 if mode == "rank" or (mode == "tp" and world == 2) else 32
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    params = list(m.parameters())
    x, y = m.example_input(batch, "cpu"), torch.randint(0, 7, (batch,))
    fb, step, inside = [], [], []
    for i in range(14):
        if i == 4:
            spent.clear()
            count.clear()
        if world > 1:
            dist.barrier()
        before = sum(spent.values())
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        if mode == "tp":
            tp.reduce_partial_grads(params)
        t1 = time.perf_counter()
        during = sum(spent.values()) - before  # the optimiser's redistributes (none expected) left out
        opt.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        if i >= 4:
            fb.append((t1 - t0) * 1000)
            step.append((t2 - t1) * 1000)
            inside.append(during * 1000)
    mine = torch.tensor([statistics.median(fb), statistics.median(step), statistics.median(inside)])
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)  # the slowest rank's
    if rank == 0:
        fwd, opt_ms, ins = mine.tolist()
        line = f"{mode:4} x{world}  forward+backward {fwd:6.1f}  optimiser {opt_ms:5.1f}"
        if mode == "tp":
            line += f"  inside redistribute {ins:6.1f}  outside {fwd - ins:6.1f}"
        lines = [line + "  (ms a step)"]
        if mode == "tp" and world == 2:
            n = 10
            for k in sorted(spent, key=lambda k: -spent[k]):
                lines.append(f"      {k:40} {count[k] / n:4.0f} a step, {spent[k] / count[k] * 1000:6.2f} ms each")
        Path(out).write_text("\n".join(lines) + "\n")
    from bench.control import leave_group

    leave_group()  # barrier, destroy_process_group, exit without interpreter finalisation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import tempfile

    port = 29850
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            print(f"round {r + 1}")
            for mode, world in (("full", 1), ("tp", 1), ("rank", 1), ("rank", 2), ("tp", 2)):
                port += 1
                out = str(Path(tmp, f"{r}-{mode}-{world}.txt"))
                mp.spawn(work, args=(port, mode, world, out), nprocs=world)
                print(Path(out).read_text(), end="", flush=True)


if __name__ == "__main__":
    main()
