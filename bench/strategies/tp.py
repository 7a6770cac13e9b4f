"""Tensor parallel (Megatron style, torch.distributed.tensor.parallel) over all N ranks.

Inside each transformer layer, q, k and v and the feed-forward network's first projection are
column-parallel (each rank computes its share of the heads and hidden units) and the attention
output and the second projection row-parallel (each rank's partial sums are all-reduced): two
all-reduces a layer forward, two backward. Every rank of a tensor-parallel group trains on the same
batch. The rest of the model (the front ends, layer norms, conformer's convolution module, the head)
is replicated, and so are its gradients: every rank computes them from the same all-reduced
activations.

The layers it finds: torchaudio's wav2vec 2.0 layers (wav2vec2, HuBERT, XLS-R: separate q, k, v
projections), nn.TransformerEncoderLayer (the small transformer) and torchaudio's ConformerLayer.
The last two hold nn.MultiheadAttention, whose q, k and v share one packed weight: before
sharding, it is replaced by SplitAttention, the same mathematics with three projections (its
weights copied from the packed one), and the full state dict packs them again (merge_state), so
evaluation, `bench parity` and saved parameters see the model's own keys.

Not yet: sequence parallel for the layer norms and dropouts, and WavLM, whose attention reads its
packed weight itself and gates a per-head relative position bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from emotion_models.models import rebuild

from ..config import ConfigError
from . import Plan, register

COL, ROW = "col", "row"


@dataclass
class Layer:
    module: nn.Module
    plan: dict[str, str]  # projection's path in the layer -> COL or ROW
    heads: str  # path of the attention module whose num_heads the shards divide
    hidden: int  # feed-forward units
    packed: bool = False  # its attention is an nn.MultiheadAttention at `heads`, split before sharding


def _ffn(prefix: str, first: str, second: str) -> dict[str, str]:
    return {f"{prefix}{first}": COL, f"{prefix}{second}": ROW}


_QKV = {"q_proj": COL, "k_proj": COL, "v_proj": COL, "out_proj": ROW}


def layers(model: nn.Module) -> list[Layer]:
    """The tensor-parallel layers of a model, in module order."""
    from torchaudio.models.conformer import ConformerLayer

    found = []
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            found.append(Layer(m, {**{f"self_attn.{k}": v for k, v in _QKV.items()}, **_ffn("", "linear1", "linear2")},
                               "self_attn", m.linear1.out_features, packed=True))
        elif isinstance(m, ConformerLayer):
            plan = {f"self_attn.{k}": v for k, v in _QKV.items()}
            for ffn in ("ffn1", "ffn2"):  # LayerNorm, Linear, SiLU, Dropout, Linear, Dropout
                plan.update(_ffn(f"{ffn}.sequential.", "1", "4"))
            found.append(Layer(m, plan, "self_attn", m.ffn1.sequential[1].out_features, packed=True))
        else:
            att, ff = getattr(m, "attention", None), getattr(m, "feed_forward", None)
            if att is not None and ff is not None and all(hasattr(att, p) for p in _QKV) \
                    and hasattr(ff, "intermediate_dense") and hasattr(ff, "output_dense"):
                found.append(Layer(m, {**{f"attention.{k}": v for k, v in _QKV.items()},
                                       **_ffn("feed_forward.", "intermediate_dense", "output_dense")},
                                   "attention", ff.intermediate_dense.out_features))
    return found


class SplitAttention(nn.Module):
    """nn.MultiheadAttention's self-attention (no masks given, no weights returned) with q, k and v as
    three projections, so each can be sharded by heads. The same mathematics: the packed weight's
    rows are q's, k's and v's in that order, and attention is scaled dot product over num_heads."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.in_proj_bias is None:
            raise ConfigError("tensor parallel splits nn.MultiheadAttention with one packed, biased q/k/v weight only")
        e = mha.embed_dim
        self.num_heads, self.batch_first, self.dropout = mha.num_heads, mha.batch_first, mha.dropout
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(e, e, device=w.device, dtype=w.dtype) for _ in range(3))
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(w[i * e:(i + 1) * e])
                proj.bias.copy_(b[i * e:(i + 1) * e])
        self.out_proj = mha.out_proj  # whole, as it was (NonDynamicallyQuantizableLinear, a Linear)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, **_):
        if key_padding_mask is not None or attn_mask is not None:
            raise NotImplementedError("SplitAttention takes no masks (the zoo's layers pass none)")
        if not self.batch_first:  # (T, B, E) -> (B, T, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, t = query.shape[:2]
        q, k, v = (proj(x).view(b, x.shape[1], self.num_heads, -1).transpose(1, 2)
                   for proj, x in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, -1))
        return (out if self.batch_first else out.transpose(0, 1)), None


