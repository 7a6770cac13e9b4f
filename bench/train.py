"""The measured loop: what every strategy runs through, on every rank.

    setup -> batch plan -> timed epochs (evaluation between them) -> gather -> summary

Order of application (fixed, documented in README): build the model from the seed (identical
on every rank) -> move to the device -> SyncBatchNorm (ddp --sync-bn) -> compile each block in
place (so each block compiles once and wrappers see plain modules) -> the strategy wraps it ->
AdamW over the plan's parameters -> the precision's autocast/GradScaler around each step.

Inside the timed window there is no host sync: losses stay on the device (`loss.detach()`),
step boundaries are CUDA events on GPU and perf_counter on CPU (whose ops are synchronous),
and the device is synchronised only at the window's edges.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import DistributedSampler

from emotion_models.audio import centre_offset, crop_frames
from emotion_models.dataset import Dataset
from emotion_models.models import build_model

from .config import AC_EVERY, ConfigError, RunConfig
from .distenv import DistEnv
from .envinfo import math_settings, peak_tflops
from .memory import EVAL_BATCH, out_of_memory
from .monitor import Monitor, peak_rss_bytes, reset_peak_rss
from .precision import Precision
from .profiling import OPTIMIZER, read_trace, run_profiled, trace_path
from .quality import quality
from .breakdown import breakdown
from .results import Flops, Quality, RankUsage, RunSummary, Throughput, Timing, Utilization
from . import control, stops
from .stops import Diverged, Interrupted, Stopped
from .strategies import Plan, get_strategy



def _sync(device: torch.device | list[torch.device]) -> None:
    """Wait for the device (each of a list: dp and model-parallel drive several from one process)."""
    for d in device if isinstance(device, list) else [device]:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


class _Clock:
    """Step boundaries without host sync: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, devices: list[torch.device] | None = None):
        self.device = device
        self.devices = devices or [device]
        self.cuda = device.type == "cuda"
        self.stop_deadline_s = 5.0  # how long a stopped loop waits for the device to finish its steps

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def durations_s(self, marks: list[tuple]) -> list[float]:
        """Seconds of each (start, end) pair of marks, after the loop: every device synchronised first
        (an event the device has not reached cannot be read: elapsed_time raises "Both events must
        be completed")."""
        if not self.cuda:
            return [b - a for a, b in marks]
        _sync(self.devices)
        return [a.elapsed_time(b) / 1000.0 for a, b in marks]

    def completed_s(self, marks: list[tuple], deadline_s: float | None = None) -> list[float]:
        """Seconds of the steps the device completed, in order, for a loop a signal stopped; without
        blocking. The device normally runs behind the host, and under NCCL one rank may have queued
        a collective that its stopped peer never will: a synchronize would wait for NCCL's watchdog
        (--timeout-s) while the launcher's SIGKILL comes after 20 s. So the end events are polled for
        up to deadline_s. After a sticky CUDA error the queries fail too, and nothing is kept."""
        if not self.cuda:
            return [b - a for a, b in marks]
        deadline = time.monotonic() + (self.stop_deadline_s if deadline_s is None else deadline_s)
        while True:
            done = 0
            while done < len(marks) and _completed(marks[done][1]):
                done += 1
            if done == len(marks) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return [a.elapsed_time(b) / 1000.0 for a, b in marks[:done]]

    def read_losses(self, losses: list[torch.Tensor], marks: list[tuple], done: int) -> list[float]:
        """The losses of the first `done` steps on the host, without waiting on the stream that made
        them (it may be blocked behind a collective that never completes): copied on a side stream
        that waits for the last completed step's end event alone."""
        if done == 0:
            return []
        if not self.cuda:
            return torch.stack(losses[:done]).double().tolist()
        side = torch.cuda.Stream(self.device)
        side.wait_event(marks[done - 1][1])
        with torch.cuda.stream(side):
            return torch.stack(losses[:done]).double().cpu().tolist()  # synchronises the side stream only


def _completed(event) -> bool:
    try:
        return bool(event.query())
    except Exception:
        return False


# ------------------------------------------------------------------------------------------ setup

