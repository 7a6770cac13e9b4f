"""Settle two cells of a space with a paired measurement: windows of A and B alternately (A B B A ...),
the geometric mean of the B/A ratios and its 95 % paired t interval (bench ab's rule).

    python benchmarks/pair_cells.py --space tune-cpu --model cnn A_KEY B_KEY [--pairs 12]

A_KEY and B_KEY are cell keys of the space as the sweep names its results, e.g.
cnn-ddp-2x-bf16-eager-weak-b32-ga2 (a trailing -r0 is ignored). Each window is bench tune's: the run's
warm-up, then 12 timed steps, in one bench ab job of this working tree. It prints every pair, then
"B/A = ratio [low, high]" and what that says at the threshold (default: the interval's own width).
Run it on an idle machine; the figure holds for this machine type only (its fingerprint is printed).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import tuning  # noqa: E402
from bench.ab import interval  # noqa: E402
from bench.envinfo import fingerprint  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--space", default="tune-cpu")
    p.add_argument("--model", default="cnn")
    p.add_argument("--pairs", type=int, default=12)
    args = p.parse_args()
    spec = tuning.load_space(args.space, args.model, None, 1, {})
    cells = {c.key.removesuffix("-r0"): c.cfg for c in tuning.candidates(spec, "cpu")}
    for key in (args.a, args.b):
        if key.removesuffix("-r0") not in cells:
            sys.exit(f"pair_cells: {key} is not a cell of {args.space} for {args.model}; "
                     f"e.g. {next(iter(cells))}")
    a, b = (cells[k.removesuffix("-r0")] for k in (args.a, args.b))
    env = fingerprint()
    print(f"machine: {env['cpu_model']} (hardware id {env['hardware_id']}), {env['cpu_cores_logical']} cores")
    world = max(a.devices, b.devices)
    windows = tuning.Windows(a, world, "cpu", Path(tempfile.mkdtemp(prefix="pair-cells-")))
    ratios = []
    try:
        for k in range(args.pairs):
            first, second = (a, b) if k % 2 == 0 else (b, a)
            x = {id(first): windows(first)}
            x[id(second)] = windows(second)
            ratios.append(x[id(b)] / x[id(a)])
            print(f"pair {k + 1}: A {x[id(a)]:.1f}  B {x[id(b)]:.1f} samples/s  B/A {ratios[-1]:.3f}", flush=True)
    finally:
        windows.close()
    mean, low, high = interval(ratios)
    side = "B faster" if low > 1 else "A faster" if high < 1 else "cannot tell apart"
    print(f"B/A = {mean:.3f} [{low:.3f}, {high:.3f}] over {len(ratios)} pairs (95 % paired t): {side}; "
          f"smallest difference this run could see: {100 * (high - low) / 2:.1f} %")


if __name__ == "__main__":
    main()
