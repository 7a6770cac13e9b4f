"""Launching workers through torch.distributed.run (torchrun), and reading why they failed.

Knows nothing of result files: it starts torchrun with one worker per device of this node,
waits, takes the whole process tree down afterwards, and returns what happened. Workers tell
the launcher which rank failed and why through small files in a launch folder; torchrun's own
summary tells which ranks died and how.
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

from emotion_models.atomic import atomic_write_text

from .config import RunConfig
from .stops import Interrupted

CONFIG_ENV = "EMOTION_BENCH_CONFIG"  # the launcher's RunConfig, JSON, for every worker
LAUNCH_DIR_ENV = "EMOTION_BENCH_LAUNCH_DIR"  # where workers leave error reports and node facts
ELAPSED_ENV = "EMOTION_BENCH_ELAPSED_S"  # seconds the launcher had run when it started torchrun


@dataclass
class Launched:
    """How a torchrun launch ended."""

    ok: bool
    other_node: bool = False  # this node had no rank 0: the result was written on another node
    error: str | None = None  # the failing rank and why
    failed_rank: int | None = None  # the rank whose failure ended the run, where one is known
    log_path: Path | None = None  # the worker log, kept beside the result when the run failed


def run_id(what: str, devices: int, device_type: str) -> str:
    """A launch's name: its UTC start (names sort by time), what runs, on how many of which device,
    and 4 random hex digits, so that two launches of the same thing in one second differ."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{what}-{devices}x{device_type}-{secrets.token_hex(2)}"


