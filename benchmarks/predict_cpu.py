"""bench predict checked against measurement on this machine: 2 CPU workers (gloo), 1 thread each.

    python benchmarks/predict_cpu.py [--model cnn] [--tp-model transformer] [--batch-size 32] [--steps 30]
                                     [--rounds 3] [--keep DIR]
    python benchmarks/predict_cpu.py --from DIR

Measures the links (bench comm, 2 workers), the single run (1 thread), fsdp at one worker (FSDP2's
own cost without communication; bench predict starts fsdp from it), 2 independent replicas side
by side (the contention factor: what 2 workers lose to sharing 2 cores, no communication) and
ddp, fsdp and pipeline at 2 workers (profiled after the timed window, for the overlap o and wait W)
and, with --grad-accum 2, single (the accumulation anchor: a micro-step over a whole step, r_2), the
independent pair (r_2 where 2 workers contend, which bench predict takes before single's) and ddp; for --tp-model (a model with attention: cnn has none) its single run,
tp at one worker (DTensor's own cost without communication, as fsdp x1 is FSDP2's), tp-rank (one
rank of tp x2's shapes alone at twice the batch: the compute bench predict gives a tp rank), its
independent pair and tp x2 (profiled). Then it predicts each multi-worker cell from those inputs, the
model's sizes and the measured links, and prints predicted against measured throughput with the
error. The bar: each within 15 %, the error a user choosing a machine by the prediction can live
with. Each row also shows the prediction without the independent runs (c = 1) and without the
slowest rank's wait W, from the same measurements; a line gives tp's prediction by the FLOP share
with the tp-rank runs left out, another the prediction with bench comm's raw fits for tp's
collectives in place of its tp_ ones (the collectives as DTensor issues them), and a third the
prediction without bench comm's meeting cost of tp's collectives (what a call costs after compute
beyond back to back; where it has one, bench predict leaves W out of tp, the skew being in it). The
main table predicts from the medians over rounds. Below it each round is also predicted from its
own inputs alone, and each cell gets a verdict: within the bar in every round, outside it in every
round, or inconclusive, where this machine's rounds fall on both sides of it.

--no-contention leaves the independent runs out of the run altogether; --from DIR measures nothing
and reports on what an earlier --keep DIR kept (the runs docs/measurements/ quotes are under
results/predict_cpu/). Three rounds by default: one round of a cell can be 15 % off the other two
on this shared machine, and a median of three is not moved by one.

The cells' settings, the run of one cell and the link measurement are in benchmarks/common.py,
shared with fsdp_cpu_cost.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

from bench.cells import cell_label
from bench.comm import load
from bench.predict import Link, check, inputs_from, slowest_rank_wait_s
from bench.results import load_result
from common import arguments, base_config, measure_links, out_folder, run_cell  # benchmarks/common.py


BAR = 0.15  # the error a user choosing a machine by the prediction can live with


def _name(c: dict) -> str:
    """'cnn ddp x2', 'cnn ddp x2 ga2': a cell of this benchmark (two models, accumulation on one)."""
    return f"{c['model']} {cell_label(c, short=True)}" + (f" ga{c['grad_accum']}" if c.get("grad_accum", 1) > 1 else "")


def per_cell(results: list[dict], value) -> dict[str, list[float]]:
    """value(result) of every round, per cell, in run order; None left out."""
    seen: dict[str, list[float]] = {}
    for r in results:
        v = value(r)
        if v is not None:
            seen.setdefault(_name(r["config"]), []).append(v)
    return seen


def by_cell(results: list[dict], value) -> str:
    """value(result) per cell, median over rounds, as one line; cells where it is None left out."""
    return ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in per_cell(results, value).items())


def _key(c: dict) -> tuple:
    return c["model"], c["strategy"], c["devices"], c["grad_accum"]


def rank_skew_ms(r: dict) -> float | None:
    """The slowest rank's step p50 over the mean of each rank's own: where ranks never meet
    (independent), the jitter each meeting would pay."""
    own = [x.get("own_step_time_ms_p50") for x in r["utilization"]["per_rank"]]
    if len(own) < 2 or None in own:
        return None
    return r["throughput"]["step_time_ms_p50"] - statistics.mean(own)


def measure(args: argparse.Namespace, out: str) -> tuple[Link, list[dict]]:
    """The links and every cell's results, rounds in order."""
    link = Link.measured(measure_links(str(Path(out, "comm"))))
    base = base_config(args, str(Path(out, "runs")))
    tp = base.replace(model=args.tp_model)
    cells = ((base, "single", 1), (base, "fsdp", 1), (base, "independent", 2), (base, "ddp", 2), (base, "fsdp", 2),
             (base, "pipeline", 2), (base.replace(grad_accum=2), "single", 1), (base.replace(grad_accum=2), "independent", 2),
             (base.replace(grad_accum=2), "ddp", 2),
             (tp, "single", 1), (tp, "tp", 1), (tp.replace(strategy="tp-rank", tp=2, batch_size=2 * args.batch_size),
                                                 "tp-rank", 1), (tp, "independent", 2), (tp, "tp", 2))
    return link, [run_cell(cfg, strategy, n, r, profile=strategy in ("ddp", "fsdp", "pipeline", "tp") and cfg.grad_accum == 1)
                  for r in range(args.rounds) for cfg, strategy, n in cells
                  if not (args.no_contention and strategy == "independent")]


