"""Test-only fault hooks, off unless EMOTION_BENCH_FAULT is set. Every hook lives here.

    EMOTION_BENCH_FAULT=KIND:RANK:STEP   kill | raise | hang | oom | nan | grad | term | int | mark,
                                         on that rank at that optimiser step
    EMOTION_BENCH_FAULT=slow:PCT[:RANK]  every training step PCT % longer (on one rank, or all;
                                         RANK `solo`: only in a one-process run, WORLD_SIZE 1)
    EMOTION_BENCH_PROBE=DIR              record what the first step saw (dtypes, shards), see probe()

They let the tests exercise failure handling with real processes without editing code:
- kill: SIGKILL; raise: an exception; hang: a worker stuck (in the next collective);
- oom: torch.OutOfMemoryError, so CUDA's out-of-memory path is tested on CPU;
- nan: every parameter becomes NaN after that step, so the loss diverges from the next;
- grad: from that step on, that rank's gradients are zeroed before its optimiser step: a replica
  out of step with the others, as a lost all-reduce would leave it; the planted deviation that
  bench parity must catch;
- term/int: the process sends itself SIGTERM/SIGINT;
- mark: it creates the file $EMOTION_BENCH_MARK, for a test to wait on instead of sleeping;
- slow: busy-waits after each optimiser step for PCT % of the time since the previous one
  (measured, so it scales with the machine): a slowdown of known size, for the regression
  gate's power (benchmarks/gate_power.py), for a slow rank the others must wait for, and (solo)
  for a single-device run slower than any multi-process one, a planted winner for bench tune.
"""
from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "EMOTION_BENCH_FAULT"
PROBE_ENV = "EMOTION_BENCH_PROBE"  # a folder: what the first step saw, for tests (see probe)
KINDS = ("kill", "raise", "hang", "oom", "nan", "grad", "term", "int", "mark", "slow")


def parse(spec: str) -> tuple[str, list[str]]:
    kind, *rest = spec.split(":")
    if kind not in KINDS or (kind != "slow" and len(rest) != 2) or (kind == "slow" and len(rest) not in (1, 2)):
        raise ValueError(f"{FAULT_ENV}={spec!r}: use KIND:RANK:STEP (kind {', '.join(KINDS[:-1])}) or slow:PCT[:RANK|solo]")
    return kind, rest


def probe(rank: int, folder: str) -> None:
    """Record what the first training step saw, an oracle independent of the harness: per module
    class the dtype of its output and of its parameters during the forward (autocast, FSDP2's
    MixedPrecisionPolicy) and every output shape it gave (sequence parallel's shards), per optimised parameter its type and local and global element count
    (FSDP2's shards), a fixed projection of its gradients (synchronised or not), and how many
    graphs torch.compile captured (dynamo's own counter). Written
    to FOLDER/probe-rank<R>.json at the first optimiser step."""
    import json
    import sys
    from pathlib import Path

    import torch

    seen: dict[str, dict] = {}
    shapes: dict[str, set] = {}  # per module class, every output shape it gave (sequence parallel's shards)
    written: list = []

    def forward_hook(module, args, output):
        name = type(module).__name__.removeprefix("FSDP")  # fully_shard renames the class: FSDPBatchNorm2d
        out = output[0] if isinstance(output, tuple) else output
        # the last forward before the first optimiser step is the first training step's (FLOPs
        # are counted before it, on the meta device)
        if isinstance(out, torch.Tensor) and out.device.type != "meta":
            seen[name] = {"output": str(out.dtype),
                          "params": sorted({str(p.dtype) for p in module.parameters(recurse=False)})}
            # this rank's own part (a global hook runs before a module's own, which may make it local)
            shapes.setdefault(name, set()).add(tuple(out.to_local().shape if hasattr(out, "to_local") else out.shape))

    handle = torch.nn.modules.module.register_module_forward_hook(forward_hook)
    orig = torch.optim.AdamW.step
    reductions = _count_reductions(written)

    def first_step(self, *a, **k):
        if not written:
            params = [p for g in self.param_groups for p in g["params"]]
            local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
            dynamo = sys.modules.get("torch._dynamo.utils")  # imported only where something compiled
            grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
            record = {"modules": seen, "shapes": {k: sorted(map(list, v)) for k, v in shapes.items()},
                      "params": [{"type": type(p).__name__, "local": int(q.numel()),
                                                   "global": int(p.numel()), "dtype": str(q.dtype),
                                                   "shape": list(q.shape), "global_shape": list(p.shape)}
                                                  for p, q in zip(params, local)],
                      # a fixed projection of the gradients this rank steps with: equal on every rank
                      # where gradients are synchronised (ddp), not where they are not (independent)
                      "grad_projection": float(sum((g.detach().float().flatten()
                                                    * torch.cos(torch.arange(g.numel(), dtype=torch.float32))).sum()
                                                   for g in grads)),
                      "dynamo_graphs": int(dynamo.counters["stats"]["unique_graphs"]) if dynamo else 0,
                      "reductions": dict(reductions)}
            Path(folder, f"probe-rank{rank}.json").write_text(json.dumps(record))
            handle.remove()
            written.append(True)
        return orig(self, *a, **k)

    torch.optim.AdamW.step = first_step


