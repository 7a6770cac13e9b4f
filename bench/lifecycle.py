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
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from emotion_models.audio import FeatureConfig
from emotion_models.dataset import Dataset, load_folder, load_synthetic
from emotion_models.models import check_model, feature_kind

from . import control, faults, launch, stops, trust
from .cells import _getter, setting_parts
from .config import ConfigError, RunConfig
from .distenv import DistEnv, init_env, resolve_device_type, set_threads, thread_count
from .envinfo import fingerprint
from .memory import check_fits
from .memory import estimate as memory_estimate
from .results import RunSummary, build_result, write_result
from .strategies import check_strategy, parallelism


@dataclass
class Outcome:
    """How a run ended, for the caller to render."""

    status: str  # ok | failed | interrupted | diverged | refused (bad input: nothing started, no file)
    code: int  # exit code: 0 ok, 1 failed or diverged, 2 bad input (nothing trained), 130/143 interrupted
    path: Path | None  # the result file; None where refused, or where rank 0 on another node wrote it
    error: str | None = None  # the one line users see
    notes: list[str] = field(default_factory=list)  # warnings for the user: oversubscribed cores, few steps, ...


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _silent(_: str) -> None:
    pass


@contextlib.contextmanager
def _no_progress():
    yield lambda total, description="": (lambda n=1: None)


def new_run_id(cfg: RunConfig, device_type: str) -> str:
    prec = cfg.precision + ("-compiled" if cfg.compile else "")
    extra = "".join(f"-{part}" for part in setting_parts(_getter(cfg), key=True))  # -tp8, -ga2, ...
    return launch.run_id(f"{cfg.strategy}-{cfg.model}-{prec}{extra}", cfg.devices, device_type)


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
        # a micro-batch's samples per device (with --grad-accum K, K of them make an optimiser step)
        "batch_size_per_device": cfg.global_batch_size // (cfg.devices * cfg.grad_accum) if cfg.devices > 0 else None,
        "num_microbatches": None,
        "schedule": cfg.schedule if cfg.strategy == "pipeline" else None,
        "parallelism": parallelism(cfg),  # the degrees, the mesh's shape, each rank's coordinates on it
    })
    rec.update(plan_info or {})
    return rec


def _write(cfg: RunConfig, *, status: str, error: str | None, device_type: str, world_size: int,
           backend: str | None, summary: RunSummary | None, t0: float, data: Dataset | None,
           notes: list[str] | None = None) -> Path | None:
    """Write the result; if --out cannot take it (disk full, folder removed), the fallback folder
    does, and if nothing can, the whole result goes to stdout: measurements are never lost."""
    config = config_record(cfg, device_type, world_size, backend, summary.plan_info if summary else None)
    result = build_result(run_id=cfg.run_id, status=status, error=error, config=config, env=fingerprint(),
                          data=data.summary() if data else None, summary=summary, wall_s=time.perf_counter() - t0)
    try:
        return write_result(result, cfg.out_dir)
    except OSError as exc:
        first = f"could not write the result to {cfg.out_dir} ({exc.strerror or exc})"
    fallback = fallback_dir()
    try:
        path = write_result(result, fallback)
        (notes if notes is not None else []).append(f"{first}: it is at {path}")
        return path
    except OSError as exc:
        print(json.dumps(result, indent=1))
        (notes if notes is not None else []).append(f"{first}, nor to {fallback} ({exc.strerror or exc}): "
                                                     "the whole result is printed above")
        return None


def write_summary(cfg: RunConfig, summary: RunSummary, data: Dataset, device_type: str, world_size: int,
                  backend: str | None, t0: float) -> Path | None:
    """The result of a run measured outside `run` (bench tune's windows in a kept job), written as
    `run` writes its own: status ok, the config record, the fingerprint, atomically."""
    return _write(cfg, status="ok", error=None, device_type=device_type, world_size=world_size, backend=backend,
                  summary=summary, t0=t0, data=data)


def fallback_dir() -> Path:
    """Where results go when --out cannot take them."""
    return Path(os.environ.get("EMOTION_BENCH_FALLBACK", Path(tempfile.gettempdir()) / "emotion-bench-results"))