def split(found: list[Layer]) -> None:
    """Replace each packed nn.MultiheadAttention by its SplitAttention (in place; once)."""
    for layer in found:
        if layer.packed and isinstance(layer.module.get_submodule(layer.heads), nn.MultiheadAttention):
            setattr(layer.module, layer.heads, SplitAttention(layer.module.get_submodule(layer.heads)))


def merge_state(state: dict) -> dict:
    """A full state dict with each SplitAttention's q, k, v packed back into nn.MultiheadAttention's
    in_proj_weight and in_proj_bias (the model's own keys)."""
    out = dict(state)
    for key in [k for k in state if k.endswith("self_attn.q_proj.weight")]:
        at = key[: -len("q_proj.weight")]
        for kind in ("weight", "bias"):
            out[f"{at}in_proj_{kind}"] = torch.cat([out.pop(f"{at}{p}_proj.{kind}") for p in "qkv"])
    return out


def parallelize(model: nn.Module, mesh) -> int:
    """Shard every tensor-parallel layer of model over the 1-D mesh; the layers' count."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    found = layers(model)
    split(found)
    for layer in found:
        parallelize_module(layer.module, mesh, {path: ColwiseParallel() if style == COL else RowwiseParallel()
                                                for path, style in layer.plan.items()})
        # the local outputs hold this rank's heads: the reshape must see their count
        layer.module.get_submodule(layer.heads).num_heads //= mesh.size()
    return len(found)


def sharded_params(model: nn.Module) -> int:
    """Parameters tensor parallel divides over its ranks (the projections' weights and biases, except
    the row-parallel biases, which every rank keeps whole). Splits model's packed attention."""
    found = layers(model)
    split(found)
    total = 0
    for layer in found:
        for path, style in layer.plan.items():
            lin = layer.module.get_submodule(path)
            total += sum(p.numel() for p in lin.parameters()) if style == COL else lin.weight.numel()
    return total


def localize(model: nn.Module, n: int) -> None:
    """Give model one rank's shapes of tensor parallel over n (the memory estimate counts what a rank
    saves for backward on them): column-parallel projections n times fewer outputs, row-parallel n
    times fewer inputs, n times fewer heads."""
    found = layers(model)
    split(found)
    for layer in found:
        for path, style in layer.plan.items():
            parent, _, name = path.rpartition(".")
            owner = layer.module.get_submodule(parent) if parent else layer.module
            lin = getattr(owner, name)
            i, o = (lin.in_features, lin.out_features // n) if style == COL else (lin.in_features // n, lin.out_features)
            setattr(owner, name, nn.Linear(i, o, bias=lin.bias is not None, device=lin.weight.device))
        layer.module.get_submodule(layer.heads).num_heads //= n


def check_degree(cfg, degree: int, flag: str) -> None:
    """One line where cfg's model cannot be tensor-parallel over `degree` ranks."""
    from ..memory import tp_dims  # counted once per code in the cache folder

    _, heads, hidden = tp_dims(cfg.model, cfg.model_size)
    if not heads:
        wavlm = cfg.model.startswith("wavlm")
        raise ConfigError(f"{flag}: {cfg.model} has " + (
            "attention that reads its packed q/k/v weight itself and gates a per-head position bias (WavLM), which "
            "tensor parallel does not split yet" if wavlm else "no attention and feed-forward layers to split")
            + "; use ddp or fsdp for it")
    if heads % degree or hidden % degree:
        raise ConfigError(f"{flag}: {cfg.model} ({cfg.model_size}) has {heads} attention heads and {hidden} "
                          f"feed-forward units, which must divide by the tensor-parallel degree {degree}")


def _check(cfg, device_type):
    if cfg.tp not in (1, cfg.devices):
        raise ConfigError(f"--strategy tp is tensor parallel over all --gpus {cfg.devices}; for --tp {cfg.tp} beside "
                          "data parallel use --strategy fsdp --tp (2-D)")
    check_degree(cfg, cfg.devices, f"--strategy tp --gpus {cfg.devices}")


def full_model(model: nn.Module, env, state: dict) -> nn.Module | None:
    """Rank 0's full model from a gathered state dict (None elsewhere): the zoo's own keys and heads."""
    if not env.is_main:
        return None
    full = rebuild(model)
    full.load_state_dict(merge_state(state))
    return full.to(env.device)


@register("tp", order=45, multiprocess=True, check=_check,
          summary="tensor parallel, Megatron style: q, k, v and FFN-in column-parallel, attention-out and FFN-out "
                  "row-parallel; the whole batch on every rank (transformer, conformer, speech encoders)")
def tp(model, env, cfg) -> Plan:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("tp",))
    count = parallelize(model, mesh)

    def eval_module() -> nn.Module | None:
        # collective: every rank gathers each sharded parameter whole; rank 0 builds the full model
        return full_model(model, env, {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
                                       for k, v in model.state_dict().items()})

    return Plan(model=model, input_device=env.device, shard_batch=False, eval_module=eval_module,
                info={"tp_layers": count})