def kept(folder: str) -> tuple[Link, list[dict]]:
    """What an earlier --keep DIR holds: its link measurement and its results, in the order they ran."""
    runs = sorted(Path(folder, "runs").glob("*.json"))
    if not runs:
        sys.exit(f"--from {folder}: no results under {folder}/runs (make them with --keep {folder})")
    return Link.measured(load(str(Path(folder, "comm")))), [load_result(p) for p in runs]


def round_errors(results: list[dict], link: Link) -> dict[tuple, list[float]]:
    """Each round predicted from its own runs alone against its own measurement: per cell, the errors
    in run order. The runs of one round ran minutes apart, those of the medians up to an hour; the
    link (one bench comm before the rounds) is every round's."""
    errors: dict[tuple, list[float]] = {}
    for seed in sorted({r["config"]["seed"] for r in results}):
        for c in check([r for r in results if r["config"]["seed"] == seed], link, None):
            errors.setdefault(_key(c), []).append(c["error"])
    return errors


def verdict(errors: list[float], bar: float = BAR) -> str:
    """'within' where every round's error is within the bar, 'outside' where none is, else
    'inconclusive': this machine's rounds fall on both sides of it."""
    if not errors:
        raise ValueError("no round to give a verdict on")
    inside = [abs(e) <= bar for e in errors]
    return "within" if all(inside) else "outside" if not any(inside) else "inconclusive"


