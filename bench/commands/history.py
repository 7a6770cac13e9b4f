"""`bench history`: the gate's figures over commits, their change points, and a verdict on the newest."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..ui import console, info, table
from .common import Exit, fail, nonempty_out, split_csv


def history_cmd(
    dirs: list[str] = typer.Argument(..., help="Folders (or files) of gate files: bench ab --json-out, .ci/run's results/gates/."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Comma-separated: throughput, step_time, efficiency, memory (default: all)."),
    cells: Optional[str] = typer.Option(None, "--cells", help="Comma-separated cell labels, as the gate prints them (default: all)."),
    repo: Optional[str] = typer.Option(None, "--repo", help="The git repository whose commit order orders the gates (default: this checkout's, if any)."),
    max_regression: str = typer.Option("5%", help="A step into the newest segment worse than this fails (exit 1)."),
    out: str = typer.Option("reports/history", "--out", callback=nonempty_out,
                            help="Folder for history.md, history.html, history.csv and one plot per metric."),
):
    """The gate's figures over commits: a trend per cell and metric, its change points, and exit 1 when
    the newest segment stepped worse than the threshold."""
    from ..ab import REPO
    from ..compare import parse_fraction
    from ..history import HistoryError, history, rows, write

    try:
        threshold = parse_fraction(max_regression)
        where = Path(repo) if repo else (REPO if (REPO / ".git").exists() else None)
        if where is not None and not where.exists():
            raise HistoryError(f"--repo {repo}: no such folder")
        series, skipped = history(dirs, metrics=split_csv(metric), cells=split_csv(cells), repo=where)
    except ValueError as exc:
        fail(str(exc))
    _, table_rows = rows(series, threshold)
    # 80 columns: cell and metric in one wrapped column, the flags as lines below
    console.print(table(f"bench history: {sum(len(s.points) for s in series)} gates' points, threshold "
                        f"{threshold * 100:g} %", ["series", "gates", "newest head/base (95 % CI)",
                                                   "change points (commit: step)", "verdict"],
                        [[f"{r[0]}: {r[1]}", *r[2:6]] for r in table_rows], plain=True,
                        style=lambda r: "red" if r[-1].startswith("regression") else None))
    for r in table_rows:
        if r[6] != "–":
            info(f"flagged, {r[0]}: {r[1]}: {r[6]}")
    for f, why in skipped:
        info(f"skipped {f}: {why}")
    try:
        written = write(series, skipped, out, threshold)
    except OSError as exc:
        fail(f"--out {out}: cannot write there ({exc.strerror or exc}): choose a writable folder")
    info(f"history: {', '.join(str(p) for p in written[:3])}, {len(written) - 3} plot(s)")
    if any(s.newest_regression(threshold) for s in series):
        raise Exit(1)
