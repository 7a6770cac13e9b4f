"""The report's tables, computed from the aggregated frame: (header, rows) of strings."""
from __future__ import annotations

import math

import pandas as pd

from ..cells import setting_parts, cell_label
from ..frame import METRICS

PRECISIONS = ("fp32", "bf16", "fp16")


def fmt(v, spec=".1f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def fmt_f1(row) -> str:
    if math.isnan(row.macro_f1):
        return "–"
    if row.repeats > 1:
        return f"{row.macro_f1:.3f} ({row.macro_f1_min:.3f}–{row.macro_f1_max:.3f}, n={row.repeats})"
    return f"{row.macro_f1:.3f}"


def fmt_throughput(row) -> str:
    if row.repeats > 1:
        return f"{row.samples_per_s:.1f} ±{row.samples_per_s_spread * 50:.0f}%"
    return f"{row.samples_per_s:.1f}"


SETTINGS = ("pp", "tp", "dp_replicate", "sequence_parallel", "grad_accum", "ac", "offload", "reshard")  # mesh, memory and accumulation columns


def main_tables(agg: pd.DataFrame) -> list[tuple[str, list[str], list[list[str]], str]]:
    """NVIDIA DeepLearningExamples-style tables: one per machine, model, strategy and compile flag.

    (title, header, rows, note); the note names the baseline cell of each efficiency.
    """
    tables = []
    if agg.empty:
        return tables
    thr, t2t = METRICS["samples_per_s"], METRICS["time_to_target_s"]
    # one table per memory and accumulation setting too (--grad-accum, --ac, offload, resharding): their
    # rows would otherwise share a devices x batch line
    keys = ["machine", "model", "strategy", "compile"] + [k for k in SETTINGS if k in agg.columns]
    groups = sorted(agg.groupby(keys, sort=True, dropna=False),
                    key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "single", kv[0][2], kv[0][3], str(kv[0][4:])))
    for key, g in groups:
        machine, model, strategy, comp = key[:4]
        settings = "".join(f" · {part}" for part in setting_parts(g.iloc[0].get))
        precs = [p for p in PRECISIONS if p in set(g.precision)]
        others = [p for p in precs if p != "fp32"]
        header = ["devices", "batch per device (samples)"]
        header += [f"{thr.label} {p} ({thr.unit})" for p in precs]
        header += [f"speedup {p}/fp32 (x)" for p in others if "fp32" in precs]
        header += [f"weak-scaling {p}" for p in precs]
        header += [f"{METRICS['macro_f1'].label} (median, min–max)", t2t.header()]
        rows = []
        notes = set()
        for (devices, batch), gd in g.groupby(["devices", "batch_per_device"], sort=True):
            by = {r.precision: r for r in gd.itertuples()}
            ref = by.get("fp32") or next(iter(by.values()))
            line = [str(devices), str(batch)]
            line += [fmt_throughput(by[p]) if p in by else "–" for p in precs]
            line += [fmt(by[p].samples_per_s / by["fp32"].samples_per_s, ".2f") if p in by and "fp32" in by else "–"
                     for p in others if "fp32" in precs]
            for p in precs:
                r = by.get(p)
                line.append(fmt(r.efficiency, ".2f") if r is not None and r.scaling == "weak" else "–")
                if r is not None and isinstance(r.baseline, str):  # no baseline: None, or NaN once in a frame
                    notes.add(f"{p}: {r.baseline}")
            line += [fmt_f1(ref), fmt(ref.time_to_target_s, t2t.spec)]
            rows.append(line)
        title = f"{model} · {strategy}{' · compiled' if comp else ''}{settings} · {machine}"
        note = ("weak-scaling = throughput / (devices x throughput of the baseline cell); baselines: "
                + "; ".join(sorted(notes))) if notes else "no single-device baseline in these results: no efficiency"
        tables.append((title, header, rows, note))
    return tables


# every cell: these metrics, in this order (throughput and F1 show their spread over repeats)
CELL_COLUMNS = ("samples_per_s", "samples_per_s_per_device", "step_time_ms_p50", "efficiency", "macro_f1", "uar",
                "busy_percent", "peak_mem_mib", "gpu_energy_j_per_epoch")


