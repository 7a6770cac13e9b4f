"""`bench ab`: base and head measured alternately on this machine, judged on paired ratios."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..ui import error, info, progress_factory
from .common import Exit, fail, verdict_table


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
    from ..ab import ABError, console_table, run_ab, table

    threshold, envs, cells_path = _options(cells, pairs, budget_s, max_budget_s, max_regression, inconclusive,
                                           json_out, base_env, head_env, fmt)
    with progress_factory(transient=True) as bars:
        bar = bars(2 * pairs if pairs else 2, "ab: pairs")
        try:
            outcome = run_ab(base, head, cells=cells_path, pairs=pairs, budget_s=budget_s, max_regression=threshold,
                             base_env=envs[0], head_env=envs[1], say=info, tick=lambda _: bar(1),
                             max_budget_s=max_budget_s)
        except ABError as exc:
            fail(str(exc))
    header, rows = table(outcome) if fmt == "md" else console_table(outcome)  # console: a row per metric, 80 columns
    verdict_table(header, rows, _summary(outcome, threshold), fmt, "bench ab: head / base, 95 % interval",
                  lambda r: "red" if any("regression" in x for x in r) else
                  "yellow" if any("inconclusive" in x for x in r) else None)
    if json_out:
        from ..ab import write_json

        try:
            write_json(outcome, threshold, json_out)
        except OSError as exc:
            fail(f"--json-out {json_out}: cannot write there ({exc.strerror or exc})")
    _leave(outcome, inconclusive)


def _options(cells: str, pairs: int | None, budget_s: float, max_budget_s: float, max_regression: str,
             inconclusive: str, json_out: str | None, base_env: list[str] | None, head_env: list[str] | None,
             fmt: str) -> tuple[float, tuple[dict, dict], str]:
    """(threshold, (base's env, head's env), the cells' TOML file); exit 2 on a bad option."""
    from ..ab import parse_env
    from ..compare import parse_fraction
    from ..sweep import PRESET_DIR

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
        fail(str(exc))
    return threshold, envs, cells_path


def _summary(outcome, threshold: float) -> str:
    """The line under the verdicts: the two sides, the pairs and looks, the rule, the machine."""
    fp = outcome.fingerprint
    looks = " and ".join(str(n) for n in outcome.looks)
    return (f"base {outcome.base.rev}{' ' + str(outcome.base.env) if outcome.base.env else ''} vs head "
            f"{outcome.head.rev}{' ' + str(outcome.head.env) if outcome.head.env else ''}: {outcome.pairs} pairs "
            f"(A B B A ...) in {outcome.seconds:.0f} s, looked at after {looks}; ratios head/base, geometric mean "
            f"and 95 % paired t interval; regression or improvement when the whole interval lies beyond "
            f"{threshold * 100:g} %, no change when it lies within +-{threshold * 100:g} %, else inconclusive (at most "
            f"two looks: each claim wrong at most 5 % of the time); macro-F1 exact (deterministic runs) against "
            f"base's spread; machine {fp.get('cpu_model')}, {fp.get('cpu_cores_logical')} cores "
            f"(hardware_id {fp.get('hardware_id')})")


def _leave(outcome, inconclusive: str) -> None:
    """Exit 1 on a regression; on an inconclusive gate say what would decide it, and exit 3 unless
    --inconclusive ok."""
    if outcome.regressed:
        raise Exit(1)
    if outcome.inconclusive:
        more = (f"about {outcome.more_s:.0f} s more would decide it (--max-budget-s)" if outcome.more_s is not None
                else "no number of pairs would decide it at this spread (a change sitting at the threshold)")
        error(f"INCONCLUSIVE: the gate could not tell whether head changed; {more}")
        if inconclusive == "fail":
            raise Exit(3)
