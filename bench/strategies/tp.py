"""Tensor parallel (Megatron style, torch.distributed.tensor.parallel) over all N ranks.

Inside each transformer layer, q, k and v and the feed-forward network's first projection are
column-parallel (each rank computes its share of the heads and hidden units) and the attention
output and the second projection row-parallel (each rank's partial sums are all-reduced): two
all-reduces a layer forward, and backward one per column-parallel projection's input gradient (four:
q, k and v each wrap the same input on their own; Megatron fuses them into one). Every rank of a tensor-parallel group trains on the same
batch. The rest of the model (the front ends, layer norms, conformer's convolution module, the head)
is replicated, and so are its gradients: every rank computes them from the same all-reduced
activations.

The layers it finds: torchaudio's wav2vec 2.0 layers (wav2vec2, HuBERT, XLS-R: separate q, k, v
projections), WavLM's, nn.TransformerEncoderLayer (the small transformer) and torchaudio's
ConformerLayer. The last three hold nn.MultiheadAttention, whose q, k and v share one packed
weight: before sharding, it is replaced by SplitAttention, the same mathematics with three
projections (its weights copied from the packed one; in WavLM, inside SplitWavLMAttention, which
also shards the relative position bias and its gate by heads), and the full state dict packs them
again (merge_state), so evaluation, `bench parity` and saved parameters see the model's own keys.

Sequence parallel (on by default with tensor parallel; --no-sequence-parallel turns it off), as
Megatron-LM's: between the tensor-parallel regions each rank holds 1/T of the sequence, so the
layer norms, dropouts and residual adds run on a shard and save 1/T of their own tensors (torch's
ColwiseParallel keeps the gathered input of q, k, v and FFN-in whole for backward, where Megatron
keeps the shard and gathers again, so it saves less: nothing in the post-norm wav2vec2 encoders,
whose norms' inputs are the tensors the next projection saves). The
sequence is gathered before q, k, v and before the first feed-forward projection, and each
row-parallel output is reduce-scattered over the sequence instead of all-reduced (the same
bytes); the layer norms' weights are replicated DTensors, whose partial gradients are summed once
after backward, in one all-reduce (reduce_partial_grads). The
shard is torch.chunk's (DTensor's Shard), so a sequence need not divide by T (wav2vec2's 149
frames of 3 s). Modules that need the whole sequence inside a layer (conformer's depthwise
convolution) are gathered before and re-sharded after. The first layer takes its part of the
replicated sequence, the last gathers it again for the head.

Not yet: async TP.
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
    # sequence parallel: the sequence dimension of the layer's input (conformer works time-first), the
    # layer norms on the residual stream, the module whose input q, k and v read (gathered before it),
    # and modules that need the whole sequence, with their own sequence dimension
    seq: int = 1
    norms: tuple[str, ...] = ()
    entry: str = ""
    whole: tuple[tuple[str, int], ...] = ()


def _ffn(prefix: str, first: str, second: str) -> dict[str, str]:
    return {f"{prefix}{first}": COL, f"{prefix}{second}": ROW}


_QKV = {"q_proj": COL, "k_proj": COL, "v_proj": COL, "out_proj": ROW}


def layers(model: nn.Module) -> list[Layer]:
    """The tensor-parallel layers of a model, in module order."""
    from torchaudio.models.conformer import ConformerLayer
    from torchaudio.models.wav2vec2.wavlm_attention import WavLMSelfAttention

    found = []
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            found.append(Layer(m, {**{f"self_attn.{k}": v for k, v in _QKV.items()}, **_ffn("", "linear1", "linear2")},
                               "self_attn", m.linear1.out_features, packed=True, seq=1 if m.self_attn.batch_first else 0,
                               norms=("norm1", "norm2"), entry="self_attn.enter"))
        elif isinstance(m, ConformerLayer):
            plan = {f"self_attn.{k}": v for k, v in _QKV.items()}
            for ffn in ("ffn1", "ffn2"):  # LayerNorm, Linear, SiLU, Dropout, Linear, Dropout
                plan.update(_ffn(f"{ffn}.sequential.", "1", "4"))
            found.append(Layer(m, plan, "self_attn", m.ffn1.sequential[1].out_features, packed=True, seq=0,
                               norms=("ffn1.sequential.0", "self_attn_layer_norm", "ffn2.sequential.0",
                                      "final_layer_norm"),
                               entry="self_attn.enter", whole=(("conv_module", 1),)))  # batch-first inside
        elif isinstance(getattr(m, "attention", None), (WavLMSelfAttention, SplitWavLMAttention)):
            plan = {f"attention.attention.{k}": v for k, v in _QKV.items()}
            if m.attention.rel_attn_embed is not None:  # the first layer's relative position bias, by heads
                plan["attention.rel_attn_embed"] = COL
            plan.update(_ffn("feed_forward.", "intermediate_dense", "output_dense"))
            found.append(Layer(m, plan, "attention.attention", m.feed_forward.intermediate_dense.out_features,
                               packed=True, norms=("layer_norm", "final_layer_norm"), entry="attention"))
        else:
            att, ff = getattr(m, "attention", None), getattr(m, "feed_forward", None)
            if att is not None and ff is not None and all(hasattr(att, p) for p in _QKV) \
                    and hasattr(ff, "intermediate_dense") and hasattr(ff, "output_dense"):
                found.append(Layer(m, {**{f"attention.{k}": v for k, v in _QKV.items()},
                                       **_ffn("feed_forward.", "intermediate_dense", "output_dense")},
                                   "attention", ff.intermediate_dense.out_features,
                                   norms=("layer_norm", "final_layer_norm"), entry="attention"))
    return found


class SplitAttention(nn.Module):
    """nn.MultiheadAttention's self-attention (no masks given, no weights returned) with q, k and v as
    three projections, so each can be sharded by heads. The same mathematics: the packed weight's
    rows are q's, k's and v's in that order, and attention is scaled dot product over num_heads."""

    # no packed bias: nn.TransformerEncoderLayer's inference fast path (which reads the packed weights)
    # declines in eval mode, and the layer calls this module instead
    in_proj_bias = None

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
        self.enter = nn.Identity()  # what q, k and v read: sequence parallel gathers the sequence here, once

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, **_):
        if key_padding_mask is not None or attn_mask is not None:
            raise NotImplementedError("SplitAttention takes no masks (the zoo's layers pass none)")
        if query is key and key is value:  # self-attention: one input
            query = key = value = self.enter(query)
        else:
            query, key, value = (self.enter(t) for t in (query, key, value))
        if not self.batch_first:  # (T, B, E) -> (B, T, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, t = query.shape[:2]
        q, k, v = (proj(x).view(b, x.shape[1], self.num_heads, -1).transpose(1, 2)
                   for proj, x in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, -1))
        return (out if self.batch_first else out.transpose(0, 1)), None


