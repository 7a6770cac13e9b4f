"""How a cell of the matrix is named: its key (file names, sweeps) and its label (tables, plots, verdicts)."""
from __future__ import annotations

from collections.abc import Mapping


def _getter(c):
    return c.get if isinstance(c, Mapping) else (lambda k: getattr(c, k))


def cell_key(cfg) -> str:
    """'cnn-ddp-2x-fp32-eager-weak-b32-r0': a sweep cell's run_id and result file name."""
    comp = "compiled" if cfg.compile else "eager"
    return f"{cfg.model}-{cfg.strategy}-{cfg.devices}x-{cfg.precision}-{comp}-{cfg.scaling}-b{cfg.batch_size}-r{cfg.repeat}"


def cell_label(c, *, batch: bool = True) -> str:
    """'cnn ddp 2x fp32 compiled b32': how tables, plots and verdicts name a cell (a frame row or mapping).

    batch=False where cells are matched regardless of their batch (the hardware comparison).
    """
    g = _getter(c)
    text = f"{g('model')} {g('strategy')} {g('devices')}x {g('precision')}{' compiled' if g('compile') else ''}"
    return text + (f" b{g('batch_per_device')}" if batch else "")


def series_label(c) -> str:
    """'cnn ddp fp32': a line across device counts in a plot."""
    g = _getter(c)
    return f"{g('model')} {g('strategy')} {g('precision')}{' compiled' if g('compile') else ''}"