def torchrun_command(cfg: RunConfig, argv: tuple[str, ...] = ("run",)) -> list[str]:
    """torchrun running `bench ARGV` once per device of this node."""
    per_node = cfg.devices // cfg.nodes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(cfg.nodes),
           "--nproc-per-node", str(per_node), "--max-restarts", "0", "--monitor-interval", "0.5"]
    if cfg.nodes == 1 and not cfg.rdzv_endpoint:
        cmd.append("--standalone")  # a free local port for the rendezvous
    else:
        cmd += ["--node-rank", str(cfg.node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", cfg.rdzv_endpoint,
                "--rdzv-id", "emotion-bench"]
    return cmd + ["-m", "bench", *argv]


def worker_threads(cfg: RunConfig) -> int:
    return cfg.threads or max(1, (os.cpu_count() or 1) // (cfg.devices // cfg.nodes))


def launch(cfg: RunConfig, t0: float, status: Callable[[str], None], argv: tuple[str, ...] = ("run",),
           result: Path | None = None, extra_env: dict[str, str] | None = None) -> Launched:
    """Run `bench ARGV` (bench run: cfg's cell) through torchrun and wait for it; the result file
    (default out_dir/run_id.json) is the workers' business."""
    per_node = cfg.devices // cfg.nodes
    threads = worker_threads(cfg)
    with tempfile.TemporaryDirectory(prefix="emotion-bench-launch-") as launch_dir:
        env = dict(os.environ)
        env[CONFIG_ENV] = json.dumps(dataclasses.asdict(cfg.replace(threads=threads)))
        env[LAUNCH_DIR_ENV] = launch_dir
        env["OMP_NUM_THREADS"] = str(threads)
        env[ELAPSED_ENV] = str(time.perf_counter() - t0)
        env.pop("TORCHELASTIC_RUN_ID", None)
        env.update(extra_env or {})
        log_path = Path(launch_dir, "torchrun.log")
        status(f"launching {per_node} worker process(es) per node through torchrun, {threads} thread(s) each")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(torchrun_command(cfg, argv), env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = _wait_relaying(proc, log_path, status)
            except BaseException as exc:  # Ctrl-C or SIGTERM: the workers write what they measured, then go
                kill_group(proc, GRACE_S)
                if isinstance(exc, Interrupted) and not (result or Path(cfg.out_dir) / f"{cfg.run_id}.json").exists():
                    exc.log_path = _keep_log(cfg, log_path.read_text(errors="replace"))
                raise
        kill_group(proc)  # nothing of the run may outlive it
        log_text = log_path.read_text(errors="replace")
        if rc == 0:
            if (result or Path(cfg.out_dir) / f"{cfg.run_id}.json").exists():
                return Launched(ok=True)
            node = Path(launch_dir, f"node-{cfg.node_rank}.json")
            if cfg.nodes > 1 and node.exists() and json.loads(node.read_text())["first_rank"] != 0:
                return Launched(ok=True, other_node=True)
            message, rank = "workers exited without writing a result", None
        else:
            try:
                message, rank = _failure_message(launch_dir, log_text, rc)
            except Exception as exc:  # the analysis must never cost the failed result
                message, rank = f"torchrun exited with code {rc}; its failure report could not be read ({exc})", None
    return Launched(ok=False, error=message, failed_rank=rank, log_path=_keep_log(cfg, log_text))


EPOCH_LINE = re.compile(r"epoch \d+/\d+: step \d+/\d+.*")  # ui.Ticker.epoch's line, from rank 0's worker


def _wait_relaying(proc: subprocess.Popen, log_path: Path, status: Callable[[str], None]) -> int:
    """Wait for torchrun, passing rank 0's one line per epoch on to the user as it comes: the
    workers' output goes to the log, and a long run would otherwise say nothing until its end."""
    pending = ""
    with open(log_path, errors="replace") as log:
        while True:
            rc = proc.poll()
            pending += log.read()
            *lines, pending = pending.split("\n")
            for line in lines:
                m = EPOCH_LINE.search(line)
                if m:
                    status(m.group(0))
            if rc is not None:
                return rc
            time.sleep(0.1)  # a launch ends within 0.1 s of its workers


def _keep_log(cfg: RunConfig, log_text: str) -> Path:
    """The workers' log beside the result, for a run that failed or lost its result."""
    keep = Path(cfg.out_dir) / f"{cfg.run_id}.torchrun.log"
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_text(log_text)
    return keep


# ------------------------------------------------------------------------------------- worker side

def record_node(cfg: RunConfig, first_rank: int) -> None:
    """A node's first global rank, so the launcher knows whether its node holds rank 0."""
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    if launch_dir:
        Path(launch_dir, f"node-{cfg.node_rank}.json").write_text(json.dumps({"first_rank": first_rank}))


def report_error(rank: int, message: str) -> bool:
    """Tell the launcher why this rank failed; False when no launcher listens (a user's own torchrun)."""
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    if not launch_dir:
        return False
    atomic_write_text(Path(launch_dir, f"error-rank{rank}.json"), json.dumps({"rank": rank, "error": message}))
    return True


def worker_exit(code: int) -> NoReturn:
    """Leave a torchrun worker with this exit code, without interpreter finalisation: gloo's C++
    threads can still hold work objects with tensors, and freeing those while Python shuts down
    takes the GIL and aborts the process (SIGABRT) now and then, after the result was written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


GRACE_S = 20  # after SIGTERM, the workers' time to write what they measured before SIGKILL


def stop_process(proc: subprocess.Popen, first: int, grace_s: float) -> None:
    """`first` (the signal the caller got) to one process, SIGKILL after grace_s if it is still there."""
    for sig in (first, signal.SIGKILL):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def kill_group(proc: subprocess.Popen, grace_s: float = 5) -> None:
    """SIGTERM to torchrun and every worker, SIGKILL after grace_s: nothing of a run outlives it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


# ------------------------------------------------------------------------------------- failure reports

_SIGNALS = {-int(s): s.name for s in signal.Signals}
# what a rank reports when a peer died or hung: a consequence, not the cause
_PEER_ERROR = re.compile(r"connection (reset|closed) by peer|pair closure|broken pipe|timed? ?out", re.I)


def _failure_message(launch_dir: str, log_text: str, rc: int) -> tuple[str, int | None]:
    """The failing rank and why, told apart from what its peers saw because of it: (message, rank).

    Which failure torchrun observes first is a race, so the order of preference is: a rank's own
    error that is not a peer-communication error; then a rank that died without reporting
    (killed, aborted, or stopped while hung; SIGTERM last, torchrun's own way of stopping the
    others), with what its peers saw; then any report.
    """
    reports = {int(p.stem.removeprefix("error-rank")): json.loads(p.read_text())["error"]
               for p in sorted(Path(launch_dir).glob("error-rank*.json"))}
    # torchrun's summary lists every failure as "rank : 1 (local_rank: 1)" ... "exitcode : -9"
    summary = log_text[log_text.find("Failures:"):] if "Failures:" in log_text else log_text
    failures = [(int(r), int(c)) for r, c in re.findall(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", summary, re.S)]
    own = {r: e for r, e in reports.items() if not _PEER_ERROR.search(e)}
    if own:
        rank = min(own)
        return f"rank {rank} failed: {own[rank]}", rank
    # torchrun stops the surviving ranks with SIGTERM once one has died: a rank that died of
    # anything else is the cause. A rank that took the SIGTERM and left on its own exits 143.
    stopped = (-signal.SIGTERM, 128 + signal.SIGTERM)
    silent = sorted(((r, c) for r, c in failures if r not in reports), key=lambda rc: rc[1] in stopped)
    if silent:
        rank, code = silent[0]
        how = f"killed by {_SIGNALS[code]}" if code in _SIGNALS else f"exit code {code}"
        seen = "; ".join(f"rank {r} saw: {e}" for r, e in sorted(reports.items()))
        return (f"rank {rank} died ({how}) without reporting an error; the other ranks were stopped"
                + (f" ({seen})" if seen else "")), rank
    if reports:
        rank = min(reports)
        return f"rank {rank} failed: {reports[rank]}", rank
    return f"torchrun exited with code {rc} before any worker reported", None