@dataclass
class Setup:
    """Everything built before the first step."""

    plan: Plan
    precision: Precision
    optimizer: torch.optim.Optimizer
    forward_flops_per_sample: float  # 0 on ranks other than 0 (not counted there)
    cudnn_flop_share: float = 0.0  # of those FLOPs, cuDNN's (convolutions, recurrent layers)


def setup(cfg: RunConfig, env: DistEnv, data: Dataset) -> Setup:
    spec = get_strategy(cfg.strategy)
    torch.manual_seed(cfg.seed)
    fcfg = data.feature_cfg
    # built on its device: identical on every rank (same seed, same device type), and a
    # 2-billion-parameter encoder is not first initialised on the host
    model = build_model(cfg.model, size=cfg.model_size, dropout=cfg.dropout, n_features=fcfg.n_features,
                        frames=fcfg.crop_frames, device=env.device)
    if model.feature_kind != fcfg.kind:
        raise ConfigError(f"model {cfg.model} reads {model.feature_kind} features but the dataset holds {fcfg.kind}")
    # rank 0 reports them; the count's first use of meta tensors costs about a second per process
    kinds = model.block_flop_kinds(2) if env.is_main else [(0, 0)]
    fwd_flops_per_sample = sum(t for t, _ in kinds) / 2
    cudnn_share = sum(c for _, c in kinds) / max(sum(t for t, _ in kinds), 1)
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.compile:
        compile_blocks(model, cfg.compile_backend)
    checkpoint_blocks(model, cfg.ac)  # after compile, before the strategy wraps (docs/design.md)
    plan = spec.fn(model, env, cfg)
    precision = Precision(cfg.precision, env.device, autocast=plan.autocast, scaler_factory=plan.grad_scaler)
    opt = precision.optimizer(plan.parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return Setup(plan, precision, opt, fwd_flops_per_sample, cudnn_share)


def compile_blocks(model, backend: str) -> None:
    """torch.compile each block in place, with room in dynamo's cache for all of them.

    dynamo keeps one cache per code object: every block of a class shares its forward's, and each
    shape and grad mode is an entry: per block one for training, one for evaluation and one more
    once evaluation sees a second batch size (the last, smaller batch), so the CNN's four
    ConvBlocks fill 12. Past config.recompile_limit (8) a block runs eager, silently: a compiled
    cell would measure eager blocks. So the limit grows with the blocks (with room to spare: a
    recompile costs seconds, an eager block the figure); it never shrinks."""
    import torch._dynamo

    need = 4 * len(model.blocks) + 8  # 3 entries a block, measured, and headroom
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, need)
    for block in model.blocks:
        block.compile(backend=backend)


def checkpoint_blocks(model, mode: str) -> list[int]:
    """Activation checkpointing: the chosen blocks wrapped in torch's checkpoint_wrapper (non-reentrant,
    RNG state preserved, so dropout recomputes the same masks): in forward a wrapped block keeps only
    its input, and backward runs its forward again. full: every block; selective: every other block
    (0, 2, 4, ...), torchtitan's layer-wise selective AC at frequency 2. The wrapper's state-dict
    hooks drop its prefix, so checkpoints, parity and evaluation copies see the block's own keys.
    Returns the indices wrapped."""
    every = AC_EVERY[mode]
    if not every:
        return []
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    chosen = list(range(0, len(model.blocks), every))
    for i in chosen:
        model.blocks[i] = checkpoint_wrapper(model.blocks[i])
    return chosen


class _Scaled:
    """A Precision whose backward scales the loss by 1/K: K micro-batches' gradients add up to the
    mean over the whole batch, as one backward of it would give."""

    def __init__(self, precision: Precision, scale: float):
        self._precision, self._scale = precision, scale

    def backward(self, loss: torch.Tensor) -> None:
        self._precision.backward(loss * self._scale)

    def __getattr__(self, name):
        return getattr(self._precision, name)


def accumulate(plan: Plan, x: torch.Tensor, y: torch.Tensor, precision: Precision, k: int) -> torch.Tensor:
    """One optimiser step's forward and backward over this rank's batch: in k micro-batches with
    --grad-accum k (each loss scaled by 1/k; gradients synchronised on the last micro-batch only,
    plan.sync), else at once; then plan.grads_ready. Returns the batch's mean loss."""
    if k == 1:
        loss = plan.step(x, y, precision)
    else:
        scaled = _Scaled(precision, 1.0 / k)
        total = None
        for i, (xi, yi) in enumerate(zip(x.chunk(k), y.chunk(k))):
            with plan.sync(i == k - 1):
                part = plan.step(xi, yi, scaled).detach()
            total = part if total is None else total + part
        loss = total / k
    plan.grads_ready()
    return loss


