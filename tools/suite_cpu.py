"""Where the default test suite spends its CPU: a pytest plugin, not part of CI.

    PYTHONPATH=tools python -m pytest -q -p suite_cpu [--suite-cpu-top 25]

The suite is CPU-bound on 2 cores (most tests start `bench` processes), so wall time per test
says little under pytest-xdist: a test that waits looks as long as one that computes. Around
each test's call this records the CPU seconds (user + system) of the test process and of the
child processes it waited for (getrusage: RUSAGE_SELF + RUSAGE_CHILDREN), then prints the total,
the CPU per test file and the costliest tests. A child not waited for within its test (a pool
that outlives it) is not counted.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

_DIR_ENV = "SUITE_CPU_DIR"  # shared by the controller and its xdist workers


def pytest_addoption(parser):
    parser.addoption("--suite-cpu-top", type=int, default=25, help="suite_cpu: how many tests to list")


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller (or the only process) makes the folder
        os.environ[_DIR_ENV] = tempfile.mkdtemp(prefix="suite-cpu-")


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    cpu0, t0 = _cpu(), time.perf_counter()
    yield
    row = {"test": item.nodeid, "cpu_s": _cpu() - cpu0, "wall_s": time.perf_counter() - t0}
    with open(Path(os.environ[_DIR_ENV], f"rows-{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def pytest_terminal_summary(terminalreporter, config):
    if hasattr(config, "workerinput"):
        return
    folder = Path(os.environ[_DIR_ENV])
    rows = [json.loads(line) for p in folder.glob("rows-*.jsonl") for line in p.open()]
    shutil.rmtree(folder, ignore_errors=True)
    if not rows:
        return
    rows.sort(key=lambda r: -r["cpu_s"])
    per_file = Counter()
    for r in rows:
        per_file[r["test"].split("::")[0]] += r["cpu_s"]
    top = config.getoption("--suite-cpu-top")
    lines = [f"suite_cpu: {sum(r['cpu_s'] for r in rows):.1f} s of CPU in {len(rows)} test calls",
             "per file (CPU s): " + ", ".join(f"{f} {s:.1f}" for f, s in per_file.most_common()),
             f"{'CPU (s)':>8} {'wall (s)':>8}  test"]
    lines += [f"{r['cpu_s']:8.1f} {r['wall_s']:8.1f}  {r['test']}" for r in rows[:top]]
    for line in lines:
        terminalreporter.write_line(line)
