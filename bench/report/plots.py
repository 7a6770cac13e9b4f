"""The report's figures: one function per figure, each drawing from the cells that have throughput
and returning None when these results hold nothing for it."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from emotion_models.labels import CLASSES

from ..cells import cell_label, series_label
from ..frame import METRICS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes(size=(7, 4.5)):
    return _plt().subplots(figsize=size)


FLAGGED = "ringed: flagged (the table's flags column says why)"


def _flagged(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that carry a trust flag (bench/trust.py). df["flags"], never df.flags: pandas' own."""
    return df[df["flags"].fillna("").astype(str).str.len() > 0] if "flags" in df.columns else df.iloc[0:0]


def _ring(ax, df: pd.DataFrame, x: str, y: str) -> None:
    """A red ring around each flagged point, and one legend entry for them all."""
    fl = _flagged(df)
    if not fl.empty:
        ax.scatter(fl[x], fl[y], s=180, facecolors="none", edgecolors="red", linewidths=1.3, zorder=4, label=FLAGGED)


def _bar_labels(df: pd.DataFrame) -> list[str]:
    """Cell labels for a bar chart, a flagged cell's marked in words."""
    marked = set(_flagged(df).index)
    return [cell_label(r, batch=False) + (" (flagged)" if i in marked else "") for i, r in zip(df.index, df.itertuples())]


def scaling(ok: pd.DataFrame):
    """Throughput against devices, with the ideal linear line from each single-device cell."""
    fig, ax = _axes()
    for _, g in ok.groupby(["machine", "model", "strategy", "precision", "compile"]):
        g = g.sort_values("devices")
        ax.errorbar(g.devices, g.samples_per_s, yerr=[g.samples_per_s - g.samples_per_s_min.fillna(g.samples_per_s),
                    g.samples_per_s_max.fillna(g.samples_per_s) - g.samples_per_s], marker="o",
                    label=series_label(g.iloc[0]), capsize=3)
    for _, g in ok[(ok.strategy == "single") & (ok.devices == 1)].groupby(["machine", "model", "precision", "compile"]):
        base = g.samples_per_s.iloc[0]
        top = max(ok.devices.max(), 2)
        ax.plot([1, top], [base, base * top], "k--", lw=0.8, alpha=0.5)
    ax.plot([], [], "k--", lw=0.8, label="ideal linear (from single)")
    _ring(ax, ok, "devices", "samples_per_s")
    ax.set_xticks(sorted(set(ok.devices)))
    ax.set_xlabel("devices")
    ax.set_ylabel(METRICS["samples_per_s"].header())
    ax.set_title("throughput against devices")
    ax.legend(fontsize=7)
    return fig


def efficiency(ok: pd.DataFrame):
    """Scaling efficiency against devices, weak or strong as measured."""
    eff = ok[ok.efficiency.notna() & (ok.strategy != "single")]
    if eff.empty:
        return None
    fig, ax = _axes()
    for key, g in eff.groupby(["machine", "model", "strategy", "precision", "compile", "scaling"]):
        g = g.sort_values("devices")
        ax.plot(g.devices, g.efficiency, marker="o", label=f"{series_label(g.iloc[0])} ({key[-1]})")
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    _ring(ax, eff, "devices", "efficiency")
    ax.set_xticks(sorted(set(eff.devices)))
    ax.set_xlabel("devices")
    ax.set_ylabel("scaling efficiency (throughput / (N x single))")
    ax.set_ylim(0, max(1.1, float(eff.efficiency.max()) * 1.1))
    ax.set_title("scaling efficiency against devices")
    ax.legend(fontsize=7)
    return fig


def precision_speedup(ok: pd.DataFrame):
    """bf16/fp16 throughput over fp32, per strategy and device count."""
    sp = []
    for key, g in ok.groupby(["machine", "model", "strategy", "compile", "devices"]):
        by = {r.precision: r.samples_per_s for r in g.itertuples()}
        for p in ("bf16", "fp16"):
            if p in by and "fp32" in by:
                sp.append((f"{key[1]} {key[2]} {key[4]}x{' c' if key[3] else ''}", p, by[p] / by["fp32"]))
    if not sp:
        return None
    fig, ax = _axes()
    labels = list(dict.fromkeys(s[0] for s in sp))
    for j, p in enumerate(("bf16", "fp16")):
        vals = {s[0]: s[2] for s in sp if s[1] == p}
        if vals:
            ax.bar([i + j * 0.4 for i, lab in enumerate(labels)], [vals.get(lab, 0) for lab in labels], 0.4, label=p)
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speedup over fp32 (x)")
    ax.set_title("precision speedup")
    ax.legend()
    return fig


