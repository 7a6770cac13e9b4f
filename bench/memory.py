"""Training memory per device, estimated before a run starts, and the check that refuses a run
that cannot fit.

    weights + gradients + AdamW state (two moments) = 4 + 4 + 8 bytes per parameter (fp32 master
    weights: autocast keeps them, and FSDP2 keeps its shards in fp32 too)
    ddp            + 4 bytes per parameter: the reducer's gradient buckets
    fsdp at N      (4 + 4 + 8) / N bytes per parameter, plus the largest block unsharded twice (the
                   one computing and the one prefetched, in the parameter dtype) and its gradients
    pipeline, model-parallel   the largest stage's parameters, 16 bytes each
    activations    the tensors autograd saves for backward, measured by running the model on
                   fake tensors (no memory, no compute) at this run's per-device batch, under
                   autocast for bf16/fp16; pipeline: one micro-batch per stage in flight (1F1B)
                   or all of them (GPipe), of the largest stage's share. Fake tensors import
                   torch._dynamo, 1.3 s of CPU that a launcher otherwise never pays: each count
                   is kept in the cache folder (activation_bytes.json) under a key of the model
                   code, this file, torch's and torchaudio's versions and the count's arguments
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from emotion_models.atomic import atomic_write_text
from emotion_models.dataset import default_cache_dir
from emotion_models.models import build_model

from .config import ConfigError, RunConfig

GiB = 2**30


@dataclass(frozen=True)
class Estimate:
    weights_bytes: int  # parameters, gradients and optimiser state on the device
    extra_bytes: int  # DDP buckets, FSDP's unsharded block
    activations_bytes: int
    note: str  # what the extra is
    batch: int = 0  # samples per device (per micro-batch for pipeline) the activations were measured at

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.extra_bytes + self.activations_bytes

    def text(self) -> str:
        extra = f", {self.note} {self.extra_bytes / GiB:.1f}" if self.extra_bytes else ""
        return (f"{self.total_bytes / GiB:.1f} GiB per device (params + grads + AdamW {self.weights_bytes / GiB:.1f}"
                f"{extra}, activations {self.activations_bytes / GiB:.1f} at batch {self.batch})")


@functools.lru_cache(maxsize=64)
def _shape(model: str, size: str) -> tuple[int, int, tuple[int, ...]]:
    """(parameters, parameters of the largest block, parameters per block) from a meta-device build."""
    m = build_model(model, size=size, device="meta")
    per_block = tuple(sum(p.numel() for p in b.parameters()) for b in m.blocks)
    return sum(per_block), max(per_block), per_block


@functools.lru_cache(maxsize=1)
def _code_key() -> str:
    """What a count depends on besides its arguments: the model code, this file, the versions of torch
    and torchaudio (whose builders make the speech encoders)."""
    import torchaudio

    import emotion_models

    h = hashlib.sha256(f"{torch.__version__} {torchaudio.__version__}".encode())
    for f in sorted(Path(emotion_models.__file__).parent.rglob("*.py")) + [Path(__file__)]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def activation_bytes(model: str, size: str, batch: int, precision: str) -> int:
    """Bytes autograd saves for backward in one forward at this batch (counted once per code)."""
    path = default_cache_dir() / "activation_bytes.json"
    code = _code_key()
    key = f"{code} {model} {size} {batch} {precision}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: count
        known = {}
    known = known if isinstance(known, dict) else {}
    n = known.get(key)
    if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
        return n
    n = _measure_activation_bytes(model, size, batch, precision)
    # entries of this code and the 3 codes seen last stay (checkouts sharing a cache folder), older go
    codes = list(dict.fromkeys(k.split(" ")[0] for k in known))  # in order of first entry
    keep = set(codes[-3:]) | {code}
    kept = {k: v for k, v in known.items() if k.split(" ")[0] in keep and k != key}
    try:
        atomic_write_text(path, json.dumps({**kept, key: n}))
    except OSError:  # a read-only cache folder costs time, not correctness
        pass
    return n


def _measure_activation_bytes(model: str, size: str, batch: int, precision: str) -> int:
    """Bytes autograd saves for backward in one forward at this batch, measured on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    saved: dict[int, torch.Tensor] = {}
    with FakeTensorMode():
        m = build_model(model, size=size)
        params = {id(p) for p in m.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            base = t._base if t._base is not None else t
            if id(base) not in params:
                saved[id(base)] = base  # held, so no id is reused by another tensor meanwhile
            return t

        x = torch.randn(batch, m.n_features, m.frames)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            m(x)
    return sum(t.numel() * t.element_size() for t in saved.values())


def static_bytes(cfg: RunConfig) -> tuple[int, int, str]:
    """(params + grads + AdamW state, the strategy's extra, what the extra is) on the busiest device."""
    params, largest_block, per_block = _shape(cfg.model, cfg.model_size)
    if cfg.strategy in ("pipeline", "model-parallel"):
        return 16 * max(sum(per_block[a:b]) for a, b in _bounds(cfg)), 0, "stage"
    if cfg.strategy == "fsdp":
        param_bytes = 2 if cfg.precision in ("bf16", "fp16") else 4
        return 16 * params // cfg.devices, largest_block * (2 * param_bytes + 4), "unsharded block"
    if cfg.strategy == "ddp":
        return 16 * params, 4 * params, "gradient buckets"
    return 16 * params, 0, "nothing else"


def estimate(cfg: RunConfig) -> Estimate:
    """The memory one device needs for cfg (the busiest device where they differ)."""
    weights, extra, note = static_bytes(cfg)
    params, _, per_block = _shape(cfg.model, cfg.model_size)
    if cfg.strategy in ("pipeline", "model-parallel"):
        share = weights / 16 / max(params, 1)
        m = _microbatches(cfg)
        micro = cfg.global_batch_size if cfg.strategy == "model-parallel" else cfg.global_batch_size // m
        in_flight = 1 if cfg.strategy == "model-parallel" else (m if cfg.schedule == "gpipe" else cfg.devices)
        acts = int(activation_bytes(cfg.model, cfg.model_size, micro, cfg.precision) * share * in_flight)
    else:
        micro = max(cfg.global_batch_size // cfg.devices, 1)
        acts = activation_bytes(cfg.model, cfg.model_size, micro, cfg.precision)
    return Estimate(weights, extra, acts, note, micro)


def _bounds(cfg: RunConfig) -> list[tuple[int, int]]:
    return build_model(cfg.model, size=cfg.model_size, device="meta").stage_boundaries(cfg.devices)


def _microbatches(cfg: RunConfig) -> int:
    return cfg.microbatches or 2 * cfg.devices


def free_bytes(cfg: RunConfig, device_type: str) -> tuple[int, str]:
    """Memory a device of this run can use, and where that figure comes from."""
    if device_type == "cuda":
        from .monitor import free_device_bytes

        local = cfg.devices // cfg.nodes if cfg.strategy != "single" else 1
        free = [free_device_bytes(i) for i in range(max(1, min(local, torch.cuda.device_count())))]
        return min(free), f"free on the fullest of {len(free)} local GPU(s)" if len(free) > 1 else "free on cuda:0"
    import psutil

    from .strategies import get_strategy

    workers = cfg.devices // cfg.nodes if get_strategy(cfg.strategy).multiprocess else 1
    return psutil.virtual_memory().available // workers, f"available RAM / {workers} worker process(es)"


def out_of_memory(device: torch.device, step: int) -> str:
    """The line a run that ran out of memory ends with: where, how much, and the way out."""
    import psutil

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        from .monitor import peak_rss_bytes

        peak = peak_rss_bytes()
        total = psutil.virtual_memory().total
    return (f"out of memory at step {step}, peak {peak / GiB:.1f} GiB of {total / GiB:.1f} GiB on {device}: "
            "try --strategy fsdp, a smaller --batch-size or --precision bf16")


def check_fits(cfg: RunConfig, device_type: str) -> Estimate:
    """Refuse, in one line with the estimate and the way out, a run that cannot fit."""
    est = estimate(cfg)
    free, where = free_bytes(cfg, device_type)
    if est.total_bytes > free:
        ways = []
        if cfg.strategy != "fsdp":
            ways.append("--strategy fsdp (shards parameters, gradients and AdamW state)")
        ways.append("a smaller --batch-size")
        if cfg.precision == "fp32":
            ways.append("--precision bf16")
        raise ConfigError(f"{cfg.model} ({cfg.model_size}) does not fit: estimated {est.text()} > "
                          f"{free / GiB:.1f} GiB {where}; try {', '.join(ways)}")
    return est
