"""`bench history DIR...`: the regression gate's figures over commits, and where they stepped.

Each CI gate (`bench ab --json-out`, `.ci/run`) leaves one JSON file of verdicts: per cell and
metric, head / base with its 95 % interval. This module reads a folder of them and, per cell and
metric, orders the points by commit (git's order where the repository knows the commits, else by
time), finds the change points, and says for each the commit range it lies in and the size of the
step.

Change points: ruptures (a maintained library of offline change-point methods; numpy and scipy
only), PELT with a least-squares cost on the log ratios, which finds the segmentation that
minimises the squared deviations from each segment's mean plus a penalty per change point. The
penalty is 4 sigma^2 ln n, sigma a point's noise: the median standard error the gates' own
intervals give, or the median absolute difference between neighbouring points (over 0.6745 x
sqrt 2) where that is larger (a noise between CI runs that no single gate sees). On 30 simulated
points with 3 % noise this found a 10 % step at its commit in 92 % of 200 series and no change in
every one of 200 flat ones (a trial with numpy's generator); tests/test_history.py runs 10 seeds
of each (9 and 10 of 10). Apache Otava, built
for exactly this, was the other candidate: it pins numpy 2.2 and pulls in BigQuery, Postgres and
Slack clients.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .ab import JUDGED, t975

PENALTY_K = 4.0  # the penalty per change point, in sigma^2 ln n


class HistoryError(ValueError):
    """Nothing to read, or a flag that cannot be used; the message is the one line users see."""


@dataclass
class Point:
    commit: str | None
    created: str
    ratio: float  # head / base
    low: float | None
    high: float | None
    pairs: int
    verdict: str
    source: str  # the gate file
    machine: str | None = None  # the gate machine's hardware id

    @property
    def flagged(self) -> bool:
        """Weak evidence: the gate could not tell."""
        return self.verdict == "inconclusive"

    @property
    def log_se(self) -> float | None:
        """The standard error of log(ratio) that the gate's interval implies."""
        if self.low is None or self.high is None or self.low <= 0 or self.pairs < 2:
            return None
        return math.log(self.high / self.low) / (2 * t975(self.pairs - 1))


@dataclass
class Change:
    index: int  # the first point of the new segment
    before: str | None  # the last commit of the old segment
    after: str | None  # the first commit of the new one
    step: float  # the new segment's mean over the old one's, less 1 (head / base ratios)


@dataclass
class Series:
    cell: str
    metric: str
    points: list[Point] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    sigma: float | None = None  # the noise of a point the penalty was set from (log ratio)

    @property
    def better(self) -> int:
        return JUDGED[self.metric][1] if self.metric in JUDGED else +1

    @property
    def flags(self) -> str:
        """Why this series' points may not mean what they seem (bench/trust.py), in words."""
        from . import trust

        return trust.joined([trust.machines_differ([p.machine for p in self.points]),
                             trust.inconclusive_gates([p.verdict for p in self.points])])

    def newest_regression(self, threshold: float) -> Change | None:
        """The change into the newest segment, where it made the metric worse by more than threshold."""
        if not self.changes:
            return None
        last = self.changes[-1]
        worse = last.step < -threshold if self.better > 0 else last.step > threshold
        return last if worse else None


