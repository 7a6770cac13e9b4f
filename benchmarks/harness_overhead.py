"""Throughput `bench run` reports for the CNN against a plain hand-written PyTorch loop, same process.

    python benchmarks/harness_overhead.py [--model cnn] [--batch-size 32] [--steps 60] [--rounds 3]

Both sides train the same model (same init), batch size, data and thread count; they run in
alternating rounds so machine noise hits both alike. Prints the median ratio harness / plain
(target: >= 0.97, the harness may cost at most 3 % against a loop written by hand).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from bench.config import RunConfig
from bench.distenv import init_env
from bench.train import execute
from emotion_models import FeatureConfig, build_model, load_synthetic
from emotion_models.audio import centre_offset


def plain_loop(model_name: str, data, batch_size: int, steps: int, warmup: int, seed: int) -> float:
    """The loop a person writes by hand: slice, forward, backward, step; timed with perf_counter."""
    torch.manual_seed(seed)
    fcfg = data.feature_cfg
    model = build_model(model_name, n_features=fcfg.n_features, frames=fcfg.crop_frames)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    x_all, y_all = data.subset("train")
    c = centre_offset(fcfg)
    x_all = x_all[:, :, c : c + fcfg.crop_frames].contiguous()
    n = x_all.shape[0] // batch_size
    for i in range(warmup + steps):
        if i == warmup:
            t = time.perf_counter()
        k = i % n
        x, y = x_all[k * batch_size : (k + 1) * batch_size], y_all[k * batch_size : (k + 1) * batch_size]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch_size / (time.perf_counter() - t)


def harness(model_name: str, data, batch_size: int, steps: int, warmup: int, seed: int) -> float:
    cfg = RunConfig(model=model_name, batch_size=batch_size, epochs=100, max_steps=warmup + steps,
                    warmup_steps=warmup, seed=seed, device="cpu", eval_each_epoch=False)
    return execute(cfg, init_env(cfg, "cpu"), data).throughput.samples_per_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_synthetic("small", feature_cfg=FeatureConfig(kind="mfcc" if args.model == "lstm" else "logmel"))
    ratios = []
    for r in range(args.rounds):
        p = plain_loop(args.model, data, args.batch_size, args.steps, args.warmup, r)
        h = harness(args.model, data, args.batch_size, args.steps, args.warmup, r)
        ratios.append(h / p)
        print(f"round {r + 1}: plain {p:.1f} samples/s, harness {h:.1f} samples/s, ratio {h / p:.3f}")
    print(f"{args.model}, batch {args.batch_size}, {args.threads} threads: median ratio harness/plain "
          f"{statistics.median(ratios):.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
