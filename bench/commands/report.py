"""`bench report`: tables, scaling plots and a hardware comparison from result files."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..ui import console, error, info, table
from .common import fail, load_or_fail, nonempty_out, parse_link


def report(
    dirs: list[str] = typer.Argument(..., help="Result folders (or files); folders from two or more machines are "
                                               "compared side by side."),
    out: str = typer.Option("reports", "--out", callback=nonempty_out,
                            help="Folder for report.md, report.html, results.csv and the PNG plots."),
    predict_link: Optional[str] = typer.Option(None, "--predict", help="Add bench predict's curves for this link (a "
                                                                       "preset or a bench comm result) to the report."),
    include_flagged: bool = typer.Option(False, "--include-flagged", help="Let cells whose figures carry a trust flag "
                                         "(oversubscribed, unlike baseline, efficiency above 1, ...) win the verdict."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="The machine every other is compared against: "
                                                                    "a hardware id (bench env), its prefix, or a word "
                                                                    "of its label (default: the first)."),
):
    """Tables (DeepLearningExamples style), scaling plots and a hardware comparison from result files."""
    from ..report import main_tables, write_report
    from ..sweep import skipped_cells
    from ..tune_report import find, summary

    results, bad = load_or_fail(dirs)
    tunes, bad_tunes = find(dirs)
    bad += bad_tunes
    if not results:
        fail(f"no result files under {', '.join(dirs)}" + (f" ({len(bad)} unreadable JSON files)" if bad else ""))
    try:
        link = parse_link(predict_link)
        skipped = [s for d in dirs for s in skipped_cells(d)]
        rep = write_report(results, bad, out, skipped, predict_link=link, include_flagged=include_flagged,
                           baseline=baseline, tunes=tunes)
    except ValueError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"--out {out}: cannot write the report there ({exc.strerror or exc}): choose a writable folder")
    show_verdicts(rep["cells"], skipped, include_flagged)
    for title, header, rows, note in main_tables(rep["cells"]):  # at 80 columns a long word folds, never cut
        console.print(table(title, [(h, {"overflow": "fold"}) for h in header], rows, caption=note, justify="right"))
    _comparison(rep, baseline)
    for path, record in tunes:
        info("tune " + summary(path, record))
    for p, why in bad:
        error(f"not a result file: {p}: {why}")
    info(f"report: {Path(out) / 'report.md'}, {Path(out) / 'report.html'}, {Path(out) / 'results.csv'}, "
         f"{len(rep['plots'])} plots")


def show_verdicts(agg, skipped, include_flagged: bool = False) -> None:
    """The verdict per machine and model, on the console: the winner's line, then why the others lost."""
    from ..verdict import environment, verdicts

    if agg is None or agg.empty:
        info("no cell finished: no verdict")
        return
    info(environment(agg))
    for v in verdicts(agg, include_flagged=include_flagged, skipped=skipped):
        info(f"{v.title}: {v.lines[0]}")
        for line in v.lines[1:]:
            info(f"  {line}")


def _comparison(rep: dict, baseline: str | None) -> None:
    """The hardware comparison on the console where the results come from more than one machine."""
    from ..report.tables import hardware_comparison, pick_baseline

    agg, df = rep["cells"], rep["frame"]
    if agg is None or agg.empty:
        return
    cmp = hardware_comparison(agg, df, pick_baseline(agg, baseline) if baseline else None)
    if cmp:
        header, rows, warnings, machines = cmp
        console.print(table(f"hardware comparison: {len(machines)} machines, against {machines[0]}",
                            [(h, {"overflow": "fold"}) for h in header], rows, justify="right"))
        for w in warnings:
            info(f"warning: {w}")