def load_gates(dirs: list[str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every gate file (kind "gate") under the folders or files given, and (file, why) for the JSON
    files that are not one."""
    gates, skipped = [], []
    for d in dirs:
        p = Path(d)
        if not p.exists():
            raise HistoryError(f"{d}: no such file or folder; pass folders of gate files (bench ab --json-out)")
        for f in sorted(p.rglob("*.json") if p.is_dir() else [p]):
            try:
                g = json.loads(f.read_text())
            except (OSError, ValueError) as exc:
                skipped.append((str(f), f"not JSON ({exc})"))
                continue
            if not isinstance(g, dict) or g.get("kind") != "gate" or not isinstance(g.get("verdicts"), list):
                skipped.append((str(f), "not a gate file (bench ab --json-out)"))
                continue
            g["_source"] = str(f)
            gates.append(g)
    return gates, skipped


def commit_order(repo: Path | None) -> dict[str, int]:
    """Each commit's position in the repository's history, oldest first (empty without a repository)."""
    if repo is None:
        return {}
    got = subprocess.run(["git", "rev-list", "--topo-order", "--reverse", "--all"], cwd=repo, capture_output=True,
                         text=True)
    if got.returncode != 0:
        return {}
    return {c: i for i, c in enumerate(got.stdout.split())}


def build(gates: list[dict], *, metrics: list[str] | None = None, cells: list[str] | None = None,
          repo: Path | None = None) -> list[Series]:
    """The series per cell and metric, in commit order (ties, and commits git does not know, by time)."""
    order = commit_order(repo)

    def key(g: dict):
        commit = (g.get("head") or {}).get("commit")
        return (order.get(commit, len(order)) if order else 0, g.get("created_utc", ""))

    by: dict[tuple[str, str], Series] = {}
    for g in sorted(gates, key=key):
        for v in g["verdicts"]:
            if v.get("ratio") is None or v.get("metric") == "macro_f1":
                continue
            if (metrics and v["metric"] not in metrics) or (cells and v["cell"] not in cells):
                continue
            s = by.setdefault((v["cell"], v["metric"]), Series(v["cell"], v["metric"]))
            s.points.append(Point((g.get("head") or {}).get("commit"), g.get("created_utc", ""), v["ratio"],
                                  v.get("low"), v.get("high"), int(v.get("pairs") or 0), v.get("verdict", ""),
                                  g["_source"], (g.get("fingerprint") or {}).get("hardware_id")))
    return [by[k] for k in sorted(by)]


def noise(points: list[Point]) -> float | None:
    """A point's noise in log ratio: the gates' own standard errors, or the spread between neighbours
    where that is larger."""
    se = [p.log_se for p in points if p.log_se]
    logs = [math.log(p.ratio) for p in points]
    diffs = [abs(b - a) for a, b in zip(logs, logs[1:])]
    candidates = []
    if se:
        candidates.append(statistics.median(se))
    if len(diffs) >= 3:
        candidates.append(statistics.median(diffs) / (0.6745 * math.sqrt(2)))
    return max(candidates) if candidates else None


def find_changes(series: Series) -> None:
    """Fill series.changes (and sigma) from its points."""
    n = len(series.points)
    series.sigma = noise(series.points)
    if n < 4 or not series.sigma:
        return
    import numpy as np
    import ruptures

    logs = np.array([math.log(p.ratio) for p in series.points]).reshape(-1, 1)
    ends = ruptures.Pelt(model="l2", min_size=2, jump=1).fit(logs).predict(
        pen=PENALTY_K * series.sigma**2 * math.log(n))[:-1]
    bounds = [0, *ends, n]
    for (a, b), c in zip(zip(bounds, bounds[1:]), zip(bounds[1:], bounds[2:])):
        before, after = logs[a:b].mean(), logs[c[0]:c[1]].mean()
        series.changes.append(Change(b, series.points[b - 1].commit, series.points[b].commit,
                                     math.exp(after - before) - 1))


def history(dirs: list[str], *, metrics: list[str] | None = None, cells: list[str] | None = None,
            repo: Path | None = None) -> tuple[list[Series], list[tuple[str, str]]]:
    gates, skipped = load_gates(dirs)
    if not gates:
        raise HistoryError(f"no gate files under {', '.join(dirs)} (bench ab --json-out writes them; .ci/run's "
                           "go to results/gates/)")
    unknown = sorted(set(metrics or []) - set(JUDGED))
    if unknown:
        raise HistoryError(f"--metric {', '.join(unknown)}: choose from {', '.join(JUDGED)}")
    series = build(gates, metrics=metrics, cells=cells, repo=repo)
    if not series:
        raise HistoryError("no series: the gate files hold none of the cells or metrics asked for")
    for s in series:
        find_changes(s)
    return series, skipped


def short(commit: str | None) -> str:
    return commit[:7] if commit else "?"


def rows(series: list[Series], threshold: float) -> tuple[list[str], list[list[str]]]:
    header = ["cell", "metric", "gates", "newest head/base (95 % CI)", "change points (commit: step)", "verdict",
              "flags"]
    out = []
    for s in series:
        p = s.points[-1]
        newest = (f"{(p.ratio - 1) * 100:+.1f}% [{(p.low - 1) * 100:+.1f}, {(p.high - 1) * 100:+.1f}]"
                  if p.low is not None and p.high is not None else f"{(p.ratio - 1) * 100:+.1f}%")
        changes = "; ".join(f"at {short(c.after)} (after {short(c.before)}): {c.step * 100:+.1f}%"
                            for c in s.changes) or "none"
        worse = s.newest_regression(threshold)
        verdict = (f"regression since {short(worse.after)}" if worse else
                   "too few points" if len(s.points) < 4 or not s.sigma else "no regression in the newest segment")
        out.append([s.cell, s.metric, str(len(s.points)), newest, changes, verdict, s.flags or "–"])
    return header, out


def plot(series: list[Series], metric: str, threshold: float, path: Path) -> Path | None:
    """Head/base over commits for one metric, every cell: each gate's interval, its change points."""
    chosen = [s for s in series if s.metric == metric]
    if not chosen:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for s in chosen:
        x = list(range(len(s.points)))
        y = [(p.ratio - 1) * 100 for p in s.points]
        lo = [(p.ratio - (p.low if p.low is not None else p.ratio)) * 100 for p in s.points]
        hi = [((p.high if p.high is not None else p.ratio) - p.ratio) * 100 for p in s.points]
        line = ax.errorbar(x, y, yerr=[lo, hi], marker="o", ms=3, capsize=2, label=s.cell)
        for c in s.changes:
            ax.axvline(c.index - 0.5, color=line[0].get_color(), ls="--", lw=0.8)
        weak = [(i, v) for i, (v, p) in enumerate(zip(y, s.points)) if p.flagged]
        if weak:
            ax.scatter([i for i, _ in weak], [v for _, v in weak], s=90, facecolors="none", edgecolors="red",
                       linewidths=1.0, zorder=3)
    if any(p.flagged for s in chosen for p in s.points):
        ax.scatter([], [], s=90, facecolors="none", edgecolors="red", label="ringed: inconclusive gate")
    for t in (-threshold, threshold):
        ax.axhline(t * 100, color="grey", lw=0.6, ls=":")
    ax.axhline(0, color="black", lw=0.5)
    labels = [short(p.commit) for p in chosen[0].points]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_xlabel("head commit (in commit order)")
    ax.set_ylabel(f"{JUDGED[metric][0]}: head / base - 1 (%)")
    ax.set_title(f"bench history: {metric}; dashed: change points; dotted: +-{threshold * 100:g} %")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(series: list[Series], skipped: list[tuple[str, str]], out: str, threshold: float) -> list[Path]:
    """history.md, history.html (plots embedded), history.csv and one PNG per metric in out."""
    import pandas as pd

    from emotion_models.atomic import atomic_write_text

    from .report.render import Bullets, Figure, Para, Section, Table, write as render

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    header, table = rows(series, threshold)
    figures = []
    for metric in dict.fromkeys(s.metric for s in series):
        path = plot(series, metric, threshold, folder / f"history_{metric}.png")
        figures.append(Figure(metric, path, f"{JUDGED[metric][0]}, head / base per gate, 95 % intervals"))
    sections = [Section("Series", [Table(header, table),
                                   Para("Change points: ruptures' PELT on the log ratios, penalty 4 sigma^2 ln n "
                                        "(sigma: the gates' median standard error, or the spread between "
                                        "neighbours where larger). A step is the new segment's mean over the "
                                        "old one's.")]),
                Section("Trends", figures)]
    if skipped:
        sections.append(Section("Files that are not gate files", [Bullets([f"{f}: {why}" for f, why in skipped])]))
    render(folder, "bench history", [f"{sum(len(s.points) for s in series)} points in {len(series)} series; "
                                     f"threshold {threshold * 100:g} %"], sections, stem="history")
    flat = [{"cell": s.cell, "metric": s.metric, "commit": p.commit, "created_utc": p.created, "ratio": p.ratio,
             "low": p.low, "high": p.high, "pairs": p.pairs, "verdict": p.verdict, "machine": p.machine,
             "source": p.source}
            for s in series for p in s.points]
    atomic_write_text(folder / "history.csv", pd.DataFrame(flat).to_csv(index=False))
    return [folder / "history.md", folder / "history.html", folder / "history.csv"] + [f.path for f in figures if f.path]