# ------------------------------------------------------------------------------------------ batches

@dataclass
class Batches:
    """Which samples each step trains on: this rank's slice of the global batch, a random crop
    window per sample and epoch. The whole training split lives on the device."""

    x: torch.Tensor  # (N, F, cache_frames) on the device
    y: torch.Tensor
    sampler: DistributedSampler
    seed: int
    local_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    crop_frames: int

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(steps_per_epoch, local_batch) sample indices and one crop offset per sample, on the device."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)[: self.steps_per_epoch * self.local_batch]
        order = torch.tensor(order, device=self.x.device).view(self.steps_per_epoch, self.local_batch)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        max_offset = self.x.shape[2] - self.crop_frames
        offsets = torch.randint(0, max_offset + 1, (self.x.shape[0],), generator=gen).to(self.x.device)
        return order, offsets

    def batch(self, idx: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = crop_frames(self.x.index_select(0, idx), offsets.index_select(0, idx), self.crop_frames)
        return x, self.y.index_select(0, idx)


def plan_batches(cfg: RunConfig, env: DistEnv, plan: Plan, data: Dataset) -> Batches:
    x, y = data.subset("train", env.device)
    data_rank, data_ranks = plan.data_slice or ((env.rank, env.world_size) if plan.shard_batch else (0, 1))
    global_batch = cfg.global_batch_size
    if global_batch % data_ranks:
        raise ConfigError(f"global batch {global_batch} does not split over {data_ranks} ranks")
    local_batch = global_batch // data_ranks
    if local_batch % cfg.grad_accum:
        raise ConfigError(f"each rank's batch of {local_batch} does not split into --grad-accum {cfg.grad_accum} "
                          "equal micro-batches: change --batch-size or --grad-accum")
    sampler = DistributedSampler(range(x.shape[0]), num_replicas=data_ranks, rank=data_rank,
                                 shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"the training split has {x.shape[0]} clips, fewer than one global batch of {global_batch}: "
                          "lower --batch-size or use a larger --size")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return Batches(x, y, sampler, cfg.seed, local_batch, steps_per_epoch, total_steps,
                   min(cfg.warmup_steps, total_steps - 1), data.feature_cfg.crop_frames)


# ------------------------------------------------------------------------------------------ evaluation

@dataclass
class EvalSets:
    """Validation and test splits, centre-cropped, on the host (moved in batches)."""

    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def of(cls, data: Dataset) -> EvalSets:
        fcfg = data.feature_cfg
        c = centre_offset(fcfg)

        def centred(split):
            x, y = data.subset(split)
            return x[:, :, c : c + fcfg.crop_frames], y

        return cls(centred("val"), centred("test"))


def evaluate(plan: Plan, precision: Precision, xy: tuple[torch.Tensor, torch.Tensor]) -> dict | None:
    """Quality on (x, y) with the full model on rank 0; collective, None on other ranks."""
    module = plan.eval_module()
    if module is None:
        return None
    x, y = xy
    was_training = module.training
    module.eval()
    preds = []
    with torch.no_grad(), precision.autocast():
        for i in range(0, x.shape[0], EVAL_BATCH):
            preds.append(module(x[i : i + EVAL_BATCH].to(plan.input_device)).argmax(1).cpu())
    module.train(was_training)
    return quality(torch.cat(preds), y.cpu())


# ------------------------------------------------------------------------------------------ the loop

@dataclass
class Measured:
    """What one rank measured; host values are read only after the loop."""

    losses: list[torch.Tensor] = field(default_factory=list)  # per step, on the device
    step_marks: list[tuple] = field(default_factory=list)  # (start, end) clock marks per step
    windows: list[tuple[float, float]] = field(default_factory=list)  # timed window per epoch, perf_counter s
    val_f1: list[float] = field(default_factory=list)
    train_s: float = 0.0
    eval_s: float = 0.0
    time_to_target_s: float | None = None
    epochs_to_target: int | None = None
    # per device of the plan: torch's peak allocated over the training steps (warm-up included,
    # evaluation not), bytes; CUDA only
    peak_allocated_bytes: list[int] | None = None
    peak_rss_bytes: int | None = None  # the process's resident peak over the same steps
    peak_eval_bytes: list[int] | None = None  # per device: torch's peak over the test evaluation
    in_steps: bool = False  # within an epoch's steps (a stop there folds their peaks in)
    window_open: float | None = None  # perf_counter start of a timed window not yet closed
    outside_allocator_bytes: list[int] | None = None  # per device: NVML's used less torch's reserved

    def record_eval(self, q: dict | None, cfg: RunConfig, epoch: int) -> None:
        if q is None:
            return
        self.val_f1.append(q["macro_f1"])
        if cfg.target_f1 is not None and self.time_to_target_s is None and q["macro_f1"] >= cfg.target_f1:
            self.time_to_target_s, self.epochs_to_target = self.train_s, epoch + 1


def train(cfg: RunConfig, env: DistEnv, s: Setup, b: Batches, evalsets: EvalSets, tick: Callable,
          m: Measured, monitor: Monitor | None = None) -> None:
    """The timed epochs, measured into `m` (the caller's: an interruption raised anywhere on the way
    out still finds what was measured). Warmup steps run first, outside the window; evaluation runs
    between epochs. The monitor, if any, reads the energy counters at each window's edges."""
    device, opt = env.device, s.optimizer
    # one-cycle LR over the planned steps: stable final epochs; stepped on the host, no sync
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=b.total_steps, pct_start=0.15)
    try:
        _epochs(cfg, env, s, b, evalsets, tick, sched, _Clock(device, s.plan.devices), m, monitor or _NO_MONITOR)
    except torch.OutOfMemoryError as exc:
        raise OutOfMemory(out_of_memory(device, len(m.losses) + 1)) from exc


