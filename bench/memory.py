"""Memory per device, estimated before a run starts, the check that refuses a run that cannot fit,
and the record that puts the estimate beside what the run measured.

A device's memory over a run, as the harness uses it (the busiest device where they differ):

    setup       the full fp32 model built on the device from the seed, before fully_shard or the
                stage split: 4 bytes per parameter
    training    weights + gradients + AdamW state (two moments): 4 + 4 + 8 bytes per parameter of
                the device's share (fp32 master weights: autocast keeps them, FSDP2 keeps its
                shards in fp32 too)
                ddp: + 4 bytes per parameter, the reducer's gradient buckets
                fsdp at N: the share is 1/N, plus the largest block unsharded twice (the one
                computing and the one prefetched, in the parameter dtype) and its gradients
                pipeline, model-parallel: the stage's own parameters
                + activations: the tensors autograd saves for backward, counted block by block on
                fake tensors (no memory, no compute) at this run's per-device batch, under
                autocast for bf16/fp16; pipeline: the stage's micro-batches in flight (GPipe all
                m, 1F1B at most n - stage), model-parallel one global batch per stage
                + the training split, resident on the device for the whole run (float32)
    evaluation  rank 0, between epochs and at the end: the training state, its copy of the full
                fp32 model where the strategy assembles one (fsdp, pipeline: 4 bytes per
                parameter), and a forward at the evaluation batch without autograd (the peak of
                live tensors, counted on fake tensors)
    outside     what torch's allocator never sees, on CUDA: the context and, for multi-process
                runs, NCCL's buffers; assumed constants (CONTEXT_BYTES, NCCL_BYTES) until a GPU
                run measures them (memory.measured.outside_allocator_bytes in its result)

The fit check takes the largest of setup, training and evaluation, plus outside. Fake tensors
import torch._dynamo, 1.3 s of CPU that a launcher otherwise never pays: each count is kept in the
cache folder (activation_bytes.json) under a key of the model code, this file, torch's and
torchaudio's versions and the count's arguments.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from emotion_models.atomic import atomic_write_text
from emotion_models.dataset import default_cache_dir
from emotion_models.models import build_model

from .config import AC_EVERY, MULTI_STAGE, ConfigError, RunConfig
from .strategies import SHARDED, data_parallel, degrees

GiB = 2**30


# outside torch's allocator on a CUDA device: the context with torch's kernels loaded (0.3-0.6 GiB
# on recent drivers) and NCCL's per-peer buffers (4 MiB per channel and peer by default, more with
# NVLS): assumed, not measured; the first GPU run records what it saw (outside_allocator_bytes)
CONTEXT_BYTES = GiB // 2
NCCL_BYTES = GiB // 2
EVAL_BATCH = 256  # samples per evaluation forward (bench/train.py evaluates in batches of this)


@dataclass(frozen=True)
class Estimate:
    weights_bytes: int  # parameters, gradients and optimiser state on the device
    extra_bytes: int  # DDP buckets, FSDP's unsharded block
    activations_bytes: int
    note: str  # what the extra is
    batch: int = 0  # samples per device (per micro-batch for pipeline) the activations were measured at
    data_bytes: int = 0  # the training split on the device (on a CPU, the whole set in float16 too)
    setup_bytes: int = 0  # the full fp32 model built on the device before the strategy wraps it
    eval_bytes: int = 0  # evaluation on rank 0: its full-model copy and one forward's live tensors
    outside_bytes: int = 0  # outside torch's allocator (CUDA context, NCCL buffers): assumed
    stage: int | None = None  # pipeline, model-parallel: the busiest stage, whose device this is

    @property
    def training_bytes(self) -> int:
        """What torch's allocator holds at the training steps' peak (a run's peak_allocated_bytes)."""
        return self.weights_bytes + self.extra_bytes + self.activations_bytes + self.data_bytes

    @property
    def evaluation_bytes(self) -> int:
        return self.weights_bytes + self.extra_bytes + self.data_bytes + self.eval_bytes

    @property
    def total_bytes(self) -> int:
        return max(self.setup_bytes, self.training_bytes, self.evaluation_bytes) + self.outside_bytes

    def text(self) -> str:
        extra = f", {self.note} {self.extra_bytes / GiB:.1f}" if self.extra_bytes else ""
        stage = f" (stage {self.stage})" if self.stage is not None else ""
        outside = f"; outside torch's allocator {self.outside_bytes / GiB:.1f} (assumed)" if self.outside_bytes else ""
        return (f"{self.total_bytes / GiB:.1f} GiB per device{stage} (training: params + grads + AdamW "
                f"{self.weights_bytes / GiB:.1f}{extra}, activations {self.activations_bytes / GiB:.1f} at batch "
                f"{self.batch}, training split {self.data_bytes / GiB:.1f}; evaluation on rank 0 "
                f"{self.evaluation_bytes / GiB:.1f}; setup {self.setup_bytes / GiB:.1f}{outside})")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(training_bytes=self.training_bytes, evaluation_bytes=self.evaluation_bytes,
                   total_bytes=self.total_bytes)
        return out


@functools.lru_cache(maxsize=64)
def _shape(model: str, size: str) -> tuple[int, int, tuple[int, ...]]:
    """(parameters, parameters of the largest block, parameters per block), counted once per code."""
    per_block = tuple(_cached("params", model, size, 1, "fp32", _measure_params,
                              lambda v: isinstance(v, list) and bool(v) and all(_count(x) for x in v)))
    return sum(per_block), max(per_block), per_block


@functools.lru_cache(maxsize=64)
def model_stats(model: str, size: str) -> dict:
    """Parameters per block and forward FLOPs per 3 s sample (`bench list`), kept in the cache folder
    like the activation counts: counting the largest encoders' FLOPs takes seconds. A run's estimate
    reads the parameters alone (_shape), never the FLOPs."""
    flops = _cached("flops", model, size, 1, "fp32", _measure_flops, _count)
    return {"params_per_block": list(_shape(model, size)[2]), "forward_flops": flops}


def _measure_params(model: str, size: str, batch: int, precision: str) -> list[int]:
    m = build_model(model, size=size, device="meta")
    return [sum(p.numel() for p in b.parameters()) for b in m.blocks]


def _measure_flops(model: str, size: str, batch: int, precision: str) -> int:
    return int(sum(build_model(model, size=size, device="meta").block_flops(batch)))


@functools.lru_cache(maxsize=1)
def _code_key() -> str:
    """What a count depends on besides its arguments: the model code, this file, the versions of torch
    and torchaudio (whose builders make the speech encoders)."""
    import torchaudio

    import emotion_models

    h = hashlib.sha256(f"{torch.__version__} {torchaudio.__version__}".encode())
    for f in sorted(Path(emotion_models.__file__).parent.rglob("*.py")) + [Path(__file__)]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _cached(kind: str, model: str, size: str, batch: int, precision: str, measure, valid):
    """A count kept in the cache folder under this code's key (and the 3 codes seen last)."""
    path = default_cache_dir() / "activation_bytes.json"
    code = _code_key()
    key = f"{code} {kind} {model} {size} {batch} {precision}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: count
        known = {}
    known = known if isinstance(known, dict) else {}
    n = known.get(key)
    if valid(n):
        return n
    n = measure(model, size, batch, precision)
    # entries of this code and the 3 codes seen last stay (checkouts sharing a cache folder), older go
    codes = list(dict.fromkeys(k.split(" ")[0] for k in known))  # in order of first entry
    keep = set(codes[-3:]) | {code}
    kept = {k: v for k, v in known.items() if k.split(" ")[0] in keep and k != key}
    try:
        atomic_write_text(path, json.dumps({**kept, key: n}))
    except OSError:  # a read-only cache folder costs time, not correctness
        pass
    return n


def _count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


@functools.lru_cache(maxsize=64)
def activation_bytes_per_block(model: str, size: str, batch: int, precision: str, tp: int = 1,
                               sp: bool = False) -> tuple[int, ...]:
    """Bytes autograd saves for backward in one forward at this batch, block by block; tp: on one rank
    of tensor parallel over tp (its shards' shapes: fewer heads and hidden units inside each layer;
    sp: and its part of the sequence between them, sequence parallel)."""
    sp = sp and tp > 1
    kind = "saved" if tp == 1 else f"saved-tp{tp}" + ("-sp" if sp else "")
    measure = _measure_activation_bytes if tp == 1 else functools.partial(_measure_activation_bytes, tp=tp, sp=sp)
    n = _cached(kind, model, size, batch, precision, measure,
                lambda v: isinstance(v, list) and bool(v) and all(_count(x) for x in v))
    return tuple(n)


def activation_bytes(model: str, size: str, batch: int, precision: str) -> int:
    """Bytes autograd saves for backward in one forward at this batch (counted once per code)."""
    return sum(activation_bytes_per_block(model, size, batch, precision))


@functools.lru_cache(maxsize=64)
def eval_activation_bytes(model: str, size: str, batch: int, precision: str) -> int:
    """The peak of live tensors in one forward without autograd at this batch (evaluation)."""
    return _cached("eval", model, size, batch, precision, _measure_eval_bytes, _count)


def _measure_activation_bytes(model: str, size: str, batch: int, precision: str, tp: int = 1,
                              sp: bool = False) -> list[int]:
    """Per block, bytes autograd saves for backward in one forward at this batch, on fake tensors.
    A tensor belongs to the block whose forward saved it first (a block's input, saved by its first
    layer, is the block's: it lives on that block's device). tp > 1: the model given one rank's
    tensor-parallel shapes first (bench/strategies/tp.py localize; sp: its sequence shards too)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    saved: dict[int, tuple[torch.Tensor, int]] = {}
    with FakeTensorMode():
        m = build_model(model, size=size)
        if tp > 1:
            from .strategies.tp import localize

            localize(m, tp, sp)
        params = {id(p) for p in m.parameters()}
        current = [0]
        hooks = [b.register_forward_pre_hook(lambda mod, args, i=i: current.__setitem__(0, i))
                 for i, b in enumerate(m.blocks)]

        def pack(t: torch.Tensor) -> torch.Tensor:
            base = t._base if t._base is not None else t
            if id(base) not in params and id(base) not in saved:
                saved[id(base)] = (base, current[0])  # held, so no id is reused by another tensor meanwhile
            return t

        x = torch.randn(batch, m.n_features, m.frames)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            m(x)
        for h in hooks:
            h.remove()
    per_block = [0] * len(m.blocks)
    for t, block in saved.values():
        per_block[block] += t.numel() * t.element_size()
    return per_block


@functools.lru_cache(maxsize=64)
def input_bytes_per_block(model: str, size: str, batch: int, precision: str) -> tuple[int, ...]:
    """Bytes of each block's input at this batch: what a checkpointed block keeps for backward."""
    n = _cached("inputs", model, size, batch, precision, _measure_input_bytes,
                lambda v: isinstance(v, list) and bool(v) and all(_count(x) for x in v))
    return tuple(n)


def _measure_input_bytes(model: str, size: str, batch: int, precision: str) -> list[int]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_leaves

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    sizes: list[int] = []
    with FakeTensorMode():
        m = build_model(model, size=size)
        hooks = [b.register_forward_pre_hook(lambda mod, args: sizes.append(
            sum(t.numel() * t.element_size() for t in tree_leaves(args) if isinstance(t, torch.Tensor))))
            for b in m.blocks]
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            m(torch.randn(batch, m.n_features, m.frames))
        for h in hooks:
            h.remove()
    return sizes


def checkpointed(cfg: RunConfig) -> set[int]:
    """The blocks --ac wraps (bench/train.py checkpoint_blocks): every one, every other, or none."""
    every = AC_EVERY[cfg.ac]
    return set(range(0, len(_shape(cfg.model, cfg.model_size)[2]), every)) if every else set()


def activations(cfg: RunConfig, micro: int, first: int = 0, end: int | None = None) -> tuple[int, int]:
    """(bytes one micro-batch keeps for backward in blocks [first, end), the recompute peak on top):
    without --ac, every block's saved tensors and no recompute; a checkpointed block keeps only its
    input, and backward recomputes one checkpointed block at a time, so the largest of their saved
    tensors comes on top once."""
    saved = activation_bytes_per_block(cfg.model, cfg.model_size, micro, cfg.precision, tp_shapes(cfg),
                                       cfg.sequence_parallel)
    end = len(saved) if end is None else end
    wrapped = checkpointed(cfg) & set(range(first, end))
    if not wrapped:
        return sum(saved[first:end]), 0
    inputs = input_bytes_per_block(cfg.model, cfg.model_size, micro, cfg.precision)
    kept = sum(inputs[i] if i in wrapped else saved[i] for i in range(first, end))
    return kept, max(saved[i] for i in wrapped)


def _measure_eval_bytes(model: str, size: str, batch: int, precision: str) -> int:
    """The peak of live tensors in one evaluation forward of a zoo model at this batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        m = build_model(model, size=size).eval()
        return live_peak_bytes(m, (batch, m.n_features, m.frames), precision)


def live_peak_bytes(module: torch.nn.Module, input_shape: tuple[int, ...], precision: str = "fp32") -> int:
    """The peak of live tensors (the input included) in one forward of module under no_grad: each
    op's new outputs count while Python holds them; views and in-place results, which alias an
    input, count once. Run it under FakeTensorMode for shapes only (no memory, no compute)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    state = {"live": 0, "peak": 0}

    def free(nbytes: int) -> None:
        state["live"] -= nbytes

    def hold(t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        state["live"] += nbytes
        state["peak"] = max(state["peak"], state["live"])
        weakref.finalize(t, free, nbytes)

    class Live(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            returns = func._schema.returns
            for i, t in enumerate(out if isinstance(out, (tuple, list)) else [out]):
                if i < len(returns) and returns[i].alias_info is not None:
                    continue  # a view or an in-place result: the input's memory
                for leaf in tree_leaves(t):
                    if isinstance(leaf, torch.Tensor):
                        hold(leaf)
            return out

    x = torch.randn(*input_shape)
    hold(x)
    with torch.no_grad(), Live(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = module(x)
    del out, x
    return state["peak"]


def _stages(cfg: RunConfig) -> list[tuple[int, int]]:
    return build_model(cfg.model, size=cfg.model_size, device="meta").stage_boundaries(degrees(cfg)["pp"])


def tp_shapes(cfg: RunConfig) -> int:
    """The tensor-parallel degree whose one rank's shapes a device holds: the mesh's, or tp-rank's --tp
    (one rank's shapes in one process, no mesh)."""
    return cfg.tp if cfg.strategy == "tp-rank" else degrees(cfg)["tp"]


def static_bytes(cfg: RunConfig) -> tuple[int, int, str]:
    """(params + grads + AdamW state, the strategy's extra, what the extra is) on the busiest device
    by parameters."""
    params, largest_block, per_block = _shape(cfg.model, cfg.model_size)
    if cfg.strategy in ("pipeline", "model-parallel"):
        return 16 * max(sum(per_block[a:b]) for a, b in _stages(cfg)), 0, "stage"
    tp = tp_shapes(cfg)
    if tp > 1:  # the layers' projections divided over the tensor-parallel ranks, the rest whole on each
        sharded = tp_dims(cfg.model, cfg.model_size)[0]
        local = params - sharded + sharded // tp
        params, largest_block = local, largest_block * local // max(params, 1)
    if cfg.strategy in SHARDED:  # FSDP2 divides by the shard degree; replicas (HSDP) hold a copy each
        shards = degrees(cfg)["dp_shard"]
        param_bytes = 2 if cfg.precision in ("bf16", "fp16") else 4
        # --offload: the shards, their gradients and AdamW's state live on the host
        sharded = 0 if cfg.offload else 16 * params // shards
        if cfg.reshard_after_forward == "false":  # every block stays gathered from its forward to its backward
            return sharded, params * param_bytes + largest_block * 4, "unsharded parameters kept for backward"
        return sharded, largest_block * (2 * param_bytes + 4), "unsharded block"
    if cfg.strategy == "ddp":
        return 16 * params, 4 * params, "gradient buckets"
    return 16 * params, 0, "nothing else"


@functools.lru_cache(maxsize=64)
def tp_dims(model: str, size: str) -> tuple[int, int, int]:
    """(parameters tensor parallel divides, attention heads, feed-forward units) of the model's
    tensor-parallel layers (bench/strategies/tp.py), zeros where it has none; counted once per code."""
    return tuple(_cached("tp", model, size, 1, "fp32", _measure_tp,
                         lambda v: isinstance(v, list) and len(v) == 3 and all(_count(x) for x in v)))


def _measure_tp(model: str, size: str, batch: int, precision: str) -> list[int]:
    from .strategies.tp import layers, sharded_params

    m = build_model(model, size=size, device="meta")
    found = layers(m)
    if not found:
        return [0, 0, 0]
    heads = found[0].module.get_submodule(found[0].heads).num_heads
    return [sharded_params(m), heads, found[0].hidden]


def tp_divides(model: str, size: str, degree: int) -> bool:
    """Whether the model's heads and feed-forward units divide over `degree` tensor-parallel ranks."""
    _, heads, hidden = tp_dims(model, size)
    return heads > 0 and heads % degree == 0 and hidden % degree == 0


def split_clips(cfg: RunConfig) -> tuple[int, int]:
    """(training clips, clips of the larger evaluation split) before the data is loaded: 80 % and
    10 % of the synthetic set's clips or of the folder's audio files (the speaker-disjoint split lands
    within a few clips of them on the synthetic set; the evaluation share is taken 25 % larger)."""
    if cfg.dataset == "synthetic":
        from emotion_models.synthetic import class_counts

        clips = sum(class_counts(cfg.size).values())
    else:
        from emotion_models.scan import AUDIO_EXTENSIONS

        clips = sum(1 for p in Path(cfg.dataset).rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
    return round(0.8 * clips), max(1, round(0.125 * clips))


def estimate(cfg: RunConfig, device_type: str = "cpu", splits: tuple[int, int] | None = None) -> Estimate:
    """The memory one device needs for cfg (the busiest device where they differ); splits: (training
    clips, clips of the larger evaluation split) where the data is loaded already."""
    from emotion_models.audio import FeatureConfig
    from emotion_models.models import feature_kind

    params, _, per_block = _shape(cfg.model, cfg.model_size)
    fcfg = FeatureConfig(kind=feature_kind(cfg.model))
    clip = fcfg.n_features * fcfg.cache_frames
    n_train, n_eval = split_clips(cfg) if splits is None else splits
    split_bytes = 4 * n_train * clip  # float32 on the device
    if device_type == "cpu":  # the whole set in float16 in every process, besides the split's copy
        split_bytes += 2 * round(n_train / 0.8) * clip
    multiprocess = cfg.strategy in ("ddp", "fsdp", "hsdp", "tp", "pipeline", "independent")
    outside = (CONTEXT_BYTES + (NCCL_BYTES if multiprocess and cfg.devices > 1 else 0)) if device_type == "cuda" else 0
    full_copy = 4 * params if cfg.strategy in (*SHARDED, "tp", "pipeline") else 0  # rank 0 assembles one to evaluate
    evaluation = full_copy + eval_activation_bytes(cfg.model, cfg.model_size, min(EVAL_BATCH, n_eval), cfg.precision)
    if cfg.strategy in ("pipeline", "model-parallel"):
        return _staged(cfg, per_block, split_bytes, evaluation, outside)
    weights, extra, note = static_bytes(cfg)
    # one micro-batch is live at a time; a tensor-parallel group's ranks all train on the same one
    micro = max(cfg.global_batch_size // (data_parallel(cfg) * cfg.grad_accum), 1)
    kept, recompute = activations(cfg, micro)
    return Estimate(weights, extra, kept + recompute, note, micro, split_bytes, 4 * params, evaluation, outside)


def _staged(cfg: RunConfig, per_block, split_bytes: int, evaluation: int, outside: int) -> Estimate:
    """Pipeline and model parallel: each stage's own parameters and activations (the speech encoders'
    conv front end holds 3 % of the parameters and a third of the activations, all on stage 0); the
    busiest stage's device."""
    params = sum(per_block)
    n, replicas = degrees(cfg)["pp"], degrees(cfg)["dp_replicate"]  # --pp P: N / P pipelines of P stages
    m = _microbatches(cfg)
    micro = cfg.global_batch_size if cfg.strategy == "model-parallel" else cfg.global_batch_size // (m * replicas)
    best = None
    if cfg.strategy == "pipeline" and cfg.schedule in MULTI_STAGE:
        return _interleaved(cfg, per_block, micro, split_bytes, evaluation, outside)
    for s, (a, b) in enumerate(_stages(cfg)):
        if cfg.strategy == "model-parallel":
            in_flight = 1
        else:  # GPipe runs every forward first; 1F1B holds at most n - s micro-batches on stage s
            in_flight = m if cfg.schedule == "gpipe" else min(m, n - s)
        pipeline = cfg.strategy == "pipeline"
        on_first = pipeline or s == 0  # model-parallel holds the batches on its first GPU only
        # every pipeline rank builds the whole model before freeing the other stages (model-parallel:
        # its first GPU); to evaluate, every pipeline rank receives every stage's weights (gathered as
        # pickled bytes, on the GPU under NCCL), and rank 0 assembles and runs the full model
        setup = 4 * params if pipeline or s == 0 else 0
        gathered = 4 * params if pipeline else 0
        kept, recompute = activations(cfg, micro, a, b)
        # beside data parallel each stage is a DDP module: its gradient buckets come on top
        buckets, note = (4 * sum(per_block[a:b]), "stage, DDP buckets") if replicas > 1 else (0, "stage")
        est = Estimate(16 * sum(per_block[a:b]), buckets, kept * in_flight + recompute, note, micro,
                       split_bytes if on_first else 0, setup, gathered + (evaluation if s == 0 else 0), outside, s)
        if best is None or est.total_bytes > best.total_bytes:
            best = est
    return best


def _interleaved(cfg: RunConfig, per_block, micro: int, split_bytes: int, evaluation: int, outside: int) -> Estimate:
    """Interleaved schedules: rank r holds stages r, r + n, ... of n x V; its warm-up runs about
    n - r + (V - 1) n forwards before its first backward (Megatron's interleaved 1F1B), spread over
    its V stages, so each of its stages holds up to min(m, that / V + 1) micro-batches. An upper
    bound for zero bubble, whose weight-gradient steps free activations later."""
    n, v, m = degrees(cfg)["pp"], cfg.stages_per_rank, _microbatches(cfg)
    bounds = build_model(cfg.model, size=cfg.model_size, device="meta").stage_boundaries(n * v)
    params = sum(per_block)
    best = None
    for r in range(n):
        warm = n - r + (v - 1) * n
        in_flight = min(m, -(-warm // v) + 1)
        kept, recompute = 0, 0
        for s in range(r, n * v, n):
            k, rc = activations(cfg, micro, *bounds[s])
            kept, recompute = kept + k, max(recompute, rc)
        weights = 16 * sum(sum(per_block[a:b]) for a, b in (bounds[s] for s in range(r, n * v, n)))
        buckets = weights // 4 if degrees(cfg)["dp_replicate"] > 1 else 0  # DDP's, beside data parallel
        est = Estimate(weights, buckets, kept * in_flight + recompute, "stages", micro, split_bytes, 4 * params,
                       4 * params + (evaluation if r == 0 else 0), outside, r)
        if best is None or est.total_bytes > best.total_bytes:
            best = est
    return best


def _microbatches(cfg: RunConfig) -> int:
    return cfg.microbatches or 2 * degrees(cfg)["pp"]


def free_bytes(cfg: RunConfig, device_type: str) -> tuple[int, str]:
    """Memory a device of this run can use, and where that figure comes from."""
    if device_type == "cuda":
        from .monitor import free_device_bytes

        local = cfg.devices // cfg.nodes if cfg.strategy != "single" else 1
        free = [free_device_bytes(i) for i in range(max(1, min(local, torch.cuda.device_count())))]
        return min(free), f"free on the fullest of {len(free)} local GPU(s)" if len(free) > 1 else "free on cuda:0"
    import psutil

    from .strategies import get_strategy

    workers = cfg.devices // cfg.nodes if get_strategy(cfg.strategy).multiprocess else 1
    return psutil.virtual_memory().available // workers, f"available RAM / {workers} worker process(es)"


def out_of_memory(device: torch.device, step: int) -> str:
    """The line a run that ran out of memory ends with: where, how much, and the way out."""
    import psutil

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        from .monitor import peak_rss_bytes

        peak = peak_rss_bytes()
        total = psutil.virtual_memory().total
    return (f"out of memory at step {step}, peak {peak / GiB:.1f} GiB of {total / GiB:.1f} GiB on {device}: "
            "try --strategy fsdp, a smaller --batch-size or --precision bf16")


def check_fits(cfg: RunConfig, device_type: str) -> Estimate:
    """Refuse, in one line with the estimate and the way out, a run that cannot fit."""
    est = estimate(cfg, device_type)
    free, where = free_bytes(cfg, device_type)
    if est.total_bytes > free:
        ways = []
        if cfg.strategy != "fsdp":
            ways.append("--strategy fsdp (shards parameters, gradients and AdamW state)")
        ways.append("a smaller --batch-size")
        if cfg.precision == "fp32":
            ways.append("--precision bf16")
        raise ConfigError(f"{cfg.model} ({cfg.model_size}) does not fit: estimated {est.text()} > "
                          f"{free / GiB:.1f} GiB {where}; try {', '.join(ways)}")
    return est
