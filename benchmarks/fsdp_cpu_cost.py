"""Where FSDP2's step goes on CPU workers that fill the machine's cores (bench predict's weakest cell).

    python benchmarks/fsdp_cpu_cost.py [--model cnn] [--batch-size 32] [--steps 30] [--rounds 3] [--keep DIR]

`bench predict` charges fsdp, on top of its one-device step, its communication (all-gather and
reduce-scatter through the link figures), the contention of independent replicas (c_n) and the
slowest rank's wait (W). With the communication term alone it over-predicted fsdp x2 on this
2-core machine by about a quarter; this script shows why. It measures, with predict_cpu.py's
settings (benchmarks/common.py) (1 thread per worker, profiled after the timed window), single x1, fsdp x1 (FSDP2's
hooks, DTensor optimiser and copies without any communication) and fsdp x2, and prints per step,
from rank 0's trace:

- the timed step p50 of each;
- fsdp x1 - single: FSDP2's own cost without communication;
- fsdp x2 - fsdp x1, split into: the training thread's compute (aten ops), the optimiser, the busy
  time of gloo's threads (the collectives), and how much of that ran while the training thread
  computed (overlapped: on a machine with no spare core, the two share a core);
- what the collectives of that step should take by bench comm's fits (each collective's own kind
  and size) and the communication term bench predict charges (its all-reduce link, no overlap; without
  c_n and W, which this script does not measure separately).
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from bench.breakdown import intersect, merge, subtract, total
from bench.predict import Link, inputs_from, predict, t_all_reduce, t_gather
from bench.profiling import read_trace, trace_path
from common import arguments, base_config, measure_links, out_folder, run_cell  # benchmarks/common.py


def per_step(path: Path, comm: dict) -> dict[str, float]:
    """Medians over the profiled steps of rank 0, in ms."""
    n = comm["config"]["devices"]
    links = {kind: Link.measured(comm, kind) for kind in ("all_reduce", "all_gather", "reduce_scatter")}
    rows = []
    for s in read_trace(path):
        opt = merge(s.optimizer)
        compute = subtract(merge(s.compute), opt)
        busy = merge((c.start, c.end) for c in s.collectives)
        fitted = sum((t_all_reduce if c.kind == "all_reduce" else t_gather)(c.bytes, n, links[c.kind])
                     for c in s.collectives if c.kind in links)
        rows.append({"step": s.duration / 1000, "compute": total(compute) / 1000, "optimizer": total(opt) / 1000,
                     "comm busy": total(busy) / 1000, "comm during compute": total(intersect(busy, compute)) / 1000,
                     "comm by fits": fitted * 1000})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    args = arguments(__doc__)
    cells = (("single", 1), ("fsdp", 1), ("fsdp", 2))
    with out_folder(args) as out:
        comm = measure_links(str(Path(out, "comm")))
        base = base_config(args, str(Path(out, "runs")))
        results = {c: [run_cell(base, *c, seed=r, profile=True) for r in range(args.rounds)] for c in cells}
        prof = {c: [per_step(trace_path(base.out_dir, res["run_id"], 0), comm) for res in rs]
                for c, rs in results.items()}
    med = {c: statistics.median(r["throughput"]["step_time_ms_p50"] for r in rs) for c, rs in results.items()}
    prof = {c: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for c, ts in prof.items()}
    (inp,) = inputs_from([r for rs in results.values() for r in rs])
    inp = dataclasses.replace(inp, overlap=None, wait=None)  # the whole communication term, none hidden; no W
    predicted_comm = predict(inp, "fsdp", 2, 1, Link.measured(comm), None)["step_ms"] - inp.one_device["fsdp"] * 1000

    print(f"{args.model}, batch {args.batch_size} per worker, 1 thread per worker, {args.rounds} rounds (medians, ms per step)")
    print(f"{'':34}" + "".join(f"{f'{s} x{n}':>12}" for s, n in cells))
    print(f"{'timed step p50':34}" + "".join(f"{med[c]:12.1f}" for c in cells))
    for k in prof[cells[0]]:
        print(f"{'profiled ' + k:34}" + "".join(f"{prof[c][k]:12.1f}" for c in cells))
    one, two = prof[("fsdp", 1)], prof[("fsdp", 2)]
    print(f"\nfsdp x1 - single (FSDP2 without communication): {med[cells[1]] - med[cells[0]]:+.1f} ms timed step")
    print(f"fsdp x2 - fsdp x1: {med[cells[2]] - med[cells[1]]:+.1f} ms timed step; profiled: "
          f"compute {two['compute'] - one['compute']:+.1f}, optimizer {two['optimizer'] - one['optimizer']:+.1f}, "
          f"gloo threads busy {two['comm busy']:.1f} of which {two['comm during compute']:.1f} during compute")
    print(f"the same collectives by bench comm's fits: {two['comm by fits']:.1f} ms; "
          f"bench predict's fsdp communication term: {predicted_comm:.1f} ms")


if __name__ == "__main__":
    main()
