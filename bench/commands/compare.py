"""`bench compare`: two sets of results matched by config; regressions, improvements, noise."""
from __future__ import annotations

import typer

from ..ui import error
from .common import Exit, fail, load_or_fail, verdict_table


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
    from ..compare import compare, parse_fraction, table_rows
    from ..frame import GATES

    try:
        threshold = parse_fraction(max_regression)
    except ValueError as exc:
        fail(f"--max-regression: {exc}")
    if noise_k < 0 or max_f1_drop < 0:
        fail("--noise-k and --max-f1-drop must be 0 or more")
    gates = [g.strip() for g in gate.split(",") if g.strip()]
    unknown = set(gates) - set(GATES)
    if unknown:
        fail(f"--gate: unknown metrics {sorted(unknown)}; choose from {', '.join(GATES)}")
    if fmt not in ("text", "md"):
        fail("--format: use text or md")
    base, bad_b = load_or_fail([baseline])
    cur, bad_c = load_or_fail([current])
    if not base:
        fail(f"no result files in baseline {baseline}")
    if not cur:
        fail(f"no result files in current {current}")
    verdicts = compare(base, cur, max_regression=threshold, max_f1_drop=max_f1_drop, noise_k=noise_k, gate=gates)
    header, rows = table_rows(verdicts)
    regressions = [v for v in verdicts if v.verdict in ("regression", "failed")]
    summary = (f"{len(verdicts)} cells: {len(regressions)} regressed, "
               f"{sum(v.verdict == 'improvement' for v in verdicts)} improved, "
               f"{sum(v.verdict == 'within noise' for v in verdicts)} within noise; gated on {', '.join(gates)}; "
               f"a change counts above max({threshold * 100:g}% (F1: {max_f1_drop} absolute), {noise_k:g} x baseline spread)")
    if fmt != "md":  # 80 columns: the changes as one wrapped column, the verdict whole (markdown keeps the wide form)
        header, rows = (["cell", ("verdict", {"no_wrap": True}), "changes (current vs baseline)", "note"],
                        [[r[0], r[-2], "; ".join(f"{h} {v}" for h, v in zip(header[1:-2], r[1:-2]) if v not in ("", "–")),
                          r[-1]] for r in rows])
    verdict_table(header, rows, summary, fmt, f"compare {baseline} -> {current}",
                  lambda r: "red" if r[1] in ("regression", "failed") else ("green" if r[1] == "improvement" else None))
    for p, why in bad_b + bad_c:
        error(f"not a result file: {p}: {why}")
    _tunes(baseline, current, fmt)
    if regressions:
        raise Exit(1)


def _tunes(baseline: str, current: str, fmt: str) -> None:
    """Where both sides hold bench tune records (tune.json): each model's winners side by side (markdown:
    a list after the table)."""
    from ..tune_report import find, side_by_side
    from ..ui import info

    (b, bad_b), (c, bad_c) = find([baseline]), find([current])
    for line in side_by_side(b, c) if b or c else []:
        if fmt == "md":
            print(f"- {line}")
        else:
            info(line)
    for p, why in bad_b + bad_c:
        error(f"not a tune record: {p}: {why}")