def profile_figures(results: list[dict]) -> None:
    """Per round, what the README reads from the profiles: CPU use, fsdp x2's slowest rank's compute
    over fsdp x1's, and the pipeline's stages."""
    def pct(values: list[float], fmt: str = "{:.0f}") -> str:
        return (fmt.format(min(values)) + " to " + fmt.format(max(values))) if values else "n/a"

    cpu = per_cell(results, lambda r: r["utilization"]["cpu_percent_mean"])
    print("CPU use (% of the machine, min to max over rounds): "
          + ", ".join(f"{cell} {pct(v)}" for cell, v in cpu.items()))
    one = {r["config"]["seed"]: r for r in results if cell_label(r["config"], short=True) == "fsdp x1" and r.get("breakdown")}
    grow = []
    for r in results:
        b = r.get("breakdown")
        if cell_label(r["config"], short=True) == "fsdp x2" and b and b.get("slowest_rank") is not None and r["config"]["seed"] in one:
            slowest = next(x for x in b["per_rank"] if x["rank"] == b["slowest_rank"])
            base = one[r["config"]["seed"]]["breakdown"]["per_rank"][0]["parts_ms"]["compute"]
            grow.append(f"{(slowest['parts_ms']['compute'] / base - 1) * 100:+.0f} %")
    print("fsdp x2's slowest rank's profiled compute over fsdp x1's, per round: " + (", ".join(grow) or "n/a"))
    pipe = [r["breakdown"]["per_rank"] for r in results if cell_label(r["config"], short=True) == "pipeline x2" and r.get("breakdown")]
    if pipe:
        total = [sum(x["parts_ms"]["compute"] for x in ranks) for ranks in pipe]
        print("pipeline x2 (profiled, ms per step, min to max over rounds): stage 0 compute "
              + pct([ranks[0]["parts_ms"]["compute"] for ranks in pipe]) + ", its share of both stages' compute "
              + pct([ranks[0]["parts_ms"]["compute"] / t * 100 for ranks, t in zip(pipe, total)]) + " %, stage 1 idle "
              + pct([ranks[-1]["parts_ms"]["idle"] for ranks in pipe]) + ", a rank's profiled step "
              + pct([x["step_ms"] for ranks in pipe for x in ranks]) + f"; both stages' compute, median {statistics.median(total):.0f}")


