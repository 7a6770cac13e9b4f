"""The `bench` command line (typer)."""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from .config import ConfigError, RunConfig
from rich.markup import escape

from .ui import console, error, info, progress_factory, run_table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="emotion-bench: PyTorch parallel-training strategies measured on speech emotion recognition.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: scan a folder of WAV files, write the synthetic set.")
app.add_typer(data_app, name="data")


class Exit(Exception):
    """Leave with this exit code; the message (already shown to the user) travels for callers."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = 2):
    error(message)
    raise Exit(code, message)


# ------------------------------------------------------------------------------------------ run

@app.command()
def run(
    strategy: str = typer.Option("single", help="Parallelism strategy (bench list): single, dp, ddp, fsdp, pipeline, model-parallel."),
    gpus: int = typer.Option(1, "--gpus", "--devices", help="Devices in the whole run; without CUDA, CPU worker processes (gloo)."),
    model: str = typer.Option("cnn", help="Model zoo name: cnn, crnn, lstm, transformer."),
    model_size: str = typer.Option("base", help="Model size: small, base, large."),
    precision: str = typer.Option("fp32", help="fp32, bf16 (autocast) or fp16 (autocast + GradScaler, CUDA only)."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile each block before wrapping."),
    compile_backend: str = typer.Option("inductor", help="torch.compile backend (aot_eager compiles in seconds, for tests)."),
    epochs: int = typer.Option(8, help="Passes over the training split."),
    batch_size: int = typer.Option(32, help="Samples per step: per device (weak scaling) or global (strong scaling)."),
    scaling: str = typer.Option("weak", help="weak: --batch-size per device; strong: --batch-size is the global batch."),
    dataset: str = typer.Option("synthetic", help="'synthetic' (embedded default) or a folder of WAV files."),
    size: str = typer.Option("small", help="Synthetic size: tiny (128 clips), small (1,281), medium (3,201), full (12,798), or a clip count."),
    seed: int = typer.Option(0, help="Seed of model init, batch order and crops."),
    data_seed: int = typer.Option(0, help="Seed of the synthetic data and the speaker split (same for every run by default)."),
    device: str = typer.Option("auto", help="auto (CUDA if available), cpu or cuda."),
    warmup_steps: int = typer.Option(5, help="Steps run before the timed window (not measured)."),
    target_f1: Optional[float] = typer.Option(None, help="Val macro-F1 to reach; its training time (s) is recorded."),
    lr: float = typer.Option(2e-3, help="AdamW learning rate."),
    dropout: float = typer.Option(0.1, help="Model dropout probability."),
    schedule: str = typer.Option("1f1b", help="Pipeline schedule: gpipe or 1f1b."),
    microbatches: Optional[int] = typer.Option(None, help="Pipeline micro-batches per step [default: 2 x stages]."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="ddp: synchronise BatchNorm statistics across ranks."),
    nnodes: int = typer.Option(1, help="Machines taking part (torchrun --nnodes); run the same command on each."),
    node_rank: int = typer.Option(0, help="This machine's index, 0 .. nnodes-1."),
    rdzv_endpoint: Optional[str] = typer.Option(None, help="HOST:PORT of the rendezvous (multi-node), the same on every node."),
    threads: Optional[int] = typer.Option(None, help="torch threads per process [default: cores / processes on this machine]."),
    timeout_s: float = typer.Option(300.0, help="Seconds a collective may wait for a hung or dead peer before the run fails."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimiser steps [default: all epochs]."),
    peak_tflops: Optional[float] = typer.Option(None, help="Per-device peak TFLOP/s used for MFU [default: data-sheet table]."),
    out: str = typer.Option("results/runs", help="Folder for the result file <run_id>.json."),
):
    """Train one cell of the matrix, measure it, and write one result file (its path is the last line)."""
    cfg = RunConfig(strategy=strategy, devices=gpus, nodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                    model=model, model_size=model_size, dropout=dropout, precision=precision, compile=compile,
                    compile_backend=compile_backend, batch_size=batch_size, scaling=scaling, epochs=epochs,
                    max_steps=max_steps, lr=lr, seed=seed, data_seed=data_seed, dataset=dataset, size=size,
                    device=device, warmup_steps=warmup_steps, target_f1=target_f1, schedule=schedule,
                    microbatches=microbatches, sync_bn=sync_bn, threads=threads, timeout_s=timeout_s,
                    peak_tflops=peak_tflops, out_dir=out)
    from .distenv import under_torchrun
    from .runner import worker_main

    if under_torchrun():
        code = worker_main(cfg)  # result written, peers met at a barrier, process group destroyed
        # Leave without interpreter finalisation: gloo's C++ threads can still hold work objects
        # with tensors (FSDP2 keeps some), and freeing those while Python shuts down takes the GIL
        # and aborts the process (SIGABRT, "terminate called without an active exception") now
        # and then, which failed whole runs after their result was already written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    path = execute_run(cfg)
    if path is not None:
        print(path)


def _record_failure(cfg: RunConfig, device_type: str, message: str, code: int, t0: float, quiet: bool):
    """Write the cell's failed result (unless one exists), show one line, and leave with code."""
    from .runner import write_failed

    path = Path(cfg.out_dir) / f"{cfg.run_id}.json"
    if not path.exists():
        path = write_failed(cfg, device_type=device_type, world_size=cfg.devices, backend=None, error=message, t0=t0)
    if not quiet:
        error(message)
        print(path)
    raise Exit(code, message)


