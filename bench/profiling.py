"""A profiled window after the timed one (`bench run --profile`): a few steps under torch.profiler on
every rank, one Chrome trace per rank beside the result (`<run_id>.rank<R>.trace.json.gz`, opens
in Perfetto), and each trace read back into the timeline bench/breakdown.py divides up.

The timed figures are never measured under the profiler: these steps run after the timed window
and after the test evaluation, so neither throughput nor F1 changes with --profile.

What is read from a trace, per step (`emotion_bench.step` ranges on the training thread):
- CPU runs (gloo): aten ops on the training thread are compute; the gloo collectives are the
  `gloo:*` ranges on gloo's own threads (their real duration); their sizes come from the c10d ops
  that launched them (record_shapes).
- GPU runs: kernels on CUDA streams are compute, NCCL kernels communication, memcpy/memset
  copies, cudaLaunchKernel and friends the runtime; the optimizer is the kernels and copies the
  optimiser's range launched (tied by correlation id), where the device ran them. Collective sizes
  come from the c10d ops on any thread (DDP launches from autograd's thread on CUDA).
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import torch

from .breakdown import Collective, StepTrace, merge, subtract

STEP = "emotion_bench.step"
OPTIMIZER = "emotion_bench.optimizer"

_GLOO = {"all_reduce": "all_reduce", "allreduce": "all_reduce", "all_gather": "all_gather",
         "allgather": "all_gather", "reduce_scatter": "reduce_scatter", "reducescatter": "reduce_scatter",
         "broadcast": "broadcast", "send": "send", "recv": "recv"}
_C10D = [("allreduce", "all_reduce"), ("allgather", "all_gather"), ("all_gather", "all_gather"),
         ("reduce_scatter", "reduce_scatter"), ("broadcast", "broadcast"), ("send", "send"), ("recv", "recv")]
_NCCL = [("allreduce", "all_reduce"), ("allgather", "all_gather"), ("reducescatter", "reduce_scatter"),
         ("broadcast", "broadcast"), ("sendrecv", "send"), ("send", "send"), ("recv", "recv")]
_DTYPE_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
                "unsigned char": 1, "signed char": 1, "bool": 1}


def trace_path(out_dir: str, run_id: str, rank: int) -> Path:
    return Path(out_dir) / f"{run_id}.rank{rank}.trace.json.gz"


def run_profiled(steps: int, device: torch.device | list[torch.device], one_step, path: Path) -> None:
    """one_step(k) `steps` times under the profiler; the Chrome trace to path. device: the device, or
    every device the process computes on (dp, model-parallel)."""
    devices = [d for d in (device if isinstance(device, list) else [device]) if d.type == "cuda"]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if devices:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for k in range(steps):
            with torch.profiler.record_function(STEP):
                one_step(k)
                for d in devices:
                    torch.cuda.synchronize(d)  # each step's kernels inside its own range
    prof.export_chrome_trace(str(path))


def _kind(name: str, table: list[tuple[str, str]]) -> str | None:
    low = name.lower().replace("_", "")
    for key, kind in table:
        if key.replace("_", "") in low:
            return kind
    return None


def _bytes(event: dict) -> int:
    """S of a c10d launch, nccl-tests' "whole buffer": its largest tensor argument (all-gather's
    output, reduce-scatter's input, all-reduce's one tensor), a list of tensors summed."""

    def numel(shape) -> int:
        if shape and isinstance(shape[0], list):  # a list of tensors
            return sum(numel(s) for s in shape)
        n = 1
        for x in shape or [0]:
            n *= x if isinstance(x, int) else 0
        return n

    args = event.get("args", {})
    sizes = [numel(d) * _DTYPE_BYTES.get(str(t).replace("TensorList(", "").rstrip(")"), 4)
             for d, t in zip(args.get("Input Dims") or [], args.get("Input type") or [])]
    return max(sizes, default=0)


def _label(collectives: list[Collective], launches: list[tuple[float, str, int]]) -> None:
    """Kind and size of each collective from the c10d op that launched it, paired in start order
    (gloo runs them in the order they were launched). The launch knows better: gloo carries out a
    reduce-scatter as an all-reduce."""
    mine = sorted(collectives, key=lambda c: c.start)
    if len(mine) != len(launches):  # cannot pair: sizes per kind in order, kinds as executed
        for kind in {k for _, k, _ in launches}:
            sizes = [b for _, k, b in launches if k == kind]
            for c, size in zip((c for c in mine if c.kind == kind), sizes):
                c.bytes = size
        return
    for c, (_, kind, size) in zip(mine, launches):
        c.kind, c.bytes = kind, size


def _named(name: str, want: str) -> bool:
    """A range's name is `want`, or starts with it where `want` ends in '#' (ProfilerStep#12)."""
    return name.startswith(want) if want.endswith("#") else name == want


