"""Weak-scaling efficiency on CPU: N workers of 1 thread against `single` with 1 thread.

    python benchmarks/scaling_cpu.py [--model cnn] [--strategies ddp,fsdp,pipeline] [--gpus 2]

Same per-device batch (weak scaling), same data, one process per "device" through torchrun
with gloo. efficiency = throughput(N) / (N x throughput(single)). The target for the
default CNN with ddp on 2 cores: >= 0.85. Alternates rounds so noise hits every cell alike.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

from bench.lifecycle import run
from bench.config import RunConfig
from bench.results import load_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--strategies", default="ddp,fsdp,pipeline")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    strategies = args.strategies.split(",")
    eff: dict[str, list[float]] = {s: [] for s in strategies}
    with tempfile.TemporaryDirectory() as out:
        base = RunConfig(model=args.model, batch_size=args.batch_size, epochs=100, max_steps=args.steps + 5,
                         warmup_steps=5, threads=1, eval_each_epoch=False, device="cpu", out_dir=out)
        for r in range(args.rounds):
            single = load_result(run(base.replace(seed=r)).path)["throughput"]["samples_per_s"]
            line = [f"round {r + 1}: single {single:.1f} samples/s"]
            for s in strategies:
                cfg = base.replace(strategy=s, devices=args.gpus, seed=r)
                thr = load_result(run(cfg).path)["throughput"]["samples_per_s"]
                eff[s].append(thr / (args.gpus * single))
                line.append(f"{s} {thr:.1f} samples/s (efficiency {eff[s][-1]:.2f})")
            print(", ".join(line))
    for s in strategies:
        print(f"{s}: weak-scaling efficiency at {args.gpus} workers x 1 thread, {args.model}, "
              f"batch {args.batch_size}/device: median {statistics.median(eff[s]):.2f}")


if __name__ == "__main__":
    main()
