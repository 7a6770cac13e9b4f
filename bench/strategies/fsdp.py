"""FSDP2: fully_shard each block, then the root; parameters, gradients and optimiser state sharded."""
from __future__ import annotations

import torch

from emotion_models.models import rebuild

from . import Plan, register

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@register("fsdp", order=40, multiprocess=True,
          summary="FSDP2 fully_shard per block then the root; MixedPrecisionPolicy for bf16/fp16")
def fsdp(model, env, cfg) -> Plan:
    # imported here, not at the top: commands that only name the strategies (bench list) skip their cost
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    dtype = _DTYPES.get(cfg.precision)
    # FSDP2 casts parameters itself (param_dtype) and reduces gradients in fp32; no autocast on top
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    if dtype:
        # BatchNorm keeps fp32 parameters and statistics (its own group, inputs cast up), as autocast
        # does; with bf16 weights its fp32 running stats would not even type-check on CPU. Its output
        # goes back to the compute dtype: the next layer of its block has bf16 weights (torchaudio's
        # conformer convolution module feeds BatchNorm1d straight into a Conv1d)
        bn = MixedPrecisionPolicy(param_dtype=torch.float32, output_dtype=dtype)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                fully_shard(module, mesh=mesh, mp_policy=bn)
    for block in model.blocks:  # per block first, so each block's all-gather overlaps the previous block
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)

    def eval_module():
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not env.is_main:
            return None
        full = rebuild(model).to(env.device)
        full.load_state_dict(state)
        return full

    def scaler():
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler()

    return Plan(model=model, input_device=env.device, autocast=False, eval_module=eval_module, grad_scaler=scaler)
