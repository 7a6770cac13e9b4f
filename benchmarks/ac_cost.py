"""What activation checkpointing trades on this machine: peak memory against step time, per --ac mode.

    python benchmarks/ac_cost.py [--model transformer] [--batch-size 64] [--steps 20] [--rounds 3]
    python benchmarks/ac_cost.py --trade sp [--model transformer]

--trade sp measures sequence parallel the same way: tp x2 with it on and off (--no-sequence-parallel),
against off in the same run.

Runs `single` with --ac none, full and selective, each in a process of its own (so one run's
memory is not the next one's), the modes interleaved round by round so a drift of the machine
touches each alike, 1 thread, no evaluation between epochs. Per mode it prints the median over
rounds of the peak memory of the training steps (on a CPU the process's peak RSS, interpreter
and libraries included; on a GPU torch's peak allocated), the estimate's activations
(bench/memory.py), and the step time p50, each against --ac none in the same run: AC should
lower memory and cost about one more forward (x 4/3 for full, by the usual count).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

from bench.config import RunConfig
from bench.envinfo import fingerprint
from bench.lifecycle import run
from bench.results import load_result

MiB = 2**20
# per trade: its settings (the first is the reference) and the run each makes of the base config
TRADES = {"ac": (("none", "full", "selective"), lambda base, m: base.replace(ac=m)),
          "sp": (("off", "on"), lambda base, m: base.replace(strategy="tp", devices=2, sequence_parallel=m == "on"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="transformer")
    ap.add_argument("--model-size", default="base")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trade", choices=sorted(TRADES), default="ac", help="ac: --ac modes; sp: sequence parallel")
    args = ap.parse_args()
    modes, make = TRADES[args.trade]
    fp = fingerprint()
    print(f"# ac_cost on {fp['cpu_model']}, {fp['cpu_cores_logical']} cores, hardware_id {fp['hardware_id']}, "
          f"commit {fp['git'].get('commit')}: {args.model} ({args.model_size}) "
          f"{'single' if args.trade == 'ac' else 'tp x2'}, batch {args.batch_size}, "
          f"{args.steps} timed steps, {args.rounds} rounds, {args.device}")
    got: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as out:
        base = RunConfig(model=args.model, model_size=args.model_size, batch_size=args.batch_size, epochs=100,
                         max_steps=args.steps + 5, warmup_steps=5, threads=1, eval_each_epoch=False,
                         device=args.device, out_dir=out, size="small")
        for k in range(args.rounds):
            for mode in modes:
                outcome = run(make(base, mode).replace(run_id=f"{args.trade}-{mode}-{k}"), own_process=True)
                if outcome.status != "ok":
                    sys.exit(f"{args.trade} {mode}: {outcome.error}")
                r = load_result(outcome.path)
                mem = r["memory"]
                got[mode].append({"peak": mem["measured"]["training_bytes"],
                                  "acts": mem["estimate"]["activations_bytes"],
                                  "step": r["throughput"]["step_time_ms_p50"]})
                print(f"round {k + 1} {args.trade} {mode}: peak {got[mode][-1]['peak'] / MiB:.0f} MiB, "
                      f"step p50 {got[mode][-1]['step']:.1f} ms", flush=True)
    med = {m: {key: statistics.median(x[key] for x in got[m]) for key in ("peak", "acts", "step")} for m in modes}
    ref = med[modes[0]]
    print(f"{args.trade:<10} {'peak memory (MiB)':>18} {'vs ' + modes[0] + ' (MiB)':>14} "
          f"{'estimated activations (MiB)':>28} {'step p50 (ms)':>14} {'vs ' + modes[0]:>8}")
    for m in modes:
        v = med[m]
        print(f"{m:<10} {v['peak'] / MiB:>18.0f} {(v['peak'] - ref['peak']) / MiB:>+14.0f} {v['acts'] / MiB:>28.0f} "
              f"{v['step']:>14.1f} {v['step'] / ref['step']:>7.2f}x")


if __name__ == "__main__":
    main()
