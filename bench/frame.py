"""Result files as a pandas frame: the one table of metrics, one row per run, scaling efficiency,
and aggregation over repeats. Report, compare and the console table all read `METRICS`.

To add a metric: add one `Metric` row here (its column, where the result file holds it or how it
is derived, label, unit and which direction is better); the report's tables, the CSV and `bench
compare` pick it up from this table.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import trust

if TYPE_CHECKING:  # imported where used: a run's summary table reads METRICS, not pandas (0.36 s)
    import pandas as pd


@dataclass(frozen=True)
class Metric:
    column: str  # the frame's column and the CSV's: the result file's key where it is read directly
    label: str  # what tables call it
    unit: str  # "" for ratios and scores
    better: int  # +1 higher is better, -1 lower is better, 0 neither
    read: Callable[[dict], float | None] | None  # result -> value; None: derived from other rows (efficiency)
    relative: bool = True  # bench compare judges a relative change (False: absolute, e.g. F1)
    gate: str | None = None  # its name in `bench compare --gate`
    spec: str = ".1f"  # how tables format it

    def header(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label


def _at(*path: str) -> Callable[[dict], float | None]:
    def read(r: dict):
        for key in path:
            r = (r or {}).get(key)
        return r

    return read


def _busy(r: dict):
    u = r.get("utilization") or {}
    gpu = u.get("gpu_busy_percent_mean")
    return gpu if gpu is not None else u.get("cpu_percent_mean")


def _peak_mem_mib(r: dict):
    u = r.get("utilization") or {}
    peak = u.get("peak_allocated_bytes") or u.get("process_rss_peak_bytes")
    return peak / 2**20 if peak else None


METRICS: dict[str, Metric] = {m.column: m for m in [
    Metric("samples_per_s", "throughput", "samples/s", +1, _at("throughput", "samples_per_s"), gate="throughput"),
    Metric("samples_per_s_per_device", "per device", "samples/s", +1, _at("throughput", "samples_per_s_per_device")),
    Metric("step_time_ms_p50", "step p50", "ms", -1, _at("throughput", "step_time_ms_p50"), gate="step_time"),
    Metric("step_time_ms_p90", "step p90", "ms", -1, _at("throughput", "step_time_ms_p90")),
    Metric("efficiency", "efficiency", "", +1, None, gate="efficiency", spec=".2f"),
    Metric("busy_percent", "busy", "%", 0, _busy, spec=".0f"),
    Metric("peak_mem_mib", "peak memory", "MiB", -1, _peak_mem_mib, gate="memory", spec=".0f"),
    Metric("gpu_energy_j_per_epoch", "energy/epoch", "J", -1, _at("utilization", "gpu_energy_j_per_epoch"), spec=".0f"),
    Metric("macro_f1", "macro-F1", "", +1, _at("quality", "test", "macro_f1"), relative=False, gate="macro_f1", spec=".3f"),
    Metric("uar", "UAR", "", +1, _at("quality", "test", "uar"), relative=False, spec=".3f"),
    Metric("accuracy", "accuracy", "", +1, _at("quality", "test", "accuracy"), relative=False, spec=".3f"),
    Metric("time_to_target_s", "time to target F1", "s", -1, _at("quality", "time_to_target_s")),
    # with --profile: shares of the profiled step (rank 0), bench/breakdown.py
    *[Metric(f"{part}_share", label, "", -1 if part != "compute" else 0, _at("breakdown", "parts_share", part), spec=".2f")
      for part, label in (("compute", "compute share"), ("exposed_comm", "exposed communication share"),
                          ("wait", "waiting share"), ("idle", "idle/bubble share"), ("optimizer", "optimizer share"))],
]}
GATES: dict[str, Metric] = {m.gate: m for m in METRICS.values() if m.gate}

# what makes two runs the same cell (repeats aggregate over it)
CELL = ["hardware_id", "strategy", "model", "model_size", "precision", "compile", "devices", "scaling",
        "batch_per_device", "grad_accum", "ac", "offload", "reshard", "tp", "dp_replicate", "pp", "sequence_parallel", "dataset", "size", "epochs"]
# what a cell shares with the `single` run that is its efficiency's baseline: its accumulation and
# checkpointing too, so efficiency measures the parallelism alone (K micro-steps amortise the optimiser
# step, and AC's recompute is not a cost of scaling); a cell whose single lacks them gets none
BASELINE_MATCH = ["hardware_id", "model", "model_size", "precision", "compile", "grad_accum", "ac", "dataset", "size",
                  "epochs"]


def machine_label(env: dict) -> str:
    gpus = env.get("gpus") or []
    if gpus:
        names = sorted({g["name"] for g in gpus})
        return f"{len(gpus)}x {', '.join(names)}"
    return f"{env.get('cpu_model', 'CPU')} ({env.get('cpu_cores_logical')} cores)"


def _row(r: dict) -> dict:
    c, e, q = r["config"], r["env"], r.get("quality") or {}
    u = r.get("utilization") or {}
    row = {
        "run_id": r["run_id"], "status": r["status"], "error": r.get("error"), "path": r.get("_path"),
        "source": r.get("_source") or "", "machine": machine_label(e), "hardware_id": e.get("hardware_id"),
        "torch": e.get("torch"), "strategy": c["strategy"], "model": c["model"],
        "model_size": c.get("model_size", "base"), "precision": c["precision"], "compile": bool(c["compile"]),
        "devices": int(c["devices"]), "device_type": c["device_type"], "nodes": c.get("nodes", 1),
        "scaling": c.get("scaling", "weak"), "batch_per_device": int(c["batch_size_per_device"]),
        "global_batch": int(c["global_batch_size"]), "seed": c.get("seed"), "repeat": c.get("repeat", 0),
        # the memory and accumulation settings (results before them ran with these defaults)
        "grad_accum": int(c.get("grad_accum") or 1), "ac": c.get("ac") or "none", "offload": bool(c.get("offload")),
        "reshard": c.get("reshard_after_forward") or "auto",
        "tp": int(c.get("tp") or 1), "dp_replicate": int(c.get("dp_replicate") or 1), "pp": int(c.get("pp") or 1),
        # tensor parallel's sequence parallel (True where no tensor parallel: nothing to tell apart);
        # a tp result without the key predates it, and ran without
        "sequence_parallel": bool(c.get("sequence_parallel", False)) if c["strategy"] == "tp" or int(c.get("tp") or 1) > 1
        else True,
        "dataset": str(c["dataset"]), "size": str(c.get("size")), "epochs": int(c["epochs"]),
        "target_f1": q.get("target_f1"),
        "busy_kind": "GPU (NVML)" if u.get("gpu_busy_percent_mean") is not None else "CPU",
        "confusion": (q.get("test") or {}).get("confusion_matrix"),
        "breakdown": r.get("breakdown"),
        "threads": c.get("threads"), "steps": (r.get("timing") or {}).get("steps"),
        "cuda": e.get("cuda"), "commit": (e.get("git") or {}).get("commit"), "created": r.get("created_utc"),
        "flags": trust.joined(trust.result_flags(r)),  # "; "-joined, in words
    }
    row.update({m.column: m.read(r) for m in METRICS.values() if m.read})
    return row


def frame(results: list[dict]) -> pd.DataFrame:
    """One row per result file (ok and failed), every metric of METRICS a column."""
    import pandas as pd

    df = pd.DataFrame([_row(r) for r in results])
    if df.empty:
        return df
    for col in METRICS:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return with_efficiency(df)


def with_efficiency(df: pd.DataFrame) -> pd.DataFrame:
    """Scaling efficiency of every ok row: throughput / (devices x throughput of its `single` baseline).

    Weak scaling: the baseline trained the same batch per device; strong: the same global batch.
    The `baseline` column says which cell it was.
    """
    df["efficiency"] = float("nan")
    df["baseline"] = None
    ok = df[df.status == "ok"]
    singles = ok[(ok.strategy == "single") & (ok.devices == 1)]
    for i, row in ok.iterrows():
        if row.strategy == "tp-rank":  # a model of other shapes: no efficiency against single's
            continue
        match = singles
        for col in BASELINE_MATCH:
            match = match[match[col] == row[col]]
        want = row.batch_per_device if row.scaling == "weak" else row.global_batch
        match = match[match.batch_per_device == want]
        if match.empty:
            continue
        # the median over the baseline's repeats, not the same repeat's run: on a shared machine
        # one single-device run varies by up to 17 % (measured), more than slow drifts between
        # cells, so pairing repeats made the efficiency noisier, not steadier
        base = match.samples_per_s.median()
        df.at[i, "efficiency"] = efficiency = row.samples_per_s / (row.devices * base)
        extra = (f" ga{int(row.grad_accum)}" if row.grad_accum > 1 else "") + (f" ac-{row.ac}" if row.ac != "none" else "")
        df.at[i, "baseline"] = (f"single {row.precision}{' compiled' if row.compile else ''} 1x "
                                f"b{want}{extra} ({base:.1f} samples/s, median of {len(match)})")
        if row.strategy != "single":
            b = match.iloc[0]
            extra = trust.baseline_flags(row.threads, b.threads, efficiency) + [trust.steps_flag(row.steps, b.steps)]
            df.at[i, "flags"] = trust.joined([row["flags"], *extra])
    return df


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: medians over repeats, with min, max and relative spread (max - min) / median."""
    import pandas as pd

    ok = df[df.status == "ok"] if not df.empty else df
    if ok.empty:
        return pd.DataFrame()
    out = []
    for key, g in ok.groupby(CELL, dropna=False, sort=True):
        row = dict(zip(CELL, key))
        row.update({"repeats": len(g), "machine": g.machine.iloc[0], "torch": g.torch.iloc[0],
                    "global_batch": int(g.global_batch.iloc[0]),
                    "baseline": g.baseline.dropna().iloc[0] if g.baseline.notna().any() else None,
                    "busy_kind": g.busy_kind.iloc[0], "source": g.source.iloc[0], "target_f1": g.target_f1.iloc[0],
                    "confusion": g.loc[g.macro_f1.idxmax(), "confusion"] if g.macro_f1.notna().any() else None,
                    "breakdown": next((b for b in g.breakdown if b), None),
                    "run_ids": ",".join(g.run_id),
                    "cuda": g.cuda.iloc[0], "commit": g.commit.iloc[0], "created": max((t for t in g.created if isinstance(t, str)), default=None)})
        for m in METRICS:
            vals = g[m].dropna()
            med = float(vals.median()) if len(vals) else float("nan")
            row[m] = med
            row[f"{m}_min"] = float(vals.min()) if len(vals) else float("nan")
            row[f"{m}_max"] = float(vals.max()) if len(vals) else float("nan")
            row[f"{m}_spread"] = (float(vals.max() - vals.min()) / abs(med)) if len(vals) > 1 and med else float("nan")
        row["flags"] = trust.joined([*g["flags"], trust.spread_flag(row["samples_per_s_spread"])])
        out.append(row)
    return pd.DataFrame(out)
