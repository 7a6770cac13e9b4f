"""What one micro-step of --grad-accum K costs against a whole step, in one process, paired: the base cnn
at batch 32 a micro-step, 1 thread, plain PyTorch (no harness), a step without accumulation and one
with K micro-steps taking turns (A B, B A, ...).

    python tools/studies/accum_micro_step.py [--k 2] [--pairs 12] [--model cnn]

Prints the medians of forward + backward and of the optimiser step (AdamW, zero_grad) per step, and
the median over pairs of (forward + backward of K micro-steps / K) over (a whole step's forward +
backward). bench predict's r_K (a single run with --grad-accum K over single's, per micro-step)
holds this and the per-step work the harness and optimiser pay once per K micro-steps. Gradients
are set to None after each optimiser step, as the harness does: the first micro-step's backward
allocates them and the next adds into them, one candidate for the difference. About a minute on 2
cores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--model", default="cnn")
    args = ap.parse_args()
    from emotion_models.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = build_model(args.model, size="base")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x, y = m.example_input(32 * args.k, "cpu"), torch.randint(0, 7, (32 * args.k,))

    def step(k: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        for xi, yi in zip(x[: 32 * k].chunk(k), y[: 32 * k].chunk(k)):
            (torch.nn.functional.cross_entropy(m(xi), yi) / k).backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t1

    for _ in range(3):  # warm-up
        step(1), step(args.k)
    whole, micro = [], []
    for i in range(args.pairs):  # A B, then B A: neither kind always runs first
        if i % 2 == 0:
            whole.append(step(1))
            micro.append(step(args.k))
        else:
            micro.append(step(args.k))
            whole.append(step(1))
    med = lambda v, i: statistics.median(s[i] for s in v) * 1000  # noqa: E731
    print(f"{args.model}, batch 32 a micro-step, 1 thread, {args.pairs} pairs")
    print(f"whole step:      forward+backward {med(whole, 0):7.1f} ms, optimiser {med(whole, 1):5.1f} ms")
    print(f"{args.k} micro-steps:  forward+backward {med(micro, 0):7.1f} ms ({med(micro, 0) / args.k:.1f} a micro-step), "
          f"optimiser {med(micro, 1):5.1f} ms")
    ratio = statistics.median(b[0] / args.k / a[0] for a, b in zip(whole, micro))
    print(f"a micro-step's forward+backward over a whole step's, median over pairs: {ratio:.3f}")


if __name__ == "__main__":
    main()
