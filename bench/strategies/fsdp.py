"""FSDP2: fully_shard each block, then the root; parameters, gradients and optimiser state sharded.

Its mesh has up to three dimensions (torchtitan's order, tp innermost): --dp-replicate R replicas
(HSDP: gradients reduce-scattered within a replica's shard group, then all-reduced across the R
groups), S shards, and with --tp T tensor parallel inside each layer (bench/strategies/tp.py), which
is applied first; fully_shard then shards over the data-parallel dimensions only (2-D, as
torchtitan's parallelize does). The T ranks of a tensor-parallel group train on the same samples."""
from __future__ import annotations

import contextlib

import torch

from ..config import ConfigError
from . import Plan, degrees, register

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _check(cfg, device_type):
    if cfg.tp > 1:
        from .tp import check_degree

        check_degree(cfg, cfg.tp, f"--tp {cfg.tp}")
    if cfg.offload and device_type != "cuda":
        raise ConfigError("--offload moves FSDP2's parameters, gradients and optimiser state from the GPU to the "
                          "host; on CPU they live on the host already: drop --offload")


RESHARD = {"auto": None, "true": True, "false": False}  # --reshard-after-forward -> fully_shard's argument


@register("fsdp", order=40, multiprocess=True, check=_check,
          summary="FSDP2 fully_shard per block then the root; MixedPrecisionPolicy for bf16/fp16")
def fsdp(model, env, cfg) -> Plan:
    # imported here, not at the top: commands that only name the strategies (bench list) skip their cost
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh, dp_mesh, tp_degree = _meshes(env, cfg)
    if tp_degree > 1:
        from .tp import parallelize

        parallelize(model, mesh["tp"], cfg.sequence_parallel)
    dtype = _DTYPES.get(cfg.precision)
    # --offload: sharded parameters and gradients live on the host, the optimiser steps there (pinned
    # memory for the copies); --reshard-after-forward: the blocks' and the root's (auto: FSDP2's own
    # choice, True for the blocks and False for the root, which backward needs first anyway)
    offload = CPUOffloadPolicy(pin_memory=True) if cfg.offload else OffloadPolicy()
    reshard = RESHARD[cfg.reshard_after_forward]
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
                # offloaded like every other group: the optimiser then steps every parameter on the host
                fully_shard(module, mesh=dp_mesh, mp_policy=bn, offload_policy=offload)
    for block in model.blocks:  # per block first, so each block's all-gather overlaps the previous block
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard)

    def eval_module():
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        from .tp import full_model  # rank 0's full model, the model's own keys (--tp: q, k, v packed again)

        return full_model(model, env, state)

    def scaler():
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler()

    @contextlib.contextmanager
    def sync(last: bool):
        # --grad-accum: unsharded gradients accumulate locally; the last micro-step reduce-scatters them
        model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return Plan(model=model, input_device=env.device, autocast=False, eval_module=eval_module, grad_scaler=scaler,
                sync=sync, data_slice=(env.rank // tp_degree, env.world_size // tp_degree),
                info={"reshard_after_forward": cfg.reshard_after_forward, "offload": cfg.offload})


def _meshes(env, cfg):
    """(the whole mesh, its data-parallel part fully_shard takes, the tensor-parallel degree): only
    dimensions of more than 1 besides the shard dimension, so plain fsdp keeps its 1-D mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    d = degrees(cfg)
    dims = [name for name in ("dp_replicate", "dp_shard", "tp") if d[name] > 1 or name == "dp_shard"]
    mesh = init_device_mesh(env.device.type, tuple(d[name] for name in dims), mesh_dim_names=tuple(dims))
    dp = [name for name in dims if name != "tp"]
    return mesh, (mesh if dims == dp else mesh[tuple(dp)] if len(dp) > 1 else mesh[dp[0]]), d["tp"]
