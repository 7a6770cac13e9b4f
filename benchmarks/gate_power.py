"""The regression gate's power and false-alarm rate on this machine, with the CI settings.

    python benchmarks/gate_power.py [--runs 10] [--base REV] [--cases slow10,slow15,none] [--log DIR]

Runs `bench ab BASE` (BASE = HEAD by default, the head the working tree) --runs times per case,
the cases interleaved so that a drift of the machine touches each alike: a planted 10 % and 15 %
slowdown of every training step on the head side (EMOTION_BENCH_FAULT=slow:10 / slow:15, a
measured busy-wait), no change, and (ddp-slow) a 10 % slowdown of the ddp cell's rank 1 only.
Per case it prints how many gates read regression (flagged), inconclusive, and no change
(missed, for a planted slowdown; for no change, a regression is a false alarm), the median width
of the throughput interval, the time per gate, and which metrics sent gates to a second look.
Each gate line shows every judged metric of every cell. Every line also goes to
DIR/<date>-<hardware id>.log (default results/gate_power/), headed by the machine's fingerprint:
the figures hold for that machine type only; each gate's JSON record (with every pair's figures,
for a study of the rule offline) goes beside it in DIR/<date>-<hardware id>/. The bar: a planted 10 % flagged in at least 9 of 10, at most 1 false
alarm in 10, about 5 minutes a gate; where it cannot be had, inconclusive and never no change.
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {"slow10": ("10 % slower, every step", "slow:10"), "slow15": ("15 % slower, every step", "slow:15"),
         "none": ("no change", None), "ddp-slow": ("10 % slower, ddp cell only", "slow:10:1")}
VERDICTS = {0: "no change", 1: "regression", 3: "inconclusive"}


def gate(base: str, fault: str | None, keep: Path) -> tuple[str, float, dict]:
    """One `bench ab BASE` gate; its verdict, seconds and JSON record (kept as `keep`)."""
    cmd = [sys.executable, "-m", "bench", "ab", base, "--json-out", str(keep)]
    if fault:
        cmd += ["--head-env", f"EMOTION_BENCH_FAULT={fault}"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _, err = proc.communicate()
    except BaseException:  # interrupted: bench ab takes its jobs and worktrees down on SIGTERM
        proc.terminate()
        proc.wait(120)
        raise
    seconds = time.perf_counter() - t
    if proc.returncode not in VERDICTS:
        sys.exit(f"bench ab failed: {err.strip()}")
    record = json.loads(keep.read_text())
    return VERDICTS[proc.returncode], seconds, record


def shown(verdicts: list[dict]) -> str:
    """Every judged metric of every cell: change [interval] verdict."""
    out = []
    for v in verdicts:
        if v["metric"] == "macro_f1" or v["ratio"] is None:
            continue
        out.append(f"{v['cell'].split(' ')[1]} {v['metric']} {(v['ratio'] - 1) * 100:+.1f} % "
                   f"[{(v['low'] - 1) * 100:+.1f}, {(v['high'] - 1) * 100:+.1f}] {v['verdict']}")
    return "; ".join(out)


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
    records = log_path.with_suffix("")  # each gate's JSON (every pair's figures), for a study of the rule
    records.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the running gate is taken down too
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
    kept_going: dict[str, dict[str, int]] = {c: {} for c in picked}  # metric -> gates it sent to a second look
    for i in range(args.runs):
        for key, name, fault in cases:
            keep = records / f"{time.strftime('%H%M%S')}-{key}-{i + 1}.json"
            verdict, s, record = gate(args.base, fault, keep)
            counts[key][verdict] += 1
            seconds[key].append(s)
            widths[key] += [(v["high"] - v["low"]) * 100 for v in record["verdicts"]
                            if v["metric"] == "throughput" and v["ratio"] is not None]
            say(f"{name}: run {i + 1}: {verdict} in {s:.0f} s, {record['pairs']} pairs, looks {record['looks']}; "
                f"{shown(record['verdicts'])}")
            if record.get("first_look"):
                undecided = [v for v in record["first_look"] if v["verdict"] == "inconclusive"]
                for v in undecided:
                    metric = f"{v['cell'].split(' ')[1]} {v['metric']}"
                    kept_going[key][metric] = kept_going[key].get(metric, 0) + 1
                say(f"  first look at {record['looks'][0]} pairs, inconclusive: {shown(undecided)}")
    for key, name, fault in cases:
        c = counts[key]
        wrong = "false alarms" if fault is None else "missed (no change)"
        flagged = c["regression"] if fault else c["no change"]
        say(f"== {name}: {'flagged' if fault else 'no change'} {flagged} of {args.runs}, inconclusive "
            f"{c['inconclusive']}, {wrong} {c['no change'] if fault else c['regression']}; median throughput "
            f"interval width (every cell) {statistics.median(widths[key]) if widths[key] else float('nan'):.1f} points; "
            f"median {statistics.median(seconds[key]):.0f} s per gate")
        if kept_going[key]:
            say("   second looks taken for: " + ", ".join(f"{m} ({n} of {args.runs})" for m, n in
                                                        sorted(kept_going[key].items(), key=lambda kv: -kv[1])))
    log.close()
    print(f"log: {log_path}")


if __name__ == "__main__":
    main()
