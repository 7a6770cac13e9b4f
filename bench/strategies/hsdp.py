"""HSDP: FSDP2 over a 2-D mesh, sharded within each group of ranks, replicated across the groups.

The preset of `--strategy fsdp --dp-replicate R` whose R defaults to the node count: each node
holds one sharded copy (reduce-scatter over the fast links inside it), and the copies' gradients
are all-reduced across nodes. Everything else is fsdp's (bench/strategies/fsdp.py)."""
from __future__ import annotations

from ..config import ConfigError
from . import Plan, register, replicas
from .fsdp import _check as fsdp_check
from .fsdp import fsdp


def _check(cfg, device_type):
    if replicas(cfg) < 2:
        raise ConfigError(f"--strategy hsdp replicates the sharded model across nodes, and this run has --nnodes "
                          f"{cfg.nodes}: give --dp-replicate R (2 or more replicas of --gpus / R ranks each), or use fsdp")
    fsdp_check(cfg, device_type)


@register("hsdp", order=42, multiprocess=True, check=_check,
          summary="HSDP: FSDP2 sharded within each node (or --dp-replicate group), replicated across them")
def hsdp(model, env, cfg) -> Plan:
    return fsdp(model, env, cfg)
