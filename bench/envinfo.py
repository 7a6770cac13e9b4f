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


# Dense peak TFLOP/s per device, from the vendors' data sheets (half their "with sparsity" tensor
# figures), keyed by the exact name CUDA and NVML report (`nvidia-smi --query-gpu=name`). Matched
# whole, never by substring: "NVIDIA H100 NVL" is not an H100 SXM, "NVIDIA L40" is not an L4, and
# a name that is not here has no peak (torchtitan's fallback to A100's peak gave its users 200 %
# MFU on B200). fp32 is the plain FP32 rate; tf32 the TF32 tensor-core rate, which fp32 runs are
# compared with when TF32 is allowed for convolutions or matmuls (cuDNN allows it by default).
_HOPPER_SXM = {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}  # H100 SXM5, H200 SXM
_HOPPER_NVL = {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}  # H100 NVL, H200 NVL
_A100 = {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}  # SXM4 and PCIe, 40 and 80 GB
PEAK_TFLOPS: dict[str, tuple[str, dict[str, float]]] = {
    "NVIDIA H100 80GB HBM3": ("H100 SXM", _HOPPER_SXM),
    "NVIDIA H100 PCIe": ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5}),
    "NVIDIA H100 NVL": ("H100 NVL", _HOPPER_NVL),
    "NVIDIA H200": ("H200 SXM", _HOPPER_SXM),
    "NVIDIA H200 NVL": ("H200 NVL", _HOPPER_NVL),
    "NVIDIA A100-SXM4-40GB": ("A100 SXM4 40GB", _A100),
    "NVIDIA A100-SXM4-80GB": ("A100 SXM4 80GB", _A100),
    "NVIDIA A100-PCIE-40GB": ("A100 PCIe 40GB", _A100),
    "NVIDIA A100 80GB PCIe": ("A100 PCIe 80GB", _A100),
    "NVIDIA L4": ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    "NVIDIA L40": ("L40", {"fp32": 90.5, "tf32": 90.5, "bf16": 181.0, "fp16": 181.0}),
    "NVIDIA L40S": ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0}),
    "NVIDIA B200": ("B200 (HGX)", {"fp32": 75.0, "tf32": 1100.0, "bf16": 2250.0, "fp16": 2250.0}),
    "NVIDIA GB200": ("GB200", {"fp32": 80.0, "tf32": 1250.0, "bf16": 2500.0, "fp16": 2500.0}),
    "NVIDIA A10": ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    "Tesla T4": ("T4", {"fp32": 8.1, "fp16": 65.0}),
    "Tesla V100-SXM2-16GB": ("V100 SXM2", {"fp32": 15.7, "fp16": 125.0}),
    "Tesla V100-SXM2-32GB": ("V100 SXM2", {"fp32": 15.7, "fp16": 125.0}),
}


def math_settings() -> dict:
    """The settings in force that decide what an fp32 run computes in, recorded with its MFU."""
    out = {"float32_matmul_precision": torch.get_float32_matmul_precision(),
           "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
           "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
           "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
           "cudnn_deterministic": bool(torch.backends.cudnn.deterministic)}
    for name, obj in (("cudnn_conv_fp32_precision", getattr(torch.backends.cudnn, "conv", None)),
                      ("cuda_matmul_fp32_precision", torch.backends.cuda.matmul)):
        value = getattr(obj, "fp32_precision", None)
        if isinstance(value, str):
            out[name] = value
    return out


def peak_tflops(device_name: str | None, precision: str, override: float | None,
                settings: dict | None = None) -> tuple[float | None, str]:
    """The per-device peak used for MFU and where it came from; None where no peak is known."""
    if override:
        return override, "--peak-tflops"
    if not device_name:
        return None, "no peak for a CPU: pass --peak-tflops"
    known = PEAK_TFLOPS.get(device_name.strip())
    if known is None:
        return None, f"no peak known for {device_name.strip()}: pass --peak-tflops"
    card, table = known
    kind = precision
    why = ""
    if precision == "fp32":
        s = settings if settings is not None else math_settings()
        if s.get("cudnn_allow_tf32") or s.get("cuda_matmul_allow_tf32"):
            kind = "tf32" if "tf32" in table else "fp32"
            allowed = " and ".join(n for n, k in (("convolutions (cuDNN)", "cudnn_allow_tf32"),
                                                  ("matmuls", "cuda_matmul_allow_tf32")) if s.get(k))
            why = f"; fp32 with TF32 allowed for {allowed}"
    if not table.get(kind):
        return None, f"no {kind} peak known for {device_name.strip()}: pass --peak-tflops"
    return table[kind], f"data sheet ({card}, {kind}, dense{why})"