class OutOfMemory(RuntimeError):
    """A device ran out of memory while training; the message is the line users see."""


class _NoMonitor:
    def window_edge(self, start: bool) -> None: ...


_NO_MONITOR = _NoMonitor()


def _reset_peaks(devices: list[torch.device]) -> None:
    reset_peak_rss()
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)


def _peaks_now(devices: list[torch.device]) -> list[int] | None:
    if not any(d.type == "cuda" for d in devices):
        return None
    return [torch.cuda.max_memory_allocated(d) if d.type == "cuda" else 0 for d in devices]


def _keep_peaks(devices: list[torch.device], m: Measured) -> None:
    """Fold the peaks since the last reset into m (allocator statistics, /proc: host reads, no sync)."""
    m.peak_rss_bytes = max(m.peak_rss_bytes or 0, peak_rss_bytes())
    now = _peaks_now(devices)
    if now is None:
        return
    m.peak_allocated_bytes = [max(a, b) for a, b in zip(m.peak_allocated_bytes or [0] * len(now), now)]


def _epochs(cfg: RunConfig, env: DistEnv, s: Setup, b: Batches, evalsets: EvalSets, tick: Callable,
            sched, clock: _Clock, m: Measured, monitor) -> None:
    plan, precision, opt = s.plan, s.precision, s.optimizer
    step = 0
    report = getattr(tick, "epoch", None)  # a ui.Ticker: one line per epoch where output is not a terminal
    t_first = time.perf_counter()
    for epoch in range(cfg.epochs):
        n_steps = min(b.steps_per_epoch, b.total_steps - step)
        if n_steps <= 0:
            break
        order, offsets = b.epoch(epoch)
        _sync(plan.devices)
        # peak memory of the training steps alone: not setup (the full model built before sharding),
        # not the evaluation between epochs (rank 0's evaluation copy)
        _reset_peaks(plan.devices)
        m.in_steps = True
        t_epoch = time.perf_counter()
        window_start = None
        if step >= b.warmup_steps:
            monitor.window_edge(True)
            window_start = m.window_open = time.perf_counter()
        for k in range(n_steps):
            if step == b.warmup_steps and window_start is None:
                _sync(plan.devices)  # the window's left edge
                monitor.window_edge(True)
                window_start = m.window_open = time.perf_counter()
            start = clock.mark()
            x, y = b.batch(order[k], offsets)
            loss = accumulate(plan, x, y, precision, cfg.grad_accum)
            precision.step(opt)
            sched.step()
            opt.zero_grad(set_to_none=True)
            m.losses.append(loss.detach().float())
            m.step_marks.append((start, clock.mark()))
            step += 1
            tick(1)
        _sync(plan.devices)  # the window's right edge (evaluation is outside it)
        t_end = time.perf_counter()
        _keep_peaks(plan.devices, m)
        m.in_steps = False
        if window_start is not None:
            m.windows.append((window_start, t_end))
            m.window_open = None
            monitor.window_edge(False)
        m.train_s += t_end - t_epoch
        _check_finite(env, m, step - n_steps)  # at epoch ends only: a host sync per epoch, not per step
        if report is not None:  # outside the window: the loss read here costs no timed step a sync
            report(epoch, cfg.epochs, step, b.total_steps, _last_loss(env, plan, m), n_steps * cfg.global_batch_size / (t_end - t_epoch),
                   time.perf_counter() - t_first)
        if cfg.eval_each_epoch or step >= b.total_steps or epoch == cfg.epochs - 1:
            m.record_eval(evaluate(plan, precision, evalsets.val), cfg, epoch)
            control.barrier(env)  # no rank starts timing the next epoch while rank 0 evaluates
            m.eval_s += time.perf_counter() - t_end


