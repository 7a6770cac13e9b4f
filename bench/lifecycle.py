"""One run's lifecycle: validate, prepare data, train in this process or through torchrun, write the
result file, and return an Outcome. The only writer of result files, failed ones included.

    outcome = run(cfg)            # the CLI, sweep, parity and benchmarks/ all come through here

Single-process strategies train in this process. Multi-process strategies are launched through
torch.distributed.run (bench/launch.py) as one worker per device; every worker re-enters `bench
run`, which calls `worker_main`: it reads the launcher's config, trains, and rank 0 writes the
result. The same entry point runs under a user's own `torchrun ... -m bench run ...`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from emotion_models.audio import FeatureConfig
from emotion_models.dataset import Dataset, load_folder, load_synthetic
from emotion_models.models import check_model, feature_kind

from . import faults, launch
from .config import ConfigError, RunConfig
from .distenv import DistEnv, init_env, resolve_device_type, set_threads, thread_count
from .envinfo import fingerprint
from .memory import check_fits
from .results import RunSummary, build_result, write_result
from .strategies import check_strategy


@dataclass
class Outcome:
    """How a run ended, for the caller to render."""

    status: str  # ok | failed
    code: int  # exit code: 0 ok, 1 the run failed, 2 bad input (nothing trained)
    path: Path | None  # the result file; None where rank 0 on another node wrote it
    error: str | None = None  # the one line users see


def _silent(_: str) -> None:
    pass


@contextlib.contextmanager
def _no_progress():
    yield lambda total, description="": (lambda n=1: None)


def new_run_id(cfg: RunConfig, device_type: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    prec = cfg.precision + ("-compiled" if cfg.compile else "")
    return f"{stamp}-{cfg.strategy}-{cfg.model}-{prec}-{cfg.devices}x{device_type}-{secrets.token_hex(2)}"


def load_data(cfg: RunConfig, progress: Callable | None = None, say: Callable[[str], None] = _silent) -> Dataset:
    fcfg = FeatureConfig(kind=feature_kind(cfg.model))
    if cfg.dataset == "synthetic":
        return load_synthetic(cfg.size, data_seed=cfg.data_seed, feature_cfg=fcfg, progress=progress, notify=say)
    return load_folder(cfg.dataset, data_seed=cfg.data_seed, feature_cfg=fcfg, progress=progress, notify=say)


def config_record(cfg: RunConfig, device_type: str, world_size: int, backend: str | None,
                  plan_info: dict | None = None) -> dict:
    """The result's config: every setting, what the launch resolved, and the strategy's own facts."""
    rec = dataclasses.asdict(cfg)
    rec.update({
        "device_type": device_type,
        "world_size": world_size,
        "backend": backend,
        "global_batch_size": cfg.global_batch_size,
        "batch_size_per_device": cfg.global_batch_size // cfg.devices,
        "num_microbatches": None,
        "schedule": cfg.schedule if cfg.strategy == "pipeline" else None,
    })
    rec.update(plan_info or {})
    return rec


def _write(cfg: RunConfig, *, status: str, error: str | None, device_type: str, world_size: int,
           backend: str | None, summary: RunSummary | None, t0: float, data: Dataset | None) -> Path:
    config = config_record(cfg, device_type, world_size, backend, summary.plan_info if summary else None)
    result = build_result(run_id=cfg.run_id, status=status, error=error, config=config, env=fingerprint(),
                          data=data.summary() if data else None, summary=summary, wall_s=time.perf_counter() - t0)
    return write_result(result, cfg.out_dir)


def _failed(cfg: RunConfig, message: str, code: int, *, device_type: str, t0: float, world_size: int | None = None,
            backend: str | None = None, data: Dataset | None = None, shown: str | None = None) -> Outcome:
    """Record a cell that did not finish as a failed result; every failure path comes here."""
    path = _write(cfg, status="failed", error=message, device_type=device_type,
                  world_size=world_size or cfg.devices, backend=backend, summary=None, t0=t0, data=data)
    return Outcome("failed", code, path, shown or message)


def _describe(exc: BaseException) -> str:
    from .train import OutOfMemory

    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    if isinstance(exc, OutOfMemory):
        return msg
    if "out of memory" in msg.lower():
        return f"out of memory: {msg[:300]} (try --strategy fsdp, a smaller --batch-size or --precision bf16)"
    return f"{type(exc).__name__}: {msg[:500]}"


# ------------------------------------------------------------------------------------- the launcher

def run(cfg: RunConfig, *, say: Callable[[str], None] = _silent, progress=_no_progress) -> Outcome:
    """Validate, prepare data, train (here or through torchrun), write the result; never raises for
    a run that fails. `say` gets the one-line notes; `progress()` is a context yielding bar makers."""
    t0 = time.perf_counter()
    device_type = "cuda" if cfg.device == "cuda" else "cpu"
    try:
        cfg.validate()
        device_type = resolve_device_type(cfg)
        spec = check_strategy(cfg, device_type)
        check_model(cfg.model, cfg.model_size)  # unknown names fail here, before data work
        check_fits(cfg, device_type)  # a model that cannot fit is refused before it allocates
    except ValueError as exc:  # ConfigError included
        # a combination that cannot run is still a recorded cell: failed, with the reason
        return _failed(cfg.replace(run_id=cfg.run_id or new_run_id(cfg, device_type)), str(exc), 2,
                       device_type=device_type, t0=t0)
    if cfg.run_id is None:
        cfg = cfg.replace(run_id=new_run_id(cfg, device_type))
    threads, source = thread_count(cfg, cfg.devices // cfg.nodes if spec.multiprocess else 1)
    cfg = cfg.replace(threads=threads, threads_source=source)
    if device_type == "cpu" and spec.multiprocess:
        say(f"no CUDA here: --gpus {cfg.devices} runs {cfg.devices} CPU worker processes with gloo "
            f"(device_type cpu, {cfg.devices // cfg.nodes} on this node)")
    data = None
    try:
        with progress() as bars:
            data = load_data(cfg, progress=lambda n, d: bars(n, d), say=say)
            s = data.summary()
            say(f"data: {s['source']}: {s['clips']} clips, {s['speakers']} speakers, "
                f"train/val/test {s['per_split']['train']}/{s['per_split']['val']}/{s['per_split']['test']} clips"
                + (f", {s['skipped']} skipped" if s["skipped"] else ""))
            if spec.multiprocess:
                return _launched(cfg, device_type, data, t0, say)
            return _in_process(cfg, device_type, data, bars, t0)
    except Exception as exc:
        # data that cannot be read (no audio, bad manifest) or a fault of the launcher itself: the
        # cell is still recorded as failed, so no sweep or user loses track of it
        bad_input = isinstance(exc, (ValueError, OSError))
        message = str(exc) if bad_input else f"{type(exc).__name__}: {exc}"
        return _failed(cfg, message, 2 if bad_input else 1, device_type=device_type, t0=t0, data=data)


def _in_process(cfg: RunConfig, device_type: str, data: Dataset, bars, t0: float) -> Outcome:
    from .train import execute

    env = init_env(cfg, device_type)
    set_threads(cfg, 1)
    faults.install(env.rank)
    try:
        summary = execute(cfg, env, data, progress=bars)
    except Exception as exc:  # any failure in training becomes a failed result
        message = _describe(exc)
        return _failed(cfg, message, 1, device_type=device_type, t0=t0, world_size=1, data=data,
                       shown=f"run failed: {message}")
    path = _write(cfg, status="ok", error=None, device_type=device_type, world_size=1, backend=None,
                  summary=summary, t0=t0, data=data)
    return Outcome("ok", 0, path)


def _launched(cfg: RunConfig, device_type: str, data: Dataset, t0: float, say: Callable[[str], None]) -> Outcome:
    done = launch.launch(cfg, t0, status=say)
    if done.ok:
        return Outcome("ok", 0, None if done.other_node else Path(cfg.out_dir) / f"{cfg.run_id}.json")
    return _failed(cfg, done.error, 1, device_type=device_type, t0=t0,
                   backend="nccl" if device_type == "cuda" else "gloo", data=data,
                   shown=f"run failed: {done.error} (worker log: {done.log_path})")


# ------------------------------------------------------------------------------------- workers

def worker_main(cli_cfg: RunConfig) -> int:
    """Entry point of every torchrun worker. Returns the process exit code."""
    raw = os.environ.get(launch.CONFIG_ENV)
    cfg = RunConfig(**json.loads(raw)) if raw else cli_cfg
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    t0 = time.perf_counter() - float(os.environ.get(launch.ELAPSED_ENV, "0"))  # the launcher's start, if any
    device_type = "cpu"
    data = None
    try:
        device_type = resolve_device_type(cfg)
        if not raw:  # a user's own torchrun: the world size is the device count
            cfg = cfg.replace(devices=world, nodes=int(os.environ.get("GROUP_WORLD_SIZE", "1")))
            if cfg.run_id is None:
                cfg = cfg.replace(run_id=new_run_id(cfg, device_type))
            cfg.validate()
            check_strategy(cfg, device_type)
            threads, source = thread_count(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            cfg = cfg.replace(threads=threads, threads_source=source)
        set_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        env = init_env(cfg, device_type)
        if env.local_rank == 0:
            launch.record_node(cfg, env.rank)
        faults.install(env.rank)
        data = load_data(cfg)
        from .train import execute

        summary = execute(cfg, env, data)
        if env.is_main:
            print(_write(cfg, status="ok", error=None, device_type=device_type, world_size=env.world_size,
                         backend=env.backend, summary=summary, t0=t0, data=data))
        _leave_together(env)
        return 0
    except Exception as exc:
        message = _describe(exc)
        if launch.report_error(rank, message):
            traceback.print_exc()  # into the worker log kept beside the failed result, not on the console
        elif rank == 0:
            _failed(cfg, f"rank {rank}: {message}", 1, device_type=device_type, t0=t0, world_size=world, data=data)
        print(f"error: rank {rank}: {message}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def _leave_together(env: DistEnv) -> None:
    # a rank that tears down gloo while its peer still uses the connection makes the peer abort
    # ("terminate called without an active exception")
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


def worker_exit(cfg: RunConfig) -> None:
    """Run this process as a torchrun worker and leave without interpreter finalisation.

    gloo's C++ threads can still hold work objects with tensors (FSDP2 keeps some), and freeing
    those while Python shuts down takes the GIL and aborts the process (SIGABRT, "terminate called
    without an active exception") now and then, which failed whole runs after their result was
    already written.
    """
    code = worker_main(cfg)  # result written, peers met at a barrier, process group destroyed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

