"""`bench sweep --executor`: where a sweep's cells run.

- local (the default): one after another on this machine, each `bench run` in a fresh process
  (bench.sweep.run_sweep, as always).
- slurm: each cell is a SLURM job submitted through submitit. Cells that ask for the same resources
  go in as one job array (`--array=...%parallelism`). A cell of D devices on nodes of G GPUs is a
  D/G-node job with one task per node. Each task runs `bench run` under torchrun, with its node rank
  and the rendezvous (the job's first node, port 29400) read from SLURM's environment. The callable
  is submitit-Checkpointable, so a preempted or timed-out job is requeued.
- submitit-local: the same jobs through submitit's LocalExecutor on this machine, one at a time
  (timings stay honest). This is the SLURM path without SLURM, and the default suite tests it.

Results land in the sweep's folder as always, atomically. The manifest records each job's id and
state. `--resume` skips finished cells, waits on jobs that still run, and resubmits failed or
preempted ones. Jobs keep running when the sweep that submitted them stops.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from emotion_models.atomic import atomic_write_text

from .config import ConfigError, RunConfig, parse_duration

EXECUTORS = ("local", "submitit-local", "slurm")
KEYS = ("partition", "account", "time", "gpus_per_node", "cpus_per_task", "array_parallelism", "setup")
RDZV_PORT = 29400
FIRST_NODE = "FIRST_NODE"  # the rendezvous host until the job knows its first node (CellJob.node_config)
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
         "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}  # sacct's states of a job not yet over (UNKNOWN: gone from sacct)
PREEMPTED = {"PREEMPTED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}  # over, through no fault of the cell
POLL_S = {"submitit-local": 0.5, "slurm": 15.0}


@dataclass
class ExecutorSpec:
    """`--executor` and its settings (options, or a sweep TOML's [executor] table)."""

    kind: str = "local"
    partition: str | None = None
    account: str | None = None
    time_min: int = 60  # a job's time limit (SLURM --time), minutes
    gpus_per_node: int | None = None  # the partition's GPUs per node; None: CPU nodes
    cpus_per_task: int | None = None
    array_parallelism: int = 16  # jobs of one array running at once
    setup: list[str] = field(default_factory=list)  # shell lines before the job (module load, venv activate)

    @property
    def jobs(self) -> bool:
        return self.kind != "local"

    def device_type(self) -> str:
        return "cuda" if self.kind == "slurm" and self.gpus_per_node else "cpu"


def executor_spec(kind: str | None, table: dict, **options) -> ExecutorSpec:
    """The executor from --executor and its options over the sweep TOML's [executor] table; one
    ConfigError line for anything unknown or out of range."""
    unknown = set(table) - set(KEYS) - {"kind"}
    if unknown:
        raise ConfigError(f"[executor] has unknown keys {sorted(unknown)}; use kind, {', '.join(KEYS)}")
    merged = {**table, **{k: v for k, v in options.items() if v is not None}}
    kind = kind or merged.pop("kind", None) or "local"
    merged.pop("kind", None)
    if kind not in EXECUTORS:
        raise ConfigError(f"--executor {kind}: use one of {', '.join(EXECUTORS)}")
    if kind == "local" and merged:
        raise ConfigError(f"{', '.join(sorted(merged))}: settings of a job executor; add --executor slurm "
                          "(or submitit-local)")
    slurm_only = sorted(k for k in merged if k != "time")
    if kind == "submitit-local" and slurm_only:
        raise ConfigError(f"{', '.join(slurm_only)}: SLURM settings; submitit-local runs its jobs on this machine "
                          "(only --time applies)")
    setup = merged.get("setup", [])
    if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
        raise ConfigError("[executor] setup: give a list of shell lines, e.g. [\"module load cuda\"]")
    time_text = merged.pop("time", None)
    spec = ExecutorSpec(kind, **merged)
    if time_text is not None:
        try:
            minutes = parse_duration(str(time_text).replace(" ", "")) / 60
        except ValueError:
            raise ConfigError(f"--time {time_text}: give a job time limit like 90m, 2h or 1h30m") from None
        spec.time_min = max(1, round(minutes))
    for name in ("gpus_per_node", "cpus_per_task", "array_parallelism"):
        value = getattr(spec, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"--{name.replace('_', '-')} {value}: give a whole number, 1 or more")
    return spec


def place(cfg: RunConfig, spec: ExecutorSpec) -> RunConfig:
    """A cell's nodes under SLURM: D devices on nodes of G GPUs take D/G nodes (the rendezvous is the
    job's first node, filled in on it). Elsewhere the cell as it is."""
    from .strategies import get_strategy

    gpn = spec.gpus_per_node
    if spec.kind != "slurm" or not gpn or cfg.devices <= gpn or not get_strategy(cfg.strategy).multiprocess:
        return cfg
    nodes = max(cfg.nodes, -(-cfg.devices // gpn))
    return cfg.replace(nodes=nodes, rdzv_endpoint=cfg.rdzv_endpoint or f"{FIRST_NODE}:{RDZV_PORT}")


def why_not(spec: ExecutorSpec, device_type: str = "cpu") -> Callable[[RunConfig], str | None]:
    """The sweep's skip rule for jobs: on SLURM the login node's own devices say nothing, so validity,
    the strategy's refusals and whole nodes only; submitit-local: this machine's rule (device_type:
    the sweep's, resolved here), one node."""
    from .strategies import check_strategy
    from .sweep import why_not_here

    def rule(cfg: RunConfig) -> str | None:
        if spec.kind == "submitit-local":
            if cfg.nodes > 1:
                return f"{cfg.nodes} nodes: submitit-local runs jobs on this one machine"
            return why_not_here(cfg, device_type)
        try:
            cfg.validate()
            check_strategy(cfg, spec.device_type())
        except ConfigError as exc:
            return str(exc)
        per_node = cfg.devices // cfg.nodes
        if spec.gpus_per_node and cfg.devices > 1 and per_node > spec.gpus_per_node:
            return f"{per_node} devices per node; the partition's nodes have {spec.gpus_per_node} GPUs"
        if spec.gpus_per_node and cfg.devices > spec.gpus_per_node and cfg.devices % spec.gpus_per_node:
            return f"{cfg.devices} devices do not fill whole nodes of {spec.gpus_per_node} GPUs"
        return None

    return rule


def job_parameters(cfg: RunConfig, spec: ExecutorSpec) -> dict:
    """submitit's parameters of a cell's job: its nodes, one task per node, that node's GPUs."""
    from .strategies import get_strategy

    per_node = cfg.devices // cfg.nodes if get_strategy(cfg.strategy).multiprocess else 1
    return resources(spec, cfg.nodes, per_node if spec.device_type() == "cuda" and cfg.device != "cpu" else 0)


def resources(spec: ExecutorSpec, nodes: int, gpus: int) -> dict:
    """submitit's parameters of a job of so many nodes with so many GPUs each, one task per node."""
    if spec.kind == "submitit-local":
        return {"timeout_min": spec.time_min, "gpus_per_node": gpus, "tasks_per_node": 1}
    params = {"job_name": "emotion-bench", "nodes": nodes, "ntasks_per_node": 1, "time": spec.time_min,
              "array_parallelism": spec.array_parallelism, "setup": list(spec.setup)}
    params.update({k: v for k, v in (("partition", spec.partition), ("account", spec.account),
                                     ("cpus_per_task", spec.cpus_per_task), ("gpus_per_node", gpus or None)) if v})
    return params


def reachable(spec: ExecutorSpec) -> None:
    """One ConfigError line, before anything is written or submitted, where SLURM is not here."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if spec.kind == "slurm" and missing:
        raise ConfigError(f"--executor slurm: no {' or '.join(missing)} on this machine's PATH; run the sweep on a "
                          "SLURM login node, or use --executor local")


def make_executor(spec: ExecutorSpec, folder: Path):
    """submitit's executor for the jobs' logs and pickles in folder (the sweep's jobs/); one line
    before anything is submitted where SLURM cannot be reached from here."""
    reachable(spec)
    if spec.kind == "slurm":
        return submitit.SlurmExecutor(folder=str(folder), max_num_timeout=3)
    return submitit.LocalExecutor(folder=str(folder))


def sbatch_script(cfg: RunConfig, spec: ExecutorSpec, folder: Path) -> str:
    """The sbatch script submitit writes for a cell's job, rendered by submitit's own function (no
    SLURM needed: bench sweep --executor slurm --dry-run shows it)."""
    import shlex
    import sys

    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=str(folder), **job_parameters(cfg, spec))


class CellJob(submitit.helpers.Checkpointable):
    """What a job runs: one cell's `bench run` (its own process, torchrun where multi-process), on
    each node of the job with that node's rank. Returns {status, error} of the run. Checkpointable:
    a job preempted or out of time is requeued with the same cell (its result file is written
    atomically, so a run cut short left none)."""

    def __call__(self, cfg_json: str) -> dict:
        from .lifecycle import run

        cfg = self.node_config(RunConfig(**json.loads(cfg_json)))
        # the job is a fresh process of its own already: a one-process cell trains here, sparing a
        # second interpreter and torch import (benchmarks/executor_overhead.py)
        out = run(cfg, say=lambda line: print(line, flush=True))
        print(f"bench sweep job: {cfg.run_id} (node {cfg.node_rank}): {out.status}"
              + (f": {out.error}" if out.error else ""), flush=True)
        return {"status": out.status, "error": out.error}

    @staticmethod
    def node_config(cfg: RunConfig) -> RunConfig:
        """cfg on this node of a multi-node job: --node-rank is SLURM's node id, the rendezvous the
        job's first host (submitit parses SLURM_JOB_NODELIST as `scontrol show hostnames` does)."""
        if cfg.nodes <= 1:
            return cfg
        env = submitit.JobEnvironment()
        endpoint = cfg.rdzv_endpoint or f"{FIRST_NODE}:{RDZV_PORT}"
        return cfg.replace(node_rank=env.node, rdzv_endpoint=endpoint.replace(FIRST_NODE, env.hostnames[0]))


def alive(kind: str, folder: Path, job_id: str) -> object | None:
    """A job an earlier sweep submitted, when it still runs (a handle to wait on), else None."""
    if kind == "slurm":
        job = submitit.SlurmJob(folder=str(folder), job_id=job_id)
        return job if job.state.split()[0] in ALIVE else None
    import psutil

    try:  # a LocalExecutor job's id is its controller's pid
        proc = psutil.Process(int(job_id.split("_")[0]))
        running = proc.status() != psutil.STATUS_ZOMBIE and "submitit" in " ".join(proc.cmdline())
    except (psutil.Error, ValueError):
        return None
    return _Pid(proc) if running else None


class _Pid:
    """A local job of an earlier sweep: done when its controller process has gone."""

    def __init__(self, proc):
        self.proc, self.job_id = proc, str(proc.pid)

    def done(self) -> bool:
        import psutil

        try:
            return not self.proc.is_running() or self.proc.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True


def ended(job, out: str, key: str) -> dict:
    """A finished job's manifest state: done when its result is ok (or diverged), else the result's
    own status, else what the scheduler says (preempted: resubmitted by --resume) with its first line."""
    from .sweep import done

    if done(out, key):
        return {"state": "done", "result": f"{key}.json", "job_id": job.job_id}
    path = Path(out) / f"{key}.json"
    try:
        result = json.loads(path.read_text())
        return {"state": result.get("status", "failed"), "result": path.name, "error": result.get("error"),
                "job_id": job.job_id}
    except (OSError, ValueError):
        pass
    state = str(getattr(job, "state", "") or "").split(" ")[0]
    paths = getattr(job, "paths", None)
    log = f"; its log: {paths.stderr}" if paths is not None else ""
    return {"state": "preempted" if state in PREEMPTED else "failed", "job_id": job.job_id,
            "error": f"job {job.job_id} ended ({state or 'killed'}) without a result{log}"}


@contextlib.contextmanager
def refused(spec: ExecutorSpec, before: str = ""):
    """A submission the scheduler refuses: one ConfigError line in its own words (submitit echoes
    sbatch's stderr; it goes into that line instead)."""
    from submitit.core.utils import FailedJobError

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    except FailedJobError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ConfigError(f"--executor {spec.kind}: the scheduler refused the job{before}: "
                          f"{' / '.join(lines) or 'no reason given'}") from None


@dataclass
class Jobs:
    """The jobs of one sweep: submit cells, wait for them, keep the manifest's rows current."""

    spec: ExecutorSpec
    out: str
    states: dict[str, dict]
    write: Callable[[], None]  # rewrite the manifest from states
    bar: object
    waiting: dict[str, object] = field(default_factory=dict)  # cell key -> job handle

    def __post_init__(self):
        self.folder = Path(self.out) / "jobs"
        self.executor = make_executor(self.spec, self.folder)

    def submit(self, cells: list) -> None:
        """Submit cells; alike ones (same resources) as one job array under SLURM."""
        groups: dict[str, list] = {}
        for c in cells:
            groups.setdefault(json.dumps(job_parameters(c.cfg, self.spec), sort_keys=True), []).append(c)
        for params, group in groups.items():
            self.executor.update_parameters(**json.loads(params))
            fn, args = CellJob(), [json.dumps(dataclasses.asdict(c.cfg)) for c in group]
            before = f" ({self._submitted()} submitted before it)" if self.waiting else ""
            with refused(self.spec, before):
                jobs = self.executor.map_array(fn, args) if len(group) > 1 else [self.executor.submit(fn, args[0])]
            for c, job in zip(group, jobs):
                self.waiting[c.key] = job
                self.states[c.key] = {"state": "running", "job_id": job.job_id, "executor": self.spec.kind}
        self.write()

    def _submitted(self) -> str:
        return f"jobs {', '.join(str(j.job_id) for j in self.waiting.values())}"

    def wait(self, one: bool = False) -> int:
        """Poll until every waiting job (or one, with one=True) is over; how many failed."""
        failed = 0
        while self.waiting:
            for key, job in list(self.waiting.items()):
                if not job.done():
                    continue
                del self.waiting[key]
                self.states[key] = ended(job, self.out, key)
                if self.states[key]["state"] != "done":
                    failed += 1
                    self.bar.note(f"{self.states[key]['state']} {key}: {self.states[key].get('error')}")
                self.write()
                self.bar.advance()
                if one:
                    return failed
            time.sleep(POLL_S[self.spec.kind])
        return failed

    def run(self, todo: list) -> int:
        """Every cell of todo as a job (locally one at a time); how many failed."""
        failed = self.wait()  # jobs of an earlier sweep first (alive at --resume)
        if self.spec.kind == "slurm":
            for c in todo:
                self.bar.start(c.key)
            self.submit(todo)
            return failed + self.wait()
        for c in todo:
            self.bar.start(c.key)
            self.submit([c])
            failed += self.wait(one=True)
        return failed


class CommandJob(submitit.helpers.Checkpointable):
    """A bench command as one job (bench tune's measuring run); its exit code. Requeued after a
    preemption or the time limit with --resume, so the command carries on from its own state."""

    def __call__(self, argv: list[str]) -> int:
        import subprocess
        import sys

        return subprocess.run([sys.executable, "-m", "bench", *argv]).returncode

    def checkpoint(self, argv: list[str]):
        return submitit.helpers.DelayedSubmission(self, argv if "--resume" in argv else [*argv, "--resume"])


def command_job(argv: list[str], spec: ExecutorSpec, folder: Path, gpus: int, resume: bool,
                say: Callable[[str], None]) -> int:
    """Run `bench ARGV` as one job of one node with gpus GPUs, wait for it, pass its output on; its
    exit code. folder/tune-job.json records the job: with resume, a job still running is waited on
    instead of submitted again. A Ctrl-C stops the waiting, never the job."""
    reachable(spec)
    if spec.kind == "slurm" and spec.gpus_per_node and gpus > spec.gpus_per_node:
        raise ConfigError(f"{gpus} devices: a measured tune runs on one node, and the partition's have "
                          f"{spec.gpus_per_node} GPUs")
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "tune-job.json"
    job = None
    if resume and record.exists():
        row = json.loads(record.read_text())
        job = alive(row["executor"], folder / "jobs", str(row["job_id"]))
        if job is not None:
            say(f"job {row['job_id']} ({row['executor']}) still runs: waiting on it")
    if job is None:
        executor = make_executor(spec, folder / "jobs")
        executor.update_parameters(**resources(spec, 1, gpus if spec.device_type() == "cuda" else 0))
        with refused(spec):
            job = executor.submit(CommandJob(), argv)
        atomic_write_text(record, json.dumps({"job_id": job.job_id, "executor": spec.kind, "argv": argv}) + "\n")
        say(f"submitted job {job.job_id} ({spec.kind}): bench {' '.join(argv)}")
    try:
        while not job.done():
            time.sleep(POLL_S[spec.kind])
    except KeyboardInterrupt:
        say(f"job {job.job_id} keeps running; the same command with --resume waits on it")
        return 130
    return _finished(spec, folder, str(job.job_id), say)


def _finished(spec: ExecutorSpec, folder: Path, job_id: str, say: Callable[[str], None]) -> int:
    """A finished command job: its output passed on, its exit code (1 where it left none)."""
    job = (submitit.SlurmJob if spec.kind == "slurm" else submitit.LocalJob)(folder=str(folder / "jobs"), job_id=job_id)
    print(job.stdout() or "", end="", flush=True)
    try:
        return int(job.result())
    except Exception as exc:  # killed, preempted for good, or its node lost: the scheduler's account in one line
        say(f"job {job_id} ended without an exit code: {' '.join(str(exc).split())[:300]}")
        return 1
