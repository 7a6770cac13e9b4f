"""What won: per machine and model, the fastest cell that still learns, and why the others lost.

Read from the aggregated frame (bench.frame.aggregate): one row per cell, medians over repeats with
their min and max. A cell "learns" when its test macro-F1 is within the tolerance of its `single`
baseline's (same precision and compile flag where that ran, else the fp32 eager one). A cell with
trust flags (bench/trust.py) is left out of the choice unless asked, and says so. Two cells tie when
their throughput ranges over repeats overlap; with one run each, whether a lead is real cannot be
told, and the verdict says that instead of naming a tie or a winner outright.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .cells import cell_label

F1_TOLERANCE = 0.05  # absolute macro-F1 below single's that still counts as learning
# cells judged against each other: the same machine and the same training task (model, data, epochs)
GROUP = ["machine", "model", "model_size", "dataset", "size", "epochs"]


@dataclass
class Verdict:
    title: str  # "cnn on AMD EPYC (2 cores)"
    lines: list[str] = field(default_factory=list)  # the verdict first, then the cells that lost and why
    winner: str | None = None  # the winning cell's label


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _range(r) -> tuple[float, float] | None:
    """The cell's throughput range over its repeats; None with a single run."""
    lo, hi = _num(r.get("samples_per_s_min")), _num(r.get("samples_per_s_max"))
    return (lo, hi) if r.get("repeats", 1) > 1 and lo is not None and hi is not None else None


def _baseline(r, singles: list[dict]) -> dict | None:
    same = [s for s in singles if s["precision"] == r["precision"] and s["compile"] == r["compile"]]
    plain = [s for s in singles if s["precision"] == "fp32" and not s["compile"]]
    pool = same or plain or singles
    return max(pool, key=lambda s: s["samples_per_s"]) if pool else None


def _why_not(r, base, tolerance: float, include_flagged: bool) -> str | None:
    """Why a cell cannot win: it is a measurement anchor, it did not learn, or its figures are flagged;
    None if it may."""
    from .strategies import NOT_TRAINING

    if r.get("strategy") in NOT_TRAINING:
        return f"not a way to train: {NOT_TRAINING[r['strategy']]}"
    f1, ref = _num(r.get("macro_f1")), _num(base.get("macro_f1")) if base else None
    if f1 is None:
        return "did not learn: no test macro-F1"
    if ref is not None and f1 < ref - tolerance:
        return f"did not learn: macro-F1 {f1:.3f} against single's {ref:.3f} (tolerance {tolerance:.2f})"
    if r.get("flags") and not include_flagged:
        return f"flagged: {r['flags']}"
    return None


def _describe(r, base) -> str:
    rng = _range(r)
    thr = f"{r['samples_per_s']:.1f} samples/s" + (f" [{rng[0]:.1f}, {rng[1]:.1f}] over {r['repeats']} runs"
                                                   if rng else " (one run)")
    parts = [thr]
    eff = _num(r.get("efficiency"))
    if eff is not None and r["strategy"] != "single":
        parts.append(f"efficiency {eff:.2f}")
    mem = _num(r.get("peak_mem_mib"))
    if mem is not None:
        parts.append(f"peak memory {mem:.0f} MiB")
    f1 = _num(r.get("macro_f1"))
    if f1 is not None:
        ref = _num(base.get("macro_f1")) if base else None
        parts.append(f"macro-F1 {f1:.3f}" + (f" (single {ref:.3f})" if ref is not None and base is not r else ""))
    return ", ".join(parts)


def _lead(winner, other) -> str:
    """How the winner stands against the runner-up: ahead, a tie, or not known with one run each."""
    ratio = winner["samples_per_s"] / other["samples_per_s"]
    a, b = _range(winner), _range(other)
    if a is None or b is None:
        return (f"{ratio:.2f}x the runner-up {cell_label(other)} ({other['samples_per_s']:.1f} samples/s); one run "
                "each, so whether the lead is real cannot be told (rerun with --repeat 3)")
    if a[0] <= b[1]:
        return (f"tie with {cell_label(other)} ({other['samples_per_s']:.1f} samples/s, {ratio:.2f}x): their "
                "ranges over repeats overlap")
    return f"{ratio:.2f}x the runner-up {cell_label(other)} ({other['samples_per_s']:.1f} samples/s), ranges apart"


def verdicts(agg, *, tolerance: float = F1_TOLERANCE, include_flagged: bool = False,
             skipped: list[tuple[str, str]] = ()) -> list[Verdict]:
    """One verdict per machine and model of the aggregated frame; skipped: (cell key, reason) of the
    cells a sweep did not run (they lost too: did not fit, or cannot run here)."""
    out = []
    if agg is None or agg.empty:
        return out
    for key, g in agg.groupby(GROUP, sort=True, dropna=False):
        machine, model, model_size = key[0], key[1], key[2]
        rows = g.to_dict("records")
        singles = [r for r in rows if r["strategy"] == "single" and r["devices"] == 1]
        v = Verdict(f"{model}{'' if model_size == 'base' else f' ({model_size})'} on {machine}")
        judged = [(r, _baseline(r, singles)) for r in rows]
        reasons = {id(r): _why_not(r, base, tolerance, include_flagged) for r, base in judged}
        eligible = sorted((rb for rb in judged if reasons[id(rb[0])] is None), key=lambda rb: -rb[0]["samples_per_s"])
        win = None
        if eligible:
            win, base = eligible[0]
            v.winner = cell_label(win)
            line = f"fastest that learns: {v.winner}: {_describe(win, base)}"
            if base is not None and base is not win:
                line += f"; {win['samples_per_s'] / base['samples_per_s']:.2f}x single ({base['samples_per_s']:.1f} samples/s)"
            if len(eligible) > 1:
                line += f"; {_lead(win, eligible[1][0])}"
            v.lines.append(line)
        else:
            v.lines.append("no cell both learned and ran unflagged: no winner (see why each lost below"
                           + ("" if include_flagged else "; --include-flagged lets flagged cells compete") + ")")
        for r, base in judged:
            if r is win:
                continue
            why = reasons[id(r)] or (f"slower: {r['samples_per_s']:.1f} samples/s, "
                                     f"{(1 - r['samples_per_s'] / eligible[0][0]['samples_per_s']) * 100:.0f} % behind")
            v.lines.append(f"lost: {cell_label(r)}: {why}")
        v.lines += [f"not run: {key}: {why}" for key, why in skipped if key.startswith(f"{model}-")]
        if not singles:  # after the headline, which stays the verdict's first line
            v.lines.append("no single-device cell: whether a cell still learns is not checked")
        out.append(v)
    return out


def environment(agg) -> str:
    """The header line: machines, torch and CUDA versions, commits, the newest result's date."""
    if agg is None or agg.empty:
        return "no results"

    def listed(col: str, short: int | None = None, absent: str = "unknown") -> str:
        vals = sorted({str(v)[:short] if short else str(v) for v in agg[col] if v is not None and v == v})
        return ", ".join(vals) or absent

    return (f"machine: {listed('machine')}; torch {listed('torch')}; CUDA {listed('cuda', absent='none')}; "
            f"commit {listed('commit', 9)}; results up to {listed('created', 10).split(', ')[-1]}")


