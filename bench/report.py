"""Results -> pandas: aggregation over repeats, scaling efficiency, tables, plots, reports.

Every number carries its unit in its column name; every efficiency names its baseline cell.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

from emotion_models.atomic import atomic_write_text
from emotion_models.labels import CLASSES

CELL = ["hardware_id", "strategy", "model", "model_size", "precision", "compile", "devices", "scaling",
        "batch_per_device", "dataset", "size", "epochs"]
BASELINE_MATCH = ["hardware_id", "model", "model_size", "precision", "compile", "dataset", "size", "epochs"]
METRICS = ["samples_per_s", "samples_per_s_per_device", "step_ms_p50", "step_ms_p90", "macro_f1", "uar",
           "accuracy", "time_to_target_s", "busy_percent", "peak_mem_mib", "energy_j_per_epoch", "efficiency"]


def machine_label(env: dict) -> str:
    gpus = env.get("gpus") or []
    if gpus:
        names = sorted({g["name"] for g in gpus})
        return f"{len(gpus)}x {', '.join(names)}"
    return f"{env.get('cpu_model', 'CPU')} ({env.get('cpu_cores_logical')} cores)"


def frame(results: list[dict]) -> pd.DataFrame:
    """One row per result file (ok and failed)."""
    rows = []
    for r in results:
        c, e, t, u = r["config"], r["env"], r.get("throughput") or {}, r.get("utilization") or {}
        q = r.get("quality") or {}
        test = q.get("test") or {}
        peak = u.get("peak_allocated_bytes") or u.get("process_rss_peak_bytes")
        busy = u.get("gpu_busy_percent_mean") if u.get("gpu_busy_percent_mean") is not None else u.get("cpu_percent_mean")
        rows.append({
            "run_id": r["run_id"], "status": r["status"], "error": r.get("error"), "path": r.get("_path"),
            "source": r.get("_source") or "", "machine": machine_label(e), "hardware_id": e.get("hardware_id"),
            "torch": e.get("torch"), "strategy": c["strategy"], "model": c["model"],
            "model_size": c.get("model_size", "base"), "precision": c["precision"], "compile": bool(c["compile"]),
            "devices": int(c["devices"]), "device_type": c["device_type"], "nodes": c.get("nodes", 1),
            "scaling": c.get("scaling", "weak"), "batch_per_device": int(c["batch_size_per_device"]),
            "global_batch": int(c["global_batch_size"]), "seed": c.get("seed"), "repeat": c.get("repeat", 0),
            "dataset": str(c["dataset"]), "size": str(c.get("size")), "epochs": int(c["epochs"]),
            "samples_per_s": t.get("samples_per_s"), "samples_per_s_per_device": t.get("samples_per_s_per_device"),
            "step_ms_p50": t.get("step_time_ms_p50"), "step_ms_p90": t.get("step_time_ms_p90"),
            "macro_f1": test.get("macro_f1"), "uar": test.get("uar"), "accuracy": test.get("accuracy"),
            "time_to_target_s": q.get("time_to_target_s"), "target_f1": q.get("target_f1"),
            "busy_percent": busy, "busy_kind": "GPU (NVML)" if u.get("gpu_busy_percent_mean") is not None else "CPU",
            "peak_mem_mib": peak / 2**20 if peak else None,
            "energy_j_per_epoch": u.get("gpu_energy_j_per_epoch"),
            "confusion": test.get("confusion_matrix"),
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for col in METRICS:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["efficiency"] = float("nan")
    df["baseline"] = None
    ok = df[df.status == "ok"]
    singles = ok[(ok.strategy == "single") & (ok.devices == 1)]
    for i, row in ok.iterrows():
        match = singles
        for col in BASELINE_MATCH:
            match = match[match[col] == row[col]]
        # weak: same batch per device; strong: single trained on the same global batch
        want = row.batch_per_device if row.scaling == "weak" else row.global_batch
        match = match[match.batch_per_device == want]
        if match.empty:
            continue
        # the median over the baseline's repeats, not the same repeat's run: on a shared machine
        # one single-device run varies by up to 17 % (measured), more than slow drifts between
        # cells, so pairing repeats made the efficiency noisier, not steadier
        base = match.samples_per_s.median()
        df.at[i, "efficiency"] = row.samples_per_s / (row.devices * base)
        df.at[i, "baseline"] = (f"single {row.precision}{' compiled' if row.compile else ''} 1x "
                                f"b{want} ({base:.1f} samples/s, median of {len(match)})")
    return df


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: medians over repeats, with min, max and relative spread (max - min) / median."""
    ok = df[df.status == "ok"]
    if ok.empty:
        return pd.DataFrame()
    out = []
    for key, g in ok.groupby(CELL, dropna=False, sort=True):
        row = dict(zip(CELL, key))
        row.update({"repeats": len(g), "machine": g.machine.iloc[0], "torch": g.torch.iloc[0],
                    "global_batch": int(g.global_batch.iloc[0]), "baseline": g.baseline.dropna().iloc[0] if g.baseline.notna().any() else None,
                    "busy_kind": g.busy_kind.iloc[0], "source": g.source.iloc[0], "target_f1": g.target_f1.iloc[0],
                    "confusion": g.loc[g.macro_f1.idxmax(), "confusion"] if g.macro_f1.notna().any() else None,
                    "run_ids": ",".join(g.run_id)})
        for m in METRICS:
            vals = g[m].dropna()
            med = float(vals.median()) if len(vals) else float("nan")
            row[m] = med
            row[f"{m}_min"] = float(vals.min()) if len(vals) else float("nan")
            row[f"{m}_max"] = float(vals.max()) if len(vals) else float("nan")
            row[f"{m}_spread"] = (float(vals.max() - vals.min()) / abs(med)) if len(vals) > 1 and med else float("nan")
        out.append(row)
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------- tables

