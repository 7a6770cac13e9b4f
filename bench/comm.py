"""`bench comm`: the links, measured, in the manner of nccl-tests, through torch.distributed on the
same launcher as `bench run` (NCCL on GPU, gloo on CPU; one node or many).

For each collective (all-reduce, all-gather, reduce-scatter, broadcast, send/recv in a ring; and
tensor parallel's three as DTensor issues them, tp_all_gather, tp_reduce_scatter, tp_all_reduce) and
each size from 1 KiB doubling up to --max-bytes (default 256 MiB, bounded by memory), warm-up
iterations are run and excluded, then timed iterations (as many as fit in about 0.2 s, at least
3); each size's time is the slowest rank's mean. Then, with nccl-tests' definitions:

    algbw = S / t        busbw = algbw x 2(n-1)/n (all-reduce), x (n-1)/n (all-gather,
                         reduce-scatter; S the whole buffer), x 1 (broadcast, send/recv)

and a fit of t = alpha + S / B per collective (latency alpha, bandwidth B as bus bandwidth) that
`bench predict` uses.

The tp_ collectives are the same all-gather, reduce-scatter and all-reduce through
`DTensor.redistribute` (Shard(1) to Replicate, Partial to Shard(1), Partial to Replicate) on a
(rows, 2n, 16) buffer sharded on dim 1, as tensor parallel's sequence shards are: they add what the
raw call leaves out and every tensor-parallel collective pays, DTensor's own Python, the wrapping
of the result and the copy that rearranges a gather or scatter off dim 0 (funcol's chunk and cat).
bench predict reads them for tensor parallel's collectives where they were measured
(Link.tensor_parallel). A tp_ size under 2 rows is skipped, and every point records the bytes its
buffer holds.

Each tp_ collective is also timed where a tensor-parallel step meets it (`meet`): after a compute
segment of about --meet-compute-ms (matmuls and a pass over memory, the same on every rank, no
barrier between), on a buffer of --meet-bytes (at most --max-bytes), each call timed. Its meeting
cost is what a call costs there beyond back to back: the mean call after compute, averaged over the
ranks (`_after_compute` says why that is what a step pays), less the mean call back to back, timed
the same way just before. On 2 gloo CPU workers (AMD EPYC) a 2 MiB call costs 0.5 to 2.0 ms more
after 3 ms of compute, 1.0 to 1.9 ms after 10 ms and 0.3 to 2.2 ms at the default 5 ms
(docs/measurements/tp-meeting-cost_2xcpu-epyc_20261206.md): the ranks' arrival skew and whatever a
cold collective pays. The default segment, 5 ms, is about tensor parallel x2's in the base
transformer (its compute over its 42 collectives a step: 6 ms). bench predict adds the cost to
every tensor-parallel collective (Link.tensor_parallel).

Rank 0 writes one JSON file (`<run_id>.comm.json`) and a plot beside it.
"""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from emotion_models.atomic import atomic_write_text

from . import control
from .breakdown import busbw_factor

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send_recv", "tp_all_gather", "tp_reduce_scatter",
       "tp_all_reduce")
TP_OPS = {"tp_all_gather": "all_gather", "tp_reduce_scatter": "reduce_scatter", "tp_all_reduce": "all_reduce"}
COMM_SCHEMA = 1


@dataclass(frozen=True, kw_only=True)
class CommConfig:
    ops: tuple[str, ...] = OPS
    min_bytes: int = 1024
    max_bytes: int = 256 * 2**20
    warmup: int = 2  # untimed iterations per size
    target_s: float = 0.2  # timed iterations per size: as many as fit in this, at least 3
    meet_bytes: int = 2 * 2**20  # the tp_ collectives' buffer where they are timed after compute
    meet_compute_ms: float = 5.0  # the compute segment before each of those calls (0: not measured)
    meet_iters: int = 60  # calls timed after compute, and as many back to back
    out: str = "results/comm"
    run_id: str = ""
    extra: dict = field(default_factory=dict)  # what the launcher knew: devices, nodes, device type


def sizes(cfg: CommConfig) -> list[int]:
    out, s = [], cfg.min_bytes
    while s <= cfg.max_bytes:
        out.append(s)
        s *= 2
    return out