def _last_loss(env: DistEnv, plan, m: Measured) -> float | None:
    """The epoch's last training loss, where this rank computes it (a pipeline's last stage does)."""
    if not m.losses or not _loss_here(plan, env.rank):
        return None
    return float(m.losses[-1].item())


def _loss_here(plan, rank: int) -> bool:
    """Whether this rank computes the training loss (every rank, one, or pipeline replicas' last stages)."""
    r = plan.loss_rank
    return r is None or (rank in r if isinstance(r, tuple) else rank == r)


def _check_finite(env: DistEnv, m: Measured, first: int) -> None:
    """Raise Diverged (on every rank alike) when a loss since step `first` is NaN or infinite."""
    finite_here = bool(torch.isfinite(torch.stack(m.losses[first:])).all())
    # ranks stop together: pipeline stages other than the last see no loss
    if not control.any_rank(not finite_here, env):
        return
    values = torch.stack(m.losses).cpu()
    finite = torch.isfinite(values)
    nonfinite = (~finite).nonzero()
    at = int(nonfinite[0]) + 1 if len(nonfinite) else first + 1  # 1-based, as the fault hook counts
    ok = finite[: at - 1].nonzero()
    last = int(ok[-1]) if len(ok) else None
    raise Diverged(at, float(values[last]) if last is not None else None, last + 1 if last is not None else None)


# ------------------------------------------------------------------------------------------ gather

@dataclass
class Gathered:
    """The run's measurements across ranks (rank 0 reads them)."""

    step_s: list[float]  # per step, the slowest rank's time
    window_s: float  # the slowest rank's timed window
    losses: list[float]  # per step, the global mean loss
    ranks: list[dict]  # each rank's memory and utilisation


def local_gather(env: DistEnv, m: Measured, clock: _Clock, monitor: Monitor, warmup: int,
                 devices: list[torch.device] | None = None) -> Gathered:
    """This rank's measurements alone (a run stopped early: no collectives, no blocking wait on the
    device). The timed window is the sum of the timed steps, the window of an epoch cut short having
    no right edge; the energy counters close it where the signal came."""
    step_s = clock.completed_s(m.step_marks)
    try:  # the losses of the steps whose time could be read
        losses = clock.read_losses(m.losses, m.step_marks, len(step_s))
    except Exception:
        losses = []
    if m.in_steps:  # stopped within an epoch's steps: their peak so far (not an evaluation's)
        try:
            _keep_peaks(devices or [], m)
        except Exception:
            pass
    windows = list(m.windows)
    if m.window_open is not None:
        windows.append((m.window_open, time.perf_counter()))
        monitor.window_edge(False)
    info = _rank_info(env, monitor, windows or [(0.0, float("inf"))], step_s[warmup:], m)
    return Gathered(step_s, 0.0, losses, [info])


