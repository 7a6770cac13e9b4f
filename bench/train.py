"""The measured loop: one function that every strategy runs through, on every rank.

Order of application (fixed, documented in README): build the model from the seed (identical
on every rank) -> move to the device -> SyncBatchNorm (ddp --sync-bn) -> compile each block in
place (so each block compiles once and wrappers see plain modules) -> the strategy wraps it ->
AdamW over the plan's parameters -> autocast/GradScaler around each step.

Inside the timed window there is no host sync: losses stay on the device (`loss.detach()`),
step boundaries are CUDA events on GPU and perf_counter on CPU (whose ops are synchronous),
and the device is synchronised only at the window's edges.
"""
from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from emotion_models.audio import centre_offset, crop_frames
from emotion_models.dataset import Dataset
from emotion_models.models import build_model

from .config import ConfigError, RunConfig
from .distenv import DistEnv
from .envinfo import peak_tflops
from .metrics import quality
from .monitor import Monitor
from .strategies import Plan, get_strategy

EVAL_BATCH = 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Step boundaries without host sync: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start


def _percentile(values: list[float], q: float) -> float:
    t = torch.tensor(values, dtype=torch.float64)
    return float(torch.quantile(t, q)) if len(values) else float("nan")


def evaluate(plan: Plan, x: torch.Tensor, y: torch.Tensor, ctx_factory: Callable) -> dict | None:
    """Quality on (x, y) with the full model on rank 0; collective, None on other ranks."""
    module = plan.eval_module()
    if module is None:
        return None
    was_training = module.training
    module.eval()
    preds = []
    with torch.no_grad(), ctx_factory():
        for i in range(0, x.shape[0], EVAL_BATCH):
            preds.append(module(x[i : i + EVAL_BATCH].to(plan.input_device)).argmax(1).cpu())
    module.train(was_training)
    return quality(torch.cat(preds), y.cpu())


