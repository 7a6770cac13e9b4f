"""N replicas training side by side with no communication: data parallelism's compute-only bound.

Each process trains its own copy on its own slice of the global batch, as ddp does, but never
synchronises gradients, so its step time is what ddp's would be with free communication. Against
single it measures what workers lose by sharing a machine (CPU cores, memory bandwidth, host-side
data loading, PCIe), against ddp what communication costs; `bench predict` reads it as the
contention factor of N devices per node. Not a way to train a model: the replicas drift apart, and
the reported quality is rank 0's replica, trained on 1/N of the data.
"""
from __future__ import annotations

from . import Plan, register


@register("independent", order=70, multiprocess=True,
          summary="N replicas side by side, no gradient sync: ddp's compute-only bound (contention, not training)")
def independent(model, env, cfg) -> Plan:
    return Plan(model=model, input_device=env.device, eval_module=lambda: model if env.is_main else None)
