"""What the benchmarks share: the command-line arguments of a measured CPU cell, its RunConfig, the
run of one cell, the link measurement, and where results are kept.

Imported by the scripts beside it (`python benchmarks/NAME.py` puts this folder first on the path).
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile

from bench.comm import load
from bench.config import RunConfig
from bench.lifecycle import run
from bench.results import load_result


def arguments(doc: str, *, reports_kept: bool = False) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tp-model", default="transformer", help="the model of the tensor-parallel cells (predict_cpu)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every cell; each figure is their median")
    ap.add_argument("--no-contention", action="store_true", help="leave the independent runs out (c = 1)")
    ap.add_argument("--keep", metavar="DIR", help="keep the results (comm/, runs/) in DIR instead of a temporary folder")
    if reports_kept:
        ap.add_argument("--from", dest="source", metavar="DIR",
                        help="measure nothing: report on the results an earlier --keep DIR kept")
    return ap.parse_args()


def base_config(args: argparse.Namespace, out_dir: str) -> RunConfig:
    """1 thread per worker, 5 warm-up steps, no evaluation between epochs."""
    return RunConfig(model=args.model, batch_size=args.batch_size, epochs=100, max_steps=args.steps + 5,
                     warmup_steps=5, threads=1, eval_each_epoch=False, device="cpu", out_dir=out_dir)


def run_cell(base: RunConfig, strategy: str, devices: int, seed: int, profile: bool) -> dict:
    """One cell's result; the script stops on a cell that did not run."""
    outcome = run(base.replace(strategy=strategy, devices=devices, seed=seed, profile=profile))
    if outcome.status != "ok":
        sys.exit(f"{strategy} x{devices}: {outcome.error}")
    return load_result(outcome.path)


def measure_links(out_dir: str) -> dict:
    """A bench comm result of 2 CPU workers, up to 8 MiB."""
    subprocess.run([sys.executable, "-m", "bench", "comm", "--gpus", "2", "--device", "cpu", "--max-bytes", "8M",
                    "--out", out_dir], check=True, capture_output=True)
    return load(out_dir)


def out_folder(args: argparse.Namespace):
    """--keep DIR, or a temporary folder removed at the end."""
    return contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()