def execute(cfg: RunConfig, env: DistEnv, data: Dataset, *, progress: Callable | None = None) -> dict:
    """Train and measure one cell on this rank. Returns the result body (rank 0 holds the full one)."""
    spec = get_strategy(cfg.strategy)
    device = env.device
    torch.manual_seed(cfg.seed)
    fcfg = data.feature_cfg
    model = build_model(cfg.model, size=cfg.model_size, dropout=cfg.dropout, n_features=fcfg.n_features,
                        frames=fcfg.crop_frames)
    if model.feature_kind != fcfg.kind:
        raise ConfigError(f"model {cfg.model} reads {model.feature_kind} features but the dataset holds {fcfg.kind}")
    fwd_flops_per_sample = sum(model.block_flops(2)) / 2
    t_setup = time.perf_counter()

    model.to(device)
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.compile:
        for block in model.blocks:
            block.compile(backend=cfg.compile_backend)
    plan = spec.fn(model, env, cfg)
    scaler = None
    if cfg.precision == "fp16":
        scaler = plan.grad_scaler() if plan.grad_scaler else torch.amp.GradScaler(device.type)
    # fp16: the fused AdamW reads GradScaler's found_inf on the device; with the default
    # implementation GradScaler.step() calls .item() every step, a host sync in the timed window.
    # (FSDP2's ShardedGradScaler keeps its own path: DTensor parameters.)
    fused = scaler is not None and plan.grad_scaler is None and device.type == "cuda"
    opt = torch.optim.AdamW(plan.parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def ctx_factory():
        if amp_dtype is None or not plan.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    # data: whole splits live on the device; training crops a random window per sample and epoch
    train_x, train_y = data.subset("train", device)
    val_x, val_y = data.subset("val")
    test_x, test_y = data.subset("test")
    centre = centre_offset(fcfg)
    val_x = val_x[:, :, centre : centre + fcfg.crop_frames]
    test_x = test_x[:, :, centre : centre + fcfg.crop_frames]
    n_train = train_x.shape[0]
    data_ranks = env.world_size if plan.shard_batch else 1
    data_rank = env.rank if plan.shard_batch else 0
    global_batch = cfg.global_batch_size
    if global_batch % data_ranks:
        raise ConfigError(f"global batch {global_batch} does not split over {data_ranks} ranks")
    local_batch = global_batch // data_ranks
    sampler = DistributedSampler(range(n_train), num_replicas=data_ranks, rank=data_rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"the training split has {n_train} clips, fewer than one global batch of {global_batch}: "
                          "lower --batch-size or use a larger --size")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = min(cfg.warmup_steps, total_steps - 1)
    # one-cycle LR over the planned steps: stable final epochs; stepped on the host, no sync
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.15)
    max_offset = fcfg.cache_frames - fcfg.crop_frames

    clock = _Clock(device)
    losses: list[torch.Tensor] = []
    step_marks: list[tuple] = []
    windows: list[tuple[float, float]] = []
    val_f1: list[float] = []
    train_s = eval_s = 0.0
    time_to_target = epochs_to_target = None
    zero = torch.zeros((), device=device)
    setup_s = time.perf_counter() - t_setup
    tick = progress(total_steps) if (progress and env.is_main) else None

    monitor = Monitor(cuda_device=device.index if device.type == "cuda" else None)
    with monitor:
        step = 0
        for epoch in range(cfg.epochs):
            if step >= total_steps:
                break
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler)[: steps_per_epoch * local_batch], device=device).view(steps_per_epoch, local_batch)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            offsets = torch.randint(0, max_offset + 1, (n_train,), generator=gen).to(device)
            _sync(device)
            t_epoch = time.perf_counter()
            window_start = t_epoch if step >= warmup else None
            for k in range(steps_per_epoch):
                if step >= total_steps:
                    break
                if step == warmup and window_start is None:
                    _sync(device)  # the window's left edge
                    window_start = time.perf_counter()
                start = clock.mark()
                idx = order[k]
                x = crop_frames(train_x.index_select(0, idx), offsets.index_select(0, idx), fcfg.crop_frames)
                y = train_y.index_select(0, idx)
                if plan.step is not None:
                    loss = plan.step(x, y, ctx_factory)
                else:
                    with ctx_factory():
                        loss = F.cross_entropy(plan.model(x), y)
                    (scaler.scale(loss) if scaler else loss).backward()
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach().float() if loss is not None else zero)
                step_marks.append((start, clock.mark()))
                step += 1
                if tick:
                    tick(1)
            _sync(device)  # the window's right edge (eval is outside it)
            t_end = time.perf_counter()
            if window_start is not None:
                windows.append((window_start, t_end))
            train_s += t_end - t_epoch
            if cfg.eval_each_epoch or step >= total_steps or epoch == cfg.epochs - 1:
                t_eval = time.perf_counter()
                q = evaluate(plan, val_x, val_y, ctx_factory)
                if q is not None:
                    val_f1.append(q["macro_f1"])
                    if cfg.target_f1 is not None and time_to_target is None and q["macro_f1"] >= cfg.target_f1:
                        time_to_target, epochs_to_target = train_s, epoch + 1
                if env.distributed:
                    dist.barrier()  # no rank starts timing the next epoch while rank 0 evaluates
                eval_s += time.perf_counter() - t_eval

    t_eval = time.perf_counter()
    test_q = evaluate(plan, test_x, test_y, ctx_factory)
    params_path = None
    if cfg.save_params:
        module = plan.eval_module()
        if module is not None:
            torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, cfg.save_params)
            params_path = cfg.save_params
    eval_s += time.perf_counter() - t_eval

    # ---- gather what every rank measured (after the loop: the only host syncs of the run)
    step_s = torch.tensor([clock.seconds(a, b) for a, b in step_marks], dtype=torch.float64)
    loss_t = torch.stack(losses).to(torch.float64)
    window_s = torch.tensor([sum(b - a for a, b in windows)], dtype=torch.float64)
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rank_info = {"rank": env.rank, "peak_allocated_bytes": peak_mem, "peak_rss_bytes": rss_peak,
                 "utilization": monitor.summary(windows)}
    if env.distributed:
        coll_dev = device if env.backend == "nccl" else torch.device("cpu")
        step_s = step_s.to(coll_dev)
        dist.all_reduce(step_s, op=dist.ReduceOp.MAX)  # the slowest rank sets each step's time
        window_s = window_s.to(coll_dev)
        dist.all_reduce(window_s, op=dist.ReduceOp.MAX)
        loss_t = loss_t.to(coll_dev)
        if plan.loss_rank is None:
            dist.all_reduce(loss_t)  # gloo has no AVG: sum, then divide
            loss_t /= env.world_size
        else:
            dist.broadcast(loss_t, src=plan.loss_rank)
        ranks = [None] * env.world_size
        dist.all_gather_object(ranks, rank_info)
    else:
        ranks = [rank_info]
    if not env.is_main:
        return {}

    timed = step_s[warmup:].tolist()
    timed_samples = len(timed) * global_batch
    window = float(window_s[0])
    samples_per_s = timed_samples / window if window > 0 else float("nan")
    train_flops = 3 * fwd_flops_per_sample  # backward ~ 2x forward
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak, peak_source = peak_tflops(dev_name, cfg.precision, cfg.peak_tflops)
    achieved = train_flops * samples_per_s
    util = dict(ranks[0]["utilization"])
    energy = [r["utilization"]["gpu_energy_j"] for r in ranks]
    util.update({
        "per_rank": [{"rank": r["rank"], "peak_allocated_bytes": r["peak_allocated_bytes"],
                      "peak_rss_bytes": r["peak_rss_bytes"],
                      "gpu_busy_percent_mean": r["utilization"]["gpu_busy_percent_mean"],
                      "gpu_energy_j": r["utilization"]["gpu_energy_j"]} for r in ranks],
        "peak_allocated_bytes": max((r["peak_allocated_bytes"] or 0) for r in ranks) or None,
        "gpu_busy_percent_mean": _mean([r["utilization"]["gpu_busy_percent_mean"] for r in ranks]),
        "gpu_energy_j": sum(energy) if all(e is not None for e in energy) else None,
    })
    util["gpu_energy_j_per_epoch"] = util["gpu_energy_j"] / cfg.epochs if util["gpu_energy_j"] is not None else None
    return {
        "plan_info": plan.info,
        "local_batch": local_batch,
        "throughput": {
            "samples_per_s": samples_per_s,
            "samples_per_s_per_device": samples_per_s / cfg.devices,
            "step_time_ms_p50": _percentile(timed, 0.5) * 1000,
            "step_time_ms_p90": _percentile(timed, 0.9) * 1000,
            "step_time_ms_mean": sum(timed) / len(timed) * 1000 if timed else None,
            "measured_steps": len(timed),
            "warmup_steps": warmup,
            "timed_window_s": window,
            "timed_samples": timed_samples,
        },
        "utilization": util,
        "flops": {
            "train_flops_per_sample": train_flops,
            "forward_flops_per_sample": fwd_flops_per_sample,
            "achieved_tflops": achieved / 1e12,
            "peak_tflops_per_device": peak,
            "peak_source": peak_source,
            "mfu": achieved / (peak * 1e12 * cfg.devices) if peak else None,
        },
        "quality": {
            "test": test_q,
            "val_macro_f1_by_epoch": val_f1,
            "target_f1": cfg.target_f1,
            "time_to_target_s": time_to_target,
            "epochs_to_target": epochs_to_target,
        },
        "timing": {"setup_s": setup_s, "train_s": train_s, "eval_s": eval_s, "steps": len(step_marks),
                   "steps_per_epoch": steps_per_epoch},
        "losses": loss_t.cpu().tolist(),
        "params_path": params_path,
    }


def _mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