def execute_run(cfg: RunConfig, *, quiet: bool = False) -> Path | None:
    """Validate, prepare data, run in process or through torchrun, show the table; the result path."""
    from .distenv import resolve_device_type
    from .results import load_result
    from .runner import RunFailed, launch, load_data, new_run_id, run_in_process
    from .strategies import check_strategy

    t0 = time.perf_counter()
    device_type = "cuda" if cfg.device == "cuda" else "cpu"
    try:
        cfg.validate()
        device_type = resolve_device_type(cfg)
        spec = check_strategy(cfg, device_type)
        from emotion_models.models import build_model

        build_model(cfg.model, size=cfg.model_size)  # unknown names fail here, before data work
    except (ConfigError, ValueError) as exc:
        # a combination that cannot run is still a recorded cell: failed, with the reason
        _record_failure(cfg.replace(run_id=cfg.run_id or new_run_id(cfg, device_type)), device_type, str(exc), 2, t0, quiet)
    if cfg.run_id is None:
        cfg = cfg.replace(run_id=new_run_id(cfg, device_type))
    if device_type == "cpu" and spec.multiprocess and not quiet:
        info(f"no CUDA here: --gpus {cfg.devices} runs {cfg.devices} CPU worker processes with gloo "
             f"(device_type cpu, {cfg.devices // cfg.nodes} on this node)")
    try:
        with progress_factory(transient=quiet) as progress:
            data = load_data(cfg, progress=lambda n, d: progress(n, d))
            if not quiet:
                s = data.summary()
                info(f"data: {s['source']}: {s['clips']} clips, {s['speakers']} speakers, "
                     f"train/val/test {s['per_split']['train']}/{s['per_split']['val']}/{s['per_split']['test']} clips"
                     + (f", {s['skipped']} skipped" if s["skipped"] else ""))
            if spec.multiprocess:
                path = launch(cfg, device_type, data, t0, status=(lambda m: None) if quiet else info)
            else:
                path = run_in_process(cfg, device_type, data, progress, t0)
    except RunFailed as exc:
        if not quiet:
            error(f"run failed: {exc}")
            if exc.path:
                print(exc.path)
        raise Exit(1, str(exc)) from None
    except Exception as exc:
        # data that cannot be read (no audio, bad manifest) or a fault of the launcher itself: the
        # cell is still recorded as failed, so no sweep or user loses track of it
        bad_input = isinstance(exc, (ConfigError, ValueError, OSError))
        message = str(exc) if bad_input else f"{type(exc).__name__}: {exc}"
        _record_failure(cfg, device_type, message, 2 if bad_input else 1, t0, quiet)
    if path is None:
        info("done: this node's ranks finished; rank 0 on another node wrote the result file")
        return None
    if not quiet:
        console.print(run_table(load_result(path)))
    return path


# ------------------------------------------------------------------------------------------ parity

