"""`bench report`: result files -> tables (tables.py), figures (plots.py), markdown and HTML (render.py).

Every number carries its unit in its column name; every efficiency names its baseline cell.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from emotion_models.atomic import atomic_write_text

from ..frame import aggregate, frame
from ..verdict import environment, verdicts
from .plots import FIGURES, plot_all
from .render import Bullets, Figure, Para, Section, Table, md_table, write
from .tables import hardware_comparison, main_tables, pick_baseline, results_table, where_time_went

__all__ = ["main_tables", "md_table", "write_report"]


def _verdict_section(agg: pd.DataFrame, skipped, include_flagged: bool) -> Section:
    blocks = []
    for v in verdicts(agg, include_flagged=include_flagged, skipped=skipped):
        blocks += [Para(f"{v.title}: {v.lines[0]}"), Bullets(v.lines[1:])] if len(v.lines) > 1 else [Para(f"{v.title}: {v.lines[0]}")]
    return Section("verdict", blocks or [Para("no cell finished: no verdict")])


def _sections(df: pd.DataFrame, agg: pd.DataFrame, bad, skipped, include_flagged: bool = False,
              baseline: str | None = None) -> list[Section]:
    sections = [_verdict_section(agg, skipped, include_flagged)]
    sections += [Section(title, [Table(header, rows), Para(note)]) for title, header, rows, note in main_tables(agg)]
    if not agg.empty:
        sections.append(Section("every cell", [Table(*results_table(agg))]))
    went = where_time_went(agg) if not agg.empty else []
    if went:
        sections.append(Section("where the time went (profiled steps)", [Bullets(went)]))
    base = pick_baseline(agg, baseline) if baseline and not agg.empty else None
    cmp = hardware_comparison(agg, df, base) if not agg.empty else None
    if cmp:
        header, rows, warnings, machines = cmp
        what = (f"A = {machines[0]}, B = {machines[1]}" if header[1].startswith("A ") else
                f"{len(machines)} machines, baseline {machines[0]}: each machine's throughput, and in brackets its "
                "ratio to the baseline's for the same cell (a dash: not run there)")
        blocks = [Para(what), Table(header, rows)]
        sections.append(Section("hardware comparison", blocks + ([Bullets(warnings, "warning:")] if warnings else [])))
    stopped = df[df.status != "ok"] if not df.empty else df  # failed, interrupted, diverged
    items = [f"{r.status}: {r.run_id}: {r.error}" for r in stopped.itertuples()]
    items += [f"skipped: {k}: {why}" for k, why in skipped]
    items += [f"not a result file: {p}: {why}" for p, why in bad]
    if items:
        sections.append(Section("failed, interrupted, diverged, skipped and unreadable", [Bullets(items)]))
    return sections


def _tune_section(tunes: list[tuple[str, dict]]) -> Section:
    """Each bench tune found among the results: its line, and its measured candidates (bench/tune_report.py)."""
    from ..tune_report import candidate_rows, check_name, from_record, summary

    blocks = []
    for path, record in tunes:
        cands = from_record(record)
        header, rows = candidate_rows(cands, record.get("unit", "samples/s"), check_name(record.get("objective", "")))
        measured = [row for c, row in zip(cands, rows) if c.windows]
        blocks += [Para(summary(path, record)), Table(header, measured)] if measured else [Para(summary(path, record))]
    return Section("bench tune", blocks)


def write_report(results: list[dict], bad: list[tuple[str, str]], out: str | Path, skipped: list[tuple[str, str]],
                 predict_link=None, include_flagged: bool = False, baseline: str | None = None,
                 tunes: list[tuple[str, dict]] | None = None) -> dict:
    """report.md, report.html, results.csv and the PNG figures in out, the verdict first; with
    predict_link, bench predict's efficiency curves for that link beside the measured points;
    include_flagged: cells with trust flags may win the verdict; baseline: the machine (hardware id,
    its prefix or a word of its label) the hardware comparison puts every other machine against;
    tunes: (path, tune.json record) of each bench tune among them, a section of its own."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = frame(results)
    agg = aggregate(df) if not df.empty else pd.DataFrame()
    csv_df = df.drop(columns=[c for c in ("confusion", "breakdown") if c in df])
    atomic_write_text(out / "results.csv", csv_df.to_csv(index=False))
    plots = plot_all(agg, out) if not agg.empty else {}
    sections = _sections(df, agg, bad, skipped, include_flagged, baseline)
    if tunes:
        sections.append(_tune_section(tunes))
    figures = [Figure(name, plots.get(name), caption) for name, (_, caption) in FIGURES.items()]
    if predict_link is not None:
        figures.append(Figure("prediction", _prediction(results, df, predict_link, out),
                              f"bench predict's efficiency (dashed) with {predict_link.source}; measured cells as points."))
    sections.append(Section("plots", figures))
    machines = ", ".join(sorted(set(df.machine))) if not df.empty else "none"
    about = Section("these results", [Para(f"{len(df)} result files, {len(agg)} cells, machines: {machines}."), Para(
        "Throughput is global samples/s over the timed window (warmup and evaluation excluded); cells with "
        "repeats show the median and ±half the relative range.")])
    # the header says where the figures come from; the verdict comes right after it
    write(out, "emotion-bench report", [environment(agg) + "."], sections[:1] + [about] + sections[1:])
    return {"frame": df, "cells": agg, "plots": {k: v for k, v in plots.items() if v}, "dir": out}


def _prediction(results: list[dict], df: pd.DataFrame, link, out: Path) -> Path | None:
    from ..predict import check, inputs_from
    from .plots import prediction

    inputs = inputs_from(results)
    if not inputs:
        return None
    counts = sorted(set(df.devices) | {1, 2, 4, 8, 16, 64}) if not df.empty else [1, 2, 4, 8]
    path = out / "prediction.png"
    prediction(inputs, ["ddp", "fsdp", "pipeline"], counts, 8, link, link, check(results, link, link), path)
    return path
