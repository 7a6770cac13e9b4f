"""One rank of tensor parallel over --tp T, alone in one process, without communication: bench
predict's compute anchor for tp.

The model is given one rank's shapes (bench/strategies/tp.py localize, the shapes the memory estimate
counts): T times fewer heads and hidden units in the column-parallel projections, T times fewer inputs
in the row-parallel ones; with sequence parallel, rank 0's part of the sequence between them and the
whole where tp gathers it. What a rank of tp x T computes on its group's batch, it computes here
at --batch-size: run it at T x the tp run's --batch-size per device (a tensor-parallel group of T
shares T x b samples). Its step time then measures what the FLOP share cannot: the work every rank
repeats whole (elementwise ops, the gathered inputs, the head), as this device runs it. Its losses
and F1 are those of a model of other shapes: a timing, not a training of the model.
"""
from __future__ import annotations

from ..config import ConfigError
from . import Plan, register


def _check(cfg, device_type):
    from .tp import check_degree

    if cfg.devices != 1 or cfg.tp < 2:
        raise ConfigError(f"--strategy tp-rank is one rank of tensor parallel over --tp T (2 or more), in one process: "
                          f"use --gpus 1 --tp T (got --gpus {cfg.devices} --tp {cfg.tp})")
    check_degree(cfg, cfg.tp, f"--strategy tp-rank --tp {cfg.tp}")


@register("tp-rank", order=46, multiprocess=False, check=_check,
          summary="one rank of tp over --tp T alone (its shapes, no communication) at T x the tp batch: bench "
                  "predict's compute anchor for tensor parallel")
def tp_rank(model, env, cfg) -> Plan:
    from .tp import layers, localize

    localize(model, cfg.tp, cfg.sequence_parallel)
    return Plan(model=model, input_device=env.device, eval_module=lambda: model, info={"tp_layers": len(layers(model))})