def _rank_info(env: DistEnv, monitor: Monitor, windows: list, timed_s: list[float], m: Measured) -> dict:
    """What each rank reports of itself: memory over the training steps, utilisation over the timed
    windows (each of its GPUs' too, with its peak allocated), its own step p50."""
    peaks = m.peak_allocated_bytes
    usage = dict(monitor.summary(windows))
    per_device = usage.pop("per_device", None) or None
    if per_device and peaks:
        for d, peak in zip(per_device, peaks):
            d["peak_allocated_bytes"] = peak
    return {"rank": env.rank, "peak_allocated_bytes": max(peaks) if peaks else None,
            "peak_rss_bytes": m.peak_rss_bytes or peak_rss_bytes(),
            "utilization": usage, "own_step_time_ms_p50": _p50_ms(timed_s), "per_device": per_device}


def gather(env: DistEnv, plan: Plan, m: Measured, clock: _Clock, monitor: Monitor, warmup: int) -> Gathered:
    """Collective, after the loop: the only host syncs of the run."""
    own_step_s = clock.durations_s(m.step_marks)
    rank_info = _rank_info(env, monitor, m.windows, own_step_s[warmup:], m)
    step_s = control.max_over_ranks(own_step_s, env)  # the slowest rank sets each step's time
    window_s = control.max_over_ranks([sum(b - a for a, b in m.windows)], env)[0]
    loss_t = torch.stack(m.losses)
    if isinstance(plan.loss_rank, tuple):  # the mean over the ranks that compute it (the others add 0)
        share = env.world_size / len(plan.loss_rank) if env.rank in plan.loss_rank else 0.0
        losses = control.mean_over_ranks(loss_t * share, env)
    elif plan.loss_rank is None:
        losses = control.mean_over_ranks(loss_t, env)
    else:
        losses = control.from_rank(loss_t, plan.loss_rank, env)
    return Gathered(step_s, window_s, losses, control.gather_objects(rank_info, env))


# ------------------------------------------------------------------------------------------ summary

def _p50_ms(step_s: list[float]) -> float | None:
    """The p50 of step times in ms, as the run's own step_time_ms_p50 is taken; None for no steps."""
    return _percentile(step_s, 0.5) * 1000 if step_s else None


def _percentile(values: list[float], q: float) -> float:
    t = torch.tensor(values, dtype=torch.float64)
    return float(torch.quantile(t, q)) if len(values) else float("nan")


def _mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarise(cfg: RunConfig, env: DistEnv, s: Setup, b: Batches, m: Measured, g: Gathered, test_q: dict | None,
              setup_s: float) -> RunSummary:
    timed = g.step_s[b.warmup_steps:]
    timed_samples = len(timed) * cfg.global_batch_size
    window_s = g.window_s or sum(timed)  # a run stopped early: the sum of its timed steps
    samples_per_s = timed_samples / window_s if window_s > 0 else float("nan")
    throughput = Throughput(
        samples_per_s=samples_per_s, samples_per_s_per_device=samples_per_s / cfg.devices,
        step_time_ms_p50=_percentile(timed, 0.5) * 1000, step_time_ms_p90=_percentile(timed, 0.9) * 1000,
        step_time_ms_mean=sum(timed) / len(timed) * 1000 if timed else None, measured_steps=len(timed),
        warmup_steps=b.warmup_steps, timed_window_s=window_s, timed_samples=timed_samples)
    train_flops = 3 * s.forward_flops_per_sample  # backward ~ 2x forward
    dev_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else None
    settings = math_settings()
    peak, peak_source = peak_tflops(dev_name, cfg.precision, cfg.peak_tflops, settings, s.cudnn_flop_share)
    achieved = train_flops * samples_per_s
    flops = Flops(train_flops, s.forward_flops_per_sample, achieved / 1e12, peak, peak_source,
                  achieved / (peak * 1e12 * cfg.devices) if peak else None, settings,
                  s.cudnn_flop_share if env.is_main else None)
    quality_ = Quality(test_q, m.val_f1, cfg.target_f1, m.time_to_target_s, m.epochs_to_target)
    timing = Timing(setup_s, m.train_s, m.eval_s, len(m.step_marks), b.steps_per_epoch)
    return RunSummary(s.plan.info, throughput, utilization(g.ranks, timed_samples, b.steps_per_epoch * cfg.global_batch_size),
                      flops, quality_, timing, g.losses)


