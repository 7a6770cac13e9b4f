"""Synthetic generation + feature cache build speed, clips per second (issue 2 target: >= 200 on 2 cores).

    python benchmarks/data_speed.py [--size small]

Builds the cache into a fresh temp folder each repeat, so nothing is reused.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from emotion_models import load_synthetic
from emotion_models.synthetic import class_counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    n = sum(class_counts(args.size).values())
    rates = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            ds = load_synthetic(args.size, cache_dir=Path(d))
            dt = time.perf_counter() - t
            assert ds.features.shape[0] == n
        rates.append(n / dt)
        print(f"{n} clips (3 s crops from 4 s windows) in {dt:.1f} s: {n / dt:.0f} clips/s")
    print(f"median: {statistics.median(rates):.0f} clips/s on {os.cpu_count()} cores (target >= 200 clips/s)")


if __name__ == "__main__":
    main()
