"""Every CUDA path, run and checked: the acceptance test of the code no CPU can run.

    python -m benchmarks.gpu_check --out DIR [--budget-s 420] [--only NAME,...] [--list]

One command from the repository root on a machine with one GPU or more; it needs torch,
torchaudio, typer, rich, pandas, matplotlib, psutil and nvidia-ml-py, not soundfile, soxr or the
package installed (the data is the synthetic set): `python -m` puts the repository root on the
path. Where the package is installed, `python benchmarks/gpu_check.py` works too. It runs, in order of what they tell:

- on one GPU: the CNN under single fp32, bf16 and fp16 (GradScaler); ddp x1 fp32 and fp16 and
  fsdp x1 bf16 and fp16 (ShardedGradScaler), whose control messages go over NCCL; SIGINT in the
  timed window and a planted out-of-memory error; pipeline, model-parallel, dp (bf16), independent
  and ddp --sync-bn at one device; the step breakdown (--profile) of single and ddp; the RNN models,
  the transformer and conformer (single and fsdp); the CNN and wav2vec2-base compiled (inductor);
  wav2vec2-base and hubert-large fsdp bf16, and the largest encoder whose estimate fits the card;
  `bench tune --objective energy` over the tune preset at one GPU (its windows on CUDA, samples/J);
- with two GPUs or more: dp (fp32 and bf16), ddp, fsdp, pipeline and model-parallel at 2 GPUs,
  bench comm, bench parity, and hubert-large under fsdp at N GPUs against single.

Each result is checked (bench/invariants.py): status; 0 < MFU < 1; NVML busy % in [0, 100];
energy within 25 % of mean power x timed window (where the window held enough power samples);
torch's training peak under the card's memory and within 30 % of the memory estimate; SIGINT
gives `interrupted` with its steps kept; the planted OOM gives the one-line OOM result; fsdp xN's
peak below single's. One verdict per check is printed; DIR holds every result file,
gpu_check.json (cells, checks, timings, card) and gpu_check.md (the table for the README),
rewritten after each cell, so a run stopped by a timeout keeps what it did. Cells that the
budget leaves no time for are listed as not run. Exit 0 when every check passed, 1 when one
failed, 2 on a machine without CUDA (one line).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    import bench.config  # noqa: F401  (the package's modules are imported where used)
except ImportError:
    sys.exit("gpu_check: the bench package is not importable here; run it from the repository root as "
             "`python -m benchmarks.gpu_check --out DIR` (no install needed), or pip install -e . first")

CNN = ["--size", "small", "--epochs", "3", "--batch-size", "64"]
ENC = ["--size", "small", "--epochs", "1", "--max-steps", "40", "--warmup-steps", "10", "--batch-size", "16"]
BY_SIZE = ["xlsr-2b", "xlsr-1b", "wavlm-large", "hubert-large"]


@dataclass
class Cell:
    name: str
    argv: list[str]  # after `bench`
    expect: str = "ok"  # ok | interrupted | oom | command (bench comm / parity: the exit code) | tune (its record)
    gpus: int = 1  # GPUs it needs
    env: dict = field(default_factory=dict)
    guess_s: float = 20.0  # what it is expected to take, for the budget


def one_gpu_cells() -> list[Cell]:
    run = ["run"]
    return [
        Cell("cnn single fp32", [*run, *CNN]),
        Cell("cnn ddp x1 fp32 (NCCL)", [*run, "--strategy", "ddp", "--gpus", "1", *CNN]),
        Cell("cnn single bf16", [*run, *CNN, "--precision", "bf16"]),
        Cell("cnn single fp16 (GradScaler)", [*run, *CNN, "--precision", "fp16"]),
        Cell("cnn fsdp x1 bf16", [*run, "--strategy", "fsdp", "--gpus", "1", *CNN, "--precision", "bf16"]),
        Cell("cnn fsdp x1 fp16 (ShardedGradScaler)", [*run, "--strategy", "fsdp", "--gpus", "1", *CNN,
                                                      "--precision", "fp16"]),
        Cell("cnn ddp x1 fp16", [*run, "--strategy", "ddp", "--gpus", "1", *CNN, "--precision", "fp16"]),
        Cell("cnn single: SIGINT in the timed window", [*run, *CNN], expect="interrupted",
             env={"EMOTION_BENCH_FAULT": "int:0:40"}),
        Cell("cnn single: planted out-of-memory error", [*run, *CNN], expect="oom",
             env={"EMOTION_BENCH_FAULT": "oom:0:3"}),
        Cell("cnn pipeline x1", [*run, "--strategy", "pipeline", "--gpus", "1", *CNN]),
        Cell("cnn model-parallel x1", [*run, "--strategy", "model-parallel", "--gpus", "1", *CNN]),
        Cell("cnn dp x1 bf16", [*run, "--strategy", "dp", "--gpus", "1", *CNN, "--precision", "bf16"]),
        Cell("cnn independent x1", [*run, "--strategy", "independent", "--gpus", "1", *CNN]),
        Cell("cnn ddp x1 --sync-bn", [*run, "--strategy", "ddp", "--gpus", "1", "--sync-bn", *CNN]),
        Cell("cnn single bf16 --profile", [*run, *CNN, "--precision", "bf16", "--profile"]),
        Cell("cnn ddp x1 --profile", [*run, "--strategy", "ddp", "--gpus", "1", *CNN, "--profile"]),
        Cell("lstm single bf16", [*run, "--model", "lstm", *CNN, "--precision", "bf16"]),
        Cell("crnn single bf16", [*run, "--model", "crnn", *CNN, "--precision", "bf16"]),
        Cell("transformer single bf16", [*run, "--model", "transformer", *CNN, "--precision", "bf16"]),
        Cell("conformer single bf16", [*run, "--model", "conformer", *ENC, "--precision", "bf16"], guess_s=30),
        Cell("conformer fsdp x1 bf16", [*run, "--model", "conformer", "--strategy", "fsdp", "--gpus", "1", *ENC,
                                        "--precision", "bf16"], guess_s=30),
        Cell("wav2vec2-base single bf16", [*run, "--model", "wav2vec2-base", *ENC, "--precision", "bf16"], guess_s=30),
        Cell("hubert-large fsdp x1 bf16", [*run, "--model", "hubert-large", "--strategy", "fsdp", "--gpus", "1", *ENC,
                                           "--precision", "bf16"], guess_s=40),
        # issue 24's memory and accumulation settings on one GPU: each must run (and record itself)
        Cell("transformer single bf16 --ac full", [*run, "--model", "transformer", *CNN, "--precision", "bf16",
                                                   "--ac", "full"]),
        Cell("wav2vec2-base fsdp x1 bf16 --ac selective", [*run, "--model", "wav2vec2-base", "--strategy", "fsdp",
                                                            "--gpus", "1", *ENC, "--precision", "bf16", "--ac",
                                                            "selective"], guess_s=30),
        Cell("cnn ddp x1 --grad-accum 2", [*run, "--strategy", "ddp", "--gpus", "1", *CNN, "--grad-accum", "2"]),
        Cell("cnn fsdp x1 bf16 --grad-accum 2", [*run, "--strategy", "fsdp", "--gpus", "1", *CNN, "--precision", "bf16",
                                                 "--grad-accum", "2"]),
        Cell("hubert-large fsdp x1 bf16 --offload", [*run, "--model", "hubert-large", "--strategy", "fsdp", "--gpus",
                                                     "1", *ENC, "--precision", "bf16", "--offload"], guess_s=60),
        # tensor parallel (DTensor, sequence parallel on) at degree 1: its hooks and collectives on CUDA
        Cell("transformer tp x1 bf16", [*run, "--model", "transformer", "--strategy", "tp", "--gpus", "1", *CNN,
                                        "--precision", "bf16"]),
        Cell("wav2vec2-base tp x1 bf16", [*run, "--model", "wav2vec2-base", "--strategy", "tp", "--gpus", "1", *ENC,
                                          "--precision", "bf16"], guess_s=30),
        Cell("cnn fsdp x1 --reshard-after-forward false", [*run, "--strategy", "fsdp", "--gpus", "1", *CNN,
                                                           "--reshard-after-forward", "false"]),
        # bench tune's windows on CUDA, and --objective energy (NVML's counters), which no CPU can run
        Cell("cnn tune x1 --objective energy", ["tune", "--model", "cnn", "--gpus", "1", "--space", "tune",
                                                "--objective", "energy", "--budget", "90s"], expect="tune",
             guess_s=180),
        Cell("cnn single compiled (inductor)", [*run, *CNN, "--compile"], guess_s=90),
        Cell("wav2vec2-base single bf16 compiled (inductor)", [*run, "--model", "wav2vec2-base", *ENC, "--precision",
                                                               "bf16", "--compile"], guess_s=150),
    ]


def multi_gpu_cells(n: int) -> list[Cell]:
    run = ["run"]
    n = min(n, 8)
    return [
        Cell("cnn ddp x2", [*run, "--strategy", "ddp", "--gpus", "2", *CNN], gpus=2),
        Cell("cnn fsdp x2 bf16", [*run, "--strategy", "fsdp", "--gpus", "2", *CNN, "--precision", "bf16"], gpus=2),
        Cell("cnn dp x2 bf16", [*run, "--strategy", "dp", "--gpus", "2", *CNN, "--precision", "bf16"], gpus=2),
        Cell("cnn dp x2 fp32", [*run, "--strategy", "dp", "--gpus", "2", *CNN], gpus=2),
        Cell("cnn pipeline x2", [*run, "--strategy", "pipeline", "--gpus", "2", *CNN], gpus=2),
        Cell("transformer pipeline x2 interleaved-1f1b", [*run, "--model", "transformer", "--strategy", "pipeline",
                                                          "--gpus", "2", *CNN, "--schedule", "interleaved-1f1b"], gpus=2),
        Cell("cnn ddp x2 --grad-accum 2", [*run, "--strategy", "ddp", "--gpus", "2", *CNN, "--grad-accum", "2"], gpus=2),
        Cell("cnn model-parallel x2", [*run, "--strategy", "model-parallel", "--gpus", "2", *CNN], gpus=2),
        Cell("bench comm x2", ["comm", "--gpus", "2", "--max-bytes", "64M"], expect="command", gpus=2, guess_s=60),
        Cell("bench parity x2", ["parity", "--gpus", "2", "--model", "lstm"], expect="command", gpus=2, guess_s=60),
        Cell("transformer tp x2 bf16", [*run, "--model", "transformer", "--strategy", "tp", "--gpus", "2", *CNN,
                                        "--precision", "bf16"], gpus=2),
        Cell("wav2vec2-base tp x2 bf16 --no-sequence-parallel", [*run, "--model", "wav2vec2-base", "--strategy", "tp",
                                                                  "--gpus", "2", *ENC, "--precision", "bf16",
                                                                  "--no-sequence-parallel"], gpus=2, guess_s=30),
        Cell("bench parity x2 tp", ["parity", "--gpus", "2", "--model", "transformer", "--strategies", "tp,tp:nosp"],
             expect="command", gpus=2, guess_s=60),
        Cell("wav2vec2-base fsdp x4 --tp 2 bf16 (2-D)", [*run, "--model", "wav2vec2-base", "--strategy", "fsdp", "--gpus",
                                                         "4", "--tp", "2", *ENC, "--precision", "bf16"], gpus=4,
             guess_s=40),
        Cell("wav2vec2-base hsdp x4 --dp-replicate 2 bf16", [*run, "--model", "wav2vec2-base", "--strategy", "hsdp",
                                                             "--gpus", "4", "--dp-replicate", "2", *ENC, "--precision",
                                                             "bf16"], gpus=4, guess_s=40),
        Cell("bench parity x4 meshes", ["parity", "--gpus", "4", "--model", "transformer", "--strategies",
                                        "fsdp:tp2,hsdp:rep2"], expect="command", gpus=4, guess_s=90),
        Cell("hubert-large single bf16", [*run, "--model", "hubert-large", *ENC, "--precision", "bf16"], gpus=2,
             guess_s=40),
        Cell(f"hubert-large fsdp x{n} bf16", [*run, "--model", "hubert-large", "--strategy", "fsdp", "--gpus", str(n),
                                              *ENC, "--precision", "bf16"], gpus=2, guess_s=60),
    ]


def visible_gpus() -> list[int]:
    """NVML's indices of the GPUs this process may use: CUDA_VISIBLE_DEVICES (integer indices) where it
    is set, which NVML does not heed, else every GPU NVML sees."""
    import pynvml

    pynvml.nvmlInit()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and all(x.strip().isdigit() for x in listed.split(",") if x.strip()):
        return [int(x) for x in listed.split(",") if x.strip()]
    if listed is not None:  # UUIDs or MIG names: CUDA's own count, NVML's first GPU for the name
        import torch

        return list(range(torch.cuda.device_count()))
    return list(range(pynvml.nvmlDeviceGetCount()))


def card() -> dict:
    """Name, memory and count of the GPUs, from NVML: asking CUDA would give this process a context
    (hundreds of MiB) that every cell would then share the card with."""
    import pynvml

    visible = visible_gpus()
    n = len(visible)
    h = pynvml.nvmlDeviceGetHandleByIndex(visible[0])
    name = pynvml.nvmlDeviceGetName(h)
    name = name.decode() if isinstance(name, bytes) else name
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    return {"name": name, "count": n, "memory_bytes": int(mem.total), "free_bytes": int(mem.free),
            "driver": str(pynvml.nvmlSystemGetDriverVersion())}


def largest_fitting(free_bytes: int) -> str | None:
    """The largest encoder whose estimate (bench/memory.py, on CUDA) fits 90 % of the card's free memory
    under fsdp bf16 at batch 8."""
    from bench.config import RunConfig
    from bench.memory import estimate

    for name in BY_SIZE:
        est = estimate(RunConfig(model=name, strategy="fsdp", devices=1, precision="bf16", batch_size=8,
                                 size="small"), "cuda")
        print(f"  {name}: estimated {est.text()}; free {free_bytes / 2**30:.1f} GiB", flush=True)
        if est.total_bytes < 0.9 * free_bytes:
            return name
    return None


def run_cell(cell: Cell, out: Path, timeout_s: float, device: str = "cuda") -> dict:
    """Run one cell; what it printed (the end), its exit code, its result file."""
    runs = out / "runs"
    argv = [*cell.argv, "--device", device]
    if cell.argv[0] in ("run", "comm", "tune"):
        argv += ["--out", str({"run": runs, "comm": out / "comm", "tune": out / "tune"}[cell.argv[0]])]
    env = {**os.environ, **cell.env}
    t = time.perf_counter()
    # a session of its own, so a timeout takes down torchrun's workers too (they hold the GPU)
    proc = subprocess.Popen([sys.executable, "-m", "bench", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        from bench.launch import kill_group

        kill_group(proc, 20)  # SIGTERM to the group, SIGKILL after 20 s
        stdout, stderr = proc.communicate()
        code, stderr = None, f"{stderr}\ntimed out after {timeout_s:.0f} s"
    lines = stdout.strip().splitlines()
    path = lines[-1] if lines and lines[-1].endswith(".json") and Path(lines[-1]).exists() else None
    return {"name": cell.name, "argv": argv, "env": cell.env, "exit": code, "seconds": time.perf_counter() - t,
            "result": path, "stdout_tail": stdout[-1500:], "stderr_tail": stderr[-1500:]}


def check_cell(cell: Cell, ran: dict) -> list[dict]:
    from bench import invariants
    from bench.results import load_result

    if cell.expect == "tune":
        return tune_checks(ran)
    if cell.expect == "command":
        ok = ran["exit"] == 0 and "FAIL" not in ran["stdout_tail"]
        return [asdict(invariants.Check("exit 0, no FAIL", ok, f"exit {ran['exit']}: {ran['stderr_tail'][-200:]}"))]
    if ran["result"] is None:
        return [asdict(invariants.Check("a result file", False, f"exit {ran['exit']}: {ran['stderr_tail'][-300:]}"))]
    result = load_result(ran["result"])
    checks = {"ok": invariants.of_run, "interrupted": invariants.interrupted,
              "oom": invariants.out_of_memory}[cell.expect](result)
    return [asdict(c) for c in checks]


def tune_checks(ran: dict) -> list[dict]:
    """bench tune --objective energy: exit 0, a tune.json in samples/J with a winner, every window's
    figure above 0 (a window NVML could not see fails its candidate, so an all-failed tune shows)."""
    from bench import invariants

    argv = ran["argv"]
    path = Path(argv[argv.index("--out") + 1]) / "tune.json"
    rec = json.loads(path.read_text()) if path.exists() else {}
    windows = [w for c in rec.get("candidates", []) for w in c.get("windows") or []]
    return [asdict(c) for c in (
        invariants.Check("exit 0", ran["exit"] == 0, f"exit {ran['exit']}: {ran['stderr_tail'][-200:]}"),
        invariants.Check("tune.json in samples/J with a winner", rec.get("unit") == "samples/J" and bool(rec.get("winner")),
                         f"unit {rec.get('unit')}, winner {rec.get('winner')}"),
        invariants.Check("every window above 0 samples/J", bool(windows) and min(windows) > 0,
                         f"{len(windows)} windows, least {min(windows) if windows else None}"))]


def write_report(out: Path, report: dict) -> None:
    from emotion_models.atomic import atomic_write_text

    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=1) + "\n")
    rows = ["| cell | check | verdict | detail |", "| --- | --- | --- | --- |"]
    for c in report["cells"]:
        for k in c.get("checks", []) or [{"name": "-", "ok": None, "detail": c.get("not_run", "")}]:
            verdict = {True: "ok", False: "FAIL", None: "cannot tell"}[k["ok"]] if "not_run" not in c else "not run"
            rows.append(f"| {c['name']} | {k['name']} | {verdict} | {str(k['detail']).replace('|', '/')[:160]} |")
    atomic_write_text(out / "gpu_check.md", f"{report['card']['name']} x{report['card']['count']}, driver "
                                            f"{report['card']['driver']}, {report['started']}\n\n" + "\n".join(rows) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="Folder for the result files, gpu_check.json and gpu_check.md.")
    ap.add_argument("--budget-s", type=float, default=420.0, help="Seconds the cells may take in all (default 420).")
    ap.add_argument("--only", default=None, help="Comma-separated cell names (as --list prints them) to run alone.")
    ap.add_argument("--list", action="store_true", help="List the cells and stop.")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); run it where there is one",
              file=sys.stderr)
        return 2
    gpu = card()
    cells = one_gpu_cells()
    print(f"{gpu['name']} x{gpu['count']}: {gpu['memory_bytes'] / 2**30:.1f} GiB each; the largest encoder that fits "
          "one under fsdp bf16 at batch 8:", flush=True)
    biggest = largest_fitting(gpu["free_bytes"])
    if biggest:
        cells.append(Cell(f"{biggest} fsdp x1 bf16 (the largest that fits)",
                          ["run", "--model", biggest, "--strategy", "fsdp", "--gpus", "1", *ENC[:-1], "8",
                           "--precision", "bf16"], guess_s=90))
    cells += [c for c in multi_gpu_cells(gpu["count"]) if c.gpus <= gpu["count"]] if gpu["count"] >= 2 else []
    if args.list:
        for c in cells:
            print(f"{c.name}: bench {' '.join(c.argv)}")
        return 0
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = wanted - {c.name for c in cells}
        if unknown:
            print(f"gpu_check: --only {sorted(unknown)}: no such cell (--list prints them)", file=sys.stderr)
            return 2
        cells = [c for c in cells if c.name in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"card": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget_s, "cells": []}
    t0 = time.perf_counter()
    for cell in cells:
        left = args.budget_s - (time.perf_counter() - t0)
        if left < cell.guess_s:
            report["cells"].append({"name": cell.name, "not_run": f"budget: {left:.0f} s left, about {cell.guess_s:.0f} "
                                                                  "s needed (--only runs it alone)"})
            write_report(out, report)
            continue
        print(f"$ bench {' '.join(cell.argv)}", flush=True)
        ran = run_cell(cell, out, timeout_s=max(60.0, min(left, 4 * cell.guess_s + 60)))
        ran["checks"] = check_cell(cell, ran)
        report["cells"].append(ran)
        write_report(out, report)
        for k in ran["checks"]:
            verdict = {True: "ok", False: "FAIL", None: "cannot tell"}[k["ok"]]
            print(f"  {verdict:11} {k['name']}: {k['detail']}", flush=True)
        print(f"  ({ran['seconds']:.0f} s, exit {ran['exit']})", flush=True)
    checks = [k for c in report["cells"] for k in c.get("checks", [])]
    failed = [k for k in checks if k["ok"] is False]
    not_run = [c["name"] for c in report["cells"] if "not_run" in c]
    print(f"gpu_check: {len(checks)} checks, {len(failed)} failed, "
          f"{sum(k['ok'] is None for k in checks)} could not tell; {len(not_run)} cells not run"
          + (f" ({', '.join(not_run)})" if not_run else "") + f"; {time.perf_counter() - t0:.0f} s; {out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
