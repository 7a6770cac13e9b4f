"""Console output: progress bars, tables, the end-of-run table, one-line errors."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Sequence

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


def table(title: str, header: Sequence[str | tuple[str, dict]], rows: Iterable[Sequence[str]], *,
          caption: str | None = None, justify: str = "left", plain: bool = False,
          style: Callable[[Sequence[str]], str | None] | None = None) -> Table:
    """A rich Table of text cells; every table the CLI prints is made here.

    header: column names, each justified by `justify`, or (name, Table.add_column keywords) for a
    column of its own (justify, no_wrap). plain: the cells are shown as they are, not read as rich
    markup (they quote paths, git revisions and brackets). style(row): the row's style, given the
    cells as passed.
    """
    t = Table(title=title, caption=caption)
    for column in header:
        name, options = (column, {}) if isinstance(column, str) else column
        t.add_column(name, **{"justify": justify, **options})
    for r in rows:
        t.add_row(*((escape(x) for x in r) if plain else r), style=style(r) if style else None)
    return t


class Ticker:
    """One task's progress: tick(n) advances the bar; epoch(...) is told each training epoch's end.
    On a terminal the bar says it all; where the output is not a terminal (a log file, CI) the bar
    is off and each epoch gets one plain line instead, so a long run still shows that it moves."""

    def __init__(self, advance: Callable[[int], None], plain: bool):
        self.advance, self.plain = advance, plain

    def __call__(self, n: int = 1) -> None:
        self.advance(n)

    def epoch(self, epoch: int, epochs: int, step: int, steps: int, loss: float | None, samples_per_s: float,
              elapsed_s: float) -> None:
        if not self.plain:
            return
        left = f", about {elapsed_s / step * (steps - step):.0f} s left" if 0 < step < steps else ""
        loss_text = f"loss {loss:.4f}" if loss is not None else "loss n/a"
        console.print(f"epoch {epoch + 1}/{epochs}: step {step}/{steps}, {loss_text}, {samples_per_s:.1f} samples/s, "
                      f"{elapsed_s:.0f} s elapsed{left}", soft_wrap=True, highlight=False, markup=False)


@contextlib.contextmanager
def progress_factory(transient: bool = False):
    """Yields make(total, description="training") -> a Ticker bound to one rich Progress."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    plain = not sys.stdout.isatty()
    # 2 refreshes a second: the refresh thread must not steal time from the measured loop
    with Progress(*columns, console=console, transient=transient, refresh_per_second=2, disable=plain) as prog:

        def make(total: int, description: str = "training steps") -> Ticker:
            task = prog.add_task(description, total=total)
            return Ticker(lambda n=1: prog.advance(task, n), plain)

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
    rows: list[tuple[str, str]] = []

    def row(col: str, label: str | None = None) -> None:
        m = METRICS[col]
        rows.append((label or m.label, fmt(m.read(result), m.spec, f" {m.unit}" if m.unit else "")))

    row("samples_per_s")
    row("samples_per_s_per_device")
    p50, p90 = METRICS["step_time_ms_p50"], METRICS["step_time_ms_p90"]
    rows.append(("step time p50 / p90", f"{fmt(p50.read(result))} / {fmt(p90.read(result))} {p50.unit}"))
    rows.append(("measured steps", f"{t.get('measured_steps')} (after {t.get('warmup_steps')} warmup)"))
    rows.append(("CPU busy (mean)", fmt(u.get("cpu_percent_mean"), ".0f", " %")))
    rows.append(("GPU busy (NVML, mean)", fmt(u.get("gpu_busy_percent_mean"), ".0f", " %")))
    row("peak_mem_mib")
    if u.get("gpu_energy_j") is not None:
        rows.append(("GPU energy", fmt(u.get("gpu_energy_j"), ".0f", " J")))
    f = result.get("flops") or {}
    rows.append(("achieved", fmt(f.get("achieved_tflops"), ".3f", " TFLOP/s")))
    mfu = f.get("mfu")
    rows.append(("MFU", f"{mfu * 100:.1f} % of {f['peak_tflops_per_device']} TFLOP/s/device ({f['peak_source']})"
                 if mfu is not None else f"n/a (peak {f.get('peak_source', 'unknown')})"))
    for col in ("macro_f1", "uar", "accuracy"):
        row(col, f"test {METRICS[col].label}")
    if q.get("target_f1") is not None:
        rows.append((f"time to val F1 {q['target_f1']}", fmt(q.get("time_to_target_s"), ".1f", " s")))
    rows.append(("wall time", fmt(result["timing"].get("wall_s"), ".1f", " s")))
    return table(f"{c['strategy']} · {c['model']} · {c['precision']}{' · compiled' if c['compile'] else ''} · "
                 f"{c['devices']}x {c['device_type']}", ["measure", ("value", {"justify": "right"})], rows)
