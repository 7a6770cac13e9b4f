"""`bench sweep`: a matrix of cells, one after another, with --resume."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import RunConfig
from ..ui import console, error, info, sweep_bar, table
from .common import Exit, config_options, executor_or_fail, fail, job_options, nonempty_out, split_csv


@config_options(("epochs", "size", "batch_size", "model_size", "dataset", "device"), preset_default="the preset's")
@job_options
def sweep(
    strategies: Optional[str] = typer.Option(None, help="Comma-separated strategies, e.g. single,ddp,fsdp,pipeline; "
                                                        "fsdp:tp2 (2-D), hsdp:rep2, pipeline:gpipe name a mesh or "
                                                        "schedule."),
    gpus: Optional[str] = typer.Option(None, "--gpus", "--devices", help="Comma-separated device counts, e.g. 1,2,4."),
    precision: Optional[str] = typer.Option(None, help="Comma-separated precisions, e.g. fp32,bf16."),
    models: Optional[str] = typer.Option(None, help="Comma-separated models (default: cnn)."),
    compile: Optional[str] = typer.Option(None, "--compile", help="Comma-separated off,on (default: off)."),
    ac: Optional[str] = typer.Option(None, "--ac", help="Comma-separated --ac settings, e.g. none,full (default: none)."),
    grad_accum: Optional[str] = typer.Option(None, "--grad-accum", help="Comma-separated --grad-accum K, e.g. 1,2 "
                                                                          "(default: 1)."),
    batch: Optional[str] = typer.Option(None, "--batch", help="Comma-separated batch sizes, e.g. 16,32,64 (an axis; "
                                                              "default: --batch-size alone)."),
    repeat: Optional[int] = typer.Option(None, help="Repeats per cell; seeds differ per repeat (seed + repeat index)."),
    config: Optional[str] = typer.Option(None, "--config", help="A sweep TOML file or a preset: smoke, cpu, gpu-node, gate, tune, tune-cpu."),
    out: str = typer.Option("results/sweep", help="Folder for the cells' result files and sweep.json.", callback=nonempty_out),
    resume: bool = typer.Option(False, "--resume", help="Skip cells whose result in --out is ok (or diverged); rerun "
                                                        "failed and interrupted ones."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells and why some are skipped (slurm: and each "
                                                          "job's sbatch script); run nothing."),
    status: Optional[str] = typer.Option(None, "--status", help="Show the sweep in this folder by state (cells, job "
                                                                "ids, errors); run nothing."),
    job_flags: dict | None = None,
    **settings,
):
    """Run a matrix of cells one after another; cells that cannot run here are skipped with a reason."""
    from ..sweep import run_sweep

    if status is not None:
        return _status(status)
    spec, device_type = _spec(config, settings, strategies=(strategies, str), gpus=(gpus, int),
                              precision=(precision, str), models=(models, str), compile=(compile, "on_off"),
                              ac=(ac, str), grad_accum=(grad_accum, int), batch=(batch, int), repeat=(repeat, None))
    jobs = executor_or_fail(spec.executor, job_flags)
    if dry_run:
        return _dry_run(spec, device_type, out, jobs)
    try:
        done = run_sweep(spec, out, device_type=device_type, resume=resume, say=info, progress=sweep_bar,
                         executor=jobs)
    except OSError as exc:
        fail(f"--out {out}: cannot write there ({exc.strerror or exc}): choose a writable folder")
    except ValueError as exc:  # ConfigError: the folder is another sweep's, or the scheduler refused
        fail(str(exc))
    if done.interrupted is not None:
        error(f"sweep interrupted ({done.interrupted.error}); bench sweep ... --resume carries on")
        raise Exit(done.interrupted.code)
    from ..frame import aggregate
    from ..sweep import closing, skipped_cells
    from .report import show_verdicts

    rows, df = closing(out, done.cells)  # the results read once, for the table and the verdict
    console.print(table(f"sweep: {len(done.cells)} cells (results: {out}/<cell key>.json)", SUMMARY_HEADER, rows,
                        plain=True))
    show_verdicts(aggregate(df) if df is not None and not df.empty else None, skipped_cells(out))
    info(f"sweep done: {done.ran} ran, {done.failed} failed or stopped, {done.skipped} skipped; results in {out}")
    info(f"next: bench report {out} --out reports/")


def _dry_run(spec, device_type: str, out: str, jobs) -> None:
    """The cells and why some are skipped; under slurm, each distinct job's sbatch script."""
    from ..executors import job_parameters, place, sbatch_script, why_not
    from ..sweep import expand
    from ..tuning import run_command

    cells = expand(spec, device_type, out, why_not=why_not(jobs, device_type) if jobs.jobs else None,
                   place=(lambda cfg: place(cfg, jobs)) if jobs.jobs else None)
    shown = set()
    for c in cells:
        info(f"{'skip' if c.skip_reason else 'run '} {c.key}" + (f": {c.skip_reason}" if c.skip_reason else ""))
        params = str(sorted(job_parameters(c.cfg, jobs).items()))
        if jobs.kind == "slurm" and not c.skip_reason and params not in shown:
            shown.add(params)
            console.print(sbatch_script(c.cfg, jobs, Path(out) / "jobs"), markup=False, highlight=False,
                          soft_wrap=True)
            if c.cfg.nodes > 1:
                info(f"  each of its {c.cfg.nodes} nodes runs, with --node-rank $SLURM_NODEID and FIRST_NODE the "
                     f"job's first host: {run_command(c.cfg)}")


def _status(folder: str) -> None:
    from ..sweep import status_rows

    found = status_rows(folder)
    if found is None:
        fail(f"--status {folder}: no sweep there (no readable sweep.json); give the --out of a sweep")
    rows, counts = found
    console.print(table(f"sweep {folder}: {len(rows)} cells", ["cell", "state", "job", "note"], rows, plain=True))
    info(", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1])))


def _spec(config: str | None, settings: dict, **axes):
    """The sweep from --config (or single alone) with the axes given on the command line put in
    (name=(comma-separated value, its type; None: a plain value)); exit 2 with one line if bad."""
    from ..distenv import resolve_device_type
    from ..sweep import SweepSpec, load_spec, on_off

    try:
        spec = load_spec(config) if config else SweepSpec(strategies=["single"], gpus=[1])
        for name, (value, cast) in axes.items():
            parsed = value if cast is None else split_csv(value, on_off if cast == "on_off" else cast)
            if parsed is not None:
                setattr(spec, name, parsed)
        spec.run.update({k: v for k, v in settings.items() if v is not None})
        spec.check()
        return spec, resolve_device_type(RunConfig(**spec.run))
    except ValueError as exc:  # ConfigError included
        fail(str(exc))


# fits 80 columns: the cell's label and the note wrap, the figures do not
SUMMARY_HEADER = ["cell", "state", ("samples/s", {"justify": "right", "no_wrap": True}),
                  ("efficiency", {"justify": "right", "no_wrap": True}), ("macro-F1", {"justify": "right", "no_wrap": True}),
                  "note"]