def _count_reductions(done: list) -> dict[str, int]:
    """Gradient reductions until `done` is set (the probe's first optimiser step), counted where torch
    starts them: each DDP bucket its comm hook is handed, each FSDP2 group reduce (foreach_reduce).
    --grad-accum K must not multiply them: the micro-steps before the last hold gradients back."""
    import torch

    reductions = {"ddp_buckets": 0, "fsdp_reduces": 0}
    ddp_init = torch.nn.parallel.DistributedDataParallel.__init__

    def counting_init(self, *a, **k):
        ddp_init(self, *a, **k)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            if not done:
                reductions["ddp_buckets"] += 1
            return allreduce_hook(state, bucket)

        self.register_comm_hook(None, hook)

    torch.nn.parallel.DistributedDataParallel.__init__ = counting_init
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group

        fsdp_reduce = _fsdp_param_group.foreach_reduce

        def counting_reduce(*a, **k):
            if not done:
                reductions["fsdp_reduces"] += 1
            return fsdp_reduce(*a, **k)

        _fsdp_param_group.foreach_reduce = counting_reduce
    except (ImportError, AttributeError):  # another torch's layout: the count stays 0 and says nothing
        pass
    return reductions


def install(rank: int) -> None:
    """Arm the fault named by EMOTION_BENCH_FAULT on this rank, if any (and the probe)."""
    if os.environ.get(PROBE_ENV):
        probe(rank, os.environ[PROBE_ENV])
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, rest = parse(spec)
    import torch

    orig = torch.optim.AdamW.step
    if kind == "slow":
        solo = len(rest) == 2 and rest[1] == "solo"
        if len(rest) == 2 and not solo and int(rest[1]) != rank:
            return
        torch.optim.AdamW.step = _slowed(orig, float(rest[0]) / 100, _one_device if solo else None)
        return
    if int(rest[0]) != rank:
        return
    counter = {"n": 0}
    step = int(rest[1])

    def faulty(self, *a, **k):
        counter["n"] += 1
        if kind == "grad" and counter["n"] >= step:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.zero_()
            return orig(self, *a, **k)
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


RUN: dict = {"devices": None}  # bench ab's driver: the devices of the command it runs now (set_run_devices)


def set_run_devices(devices: int) -> None:
    """bench ab's driver runs every command in one job of N processes, a single-device one on rank 0
    alone: what `solo` reads there instead of WORLD_SIZE."""
    RUN["devices"] = devices


def _one_device() -> bool:
    return (RUN["devices"] or int(os.environ.get("WORLD_SIZE", "1"))) == 1


def _slowed(orig, fraction: float, when=None):
    last: dict = {"t": None, "recent": []}

    def slowed(self, *a, **k):
        out = orig(self, *a, **k)
        now = time.perf_counter()
        if when is not None and not when():
            last["t"] = None  # a run it does not slow; the next slowed step starts afresh
            return out
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
