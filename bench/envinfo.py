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
    """The settings in force that decide what an fp32 run computes in, recorded with its MFU. Each is
    read on its own: torch raises on reading a legacy flag once the new fp32_precision API is used."""
    out: dict = {}
    reads = {"float32_matmul_precision": torch.get_float32_matmul_precision,
             "cuda_matmul_allow_tf32": lambda: bool(torch.backends.cuda.matmul.allow_tf32),
             "cudnn_allow_tf32": lambda: bool(torch.backends.cudnn.allow_tf32),
             "cudnn_benchmark": lambda: bool(torch.backends.cudnn.benchmark),
             "cudnn_deterministic": lambda: bool(torch.backends.cudnn.deterministic),
             "cudnn_conv_fp32_precision": lambda: torch.backends.cudnn.conv.fp32_precision,
             "cuda_matmul_fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision}
    for name, read in reads.items():
        try:
            out[name] = read()
        except Exception:  # a flag this torch does not have, or a mix of the two APIs
            out[name] = None
    return out


def _tf32(settings: dict, legacy: str, new: str) -> bool:
    """Whether TF32 is allowed for cuDNN or for matmuls, by whichever API says so."""
    return bool(settings.get(legacy)) or settings.get(new) == "tf32"


def peak_tflops(device_name: str | None, precision: str, override: float | None,
                settings: dict | None = None, cudnn_share: float = 1.0) -> tuple[float | None, str]:
    """The per-device peak used for MFU and where it came from; None where no peak is known.

    An fp32 run computes its cuDNN work (convolutions, RNNs; cudnn_share of the FLOPs) in TF32 where
    cuDNN allows it (torch's default) and its matmuls in TF32 only where they are allowed too (not
    by default): its peak is the rate at which the card would do that mix, share / peak_cudnn +
    (1 - share) / peak_matmul seconds per FLOP. A single peak would flatter one kind of model or
    the other: the CNN's FLOPs are all convolutions, the transformer's all matmuls."""
    if override:
        return override, "--peak-tflops"
    if not device_name:
        return None, "no peak for a CPU: pass --peak-tflops"
    known = PEAK_TFLOPS.get(device_name.strip())
    if known is None:
        return None, f"no peak known for {device_name.strip()}: pass --peak-tflops"
    card, table = known
    if precision != "fp32":
        if not table.get(precision):
            return None, f"no {precision} peak known for {device_name.strip()}: pass --peak-tflops"
        return table[precision], f"data sheet ({card}, {precision}, dense)"
    s = settings if settings is not None else math_settings()
    kinds = {"cuDNN": "tf32" if _tf32(s, "cudnn_allow_tf32", "cudnn_conv_fp32_precision") else "fp32",
             "matmuls": "tf32" if _tf32(s, "cuda_matmul_allow_tf32", "cuda_matmul_fp32_precision") else "fp32"}
    rates = {part: table.get(kind) for part, kind in kinds.items()}
    if None in rates.values():
        return None, f"no tf32 peak known for {device_name.strip()}: pass --peak-tflops"
    share = min(max(cudnn_share, 0.0), 1.0)
    peak = 1.0 / (share / rates["cuDNN"] + (1 - share) / rates["matmuls"])
    if kinds["cuDNN"] == kinds["matmuls"]:
        return peak, f"data sheet ({card}, {kinds['cuDNN']}, dense)"
    return peak, (f"data sheet ({card}, fp32, dense: {share:.0%} of the FLOPs in cuDNN at {kinds['cuDNN']} "
                  f"{rates['cuDNN']:g}, {1 - share:.0%} in matmuls at {kinds['matmuls']} {rates['matmuls']:g}: "
                  f"{peak:.1f} TFLOP/s for this mix)")
