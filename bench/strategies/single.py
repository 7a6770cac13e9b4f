"""One device, one process: the baseline every other cell is compared against."""
from __future__ import annotations

from . import Plan, register


@register("single", order=10, multiprocess=False, summary="one device, one process (the baseline)")
def single(model, env, cfg) -> Plan:
    return Plan(model=model, input_device=env.device, eval_module=lambda: model)
