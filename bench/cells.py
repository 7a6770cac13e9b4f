"""How a cell of the matrix is named: its key (file names, sweeps) and its label (tables, plots, verdicts)."""
from __future__ import annotations

from collections.abc import Mapping


def _getter(c):
    return c.get if isinstance(c, Mapping) else (lambda k: getattr(c, k))


def cell_key(cfg) -> str:
    """'cnn-ddp-2x-fp32-eager-weak-b32-r0': a sweep cell's run_id and result file name (memory and
    accumulation settings and mesh degrees added where they are not the default: '-tp2', '-ga2',
    '-acfull', '-offload')."""
    comp = "compiled" if cfg.compile else "eager"
    extra = "".join(f"-{part}" for part in setting_parts(_getter(cfg), key=True))
    return (f"{cfg.model}-{cfg.strategy}-{cfg.devices}x-{cfg.precision}-{comp}-{cfg.scaling}-b{cfg.batch_size}{extra}"
            f"-r{cfg.repeat}")


def setting_parts(g, key: bool = False) -> list[str]:
    """The settings beyond strategy, devices, precision, compile and batch that make a cell, where
    not the default: mesh degrees (--pp, --dp-replicate, --tp), accumulation, activation checkpointing,
    FSDP2's offload and resharding. A frame row names them ac / reshard, a RunConfig ac /
    reshard_after_forward."""
    def get(name, default):
        return _get(g, name, default)

    parts = []
    # the mesh beside a strategy's own dimension: --dp-replicate R replicas, --tp T tensor-parallel ranks
    for name, tag in (("pp", "pp"), ("dp_replicate", "rep"), ("tp", "tp")):
        if int(get(name, 1)) > 1:
            parts.append(f"{tag}{int(get(name, 1))}")
    if not get("sequence_parallel", True) and (int(get("tp", 1)) > 1 or get("strategy", "") == "tp"):
        parts.append("nosp")  # tensor parallel without sequence parallel
    k = int(get("grad_accum", 1))
    if k > 1:
        parts.append(f"ga{k}")
    ac = get("ac", "none")
    if ac != "none":
        parts.append(f"ac{ac}" if key else f"ac-{ac}")
    if get("offload", False):
        parts.append("offload")
    reshard = get("reshard", None) or get("reshard_after_forward", "auto")
    if reshard != "auto":
        parts.append(f"reshard{reshard}" if key else f"reshard-{reshard}")
    return parts


def cell_label(c, *, batch: bool = True, from_config: bool = False, short: bool = False) -> str:
    """'cnn ddp 2x fp32 compiled b32': how tables, plots and verdicts name a cell (a frame row or mapping).

    batch=False where cells are matched regardless of their batch (the hardware comparison).
    from_config=True where c is a RunConfig or its dict (the gate's cells), which has no batch per
    device: it follows from batch_size, scaling and devices.
    short=True: 'ddp x2', the strategy and device count alone, where everything else is the same
    throughout (a benchmark's own figures).
    """
    g = _getter(c)
    if short:
        return f"{g('strategy')} x{g('devices')}"
    text = f"{g('model')} {g('strategy')} {g('devices')}x {g('precision')}{' compiled' if g('compile') else ''}"
    extra = "".join(f" {part}" for part in setting_parts(g))
    if not batch:
        return text + extra
    return text + f" b{_config_batch_per_device(g) if from_config else g('batch_per_device')}" + extra


def _config_batch_per_device(g) -> int:
    """A RunConfig's batch per device: batch_size under weak scaling, its share of it under strong."""
    k = int(_get(g, "grad_accum", 1))
    return g("batch_size") if g("scaling") == "weak" else g("batch_size") // (g("devices") * k)


def _get(g, name: str, default):
    """A setting a cell may lack (a result from before it existed, a NaN in a frame): the default."""
    try:
        v = g(name)
    except (AttributeError, KeyError):
        return default
    return default if v is None or v != v else v


def series_label(c) -> str:
    """'cnn ddp fp32': a line across device counts in a plot."""
    g = _getter(c)
    return f"{g('model')} {g('strategy')} {g('precision')}{' compiled' if g('compile') else ''}"