def _f(v, spec=".1f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def _f1(row) -> str:
    if math.isnan(row.macro_f1):
        return "–"
    if row.repeats > 1:
        return f"{row.macro_f1:.3f} ({row.macro_f1_min:.3f}–{row.macro_f1_max:.3f}, n={row.repeats})"
    return f"{row.macro_f1:.3f}"


def _thr(row) -> str:
    if row.repeats > 1:
        return f"{row.samples_per_s:.1f} ±{row.samples_per_s_spread * 50:.0f}%"
    return f"{row.samples_per_s:.1f}"


def main_tables(agg: pd.DataFrame) -> list[tuple[str, list[str], list[list[str]], str]]:
    """NVIDIA DeepLearningExamples-style tables: one per machine, model, strategy and compile flag."""
    tables = []
    if agg.empty:
        return tables
    for (machine, model, strategy, comp), g in agg.groupby(["machine", "model", "strategy", "compile"], sort=True):
        precs = [p for p in ("fp32", "bf16", "fp16") if p in set(g.precision)]
        others = [p for p in precs if p != "fp32"]
        header = ["devices", "batch per device (samples)"]
        header += [f"throughput {p} (samples/s)" for p in precs]
        header += [f"speedup {p}/fp32 (x)" for p in others if "fp32" in precs]
        header += [f"weak-scaling {p}" for p in precs]
        header += ["macro-F1 (median, min–max)", "time to target F1 (s)"]
        rows = []
        notes = set()
        for (devices, batch), gd in g.groupby(["devices", "batch_per_device"], sort=True):
            by = {r.precision: r for r in gd.itertuples()}
            ref = by.get("fp32") or next(iter(by.values()))
            line = [str(devices), str(batch)]
            line += [_thr(by[p]) if p in by else "–" for p in precs]
            line += [_f(by[p].samples_per_s / by["fp32"].samples_per_s, ".2f") if p in by and "fp32" in by else "–"
                     for p in others if "fp32" in precs]
            for p in precs:
                r = by.get(p)
                line.append(_f(r.efficiency, ".2f") if r is not None and r.scaling == "weak" else "–")
                if r is not None and r.baseline:
                    notes.add(f"{p}: {r.baseline}")
            line += [_f1(ref), _f(ref.time_to_target_s, ".1f")]
            rows.append(line)
        title = f"{model} · {strategy}{' · compiled' if comp else ''} · {machine}"
        note = ("weak-scaling = throughput / (devices x throughput of the baseline cell); baselines: "
                + "; ".join(sorted(notes))) if notes else "no single-device baseline in these results: no efficiency"
        tables.append((title, header, rows, note))
    return tables


def results_table(agg: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["cell", "repeats", "throughput (samples/s)", "per device (samples/s)", "step p50 (ms)",
              "efficiency", "macro-F1", "UAR", "busy (%)", "peak memory (MiB)", "energy/epoch (J)"]
    rows = []
    for r in agg.itertuples():
        rows.append([f"{r.model} {r.strategy} {r.devices}x {r.precision}{' compiled' if r.compile else ''} b{r.batch_per_device}",
                     str(r.repeats), _thr(r), _f(r.samples_per_s_per_device), _f(r.step_ms_p50), _f(r.efficiency, ".2f"),
                     _f1(r), _f(r.uar, ".3f"), f"{_f(r.busy_percent, '.0f')} {r.busy_kind}", _f(r.peak_mem_mib, ".0f"),
                     _f(r.energy_j_per_epoch, ".0f")])
    return header, rows


def hardware_comparison(agg: pd.DataFrame, df: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str], list[str]] | None:
    """Side by side cells of the first two machines; (header, rows, warnings, machines)."""
    machines = list(dict.fromkeys(agg.machine)) if not agg.empty else []
    ids = list(dict.fromkeys(agg.hardware_id)) if not agg.empty else []
    if len(ids) < 2:
        return None
    a_id, b_id = ids[0], ids[1]
    a, b = agg[agg.hardware_id == a_id], agg[agg.hardware_id == b_id]
    key = ["strategy", "model", "model_size", "precision", "compile", "devices", "scaling"]
    merged = a.merge(b, on=key, suffixes=("_a", "_b"))
    warnings = []
    ta, tb = set(df[df.hardware_id == a_id].torch), set(df[df.hardware_id == b_id].torch)
    if ta != tb:
        warnings.append(f"torch differs: {', '.join(sorted(ta))} vs {', '.join(sorted(tb))}")
    pa, pb = set(a.precision), set(b.precision)
    if pa != pb:
        warnings.append(f"precisions differ: {', '.join(sorted(pa))} vs {', '.join(sorted(pb))}; only common ones are compared")
    for col, what in (("batch_per_device", "batch per device"), ("size", "dataset size"), ("epochs", "epochs"),
                      ("dataset", "dataset")):
        diff = merged[merged[f"{col}_a"] != merged[f"{col}_b"]]
        if not diff.empty:
            warnings.append(f"{what} differs in {len(diff)} matched cell(s), e.g. {diff.iloc[0][f'{col}_a']} vs "
                            f"{diff.iloc[0][f'{col}_b']}: throughput ratios compare different work")
    if merged.empty:
        warnings.append("no cell ran on both machines with the same strategy, model, precision, compile and devices")
    header = ["cell", "A throughput (samples/s)", "B throughput (samples/s)", "B/A throughput (x)", "A efficiency",
              "B efficiency", "B/A efficiency (x)", "A energy/epoch (J)", "B energy/epoch (J)", "B/A energy (x)",
              "A macro-F1", "B macro-F1", "B-A macro-F1"]

    def ratio(x, y):
        return _f(y / x, ".2f") if x and not math.isnan(x) and not math.isnan(y) else "–"

    rows = []
    for r in merged.itertuples():
        rows.append([f"{r.model} {r.strategy} {r.devices}x {r.precision}{' compiled' if r.compile else ''}",
                     _f(r.samples_per_s_a), _f(r.samples_per_s_b), ratio(r.samples_per_s_a, r.samples_per_s_b),
                     _f(r.efficiency_a, ".2f"), _f(r.efficiency_b, ".2f"), ratio(r.efficiency_a, r.efficiency_b),
                     _f(r.energy_j_per_epoch_a, ".0f"), _f(r.energy_j_per_epoch_b, ".0f"),
                     ratio(r.energy_j_per_epoch_a, r.energy_j_per_epoch_b),
                     _f(r.macro_f1_a, ".3f"), _f(r.macro_f1_b, ".3f"), _f(r.macro_f1_b - r.macro_f1_a, "+.3f")])
    return header, rows, warnings, machines[:2]


# ---------------------------------------------------------------------------------------- plots

def _series_label(r) -> str:
    return f"{r.model} {r.strategy} {r.precision}{' compiled' if r.compile else ''}"


def plot_all(agg: pd.DataFrame, out: Path) -> dict[str, Path | None]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, Path | None] = {}

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    ok = agg[agg.samples_per_s.notna()] if not agg.empty else agg
    # 1. scaling with the ideal linear line
    if not ok.empty:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for _, g in ok.groupby(["machine", "model", "strategy", "precision", "compile"]):
            g = g.sort_values("devices")
            ax.errorbar(g.devices, g.samples_per_s, yerr=[g.samples_per_s - g.samples_per_s_min.fillna(g.samples_per_s),
                        g.samples_per_s_max.fillna(g.samples_per_s) - g.samples_per_s], marker="o",
                        label=_series_label(g.iloc[0]), capsize=3)
        for _, g in ok[(ok.strategy == "single") & (ok.devices == 1)].groupby(["machine", "model", "precision", "compile"]):
            base = g.samples_per_s.iloc[0]
            top = max(ok.devices.max(), 2)
            ax.plot([1, top], [base, base * top], "k--", lw=0.8, alpha=0.5)
        ax.plot([], [], "k--", lw=0.8, label="ideal linear (from single)")
        ax.set_xticks(sorted(set(ok.devices)))
        ax.set_xlabel("devices")
        ax.set_ylabel("throughput (samples/s)")
        ax.set_title("throughput against devices")
        ax.legend(fontsize=7)
        plots["scaling"] = save(fig, "scaling.png")
    # 2. efficiency, weak and strong as measured
    eff = ok[ok.efficiency.notna() & (ok.strategy != "single")] if not ok.empty else ok
    if not eff.empty:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, g in eff.groupby(["machine", "model", "strategy", "precision", "compile", "scaling"]):
            g = g.sort_values("devices")
            ax.plot(g.devices, g.efficiency, marker="o", label=f"{_series_label(g.iloc[0])} ({key[-1]})")
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xticks(sorted(set(eff.devices)))
        ax.set_xlabel("devices")
        ax.set_ylabel("scaling efficiency (throughput / (N x single))")
        ax.set_ylim(0, max(1.1, float(eff.efficiency.max()) * 1.1))
        ax.set_title("scaling efficiency against devices")
        ax.legend(fontsize=7)
        plots["efficiency"] = save(fig, "efficiency.png")
    # 3. precision speedup over fp32 per strategy
    sp = []
    for key, g in ok.groupby(["machine", "model", "strategy", "compile", "devices"]) if not ok.empty else []:
        by = {r.precision: r.samples_per_s for r in g.itertuples()}
        for p in ("bf16", "fp16"):
            if p in by and "fp32" in by:
                sp.append((f"{key[1]} {key[2]} {key[4]}x{' c' if key[3] else ''}", p, by[p] / by["fp32"]))
    if sp:
        fig, ax = plt.subplots(figsize=(7, 4.5))
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
        plots["precision_speedup"] = save(fig, "precision_speedup.png")
    else:
        plots["precision_speedup"] = None
    # 4. throughput against macro-F1 with the Pareto front
    pf = ok[ok.macro_f1.notna()] if not ok.empty else ok
    if not pf.empty:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.scatter(pf.samples_per_s, pf.macro_f1, s=25)
        for r in pf.itertuples():
            ax.annotate(f"{r.strategy} {r.devices}x {r.precision}", (r.samples_per_s, r.macro_f1), fontsize=6)
        front = pf.sort_values("samples_per_s", ascending=False)
        best, pts = -1.0, []
        for r in front.itertuples():
            if r.macro_f1 > best:
                best = r.macro_f1
                pts.append((r.samples_per_s, r.macro_f1))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "r-", lw=1, label="Pareto front (fast and still learning)")
        ax.set_xlabel("throughput (samples/s)")
        ax.set_ylabel("test macro-F1")
        ax.set_title("throughput against test macro-F1")
        ax.legend(fontsize=7)
        plots["pareto"] = save(fig, "pareto.png")
    # 5. utilisation and memory per cell
    if not ok.empty:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5))
        labels = [f"{r.strategy} {r.devices}x {r.precision}" for r in ok.itertuples()]
        a1.barh(labels, ok.busy_percent.fillna(0))
        a1.set_xlabel(f"busy (%, {', '.join(sorted(set(ok.busy_kind)))}; NVML: share of time a kernel ran)")
        a2.barh(labels, ok.peak_mem_mib.fillna(0))
        a2.set_xlabel("peak memory (MiB; GPU allocated, else process RSS)")
        for a in (a1, a2):
            a.tick_params(axis="y", labelsize=7)
        plots["utilization"] = save(fig, "utilization.png")
    # 6. energy per epoch, where measured
    en = ok[ok.energy_j_per_epoch.notna()] if not ok.empty else ok
    if not en.empty:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.barh([f"{r.strategy} {r.devices}x {r.precision}" for r in en.itertuples()], en.energy_j_per_epoch)
        ax.set_xlabel("GPU energy per epoch (J)")
        plots["energy"] = save(fig, "energy.png")
    else:
        plots["energy"] = None
    # 7. confusion matrix of the best cell
    best = ok[ok.macro_f1.notna()].sort_values(["macro_f1", "samples_per_s"], ascending=False) if not ok.empty else ok
    if not best.empty and best.iloc[0].confusion is not None:
        r = best.iloc[0]
        fig, ax = plt.subplots(figsize=(6, 5))
        cm = r.confusion
        ax.imshow(cm, cmap="Blues")
        for i in range(len(cm)):
            for j in range(len(cm)):
                ax.text(j, i, str(cm[i][j]), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
        ax.set_yticks(range(len(CLASSES)), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"best cell: {_series_label(r)} {r.devices}x, macro-F1 {r.macro_f1:.3f} (test clips)")
        plots["confusion"] = save(fig, "confusion.png")
    return plots


# ---------------------------------------------------------------------------------------- writing

def md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(results: list[dict], bad: list[tuple[str, str]], out: str | Path, skipped: list[tuple[str, str]]) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = frame(results)
    agg = aggregate(df) if not df.empty else pd.DataFrame()
    csv_df = df.drop(columns=["confusion"]) if "confusion" in df else df
    atomic_write_text(out / "results.csv", csv_df.to_csv(index=False))
    plots = plot_all(agg, out) if not agg.empty else {}
    sections: list[tuple[str, str, str]] = []  # (title, markdown, html)

    for title, header, rows, note in main_tables(agg):
        sections.append((title, md_table(header, rows) + f"\n\n{note}", html_table(header, rows) + f"<p>{html.escape(note)}</p>"))
    if not agg.empty:
        h, r = results_table(agg)
        sections.append(("every cell", md_table(h, r), html_table(h, r)))
    cmp = hardware_comparison(agg, df) if not agg.empty else None
    if cmp:
        h, r, warnings, machines = cmp
        text = f"A = {machines[0]}, B = {machines[1]}\n\n" + md_table(h, r)
        htm = f"<p>A = {html.escape(machines[0])}, B = {html.escape(machines[1])}</p>" + html_table(h, r)
        if warnings:
            text += "\n\n" + "\n".join(f"- warning: {w}" for w in warnings)
            htm += "<ul>" + "".join(f"<li><b>warning:</b> {html.escape(w)}</li>" for w in warnings) + "</ul>"
        sections.append(("hardware comparison", text, htm))
    failed = df[df.status == "failed"] if not df.empty else df
    if not failed.empty or skipped or bad:
        items = [f"failed: {r.run_id}: {r.error}" for r in failed.itertuples()]
        items += [f"skipped: {k}: {why}" for k, why in skipped]
        items += [f"not a result file: {p}: {why}" for p, why in bad]
        sections.append(("failed, skipped and unreadable", "\n".join(f"- {i}" for i in items),
                         "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"))

    captions = {"scaling": "Throughput against devices, with the ideal linear line from the single-device cell.",
                "efficiency": "Scaling efficiency against devices (weak or strong, as measured).",
                "precision_speedup": "bf16/fp16 throughput over fp32, per strategy and device count.",
                "pareto": "Throughput against test macro-F1: the fast cells that still learn.",
                "utilization": "Busy % (GPU: NVML utilisation rate; CPU runs: whole-machine CPU %) and peak memory.",
                "energy": "GPU energy per epoch.",
                "confusion": "Confusion matrix of the best cell (highest test macro-F1)."}
    md = ["# emotion-bench report", "",
          f"{len(df)} result files, {len(agg)} cells, machines: {', '.join(sorted(set(df.machine))) if not df.empty else 'none'}.",
          "Throughput is global samples/s over the timed window (warmup and evaluation excluded); cells with "
          "repeats show the median and ±half the relative range.", ""]
    body_html = []
    for title, text, htm in sections:
        md += [f"## {title}", "", text, ""]
        body_html.append(f"<h2>{html.escape(title)}</h2>{htm}")
    md += ["## plots", ""]
    body_html.append("<h2>plots</h2>")
    for name, caption in captions.items():
        path = plots.get(name)
        if path is None:
            md += [f"- {name}: not measured in these results", ""]
            body_html.append(f"<p>{name}: not measured in these results</p>")
            continue
        md += [f"![{name}]({path.name})", "", caption, ""]
        b64 = base64.b64encode(path.read_bytes()).decode()
        body_html.append(f"<figure><img src='data:image/png;base64,{b64}' alt='{name}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>emotion-bench report</title><style>{style}</style>"
            f"</head><body><h1>emotion-bench report</h1><p>{html.escape(md[2])}</p>{''.join(body_html)}</body></html>")
    atomic_write_text(out / "report.html", page)
    return {"frame": df, "cells": agg, "plots": {k: v for k, v in plots.items() if v}, "dir": out}
