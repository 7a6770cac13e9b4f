"""One run end to end: data, launch (in process or through torchrun), the result file.

Single-process strategies run in this process. Multi-process strategies are launched through
torch.distributed.run (torchrun, elastic) as one worker per device; every worker re-enters
`bench run` (bench/__main__.py), reads the config from EMOTION_BENCH_CONFIG, and rank 0 writes
the result. The same entry point runs under a user's own `torchrun ... -m bench run ...`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from emotion_models.atomic import atomic_write_text
from emotion_models.audio import FeatureConfig
from emotion_models.dataset import Dataset, load_folder, load_synthetic
from emotion_models.models import feature_kind

from .config import RunConfig
from .distenv import DistEnv, init_env, resolve_device_type, set_threads
from .envinfo import fingerprint
from .results import SCHEMA, write_result
from .strategies import check_strategy

CONFIG_ENV = "EMOTION_BENCH_CONFIG"
LAUNCH_DIR_ENV = "EMOTION_BENCH_LAUNCH_DIR"
ELAPSED_ENV = "EMOTION_BENCH_ELAPSED_S"  # seconds the launcher had run when it started torchrun
FAULT_ENV = "EMOTION_BENCH_FAULT"  # tests only: "kill:RANK:STEP" or "raise:RANK:STEP" or "hang:RANK:STEP"


class RunFailed(Exception):
    """The run started but did not finish; a failed result has been written."""

    def __init__(self, message: str, path: Path | None):
        super().__init__(message)
        self.path = path


def new_run_id(cfg: RunConfig, device_type: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    prec = cfg.precision + ("-compiled" if cfg.compile else "")
    return f"{stamp}-{cfg.strategy}-{cfg.model}-{prec}-{cfg.devices}x{device_type}-{secrets.token_hex(2)}"


def load_data(cfg: RunConfig, progress: Callable | None = None) -> Dataset:
    fcfg = FeatureConfig(kind=feature_kind(cfg.model))
    if cfg.dataset == "synthetic":
        return load_synthetic(cfg.size, data_seed=cfg.data_seed, feature_cfg=fcfg, progress=progress)
    return load_folder(cfg.dataset, data_seed=cfg.data_seed, feature_cfg=fcfg, progress=progress)


def config_record(cfg: RunConfig, device_type: str, world_size: int, backend: str | None,
                  body: dict | None = None) -> dict:
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
    if body:
        rec.update(body.get("plan_info", {}))
    return rec


def build_result(cfg: RunConfig, *, device_type: str, world_size: int, backend: str | None, body: dict | None,
                 status: str, error: str | None, wall_s: float, data_summary: dict | None) -> dict:
    body = body or {}
    timing = dict(body.get("timing", {}))
    timing["wall_s"] = wall_s
    return {
        "schema": SCHEMA,
        "run_id": cfg.run_id,
        "status": status,
        "error": error,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config_record(cfg, device_type, world_size, backend, body),
        "env": fingerprint(),
        "data": data_summary,
        "throughput": body.get("throughput", {}),
        "utilization": body.get("utilization", {}),
        "flops": body.get("flops", {}),
        "quality": body.get("quality", {}),
        "timing": timing,
        "losses": body.get("losses", []),
    }


def write_failed(cfg: RunConfig, *, device_type: str, world_size: int, backend: str | None, error: str, t0: float,
                 data: Dataset | None = None) -> Path:
    """The failed result of a cell that did not finish: every failure path records one."""
    return write_result(build_result(cfg, device_type=device_type, world_size=world_size, backend=backend, body=None,
                                     status="failed", error=error, wall_s=time.perf_counter() - t0,
                                     data_summary=data.summary() if data else None), cfg.out_dir)


def _install_fault(env: DistEnv) -> None:
    """Test hook: make one rank die, raise or hang at a step, to test failure handling."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, rank, step = spec.split(":")
    if int(rank) != env.rank:
        return
    import torch

    counter = {"n": 0}
    orig = torch.optim.AdamW.step

    def faulty(self, *a, **k):
        counter["n"] += 1
        if counter["n"] == int(step):
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                while True:
                    time.sleep(1)
            raise RuntimeError(f"injected fault on rank {env.rank} at step {step}")
        return orig(self, *a, **k)

    torch.optim.AdamW.step = faulty


