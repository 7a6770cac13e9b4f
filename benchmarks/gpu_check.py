"""Every CUDA path users run, in one go, on a machine with at least one GPU (about 5 minutes on one H100).

    python benchmarks/gpu_check.py --out DIR [--epochs 2] [--size small]

Runs `bench run` on synthetic data (no soundfile, no soxr needed) for the reference CNN: single
fp32, bf16, fp16 (GradScaler), compiled (inductor), ddp on 1 GPU (NCCL, world size 1), dp on 1
GPU, fsdp bf16; and for the speech encoders: wav2vec2-base bf16 (eager and compiled), hubert-large
fsdp bf16, and the largest encoder whose memory estimate fits this card under fsdp bf16. Then
prints one table of throughput, NVML busy %, MFU, peak memory, power, energy and macro-F1 from
the result files in DIR. Exits non-zero if any cell failed or NVML reported nothing.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import load_results  # noqa: E402

CNN = [
    ["--strategy", "single"],
    ["--strategy", "single", "--precision", "bf16"],
    ["--strategy", "single", "--precision", "fp16"],
    ["--strategy", "single", "--compile"],
    ["--strategy", "ddp", "--gpus", "1"],
    ["--strategy", "dp", "--gpus", "1"],
    ["--strategy", "fsdp", "--gpus", "1", "--precision", "bf16"],
    # the step breakdown read from CUDA streams (kernels, memcpy, runtime, idle); one GPU has no
    # NCCL traffic to show, and the table says so rather than invent it
    ["--strategy", "single", "--precision", "bf16", "--profile"],
    ["--strategy", "ddp", "--gpus", "1", "--profile"],
]
# the encoders train a bounded number of steps: what is measured is the system, not convergence
ENCODER = ["--epochs", "1", "--max-steps", "40", "--warmup-steps", "10", "--batch-size", "16"]
ENCODERS = [
    ["--model", "wav2vec2-base", "--precision", "bf16", *ENCODER],
    ["--model", "wav2vec2-base", "--precision", "bf16", "--compile", *ENCODER],
    ["--model", "hubert-large", "--strategy", "fsdp", "--gpus", "1", "--precision", "bf16", *ENCODER],
]
BY_SIZE = ["xlsr-2b", "xlsr-1b", "wavlm-large", "hubert-large"]


def largest_fitting(batch: int) -> str | None:
    """The largest encoder whose estimate (bench/memory.py) fits 90 % of this card's free memory."""
    import torch

    from bench.config import RunConfig
    from bench.memory import estimate

    free = torch.cuda.mem_get_info(0)[0]
    for name in BY_SIZE:
        cfg = RunConfig(model=name, strategy="fsdp", devices=1, precision="bf16", batch_size=batch)
        est = estimate(cfg)
        print(f"  {name}: estimated {est.text()}; free {free / 2**30:.1f} GiB", flush=True)
        if est.total_bytes < 0.9 * free:
            return name
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", default="2")
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch-size", default="64")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    common = ["--device", "cuda", "--size", args.size, "--out", args.out]
    cells = [[*c, "--epochs", args.epochs, "--batch-size", args.batch_size] for c in CNN] + ENCODERS
    print("largest encoder that fits this card under fsdp bf16 at batch 8:", flush=True)
    biggest = largest_fitting(8)
    if biggest:
        cells.append(["--model", biggest, "--strategy", "fsdp", "--gpus", "1", "--precision", "bf16",
                      *ENCODER[:-1], "8"])
    codes = []
    for cell in cells:
        cmd = [sys.executable, "-m", "bench", "run", *cell, *common]
        print("$", " ".join(cmd[2:]), flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        codes.append(proc.returncode)
        print(f"  exit {proc.returncode} after {time.perf_counter() - t:.0f} s", flush=True)
        print(proc.stdout[-2500:], proc.stderr[-2000:], flush=True)
    results, bad = load_results([args.out])
    print(f"{'cell':58} {'samples/s':>10} {'busy %':>7} {'peak MiB':>9} {'W':>6} {'J':>8} {'MFU %':>6} {'F1':>6}")
    nvml_seen = False
    for r in sorted(results, key=lambda r: r["run_id"]):
        c, t, u = r["config"], r["throughput"], r["utilization"]
        f1 = ((r["quality"] or {}).get("test") or {}).get("macro_f1")
        mfu = (r.get("flops") or {}).get("mfu")
        nvml_seen |= u.get("gpu_busy_percent_mean") is not None
        name = (f"{c['model']} {c['strategy']} {c['precision']}{' compiled' if c['compile'] else ''} "
                f"x{c['devices']} b{c['batch_size_per_device']} [{r['status']}]")

        def f(v, spec):
            return format(v, spec) if v is not None else "n/a"

        print(f"{name:58} {f(t.get('samples_per_s'), '10.1f')} {f(u.get('gpu_busy_percent_mean'), '7.0f')} "
              f"{f((u.get('peak_allocated_bytes') or 0) / 2**20 if u.get('peak_allocated_bytes') else None, '9.0f')} "
              f"{f(u.get('gpu_power_w_mean'), '6.0f')} {f(u.get('gpu_energy_j'), '8.0f')} "
              f"{f(mfu * 100 if mfu is not None else None, '6.2f')} {f(f1, '6.3f')}")
        if r["status"] != "ok":
            print("   error:", r["error"])
        b = r.get("breakdown")
        if b:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in b["parts_ms"].items())
            comm = ", ".join(f"{k} x{v['count_per_step']:g}" for k, v in b["collectives"].items()) or "no NCCL traffic"
            print(f"   breakdown of a {b['step_ms']:.2f} ms step (ms): {parts}; collectives: {comm}")
    failed = any(codes) or bad or not nvml_seen
    print("FAILED" if failed else "all CUDA paths ok", "" if nvml_seen else "(NVML reported nothing)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
