"""`bench compare BASELINE CURRENT`: per-cell change and a noise-aware verdict.

A change counts only when it exceeds both the threshold and k times the spread the baseline
measured in its own repeats ((max - min) over repeats). Without repeats there is no spread,
and the verdict says it is noise-blind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .report import CELL, aggregate, frame

MATCH = [c for c in CELL if c != "hardware_id"]  # a baseline from another machine still matches
# name: (column, +1 if higher is better, unit, relative change?)
METRICS: dict[str, tuple[str, int, str, bool]] = {
    "throughput": ("samples_per_s", +1, "samples/s", True),
    "step_time": ("step_ms_p50", -1, "ms", True),
    "efficiency": ("efficiency", +1, "", True),
    "memory": ("peak_mem_mib", -1, "MiB", True),
    "macro_f1": ("macro_f1", +1, "F1 (0-1)", False),
}


@dataclass
class MetricChange:
    name: str
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

    def _signed(self) -> float:
        return self.change * METRICS[self.name][1]

    def text(self) -> str:
        if math.isnan(self.change):
            return "–"
        rel = METRICS[self.name][3]
        s = f"{self.change * 100:+.1f}%" if rel else f"{self.change:+.3f}"
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
    gate = gate or list(METRICS)
    bdf, cdf = frame(baseline), frame(current)
    b, c = aggregate(bdf), aggregate(cdf)
    out: list[CellVerdict] = []
    name = lambda r: (f"{r['model']} {r['strategy']} {r['devices']}x {r['precision']}"  # noqa: E731
                      f"{' compiled' if r['compile'] else ''} b{r['batch_per_device']}")
    bmap = {tuple(r[k] for k in MATCH): r for r in b.to_dict("records")} if not b.empty else {}
    cmap = {tuple(r[k] for k in MATCH): r for r in c.to_dict("records")} if not c.empty else {}
    failed_cur = {}
    if not cdf.empty:
        for r in cdf[cdf.status == "failed"].to_dict("records"):
            failed_cur[tuple(r[k] for k in MATCH)] = r
    for key, br in bmap.items():
        if key not in cmap:
            if key in failed_cur:
                out.append(CellVerdict(name(br), "failed", note=f"current run failed: {failed_cur[key]['error']}"))
            else:
                out.append(CellVerdict(name(br), "missing", note="in the baseline only"))
            continue
        cr = cmap[key]
        changes = []
        for m, (col, _, _, rel) in METRICS.items():
            bv, cv = br[col], cr[col]
            if bv is None or cv is None or (isinstance(bv, float) and math.isnan(bv)) or math.isnan(cv):
                changes.append(MetricChange(m, bv, cv, float("nan"), 0.0, m in gate))
                continue
            change = (cv - bv) / abs(bv) if rel else cv - bv
            threshold = max_regression if rel else max_f1_drop
            noise_aware = br["repeats"] > 1
            spread = br[f"{col}_max"] - br[f"{col}_min"]
            noise = noise_k * (spread / abs(bv) if rel else spread) if noise_aware else 0.0
            changes.append(MetricChange(m, bv, cv, change, max(threshold, noise), m in gate))
        gated = [x for x in changes if x.gated]
        verdict = ("regression" if any(x.worse for x in gated)
                   else "improvement" if any(x.better for x in gated) else "within noise")
        note = "" if br["repeats"] > 1 else "noise-blind: the baseline has no repeats, so no spread to judge noise by"
        out.append(CellVerdict(name(br), verdict, changes, note))
    for key, cr in cmap.items():
        if key not in bmap:
            out.append(CellVerdict(name(cr), "new", note="in the current results only"))
    return out


def table_rows(verdicts: list[CellVerdict]) -> tuple[list[str], list[list[str]]]:
    header = ["cell", "throughput", "step time p50", "efficiency", "peak memory", "macro-F1 (absolute change)", "verdict", "note"]
    rows = []
    for v in verdicts:
        by = {c.name: c.text() for c in v.changes}
        rows.append([v.cell] + [by.get(m, "–") for m in METRICS] + [v.verdict, v.note])
    return header, rows


def parse_fraction(text: str) -> float:
    """'5%' or '0.05' -> 0.05."""
    t = text.strip()
    value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    if not 0 <= value < 10:
        raise ValueError(f"{text!r} is not a fraction like 5% or 0.05")
    return value