# ------------------------------------------------------------------------------------- in process

def run_in_process(cfg: RunConfig, device_type: str, data: Dataset, progress: Callable | None, t0: float) -> Path:
    from .train import execute

    env = init_env(cfg, device_type)
    set_threads(cfg, 1)
    _install_fault(env)
    try:
        body = execute(cfg, env, data, progress=progress)
    except Exception as exc:  # any failure in training becomes a failed result
        message = _describe(exc)
        path = write_failed(cfg, device_type=device_type, world_size=1, backend=None, error=message, t0=t0, data=data)
        raise RunFailed(message, path) from exc
    return write_result(build_result(cfg, device_type=device_type, world_size=1, backend=None, body=body,
                                     status="ok", error=None, wall_s=time.perf_counter() - t0,
                                     data_summary=data.summary()), cfg.out_dir)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    if "out of memory" in msg.lower():
        return f"out of memory: {msg[:300]} (lower --batch-size or use a smaller --model-size)"
    return f"{type(exc).__name__}: {msg[:500]}"


# ------------------------------------------------------------------------------------- workers

def worker_main(cli_cfg: RunConfig) -> int:
    """Entry point of every torchrun worker. Returns the process exit code."""
    raw = os.environ.get(CONFIG_ENV)
    cfg = RunConfig(**json.loads(raw)) if raw else cli_cfg
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    t0 = time.perf_counter() - float(os.environ.get(ELAPSED_ENV, "0"))  # the launcher's start, if any
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
        set_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        env = init_env(cfg, device_type)
        if launch_dir and env.local_rank == 0:
            Path(launch_dir, f"node-{cfg.node_rank}.json").write_text(json.dumps({"first_rank": env.rank}))
        _install_fault(env)
        data = load_data(cfg)
        from .train import execute

        body = execute(cfg, env, data)
        if env.is_main:
            result = build_result(cfg, device_type=device_type, world_size=env.world_size, backend=env.backend,
                                  body=body, status="ok", error=None, wall_s=time.perf_counter() - t0,
                                  data_summary=data.summary())
            print(write_result(result, cfg.out_dir))
        if env.distributed:
            # leave together: a rank that tears down gloo while its peer still uses the
            # connection makes the peer abort ("terminate called without an active exception")
            import torch.distributed as dist

            dist.barrier()
        return 0
    except Exception as exc:
        message = _describe(exc)
        if launch_dir:
            atomic_write_text(Path(launch_dir, f"error-rank{rank}.json"), json.dumps({"rank": rank, "error": message}))
            traceback.print_exc()  # into the worker log kept beside the failed result, not on the console
        elif rank == 0:
            write_failed(cfg, device_type=device_type, world_size=world, backend=None, error=f"rank {rank}: {message}",
                         t0=t0, data=data)
        print(f"error: rank {rank}: {message}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


# ------------------------------------------------------------------------------------- torchrun

_SIGNALS = {-int(s): s.name for s in signal.Signals}


def torchrun_command(cfg: RunConfig) -> list[str]:
    per_node = cfg.devices // cfg.nodes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(cfg.nodes),
           "--nproc-per-node", str(per_node), "--max-restarts", "0", "--monitor-interval", "0.5"]
    if cfg.nodes == 1 and not cfg.rdzv_endpoint:
        cmd.append("--standalone")  # a free local port for the rendezvous
    else:
        cmd += ["--node-rank", str(cfg.node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", cfg.rdzv_endpoint,
                "--rdzv-id", "emotion-bench"]
    return cmd + ["-m", "bench", "run"]


def launch(cfg: RunConfig, device_type: str, data: Dataset, t0: float, status: Callable[[str], None]) -> Path | None:
    """Run cfg through torchrun; returns the result path (None on a node without rank 0)."""
    per_node = cfg.devices // cfg.nodes
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // per_node)
    with tempfile.TemporaryDirectory(prefix="emotion-bench-launch-") as launch_dir:
        env = dict(os.environ)
        env[CONFIG_ENV] = json.dumps(dataclasses.asdict(cfg.replace(threads=threads)))
        env[LAUNCH_DIR_ENV] = launch_dir
        env["OMP_NUM_THREADS"] = str(threads)
        env[ELAPSED_ENV] = str(time.perf_counter() - t0)
        env.pop("TORCHELASTIC_RUN_ID", None)
        log_path = Path(launch_dir, "torchrun.log")
        status(f"launching {per_node} worker process(es) per node through torchrun, {threads} thread(s) each")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(torchrun_command(cfg), env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait()
            except BaseException:  # Ctrl-C or our own kill: take the whole worker tree down
                _kill_group(proc)
                raise
        _kill_group(proc)  # nothing of the run may outlive it
        log_text = log_path.read_text(errors="replace")
        result_path = Path(cfg.out_dir) / f"{cfg.run_id}.json"
        if rc == 0:
            if result_path.exists():
                return result_path
            node = Path(launch_dir, f"node-{cfg.node_rank}.json")
            if cfg.nodes > 1 and node.exists() and json.loads(node.read_text())["first_rank"] != 0:
                return None
            message = "workers exited without writing a result"
        else:
            try:
                message = _failure_message(launch_dir, log_text, rc)
            except Exception as exc:  # the analysis must never cost the failed result
                message = f"torchrun exited with code {rc}; its failure report could not be read ({exc})"
        keep = Path(cfg.out_dir) / f"{cfg.run_id}.torchrun.log"
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_text(log_text)
        path = write_failed(cfg, device_type=device_type, world_size=cfg.devices,
                            backend="nccl" if device_type == "cuda" else "gloo", error=message, t0=t0, data=data)
        raise RunFailed(f"{message} (worker log: {keep})", path)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


# what a rank reports when a peer died or hung: a consequence, not the cause
_PEER_ERROR = re.compile(r"connection (reset|closed) by peer|pair closure|broken pipe|timed? ?out", re.I)


def _failure_message(launch_dir: str, log_text: str, rc: int) -> str:
    """The failing rank and why, told apart from what its peers saw because of it.

    Which failure torchrun observes first is a race, so the order of preference is: a rank's own
    error that is not a peer-communication error; then a rank that died without reporting
    (killed, aborted, or stopped while hung), with what its peers saw; then any report.
    """
    reports = {int(p.stem.removeprefix("error-rank")): json.loads(p.read_text())["error"]
               for p in sorted(Path(launch_dir).glob("error-rank*.json"))}
    # torchrun's summary lists every failure as "rank : 1 (local_rank: 1)" ... "exitcode : -9"
    summary = log_text[log_text.find("Failures:"):] if "Failures:" in log_text else log_text
    failures = [(int(r), int(c)) for r, c in re.findall(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", summary, re.S)]
    own = {r: e for r, e in reports.items() if not _PEER_ERROR.search(e)}
    if own:
        rank = min(own)
        return f"rank {rank} failed: {own[rank]}"
    silent = [(r, c) for r, c in failures if r not in reports]
    if silent:
        rank, code = silent[0]
        how = f"killed by {_SIGNALS[code]}" if code in _SIGNALS else f"exit code {code}"
        seen = "; ".join(f"rank {r} saw: {e}" for r, e in sorted(reports.items()))
        return (f"rank {rank} died ({how}) without reporting an error; the other ranks were stopped"
                + (f" ({seen})" if seen else ""))
    if reports:
        rank = min(reports)
        return f"rank {rank} failed: {reports[rank]}"
    return f"torchrun exited with code {rc} before any worker reported"
