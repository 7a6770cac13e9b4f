"""`bench compare BASELINE CURRENT`: per-cell change and a noise-aware verdict.

A change counts only when it exceeds both the threshold and k times the spread the baseline
measured in its own repeats ((max - min) over repeats). Without repeats there is no spread,
and the verdict says it is noise-blind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import trust
from .cells import cell_label
from .frame import CELL, GATES, Metric, aggregate, frame

MATCH = [c for c in CELL if c != "hardware_id"]  # a baseline from another machine still matches


@dataclass
class MetricChange:
    metric: Metric
    base: float
    cur: float
    change: float  # relative for relative metrics, absolute otherwise
    allowed: float  # the change that counts: max(threshold, k x baseline spread)
    gated: bool

    @property
    def worse(self) -> bool:
        return self._signed() < -self.allowed

    @property
    def better(self) -> bool:
        return self._signed() > self.allowed

    @property
    def name(self) -> str:
        return self.metric.gate

    def _signed(self) -> float:
        return self.change * self.metric.better

    def text(self) -> str:
        if math.isnan(self.change):
            return "–"
        s = f"{self.change * 100:+.1f}%" if self.metric.relative else f"{self.change:+.3f}"
        mark = " ✗" if self.worse else (" ✓" if self.better else "")
        return s + mark + ("" if self.gated else " (not gated)")


@dataclass
class CellVerdict:
    cell: str
    verdict: str  # regression | improvement | within noise | failed | missing | new
    changes: list[MetricChange] = field(default_factory=list)
    note: str = ""


def compare(baseline: list[dict], current: list[dict], *, max_regression: float = 0.05, max_f1_drop: float = 0.02,
            noise_k: float = 2.0, gate: list[str] | None = None) -> list[CellVerdict]:
    gate = gate or list(GATES)
    bdf, cdf = frame(baseline), frame(current)
    b, c = aggregate(bdf), aggregate(cdf)
    out: list[CellVerdict] = []
    bmap = {tuple(r[k] for k in MATCH): r for r in b.to_dict("records")} if not b.empty else {}
    cmap = {tuple(r[k] for k in MATCH): r for r in c.to_dict("records")} if not c.empty else {}
    failed_cur = {}
    if not cdf.empty:
        for r in cdf[cdf.status != "ok"].to_dict("records"):  # failed, interrupted, diverged
            failed_cur[tuple(r[k] for k in MATCH)] = r
    for key, br in bmap.items():
        if key not in cmap:
            if key in failed_cur:
                r = failed_cur[key]
                out.append(CellVerdict(cell_label(br), "failed", note=f"current run {r['status']}: {r['error']}"))
            else:
                out.append(CellVerdict(cell_label(br), "missing", note="in the baseline only"))
            continue
        changes = [_change(m, br, cmap[key], m.gate in gate, max_regression, max_f1_drop, noise_k) for m in GATES.values()]
        gated = [x for x in changes if x.gated]
        verdict = ("regression" if any(x.worse for x in gated)
                   else "improvement" if any(x.better for x in gated) else "within noise")
        note = "" if br["repeats"] > 1 else "noise-blind: the baseline has no repeats, so no spread to judge noise by"
        flags = [f"{side} flagged: {r['flags']}" for side, r in (("baseline", br), ("current", cmap[key])) if r.get("flags")]
        out.append(CellVerdict(cell_label(br), verdict, changes, trust.joined([note, *flags])))
    for key, cr in cmap.items():
        if key not in bmap:
            out.append(CellVerdict(cell_label(cr), "new", note="in the current results only"))
    return out


def _change(m: Metric, br: dict, cr: dict, gated: bool, max_regression: float, max_f1_drop: float,
            noise_k: float) -> MetricChange:
    """One metric's change and the change that counts: max(threshold, k x the baseline's spread)."""
    col = m.column
    bv, cv = br[col], cr[col]
    if bv is None or cv is None or (isinstance(bv, float) and math.isnan(bv)) or math.isnan(cv):
        return MetricChange(m, bv, cv, float("nan"), 0.0, gated)
    change = (cv - bv) / abs(bv) if m.relative else cv - bv
    threshold = max_regression if m.relative else max_f1_drop
    spread = br[f"{col}_max"] - br[f"{col}_min"]
    noise = noise_k * (spread / abs(bv) if m.relative else spread) if br["repeats"] > 1 else 0.0
    return MetricChange(m, bv, cv, change, max(threshold, noise), gated)


def table_rows(verdicts: list[CellVerdict]) -> tuple[list[str], list[list[str]]]:
    header = (["cell"] + [m.label + ("" if m.relative else " (absolute change)") for m in GATES.values()]
              + ["verdict", "note"])
    rows = []
    for v in verdicts:
        by = {c.name: c.text() for c in v.changes}
        rows.append([v.cell] + [by.get(g, "–") for g in GATES] + [v.verdict, v.note])
    return header, rows


def parse_fraction(text: str) -> float:
    """'5%' or '0.05' -> 0.05."""
    t = text.strip()
    value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    if not 0 <= value < 10:
        raise ValueError(f"{text!r} is not a fraction like 5% or 0.05")
    return value