def read_trace(path: Path, step: str = STEP, optimizer: str = OPTIMIZER) -> list[StepTrace]:
    """The profiled steps of one rank's trace, as timelines relative to each step's start. `step` and
    `optimizer` name the ranges (record_function) of a step and of its optimiser step; a name ending
    in '#' matches by prefix, so a trace of torch's own schedule reads with "ProfilerStep#" and
    "Optimizer.step#".

    On a GPU the optimiser's part is its kernels and copies on the device, not its CPU range: the host
    runs ahead of the device, so the range and the work it launched rarely line up. Kernels are tied
    to the launches inside the range by their correlation id."""
    with gzip.open(path, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    step_ranges = sorted((e for e in events if _named(e["name"], step) and e.get("cat") == "user_annotation"),
                         key=lambda e: e["ts"])
    if not step_ranges:
        return []
    main = step_ranges[0]["tid"]
    opt_launched = _optimizer_launches(events, main, optimizer)
    return [_step_trace(st, events, main, optimizer, opt_launched) for st in step_ranges]


def _optimizer_launches(events: list[dict], main: int, optimizer: str) -> set:
    """What the optimiser launched: the correlation ids of CUDA runtime and driver calls on the
    training thread inside its ranges."""
    opt_ranges = [(e["ts"], e["ts"] + e["dur"]) for e in events
                  if _named(e["name"], optimizer) and e.get("cat") in ("user_annotation", None)]
    return {e["args"]["correlation"] for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
            and "correlation" in e.get("args", {}) and e["tid"] == main
            and any(a <= e["ts"] < b for a, b in opt_ranges)}


def _step_trace(st: dict, events: list[dict], main: int, optimizer: str, opt_launched: set) -> StepTrace:
    """One step's timeline from the events of the trace that start inside the step range `st`."""
    s, e = st["ts"], st["ts"] + st["dur"]
    # what starts inside the step, clipped to it: a gloo thread can note a collective's end a
    # little after the training thread, woken by it, has moved on
    inside = [x for x in events if s <= x["ts"] < e]
    rel = lambda x: (x["ts"] - s, min(x["ts"] + x["dur"], e) - s)  # noqa: E731
    step_trace = StepTrace(duration=st["dur"])
    launches: list[tuple[float, str, int]] = []  # (start, kind, bytes) of each c10d op
    blocked: list[tuple[float, float]] = []
    gpu = any(x.get("cat") == "kernel" for x in inside)
    for x in inside:
        cat, name = x.get("cat"), x["name"]
        from_optimizer = x.get("args", {}).get("correlation") in opt_launched
        if _named(name, optimizer) and cat in ("user_annotation", None):
            if not gpu:  # on a CPU the range is the work
                step_trace.optimizer.append(rel(x))
        elif cat == "cpu_op" and name.startswith("c10d::"):
            # any thread: on CUDA, DDP's reducer launches its all-reduce from autograd's thread
            kind = _kind(name[6:], _C10D)
            if kind:
                launches.append((x["ts"], kind, _bytes(x)))
        elif cat == "cpu_op" and x["tid"] == main and name.startswith("_c10d_functional::wait"):
            blocked.append(rel(x))
        elif cat == "cpu_op" and x["tid"] == main:
            if not gpu:
                step_trace.compute.append(rel(x))
        elif name.startswith("gloo:") and _GLOO.get(re.sub(r"[^a-z_]", "", name[5:].lower())):
            step_trace.collectives.append(Collective(_GLOO[re.sub(r"[^a-z_]", "", name[5:].lower())], *rel(x)))
        elif cat == "kernel" and "nccl" in name.lower():
            step_trace.collectives.append(Collective(_kind(name, _NCCL) or "all_reduce", *rel(x)))
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset") and from_optimizer:
            step_trace.optimizer.append(rel(x))
        elif cat == "kernel":
            step_trace.compute.append(rel(x))
        elif cat in ("gpu_memcpy", "gpu_memset"):
            step_trace.memcpy.append(rel(x))
        elif cat in ("cuda_runtime", "cuda_driver"):
            step_trace.runtime.append(rel(x))
    # DTensor's functional collectives (tensor parallel) block the training thread in wait_tensor,
    # inside the ops that called them: waiting on the collective, which the gloo thread's range
    # shows, not compute
    step_trace.compute = subtract(merge(step_trace.compute), merge(blocked))
    _label(step_trace.collectives, sorted(launches))
    return step_trace
