"""What a gloo collective costs where a training step issues it, beside bench comm's tight loop: two
processes, one thread each, all-reduce the 2.36 MB buffer tensor parallel x2 all-reduces in the base
transformer (64 x 72 x 128 fp32), timed three ways:

    python tools/studies/meeting_probe.py [--rounds 3]

  tight            back to back, no barrier (both ranks arrive together, caches warm; bench comm
                   times its loop the same way, but as a mean and, for its tp_ ops, through DTensor);
  compute+barrier  after identical compute on both ranks (three 512 x 512 matmuls and a pass over
                   32 MB; its time is printed), then a barrier, so the ranks arrive together with
                   the caches cold;
  compute          the same compute and no barrier: the collective also holds the ranks' arrival
                   skew, as in a tensor-parallel step.

Median of 50 calls (10 left out first), the slower rank's; the compute's own median beside them.
About 30 s a round.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def work(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    x = torch.randn(64, 72, 128)
    a, big = torch.randn(512, 512), torch.randn(8_000_000)

    def compute() -> None:
        for _ in range(3):
            a @ a
        big.mul_(1.0001)

    medians, spent = [], []
    for mode in ("tight", "compute+barrier", "compute"):
        took = []
        for _ in range(60):
            if mode != "tight":
                begin = time.perf_counter()
                compute()
                spent.append(time.perf_counter() - begin)
            if mode == "compute+barrier":
                dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            took.append(time.perf_counter() - start)
        medians.append(statistics.median(took[10:]) * 1000)
    mine = torch.tensor([*medians, statistics.median(spent) * 1000])
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    if rank == 0:
        print("  ".join(f"{mode} {ms:.2f} ms" for mode, ms in zip(("tight", "compute+barrier", "compute", "(the compute itself)"),
                                                                  mine.tolist())), flush=True)
    from bench.control import leave_group

    leave_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for r in range(args.rounds):
        mp.spawn(work, args=(29870 + r,), nprocs=2)


if __name__ == "__main__":
    main()
