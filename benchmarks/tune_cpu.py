"""Issue 25's check on this machine: the exhaustive sweep of a small space, then `bench tune` over
the same space, per model.

    python benchmarks/tune_cpu.py [--models cnn,transformer] [--budget 20m] [--out DIR] [--resume]

The space is the tune-cpu preset (bench/presets/tune-cpu.toml): single / ddp / fsdp / pipeline x2,
fp32 / bf16, batch 16 / 32 / 64, AC none / full, accumulation 1 / 2 (a pipeline without it), 5 warm-up
and 15 timed steps a cell, one thread per process. Per model it runs
`bench sweep --config tune-cpu --models M` (every cell once), then `bench tune --space tune-cpu
--model M`, and prints: the sweep's best cell and its samples/s; tune's pick and the pick's samples/s
in the sweep; their ratio against the noise (the spread of repeated windows of one candidate in
tune's own record, at least 5 %); the candidates tune measured (and its windows) against the sweep's
cells; both wall times. The bar: the pick is the sweep's best or within the noise of it, and tune
measures at most a third of the sweep's cells. Everything goes under DIR (default
results/tune_cpu/<date>-<hardware id>/), headed by the machine's fingerprint: a figure holds for one
machine type. Run it on an idle machine; it takes about an hour on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args: str) -> float:
    """Run `bench ARGS`; its wall time in seconds (exit 1 of this script if it fails)."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"bench {' '.join(args)} failed with exit {done.returncode}")
    return time.perf_counter() - t


def _sweep_figures(folder: Path) -> dict[str, float]:
    out = {}
    for path in folder.glob("*.json"):
        if path.name == "sweep.json":
            continue
        r = json.loads(path.read_text())
        if r.get("status") == "ok":
            out[r["run_id"]] = r["throughput"]["samples_per_s"]
    return out


def one_model(model: str, out: Path, budget: str, resume: bool) -> dict:
    again = ["--resume"] if resume else []
    sweep_s = _bench("sweep", "--config", "tune-cpu", "--models", model, "--out", str(out / "sweep"), *again)
    tune_s = _bench("tune", "--space", "tune-cpu", "--model", model, "--budget", budget, "--out", str(out / "tune"),
                    *again)
    swept = _sweep_figures(out / "sweep")
    rec = json.loads((out / "tune" / "tune.json").read_text())
    best = max(swept, key=swept.get)
    pick = rec["winner"]
    spreads = [(max(c["windows"]) - min(c["windows"])) / c["measured"] for c in rec["candidates"] if len(c["windows"]) > 1]
    noise = max([0.05, *spreads])
    ratio = swept.get(pick, float("nan")) / swept[best]
    return {"model": model, "sweep_cells": len(swept), "sweep_best": best, "sweep_best_samples_per_s": swept[best],
            "pick": pick, "pick_in_sweep_samples_per_s": swept.get(pick), "ratio": ratio, "noise": noise,
            "within_noise": ratio >= 1 - noise, "tune_measured": rec["measured"], "tune_windows": rec["windows"],
            "anchor_windows": rec.get("anchor_windows", 0), "third_met": rec["measured"] <= len(swept) / 3,
            "sweep_s": sweep_s, "tune_s": tune_s, "stopped": rec["stopped"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="cnn,transformer")
    ap.add_argument("--budget", default="20m")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", action="store_true", help="carry on in --out: finished cells and windows stay "
                    "(the wall times then count only what ran this time)")
    args = ap.parse_args()
    from bench.envinfo import fingerprint

    fp = fingerprint()
    out = Path(args.out or ROOT / "results" / "tune_cpu" / f"{time.strftime('%Y-%m-%d')}-{fp['hardware_id']}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        r = one_model(model, out / model, args.budget, args.resume)
        rows.append(r)
        print(f"{model}: sweep best {r['sweep_best']} {r['sweep_best_samples_per_s']:.1f} samples/s "
              f"({r['sweep_cells']} cells, {r['sweep_s']:.0f} s); tune's pick {r['pick']} "
              f"{r['pick_in_sweep_samples_per_s'] or float('nan'):.1f} samples/s in the sweep: {r['ratio']:.3f} of the "
              f"best (noise {r['noise']:.1%}: {'within' if r['within_noise'] else 'NOT within'}); tune measured "
              f"{r['tune_measured']} candidates in {r['tune_windows']} windows (+{r['anchor_windows']} anchor), "
              f"{'at most' if r['third_met'] else 'MORE than'} a third of the sweep's cells, {r['tune_s']:.0f} s; "
              f"stopped: {r['stopped']}")
    (out / "tune_cpu.json").write_text(json.dumps({"env": fp, "rows": rows}, indent=1))
    print(f"written: {out / 'tune_cpu.json'}")


if __name__ == "__main__":
    main()
