"""The regression gate's power and false-alarm rate on this machine, with the CI settings.

    python benchmarks/gate_power.py [--runs 10] [--base REV]

Runs `bench ab BASE` (BASE = HEAD by default, the head the working tree) --runs times with a
planted 10 % slowdown of every training step on the head side (EMOTION_BENCH_FAULT=slow:10, a
measured busy-wait), --runs times with no change, and --runs times with a 10 % slowdown of the
ddp cell only (slow:10:1, rank 1: its peer waits, single is untouched, efficiency drops). Prints
how often each was flagged as a regression, the median width of the throughput interval, and the
time per gate. The issue's bar: the planted slowdown flagged in at least 9 of 10, no change in at
most 1 of 10, one gate within 5 minutes.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

CASES = [("10 % slower, every step", "slow:10"), ("no change", None), ("10 % slower, ddp cell only", "slow:10:1")]


def gate(base: str, fault: str | None) -> tuple[bool, float, list[float], str]:
    cmd = [sys.executable, "-m", "bench", "ab", base, "--format", "md"]
    if fault:
        cmd += ["--head-env", f"EMOTION_BENCH_FAULT={fault}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        sys.exit(f"bench ab failed: {proc.stderr.strip()}")
    widths = [float(hi) - float(lo) for lo, hi in re.findall(r"\[([-+0-9.]+), ([-+0-9.]+)\]", proc.stdout)[:1]]
    return proc.returncode == 1, seconds, widths, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--base", default="HEAD")
    args = ap.parse_args()
    for name, fault in CASES:
        flagged, seconds, widths = 0, [], []
        for i in range(args.runs):
            hit, s, w, out = gate(args.base, fault)
            flagged += hit
            seconds.append(s)
            widths += w
            print(f"{name}: run {i + 1}: {'regression' if hit else 'no regression'} in {s:.0f} s", flush=True)
        print(f"== {name}: flagged {flagged} of {args.runs}; median throughput interval width "
              f"{statistics.median(widths) if widths else float('nan'):.1f} points; "
              f"median {statistics.median(seconds):.0f} s per gate", flush=True)


if __name__ == "__main__":
    main()
