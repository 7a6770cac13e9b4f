"""Tensor parallel (Megatron style, torch.distributed.tensor.parallel) over all N ranks.

Inside each transformer layer of the speech encoders, q, k and v and the feed-forward network's
first projection are column-parallel (each rank computes its share of the heads and hidden units)
and the attention output and the second projection row-parallel (each rank's partial sums are
all-reduced): two all-reduces a layer forward, two backward. Every rank trains on the whole global
batch. The rest of the model (the convolutional front end, layer norms, the head) is replicated,
and so are its gradients: every rank computes them from the same all-reduced activations.

Not yet: sequence parallel for the layer norms and dropouts, and the packed attention of
nn.MultiheadAttention (the small transformer, conformer, WavLM), whose q, k and v share one weight.
"""
from __future__ import annotations

import torch

from emotion_models.models import build_model, rebuild

from ..config import ConfigError
from . import Plan, register


def layers(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(attention, feed-forward) of each layer with separate q, k, v projections (torchaudio's
    wav2vec 2.0 SelfAttention and FeedForward: wav2vec2, HuBERT, XLS-R)."""
    found = []
    for m in model.modules():
        att, ff = getattr(m, "attention", None), getattr(m, "feed_forward", None)
        if att is not None and ff is not None and all(hasattr(att, p) for p in ("q_proj", "k_proj", "v_proj",
                                                                              "out_proj", "num_heads")) \
                and hasattr(ff, "intermediate_dense") and hasattr(ff, "output_dense"):
            found.append((att, ff))
    return found


def sharded_params(model) -> int:
    """Parameters tensor parallel divides over its ranks (the projections' weights and biases, except
    the row-parallel biases, which every rank keeps whole)."""
    total = 0
    for att, ff in layers(model):
        for lin in (att.q_proj, att.k_proj, att.v_proj, ff.intermediate_dense):
            total += sum(p.numel() for p in lin.parameters())
        total += att.out_proj.weight.numel() + ff.output_dense.weight.numel()
    return total


def _check(cfg, device_type):
    model = build_model(cfg.model, size=cfg.model_size, device="meta")
    found = layers(model)
    if not found:
        raise ConfigError(f"--strategy tp: {cfg.model} has no attention with separate q, k, v projections (tensor "
                          "parallel runs wav2vec2, HuBERT and XLS-R encoders; not yet nn.MultiheadAttention's packed "
                          "one); use ddp or fsdp for it")
    heads = found[0][0].num_heads
    hidden = found[0][1].intermediate_dense.out_features
    if heads % cfg.devices or hidden % cfg.devices:
        raise ConfigError(f"--strategy tp --gpus {cfg.devices}: {cfg.model} ({cfg.model_size}) has {heads} attention "
                          f"heads and {hidden} feed-forward units, which must divide by the tensor-parallel degree")


@register("tp", order=45, multiprocess=True, check=_check,
          summary="tensor parallel, Megatron style: q, k, v and FFN-in column-parallel, attention-out and FFN-out "
                  "row-parallel; the whole batch on every rank (speech encoders)")
def tp(model, env, cfg) -> Plan:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    n = env.world_size
    mesh = init_device_mesh(env.device.type, (n,), mesh_dim_names=("tp",))
    for att, ff in layers(model):
        parallelize_module(att, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                       "v_proj": ColwiseParallel(), "out_proj": RowwiseParallel()})
        parallelize_module(ff, mesh, {"intermediate_dense": ColwiseParallel(), "output_dense": RowwiseParallel()})
        att.num_heads //= n  # the local outputs hold this rank's heads: the reshape must see their count

    def eval_module():
        # collective: every rank gathers each sharded parameter whole; rank 0 builds the full model
        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
                 for k, v in model.state_dict().items()}
        if not env.is_main:
            return None
        full = rebuild(model)
        full.load_state_dict(state)
        return full.to(env.device)

    return Plan(model=model, input_device=env.device, shard_batch=False, eval_module=eval_module,
                info={"tp_layers": len(layers(model))})
