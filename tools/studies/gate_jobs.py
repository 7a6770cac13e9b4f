"""How much of the gate's noise belongs to the job: fresh `bench ab` jobs of the same code, several
visits of each gate cell per job, with torch's default CPU allocator and with
THP_MEM_ALLOC_ENABLE=1 (transparent huge pages for tensors of 2 MiB and more), jobs alternating.

    python tools/studies/gate_jobs.py [--jobs 6] [--visits 3]

Prints, per allocator setting and cell, the spread (standard deviation of log throughput of the
fastest step, in %) of the job means and of the visits within a job, and the mean throughput.
A spread of job means well above (within-job spread) / sqrt(visits) is a speed that belongs to
the job: pairs measured by one pair of jobs share it, and only fresh jobs sample it. About 7.5 min
for the defaults on 2 cores; run it on an idle machine.
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

from bench.ab import REPO, Job, Side, gate_cells, visit_metrics
from bench.cells import cell_label

SETTINGS = {"default": {"THP_MEM_ALLOC_ENABLE": "0"}, "thp": {"THP_MEM_ALLOC_ENABLE": "1"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--visits", type=int, default=3)
    args = ap.parse_args()
    cells = gate_cells("gate")
    measured: dict[str, list[dict[str, list[float]]]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="gate-jobs-") as tmp:
        for j in range(args.jobs):
            for name, env in SETTINGS.items():  # alternating, so drift hits both settings alike
                job = Job(Side(name, "working tree", REPO, env), max(c["devices"] for c in cells), 1, cells[0],
                          Path(tmp, f"{name}-{j}"))
                try:
                    job.wait_ready(300)
                    visits: dict[str, list[float]] = {}
                    for _ in range(args.visits):
                        for c in cells:
                            visits.setdefault(cell_label(c, from_config=True), []).append(visit_metrics(c, job.run(c, 300))["throughput"])
                finally:
                    job.close()
                measured[name].append(visits)
                print(f"job {j + 1} {name}: " + ", ".join(f"{cell} {' '.join(f'{v:.0f}' for v in vs)}"
                                                           for cell, vs in visits.items()) + " samples/s", flush=True)
    for name, jobs in measured.items():
        for cell in jobs[0]:
            logs = [[math.log(v) for v in job[cell]] for job in jobs]
            means = [statistics.fmean(x) for x in logs]
            within = statistics.fmean(statistics.variance(x) for x in logs) ** 0.5
            print(f"{name:8s} {cell}: job means spread {statistics.stdev(means) * 100:.1f} %, visits within a job "
                  f"{within * 100:.1f} % (expected job spread from visits alone "
                  f"{within / math.sqrt(args.visits) * 100:.1f} %); mean {math.exp(statistics.fmean(means)):.0f} samples/s")


if __name__ == "__main__":
    main()
