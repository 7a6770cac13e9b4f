"""The regression gate's power and false-alarm rate on this machine, with the CI settings.

    python benchmarks/gate_power.py [--runs 10] [--base REV] [--cases slow,none,ddp-slow]

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

CASES = {"slow": ("10 % slower, every step", "slow:10"), "none": ("no change", None),
         "ddp-slow": ("10 % slower, ddp cell only", "slow:10:1")}


def throughput(md: str) -> dict[str, tuple[float, float, float]]:
    """Per cell of `bench ab --format md`: the throughput ratio's (change, low, high) in percent."""
    out = {}
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]  # past the header
    for line in rows:
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.match(r"([-+0-9.]+)% \[([-+0-9.]+), ([-+0-9.]+)\]", cols[1]) if len(cols) > 1 else None
        if not m:
            sys.exit(f"a gate row without a throughput interval: {line}")
        out[cols[0]] = tuple(map(float, m.groups()))
    return out


def gate(base: str, fault: str | None) -> tuple[bool, float, dict[str, tuple[float, float, float]]]:
    cmd = [sys.executable, "-m", "bench", "ab", base, "--format", "md"]
    if fault:
        cmd += ["--head-env", f"EMOTION_BENCH_FAULT={fault}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        sys.exit(f"bench ab failed: {proc.stderr.strip()}")
    cells = throughput(proc.stdout)
    if not cells:
        sys.exit(f"bench ab printed no throughput interval:\n{proc.stdout}")
    return proc.returncode == 1, seconds, cells


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--base", default="HEAD")
    ap.add_argument("--cases", default=",".join(CASES), help=f"which, comma-separated: {', '.join(CASES)}")
    args = ap.parse_args()
    picked = list(dict.fromkeys(args.cases.split(",")))  # each case once
    unknown = sorted(set(picked) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
    cases = [CASES[c] for c in picked]
    flagged = {name: 0 for name, _ in cases}
    seconds: dict[str, list[float]] = {name: [] for name, _ in cases}
    widths: dict[str, list[float]] = {name: [] for name, _ in cases}
    for i in range(args.runs):  # the cases interleaved, so a drift of the machine touches each alike
        for name, fault in cases:
            hit, s, cells = gate(args.base, fault)
            flagged[name] += hit
            seconds[name].append(s)
            widths[name] += [hi - lo for _, lo, hi in cells.values()]
            shown = "; ".join(f"{c} {r:+.1f} % [{lo:+.1f}, {hi:+.1f}]" for c, (r, lo, hi) in cells.items())
            print(f"{name}: run {i + 1}: {'regression' if hit else 'no regression'} in {s:.0f} s; "
                  f"throughput {shown}", flush=True)
    for name, _ in cases:
        print(f"== {name}: flagged {flagged[name]} of {args.runs}; median throughput interval width (every cell) "
              f"{statistics.median(widths[name]) if widths[name] else float('nan'):.1f} points; "
              f"median {statistics.median(seconds[name]):.0f} s per gate", flush=True)


if __name__ == "__main__":
    main()