def main() -> None:
    args = arguments(__doc__, reports_kept=True)
    if args.source:
        link, results = kept(args.source)
    else:
        with out_folder(args) as out:
            link, results = measure(args, out)
    print(f"link: {link.source}: alpha {link.alpha_us:.0f} us per hop, bus bandwidth {link.busbw_GBps:.2f} GB/s"
          + ("; meeting cost a tensor-parallel call (bench comm, after compute): "
             + ", ".join(f"{op} {us / 1000:.2f} ms" for op, us in link.meet) if link.meet else ""))
    rows = check(results, link, None)
    plain = {_key(c): c for c in check([r for r in results if r["config"]["strategy"] != "independent"], link, None)}
    print(f"{'cell':24} {'measured':>9} {'predicted':>9} {'error':>7} {'overlap':>7} {'contention':>10} "
          f"{'wait W (ms)':>11} {'without c':>9} {'error':>7} {'without W':>9} {'error':>7}   (samples/s)")
    for c in sorted(rows, key=lambda c: (c["model"], c["strategy"], c["grad_accum"])):
        p = plain[_key(c)]
        samples = c["devices"] * c["batch"]
        no_w = samples / (samples / c["predicted"] - c["wait_ms"] / 1000)  # the model adds W to the step
        name = f"{c['model']} {c['strategy']} x{c['devices']} b{c['batch']}" + (f" ga{c['grad_accum']}" if c["grad_accum"] > 1 else "")
        print(f"{name:24} {c['measured']:9.1f} "
              f"{c['predicted']:9.1f} {c['error'] * 100:+6.1f}% {c['overlap']:7.2f} {c['contention']:10.2f} "
              f"{c['wait_ms']:11.1f} {p['predicted']:9.1f} {p['error'] * 100:+6.1f}% "
              f"{no_w:9.1f} {(no_w / c['measured'] - 1) * 100:+6.1f}%")
    print("tensor parallel's compute from: " + (", ".join(sorted({f"{c['model']} {c['strategy']} x{c['devices']}: "
                                                               f"{c['tp_compute']}" for c in rows if c.get("tp_compute")}))
                                                 or "no tensor-parallel cell"))
    for inp in inputs_from(results):
        for k, r in sorted((inp.accum or {}).items()):
            print(f"--grad-accum {k}: a micro-step of {inp.model} takes {r:.3f} x its whole single step "
                  f"(r_{k}: single --grad-accum {k}'s step over {k} x single's, medians over rounds)")
        for (n, k), r in sorted((inp.accum_at or {}).items()):
            print(f"--grad-accum {k} at {n} workers: a micro-step of {inp.model} takes {r:.3f} x a whole independent "
                  f"x{n} step (r_{k} where they contend: independent x{n} --grad-accum {k}'s step over {k} x "
                  f"independent x{n}'s, medians over rounds; bench predict's r_{k} at {n} workers)")
    flop = [c for c in check([r for r in results if r["config"]["strategy"] != "tp-rank"], link, None)
            if c.get("tp_compute") and any(x.get("tp_compute") == "tp-rank run" for x in rows)]
    for c in flop:  # the same runs, the tp-rank anchor left out
        print(f"by the FLOP share instead (tp-rank runs left out): {c['model']} {c['strategy']} x{c['devices']} "
              f"predicted {c['predicted']:.1f} samples/s, error {c['error'] * 100:+.1f}%")
    raw = dataclasses.replace(link, ops=tuple(o for o in link.ops if not o[0].startswith("tp_")))
    if raw != link:  # the same runs with tensor parallel's collectives at the raw fits
        for c in check(results, raw, None):
            if c.get("tp_compute"):
                print(f"with bench comm's raw fits for tp's collectives instead of its tp_ ones (no meeting cost, W "
                      f"back): {c['model']} "
                      f"{c['strategy']} x{c['devices']} predicted {c['predicted']:.1f} samples/s, error {c['error'] * 100:+.1f}%")
    if link.meet:  # the same runs without bench comm's meeting cost: the tp_ fits as measured back to back, and W
        for c in check(results, dataclasses.replace(link, meet=()), None):
            if c.get("tp_compute") and c["strategy"] == "tp":
                print(f"without the meeting cost (tp's collectives at the tp_ fits, W in its place): {c['model']} "
                      f"{c['strategy']} x{c['devices']} predicted {c['predicted']:.1f} samples/s, error {c['error'] * 100:+.1f}%")
    print("inputs (step time p50, ms; medians over rounds): "
          + by_cell(results, lambda r: r["throughput"]["step_time_ms_p50"]))
    rounds = per_cell(results, lambda r: r["throughput"]["step_time_ms_p50"])
    print("each round's step time p50 (ms): "
          + ", ".join(f"{k} " + " / ".join(f"{x:.1f}" for x in v) for k, v in rounds.items()))
    print("slowest rank's step p50 minus the ranks' own p50s (ms; medians over rounds): "
          + by_cell(results, rank_skew_ms))
    print("the slowest rank's wait inside collectives, W (profiled, in timed ms per step; medians over rounds): "
          + by_cell([r for r in results if r["config"]["strategy"] in ("ddp", "fsdp", "tp")],
                    lambda r: None if (w := slowest_rank_wait_s(r)) is None else w * 1000))
    print("where each measured multi-worker step went (profiled, ms per step, medians over rounds):")
    for cell in ("ddp x2", "fsdp x2", "pipeline x2", "tp x2"):
        parts = [r["breakdown"]["parts_ms"] for r in results if r.get("breakdown") and cell_label(r["config"], short=True) == cell]
        if parts:
            print(f"  {cell}: " + ", ".join(f"{k} {statistics.median(p[k] for p in parts):.1f}" for k in parts[0]))
    profile_figures(results)
    print("each round predicted from its own inputs alone (error per round, in run order; the verdict: within "
          "the bar in every round, outside in every round, or inconclusive where the rounds fall on both sides):")
    for key, errors in sorted(round_errors(results, link).items()):
        name = f"{key[0]} {key[1]} x{key[2]}" + (f" ga{key[3]}" if key[3] > 1 else "")
        print(f"  {name:24} " + " / ".join(f"{e * 100:+.1f}%" for e in errors) + f"   {verdict(errors)}")
    worst = max(abs(c["error"]) for c in rows)
    print(f"largest error {worst * 100:.1f} % (the bar: {BAR * 100:.0f} %), from the medians over rounds")


if __name__ == "__main__":
    main()
