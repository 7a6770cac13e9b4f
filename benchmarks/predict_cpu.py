"""bench predict checked against measurement on this machine: 2 CPU workers (gloo), 1 thread each.

    python benchmarks/predict_cpu.py [--model cnn] [--batch-size 32] [--steps 30] [--rounds 2]

Measures the links (bench comm, 2 workers), the single run (1 thread), fsdp at one worker (FSDP2's
own cost without communication; bench predict starts fsdp from it) and ddp, fsdp and pipeline
at 2 workers (profiled after the timed window, for the overlap factor), then predicts each
multi-worker cell from the single run, the model's sizes and the measured links, and prints
predicted against measured throughput with the error. Issue 10's bar: each within 15 %.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.comm import load
from bench.config import RunConfig
from bench.lifecycle import run
from bench.predict import Link, check
from bench.results import load_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "bench", "comm", "--gpus", "2", "--device", "cpu", "--max-bytes", "8M",
                        "--out", str(Path(out, "comm"))], check=True, capture_output=True)
        link = Link.measured(load(str(Path(out, "comm"))))
        print(f"link: {link.source}: alpha {link.alpha_us:.0f} us per hop, bus bandwidth {link.busbw_GBps:.2f} GB/s")
        base = RunConfig(model=args.model, batch_size=args.batch_size, epochs=100, max_steps=args.steps + 5,
                         warmup_steps=5, threads=1, eval_each_epoch=False, device="cpu", out_dir=str(Path(out, "runs")))
        results = []
        for r in range(args.rounds):
            for strategy, n in (("single", 1), ("fsdp", 1), ("ddp", 2), ("fsdp", 2), ("pipeline", 2)):
                outcome = run(base.replace(strategy=strategy, devices=n, seed=r, profile=strategy != "single"))
                if outcome.status != "ok":
                    sys.exit(f"{strategy} x{n}: {outcome.error}")
                results.append(load_result(outcome.path))
        rows = check(results, link, None)
    print(f"{'cell':28} {'measured':>10} {'predicted':>10} {'error':>8} {'overlap':>8}   (samples/s)")
    for c in sorted(rows, key=lambda c: c["strategy"]):
        print(f"{c['model']} {c['strategy']} x{c['devices']} b{c['batch']:<10} {c['measured']:10.1f} "
              f"{c['predicted']:10.1f} {c['error'] * 100:+7.1f}% {c['overlap']:8.2f}")
    worst = max(abs(c["error"]) for c in rows)
    print(f"largest error {worst * 100:.1f} % (issue 10's bar: 15 %)")


if __name__ == "__main__":
    main()
