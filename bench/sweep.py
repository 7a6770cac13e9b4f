"""`bench sweep`: expand the matrix, skip what cannot run here (with the reason), run the rest.

Each cell's run_id is its key, so `DIR/<key>.json` existing means the cell is done: `--resume`
skips it. Result files are atomic, so an interrupted sweep never leaves a half-written one; the
cell that was running simply runs again. `DIR/sweep.json` (the sweep manifest) lists every cell
with its state (and, for cells run as jobs, the job's id); this module is its only reader and
writer. A folder holds one sweep: a second one (another matrix, or the same one still running in
another process) is refused in one line. Where cells run: bench.executors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import os
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from emotion_models.atomic import atomic_write_text

from .cells import cell_key, cell_label
from .config import ConfigError, RunConfig

PRESET_DIR = Path(__file__).resolve().parent / "presets"
MANIFEST = "sweep.json"
MATRIX_KEYS = ("strategies", "gpus", "precision", "models", "compile", "ac", "grad_accum", "batch", "repeat")
MAX_REPEAT = 100  # more repeats than this is a typo, not a plan (each repeat reruns every cell)
MAX_CELLS = 10_000  # a matrix larger than this would take weeks on any machine


@dataclass
class SweepSpec:
    strategies: list[str]
    gpus: list[int]
    precision: list[str] = field(default_factory=lambda: ["fp32"])
    models: list[str] = field(default_factory=lambda: ["cnn"])
    compile: list[bool] = field(default_factory=lambda: [False])
    ac: list[str] = field(default_factory=lambda: ["none"])  # --ac settings
    grad_accum: list[int] = field(default_factory=lambda: [1])  # --grad-accum K values
    batch: list[int] | None = None  # --batch-size values (None: [run]'s batch_size, one value)
    repeat: int = 1
    run: dict = field(default_factory=dict)  # RunConfig fields shared by every cell
    # further sub-matrices ([[extra]] tables): each overrides some of strategies, gpus, precision,
    # models, compile for a few more cells, e.g. the largest encoder under fsdp bf16 only
    extra: list[dict] = field(default_factory=list)
    executor: dict = field(default_factory=dict)  # the [executor] table: where cells run (bench.executors)

    def identity(self) -> str:
        """What makes two sweeps the same one (matrix and run settings; not where cells run)."""
        same = {k: v for k, v in dataclasses.asdict(self).items() if k != "executor"}
        return hashlib.sha256(json.dumps(same, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def check(self) -> None:
        """Names and sizes that need no hardware: one ConfigError before any cell is expanded."""
        from emotion_models.models import MODELS

        from .config import AC_MODES, PRECISIONS
        from .strategies import get_strategy, parse_cell

        if not 1 <= self.repeat <= MAX_REPEAT:
            raise ConfigError(f"--repeat {self.repeat}: use 1 to {MAX_REPEAT}")
        for sub in [vars(self)] + self.extra:
            for name in MATRIX_KEYS[:-1]:
                if name in sub and sub[name] is not None and not sub[name]:
                    raise ConfigError(f"--{name.replace('_', '-')}: empty list; give at least one value")
            for strategy in sub.get("strategies", []):
                get_strategy(parse_cell(strategy)[0])  # 'fsdp:tp2', 'hsdp:rep2', 'pipeline:gpipe' name a mesh
            for ac in sub.get("ac", []):
                if ac not in AC_MODES:
                    raise ConfigError(f"--ac {ac} is not one of {', '.join(AC_MODES)}")
            for k in sub.get("grad_accum", []):
                if int(k) < 1:
                    raise ConfigError(f"--grad-accum {k}: give 1 or more micro-steps per optimiser step")
            for b in sub.get("batch") or []:
                if int(b) < 1:
                    raise ConfigError(f"--batch {b}: batch sizes must be at least 1")
            for gpus in sub.get("gpus", []):
                if gpus < 1:
                    raise ConfigError(f"--gpus {gpus}: device counts must be at least 1")
            for precision in sub.get("precision", []):
                if precision not in PRECISIONS:
                    raise ConfigError(f"--precision {precision} is not one of {', '.join(PRECISIONS)}")
            for model in sub.get("models", []):
                if model not in MODELS:
                    raise ConfigError(f"--models {model}: unknown model; bench list shows the zoo")
        per_repeat = sum(math.prod(len(m.get(k, getattr(self, k)) or [None]) for k in MATRIX_KEYS[:-1])
                         for m in [{}] + self.extra)
        if per_repeat * self.repeat > MAX_CELLS:
            raise ConfigError(f"the matrix has {per_repeat * self.repeat} cells (more than {MAX_CELLS}): "
                              "fewer values or repeats, or several sweeps")


@dataclass
class Cell:
    key: str
    cfg: RunConfig
    skip_reason: str | None = None


def on_off(v) -> bool:
    """A compile value of a sweep: on/off (true/false, compile/eager, ...)."""
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("on", "true", "yes", "1", "compile"):
        return True
    if str(v).lower() in ("off", "false", "no", "0", "eager"):
        return False
    raise ConfigError(f"compile value {v!r}: use on or off")


def load_spec(path_or_preset: str) -> SweepSpec:
    """A sweep from a TOML file or a shipped preset name (smoke, cpu, gpu-node)."""
    path = Path(path_or_preset)
    if not path.exists():
        preset = PRESET_DIR / f"{path_or_preset}.toml"
        if not preset.exists():
            names = ", ".join(p.stem for p in sorted(PRESET_DIR.glob("*.toml")))
            raise ConfigError(f"--config {path_or_preset}: no such file or preset (presets: {names})")
        path = preset
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot read it ({getattr(exc, 'strerror', None) or exc}): "
                          "pass a sweep TOML file or a preset name") from None
    unknown = set(raw) - set(MATRIX_KEYS) - {"run", "extra", "executor"}
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {sorted(unknown)}; use {', '.join(MATRIX_KEYS)}, [run], "
                          "[[extra]] and [executor]")
    for sub in raw.get("extra", []):
        bad_keys = set(sub) - set(MATRIX_KEYS[:-1])
        if bad_keys:
            raise ConfigError(f"--config {path}: [[extra]] has unknown keys {sorted(bad_keys)}")
    run = dict(raw.get("run", {}))
    valid = {f.name for f in fields(RunConfig)}
    bad = set(run) - valid
    if bad:
        raise ConfigError(f"--config {path}: [run] has unknown fields {sorted(bad)}")
    return SweepSpec(strategies=list(raw.get("strategies", ["single"])), gpus=[int(g) for g in raw.get("gpus", [1])],
                     precision=list(raw.get("precision", ["fp32"])), models=list(raw.get("models", ["cnn"])),
                     compile=[on_off(c) for c in raw.get("compile", ["off"])], ac=list(raw.get("ac", ["none"])),
                     grad_accum=[int(k) for k in raw.get("grad_accum", [1])],
                     batch=[int(b) for b in raw["batch"]] if "batch" in raw else None, repeat=int(raw.get("repeat", 1)),
                     run=run, extra=[dict(sub) for sub in raw.get("extra", [])], executor=dict(raw.get("executor", {})))


def why_not_here(cfg: RunConfig, device_type: str) -> str | None:
    """Why a cell cannot run on this machine (validity, the strategy's refusals, the cores or GPUs
    here, the memory estimate against what is free), else None: a sweep's skip rule, and bench tune's."""
    from .strategies import check_strategy

    try:
        cfg.validate()
        check_strategy(cfg, device_type)
    except ConfigError as exc:
        return str(exc)
    if device_type == "cpu":
        cores = os.cpu_count() or 1
        per_worker = cfg.threads or 1
        if cfg.devices // cfg.nodes * per_worker > cores:
            return (f"{cfg.devices} CPU workers x {per_worker} thread(s) need {cfg.devices * per_worker} cores; "
                    f"this machine has {cores}")
    else:
        import torch

        if cfg.devices // cfg.nodes > torch.cuda.device_count():
            return f"{cfg.devices} GPUs requested; this machine has {torch.cuda.device_count()}"
    from .memory import check_fits

    try:
        check_fits(cfg, device_type)
    except (ConfigError, ValueError) as exc:
        return str(exc)
    return None


def expand(spec: SweepSpec, device_type: str, out_dir: str, why_not=None, place=None) -> list[Cell]:
    """Every cell of the matrix, with a skip reason where it cannot run here (why_not(cfg): another
    rule, as bench tune's at any scale, or a job executor's; place(cfg): the cell on its nodes).

    Repeats are the outer loop, so each repeat's cells run back to back and an efficiency pairs
    cells measured minutes apart, not a whole sweep apart. Within a repeat the single-device
    `single` cells come first: they are the baselines of every efficiency, added where the
    matrix lacks them.
    """
    from .strategies import parse_cell

    spec.check()
    base = RunConfig(**spec.run).replace(out_dir=out_dir)
    cells: dict[str, Cell] = {}

    def add(r: int, **point) -> None:
        cfg = base.replace(**point, repeat=r, seed=base.seed + r)
        cfg = place(cfg) if place else cfg
        key = cell_key(cfg)
        if key not in cells:
            cells[key] = Cell(key, cfg.replace(run_id=key), why_not(cfg) if why_not else why_not_here(cfg, device_type))

    matrices = [spec] + [dataclasses.replace(spec, **{k: ([on_off(c) for c in v] if k == "compile" else v)
                                                      for k, v in sub.items()}) for sub in spec.extra]
    for r in range(spec.repeat):
        for m in matrices:
            for model, precision, comp, ac, k, b in itertools.product(m.models, m.precision, m.compile, m.ac,
                                                                      m.grad_accum, m.batch or [base.batch_size]):
                add(r, model=model, strategy="single", devices=1, precision=precision, compile=comp, ac=ac, grad_accum=k,
                    batch_size=int(b))
        for m in matrices:
            for model, name, devices, precision, comp, ac, k, b in itertools.product(
                    m.models, m.strategies, m.gpus, m.precision, m.compile, m.ac, m.grad_accum,
                    m.batch or [base.batch_size]):
                strategy, mesh, schedule = parse_cell(name)
                if strategy != "single":  # single is one device by definition, added above
                    add(r, model=model, strategy=strategy, devices=devices, precision=precision, compile=comp,
                        ac=ac, grad_accum=int(k), batch_size=int(b), **mesh, **({"schedule": schedule} if schedule else {}))
    return list(cells.values())


def write_manifest(out_dir: str, cells: list[Cell], states: dict[str, dict], meta: dict | None = None) -> None:
    rows = [{"key": c.key, **states.get(c.key, {"state": "pending"})} for c in cells]
    atomic_write_text(Path(out_dir) / MANIFEST, json.dumps({**(meta or {}), "cells": rows}, indent=1) + "\n")


def read_manifest(out_dir: str) -> dict | None:
    """The folder's manifest, or None where there is none (or it is not one)."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def claim(out_dir: str, spec: SweepSpec):
    """Hold the folder for this sweep while it runs: refused (one line) where another bench sweep
    holds it now, or where its manifest is another sweep's (another matrix or run settings)."""
    folder = Path(out_dir)
    with open(folder / ".sweep.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(f"--out {out_dir}: another bench sweep ({holder}) is running in this folder; wait for "
                              "it, or give another --out") from None
        old = read_manifest(out_dir)
        if old and old.get("spec") not in (None, spec.identity()):
            raise ConfigError(f"--out {out_dir} holds another sweep (a different matrix or run settings): give "
                              f"another --out, or remove {folder / MANIFEST} to start this folder over")
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        yield


