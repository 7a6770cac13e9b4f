"""Which of the gate's metrics keep a no-change gate from deciding, from the gates' own pair figures.

    python tools/studies/gate_metrics.py DIR [DIR ...]

Reads the gate records benchmarks/gate_power.py keeps (bench ab --json-out: every pair's figures)
and prints, per cell and metric, over all gates: the spread of the paired log ratios (its
standard deviation, as a percentage), the median half-width of the 95 % interval at the first look
and at the last, how often the metric was inconclusive at the first look, and the pairs the
equivalence test would need for a +-5 % band at a true ratio of 1 (the interval's half-width
t x sd / sqrt(k) under 5 %). A metric whose spread needs more pairs than the budget holds is the
one keeping gates going.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.ab import JUDGED, t975  # noqa: E402


def needed(sd: float, band: float = 0.05) -> int:
    k = 2
    while k < 10_000 and t975(k - 1) * sd / math.sqrt(k) >= math.log(1 + band):
        k += 1
    return k


def main(dirs: list[str]) -> None:
    gates = [json.loads(p.read_text()) for d in dirs for p in sorted(Path(d).rglob("*.json"))]
    gates = [g for g in gates if g.get("kind") == "gate" and g.get("pair_metrics")]
    if not gates:
        sys.exit("no gate records with pair figures (bench ab --json-out, benchmarks/gate_power.py)")
    print(f"{len(gates)} gates, {sum(len(g['pair_metrics']) for g in gates)} pairs; hardware "
          f"{', '.join(sorted({(g.get('fingerprint') or {}).get('hardware_id', '?') for g in gates}))}")
    cells = sorted({c for g in gates for pair in g["pair_metrics"] for c in pair["base"]})
    print(f"{'cell':<28} {'metric':<11} {'sd of log ratio (%)':>20} {'half-width 1st look (%)':>24} "
          f"{'last (%)':>9} {'undecided at 1st':>17} {'pairs for +-5 %':>16}")
    for cell in cells:
        for metric in JUDGED:
            sds, first, last, undecided = [], [], [], 0
            for g in gates:
                logs = [math.log(p["head"][cell][metric] / p["base"][cell][metric]) for p in g["pair_metrics"]
                        if cell in p["base"] and (p["base"][cell].get(metric) or 0) > 0
                        and (p["head"][cell].get(metric) or 0) > 0]
                if len(logs) < 3:
                    continue
                sds.append(statistics.stdev(logs))
                for verdicts, out in ((g.get("first_look") or [], first), (g["verdicts"], last)):
                    v = next((v for v in verdicts if v["cell"] == cell and v["metric"] == metric), None)
                    if v and v.get("smallest_visible") is not None:
                        out.append(v["smallest_visible"] * 100)
                        if verdicts is g.get("first_look") and v["verdict"] == "inconclusive":
                            undecided += 1
            if not sds:
                continue
            sd = statistics.median(sds)
            print(f"{cell:<28} {metric:<11} {sd * 100:>20.1f} "
                  f"{statistics.median(first) if first else float('nan'):>24.1f} "
                  f"{statistics.median(last) if last else float('nan'):>9.1f} {undecided:>10} of {len(gates):<4} "
                  f"{needed(sd):>16}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["results/gate_power"])
