"""What running a sweep's cells as jobs costs: `bench sweep --config smoke` with the local executor
and with submitit-local (each cell a job through submitit's LocalExecutor), in A B B A order.

    python benchmarks/executor_overhead.py [--rounds 2] [--config smoke]

Prints each sweep's wall time (s), the jobs/local ratio of the means, the extra seconds per cell,
and each cell's median samples/s under both (the job runs the same bench run, so these should
agree within the machine's noise). Run it on an idle machine; a timing holds for one machine type.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sweep(config: str, out: Path, executor: str) -> tuple[float, dict[str, float]]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench", "sweep", "--config", config, "--out", str(out),
                           "--executor", executor], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(f"bench sweep --executor {executor} failed: {done.stderr.strip()[-500:]}")
    figures = {}
    for row in json.loads((out / "sweep.json").read_text())["cells"]:
        if row["state"] == "done":
            r = json.loads((out / row["result"]).read_text())
            figures[row["key"]] = r["throughput"]["samples_per_s"]
    return wall, figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--config", default="smoke")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.envinfo import fingerprint

    env = fingerprint()
    print(f"machine: {env['cpu_model']} (hardware id {env['hardware_id']}), {env['cpu_cores_logical']} cores")
    walls: dict[str, list[float]] = {"local": [], "submitit-local": []}
    cells: dict[str, dict[str, list[float]]] = {"local": {}, "submitit-local": {}}
    base = Path(tempfile.mkdtemp(prefix="executor-overhead-"))
    order = [e for _ in range(args.rounds) for e in ("local", "submitit-local", "submitit-local", "local")][:2 * args.rounds]
    for k, executor in enumerate(order):
        wall, figures = sweep(args.config, base / f"{k}-{executor}", executor)
        walls[executor].append(wall)
        for key, v in figures.items():
            cells[executor].setdefault(key, []).append(v)
        print(f"{k + 1}. {executor}: {wall:.1f} s, {len(figures)} cells", flush=True)
    n = len(cells["local"])
    a, b = statistics.fmean(walls["local"]), statistics.fmean(walls["submitit-local"])
    print(f"wall: local {a:.1f} s, submitit-local {b:.1f} s (means of {args.rounds}); jobs / local {b / a:.3f}; "
          f"{(b - a) / max(n, 1):+.1f} s a cell over {n} cells")
    for key in sorted(cells["local"]):
        la, lb = statistics.median(cells["local"][key]), statistics.median(cells["submitit-local"].get(key, [float("nan")]))
        print(f"  {key}: local {la:.1f}, submitit-local {lb:.1f} samples/s (medians), ratio {lb / la:.3f}")


if __name__ == "__main__":
    main()