@app.command()
def parity(
    gpus: int = typer.Option(2, "--gpus", "--devices", help="Devices (CPU worker processes without CUDA) per strategy."),
    strategies: str = typer.Option("ddp,fsdp,pipeline:gpipe,pipeline:1f1b",
                                   help="Comma-separated cells; pipeline:SCHEDULE picks the schedule."),
    model: str = typer.Option("cnn", help="Model zoo name."),
    model_size: str = typer.Option("small", help="Model size: small, base, large."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (fp16 needs CUDA)."),
    steps: int = typer.Option(6, help="Optimiser steps compared."),
    batch_size: int = typer.Option(16, help="Global batch (the same for every cell), samples."),
    size: str = typer.Option("tiny", help="Synthetic dataset size."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="ddp with SyncBatchNorm (CUDA only)."),
    compile_backend: Optional[str] = typer.Option(None, help="Compile every cell with this torch.compile backend."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
):
    """Train a few steps of each strategy and compare losses and parameters with `single`."""
    from rich.table import Table

    from .parity import BASES, run_parity

    def run_cell(cfg):
        path = execute_run(cfg, quiet=True)
        if path is None:
            raise RuntimeError("no result on this node")
        return path

    cells = [c.strip() for c in strategies.split(",") if c.strip()]
    rows = run_parity(strategies=cells, devices=gpus, model=model, model_size=model_size, precision=precision,
                      steps=steps, batch_size=batch_size, size=size, sync_bn=sync_bn,
                      compile_backend=compile_backend, device=device, run=run_cell)
    t = Table(title=f"parity against single: {model}-{model_size}, {precision}, {steps} steps, global batch {batch_size}")
    t.add_column("cell", no_wrap=True)
    for col in ("loss deviation (max)", "parameter deviation", "tolerance loss / params", "basis", "verdict"):
        t.add_column(col)
    for r in rows:
        verdict = "[green]ok[/]" if r.ok else "[red]FAIL[/]"
        t.add_row(r.cell, f"{r.loss_dev:.1e}", f"{r.param_dev:.1e}", f"{r.loss_tol:g} / {r.param_tol:g}", r.basis, verdict)
    console.print(t)
    info("deviations are relative to single: per loss step |l - l_single| / |l_single|; parameters ||p - p_single|| / ||p_single||")
    for basis in sorted({b for r in rows for b in r.basis.split("+")}):
        info(f"  {basis}: {BASES[basis][2]}")
    for r in rows:
        if r.error:
            error(f"{r.cell}: {r.error}")
    if not all(r.ok for r in rows):
        raise Exit(1)


# ------------------------------------------------------------------------------------------ sweep

def _csv(value: str | None, cast=str) -> list | None:
    return [cast(v.strip()) for v in value.split(",") if v.strip()] if value else None


@app.command()
def sweep(
    strategies: Optional[str] = typer.Option(None, help="Comma-separated strategies, e.g. single,ddp,fsdp,pipeline."),
    gpus: Optional[str] = typer.Option(None, "--gpus", "--devices", help="Comma-separated device counts, e.g. 1,2,4."),
    precision: Optional[str] = typer.Option(None, help="Comma-separated precisions, e.g. fp32,bf16."),
    models: Optional[str] = typer.Option(None, help="Comma-separated models [default: cnn]."),
    compile: Optional[str] = typer.Option(None, "--compile", help="Comma-separated off,on [default: off]."),
    repeat: Optional[int] = typer.Option(None, help="Repeats per cell; seeds differ per repeat (seed + repeat index)."),
    config: Optional[str] = typer.Option(None, "--config", help="A sweep TOML file or a preset: smoke, cpu, gpu-node."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per cell [default: the preset's, else 8]."),
    size: Optional[str] = typer.Option(None, help="Synthetic size per cell [default: the preset's, else small]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size per cell, samples (per device under weak scaling)."),
    dataset: Optional[str] = typer.Option(None, help="'synthetic' or a folder of WAV files."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda for every cell [default: auto]."),
    out: str = typer.Option("results/sweep", help="Folder for the cells' result files and sweep.json."),
    resume: bool = typer.Option(False, "--resume", help="Skip cells whose result file already exists in --out."),
):
    """Run a matrix of cells one after another; cells that cannot run here are skipped with a reason."""
    from .distenv import resolve_device_type
    from .sweep import SweepSpec, _bool, done, expand, load_spec, write_manifest

    try:
        spec = load_spec(config) if config else SweepSpec(strategies=["single"], gpus=[1])
        for name, value in (("strategies", _csv(strategies)), ("gpus", _csv(gpus, int)),
                            ("precision", _csv(precision)), ("models", _csv(models)),
                            ("compile", _csv(compile, _bool)), ("repeat", repeat)):
            if value is not None:
                setattr(spec, name, value)
        for name, value in (("epochs", epochs), ("size", size), ("batch_size", batch_size), ("dataset", dataset),
                            ("device", device)):
            if value is not None:
                spec.run[name] = value
        device_type = resolve_device_type(RunConfig(**spec.run))
        cells = expand(spec, device_type, out)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    Path(out).mkdir(parents=True, exist_ok=True)
    states: dict[str, dict] = {}
    todo = []
    for c in cells:
        if c.skip_reason:
            states[c.key] = {"state": "skipped", "reason": c.skip_reason}
        elif resume and done(out, c.key):
            states[c.key] = {"state": "done", "result": f"{c.key}.json", "resumed": True}
        else:
            todo.append(c)
    write_manifest(out, cells, states)
    skipped = [c for c in cells if c.skip_reason]
    info(f"sweep: {len(cells)} cells, {len(skipped)} skipped here, "
         f"{len(cells) - len(skipped) - len(todo)} already done, {len(todo)} to run -> {out}")
    for c in skipped:
        info(f"  skip {c.key}: {c.skip_reason}")
    failed = 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not sys.stdout.isatty()) as prog:
        task = prog.add_task("sweep", total=len(todo))
        for c in todo:
            prog.update(task, description=f"sweep: {c.key}")
            try:
                execute_run(c.cfg, quiet=True)
                states[c.key] = {"state": "done", "result": f"{c.key}.json"}
            except Exit as exc:  # recorded as a failed result by execute_run; the sweep goes on
                failed += 1
                states[c.key] = {"state": "failed", "result": f"{c.key}.json", "error": str(exc)}
                prog.console.print(f"[red]failed[/] {c.key}: {escape(str(exc))}")
            write_manifest(out, cells, states)
            prog.advance(task)
    info(f"sweep done: {len(todo) - failed} ran, {failed} failed, {len(skipped)} skipped; results in {out}")
    info(f"next: bench report {out} --out reports/")


# ------------------------------------------------------------------------------------------ report

def _load(paths: list[str]):
    from .results import load_results

    results, bad = [], []
    for p in paths:
        try:
            r, b = load_results([p])
        except FileNotFoundError as exc:
            _fail(f"{exc}: pass result folders or files")
        for x in r:
            x["_source"] = p
        results += r
        bad += b
    return results, bad


@app.command()
def report(
    dirs: list[str] = typer.Argument(..., help="Result folders (or files); folders from two machines are compared side by side."),
    out: str = typer.Option("reports", "--out", help="Folder for report.md, report.html, results.csv and the PNG plots."),
):
    """Tables (DeepLearningExamples style), scaling plots and a hardware comparison from result files."""
    from rich.table import Table

    from .report import main_tables, write_report

    results, bad = _load(dirs)
    if not results:
        _fail(f"no result files under {', '.join(dirs)}" + (f" ({len(bad)} unreadable JSON files)" if bad else ""))
    skipped = []
    for d in dirs:
        manifest = Path(d) / "sweep.json"
        if manifest.exists():
            skipped += [(c["key"], c.get("reason", "")) for c in json.loads(manifest.read_text())["cells"]
                        if c.get("state") == "skipped"]
    rep = write_report(results, bad, out, skipped)
    for title, header, rows, note in main_tables(rep["cells"]):
        t = Table(title=title, caption=note)
        for h in header:
            t.add_column(h, justify="right")
        for r in rows:
            t.add_row(*r)
        console.print(t)
    for p, why in bad:
        error(f"not a result file: {p}: {why}")
    info(f"report: {Path(out) / 'report.md'}, {Path(out) / 'report.html'}, {Path(out) / 'results.csv'}, "
         f"{len(rep['plots'])} plots")


# ------------------------------------------------------------------------------------------ compare

@app.command("compare")
def compare_cmd(
    baseline: str = typer.Argument(..., help="Baseline result folder or file."),
    current: str = typer.Argument(..., help="Current result folder or file."),
    max_regression: str = typer.Option("5%", help="Smallest relative change that counts (throughput, step time, efficiency, memory)."),
    max_f1_drop: float = typer.Option(0.02, help="Smallest macro-F1 change that counts, absolute (0.02 = two points of F1)."),
    noise_k: float = typer.Option(2.0, help="A change must also exceed k x the spread of the baseline's repeats."),
    gate: str = typer.Option("throughput,step_time,efficiency,memory,macro_f1",
                             help="Metrics whose regression fails the comparison (the others are reported only)."),
    fmt: str = typer.Option("text", "--format", help="text (terminal table) or md (markdown, for a PR comment)."),
):
    """Match cells by config and flag regressions, improvements, or changes within noise; exit 1 on a regression."""
    from rich.table import Table

    from .compare import METRICS, compare, parse_fraction, table_rows
    from .report import md_table

    try:
        threshold = parse_fraction(max_regression)
    except ValueError as exc:
        _fail(f"--max-regression: {exc}")
    gates = [g.strip() for g in gate.split(",") if g.strip()]
    unknown = set(gates) - set(METRICS)
    if unknown:
        _fail(f"--gate: unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    if fmt not in ("text", "md"):
        _fail("--format: use text or md")
    base, bad_b = _load([baseline])
    cur, bad_c = _load([current])
    if not base:
        _fail(f"no result files in baseline {baseline}")
    if not cur:
        _fail(f"no result files in current {current}")
    verdicts = compare(base, cur, max_regression=threshold, max_f1_drop=max_f1_drop, noise_k=noise_k, gate=gates)
    header, rows = table_rows(verdicts)
    regressions = [v for v in verdicts if v.verdict in ("regression", "failed")]
    summary = (f"{len(verdicts)} cells: {len(regressions)} regressed, "
               f"{sum(v.verdict == 'improvement' for v in verdicts)} improved, "
               f"{sum(v.verdict == 'within noise' for v in verdicts)} within noise; gated on {', '.join(gates)}; "
               f"a change counts above max({threshold * 100:g}% (F1: {max_f1_drop} absolute), {noise_k:g} x baseline spread)")
    if fmt == "md":
        print(md_table(header, rows))
        print()
        print(summary)
    else:
        t = Table(title=escape(f"compare {baseline} -> {current}"))
        for h in header:
            t.add_column(h)
        for r in rows:
            style = "red" if r[-2] in ("regression", "failed") else ("green" if r[-2] == "improvement" else None)
            t.add_row(*[escape(x) for x in r], style=style)
        console.print(t)
        info(summary)
    for p, why in bad_b + bad_c:
        error(f"not a result file: {p}: {why}")
    if regressions:
        raise Exit(1)


# ------------------------------------------------------------------------------------------ env, list

@app.command("env")
def env_cmd(json_out: bool = typer.Option(False, "--json", help="Print the fingerprint as JSON.")):
    """Print the hardware and software fingerprint recorded with every result."""
    from .envinfo import fingerprint

    fp = fingerprint()
    if json_out:
        print(json.dumps(fp, indent=1))
        return
    for key, value in fp.items():
        if key == "gpus":
            for g in value:
                info(f"gpu {g['index']}: {g['name']}, {g['memory_bytes'] / 2**30:.1f} GiB, capability {g['capability']}, driver {g['driver']}")
            continue
        if key == "ram_bytes":
            value = f"{value / 2**30:.1f} GiB"
        info(f"{key}: {value}")


@app.command("list")
def list_cmd():
    """Show the models, strategies and dataset sources."""
    from rich.table import Table

    from emotion_models.models import MODELS, build_model
    from emotion_models.synthetic import SIZES, class_counts

    from .strategies import all_strategies

    t = Table(title="models")
    for col in ("name", "features", "params (base)", "blocks", "description"):
        t.add_column(col)
    for name, (_, kind, desc) in MODELS.items():
        m = build_model(name)
        t.add_row(name, kind, f"{sum(p.numel() for p in m.parameters()):,}", str(len(m.blocks)), desc)
    console.print(t)
    t = Table(title="strategies")
    for col in ("name", "processes", "needs CUDA", "what it does"):
        t.add_column(col)
    for spec in all_strategies().values():
        t.add_row(spec.name, "N (torchrun)" if spec.multiprocess else "1", "yes" if spec.needs_cuda else "no", spec.summary)
    console.print(t)
    t = Table(title="dataset sources")
    t.add_column("--dataset")
    t.add_column("what")
    sizes = ", ".join(f"{s} ({sum(class_counts(s).values()):,} clips)" for s in SIZES)
    t.add_row("synthetic", f"embedded procedural emotional speech, 7 classes, real class balance; --size {sizes}")
    t.add_row("PATH", "a folder: the Kaggle audio-emotions merge (Emotions/Angry/...) or RAVDESS, CREMA-D, TESS, SAVEE as distributed")
    console.print(t)


# ------------------------------------------------------------------------------------------ data

@data_app.command("scan")
def data_scan(
    path: str = typer.Argument(..., help="Folder to walk recursively."),
    out: Optional[str] = typer.Option(None, "--out", help="Write the manifest CSV (path,label,corpus,speaker,split) here."),
    seed: int = typer.Option(0, help="Seed of the speaker-disjoint split."),
    show_skipped: Optional[int] = typer.Option(None, help="List at most this many skipped/flagged files [default: all]; all are counted."),
):
    """Label every clip under PATH, split speakers 80/10/10, and summarise what was found and skipped."""
    from rich.table import Table

    from emotion_models.labels import CLASSES
    from emotion_models.scan import ScanError, scan_folder, write_manifest

    try:
        report = scan_folder(path, seed=seed)
    except ScanError as exc:
        _fail(str(exc))
    for column, keys in (("label", CLASSES), ("corpus", None), ("split", ("train", "val", "test"))):
        counts = report.counts(column)
        t = Table(title=f"clips per {column}")
        t.add_column(column)
        t.add_column("clips", justify="right")
        for k in keys or sorted(counts):
            t.add_row(k, str(counts.get(k, 0)))
        console.print(t)
    speakers = {r.speaker for r in report.rows if r.speaker}
    unknown = sum(1 for r in report.rows if not r.speaker)
    info(f"{len(report.rows)} clips, {len(speakers)} speakers" + (f", {unknown} clips of unknown speaker (each its own group)" if unknown else ""))
    if report.disagreements:
        info(f"file name and folder disagree on {sum(report.disagreements.values())} clips (the file name wins):")
        for (corpus, folder, name), n in sorted(report.disagreements.items()):
            info(f"  {corpus}: folder says {folder}, file name says {name}: {n}")
    for title, items in (("skipped", report.skipped), ("flagged (kept)", report.flagged)):
        if items:
            reasons = Counter(r.split(":")[0] for _, r in items)
            info(f"{title}: {len(items)} files (" + ", ".join(f"{k}: {v}" for k, v in reasons.most_common()) + ")")
            limit = len(items) if show_skipped is None else show_skipped
            for p, r in items[:limit]:
                info(f"  {p}: {r}")
            if len(items) > limit:
                info(f"  ... and {len(items) - limit} more (raise --show-skipped to list them)")
    if out:
        write_manifest(report.rows, out)
        info(f"manifest: {out}")


@data_app.command("synth")
def data_synth(
    out: str = typer.Option(..., "--out", help="Folder to write Emotions/<Class>/synth_*.wav into (Kaggle layout)."),
    size: str = typer.Option("small", help="tiny, small, medium, full, or a clip count."),
    seed: int = typer.Option(0, help="Seed of the synthetic data."),
):
    """Write the synthetic dataset as 16 kHz 16-bit WAV files in the Kaggle audio-emotions layout."""
    import soundfile as sf

    from emotion_models.synthetic import SAMPLE_RATE, render, synthetic_clips

    folders = {"angry": "Angry", "happy": "Happy", "sad": "Sad", "neutral": "Neutral", "fearful": "Fearful",
               "disgusted": "Disgusted", "surprised": "Suprised"}  # the merge's own spelling
    try:
        clips = synthetic_clips(size, seed)
    except ValueError as exc:
        _fail(str(exc))
    root = Path(out) / "Emotions"
    with progress_factory() as progress:
        tick = progress(len(clips), "writing WAV files")
        for c in clips:
            d = root / folders[c.label]
            d.mkdir(parents=True, exist_ok=True)
            sf.write(d / c.filename, render(c), SAMPLE_RATE, subtype="PCM_16")
            tick(1)
    info(f"wrote {len(clips)} clips to {root}")


# ------------------------------------------------------------------------------------------ main

def main() -> None:
    try:
        app(standalone_mode=False)
    except Exit as exc:
        sys.exit(exc.code)
    except typer.Abort:
        error("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and anything unexpected: one line, no traceback
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # typer's (vendored) click usage errors
            exc.show()
            sys.exit(exc.exit_code)
        if os.environ.get("EMOTION_BENCH_DEBUG"):
            raise
        error(f"{type(exc).__name__}: {exc} (internal error; set EMOTION_BENCH_DEBUG=1 for the traceback)")
        sys.exit(1)
