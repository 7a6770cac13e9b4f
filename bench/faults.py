"""Test-only fault hooks, off unless EMOTION_BENCH_FAULT is set. Every hook lives here.

    EMOTION_BENCH_FAULT=KIND:RANK:STEP   kill | raise | hang | oom | nan | term | int | mark,
                                         on that rank at that optimiser step
    EMOTION_BENCH_FAULT=slow:PCT[:RANK]  every training step PCT % longer (on one rank, or all)

They let the tests exercise failure handling with real processes (a worker killed by SIGKILL, a
worker raising, a worker hung in a collective, a device out of memory: torch.OutOfMemoryError,
so CUDA's out-of-memory path is tested on CPU; nan: every parameter becomes NaN after that step,
so the loss diverges from the next; term/int: the process sends itself SIGTERM/SIGINT; mark: it
creates the file $EMOTION_BENCH_MARK, for a test to wait on instead of sleeping) without editing
code. `slow` busy-waits after each
optimiser step for PCT % of the time since the previous one (measured, so it scales with the
machine): it plants a slowdown whose size is known, for the regression gate's power
(benchmarks/gate_power.py) and for a slow rank the others must wait for (the step breakdown).
"""
from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "EMOTION_BENCH_FAULT"
KINDS = ("kill", "raise", "hang", "oom", "nan", "term", "int", "mark", "slow")


def parse(spec: str) -> tuple[str, list[str]]:
    kind, *rest = spec.split(":")
    if kind not in KINDS or (kind != "slow" and len(rest) != 2) or (kind == "slow" and len(rest) not in (1, 2)):
        raise ValueError(f"{FAULT_ENV}={spec!r}: use KIND:RANK:STEP (kind {', '.join(KINDS[:-1])}) or slow:PCT[:RANK]")
    return kind, rest


def install(rank: int) -> None:
    """Arm the fault named by EMOTION_BENCH_FAULT on this rank, if any."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, rest = parse(spec)
    import torch

    orig = torch.optim.AdamW.step
    if kind == "slow":
        if len(rest) == 2 and int(rest[1]) != rank:
            return
        torch.optim.AdamW.step = _slowed(orig, float(rest[0]) / 100)
        return
    if int(rest[0]) != rank:
        return
    counter = {"n": 0}
    step = int(rest[1])

    def faulty(self, *a, **k):
        counter["n"] += 1
        if counter["n"] == step:
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                while True:
                    time.sleep(1)
            if kind in ("term", "int"):
                os.kill(os.getpid(), signal.SIGTERM if kind == "term" else signal.SIGINT)
            if kind == "mark":
                open(os.environ["EMOTION_BENCH_MARK"], "w").close()
                return orig(self, *a, **k)
            if kind == "oom":
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected on rank {rank} at step {step})")
            if kind == "nan":
                out = orig(self, *a, **k)
                with torch.no_grad():
                    for group in self.param_groups:
                        for p in group["params"]:
                            p.fill_(float("nan"))
                return out
            raise RuntimeError(f"injected fault on rank {rank} at step {step}")
        return orig(self, *a, **k)

    torch.optim.AdamW.step = faulty


def _slowed(orig, fraction: float):
    last: dict = {"t": None, "recent": []}

    def slowed(self, *a, **k):
        out = orig(self, *a, **k)
        now = time.perf_counter()
        if last["t"] is not None:
            step_s = now - last["t"]
            recent = last["recent"] = (last["recent"] + [step_s])[-9:]
            # an evaluation between epochs is not a step: no more than twice the recent median
            step_s = min(step_s, 2 * sorted(recent)[len(recent) // 2])
            until = now + fraction * step_s
            while time.perf_counter() < until:  # busy: a slower step, not an idle one
                pass
        last["t"] = time.perf_counter()
        return out

    return slowed