def _tp_shape(nbytes: int, world: int) -> torch.Size:
    """The whole buffer of a tp_ collective of about nbytes: (rows, 2 world, 16) fp32, rows = nbytes over
    a row's 128 world bytes (rounded down)."""
    return torch.Size((nbytes // (4 * 2 * world * 16), 2 * world, 16))


def moved_bytes(kind: str, nbytes: int, world: int) -> int:
    """The bytes S of the whole buffer `_op` makes for a size of nbytes: nbytes rounded down to what
    the ranks split evenly (fp32 elements, a multiple of world; a tp_ buffer's whole rows); 0 where a
    tp_ buffer would have under 2 rows (with 1 the rearranging copy is a view, and not measured)."""
    if kind in TP_OPS:
        rows = _tp_shape(nbytes, world)[0]
        return 4 * _tp_shape(nbytes, world).numel() if rows >= 2 else 0
    n = max(nbytes // 4, world)
    return 4 * (n - n % world)


def _op(kind: str, nbytes: int, device: torch.device, rank: int, world: int):
    """A closure running one collective on a buffer of S = nbytes (the whole buffer), fp32, made on the
    run's device: the payload measured (every control message goes through bench/control.py)."""
    if kind in TP_OPS:
        return _tp_op(kind, nbytes, device, world)
    n = max(nbytes // 4, world)
    n -= n % world  # all-gather / reduce-scatter split the buffer evenly
    if kind == "all_reduce":
        x = torch.ones(n, device=device)
        return lambda: dist.all_reduce(x)
    if kind == "all_gather":
        out, mine = torch.empty(n, device=device), torch.ones(n // world, device=device)
        return lambda: dist.all_gather_into_tensor(out, mine)
    if kind == "reduce_scatter":
        whole, mine = torch.ones(n, device=device), torch.empty(n // world, device=device)
        return lambda: dist.reduce_scatter_tensor(mine, whole)
    if kind == "broadcast":
        x = torch.ones(n, device=device)
        return lambda: dist.broadcast(x, src=0)
    send, recv = torch.ones(n, device=device), torch.empty(n, device=device)

    def ring():  # every rank sends to the next and receives from the previous at once
        ops = [dist.P2POp(dist.isend, send, (rank + 1) % world), dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    return ring


def _tp_op(kind: str, nbytes: int, device: torch.device, world: int):
    """A closure running one of tensor parallel's collectives as DTensor issues it, waited for: the whole
    buffer (rows, 2 world, 16) fp32 of about nbytes, sharded on dim 1 (where a gather or scatter must
    rearrange: funcol works on dim 0)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh = _world_mesh(device.type, world)
    shape = _tp_shape(nbytes, world)
    start, target = {"tp_all_gather": (Shard(1), Replicate()), "tp_reduce_scatter": (Partial(), Shard(1)),
                     "tp_all_reduce": (Partial(), Replicate())}[kind]
    local = torch.ones(shape[0], 2, 16, device=device) if kind == "tp_all_gather" else torch.ones(shape, device=device)
    stride = (2 * world * 16, 16, 1)

    def run():
        out = DTensor.from_local(local, mesh, [start], run_check=False, shape=shape, stride=stride
                                 ).redistribute(mesh, [target]).to_local()
        return out.wait() if isinstance(out, AsyncCollectiveTensor) else out

    return run


@functools.cache
def _world_mesh(device_type: str, world: int):
    """The 1-D mesh over every rank (the default process group's)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world,))


def _sync(env) -> None:
    """Wait for the device's queued work (CUDA); a CPU's is done when the call returns."""
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


def _time(fn, env, warmup: int, target_s: float) -> float:
    """Mean seconds per call over the timed iterations, the same count on every rank."""
    for _ in range(warmup):
        fn()
    _sync(env)
    control.barrier(env)
    t = time.perf_counter()
    fn()
    _sync(env)
    probe_s = control.max_over_ranks([time.perf_counter() - t], env)[0]  # everyone agrees on the count
    iters = int(min(50, max(3, target_s / max(probe_s, 1e-6))))
    control.barrier(env)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(env)
    return control.max_over_ranks([(time.perf_counter() - t) / iters], env)[0]  # the slowest rank's time


def _compute_unit(device: torch.device):
    """A piece of training-like work: a 256 x 256 matmul and a pass over 4 MB."""
    a, big = torch.randn(256, 256, device=device), torch.randn(2**20, device=device)

    def unit() -> None:
        a @ a
        big.mul_(1.0000001)

    return unit


def _after_compute(fn, env, compute_ms: float, iters: int) -> dict:
    """One collective timed where a step meets it: a compute segment of about compute_ms (the same count
    of units on every rank), then the call, looped with no barrier between (each rank arrives with its
    own skew), each call timed on its own; and the same calls back to back (tight) just before. A
    step's period is one rank's compute plus its call, the same on both ranks, so the call averaged
    over the ranks is what a step pays beyond its compute: the early rank's holds its wait for the
    late one, the late one's none. Per rank the mean over iters and the median (which one descheduled
    call does not move), each averaged over the ranks, in microseconds; the compute's own median."""
    unit = _compute_unit(env.device)
    for _ in range(3):
        unit()
    _sync(env)
    t = time.perf_counter()
    for _ in range(5):
        unit()
    _sync(env)
    per = (time.perf_counter() - t) / 5
    reps = int(control.max_over_ranks([float(min(10_000, math.ceil(compute_ms / 1000 / max(per, 1e-7))))], env)[0])

    def timed(compute: bool) -> tuple[list[float], list[float]]:
        calls, spent = [], []
        control.barrier(env)
        for i in range(iters + 3):  # the first 3 left out: warm-up
            t = time.perf_counter()
            for _ in range(reps if compute else 0):
                unit()
            _sync(env)
            t1 = time.perf_counter()
            fn()
            _sync(env)
            if i >= 3:
                spent.append(t1 - t)
                calls.append(time.perf_counter() - t1)
        return calls, spent

    tight, _ = timed(False)
    calls, spent = timed(True)
    figures = control.mean_over_ranks([statistics.median(calls), statistics.fmean(calls), statistics.median(tight),
                                       statistics.fmean(tight), statistics.median(spent)], env)
    return {k: v * 1e6 for k, v in zip(("call_median_us", "call_mean_us", "tight_median_us", "tight_mean_us",
                                        "compute_us"), figures)} | {"iters": iters}


def meeting(raw: dict, fits: dict, world: int) -> dict:
    """Each tp_ collective's meeting cost (µs a call): its mean call after compute less its mean call back
    to back, the two timed the same way seconds apart (against the fit instead, the fit's own run-to-run
    noise of up to 2 ms at 2 MiB would be in it); signed (noise can make it negative), beside what it
    came from and the fit's time at that buffer."""
    out = {}
    for kind, m in raw.items():
        f = fits[kind]
        fit_us = f["alpha_us"] + (m["bytes"] * busbw_factor(TP_OPS[kind], world) / (f["busbw_GBps"] * 1e3)
                                  if f["busbw_GBps"] else 0.0)
        out[kind] = {**m, "fit_us": fit_us, "meet_us": m["call_mean_us"] - m["tight_mean_us"]}
    return out


def fit(points: list[dict]) -> dict:
    """t = alpha + S_bus / B over a collective's sizes, least squares on relative error (weights
    1/t^2), so small messages set the latency and large ones the bandwidth: alpha (µs) and B, the
    bus bandwidth (GB/s; S_bus = S x the busbw factor)."""
    xs = [p["bus_bytes"] for p in points]
    ys = [p["time_us"] for p in points]
    ws = [1 / y**2 for y in ys]
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / sw
    my = sum(w * y for w, y in zip(ws, ys)) / sw
    var = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / var if var else 0.0  # µs per bus byte
    return {"alpha_us": max(my - slope * mx, 0.0), "busbw_GBps": 1e-3 / slope if slope > 0 else None}


def measure(cfg: CommConfig, env) -> tuple[dict, dict]:
    """Every op's points; and each tp_ op timed after compute (`_after_compute`, at cfg.meet_bytes),
    right after its sizes."""
    results: dict[str, list[dict]] = {}
    after: dict[str, dict] = {}
    world = env.world_size
    for kind in cfg.ops:
        rows = []
        for size in sizes(cfg):
            nbytes = moved_bytes(kind, size, world)  # what the buffer holds, recorded as S
            if not nbytes:
                continue  # a tp_ buffer under 2 rows at this world size
            seconds = _time(_op(kind, size, env.device, env.rank, world), env, cfg.warmup, cfg.target_s)
            algbw = nbytes / seconds / 1e9
            factor = busbw_factor("send" if kind == "send_recv" else TP_OPS.get(kind, kind), world)
            rows.append({"bytes": nbytes, "time_us": seconds * 1e6, "algbw_GBps": algbw, "busbw_GBps": algbw * factor,
                         "bus_bytes": nbytes * factor})
        results[kind] = rows
        at = min(cfg.meet_bytes, cfg.max_bytes)  # within the sizes measured: the fit is not carried past them
        nbytes = moved_bytes(kind, at, world)
        if kind in TP_OPS and cfg.meet_compute_ms > 0 and nbytes:
            after[kind] = {"bytes": nbytes, "compute_ms_asked": cfg.meet_compute_ms,
                           **_after_compute(_op(kind, at, env.device, env.rank, world), env,
                                            cfg.meet_compute_ms, cfg.meet_iters)}
    return results, after


def worker_main(cfg: CommConfig) -> int:
    """Every torchrun worker of `bench comm`; rank 0 writes the result and the plot."""
    from .distenv import init_env, set_threads
    from .config import RunConfig
    from .envinfo import fingerprint

    device_type = "cuda" if torch.cuda.is_available() and cfg.extra.get("device_type") == "cuda" else "cpu"
    run_cfg = RunConfig(devices=int(os.environ["WORLD_SIZE"]), timeout_s=float(cfg.extra.get("timeout_s", 300)))
    set_threads(run_cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    env = init_env(run_cfg, device_type)
    points, after = measure(cfg, env)
    if env.is_main:
        fits = {k: fit(v) for k, v in points.items()}
        result = {"schema": COMM_SCHEMA, "kind": "comm", "run_id": cfg.run_id, "status": "ok",
                  "config": {"devices": env.world_size, "backend": env.backend, "device_type": device_type,
                             "nodes": int(os.environ.get("GROUP_WORLD_SIZE", "1")), "ops": list(cfg.ops),
                             "min_bytes": cfg.min_bytes, "max_bytes": cfg.max_bytes},
                  "env": fingerprint(), "ops": points, "fit": fits,
                  "meet": meeting({k: v for k, v in after.items() if points[k]}, fits, env.world_size)}
        path = Path(cfg.out) / f"{cfg.run_id}.comm.json"
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        plot(result, path.with_name(f"{cfg.run_id}.comm.png"))
    control.barrier(env)
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, rows in result["ops"].items():
        ax.plot([r["bytes"] for r in rows], [r["busbw_GBps"] for r in rows], marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size S (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    c = result["config"]
    ax.set_title(f"bench comm: {c['devices']} x {c['device_type']} ({c['backend']}), {c['nodes']} node(s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(path: str) -> dict:
    """A `bench comm` result file (or the newest in a folder)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.comm.json"), key=lambda q: q.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"{path}: no *.comm.json (run bench comm --out {path})")
        p = found[-1]
    data = json.loads(p.read_text())
    if data.get("kind") != "comm":
        raise ValueError(f"{p}: not a bench comm result")
    return data


def table(result: dict, device_type: str) -> tuple[str, list[str], list[list[str]], str]:
    """`bench comm`'s table, (title, header, rows, note): time, algbw and busbw of every collective
    and size; the note says how busbw comes from algbw."""
    title = f"bench comm: {result['config']['devices']} x {device_type} ({result['config']['backend']})"
    note = ("algbw = S / t; busbw = algbw x 2(n-1)/n all-reduce, x (n-1)/n all-gather/reduce-scatter, x 1 "
            "broadcast, send/recv (nccl-tests)")
    header = ["collective", "size S", "time (us)", "algbw (GB/s)", "busbw (GB/s)"]
    rows = [[kind, f"{r['bytes']:,}", f"{r['time_us']:.1f}", f"{r['algbw_GBps']:.3f}", f"{r['busbw_GBps']:.3f}"]
            for kind, points in result["ops"].items() for r in points]
    return title, header, rows, note


def fit_lines(result: dict) -> list[str]:
    """Each collective's fit in words: latency alpha and bus bandwidth."""
    lines = []
    for kind, f in result["fit"].items():
        bw = f"{f['busbw_GBps']:.2f} GB/s" if f["busbw_GBps"] else "n/a"
        lines.append(f"fit {kind}: latency alpha {f['alpha_us']:.1f} us, bus bandwidth {bw}")
    for kind, m in result.get("meet", {}).items():
        lines.append(f"{kind} after {m['compute_us'] / 1000:.1f} ms of compute ({m['bytes']:,} bytes): "
                     f"{m['call_mean_us']:.0f} us a call, back to back {m['tight_mean_us']:.0f} (medians {m['call_median_us']:.0f}, "
                     f"{m['tight_median_us']:.0f}; the fit {m['fit_us']:.0f}): meeting cost "
                     f"{m['meet_us']:+.0f} us a call (bench predict adds it to tensor parallel's collectives)")
    return lines