class SplitWavLMAttention(nn.Module):
    """torchaudio's WavLMSelfAttention with its packed nn.MultiheadAttention split (SplitAttention), so
    its heads can be sharded: the same mathematics. Its per-head parts follow the heads: the first
    layer's relative position embedding (num_buckets x heads, column-parallel), the gate's per-head
    constant (a DTensor sharded by heads under tensor parallel) and the gate's input, the layer's
    input cut into this rank's heads. The bias passed to later layers holds this rank's heads."""

    def __init__(self, w):
        super().__init__()
        self.embed_dim, self.total_heads, self.head_dim = w.embed_dim, w.num_heads, w.head_dim
        self.num_buckets, self.max_distance, self.dropout = w.num_buckets, w.max_distance, w.dropout
        self.rel_attn_embed = w.rel_attn_embed
        self.attention = SplitAttention(w.attention)
        self.gru_rel_pos = w.gru_rel_pos
        if self.gru_rel_pos:
            self.gru_rel_pos_linear, self.gru_rel_pos_const = w.gru_rel_pos_linear, w.gru_rel_pos_const
        self.mesh = None  # tensor parallel's, once sharded

    def _gate(self, query: torch.Tensor, h: int) -> torch.Tensor:
        """The gate's linear, shared by every head, on this rank's h heads of the layer's input (b, t, E)
        -> (b, h, t, 8). Under tensor parallel the input is cut into heads as a DTensor (replicated ->
        sharded by heads), so backward gathers every rank's heads' share of the input's gradient, and
        the linear's weights are replicated DTensors, so DTensor sums their gradients over the ranks."""
        b, t, _ = query.shape
        heads = query.view(b, t, self.total_heads, -1).permute(2, 0, 1, 3)  # (heads, b, t, head_dim)
        if self.mesh is None:
            return self.gru_rel_pos_linear(heads[:h]).transpose(0, 1)  # whole, or rank 0's shapes (localize)
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mine = DTensor.from_local(heads, self.mesh, [Replicate()], run_check=False).redistribute(self.mesh, [Shard(0)])
        return self.gru_rel_pos_linear(mine).to_local().transpose(0, 1)  # (sharded heads lead: flattenable)

    def _bias(self, t: int) -> torch.Tensor:  # (this rank's heads, t, t), as WavLMSelfAttention.compute_bias
        from torchaudio.models.wav2vec2.wavlm_attention import WavLMSelfAttention

        return WavLMSelfAttention.compute_bias(self, t, t)

    def _relative_positions_bucket(self, relative_positions, bidirectional=True):
        from torchaudio.models.wav2vec2.wavlm_attention import WavLMSelfAttention

        return WavLMSelfAttention._relative_positions_bucket(self, relative_positions, bidirectional)

    def forward(self, query, key_padding_mask=None, attention_mask=None, position_bias=None):
        if key_padding_mask is not None or attention_mask is not None:
            raise NotImplementedError("SplitWavLMAttention takes no masks (the zoo's layers pass none)")
        b, t, _ = query.shape
        h, att = self.attention.num_heads, self.attention
        if self.rel_attn_embed is not None and position_bias is None:
            position_bias = self._bias(t).unsqueeze(0).repeat(b, 1, 1, 1)
        mask = None
        if position_bias is not None:
            mask = position_bias
            if self.gru_rel_pos:  # the gate reads the layer's input, head by head: this rank's heads
                gate_a, gate_b = torch.sigmoid(self._gate(query, h).view(b, h, t, 2, 4).sum(-1)).chunk(2, dim=-1)
                const = self.gru_rel_pos_const
                const = const.to_local() if hasattr(const, "to_local") else const
                mask = (gate_a * (gate_b * const - 1.0) + 2.0).view(b, h, -1, 1) * position_bias
            mask = mask.view(b, h, t, t)
        q, k, v = (proj(query).view(b, t, h, -1).transpose(1, 2) for proj in (att.q_proj, att.k_proj, att.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return att.out_proj(out.transpose(1, 2).reshape(b, t, -1)), position_bias


def split(found: list[Layer]) -> None:
    """Replace each packed nn.MultiheadAttention by its SplitAttention, each WavLM attention by its
    SplitWavLMAttention (in place; once)."""
    from torchaudio.models.wav2vec2.wavlm_attention import WavLMSelfAttention

    for layer in found:
        if isinstance(getattr(layer.module, "attention", None), WavLMSelfAttention):
            layer.module.attention = SplitWavLMAttention(layer.module.attention)
        elif layer.packed and isinstance(layer.module.get_submodule(layer.heads), nn.MultiheadAttention):
            setattr(layer.module, layer.heads, SplitAttention(layer.module.get_submodule(layer.heads)))


def merge_state(state: dict) -> dict:
    """A full state dict with each SplitAttention's q, k, v packed back into nn.MultiheadAttention's
    in_proj_weight and in_proj_bias (the model's own keys)."""
    out = dict(state)
    for key in [k for k in state if k.endswith(("self_attn.q_proj.weight", "attention.attention.q_proj.weight"))]:
        at = key[: -len("q_proj.weight")]
        for kind in ("weight", "bias"):
            out[f"{at}in_proj_{kind}"] = torch.cat([out.pop(f"{at}{p}_proj.{kind}") for p in "qkv"])
    return out


def parallelize(model: nn.Module, mesh, sequence: bool = False) -> int:
    """Shard every tensor-parallel layer of model over the 1-D mesh, with sequence parallel between
    them where `sequence`; the layers' count."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    found = layers(model)
    split(found)
    for layer in found:
        styles = {path: ColwiseParallel() if style == COL else
                  RowwiseParallel(output_layouts=Shard(_seq(layer, path))) if sequence else RowwiseParallel()
                  for path, style in layer.plan.items()}
        if sequence:  # the norms' weights become replicated DTensors, their inputs the local sequence shards
            styles.update({norm: SequenceParallel(sequence_dim=layer.seq, use_local_output=True) for norm in layer.norms})
        parallelize_module(layer.module, mesh, styles)
        # the local outputs hold this rank's heads: the reshape must see their count
        layer.module.get_submodule(layer.heads).num_heads //= mesh.size()
        att = getattr(layer.module, "attention", None)
        if isinstance(att, SplitWavLMAttention):  # its heads' own parts: the gate's weights and constant
            if att.gru_rel_pos:
                from torch.distributed.tensor import distribute_module

                att.mesh = mesh
                distribute_module(att.gru_rel_pos_linear, mesh)  # its parameters replicated DTensors
                part = att.gru_rel_pos_const.detach().chunk(mesh.size(), 1)[mesh.get_local_rank()].clone()
                att.gru_rel_pos_const = nn.Parameter(DTensor.from_local(part, mesh, [Shard(1)], run_check=False))
    if sequence and found:
        length = [0]  # the whole sequence's length, read where the first layer takes its part of it

        def scatter(x: torch.Tensor, dim: int) -> torch.Tensor:  # whole -> this rank's torch.chunk of it
            length[0] = x.shape[dim]
            return DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(dim)]).to_local()

        def gather(x: torch.Tensor, dim: int) -> torch.Tensor:  # this rank's chunk -> whole (all-gather)
            shape = list(x.shape)
            shape[dim] = length[0]  # given: a shard's own size cannot tell an uneven whole's
            return DTensor.from_local(x.contiguous(), mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                                      stride=torch.empty(shape, device="meta").stride()
                                      ).redistribute(mesh, [Replicate()]).to_local()

        _sequence_hooks(found, scatter, gather, rows=False)
    return len(found)


def reduce_partial_grads(params) -> None:
    """Sum the partial gradients of replicated DTensor parameters over their ranks, once, in one all-reduce
    per mesh dimension and dtype, and leave them replicated like their parameters. Sequence parallel's
    layer norms get such gradients (each rank's sum over its part of the sequence). Left partial,
    every optimiser op that reads one all-reduces it again: AdamW three times a parameter and step."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    groups: dict = {}
    for p in params:
        g = p.grad
        if not isinstance(g, DTensor) or not isinstance(p, DTensor):
            continue
        for dim, (gp, pp) in enumerate(zip(g.placements, p.placements)):
            if isinstance(gp, Partial) and isinstance(pp, Replicate):  # (onto a Shard would be a reduce-scatter)
                if gp.reduce_op != "sum":
                    raise NotImplementedError(f"a partial gradient reduced by {gp.reduce_op}: only sums are reduced")
                groups.setdefault((g.device_mesh, dim, g.dtype), []).append(p)
    for (mesh, dim, _), ps in groups.items():
        local = [p.grad.to_local() for p in ps]
        # one flat buffer, partial on this mesh dimension; DTensor's own redistribute all-reduces it there
        partial, whole = [Replicate()] * mesh.ndim, [Replicate()] * mesh.ndim
        partial[dim] = Partial()
        flat = DTensor.from_local(torch._utils._flatten_dense_tensors(local), mesh, partial, run_check=False)
        flat = flat.redistribute(mesh, whole).to_local()
        for p, mine, summed in zip(ps, local, torch._utils._unflatten_dense_tensors(flat, local)):
            mine.copy_(summed)  # in place: the local tensor keeps its strides, which the DTensor states
            placements = list(p.grad.placements)
            placements[dim] = Replicate()
            p.grad = DTensor.from_local(mine, mesh, placements, run_check=False, shape=p.grad.shape,
                                        stride=p.grad.stride())


def _seq(layer: Layer, path: str) -> int:
    """The sequence dimension at a projection: the layer's, except SplitAttention's output projection,
    which works batch-first inside a time-first layer (conformer)."""
    return 1 if layer.packed and path == f"{layer.heads}.out_proj" else layer.seq


def _sequence_hooks(found: list[Layer], scatter, gather, rows: bool) -> None:
    """Sequence parallel's boundaries as hooks: the first layer scatters its input over the sequence,
    the last gathers its output; inside each layer the attention's entry and the first feed-forward
    projections gather their input, the modules that need the whole sequence gather and scatter back,
    and with `rows` the row-parallel projections scatter their output (real runs reduce-scatter it
    in RowwiseParallel instead)."""
    first, last = found[0], found[-1]
    first.module.register_forward_pre_hook(lambda m, args: (scatter(args[0], first.seq), *args[1:]))

    def exit_(m, args, out):
        return (gather(out[0], last.seq), *out[1:]) if isinstance(out, tuple) else gather(out, last.seq)

    last.module.register_forward_hook(exit_)
    for layer in found:
        # the first feed-forward projections read the residual stream; what is under the attention's module
        # (q, k, v, WavLM's position embedding) reads what its entry gathered, or no sequence at all
        attention = layer.entry.split(".")[0] + "."
        inputs = [layer.entry] + [p for p, style in layer.plan.items() if style == COL and not p.startswith(attention)]
        for path in inputs:
            layer.module.get_submodule(path).register_forward_pre_hook(
                lambda m, args, d=layer.seq: (gather(args[0], d), *args[1:]), prepend=True)
        for path, d in layer.whole:
            module = layer.module.get_submodule(path)
            module.register_forward_pre_hook(lambda m, args, d=d: (gather(args[0], d), *args[1:]), prepend=True)
            module.register_forward_hook(lambda m, args, out, d=d: scatter(out, d))
        if rows:
            for path in (p for p, style in layer.plan.items() if style == ROW):
                layer.module.get_submodule(path).register_forward_hook(
                    lambda m, args, out, d=_seq(layer, path): scatter(out, d))


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


def localize(model: nn.Module, n: int, sequence: bool = False) -> None:
    """Give model one rank's shapes of tensor parallel over n (the memory estimate counts what a rank
    saves for backward on them): column-parallel projections n times fewer outputs, row-parallel n
    times fewer inputs, n times fewer heads; with `sequence`, rank 0's part of the sequence between
    them (torch.chunk's largest), the whole one where sequence parallel gathers it."""
    found = layers(model)
    split(found)
    for layer in found:
        for path, style in layer.plan.items():
            parent, _, name = path.rpartition(".")
            owner = layer.module.get_submodule(parent) if parent else layer.module
            lin = getattr(owner, name)
            if isinstance(lin, nn.Embedding):  # WavLM's relative position embedding: a column per head
                setattr(owner, name, nn.Embedding(lin.num_embeddings, lin.embedding_dim // n, device=lin.weight.device))
                continue
            i, o = (lin.in_features, lin.out_features // n) if style == COL else (lin.in_features // n, lin.out_features)
            setattr(owner, name, nn.Linear(i, o, bias=lin.bias is not None, device=lin.weight.device))
        layer.module.get_submodule(layer.heads).num_heads //= n
        att = getattr(layer.module, "attention", None)
        if isinstance(att, SplitWavLMAttention) and att.gru_rel_pos:
            att.gru_rel_pos_const = nn.Parameter(att.gru_rel_pos_const.detach()[:, : att.attention.num_heads].clone())
    if sequence and found:
        length = [0]

        def scatter(x: torch.Tensor, dim: int) -> torch.Tensor:  # the whole -> rank 0's chunk
            length[0] = x.shape[dim]
            # a tensor of its own, as the reduce-scatter's (a view would count its whole base as saved)
            return x.narrow(dim, 0, -(-x.shape[dim] // n)).clone()

        def gather(x: torch.Tensor, dim: int) -> torch.Tensor:  # shapes only: n copies, cut to the whole
            return torch.cat([x] * n, dim).narrow(dim, 0, length[0])

        _sequence_hooks(found, scatter, gather, rows=True)


def check_degree(cfg, degree: int, flag: str) -> None:
    """One line where cfg's model cannot be tensor-parallel over `degree` ranks."""
    from ..memory import tp_dims  # counted once per code in the cache folder

    _, heads, hidden = tp_dims(cfg.model, cfg.model_size)
    if not heads:
        raise ConfigError(f"{flag}: {cfg.model} has no attention and feed-forward layers to split; use ddp or fsdp "
                          "for it")
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
    count = parallelize(model, mesh, cfg.sequence_parallel)

    def eval_module() -> nn.Module | None:
        # collective: every rank gathers each sharded parameter whole; rank 0 builds the full model
        return full_model(model, env, {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
                                       for k, v in model.state_dict().items()})

    params = [p for p in model.parameters() if p.requires_grad]
    return Plan(model=model, input_device=env.device, shard_batch=False, eval_module=eval_module,
                grads_ready=lambda: reduce_partial_grads(params), info={"tp_layers": count})
