"""Does a change keep behaviour? The same commands on a base revision and on the working tree.

    python tools/same_behaviour.py BASE [--quick]

Checks out BASE into a temporary git worktree, then runs, with each side's code and the same
seeds: `bench run`, `bench run --strategy ddp --gpus 2` and `bench sweep --config smoke`; and
`bench report` of each side over the same result folder. It prints, per run, whether the losses,
test macro-F1, config (run_id and out_dir aside) and the set of result keys are the same, and
whether the report's tables are the same; exit 1 if anything differs. --quick runs the two
`bench run`s on the tiny set for 2 epochs (a minute instead of about eight).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--size", "tiny", "--epochs", "2", "--batch-size", "16"]
VOLATILE_CONFIG = {"run_id", "out_dir"}


def bench(side: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(side)}
    proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=side, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{side}: bench {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def keys(obj, prefix="") -> set[str]:
    """Every key path of a result, list positions collapsed: throughput.samples_per_s, utilization.per_rank.*.rank."""
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= {f"{prefix}{k}"} | keys(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for v in obj:
            out |= keys(v, f"{prefix}*.")
    return out


def results(folder: Path) -> dict[str, dict]:
    """Result files by name; a single run's file is named by its command's folder."""
    files = sorted(p for p in folder.glob("*.json") if p.name != "sweep.json")
    return {(p.name if folder.name == "smoke" else folder.name): json.loads(p.read_text()) for p in files}


def differences(a: dict, b: dict) -> list[str]:
    diffs = []
    if a["losses"] != b["losses"]:
        diffs.append("losses")
    fa = (a["quality"].get("test") or {}).get("macro_f1")
    fb = (b["quality"].get("test") or {}).get("macro_f1")
    if fa != fb:
        diffs.append(f"macro-F1 {fa} vs {fb}")
    ca = {k: v for k, v in a["config"].items() if k not in VOLATILE_CONFIG}
    cb = {k: v for k, v in b["config"].items() if k not in VOLATILE_CONFIG}
    if ca != cb:
        diffs.append("config: " + ", ".join(sorted(k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k))))
    ka, kb = keys(a), keys(b)
    if ka != kb:
        diffs.append(f"keys only in base: {sorted(ka - kb)}; only in head: {sorted(kb - ka)}")
    return diffs


def tables(report_md: str) -> str:
    """The report without its figures section (the PNGs' bytes are not compared)."""
    return report_md.split("## plots")[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", help="git revision whose behaviour the working tree must keep")
    ap.add_argument("--quick", action="store_true", help="tiny set, 2 epochs for the two bench runs")
    args = ap.parse_args()
    extra = QUICK if args.quick else []
    commands = {"run": ["run", *extra], "ddp": ["run", "--strategy", "ddp", "--gpus", "2", *extra],
                "smoke": ["sweep", "--config", "smoke"]}
    with tempfile.TemporaryDirectory(prefix="same-behaviour-") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            found = {}
            for name, side in (("base", base), ("head", ROOT)):
                for folder, cmd in commands.items():
                    out = tmp / name / folder
                    print(f"{name}: bench {' '.join(cmd)}", flush=True)
                    bench(side, *cmd, "--out", str(out))
                found[name] = {k: v for folder in commands for k, v in results(tmp / name / folder).items()}
            # both sides' report code over the same results: the head's smoke sweep
            for name, side in (("base", base), ("head", ROOT)):
                bench(side, "report", str(tmp / "head" / "smoke"), "--out", str(tmp / f"report-{name}"))
            failed = False
            for run_name in sorted(found["base"].keys() | found["head"].keys()):
                a, b = found["base"].get(run_name), found["head"].get(run_name)
                diffs = ["missing on one side"] if a is None or b is None else differences(a, b)
                failed |= bool(diffs)
                print(f"{run_name}: {'same' if not diffs else 'DIFFERENT: ' + '; '.join(diffs)}")
            base_md, head_md = tmp / "report-base" / "report.md", tmp / "report-head" / "report.md"
            same = tables(base_md.read_text()) == tables(head_md.read_text())
            failed |= not same
            print(f"bench report tables over the same results: {'same' if same else 'DIFFERENT'}")
            if not same:
                subprocess.run(["diff", str(base_md), str(head_md)])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    print("FAILED: behaviour changed" if failed else f"same behaviour as {args.base}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