def utilization(ranks: list[dict], timed_samples: int, samples_per_epoch: int) -> Utilization:
    """Rank 0's monitor summary, with memory, busy %, power and energy over every rank (and every
    GPU of each): busy % their mean, power and energy their sum; energy over the timed windows."""
    u = dict(ranks[0]["utilization"])
    per_rank = [RankUsage(r["rank"], r["peak_allocated_bytes"], r["peak_rss_bytes"],
                          r["utilization"]["gpu_busy_percent_mean"], r["utilization"]["gpu_energy_j"],
                          r.get("own_step_time_ms_p50"), r["utilization"].get("gpu_power_w_mean"),
                          r.get("per_device")) for r in ranks]
    energy = [r.gpu_energy_j for r in per_rank]
    power = [r.gpu_power_w_mean for r in per_rank]
    used = [r["utilization"].get("gpu_mem_used_peak_bytes") for r in ranks]
    u.update(per_rank=per_rank,
             peak_allocated_bytes=max((r.peak_allocated_bytes or 0) for r in per_rank) or None,
             gpu_busy_percent_mean=_mean([r.gpu_busy_percent_mean for r in per_rank]),
             gpu_mem_used_peak_bytes=max((v or 0) for v in used) or None,
             gpu_power_w_mean=sum(power) if all(p is not None for p in power) else None,
             gpu_energy_j=sum(energy) if all(e is not None for e in energy) else None)
    j = u["gpu_energy_j"]
    u["gpu_energy_j_per_sample"] = j / timed_samples if j is not None and timed_samples else None
    u["gpu_energy_j_per_epoch"] = u["gpu_energy_j_per_sample"] * samples_per_epoch if u["gpu_energy_j_per_sample"] is not None else None
    return Utilization(**u)


# ------------------------------------------------------------------------------------------ one run

def execute(cfg: RunConfig, env: DistEnv, data: Dataset, *, progress: Callable | None = None) -> RunSummary | None:
    """Train and measure one cell on this rank; the summary on rank 0, None on the others."""
    t_setup = time.perf_counter()
    s = setup(cfg, env, data)
    b = plan_batches(cfg, env, s.plan, data)
    evalsets = EvalSets.of(data)
    tick = progress(b.total_steps) if (progress and env.is_main) else (lambda n=1: None)
    setup_s = time.perf_counter() - t_setup
    if env.device.type == "cuda":
        torch.cuda.empty_cache()  # NVML's memory used then shows training, not what setup freed
    monitor = Monitor(cuda_devices=[d.index for d in s.plan.devices if d.type == "cuda"])
    m = Measured()
    after = None  # past the training steps: what was running when a signal came
    try:
        try:
            with monitor:
                train(cfg, env, s, b, evalsets, tick, m, monitor)
            m.outside_allocator_bytes = monitor.outside_allocator_bytes()
            after = "the test evaluation"
            t_test = time.perf_counter()
            _reset_peaks(s.plan.devices)
            test_q = evaluate(s.plan, s.precision, evalsets.test)
            m.peak_eval_bytes = _peaks_now(s.plan.devices)
            if cfg.save_params:
                after = "the parameter dump"
                module = s.plan.eval_module()
                if module is not None:
                    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, cfg.save_params)
            m.eval_s += time.perf_counter() - t_test
            after = "the profiled steps"
            profiled = profile(cfg, env, s, b) if cfg.profile else None  # after everything measured
            after = "the gather of every rank's measurements"
            g = gather(env, s.plan, m, _Clock(env.device, s.plan.devices), monitor, b.warmup_steps)
        except Exception:
            # a signal stops every rank; a rank blocked in a collective may see its peer's exit
            # ("Connection reset by peer") before its own handler runs: that failure is the stop
            stops.raise_if_signalled()
            raise
    except (Interrupted, Diverged) as exc:
        # what this rank measured, without collectives: the peers may be gone
        g = local_gather(env, m, _Clock(env.device, s.plan.devices), monitor, b.warmup_steps, s.plan.devices)
        summary = summarise(cfg, env, s, b, m, g, None, time.perf_counter() - t_setup)
        summary.memory = memory_record(cfg, env, data, summary, m) if env.is_main else None
        if isinstance(exc, Interrupted):
            where = (f"at step {len(m.losses) + 1} of {b.total_steps}" if after is None else
                     f"after its {len(m.losses)} training steps, during {after}")
            raise Stopped("interrupted", f"interrupted by {exc.name} {where}", summary, exc.exit_code) from exc
        raise Stopped("diverged", str(exc), summary, 1) from exc
    if not env.is_main:
        return None
    summary = summarise(cfg, env, s, b, m, g, test_q, setup_s)
    summary.breakdown = profiled
    summary.memory = memory_record(cfg, env, data, summary, m)
    return summary


