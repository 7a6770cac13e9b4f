"""The hardware and software fingerprint recorded with every result."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

import psutil
import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git() -> dict:
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    out = []
    driver = None
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        pass
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory),
                    "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                    "driver": driver})
    return out


def fingerprint() -> dict:
    """Host, OS, CPU, RAM, GPUs, CUDA/cuDNN/NCCL, torch, torchaudio, Python, git."""
    import torchaudio

    nccl = None
    try:
        if torch.cuda.is_available():
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:
        pass
    gpus = _gpus()
    env = {
        "host": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "ram_bytes": psutil.virtual_memory().total,
        "gpus": gpus,
        "gpu_count": len(gpus),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "nccl": nccl,
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "git": _git(),
    }
    env["hardware_id"] = hardware_id(env)
    return env


def hardware_id(env: dict) -> str:
    """A short id of the hardware alone (CPU, cores, GPUs), for telling machines apart."""
    key = {"cpu": env.get("cpu_model"), "cores": env.get("cpu_cores_logical"),
           "gpus": [g.get("name") for g in env.get("gpus") or []]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


# Dense peak FLOP/s per device, TFLOP/s, from the vendors' data sheets (no sparsity). fp32 is
# the plain FP32 (non-tensor-core) figure: torch does not use TF32 for matmuls by default.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "H100 SXM": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "H100 PCIe": {"fp32": 51.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0},
    "L40S": {"fp32": 91.6, "bf16": 362.0, "fp16": 362.0},
    "L4": {"fp32": 30.3, "bf16": 121.0, "fp16": 121.0},
    "A10": {"fp32": 31.2, "bf16": 125.0, "fp16": 125.0},
    "V100": {"fp32": 15.7, "bf16": 0.0, "fp16": 125.0},
    "T4": {"fp32": 8.1, "bf16": 0.0, "fp16": 65.0},
}


def peak_tflops(device_name: str | None, precision: str, override: float | None) -> tuple[float | None, str]:
    """The per-device peak used for MFU and where it came from."""
    if override:
        return override, "--peak-tflops"
    if not device_name:
        return None, "unknown (CPU: no peak table; pass --peak-tflops)"
    for key, table in PEAK_TFLOPS.items():  # ordered: specific names first
        if key.lower() in device_name.lower() and table.get(precision):
            return table[precision], f"data sheet ({key}, {precision}, dense)"
    return None, f"unknown ({device_name}: not in the peak table; pass --peak-tflops)"
