"""The regression gate's power and false-alarm rate on this machine, with the CI settings.

    python benchmarks/gate_power.py [--runs 10] [--base REV] [--cases slow10,slow15,none] [--log DIR]

Runs `bench ab BASE` (BASE = HEAD by default, the head the working tree) --runs times per case,
the cases interleaved so that a drift of the machine touches each alike: a planted 10 % and 15 %
slowdown of every training step on the head side (EMOTION_BENCH_FAULT=slow:10 / slow:15, a
measured busy-wait), no change, and (ddp-slow) a 10 % slowdown of the ddp cell's rank 1 only.
Per case it prints how many gates read regression (flagged), inconclusive, and no change
(missed, for a planted slowdown; for no change, a regression is a false alarm), the median width
of the throughput interval and the time per gate. Every line also goes to DIR/<date>-<hardware
id>.log (default results/gate_power/), headed by the machine's fingerprint: the figures hold for
that machine type only. The bar: a planted 10 % flagged in at least 9 of 10, at most 1 false
alarm in 10, about 5 minutes a gate; where it cannot be had, inconclusive and never no change.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {"slow10": ("10 % slower, every step", "slow:10"), "slow15": ("15 % slower, every step", "slow:15"),
         "none": ("no change", None), "ddp-slow": ("10 % slower, ddp cell only", "slow:10:1")}
VERDICTS = {0: "no change", 1: "regression", 3: "inconclusive"}


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


def gate(base: str, fault: str | None) -> tuple[str, float, dict[str, tuple[float, float, float]]]:
    cmd = [sys.executable, "-m", "bench", "ab", base, "--format", "md"]
    if fault:
        cmd += ["--head-env", f"EMOTION_BENCH_FAULT={fault}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    if proc.returncode not in VERDICTS:
        sys.exit(f"bench ab failed: {proc.stderr.strip()}")
    cells = throughput(proc.stdout)
    if not cells:
        sys.exit(f"bench ab printed no throughput interval:\n{proc.stdout}")
    return VERDICTS[proc.returncode], seconds, cells


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--base", default="HEAD")
    ap.add_argument("--cases", default="slow10,slow15,none", help=f"which, comma-separated: {', '.join(CASES)}")
    ap.add_argument("--log", default=str(ROOT / "results" / "gate_power"), help="folder of the dated per-machine logs")
    args = ap.parse_args()
    picked = list(dict.fromkeys(args.cases.split(",")))  # each case once
    unknown = sorted(set(picked) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
    from bench.envinfo import fingerprint

    fp = fingerprint()
    log_path = Path(args.log) / f"{time.strftime('%Y-%m-%d')}-{fp['hardware_id']}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a")

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    say(f"# gate_power {time.strftime('%Y-%m-%d %H:%M')} on {fp['cpu_model']}, {fp['cpu_cores_logical']} cores, "
        f"hardware_id {fp['hardware_id']}, commit {fp['git'].get('commit')}; runs {args.runs}, cases {','.join(picked)}")
    cases = [(c, *CASES[c]) for c in picked]
    counts = {c: {v: 0 for v in VERDICTS.values()} for c in picked}
    seconds: dict[str, list[float]] = {c: [] for c in picked}
    widths: dict[str, list[float]] = {c: [] for c in picked}
    for i in range(args.runs):
        for key, name, fault in cases:
            verdict, s, cells = gate(args.base, fault)
            counts[key][verdict] += 1
            seconds[key].append(s)
            widths[key] += [hi - lo for _, lo, hi in cells.values()]
            shown = "; ".join(f"{c} {r:+.1f} % [{lo:+.1f}, {hi:+.1f}]" for c, (r, lo, hi) in cells.items())
            say(f"{name}: run {i + 1}: {verdict} in {s:.0f} s; throughput {shown}")
    for key, name, fault in cases:
        c = counts[key]
        wrong = "false alarms" if fault is None else "missed (no change)"
        flagged = c["regression"] if fault else c["no change"]
        say(f"== {name}: {'flagged' if fault else 'no change'} {flagged} of {args.runs}, inconclusive "
            f"{c['inconclusive']}, {wrong} {c['no change'] if fault else c['regression']}; median throughput "
            f"interval width (every cell) {statistics.median(widths[key]) if widths[key] else float('nan'):.1f} points; "
            f"median {statistics.median(seconds[key]):.0f} s per gate")
    log.close()
    print(f"log: {log_path}")


if __name__ == "__main__":
    main()