def check_out_dir(out_dir: str) -> None:
    """--out is created and shown to be writable before anything runs."""
    if not out_dir.strip():
        raise ConfigError("--out is empty: give a folder, e.g. --out results/runs")
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {out_dir}: cannot write there ({exc.strerror or exc}): choose a writable folder") from None


def _failed(cfg: RunConfig, message: str, code: int, *, device_type: str, t0: float, world_size: int | None = None,
            backend: str | None = None, data: Dataset | None = None, shown: str | None = None,
            status: str = "failed", summary: RunSummary | None = None) -> Outcome:
    """Record a cell that did not finish (failed, interrupted, diverged); every such path comes here."""
    notes: list[str] = []
    path = _write(cfg, status=status, error=message, device_type=device_type, world_size=world_size or cfg.devices,
                  backend=backend, summary=summary, t0=t0, data=data, notes=notes)
    return Outcome(status, code, path, shown or message, notes)


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

def run(cfg: RunConfig, *, say: Callable[[str], None] = _silent, progress=_no_progress, dry_run: bool = False,
        own_process: bool = False) -> Outcome:
    """Validate, prepare data, train (here or through torchrun), write the result; never raises for
    a run that fails or is interrupted. `say` gets the one-line notes; `progress()` is a context
    yielding bar makers. dry_run: validate everything (the memory estimate and --out included),
    say what would run, and stop: no data, no training, no result file. own_process: a
    single-process strategy trains in a fresh process of its own (sweep and parity cells: nothing
    of an earlier cell carries over), as multi-process strategies always do."""
    t0 = time.perf_counter()
    device_type = "cuda" if cfg.device == "cuda" else "cpu"
    # a dry run for GPUs on a machine without any: planned as on CUDA, not checked against a GPU
    planning = dry_run and cfg.device == "cuda" and not _cuda_available()
    try:
        cfg.validate()
        device_type = "cuda" if planning else resolve_device_type(cfg)
        spec, estimate, unfit = _preflight(cfg, device_type, planning=planning, dry_run=dry_run)
    except ValueError as exc:  # ConfigError included
        # refused before anything started: nothing was measured, so there is no result to keep (a
        # file would only be listed by the next report); a sweep records the refusal in its manifest
        return Outcome("refused", 2, None, str(exc))
    if cfg.run_id is None:
        cfg = cfg.replace(run_id=new_run_id(cfg, device_type))
    if own_process and not spec.multiprocess and not dry_run:
        return _in_child(cfg, device_type, t0)  # the child resolves threads and data as a run does
    local = cfg.devices // cfg.nodes if spec.multiprocess else 1
    threads, source = thread_count(cfg, local)
    cfg = cfg.replace(threads=threads, threads_source=source)
    notes = _oversubscribed(device_type, local, threads)
    if dry_run:
        return _dry_run(cfg, spec, device_type, planning=planning, estimate=estimate, unfit=unfit,
                        local=local, threads=threads, source=source, notes=notes, say=say)
    if device_type == "cpu" and spec.multiprocess:
        say(f"no CUDA here: --gpus {cfg.devices} runs {cfg.devices} CPU worker processes with gloo "
            f"(device_type cpu, {local} on this node)")
    for note in notes:
        say(f"warning: {note}")
    return _load_and_train(cfg, spec, device_type, t0, notes=notes, say=say, progress=progress)


def _preflight(cfg: RunConfig, device_type: str, *, planning: bool, dry_run: bool) -> tuple:
    """The checks after validation, before any data work: (strategy spec, memory estimate, unfit).
    unfit: why a dry run would be refused for memory (it still says what rank 0 would hold), else None."""
    unfit = None
    spec = check_strategy(cfg, device_type)
    check_model(cfg.model, cfg.model_size)  # unknown names fail here, before data work
    if planning:
        estimate = memory_estimate(cfg, device_type)
    else:
        try:
            estimate = check_fits(cfg, device_type)  # a model that cannot fit is refused before it allocates
        except ConfigError as exc:
            if not dry_run:
                raise
            unfit, estimate = str(exc), memory_estimate(cfg, device_type)
    check_out_dir(cfg.out_dir)
    return spec, estimate, unfit


