"""Console output: progress bars, the end-of-run table, one-line errors."""
from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def error(message: str) -> None:
    """The one clear line a user sees for bad input or a failed run."""
    # escaped: messages quote paths and library errors such as "[/pytorch/third_party/gloo/...]"
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def info(message: str) -> None:
    console.print(escape(message), soft_wrap=True)


@contextlib.contextmanager
def progress_factory(transient: bool = False):
    """Yields make(total, description="training") -> tick(n) bound to one rich Progress."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    # 2 refreshes a second: the refresh thread must not steal time from the measured loop
    with Progress(*columns, console=console, transient=transient, refresh_per_second=2,
                  disable=not sys.stdout.isatty()) as prog:

        def make(total: int, description: str = "training steps"):
            task = prog.add_task(description, total=total)
            return lambda n=1: prog.advance(task, n)

        yield make


class _SweepBar:
    """The sweep's progress (bench.sweep.run_sweep): the cell running, failures above the bar."""

    def __init__(self, prog: Progress, total: int):
        self.prog, self.task = prog, prog.add_task("sweep", total=total)

    def start(self, key: str) -> None:
        self.prog.update(self.task, description=f"sweep: {key}")

    def note(self, message: str) -> None:
        self.prog.console.print(f"[red]{escape(message)}[/]", soft_wrap=True)

    def advance(self) -> None:
        self.prog.advance(self.task)


@contextlib.contextmanager
def sweep_bar(total: int):
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not sys.stdout.isatty()) as prog:
        yield _SweepBar(prog, total)


def fmt(value, spec: str = ".1f", unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:{spec}}{unit}"


def run_table(result: dict) -> Table:
    """The end-of-run table: the metrics of bench.frame.METRICS this run has, with units."""
    from .frame import METRICS

    c, t, u, q = result["config"], result["throughput"], result["utilization"], result["quality"]
    table = Table(title=f"{c['strategy']} · {c['model']} · {c['precision']}{' · compiled' if c['compile'] else ''} · "
                        f"{c['devices']}x {c['device_type']}", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")

    def row(col: str, label: str | None = None) -> None:
        m = METRICS[col]
        table.add_row(label or m.label, fmt(m.read(result), m.spec, f" {m.unit}" if m.unit else ""))

    row("samples_per_s")
    row("samples_per_s_per_device")
    p50, p90 = METRICS["step_time_ms_p50"], METRICS["step_time_ms_p90"]
    table.add_row("step time p50 / p90", f"{fmt(p50.read(result))} / {fmt(p90.read(result))} {p50.unit}")
    table.add_row("measured steps", f"{t.get('measured_steps')} (after {t.get('warmup_steps')} warmup)")
    table.add_row("CPU busy (mean)", fmt(u.get("cpu_percent_mean"), ".0f", " %"))
    table.add_row("GPU busy (NVML, mean)", fmt(u.get("gpu_busy_percent_mean"), ".0f", " %"))
    row("peak_mem_mib")
    if u.get("gpu_energy_j") is not None:
        table.add_row("GPU energy", fmt(u.get("gpu_energy_j"), ".0f", " J"))
    f = result.get("flops") or {}
    table.add_row("achieved", fmt(f.get("achieved_tflops"), ".3f", " TFLOP/s"))
    mfu = f.get("mfu")
    table.add_row("MFU", f"{mfu * 100:.1f} % of {f['peak_tflops_per_device']} TFLOP/s/device ({f['peak_source']})"
                  if mfu is not None else f"n/a (peak {f.get('peak_source', 'unknown')})")
    for col in ("macro_f1", "uar", "accuracy"):
        row(col, f"test {METRICS[col].label}")
    if q.get("target_f1") is not None:
        table.add_row(f"time to val F1 {q['target_f1']}", fmt(q.get("time_to_target_s"), ".1f", " s"))
    table.add_row("wall time", fmt(result["timing"].get("wall_s"), ".1f", " s"))
    return table
