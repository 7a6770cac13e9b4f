"""`bench tune`: the fastest configuration of a space that fits and still learns, measured on a
fraction of the space (bench/tune.py's search, bench/tuning.py's instruments)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import typer

from ..ui import console, error, info, table
from ..config import parse_duration  # noqa: F401 (bench.commands.tune.parse_duration, as before)
from .common import Exit, config_options, executor_or_fail, fail, job_options, nonempty_out, without_job_flags


@config_options(("model_size", "size", "dataset", "device"), preset_default="the space's")
@job_options
def tune(
    model: Optional[str] = typer.Option(None, "--model", help="The model to tune (default: the space's models)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", "--devices", help="Devices of the run (default: the space's)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Machines the run spans (the estimate and the prediction)."),
    budget: str = typer.Option("20m", help="Measuring time: 20m, 90s, 1h30m (anchors, windows; parity after it)."),
    objective: str = typer.Option("throughput", help="What wins: throughput (samples/s), energy (samples/J, NVIDIA "
                                                     "GPUs) or time-to-f1 (training seconds to single's val F1)."),
    f1_tolerance: float = typer.Option(0.02, help="time-to-f1: the target is single's best val macro-F1 less this."),
    space: str = typer.Option("tune", "--space", help="The candidates: a sweep TOML or preset (tune, tune-cpu, "
                                                      "cpu, ...), with a batch axis among its keys."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Measure nothing: rank by prediction at any scale, memory "
                                                          "by the estimate and the fake-process-group rehearsal."),
    device_memory: float = typer.Option(80.0, help="--dry-run: GiB per device a candidate may use (measuring, the "
                                                   "memory free here decides)."),
    peak_tflops: Optional[float] = typer.Option(None, help="--dry-run: the card's peak TFLOP/s (default: an H100 "
                                                           "SXM's data-sheet figure for the precision)."),
    per_node: int = typer.Option(8, help="Devices per node (the links a prediction crosses)."),
    noise: float = typer.Option(0.05, help="The smallest relative change a window pair counts (at least the "
                                           "measured spread)."),
    top: int = typer.Option(10, help="Candidates listed by --dry-run."),
    out: str = typer.Option("results/tune", help="Folder for tune.json, tune.md, tune.png and the state.",
                            callback=nonempty_out),
    resume: bool = typer.Option(False, "--resume", help="Carry on an interrupted tune in --out."),
    job_flags: dict | None = None,
    **settings,
):
    """Find the fastest configuration that fits and still learns, measuring a fraction of the space."""
    from ..tune import Failed

    if job_flags.get("array_parallelism") is not None:
        fail("--array-parallelism: a tune is one job; it is bench sweep's")
    jobs = executor_or_fail({}, job_flags)
    if jobs.jobs and not dry_run:
        return _as_job(jobs, objective, budget, space, model, gpus, settings, out, resume)
    try:
        budget_s, cands, live, device_type = _space(objective, budget, space, model, gpus, nnodes, per_node, dry_run,
                                                    device_memory, settings)
        if not 0 <= f1_tolerance < 1:
            raise ValueError(f"--f1-tolerance {f1_tolerance:g}: give a macro-F1 difference in [0, 1), e.g. 0.02")
        if resume:
            _same_objective(Path(out), objective, f1_tolerance)
    except ValueError as exc:  # ConfigError included
        fail(str(exc))
    info(f"tune: {len(cands)} candidates, {len(cands) - len(live)} pruned before anything runs")
    if dry_run:
        _dry_run(live, cands, peak_tflops, per_node, top, out, objective)
        return
    from ..stops import Interrupted, signals_raise

    try:
        with signals_raise():  # SIGINT and SIGTERM: the state on disk holds every window measured
            result, anchors = _measure(live, device_type, budget_s, noise, per_node, out, resume, objective,
                                       f1_tolerance)
    except Interrupted as exc:
        error(f"tune interrupted ({exc.name}): what it measured is in {out}; the same command with --resume "
              "carries on")
        raise Exit(exc.exit_code) from None
    except (ValueError, Failed) as exc:  # ConfigError, a job that cannot start (ABError), the incumbent failing
        fail(str(exc), 1)
    _report(result, cands, anchors, out, objective)


def _budget(objective: str, budget: str) -> float:
    """The budget in seconds; ValueError with the line for an unknown objective or a bad budget."""
    from ..tuning import OBJECTIVES

    if objective not in OBJECTIVES:
        raise ValueError(f"--objective {objective}: not one of {', '.join(OBJECTIVES)}")
    return parse_duration(budget)


def _as_job(jobs, objective, budget, space, model, gpus, settings, out, resume) -> None:
    """The measuring tune as one job on one node of the executor (this same command there, without
    the executor's options); its output passed on, its exit code ours."""
    import sys

    from .. import tuning
    from ..executors import command_job

    try:
        _budget(objective, budget)  # what can be checked here is, before anything is submitted
        spec = tuning.load_space(space, model, gpus, 1, settings)
        code = command_job(without_job_flags(sys.argv[1:]), jobs, Path(out), max(spec.gpus), resume, info)
    except ValueError as exc:
        fail(str(exc))
    if code:
        raise Exit(code)


def _space(objective, budget, space, model, gpus, nnodes, per_node, dry_run, device_memory, settings):
    """(budget in seconds, every candidate, the unpruned ones, device type); ValueError with the line."""
    from .. import tuning
    from ..config import RunConfig
    from ..distenv import resolve_device_type
    from ..tune import prune

    budget_s = _budget(objective, budget)
    if nnodes > 1 and not dry_run:
        raise ValueError(f"--nnodes {nnodes}: a measured tune runs on this machine; use --dry-run for more nodes")
    spec = tuning.load_space(space, model, gpus, 1, settings)
    if dry_run:  # at any scale: as many nodes as the devices fill (--per-node each), rehearsed, never joined
        nodes = max(nnodes, -(-max(spec.gpus) // per_node))
        spec.run.update(nodes=nodes, **({"rdzv_endpoint": "HEAD_NODE:29400"} if nodes > 1 else {}))
    device_type = "cuda" if dry_run else resolve_device_type(RunConfig(**spec.run))
    tuning.check_objective(objective, device_type)
    if len(spec.models) != 1:
        raise ValueError(f"--space {space} has models {spec.models}: tune one at a time (--model)")
    capacity = int(device_memory * 2**30) if dry_run else None
    cands = tuning.candidates(spec, device_type)
    live = prune(cands, tuning.why_not(device_type, capacity))
    tuning.with_memory(live, device_type)
    return budget_s, cands, live, device_type


def _dry_run(live, cands, peak_tflops, per_node, top, out, objective) -> None:
    from .. import tuning
    from ..tune_report import candidate_rows, dry_run_rows, write

    if objective != "throughput":
        info(f"--objective {objective} --dry-run: nothing is measured (no power, no F1), so candidates are ranked by "
             "predicted throughput")
    anchors = tuning.assumed_anchors(live, peak_tflops, per_node)
    for c in live:
        c.predicted = anchors.predict(c.cfg)
    ranked = sorted(live, key=lambda c: -(c.predicted or 0))[:top]
    header, rows = dry_run_rows(ranked)
    console.print(table(f"tune --dry-run: the top {len(ranked)} of {len(live)} by prediction", header, rows, plain=True,
                        caption=f"predicted: samples/s, {anchors.source}; GiB: the memory estimate per device"))
    if ranked:
        best = ranked[0].cfg
        info(f"best predicted: {tuning.run_command(best)}"
             + (f" (on each of the {best.nodes} nodes, with its --node-rank)" if best.nodes > 1 else ""))
    write(Path(out), None, cands, [], "dry run: nothing measured", anchors, candidate_rows(cands))
    info(f"tune: {Path(out) / 'tune.md'}, {Path(out) / 'tune.json'}")


def _measure(live, device_type, budget_s, noise, per_node, out, resume, objective, f1_tolerance):
    from .. import tuning
    from ..tune import search

    t0 = time.monotonic()  # the anchors' time is the budget's too
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    state = folder / "tune-state.json"
    if not resume:
        _fresh(folder, state)
    world = max(c.cfg.devices for c in live)
    link = tuning.link_for(folder, world, device_type, info,
                           tensor_parallel=any(c.cfg.strategy == "tp" or c.cfg.tp > 1 for c in live))
    windows = tuning.Windows(live[0].cfg, world, device_type, folder / "windows", objective=objective)
    check = tuning.parity_check
    if objective == "time-to-f1":
        check = tuning.F1Target(windows, tuning.f1_reference(live), f1_tolerance, folder / "f1-target.json", info)
    try:
        anchors = tuning.anchors_cached(folder / "anchors.json", resume,
                                        lambda: tuning.measure_anchors(live, windows, link, per_node, info), objective)
        if not state.exists():
            tuning.seed_state(state, anchors, {c.key for c in live}, objective)
        result = search(live, lambda cfg: anchors.figure(cfg, objective), windows, check, noise=noise,
                        budget_s=max(budget_s - (time.monotonic() - t0), 0.0), state_path=str(state), resume=True,
                        say=info, unit=tuning.OBJECTIVES[objective],
                        best_of=tuning.F1_CHECKS if objective == "time-to-f1" else 1)
    finally:
        windows.close()
    return result, anchors


def _same_objective(folder: Path, objective: str, f1_tolerance: float) -> None:
    """ValueError with the line where --resume would carry on a tune of another objective (its windows
    and anchors are that objective's figures) or, for time-to-f1, against another tolerance's target."""
    import json

    for name in ("tune-state.json", "anchors.json"):
        path = folder / name
        was = json.loads(path.read_text()).get("objective", "throughput") if path.exists() else objective
        if was != objective:
            raise ValueError(f"--resume: the tune in {folder} measured --objective {was}; resume it with that "
                             "objective, or start a new one in another --out")
    target = folder / "f1-target.json"
    if objective == "time-to-f1" and target.exists():
        kept = json.loads(target.read_text())["tolerance"]
        if kept != f1_tolerance:
            raise ValueError(f"--resume: the tune in {folder} set its F1 target with --f1-tolerance {kept:g}; resume "
                             "it with that, or start a new one in another --out")


def _fresh(folder: Path, state: Path) -> None:
    """A new tune forgets what an earlier one in this folder measured, and what it wrote (a report
    must not read an old tune.json as this one's)."""
    for old in (state, folder / "anchors.json", folder / "f1-target.json", folder / "tune.json", folder / "tune.md",
                folder / "tune.png"):
        old.unlink(missing_ok=True)
    for sub in ("comm", "windows"):
        shutil.rmtree(folder / sub, ignore_errors=True)


def _report(result, cands, anchors, out, objective) -> None:
    from .. import tuning
    from ..cells import cell_label
    from ..tune_report import candidate_rows, check_name, console_rows, number, trial_rows, write

    unit = tuning.OBJECTIVES[objective]
    header, rows = candidate_rows(cands, unit, check_name(objective))
    short, shown = console_rows(cands, check_name(objective))
    console.print(table(f"tune: {len(shown)} of {len(cands)} candidates measured", short, shown, plain=True,
                        caption=f"predicted and measured (median of the windows): {unit}; GiB: the memory "
                                "estimate per device"))
    labels = {c.key: cell_label(c.cfg, from_config=True).split(" ", 1)[1] for c in cands}
    console.print(table("trials, in order", *trial_rows(result.trials, labels, unit), plain=True))
    write(Path(out), result.winner, cands, result.trials, result.stopped, anchors, (header, rows), objective)
    info(f"stopped: {result.stopped}")
    if result.winner is None:
        error(f"no measured candidate passed {check_name(objective)}: nothing wins (see the state column)")
        raise Exit(1)
    w = result.winner
    info(f"winner: {w.key}, {number(w.measured)} {unit} (median of {len(w.windows)} windows)"
         + (f", the F1 target in {w.time_to_f1_s:.1f} s of training" if w.time_to_f1_s is not None else ""))
    info(f"run it: {tuning.run_command(result.winner.cfg)}")
    info(f"tune: {Path(out) / 'tune.md'}, {Path(out) / 'tune.json'}, {Path(out) / 'tune.png'}")
