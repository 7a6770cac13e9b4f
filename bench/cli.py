"""The `bench` command line (typer): parse, call, render. Runs go through bench.lifecycle, sweeps
through bench.sweep; nothing below this module raises a CLI exception."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import time
import typing
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .config import RunConfig, cli_fields
from .ui import console, error, info, progress_factory, run_table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="emotion-bench: PyTorch parallel-training strategies measured on speech emotion recognition.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: scan a folder of WAV files, write the synthetic set.")
app.add_typer(data_app, name="data")


class Exit(Exception):
    """Leave with this exit code (the message has been shown)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _nonempty_out(value: str) -> str:
    """An empty --out would write into whatever folder the shell is in: refused."""
    if value is not None and not value.strip():
        raise typer.BadParameter("empty: give a folder, e.g. --out results/")
    return value


def _fail(message: str, code: int = 2):
    error(message)
    raise Exit(code)


def config_options(names: tuple[str, ...] | None = None, *, defaults: dict | None = None, helps: dict | None = None,
                   preset_default: str | None = None):
    """Add RunConfig settings to a command as typer options: flag, default, type and help come from
    the field (bench/config.py), so they are written once.

    names: which settings (default: all that `bench run` exposes); defaults/helps: a command's own;
    preset_default: the options default to None (unset) and the help says what applies instead.
    """
    hints = typing.get_type_hints(RunConfig)
    chosen = [f for f in cli_fields() if names is None or f.name in names]

    def option(f: dataclasses.Field) -> inspect.Parameter:
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        help_ = (helps or {}).get(f.name, f.metadata["help"])
        default = (defaults or {}).get(f.name, f.default)
        annotation = hints[f.name]
        if preset_default is not None:
            help_ = f"{help_} (default: {preset_default}, else {default})"
            default, annotation = None, Optional[annotation]
        opt = typer.Option(default, flag, *f.metadata["aliases"], help=help_)
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation)

    def deco(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]

        @functools.wraps(fn)
        def command(**kwargs):
            return fn(**kwargs)

        params = own + [option(f) for f in chosen]
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {**typing.get_type_hints(fn), **{p.name: p.annotation for p in params[len(own):]}}
        return command

    return deco


# ------------------------------------------------------------------------------------------ run

@app.command()
@config_options()
def run(
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate every flag, estimate memory and say what would "
                                                          "run; no data, no training, no result file."),
    **settings,
):
    """Train one cell of the matrix, measure it, and write one result file (its path is the last line)."""
    from . import lifecycle
    from .distenv import under_torchrun
    from .results import load_result

    cfg = RunConfig(**settings)
    if under_torchrun():
        lifecycle.worker_exit(cfg)  # never returns
    if os.environ.get(lifecycle.CELL_ENV):  # one cell of a sweep or parity, in its own process
        raise Exit(lifecycle.cell_main())
    outcome = lifecycle.run(cfg, say=info, progress=progress_factory, dry_run=dry_run)
    if outcome.error:
        error(outcome.error)
    elif outcome.path is None and not dry_run:
        info("done: this node's ranks finished; rank 0 on another node wrote the result file")
    elif outcome.path is not None:
        console.print(run_table(load_result(outcome.path)))
    for note in outcome.notes:
        info(f"warning: {note}")
    if outcome.path is not None:
        print(outcome.path)
    if outcome.code:
        raise Exit(outcome.code)


# ------------------------------------------------------------------------------------------ parity

@app.command()
@config_options(("devices", "model", "model_size", "precision", "batch_size", "size", "sync_bn", "device"),
                defaults={"devices": 2, "model_size": "small", "batch_size": 16, "size": "tiny"},
                helps={"devices": "Devices (CPU worker processes without CUDA) per strategy.",
                       "batch_size": "Global batch (the same for every cell), samples."})