def _dry_run(cfg: RunConfig, spec, device_type: str, *, planning: bool, estimate, unfit: str | None, local: int,
             threads: int, source: str, notes: list[str], say: Callable[[str], None]) -> Outcome:
    """Say what would run, rehearse rank 0 of a multi-process run, and stop."""
    if planning:
        say("no CUDA on this machine: planned for CUDA GPUs; the estimate is not checked against a GPU's memory")
    if unfit is None:
        say(f"would run {cfg.run_id}: {local} process(es) on this node x {threads} thread(s) ({source}); "
            f"memory {estimate.text()}")
    if spec.multiprocess and cfg.devices > 1:
        # rank 0 of the run, built here on the meta device under a fake process group: the code a
        # 64-GPU job would run, before any GPU is asked for
        from . import rehearse

        try:
            say(rehearse.text(cfg, rehearse.rehearse(cfg, 0, device_type)))
        except Exception as exc:
            return Outcome("failed", 1, None, f"the rehearsal of rank 0 failed: {_describe(exc)}", notes)
    if unfit is not None:
        return Outcome("failed", 2, None, unfit, notes)
    return Outcome("ok", 0, None, None, notes)


def _load_and_train(cfg: RunConfig, spec, device_type: str, t0: float, *, notes: list[str],
                    say: Callable[[str], None], progress) -> Outcome:
    """Load the data and train, here or through torchrun; a failure on the way is still a recorded cell."""
    data = None
    try:
        with stops.signals_raise(), progress() as bars:
            data = load_data(cfg, progress=lambda n, d: bars(n, d), say=say)
            s = data.summary()
            say(f"data: {s['source']}: {s['clips']} clips, {s['speakers']} speakers, "
                f"train/val/test {s['per_split']['train']}/{s['per_split']['val']}/{s['per_split']['test']} clips"
                + (f", {s['skipped']} skipped" if s["skipped"] else ""))
            outcome = (_launched(cfg, device_type, data, t0, say) if spec.multiprocess
                       else _in_process(cfg, device_type, data, bars, t0))
    except stops.Interrupted as exc:
        return _interrupted(cfg, exc, device_type, t0, data)
    except Exception as exc:
        # data that cannot be read (no audio, bad manifest) or a fault of the launcher itself: the
        # cell is still recorded as failed, so no sweep or user loses track of it
        bad_input = isinstance(exc, (ValueError, OSError))
        message = str(exc) if bad_input else f"{type(exc).__name__}: {exc}"
        return _failed(cfg, message, 2 if bad_input else 1, device_type=device_type, t0=t0, data=data)
    outcome.notes = notes + outcome.notes + _few_steps(outcome)
    return outcome


def _oversubscribed(device_type: str, local: int, threads: int) -> list[str]:
    flag = trust.oversubscribed(device_type, local, threads, os.cpu_count() or 1)
    return [flag] if flag else []


def _few_steps(outcome: Outcome) -> list[str]:
    if outcome.status != "ok" or outcome.path is None or not outcome.path.exists():
        return []
    flag = trust.few_steps(json.loads(outcome.path.read_text())["throughput"].get("measured_steps"))
    return [flag] if flag else []


def _interrupted(cfg: RunConfig, exc: stops.Interrupted, device_type: str, t0: float,
                 data: Dataset | None) -> Outcome:
    """A signal before training (or in the launcher): keep a result rank 0 wrote, else write one."""
    path = Path(cfg.out_dir) / f"{cfg.run_id}.json"
    try:
        prior = json.loads(path.read_text())
        if prior.get("status") == "interrupted":
            return Outcome("interrupted", exc.exit_code, path, prior["error"])
    except (OSError, ValueError):
        pass
    if exc.log_path is not None:  # launched workers that wrote nothing: say so, do not guess when
        message = f"interrupted by {exc.name}; no worker wrote what it measured (worker log: {exc.log_path})"
    else:
        message = f"interrupted by {exc.name} before training started"
    return _failed(cfg, message, exc.exit_code, device_type=device_type, t0=t0, data=data, status="interrupted")