def memory_record(cfg: RunConfig, env: DistEnv, data: Dataset, summary: RunSummary, m: Measured) -> dict | None:
    """The estimate (bench/memory.py) beside what the run measured, so that a GPU run checks it. The
    training part is what torch's allocator holds at the training steps' peak; on a CPU the
    measured side is the process's peak RSS, which holds the interpreter and torch's libraries too."""
    from .memory import estimate

    try:
        split = data.summary()["per_split"]
        est = estimate(cfg, env.device.type, (split["train"], max(split["val"], split["test"])))
    except Exception as exc:  # an estimate that cannot be made costs the record, never the result
        return {"estimate": None, "error": f"{type(exc).__name__}: {exc}"}
    u = summary.utilization
    if env.device.type == "cuda":
        measured = u.peak_allocated_bytes
        basis = "torch's peak allocated over the training steps, the fullest GPU"
    else:
        measured = max((r.peak_rss_bytes or 0) for r in u.per_rank) or None
        basis = "peak RSS over the training steps, the largest process (interpreter and libraries included)"
    return {"estimate": est.to_dict(), "estimate_text": est.text(),
            "measured": {"training_bytes": measured, "basis": basis,
                         "eval_peak_allocated_bytes": max(m.peak_eval_bytes) if m.peak_eval_bytes else None,
                         "gpu_mem_used_peak_bytes": u.gpu_mem_used_peak_bytes,
                         "outside_allocator_bytes": max(m.outside_allocator_bytes) if m.outside_allocator_bytes else None},
            "training_measured_over_estimated": measured / est.training_bytes if measured and est.training_bytes else None}


def profile(cfg: RunConfig, env: DistEnv, s: Setup, b: Batches) -> dict | None:
    """cfg.profile_steps more steps under torch.profiler on every rank (collective); rank 0 gets the
    breakdown of all ranks' traces."""
    order, offsets = b.epoch(0)

    def one_step(k: int) -> None:
        x, y = b.batch(order[k % b.steps_per_epoch], offsets)
        accumulate(s.plan, x, y, s.precision, cfg.grad_accum)
        with torch.profiler.record_function(OPTIMIZER):
            s.precision.step(s.optimizer)
        s.optimizer.zero_grad(set_to_none=True)

    path = trace_path(cfg.out_dir, cfg.run_id, env.rank)
    run_profiled(cfg.profile_steps, s.plan.devices, one_step, path)
    steps = control.gather_objects(read_trace(path), env)
    if not env.is_main:
        return None
    out = breakdown(steps).to_dict()
    out.update(profiled_steps=cfg.profile_steps,
               traces=[str(trace_path(cfg.out_dir, cfg.run_id, r)) for r in range(env.world_size)])
    ddp_data = getattr(s.plan.model, "_get_ddp_logging_data", None)
    if ddp_data is not None:  # DDP's own counters, a cross-check (ns, averaged over sampled iterations)
        d = ddp_data()
        out["ddp_logging_ms"] = {k: d.get(f"avg_{k}_time", 0) / 1e6 for k in
                                 ("forward_compute", "backward_compute", "backward_comm", "backward_compute_comm_overlap")}
    if "bubble_fraction" in s.plan.info:
        idle = [r["parts_share"]["idle"] for r in out["per_rank"]]
        out["bubble"] = {"analytic": s.plan.info["bubble_fraction"], "measured_idle_share": sum(idle) / len(idle),
                         "stages_per_rank": s.plan.info.get("stages_per_rank", 1)}
    return out
