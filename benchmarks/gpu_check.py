"""Every CUDA path users run, in one go, on a machine with at least one GPU.

    python benchmarks/gpu_check.py --out DIR [--epochs 2] [--size small]

Runs `bench run` for: single fp32, single bf16, single fp16 (GradScaler), single compiled
(inductor), ddp on 1 GPU (NCCL, world size 1), dp on 1 GPU, fsdp bf16 on 1 GPU; then prints
a table of throughput, NVML busy %, memory, power, energy and macro-F1 from the result
files written into DIR. Exits non-zero if any cell failed or NVML reported nothing.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench.results import load_results

CELLS = [
    ["--strategy", "single"],
    ["--strategy", "single", "--precision", "bf16"],
    ["--strategy", "single", "--precision", "fp16"],
    ["--strategy", "single", "--compile"],
    ["--strategy", "ddp", "--gpus", "1"],
    ["--strategy", "dp", "--gpus", "1"],
    ["--strategy", "fsdp", "--gpus", "1", "--precision", "bf16"],
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", default="2")
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch-size", default="64")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    codes = []
    for cell in CELLS:
        cmd = [sys.executable, "-m", "bench", "run", *cell, "--device", "cuda", "--epochs", args.epochs,
               "--size", args.size, "--batch-size", args.batch_size, "--out", args.out]
        print("$", " ".join(cmd[2:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        codes.append(proc.returncode)
        print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
    results, bad = load_results([args.out])
    print(f"{'cell':42} {'samples/s':>10} {'busy %':>7} {'peak MiB':>9} {'W':>6} {'J':>8} {'MFU %':>6} {'F1':>6}")
    nvml_seen = False
    for r in sorted(results, key=lambda r: r["run_id"]):
        c, t, u = r["config"], r["throughput"], r["utilization"]
        f1 = ((r["quality"] or {}).get("test") or {}).get("macro_f1")
        mfu = (r.get("flops") or {}).get("mfu")
        nvml_seen |= u.get("gpu_busy_percent_mean") is not None
        name = f"{c['strategy']} {c['precision']}{' compiled' if c['compile'] else ''} x{c['devices']} [{r['status']}]"

        def f(v, spec):
            return format(v, spec) if v is not None else "n/a"

        print(f"{name:42} {f(t.get('samples_per_s'), '10.1f')} {f(u.get('gpu_busy_percent_mean'), '7.0f')} "
              f"{f((u.get('peak_allocated_bytes') or 0) / 2**20 if u.get('peak_allocated_bytes') else None, '9.0f')} "
              f"{f(u.get('gpu_power_w_mean'), '6.0f')} {f(u.get('gpu_energy_j'), '8.0f')} "
              f"{f(mfu * 100 if mfu is not None else None, '6.2f')} {f(f1, '6.3f')}")
        if r["status"] != "ok":
            print("   error:", r["error"])
    failed = any(codes) or bad or not nvml_seen
    print("FAILED" if failed else "all CUDA paths ok", "" if nvml_seen else "(NVML reported nothing)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