def parity(
    strategies: str = typer.Option("ddp,fsdp,pipeline:gpipe,pipeline:1f1b",
                                   help="Comma-separated cells; pipeline:SCHEDULE picks the schedule."),
    steps: int = typer.Option(6, help="Optimiser steps compared."),
    compile_backend: Optional[str] = typer.Option(None, help="Compile every cell with this torch.compile backend."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the cells and stop."),
    **settings,
):
    """Train a few steps of each strategy and compare losses and parameters with `single`."""
    from rich.table import Table

    from .parity import BASES, check_parity, run_parity

    cells = [c.strip() for c in strategies.split(",") if c.strip()]
    try:
        check_parity(strategies=cells, steps=steps, compile_backend=compile_backend, **settings)
    except ValueError as exc:
        _fail(str(exc))
    if dry_run:
        info(f"parity would compare {', '.join(cells)} with single over {steps} steps")
        return
    rows = run_parity(strategies=cells, steps=steps, compile_backend=compile_backend, **settings)
    t = Table(title=f"parity against single: {settings['model']}-{settings['model_size']}, {settings['precision']}, "
                    f"{steps} steps, global batch {settings['batch_size']}")
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
@config_options(("epochs", "size", "batch_size", "model_size", "dataset", "device"), preset_default="the preset's")
def sweep(
    strategies: Optional[str] = typer.Option(None, help="Comma-separated strategies, e.g. single,ddp,fsdp,pipeline."),
    gpus: Optional[str] = typer.Option(None, "--gpus", "--devices", help="Comma-separated device counts, e.g. 1,2,4."),
    precision: Optional[str] = typer.Option(None, help="Comma-separated precisions, e.g. fp32,bf16."),
    models: Optional[str] = typer.Option(None, help="Comma-separated models (default: cnn)."),
    compile: Optional[str] = typer.Option(None, "--compile", help="Comma-separated off,on (default: off)."),
    repeat: Optional[int] = typer.Option(None, help="Repeats per cell; seeds differ per repeat (seed + repeat index)."),
    config: Optional[str] = typer.Option(None, "--config", help="A sweep TOML file or a preset: smoke, cpu, gpu-node."),
    out: str = typer.Option("results/sweep", help="Folder for the cells' result files and sweep.json.", callback=_nonempty_out),
    resume: bool = typer.Option(False, "--resume", help="Skip cells whose result in --out is ok (or diverged); rerun "
                                                        "failed and interrupted ones."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells and why some are skipped; run nothing."),
    **settings,
):
    """Run a matrix of cells one after another; cells that cannot run here are skipped with a reason."""
    from .distenv import resolve_device_type
    from .sweep import SweepSpec, load_spec, on_off, run_sweep
    from .ui import sweep_bar

    try:
        spec = load_spec(config) if config else SweepSpec(strategies=["single"], gpus=[1])
        for name, value in (("strategies", _csv(strategies)), ("gpus", _csv(gpus, int)),
                            ("precision", _csv(precision)), ("models", _csv(models)),
                            ("compile", _csv(compile, on_off)), ("repeat", repeat)):
            if value is not None:
                setattr(spec, name, value)
        spec.run.update({k: v for k, v in settings.items() if v is not None})
        spec.check()
        device_type = resolve_device_type(RunConfig(**spec.run))
    except ValueError as exc:  # ConfigError included
        _fail(str(exc))
    if dry_run:
        from .sweep import expand

        for c in expand(spec, device_type, out):
            info(f"{'skip' if c.skip_reason else 'run '} {c.key}" + (f": {c.skip_reason}" if c.skip_reason else ""))
        return
    try:
        done = run_sweep(spec, out, device_type=device_type, resume=resume, say=info, progress=sweep_bar)
    except OSError as exc:
        _fail(f"--out {out}: cannot write there ({exc.strerror or exc}): choose a writable folder")
    if done.interrupted is not None:
        error(f"sweep interrupted ({done.interrupted.error}); bench sweep ... --resume carries on")
        raise Exit(done.interrupted.code)
    info(f"sweep done: {done.ran} ran, {done.failed} failed or stopped, {done.skipped} skipped; results in {out}")
    info(f"next: bench report {out} --out reports/")


# ------------------------------------------------------------------------------------------ comm

COMM_ENV = "EMOTION_BENCH_COMM"


def parse_bytes(text: str) -> int:
    """'1K', '256M', '1G', '4096' -> bytes (binary multiples)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(t[-1:], 1)
    value = int(float(t[:-1] if mult > 1 else t) * mult)
    if value < 4:
        raise ValueError(f"{text!r} is not a size like 1K, 256M or 4096 (bytes)")
    return value


@app.command()
@config_options(("devices", "device", "nodes", "node_rank", "rdzv_endpoint", "timeout_s"), defaults={"devices": 2},
                helps={"devices": "Devices (CPU worker processes without CUDA) taking part, at least 2."})
def comm(
    ops: str = typer.Option("all_reduce,all_gather,reduce_scatter,broadcast,send_recv",
                            help="Comma-separated collectives: all_reduce, all_gather, reduce_scatter, broadcast, send_recv."),
    min_bytes: str = typer.Option("1K", help="Smallest message S, bytes (1K = 1024)."),
    max_bytes: str = typer.Option("256M", help="Largest message S, bytes (sizes double from the smallest)."),
    out: str = typer.Option("results/comm", help="Folder for <run_id>.comm.json and its plot.", callback=_nonempty_out),
    **settings,
):
    """Collective bandwidth as nccl-tests measures it (time, algbw, busbw per size) and an alpha-beta fit."""
    import dataclasses as dc

    from . import launch as launcher
    from .comm import OPS, CommConfig, worker_main
    from .distenv import resolve_device_type, under_torchrun
    from .lifecycle import new_run_id

    if under_torchrun():
        code = worker_main(CommConfig(**{k: (tuple(v) if k == "ops" else v)
                                         for k, v in json.loads(os.environ[COMM_ENV]).items()}))
        sys.stdout.flush()
        os._exit(code)
    try:
        kinds = tuple(k.strip() for k in ops.split(",") if k.strip())
        bad = [k for k in kinds if k not in OPS]
        if bad or not kinds:
            raise ValueError(f"--ops: unknown collectives {bad}; choose from {', '.join(OPS)}")
        lo, hi = parse_bytes(min_bytes), parse_bytes(max_bytes)
        if lo > hi:
            raise ValueError(f"--min-bytes {min_bytes} is above --max-bytes {max_bytes}")
        cfg = RunConfig(strategy="ddp", out_dir=out, **settings)
        cfg.validate()
        if cfg.devices < 2:
            raise ValueError(f"--gpus {cfg.devices}: a collective needs at least 2 devices")
        device_type = resolve_device_type(cfg)
    except ValueError as exc:
        _fail(str(exc))
    cfg = cfg.replace(run_id=new_run_id(cfg, device_type).replace("-ddp-cnn-fp32", "-comm"))
    comm_cfg = CommConfig(ops=kinds, min_bytes=lo, max_bytes=hi, out=out, run_id=cfg.run_id,
                          extra={"device_type": device_type, "timeout_s": cfg.timeout_s})
    path = Path(out) / f"{cfg.run_id}.comm.json"
    Path(out).mkdir(parents=True, exist_ok=True)
    done = launcher.launch(cfg, time.perf_counter(), status=info, argv=("comm",), result=path,
                           extra_env={COMM_ENV: json.dumps(dc.asdict(comm_cfg))})
    if not done.ok:
        _fail(f"bench comm failed: {done.error} (worker log: {done.log_path})", 1)
    if done.other_node:
        info("done: rank 0 on another node wrote the result")
        return
    from rich.table import Table

    from .comm import load

    result = load(str(path))
    t = Table(title=f"bench comm: {result['config']['devices']} x {device_type} ({result['config']['backend']})",
              caption="algbw = S / t; busbw = algbw x 2(n-1)/n all-reduce, x (n-1)/n all-gather/reduce-scatter, x 1 "
                      "broadcast, send/recv (nccl-tests)")
    for col in ("collective", "size S", "time (us)", "algbw (GB/s)", "busbw (GB/s)"):
        t.add_column(col, justify="right")
    for kind, rows in result["ops"].items():
        for r in rows:
            t.add_row(kind, f"{r['bytes']:,}", f"{r['time_us']:.1f}", f"{r['algbw_GBps']:.3f}", f"{r['busbw_GBps']:.3f}")
    console.print(t)
    for kind, f in result["fit"].items():
        bw = f"{f['busbw_GBps']:.2f} GB/s" if f["busbw_GBps"] else "n/a"
        info(f"fit {kind}: latency alpha {f['alpha_us']:.1f} us, bus bandwidth {bw}")
    print(path)


# ------------------------------------------------------------------------------------------ predict

def _link(text: str | None):
    from .comm import load
    from .predict import LINKS, Link

    if text is None:
        return None
    if text in LINKS:
        return Link.named(text)
    try:
        return Link.measured(load(text))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--link {text}: neither a preset ({', '.join(LINKS)}) nor a bench comm result ({exc})") from None


@app.command()
def predict(
    results_dir: str = typer.Argument(..., help="Result folder with single runs (and, for overlap and wait, profiled "
                                                "runs; for contention, independent runs)."),
    devices: str = typer.Option("1,2,4,8,16,64", "--gpus", "--devices", help="Comma-separated device counts N."),
    per_node: int = typer.Option(8, help="Devices per node: N above it spans nodes (data parallel through --inter-link)."),
    strategies: str = typer.Option("ddp,fsdp,pipeline", help="Comma-separated strategies to predict."),
    link: str = typer.Option("nvlink4", help="Intra-node link: a preset (nvlink4, pcie4, pcie5, ib-ndr, 100gbe) or a "
                                              "bench comm result (file or folder)."),
    inter_link: str = typer.Option("ib-ndr", help="Inter-node link: a preset or a bench comm result."),
    out: str = typer.Option("reports", "--out", help="Folder for predict.png and predict.md.", callback=_nonempty_out),
):
    """Predict step time, throughput and efficiency at N devices from measured results and link figures."""
    from rich.table import Table

    from .predict import check, inputs_from
    from .predict import predict as predict_cell
    from .report import md_table

    try:
        intra, inter = _link(link), _link(inter_link)
        counts = _csv(devices, int) or []
        if not counts or min(counts) < 1 or per_node < 1:
            raise ValueError("--gpus: give device counts of 1 or more, and --per-node 1 or more")
        kinds = _csv(strategies) or []
        bad = set(kinds) - {"ddp", "fsdp", "pipeline"}
        if bad:
            raise ValueError(f"--strategies: no model for {sorted(bad)}; use ddp, fsdp, pipeline")
    except ValueError as exc:
        _fail(str(exc))
    results, _ = _load([results_dir])
    inputs = inputs_from(results)
    if not inputs:
        _fail(f"no ok single-device result under {results_dir}: predict needs the single run's step time")
    rows = []
    for inp in inputs:
        for s in kinds:
            for n in counts:
                if s == "pipeline" and n > inp.blocks:
                    continue
                nodes = max(1, -(-n // per_node))
                p = predict_cell(inp, s, n, nodes, intra, inter)
                rows.append([f"{inp.model} {s} {inp.precision} b{inp.batch}", str(n), str(nodes),
                             f"{p['step_ms']:.1f}", f"{p['samples_per_s']:.1f}", f"{p['efficiency']:.2f}",
                             f"{p['overlap']:.2f}" + ("" if inp.overlap and s in inp.overlap else " (none measured)"),
                             f"{p['contention']:.2f}" + ("" if inp.contention_measured(n // nodes) else " (none measured)"),
                             "" if s == "pipeline" or n < 2 else
                             f"{p['wait_ms']:.1f}" + ("" if (inp.wait or {}).get(s) else " (none measured)")])
    header = ["cell", "devices", "nodes", "step (ms)", "throughput (samples/s)", "efficiency", "overlap o",
              "contention c_n", "wait W (ms/step)"]
    t = Table(title=f"predicted: intra-node {intra.source} ({intra.busbw_GBps:.1f} GB/s, {intra.alpha_us:.0f} us); "
                    f"inter-node {inter.source}")
    for h in header:
        t.add_column(h, justify="right")
    for r in rows:
        t.add_row(*r)
    console.print(t)
    checked = check(results, intra, inter)
    cmp_header = ["cell", "devices", "measured (samples/s)", "predicted (samples/s)", "error", "contention c_n",
                  "wait W (ms/step)"]
    cmp_rows = [[f"{c['model']} {c['strategy']} {c['precision']} b{c['batch']}", str(c["devices"]),
                 f"{c['measured']:.1f}", f"{c['predicted']:.1f}", f"{c['error'] * 100:+.1f}%", f"{c['contention']:.2f}",
                 "" if c["strategy"] == "pipeline" else f"{c['wait_ms']:.1f}"]
                for c in checked]
    if cmp_rows:
        t = Table(title="predicted against measured (the same links)")
        for h in cmp_header:
            t.add_column(h, justify="right")
        for r in cmp_rows:
            t.add_row(*r)
        console.print(t)
    Path(out).mkdir(parents=True, exist_ok=True)
    from emotion_models.atomic import atomic_write_text

    atomic_write_text(Path(out) / "predict.md", md_table(header, rows) + "\n\n" + md_table(cmp_header, cmp_rows) + "\n")
    from .report.plots import prediction

    prediction(inputs, kinds, counts, per_node, intra, inter, checked, Path(out) / "predict.png")
    info(f"predict: {Path(out) / 'predict.md'}, {Path(out) / 'predict.png'}")


# ------------------------------------------------------------------------------------------ report

def _load(paths: list[str]):
    from .results import load_results

    try:
        return load_results(paths)
    except FileNotFoundError as exc:
        _fail(f"{exc}: pass result folders or files")


@app.command()
def report(
    dirs: list[str] = typer.Argument(..., help="Result folders (or files); folders from two machines are compared side by side."),
    out: str = typer.Option("reports", "--out", callback=_nonempty_out,
                            help="Folder for report.md, report.html, results.csv and the PNG plots."),
    predict_link: Optional[str] = typer.Option(None, "--predict", help="Add bench predict's curves for this link (a "
                                                                       "preset or a bench comm result) to the report."),
):
    """Tables (DeepLearningExamples style), scaling plots and a hardware comparison from result files."""
    from rich.table import Table

    from .report import main_tables, write_report
    from .sweep import skipped_cells

    results, bad = _load(dirs)
    if not results:
        _fail(f"no result files under {', '.join(dirs)}" + (f" ({len(bad)} unreadable JSON files)" if bad else ""))
    try:
        link = _link(predict_link)
        rep = write_report(results, bad, out, [s for d in dirs for s in skipped_cells(d)], predict_link=link)
    except ValueError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"--out {out}: cannot write the report there ({exc.strerror or exc}): choose a writable folder")
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

def _verdict_table(header: list[str], rows: list[list[str]], summary: str, fmt: str, title: str,
                   style: typing.Callable[[list[str]], str | None]) -> None:
    """compare's and ab's verdicts: markdown for a PR comment, else a rich table; then the summary line."""
    from rich.table import Table

    from .report import md_table

    if fmt == "md":
        print(md_table(header, rows))
        print()
        print(summary)
        return
    t = Table(title=escape(title))
    for h in header:
        t.add_column(h)
    for r in rows:
        t.add_row(*[escape(x) for x in r], style=style(r))
    console.print(t)
    info(summary)


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
    from .compare import compare, parse_fraction, table_rows
    from .frame import GATES

    try:
        threshold = parse_fraction(max_regression)
    except ValueError as exc:
        _fail(f"--max-regression: {exc}")
    if noise_k < 0 or max_f1_drop < 0:
        _fail("--noise-k and --max-f1-drop must be 0 or more")
    gates = [g.strip() for g in gate.split(",") if g.strip()]
    unknown = set(gates) - set(GATES)
    if unknown:
        _fail(f"--gate: unknown metrics {sorted(unknown)}; choose from {', '.join(GATES)}")
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
    _verdict_table(header, rows, summary, fmt, f"compare {baseline} -> {current}",
                   lambda r: "red" if r[-2] in ("regression", "failed") else ("green" if r[-2] == "improvement" else None))
    for p, why in bad_b + bad_c:
        error(f"not a result file: {p}: {why}")
    if regressions:
        raise Exit(1)


# ------------------------------------------------------------------------------------------ ab

@app.command()
def ab(
    base: str = typer.Argument(..., help="Git revision of the base code."),
    head: Optional[str] = typer.Argument(None, help="Git revision of the head code (default: this working tree)."),
    cells: str = typer.Option("gate", help="The cells: a sweep preset or TOML file (gate: single and ddp x2, 40 timed steps)."),
    pairs: Optional[int] = typer.Option(None, help="Base/head pairs (default: as many as --budget-s allows, at least 3)."),
    budget_s: float = typer.Option(270.0, help="Seconds the planned pairs may take when --pairs is not given (the first look)."),
    max_budget_s: float = typer.Option(540.0, help="Seconds in all while a judged metric is inconclusive: more pairs, "
                                                   "then the second and last look (not with --pairs)."),
    max_regression: str = typer.Option("5%", help="The threshold: regression or improvement when the whole 95 % interval "
                                                  "lies beyond it, no change when it lies within +-it, else inconclusive."),
    inconclusive: str = typer.Option("fail", help="What an inconclusive gate exits with: fail (3) or ok (0)."),
    json_out: Optional[str] = typer.Option(None, "--json-out", help="Also write the verdicts as one JSON file here "
                                                                   "(bench history reads a folder of them)."),
    base_env: Optional[list[str]] = typer.Option(None, help="KEY=VALUE set for the base side only (repeatable)."),
    head_env: Optional[list[str]] = typer.Option(None, help="KEY=VALUE set for the head side only (repeatable)."),
    fmt: str = typer.Option("text", "--format", help="text (terminal table) or md (markdown, for a PR comment)."),
):
    """Measure base and head alternately (A B B A ...) and judge paired ratios; exit 1 on a regression."""
    from .ab import ABError, parse_env, run_ab, table
    from .compare import parse_fraction
    from .sweep import PRESET_DIR
    from .ui import progress_factory

    try:
        threshold = parse_fraction(max_regression)
        if pairs is not None and pairs < 2:
            raise ValueError(f"--pairs {pairs}: at least 2 pairs make an interval")
        if budget_s <= 0:
            raise ValueError(f"--budget-s {budget_s}: give a positive number of seconds")
        if fmt not in ("text", "md"):
            raise ValueError("--format: use text or md")
        if inconclusive not in ("ok", "fail"):
            raise ValueError(f"--inconclusive {inconclusive}: use ok or fail")
        if max_budget_s < budget_s:
            raise ValueError(f"--max-budget-s {max_budget_s:g} is below --budget-s {budget_s:g}")
        if json_out is not None and not json_out.strip():
            raise ValueError("--json-out is empty: give a file path, e.g. results/gates/gate.json")
        envs = parse_env(base_env, "--base-env"), parse_env(head_env, "--head-env")
        preset = PRESET_DIR / f"{cells}.toml"
        cells_path = str(preset if preset.exists() else Path(cells).resolve())
        if not Path(cells_path).exists():
            raise ValueError(f"--cells {cells}: no such preset or file")
    except ValueError as exc:
        _fail(str(exc))
    with progress_factory(transient=True) as bars:
        bar = bars(2 * pairs if pairs else 2, "ab: pairs")
        try:
            outcome = run_ab(base, head, cells=cells_path, pairs=pairs, budget_s=budget_s, max_regression=threshold,
                             base_env=envs[0], head_env=envs[1], say=info, tick=lambda _: bar(1),
                             max_budget_s=max_budget_s)
        except ABError as exc:
            _fail(str(exc))
    header, rows = table(outcome)
    fp = outcome.fingerprint
    looks = " and ".join(str(n) for n in outcome.looks)
    summary = (f"base {outcome.base.rev}{' ' + str(outcome.base.env) if outcome.base.env else ''} vs head "
               f"{outcome.head.rev}{' ' + str(outcome.head.env) if outcome.head.env else ''}: {outcome.pairs} pairs "
               f"(A B B A ...) in {outcome.seconds:.0f} s, looked at after {looks}; ratios head/base, geometric mean "
               f"and 95 % paired t interval; regression or improvement when the whole interval lies beyond "
               f"{threshold * 100:g} %, no change when it lies within +-{threshold * 100:g} %, else inconclusive (at most "
               f"two looks: each claim wrong at most 5 % of the time); macro-F1 exact (deterministic runs) against "
               f"base's spread; machine {fp.get('cpu_model')}, {fp.get('cpu_cores_logical')} cores "
               f"(hardware_id {fp.get('hardware_id')})")
    _verdict_table(header, rows, summary, fmt, "bench ab",
                   lambda r: "red" if any("regression" in x for x in r) else
                   "yellow" if any("inconclusive" in x for x in r) else None)
    if json_out:
        from .ab import write_json

        try:
            write_json(outcome, threshold, json_out)
        except OSError as exc:
            _fail(f"--json-out {json_out}: cannot write there ({exc.strerror or exc})")
    if outcome.regressed:
        raise Exit(1)
    if outcome.inconclusive:
        more = (f"about {outcome.more_s:.0f} s more would decide it (--max-budget-s)" if outcome.more_s is not None
                else "no number of pairs would decide it at this spread (a change sitting at the threshold)")
        error(f"INCONCLUSIVE: the gate could not tell whether head changed; {more}")
        if inconclusive == "fail":
            raise Exit(3)


# ------------------------------------------------------------------------------------------ history

@app.command("history")
def history_cmd(
    dirs: list[str] = typer.Argument(..., help="Folders (or files) of gate files: bench ab --json-out, .ci/run's results/gates/."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Comma-separated: throughput, step_time, efficiency, memory (default: all)."),
    cells: Optional[str] = typer.Option(None, "--cells", help="Comma-separated cell labels, as the gate prints them (default: all)."),
    repo: Optional[str] = typer.Option(None, "--repo", help="The git repository whose commit order orders the gates (default: this checkout's, if any)."),
    max_regression: str = typer.Option("5%", help="A step into the newest segment worse than this fails (exit 1)."),
    out: str = typer.Option("reports/history", "--out", callback=_nonempty_out,
                            help="Folder for history.md, history.html, history.csv and one plot per metric."),
):
    """The gate's figures over commits: a trend per cell and metric, its change points, and exit 1 when
    the newest segment stepped worse than the threshold."""
    from rich.table import Table

    from .ab import REPO
    from .compare import parse_fraction
    from .history import HistoryError, history, rows, write

    try:
        threshold = parse_fraction(max_regression)
        where = Path(repo) if repo else (REPO if (REPO / ".git").exists() else None)
        if where is not None and not where.exists():
            raise HistoryError(f"--repo {repo}: no such folder")
        series, skipped = history(dirs, metrics=_csv(metric), cells=_csv(cells), repo=where)
    except ValueError as exc:
        _fail(str(exc))
    header, table_rows = rows(series, threshold)
    t = Table(title=f"bench history: {sum(len(s.points) for s in series)} gates' points, threshold {threshold * 100:g} %")
    for h in header:
        t.add_column(h)
    for r in table_rows:
        t.add_row(*[escape(x) for x in r], style="red" if r[-1].startswith("regression") else None)
    console.print(t)
    for f, why in skipped:
        info(f"skipped {f}: {why}")
    try:
        written = write(series, skipped, out, threshold)
    except OSError as exc:
        _fail(f"--out {out}: cannot write there ({exc.strerror or exc}): choose a writable folder")
    info(f"history: {', '.join(str(p) for p in written[:3])}, {len(written) - 3} plot(s)")
    if any(s.newest_regression(threshold) for s in series):
        raise Exit(1)


# ------------------------------------------------------------------------------------------ export

@app.command("export")
def export_cmd(
    dirs: list[str] = typer.Argument(..., help="Result folders (or files)."),
    mlflow_uri: str = typer.Option(..., "--mlflow", help="MLflow tracking URI: sqlite:///path/mlflow.db or a server's URL."),
    experiment: str = typer.Option("emotion-bench", help="The MLflow experiment the runs go to."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact folder of a new experiment (default: mlartifacts/ beside the sqlite file)."),
):
    """Each result file as an MLflow run: config as params, the metrics table as metrics, traces as artifacts."""
    from .export import ExportError, export

    try:
        new, done, bad = export(mlflow_uri, dirs, experiment, artifacts, say=info)
    except ExportError as exc:
        _fail(str(exc))
    for f, why in bad:
        error(f"not a result file: {f}: {why}")
    info(f"export: {new} run(s) exported to {mlflow_uri} (experiment {experiment}), {done} there already")


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
def list_cmd(devices: int = typer.Option(8, "--gpus", "--devices", help="Device count N of the fsdp memory columns.")):
    """Show the models (parameters, GFLOP, training memory per device), strategies and dataset sources."""
    from rich.table import Table

    from emotion_models.models import MODELS, SIZES, build_model
    from emotion_models.synthetic import SIZES as DATA_SIZES, class_counts

    from .memory import GiB, static_bytes
    from .strategies import all_strategies

    if devices < 1:
        _fail(f"--gpus {devices}: give a device count of 1 or more")
    cells = [("single", 1), ("ddp", devices), ("fsdp", devices)]
    t = Table(title="models", caption="memory: parameters + gradients + AdamW state per device, GiB (activations come on "
              "top and grow with the batch; bench run estimates them). fp32 = bf16 for single and ddp: autocast keeps "
              "fp32 weights; fsdp bf16 gathers each block in bf16. GFLOP: forward, one 3 s sample.")
    for col in ("name", "size", "input", "params", "blocks", "GFLOP"):
        t.add_column(col, justify="right" if col in ("params", "blocks", "GFLOP") else "left")
    for strategy, n in cells:
        for prec in ("fp32", "bf16"):
            t.add_column(f"{strategy} x{n} {prec}", justify="right")
    for name, (_, kind, _) in MODELS.items():
        for size in SIZES:
            try:
                m = build_model(name, size=size, device="meta")
            except ValueError:
                continue  # an encoder has one published size
            mem = []
            for strategy, n in cells:
                for prec in ("fp32", "bf16"):
                    w, extra, _ = static_bytes(RunConfig(model=name, model_size=size, strategy=strategy, devices=n,
                                                         precision=prec))
                    mem.append(f"{(w + extra) / GiB:.2f}")
            t.add_row(name, size, kind, f"{sum(p.numel() for p in m.parameters()) / 1e6:,.1f} M", str(len(m.blocks)),
                      f"{sum(m.block_flops(1)) / 1e9:,.2f}", *mem)
    console.print(t)
    for name, (_, _, desc) in MODELS.items():
        info(f"  {name}: {desc}")
    t = Table(title="strategies")
    for col in ("name", "processes", "needs CUDA", "what it does"):
        t.add_column(col)
    for spec in all_strategies().values():
        t.add_row(spec.name, "N (torchrun)" if spec.multiprocess else "1", "yes" if spec.needs_cuda else "no", spec.summary)
    console.print(t)
    t = Table(title="dataset sources")
    t.add_column("--dataset")
    t.add_column("what")
    sizes = ", ".join(f"{s} ({sum(class_counts(s).values()):,} clips)" for s in DATA_SIZES)
    t.add_row("synthetic", f"embedded procedural emotional speech, 7 classes, real class balance; --size {sizes}")
    t.add_row("PATH", "a folder: the Kaggle audio-emotions merge (Emotions/Angry/...) or RAVDESS, CREMA-D, TESS, SAVEE as distributed")
    console.print(t)


# ------------------------------------------------------------------------------------------ data

@data_app.command("scan")
def data_scan(
    path: str = typer.Argument(..., help="Folder to walk recursively."),
    out: Optional[str] = typer.Option(None, "--out", help="Write the manifest CSV (path,label,corpus,speaker,split) here."),
    seed: int = typer.Option(0, help="Seed of the speaker-disjoint split."),
    show_skipped: Optional[int] = typer.Option(None, help="List at most this many skipped/flagged files (default: all); all are counted."),
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
    out: str = typer.Option(..., "--out", callback=_nonempty_out,
                            help="Folder to write Emotions/<Class>/synth_*.wav into (Kaggle layout)."),
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
