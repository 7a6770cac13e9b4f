"""How strong are the tests? Mutation testing (mutmut) over the modules whose tests are fast.

    pip install mutmut   # 3.x; not a project dependency: this is not part of CI
    python tools/mutation_score.py [--only labels,splits] [--keep]

For each module below, a copy of the checkout (tracked and untracked files, as git lists them)
gets a [tool.mutmut] section naming that module and the tests that exercise it in process;
mutmut changes the module one small edit at a time (a < for a <=, a constant + 1, a dropped
argument, ...) and runs those tests against each mutant. A mutant is killed when a test fails.
The score is killed / all mutants; "no tests" mutants (code no selected test reaches) count as
not killed. Prints one row per module and the total; the target is 80 % or more.

Tests that start `bench` in a subprocess are left out of the selections: mutmut 3 maps tests to
the functions they call in its own process, and a subprocess would run unmutated code anyway.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> the in-process tests that exercise it (pytest arguments)
MODULES: dict[str, tuple[str, list[str]]] = {
    "labels": ("emotion_models/labels.py",
               ["tests/test_labels.py", "tests/test_oracles.py", "-k", "parse or every or calm or folder or unlabelled"]),
    "splits": ("emotion_models/splits.py",
               ["tests/test_splits.py", "tests/test_oracles.py", "-k", "split or unknown or deterministic or disjoint"]),
    "scan": ("emotion_models/scan.py",
             ["tests/test_scan.py", "tests/test_oracles.py", "-k", "scan_reports or original or scan_gives or scan_in"]),
    "quality": ("bench/quality.py", ["tests/test_run.py", "-k", "metrics_match"]),
    "compare": ("bench/compare.py",
                ["tests/test_sweep_report.py", "tests/test_oracles.py", "-k", "compare and not ci_runs"]),
    "report tables": ("bench/report/tables.py",
                      ["tests/test_report_tables.py", "tests/test_sweep_report.py", "tests/test_oracles.py", "-k",
                       "by_hand or blanks or two_machines or table_computed or hardware or report_writes or time_went"]),
    "config validation": ("bench/config.py",
                          ["tests/test_oracles.py", "tests/test_robustness.py", "-k",
                           "rule_has or absurd or declared_once"]),
    "efficiency (frame)": ("bench/frame.py",
                           ["tests/test_report_tables.py", "tests/test_sweep_report.py", "tests/test_oracles.py", "-k",
                            "by_hand or table_computed or efficiency_by_hand or compare_flags or hardware or frame_column"]),
    "breakdown": ("bench/breakdown.py",
                  ["tests/test_breakdown.py", "-k", "interval or moment or transfer or bandwidth or formulas or by_hand"]),
    "scaling model": ("bench/predict.py", ["tests/test_breakdown.py", "-k", "formulas or predict or links or wait"]),
}


def checkout_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_module(name: str, module: str, tests: list[str], work: Path) -> Counter:
    copy = work / re.sub(r"\W+", "-", name)
    copy.mkdir()
    checkout_copy(copy)
    toml = lambda xs: "[" + ", ".join(f'"{x}"' for x in xs) + "]"  # noqa: E731
    with open(copy / "pyproject.toml", "a") as f:
        f.write(f"\n[tool.mutmut]\nsource_paths = {toml(['emotion_models', 'bench'])}\nonly_mutate = {toml([module])}\n"
                f"pytest_add_cli_args_test_selection = {toml(tests)}\n"
                f"pytest_add_cli_args = {toml(['-p', 'no:cacheprovider', '-q', '-x', '-n', '0'])}\n"
                f"also_copy = {toml(['README.md', 'CONTRIBUTING.md', 'results', '.ci', 'benchmarks'])}\n")
    env = {**os.environ, "EMOTION_BENCH_CACHE": str(work / "cache")}
    run = subprocess.run([sys.executable, "-m", "mutmut", "run"], cwd=copy, env=env, capture_output=True, text=True)
    if run.returncode != 0 and "failed to collect stats" in run.stdout + run.stderr:
        raise SystemExit(f"{name}: the selected tests fail on unmutated code; fix them first\n{run.stdout[-2000:]}")
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=copy, env=env,
                             capture_output=True, text=True).stdout
    return Counter(line.rsplit(": ", 1)[1].strip() for line in listing.splitlines() if ": " in line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated module labels (default: all): " + ", ".join(MODULES))
    ap.add_argument("--keep", action="store_true", help="keep the copies (mutmut browse / show there)")
    args = ap.parse_args()
    import importlib.util

    if importlib.util.find_spec("mutmut") is None:
        print("error: mutmut is not installed: pip install mutmut (3.x)", file=sys.stderr)
        return 2
    chosen = [m.strip() for m in args.only.split(",")] if args.only else list(MODULES)
    unknown = [m for m in chosen if m not in MODULES]
    if unknown:
        print(f"error: unknown module label(s) {unknown}: choose from {', '.join(MODULES)}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="mutation-"))
    rows, total = [], Counter()
    try:
        for name in chosen:
            module, tests = MODULES[name]
            t0 = time.perf_counter()
            print(f"{name}: mutating {module} ...", file=sys.stderr, flush=True)
            counts = run_module(name, module, tests, work)
            total += counts
            rows.append((name, module, counts, time.perf_counter() - t0))
    finally:
        if args.keep:
            print(f"copies kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    def score(c: Counter) -> str:
        n = sum(c.values())
        return f"{100 * (c['killed'] + c['timeout']) / n:.0f} %" if n else "–"

    print("| module | file | mutants | killed | survived | no tests | score (killed %) | time (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, module, c, secs in rows:
        print(f"| {name} | {module} | {sum(c.values())} | {c['killed'] + c['timeout']} | {c['survived']} | "
              f"{c['no tests']} | {score(c)} | {secs:.0f} |")
    print(f"| total | | {sum(total.values())} | {total['killed'] + total['timeout']} | {total['survived']} | "
          f"{total['no tests']} | {score(total)} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