def pareto(ok: pd.DataFrame):
    """Throughput against test macro-F1, with the Pareto front: the fast cells that still learn."""
    pf = ok[ok.macro_f1.notna()]
    if pf.empty:
        return None
    fig, ax = _axes()
    ax.scatter(pf.samples_per_s, pf.macro_f1, s=25)
    for r in pf.itertuples():  # labels beside their markers, not on them
        ax.annotate(f"{r.strategy} {r.devices}x {r.precision}", (r.samples_per_s, r.macro_f1), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")
    best, pts = -1.0, []
    for r in pf.sort_values("samples_per_s", ascending=False).itertuples():
        if r.macro_f1 > best:
            best = r.macro_f1
            pts.append((r.samples_per_s, r.macro_f1))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "r-", lw=1, label="Pareto front (fast and still learning)")
    _ring(ax, pf, "samples_per_s", "macro_f1")
    ax.set_xlabel(METRICS["samples_per_s"].header())
    ax.set_ylabel("test macro-F1")
    ax.set_title("throughput against test macro-F1")
    ax.legend(fontsize=7)
    return fig


def memory_pareto(ok: pd.DataFrame):
    """Throughput against peak memory per device, every cell labelled with its memory settings
    (--ac, --grad-accum, offload, resharding): the trade activation checkpointing and the rest buy.
    The front: the fastest cells for their memory (up and to the left is better)."""
    pm = ok[ok.peak_mem_mib.notna() & ok.samples_per_s.notna()]
    if pm.empty:
        return None
    fig, ax = _axes()
    ax.scatter(pm.peak_mem_mib, pm.samples_per_s, s=25)
    for r in pm.itertuples():
        ax.annotate(cell_label(r, batch=True).split(" ", 1)[1], (r.peak_mem_mib, r.samples_per_s), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")
    best, pts = -1.0, []
    for r in pm.sort_values("peak_mem_mib").itertuples():
        if r.samples_per_s > best:
            best = r.samples_per_s
            pts.append((r.peak_mem_mib, r.samples_per_s))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "r-", lw=1, label="front (fastest for its memory)")
    _ring(ax, pm, "peak_mem_mib", "samples_per_s")
    ax.set_xlabel("peak memory per device (MiB; GPU allocated, else process RSS)")
    ax.set_ylabel(METRICS["samples_per_s"].header())
    ax.set_title("throughput against peak memory (the --ac, --grad-accum and FSDP trades)")
    ax.legend(fontsize=7)
    return fig


def utilization(ok: pd.DataFrame):
    """Busy % and peak memory per cell."""
    fig, (a1, a2) = _plt().subplots(1, 2, figsize=(10, 4.5))
    labels = _bar_labels(ok)
    busy = a1.barh(labels, ok.busy_percent.fillna(0))
    a1.bar_label(busy, fmt="%.0f %%", fontsize=7, padding=2)
    a1.set_xlabel(f"busy (%, {', '.join(sorted(set(ok.busy_kind)))}; NVML: share of time a kernel ran)")
    a1.set_title("how busy the devices were")
    mem = a2.barh(labels, ok.peak_mem_mib.fillna(0))
    a2.bar_label(mem, fmt="%.0f MiB", fontsize=7, padding=2)
    a2.set_xlabel("peak memory (MiB; GPU allocated, else process RSS)")
    a2.set_title("peak memory per device")
    for a in (a1, a2):
        a.tick_params(axis="y", labelsize=8)
        a.margins(x=0.25)  # room for the values at the bars' ends
    return fig


def energy(ok: pd.DataFrame):
    """GPU energy per epoch, where measured."""
    en = ok[ok.gpu_energy_j_per_epoch.notna()]
    if en.empty:
        return None
    fig, ax = _axes()
    bars = ax.barh(_bar_labels(en), en.gpu_energy_j_per_epoch)
    ax.bar_label(bars, fmt="%.0f J", fontsize=7, padding=2)
    ax.margins(x=0.2)
    ax.set_xlabel(f"GPU {METRICS['gpu_energy_j_per_epoch'].header()}")
    ax.set_title("GPU energy per epoch")
    return fig