def skipped_cells(folder: str) -> list[tuple[str, str]]:
    """(cell key, reason) of every cell a sweep in folder did not run: skipped here, or refused by
    bench run before it started (no result file says so); none if it holds no sweep."""
    manifest = Path(folder) / MANIFEST
    if not manifest.exists():
        return []
    cells = json.loads(manifest.read_text())["cells"]
    return ([(c["key"], c.get("reason", "")) for c in cells if c.get("state") == "skipped"]
            + [(c["key"], f"refused: {c.get('error', '')}") for c in cells if c.get("state") == "refused"])


def done(out_dir: str, key: str) -> bool:
    """A cell --resume need not run again: its result is ok, or diverged (deterministic: it would
    again). Failed and interrupted cells run again, as does a file that is not a result."""
    try:
        return json.loads((Path(out_dir) / f"{key}.json").read_text()).get("status") in ("ok", "diverged")
    except (OSError, ValueError):
        return False


def clean_stale(out_dir: str) -> int:
    """Remove the temp files a kill during a write left behind (results are renamed into place, so
    these are never results); how many there were."""
    stale = list(Path(out_dir).glob(".*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


@dataclass
class SweepOutcome:
    cells: list[Cell]
    ran: int
    failed: int
    skipped: int
    resumed: int
    interrupted: object = None  # the Outcome of the cell a signal stopped, which stopped the sweep


def run_sweep(spec: SweepSpec, out: str, *, device_type: str, resume: bool = False,
              say: Callable[[str], None] = lambda _: None, progress: Callable | None = None,
              executor=None) -> SweepOutcome:
    """Run every cell that can run here (or, as jobs, on the executor's nodes); a failed cell is
    recorded and the sweep goes on. The manifest is rewritten after each cell, so it always says how
    far the sweep got. ConfigError where the folder is another sweep's or SLURM cannot be reached."""
    from .executors import ExecutorSpec, place, reachable, why_not

    executor = executor or ExecutorSpec()
    jobs = executor.jobs
    reachable(executor)
    cells = expand(spec, device_type, out, why_not=why_not(executor, device_type) if jobs else None,
                   place=(lambda cfg: place(cfg, executor)) if jobs else None)
    Path(out).mkdir(parents=True, exist_ok=True)
    with claim(out, spec):
        if clean_stale(out):
            say(f"removed temp files a kill left in {out}")
        states, todo, waiting = _plan(cells, out, resume)
        meta = {"spec": spec.identity(), "executor": executor.kind}
        write_manifest(out, cells, states, meta)
        skipped = [c for c in cells if c.skip_reason]
        resumed = len(cells) - len(skipped) - len(todo) - len(waiting)
        say(f"sweep: {len(cells)} cells, {len(skipped)} skipped here, {resumed} already done"
            + (f", {len(waiting)} still running as jobs" if waiting else "") + f", {len(todo)} to run -> {out}")
        for c in skipped:
            say(f"  skip {c.key}: {c.skip_reason}")
        with (progress(len(todo) + len(waiting)) if progress else contextlib.nullcontext(_NoBar())) as bar:
            if jobs:
                failed, interrupted = _as_jobs(executor, out, cells, states, meta, todo, waiting, bar, say)
            else:
                failed, interrupted = _one_by_one(out, cells, states, meta, todo, bar)
    return SweepOutcome(cells, len(todo) + len(waiting) - failed, failed, len(skipped), resumed, interrupted)


def _plan(cells: list[Cell], out: str, resume: bool) -> tuple[dict, list[Cell], dict]:
    """(states, cells to run, {key: job handle} of jobs an earlier sweep submitted that still run)."""
    from .executors import alive

    previous = {r["key"]: r for r in (read_manifest(out) or {}).get("cells", [])} if resume else {}
    states: dict[str, dict] = {}
    todo, waiting = [], {}
    for c in cells:
        row = previous.get(c.key, {})
        if c.skip_reason:
            states[c.key] = {"state": "skipped", "reason": c.skip_reason}
        elif resume and done(out, c.key):
            states[c.key] = {"state": "done", "result": f"{c.key}.json", "resumed": True,
                             **({"job_id": row["job_id"]} if row.get("job_id") else {})}
        elif row.get("state") == "running" and row.get("job_id") and (
                job := alive(row.get("executor", "slurm"), Path(out) / "jobs", str(row["job_id"]))):
            states[c.key], waiting[c.key] = row, job
        else:
            todo.append(c)
    return states, todo, waiting


def _one_by_one(out: str, cells: list[Cell], states: dict, meta: dict, todo: list[Cell], bar):
    """The local executor: each cell's bench run in a fresh process, one after another; (failed,
    the Outcome of a cell a signal stopped, which stops the sweep)."""
    from .lifecycle import run

    failed = 0
    for c in todo:
        bar.start(c.key)
        outcome = run(c.cfg, own_process=True)  # nothing of the cell before carries over
        if outcome.status == "ok":
            states[c.key] = {"state": "done", "result": f"{c.key}.json"}
        else:  # recorded as such by the run (a refused cell only here); the sweep goes on, unless a signal stopped it
            failed += 1
            states[c.key] = {"state": outcome.status, "result": outcome.path and f"{c.key}.json",
                             "error": outcome.error}
            bar.note(f"{outcome.status} {c.key}: {outcome.error}")
        write_manifest(out, cells, states, meta)
        bar.advance()
        if outcome.status == "interrupted":
            return failed, outcome
    return failed, None


def _as_jobs(executor, out: str, cells: list[Cell], states: dict, meta: dict, todo: list[Cell], waiting: dict, bar,
             say):
    """submitit jobs (bench.executors.Jobs); a Ctrl-C stops the waiting, never the jobs."""
    from .executors import Jobs
    from .lifecycle import Outcome

    jobs = Jobs(executor, out, states, lambda: write_manifest(out, cells, states, meta), bar)
    jobs.waiting.update(waiting)
    try:
        return jobs.run(todo), None
    except KeyboardInterrupt:
        write_manifest(out, cells, states, meta)
        running = sorted(str(states[k]["job_id"]) for k in jobs.waiting)
        say(f"jobs {', '.join(running) or '(none)'} keep running; bench sweep ... --resume waits on them"
            + (" (scancel stops them)" if executor.kind == "slurm" else ""))
        return 0, Outcome("interrupted", 130, None, "stopped waiting on the jobs")


def status_rows(out_dir: str) -> tuple[list[list[str]], dict[str, int]] | None:
    """bench sweep --status: (a row per cell: key, state, job id, note; the count per state), from
    the manifest, with a running cell whose result has landed since counted done; None: no sweep."""
    manifest = read_manifest(out_dir)
    if manifest is None or "cells" not in manifest:
        return None
    rows, counts = [], {}
    for c in manifest["cells"]:
        state = c.get("state", "pending")
        if state in ("running", "pending") and done(out_dir, c["key"]):
            state = "done"
        counts[state] = counts.get(state, 0) + 1
        rows.append([c["key"], state, str(c.get("job_id", "")), c.get("reason") or c.get("error") or ""])
    return rows, counts


def cell_name(c: Cell) -> str:
    """A cell as the closing table names it: its label, and its repeat past the first (the file is
    <key>.json); spaces, so a narrow console wraps it instead of cutting it."""
    return cell_label(c.cfg, from_config=True) + (f" r{c.cfg.repeat}" if c.cfg.repeat else "")


def closing(out_dir: str, cells: list[Cell]):
    """The sweep's end, from one reading of its results: (the closing table's rows, the frame of the
    cells' results or None). A row is the cell, its state from the manifest, and for a cell with a
    result its throughput (samples/s), weak-scaling efficiency against its single cell, test macro-F1;
    the note is a skip reason or an error. The frame is what the sweep's verdict judges."""
    from .frame import frame
    from .results import load_result

    states = {c["key"]: c for c in json.loads((Path(out_dir) / MANIFEST).read_text())["cells"]}
    results = {}
    for c in cells:
        path = Path(out_dir) / f"{c.key}.json"
        if states.get(c.key, {}).get("result") and path.exists():
            try:
                results[c.key] = load_result(path)
            except (OSError, ValueError):  # not a result after all: the table leaves its figures blank
                pass
    df = frame(list(results.values())) if results else None
    indexed = df.set_index("run_id") if df is not None else None
    rows = []
    for c in cells:
        st = states.get(c.key, {"state": "pending"})
        note = st.get("reason") or st.get("error") or ""
        figures = ["", "", ""]
        if c.key in results and indexed is not None:
            row = indexed.loc[results[c.key]["run_id"]]
            figures = [_figure(row.get("samples_per_s"), ".1f"), _figure(row.get("efficiency"), ".2f"),
                       _figure(row.get("macro_f1"), ".3f")]
        rows.append([cell_name(c), st["state"], *figures, note])
    return rows, df


def _figure(value, spec: str) -> str:
    return "" if value is None or value != value else f"{value:{spec}}"  # NaN: not measured


class _NoBar:
    """The sweep's progress protocol (bench.ui.sweep_bar draws it): start(key), note(line), advance()."""

    def start(self, key: str) -> None: ...

    def note(self, message: str) -> None: ...

    def advance(self) -> None: ...
