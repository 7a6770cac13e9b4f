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
  fake x1  rank 0 of tp x2 alone on torch's fake process group at batch 64: DTensor's dispatch and
           copies at degree 2, every collective a no-op (shards cut from each rank's own weights,
           each reduce-scatter given its input's slice, so the values stay finite);
  fake x2  two of those side by side, never meeting; "meeting" is what they would have waited for
           each other had they met where tp x2's ranks do, at each communicating redistribute
           (meeting_ms). A run whose loss is not finite stops (other garbage is not looked for);
  tp x2    the real thing, batch 64 shared by 2 ranks.
It prints the slowest rank's median forward + backward and optimiser step (ms; for the fake pair, each
column the larger of the two processes', so "outside" need not be one rank's), and for tp the time
spent inside DTensor's redistribute_local_tensor (every tensor-parallel collective goes through it;
each call is waited for there, so the collective is timed whole) and the rest, "outside". Each tp x2
collective kind is listed with its calls a step and ms each: set them beside `bench comm`'s raw and
tp_ fits at that size. About 3 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _timed_redistribute(spent: dict, count: collections.Counter, fake: bool = False, marks: list | None = None):
    """Wrap DTensor's redistribute_local_tensor where torch looks it up (its module and the two that
    import it by name), each call waited for and timed per (placements, local shape). fake: on torch's
    fake process group a reduce-scatter leaves its output as allocated (garbage, NaN within a step);
    give it this rank's slice of its own partial input instead, as though that were already the sum
    (as the fake all-reduce leaves each rank's own), so the run computes on finite values (the copy
    falls inside the timed redistribute, not outside). marks: the start time of each call that
    communicates is appended to it (where tp x2's ranks meet; the local ones, R -> S, R -> P and a
    shard kept on its dim, are left out)."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    def communicates(current, target) -> bool:
        for was, now in zip(current.placements, target.placements):
            if isinstance(was, Partial) and not isinstance(now, Partial):
                return True  # all-reduce or reduce-scatter
            if isinstance(was, Shard) and (isinstance(now, Replicate) or (isinstance(now, Shard) and now.dim != was.dim)):
                return True  # all-gather or all-to-all
        return False

    import torch.distributed.tensor._api as api
    import torch.distributed.tensor._dispatch as dispatch
    import torch.distributed.tensor._redistribute as redistribute
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    original = redistribute.redistribute_local_tensor

    def timed(local, current, target, *args, **kwargs):
        start = time.perf_counter()
        if marks is not None and communicates(current, target):
            marks.append(start)
        out = original(local, current, target, *args, **kwargs)
        if isinstance(out, AsyncCollectiveTensor):
            out = out.wait()
        if fake:
            for was, now in zip(current.placements, target.placements):
                if isinstance(was, Partial) and isinstance(now, Shard):
                    out.copy_(local.narrow(now.dim, 0, out.size(now.dim)))
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

    if mode == "fake":  # rank 0 of tp x2 on its own fake group: DTensor at degree 2, no communication
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    spent: dict = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    marks: list[float] = []  # only the fake pair's meeting column reads them: the others time no check
    _timed_redistribute(spent, count, fake=mode == "fake", marks=marks if mode == "fake" else None)
    torch.manual_seed(0)
    m = build_model("transformer", size="base")
    if mode == "rank":
        tp.localize(m, 2, sequence=True)
    elif mode in ("tp", "fake"):
        if mode == "fake":  # each rank cuts its shards from its own whole weights: a fake group's scatter
            import functools  # from rank 0 moves nothing and leaves them as allocated

            import torch.distributed.tensor.parallel as tensor_parallel

            tensor_parallel.parallelize_module = functools.partial(tensor_parallel.parallelize_module,
                                                                   src_data_rank=None)
        tp.parallelize(m, init_device_mesh("cpu", (2 if mode == "fake" else world,)), sequence=True)
    batch = 64 if mode in ("rank", "fake") or (mode == "tp" and world == 2) else 32
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    params = list(m.parameters())
    x, y = m.example_input(batch, "cpu"), torch.randint(0, 7, (batch,))
    fb, step, inside, segments = [], [], [], []
    for i in range(14):
        if i == 4:
            spent.clear()
            count.clear()
        if world > 1 and mode != "fake":
            dist.barrier()
        before = sum(spent.values())
        t0 = time.perf_counter()
        marks.clear()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        if not torch.isfinite(loss):
            raise SystemExit(f"{mode} x{world}: the loss is {loss.item()} at step {i + 1}; its timing would not be "
                             "of finite arithmetic")
        if mode in ("tp", "fake"):
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
            edges = [t0, *marks, t1]
            segments.append([(b - a) * 1000 for a, b in zip(edges, edges[1:])])
    mine = torch.tensor([statistics.median(fb), statistics.median(step), statistics.median(inside)])
    if mode == "fake":  # the fake groups' processes never meet: each writes its own, the caller takes the slowest
        Path(f"{out}.{rank}").write_text(json.dumps({"parts": mine.tolist(), "segments": segments}))
        dist.destroy_process_group()
        return
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


def meeting_ms(a: list[list[float]], b: list[list[float]]) -> float:
    """What two fake-group ranks, side by side but never meeting, would have waited for each other had
    they met where tp x2's ranks do (each communicating redistribute's start): per step, the sum over its segments of
    the longer of the two ranks' segment less each rank's own whole, averaged over the two ranks; the
    median over steps (ms). The arrival skew a real pair pays on top of the collectives' own time."""
    per_step = []
    for x, y in zip(a, b):
        if len(x) != len(y):
            continue  # not the same step's structure: nothing to pair
        met = sum(max(p, q) for p, q in zip(x, y))
        per_step.append(met - (sum(x) + sum(y)) / 2)
    return statistics.median(per_step) if per_step else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import tempfile

    port = 29850
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            print(f"round {r + 1}")
            for mode, world in (("full", 1), ("tp", 1), ("rank", 1), ("rank", 2), ("fake", 1), ("fake", 2),
                                ("tp", 2)):
                port += 1
                out = str(Path(tmp, f"{r}-{mode}-{world}.txt"))
                mp.spawn(work, args=(port, mode, world, out), nprocs=world)
                if mode == "fake":
                    mine = [json.loads(Path(f"{out}.{k}").read_text()) for k in range(world)]
                    fwd, opt_ms, ins = (max(v) for v in zip(*(x["parts"] for x in mine)))
                    line = (f"fake x{world}  forward+backward {fwd:6.1f}  optimiser {opt_ms:5.1f}  inside redistribute "
                            f"{ins:6.1f}  outside {fwd - ins:6.1f}")
                    if world == 2:
                        line += f"  meeting {meeting_ms(mine[0]['segments'], mine[1]['segments']):5.1f}"
                    print(line + "  (ms a step)", flush=True)
                else:
                    print(Path(out).read_text(), end="", flush=True)


if __name__ == "__main__":
    main()