def results_table(agg: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Every cell, single first, with the trust flags its figures carry (bench/trust.py)."""
    header = ["cell", "repeats"] + [METRICS[c].header() for c in CELL_COLUMNS] + ["flags"]
    special = {"samples_per_s": fmt_throughput, "macro_f1": fmt_f1,
               "busy_percent": lambda r: f"{fmt(r.busy_percent, '.0f')} {r.busy_kind}"}
    rows = []
    for r in single_first(agg).itertuples():
        rows.append([cell_label(r), str(r.repeats)]
                    + [special[c](r) if c in special else fmt(getattr(r, c), METRICS[c].spec) for c in CELL_COLUMNS]
                    + [r.flags or "–"])
    return header, rows


def single_first(agg: pd.DataFrame) -> pd.DataFrame:
    """Cells in reading order: per machine and model, the single baseline first, then by strategy and devices."""
    if agg.empty:
        return agg
    key = agg.strategy != "single"
    return agg.assign(_later=key).sort_values(["machine", "model", "_later", "strategy", "devices", "precision"],
                                              kind="stable").drop(columns="_later")


COMPARE_KEY = ["strategy", "model", "model_size", "precision", "compile", "devices", "scaling"]


def machine_ids(agg: pd.DataFrame) -> dict[str, str]:
    """hardware id -> its machine label, in the order the results came."""
    return dict(zip(agg.hardware_id, agg.machine)) if not agg.empty else {}


def pick_baseline(agg: pd.DataFrame, name: str) -> str:
    """The hardware id a --baseline names (an id, its prefix, or a word of the machine's label);
    ValueError listing the machines where it names none or several."""
    ids = machine_ids(agg)
    found = [i for i, m in ids.items() if str(i).startswith(name)] or [
        i for i, m in ids.items() if name.lower() in str(m).lower()]
    if len(found) != 1:
        listed = "; ".join(f"{i} ({m})" for i, m in ids.items())
        raise ValueError(f"--baseline {name}: names {'no' if not found else 'more than one'} machine of these "
                         f"results; give a hardware id or a word of one: {listed}")
    return found[0]


def hardware_comparison(agg: pd.DataFrame, df: pd.DataFrame, baseline: str | None = None):
    """Machines side by side: (header, rows, warnings, machines) or None below two machines. Two
    machines and no baseline: A and B with their ratios per metric. Three or more, or a baseline
    named (a hardware id): one column per machine, each cell's throughput and its ratio to the
    baseline machine's."""
    ids = list(machine_ids(agg))
    if len(ids) < 2:
        return None
    if baseline is not None or len(ids) > 2:
        return _side_by_side(agg, df, baseline or ids[0])
    machines = list(dict.fromkeys(agg.machine))
    a_id, b_id = ids[0], ids[1]
    a, b = agg[agg.hardware_id == a_id], agg[agg.hardware_id == b_id]
    merged = a.merge(b, on=COMPARE_KEY, suffixes=("_a", "_b"))
    warnings = _comparison_warnings(df, a_id, b_id, a, b, merged)
    compared = [METRICS[c] for c in ("samples_per_s", "efficiency", "gpu_energy_j_per_epoch")]
    f1 = METRICS["macro_f1"]
    header = ["cell"]
    for m in compared:
        header += [f"A {m.header()}", f"B {m.header()}", f"B/A {m.label} (x)"]
    header += [f"A {f1.label}", f"B {f1.label}", f"B-A {f1.label}"]

    def ratio(x, y):
        return fmt(y / x, ".2f") if x and not math.isnan(x) and not math.isnan(y) else "–"

    rows = []
    for r in merged.to_dict("records"):
        line = [cell_label(r, batch=False)]
        for m in compared:
            va, vb = r[f"{m.column}_a"], r[f"{m.column}_b"]
            line += [fmt(va, m.spec), fmt(vb, m.spec), ratio(va, vb)]
        line += [fmt(r["macro_f1_a"], f1.spec), fmt(r["macro_f1_b"], f1.spec), fmt(r["macro_f1_b"] - r["macro_f1_a"], "+.3f")]
        rows.append(line)
    return header, rows, warnings, machines[:2]


def _side_by_side(agg: pd.DataFrame, df: pd.DataFrame, base: str):
    """One column per machine (label and hardware id): samples/s and, beside it, the ratio to the
    base machine's figure for the same cell; a cell a machine did not run shows a dash."""
    ids = machine_ids(agg)
    order = [base] + [i for i in ids if i != base]
    thr = METRICS["samples_per_s"]
    cells: dict[tuple, dict[str, float]] = {}
    rows_of: dict[tuple, dict] = {}
    for r in agg.to_dict("records"):
        k = tuple(r[c] for c in COMPARE_KEY)
        cells.setdefault(k, {})[r["hardware_id"]] = r["samples_per_s"]
        rows_of.setdefault(k, r)
    header = ["cell"] + [f"{ids[i]} [{str(i)[:10]}]{' (baseline)' if i == base else ''} {thr.header()}" for i in order]
    rows = []
    for k, by in cells.items():
        line = [cell_label(rows_of[k], batch=False)]
        ref = by.get(base)
        for i in order:
            v = by.get(i)
            if v is None or math.isnan(v):
                line.append("–")
            elif i == base or not ref or math.isnan(ref):
                line.append(fmt(v, thr.spec))
            else:
                line.append(f"{fmt(v, thr.spec)} ({v / ref:.2f}x)")
        rows.append(line)
    warnings = []
    b = agg[agg.hardware_id == base]
    for i in order[1:]:
        other = agg[agg.hardware_id == i]
        warnings += [f"{ids[i]}: {w}" for w in _comparison_warnings(df, base, i, b, other,
                                                                      b.merge(other, on=COMPARE_KEY, suffixes=("_a", "_b")))]
    return header, rows, warnings, [ids[i] for i in order]


def _comparison_warnings(df, a_id, b_id, a, b, merged) -> list[str]:
    """What differs between the two machines' runs besides the hardware, and changes the comparison."""
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
    return warnings


def where_time_went(agg: pd.DataFrame) -> list[str]:
    """One sentence per profiled cell: its efficiency and where the step's time went.

    "cnn ddp 2x fp32 b16: efficiency 0.91; 5 % exposed all_reduce at 1.2 GB/s busbw, 3 % waiting
    for rank 1, ..."
    """
    lines = []
    for r in agg.itertuples():
        b = r.breakdown
        if not b:
            continue
        share = b["parts_share"]
        colls = b.get("collectives") or {}
        main = max(colls, key=lambda k: colls[k]["transfer_ms_per_step"], default=None)
        bw = colls[main]["busbw_GBps"] if main else None
        said = [f"{share['compute'] * 100:.0f} % compute"]
        if main:
            said.append(f"{share['exposed_comm'] * 100:.0f} % exposed {main}"
                        + (f" at {bw:.2g} GB/s busbw" if bw is not None else ""))
        if share["wait"] > 0.005:
            slowest = b.get("slowest_rank")
            said.append(f"{share['wait'] * 100:.0f} % waiting "
                        + (f"for rank {slowest}" if slowest not in (None, 0) else "in collectives"))
        said.append(f"{share['idle'] * 100:.0f} % idle" + (" (pipeline bubble)" if r.strategy == "pipeline" else ""))
        said.append(f"{share['optimizer'] * 100:.0f} % optimizer")
        eff = f"efficiency {fmt(r.efficiency, '.2f')}; " if r.strategy != "single" else ""
        bubble = b.get("bubble")
        # GPipe and 1F1B: (p-1)/(m+p-1); interleaved: (p-1)/(V m+p-1); zero bubble has no count to show
        formula = "(p-1)/(m+p-1)" if (bubble or {}).get("stages_per_rank", 1) == 1 else "(p-1)/(V m+p-1)"
        tail = ("" if not bubble else
                f" (measured idle {bubble['measured_idle_share']:.2f}; zero bubble: no analytic bubble)"
                if bubble["analytic"] is None else
                f" (bubble {formula} = {bubble['analytic']:.2f}, measured idle {bubble['measured_idle_share']:.2f})")
        lines.append(f"{cell_label(r)}: {eff}{', '.join(said)} of a {b['step_ms']:.1f} ms step{tail}")
    return lines