def _in_process(cfg: RunConfig, device_type: str, data: Dataset, bars, t0: float) -> Outcome:
    from .train import execute

    env = init_env(cfg, device_type)
    set_threads(cfg, 1)
    faults.install(env.rank)
    try:
        summary = execute(cfg, env, data, progress=bars)
    except stops.Stopped as stop:  # interrupted or diverged: what was measured, with its status
        return _failed(cfg, str(stop), stop.exit_code, device_type=device_type, t0=t0, world_size=1, data=data,
                       status=stop.status, summary=stop.summary)
    except Exception as exc:  # any failure in training becomes a failed result
        message = _describe(exc)
        return _failed(cfg, message, 1, device_type=device_type, t0=t0, world_size=1, data=data,
                       shown=f"run failed: {message}")
    notes: list[str] = []
    path = _write(cfg, status="ok", error=None, device_type=device_type, world_size=1, backend=None,
                  summary=summary, t0=t0, data=data, notes=notes)
    return Outcome("ok", 0, path, None, notes)


CELL_ENV = "EMOTION_BENCH_CELL"  # set in a cell's own process: run the RunConfig in launch.CONFIG_ENV


def _in_child(cfg: RunConfig, device_type: str, t0: float) -> Outcome:
    """One cell in a fresh process (`bench run` reading cfg from the environment), waited for.

    A cell run in the caller's process inherits what earlier cells left there: the peak RSS the
    kernel keeps per process (the CPU's peak memory figure), the CUDA allocator's cache and peak,
    dynamo's caches and their recompile counts (past config.recompile_limit a compiled block runs
    eager, silently), thread settings. The child shares the caller's process group, so Ctrl-C or a
    kill of the group reaches both; a signal to the caller alone is passed on, and the child dies
    with its parent. The child writes the result, as any run does."""
    path = Path(cfg.out_dir) / f"{cfg.run_id}.json"
    # an earlier attempt's file (sweep --resume reruns failed cells under the same key) must not
    # pass for this one's if the child dies before writing
    path.unlink(missing_ok=True)
    env = dict(os.environ)
    env[launch.CONFIG_ENV] = json.dumps(dataclasses.asdict(cfg))
    env[CELL_ENV] = "1"
    _libc()  # loaded here: the child calls it between fork and exec, where loading is not safe
    with tempfile.TemporaryDirectory(prefix="emotion-bench-cell-") as tmp:
        log_path = Path(tmp, "cell.log")
        with open(log_path, "w") as log, stops.signals_raise():
            proc = subprocess.Popen([sys.executable, "-m", "bench", "run"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            try:
                rc = proc.wait()
            except stops.Interrupted as exc:  # the child writes what it measured, then goes
                launch.stop_process(proc, exc.signum, launch.GRACE_S)
                return _interrupted(cfg, exc, device_type, t0, None)
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            kept = Path(cfg.out_dir) / f"{cfg.run_id}.log"
            shutil.copyfile(log_path, kept)
            return _failed(cfg, f"the cell's process died ({how}) without writing a result (log: {kept})", 1,
                           device_type=device_type, t0=t0)
    status = result.get("status", "failed")
    return Outcome(status, rc if status != "ok" else 0, path, result.get("error"))


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux: no parent-death signal
        return None


def _die_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM when the parent dies, so that a caller killed on its
    own leaves no cell running on (the child writes an interrupted result and goes)."""
    libc = _libc()
    if libc is not None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def cell_main() -> int:
    """A cell's own process (see _in_child): run the caller's RunConfig; the exit code is the run's."""
    return run(RunConfig(**json.loads(os.environ[launch.CONFIG_ENV]))).code


def _launched(cfg: RunConfig, device_type: str, data: Dataset, t0: float, say: Callable[[str], None]) -> Outcome:
    done = launch.launch(cfg, t0, status=say)
    path = Path(cfg.out_dir) / f"{cfg.run_id}.json"
    if done.ok:
        return Outcome("ok", 0, None if done.other_node else path)
    try:  # rank 0 stopped early and said so itself (diverged, interrupted): its result stands
        prior = json.loads(path.read_text())
        if prior.get("status") == "interrupted" and done.failed_rank not in (None, 0):
            # no signal reached the launcher (launch() raises Interrupted then): torchrun stopped
            # rank 0 with SIGTERM because another rank had failed. That failure is the outcome;
            # what rank 0 measured before it stays.
            prior.update(status="failed", error=f"{done.error}; rank 0 was stopped: {prior['error']}")
            write_result(prior, cfg.out_dir)
            return Outcome("failed", 1, path, f"run failed: {prior['error']} (worker log: {done.log_path})")
        if prior.get("status") in ("diverged", "interrupted"):
            return Outcome(prior["status"], 1 if prior["status"] == "diverged" else 143, path, prior["error"])
    except (OSError, ValueError):
        pass
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
        if not raw:  # a user's own torchrun: the world size is the device count, its rendezvous the run's
            cfg = cfg.replace(devices=world, nodes=int(os.environ.get("GROUP_WORLD_SIZE", "1")))
            if cfg.nodes > 1 and not cfg.rdzv_endpoint:  # torchrun's store: what it gave its workers
                cfg = cfg.replace(rdzv_endpoint=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
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
        from .train import execute

        with stops.signals_raise():
            data = load_data(cfg)
            summary = execute(cfg, env, data, progress=_epoch_lines)
        if env.is_main:
            print(_write(cfg, status="ok", error=None, device_type=device_type, world_size=env.world_size,
                         backend=env.backend, summary=summary, t0=t0, data=data))
        _leave_together(env)
        return 0
    except stops.Stopped as stop:  # no collectives on the way out: the peers may be gone
        return _worker_stopped(cfg, stop, rank, world, device_type, t0, data)
    except stops.Interrupted as exc:  # before training: nothing measured
        if rank == 0:
            _write(cfg, status="interrupted", error=f"interrupted by {exc.name} before training started",
                   device_type=device_type, world_size=world, backend=None, summary=None, t0=t0, data=data)
        return exc.exit_code
    except Exception as exc:
        return _worker_failed(cfg, exc, rank, world, device_type, t0, data)
    finally:
        _destroy_process_group()


def _epoch_lines(total: int, description: str = ""):
    """A torchrun worker's progress: no bar (its output is the launcher's log), one plain line per
    epoch on rank 0, which the launcher passes on (launch._wait_relaying)."""
    from .ui import Ticker

    return Ticker(lambda n=1: None, plain=True)


def _worker_stopped(cfg: RunConfig, stop: stops.Stopped, rank: int, world: int, device_type: str, t0: float,
                    data: Dataset | None) -> int:
    """A worker stopped in training (interrupted or diverged): rank 0 writes what was measured."""
    if rank == 0:
        _write(cfg, status=stop.status, error=str(stop), device_type=device_type, world_size=world,
               backend="nccl" if device_type == "cuda" else "gloo", summary=stop.summary, t0=t0, data=data)
        return stop.exit_code
    # every rank decides divergence together (train._check_finite) and rank 0 reports it: a
    # non-zero exit here would make torchrun stop rank 0 while it writes the result, and the
    # diverged result would be lost to "rank 1 died (exit code 1) without reporting an error"
    return 0 if stop.status == "diverged" else stop.exit_code


def _worker_failed(cfg: RunConfig, exc: Exception, rank: int, world: int, device_type: str, t0: float,
                   data: Dataset | None) -> int:
    """A worker's failure: told to the launcher, or where none listens (a user's own torchrun) written by rank 0."""
    message = _describe(exc)
    if launch.report_error(rank, message):
        traceback.print_exc()  # into the worker log kept beside the failed result, not on the console
    elif rank == 0:
        _failed(cfg, f"rank {rank}: {message}", 1, device_type=device_type, t0=t0, world_size=world, data=data)
    print(f"error: rank {rank}: {message}", file=sys.stderr)
    return 1


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _leave_together(env: DistEnv) -> None:
    # a rank that tears down gloo while its peer still uses the connection makes the peer abort
    # ("terminate called without an active exception")
    control.barrier(env)


def worker_exit(cfg: RunConfig) -> None:
    """Run this process as a torchrun worker and leave without interpreter finalisation
    (launch.worker_exit says why)."""
    launch.worker_exit(worker_main(cfg))  # result written, peers met at a barrier, process group destroyed