def confusion(ok: pd.DataFrame):
    """The confusion matrix of the best cell (highest test macro-F1)."""
    best = ok[ok.macro_f1.notna()].sort_values(["macro_f1", "samples_per_s"], ascending=False)
    if best.empty or best.iloc[0].confusion is None:
        return None
    r = best.iloc[0]
    fig, ax = _axes((6, 5))
    cm = r.confusion
    image = ax.imshow(cm, cmap="Blues")
    top = max(max(row) for row in cm) or 1
    for i in range(len(cm)):
        for j in range(len(cm)):  # white on the dark half of the colour map, black on the light half
            ax.text(j, i, str(cm[i][j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i][j] > top / 2 else "black")
    fig.colorbar(image, ax=ax, label="test clips")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    flags = r.get("flags")
    marked = " (flagged)" if isinstance(flags, str) and flags else ""
    ax.set_title(f"best cell: {cell_label(r, batch=False)}{marked}, macro-F1 {r.macro_f1:.3f} (test clips)")
    return fig


def breakdown(ok: pd.DataFrame):
    """Efficiency against devices beside where each profiled cell's step went (stacked, ms)."""
    from ..breakdown import PARTS

    prof = ok[ok.breakdown.notna()]
    if prof.empty:
        return None
    fig, (a1, a2) = _plt().subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    eff = ok[ok.efficiency.notna() & (ok.strategy != "single")]
    for _, g in eff.groupby(["machine", "model", "strategy", "precision", "compile", "scaling"]):
        g = g.sort_values("devices")
        a1.plot(g.devices, g.efficiency, marker="o", label=series_label(g.iloc[0]))
    a1.axhline(1.0, color="k", ls="--", lw=0.8)
    a1.set_xlabel("devices")
    a1.set_ylabel("scaling efficiency")
    a1.set_title("efficiency")
    _ring(a1, eff, "devices", "efficiency")
    if not eff.empty:
        a1.legend(fontsize=7)
    labels = _bar_labels(prof)
    left = [0.0] * len(prof)
    for part in PARTS:
        ms = [b["parts_ms"][part] for b in prof.breakdown]
        if any(ms):
            a2.barh(labels, ms, left=left, label=part)
            left = [x + y for x, y in zip(left, ms)]
    a2.set_xlabel("profiled step, rank 0 (ms)")
    a2.set_title("where a step's time goes")
    a2.tick_params(axis="y", labelsize=7)
    a2.legend(fontsize=7)
    return fig


# name (the PNG's stem) -> (figure function, caption)
FIGURES: dict[str, tuple[Callable[[pd.DataFrame], object], str]] = {
    "scaling": (scaling, "Throughput against devices, with the ideal linear line from the single-device cell."),
    "efficiency": (efficiency, "Scaling efficiency against devices (weak or strong, as measured)."),
    "precision_speedup": (precision_speedup, "bf16/fp16 throughput over fp32, per strategy and device count."),
    "pareto": (pareto, "Throughput against test macro-F1: the fast cells that still learn."),
    "memory_pareto": (memory_pareto, "Throughput against peak memory per device, each cell labelled with its "
                                     "memory settings (--ac, --grad-accum, offload, resharding)."),
    "utilization": (utilization, "Busy % (GPU: NVML utilisation rate; CPU runs: whole-machine CPU %) and peak memory."),
    "energy": (energy, "GPU energy per epoch."),
    "confusion": (confusion, "Confusion matrix of the best cell (highest test macro-F1)."),
    "breakdown": (breakdown, "Efficiency beside where each profiled cell's step goes (bench run --profile): compute, "
                             "optimizer, exposed communication, waiting for the slowest rank, idle or pipeline bubble."),
}


def plot_all(agg: pd.DataFrame, out: Path) -> dict[str, Path | None]:
    """Every figure as out/<name>.png; None for a figure these results hold nothing for."""
    ok = agg[agg.samples_per_s.notna()] if not agg.empty else agg
    plots: dict[str, Path | None] = {}
    for name, (draw, _) in FIGURES.items():
        fig = draw(ok) if not ok.empty else None
        if fig is None:
            plots[name] = None
            continue
        plots[name] = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(plots[name], dpi=110)
        _plt().close(fig)
    return plots


def prediction(inputs, strategies, counts, per_node, intra, inter, checked, path: Path) -> None:
    """Predicted efficiency curves against devices, the measured cells on them as points."""
    from ..predict import predict

    fig, ax = _axes()
    flagged: list[tuple[float, float]] = []
    for inp in inputs:
        for s in strategies:
            ns = [n for n in sorted(set(counts)) if not (s == "pipeline" and n > inp.blocks)]
            eff = [predict(inp, s, n, max(1, -(-n // per_node)), intra, inter)["efficiency"] for n in ns]
            line, = ax.plot(ns, eff, "--", label=f"{inp.model} {s} {inp.precision} (predicted)")
            pts = [c for c in checked if c["strategy"] == s and c["model"] == inp.model and c["precision"] == inp.precision
                   and c.get("grad_accum", 1) == 1 and c.get("ac", "none") == "none"]  # the curves' own settings
            if pts:
                ax.plot([c["devices"] for c in pts], [c["measured"] / (c["devices"] * inp.single_throughput) for c in pts],
                        "o", color=line.get_color(), label=f"{inp.model} {s} {inp.precision} (measured)")
                flagged.extend((c["devices"], c["measured"] / (c["devices"] * inp.single_throughput)) for c in pts
                               if c.get("flags"))
    if flagged:
        ax.scatter([x for x, _ in flagged], [y for _, y in flagged], s=180, facecolors="none", edgecolors="red",
                   linewidths=1.3, zorder=4, label="ringed: flagged (the check table's flags column says why)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"devices ({per_node} per node)")
    ax.set_ylabel("weak-scaling efficiency")
    ax.set_ylim(0, 1.1)
    ax.set_title("predicted scaling (bench predict), measured points")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
