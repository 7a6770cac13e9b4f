"""Test-only fault hooks, off unless EMOTION_BENCH_FAULT is set.

    EMOTION_BENCH_FAULT=KIND:RANK:STEP   kill | raise | hang | oom, on that rank at that optimiser step

oom raises the error a device out of memory raises (torch.OutOfMemoryError), so the handling of a
CUDA out-of-memory is tested on CPU.

They let the tests exercise failure handling with real processes (a worker killed by SIGKILL, a
worker raising, a worker hung in a collective) without editing code. Every hook lives here.
"""
from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "EMOTION_BENCH_FAULT"


def install(rank: int) -> None:
    """Arm the fault named by EMOTION_BENCH_FAULT on this rank, if any."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, fault_rank, step = spec.split(":")
    if int(fault_rank) != rank:
        return
    import torch

    counter = {"n": 0}
    orig = torch.optim.AdamW.step

    def faulty(self, *a, **k):
        counter["n"] += 1
        if counter["n"] == int(step):
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                while True:
                    time.sleep(1)
            if kind == "oom":
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected on rank {rank} at step {step})")
            raise RuntimeError(f"injected fault on rank {rank} at step {step}")
        return orig(self, *a, **k)

    torch.optim.AdamW.step = faulty
