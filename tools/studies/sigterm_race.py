"""How often a SIGTERM in a ddp run's timed window keeps the measured steps, with the CPU loaded.

    python tools/studies/sigterm_race.py [--runs 30] [--load 3]

Each run: `bench run --strategy ddp --gpus 2` on CPU, SIGTERM to the launcher once rank 0 reaches
step 6 (the `mark` fault hook), beside --load busy-loop processes. Counts the results that are
`interrupted` with their timed steps (`throughput.measured_steps`) and prints the error of any
that lost them. Before 5668794 a rank blocked in an all-reduce could lose them (2 of 26 here);
tests/test_robustness.py stages that race in one process. About 15 s a run on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def one_run(out: Path) -> dict:
    mark = out / "timed-window"
    env = {**os.environ, "EMOTION_BENCH_FAULT": "mark:0:6", "EMOTION_BENCH_MARK": str(mark)}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--strategy", "ddp", "--gpus", "2", "--size", "small",
                             "--epochs", "20", "--batch-size", "8", "--model-size", "small", "--device", "cpu",
                             "--warmup-steps", "2", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not mark.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    lines = stdout.strip().splitlines()
    if not lines or not Path(lines[-1]).exists():
        return {"status": "no result", "error": stderr.strip()[-300:], "throughput": {}}
    return json.loads(Path(lines[-1]).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--load", type=int, default=3, help="busy-loop processes beside the runs")
    args = ap.parse_args()
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    kept = 0
    try:
        with tempfile.TemporaryDirectory(prefix="sigterm-race-") as tmp:
            for i in range(args.runs):
                r = one_run(Path(tmp, str(i)))
                ok = r["status"] == "interrupted" and r["throughput"].get("measured_steps") is not None
                kept += ok
                print(f"run {i + 1}: {r['status']}: {r['error']}", flush=True)
    finally:
        for p in load:
            p.kill()
    print(f"kept the measured steps in {kept} of {args.runs} runs")


if __name__ == "__main__":
    main()
