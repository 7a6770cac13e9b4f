"""Where FSDP2's step time goes on CPU workers that fill the machine's cores (issue 10's open miss).

    python benchmarks/fsdp_cpu_cost.py [--model cnn] [--batch-size 32] [--steps 30] [--rounds 2]

`bench predict` charges fsdp, on top of the single run's step, only its communication (all-gather
and reduce-scatter through the link figures). On this 2-core machine it over-predicts fsdp x2 by
about a quarter. This script measures, with the same settings as predict_cpu.py (1 thread per
worker, profiled after the timed window), single x1, fsdp x1 (FSDP2's hooks, DTensor optimiser and
copies without any communication) and fsdp x2, and prints per step, from rank 0's trace:

- the timed step p50 of each;
- fsdp x1 - single: FSDP2's own cost without communication;
- fsdp x2 - fsdp x1, split into: the training thread's compute (aten ops), the optimiser, the busy
  time of gloo's threads (the collectives), and how much of that ran while the training thread
  computed (overlapped: on a machine with no spare core, the two share a core).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.breakdown import intersect, merge, subtract, total
from bench.config import RunConfig
from bench.lifecycle import run
from bench.profiling import read_trace, trace_path
from bench.results import load_result


def per_step(path: Path) -> dict[str, float]:
    """Medians over the profiled steps of rank 0, in ms."""
    rows = []
    for s in read_trace(path):
        opt = merge(s.optimizer)
        compute = subtract(merge(s.compute), opt)
        comm = merge((c.start, c.end) for c in s.collectives)
        rows.append({"step": s.duration / 1000, "compute": total(compute) / 1000, "optimizer": total(opt) / 1000,
                     "comm busy": total(comm) / 1000, "comm during compute": total(intersect(comm, compute)) / 1000})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cells = (("single", 1), ("fsdp", 1), ("fsdp", 2))
    timed: dict[tuple, list[float]] = {c: [] for c in cells}
    traced: dict[tuple, list[dict]] = {c: [] for c in cells}
    with tempfile.TemporaryDirectory() as out:
        base = RunConfig(model=args.model, batch_size=args.batch_size, epochs=100, max_steps=args.steps + 5,
                         warmup_steps=5, threads=1, eval_each_epoch=False, device="cpu", out_dir=out, profile=True)
        for r in range(args.rounds):
            for strategy, n in cells:
                outcome = run(base.replace(strategy=strategy, devices=n, seed=r))
                if outcome.status != "ok":
                    sys.exit(f"{strategy} x{n}: {outcome.error}")
                res = load_result(outcome.path)
                timed[(strategy, n)].append(res["throughput"]["step_time_ms_p50"])
                traced[(strategy, n)].append(per_step(trace_path(out, res["run_id"], 0)))
    med = {c: statistics.median(v) for c, v in timed.items()}
    prof = {c: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for c, ts in traced.items()}
    print(f"{args.model}, batch {args.batch_size} per worker, 1 thread per worker, {args.rounds} rounds (medians, ms per step)")
    print(f"{'':28}" + "".join(f"{f'{s} x{n}':>12}" for s, n in cells))
    print(f"{'timed step p50':28}" + "".join(f"{med[c]:12.1f}" for c in cells))
    for k in prof[cells[0]]:
        print(f"{'profiled ' + k:28}" + "".join(f"{prof[c][k]:12.1f}" for c in cells))
    one, two = prof[("fsdp", 1)], prof[("fsdp", 2)]
    print(f"\nfsdp x1 - single (FSDP2 without communication): {med[cells[1]] - med[cells[0]]:+.1f} ms timed step")
    print(f"fsdp x2 - fsdp x1: {med[cells[2]] - med[cells[1]]:+.1f} ms timed step; profiled: "
          f"compute {two['compute'] - one['compute']:+.1f}, optimizer {two['optimizer'] - one['optimizer']:+.1f}, "
          f"gloo threads busy {two['comm busy']:.1f} of which {two['comm during compute']:.1f} during compute")


if __name__ == "__main__":
    main()
