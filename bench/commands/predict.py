"""`bench predict`: step time, throughput and efficiency at N devices, from measured results and links."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..ui import console, info, table
from .common import fail, load_or_fail, nonempty_out, parse_link, split_csv


def predict(
    results_dir: str = typer.Argument(..., help="Result folder with single runs (and, for overlap and wait, profiled "
                                                "runs; for contention, independent runs)."),
    devices: str = typer.Option("1,2,4,8,16,64", "--gpus", "--devices", help="Comma-separated device counts N."),
    per_node: int = typer.Option(8, help="Devices per node: N above it spans nodes (data parallel through --inter-link)."),
    strategies: str = typer.Option("ddp,fsdp,pipeline", help="Comma-separated strategies to predict: ddp, fsdp, hsdp, "
                                                             "tp, pipeline; fsdp:tp2 is 2-D (FSDP2 over N / 2 x TP "
                                                             "2), hsdp:rep2 two replicas (default: one per node)."),
    link: Optional[str] = typer.Option(None, help="Intra-node link: a preset (nvlink4, pcie4, pcie5, ib-ndr, 100gbe) or a "
                                                  "bench comm result (file or folder). Default: a bench comm result "
                                                  "under RESULTS_DIR; GPU results without one assume nvlink4 and say so."),
    inter_link: str = typer.Option("ib-ndr", help="Inter-node link: a preset or a bench comm result."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Predict with K micro-steps per optimiser step "
                                                           "(communication once per K)."),
    ac: str = typer.Option("none", "--ac", help="Predict with activation checkpointing: none, full, selective "
                                                "(a measured single run with it, else one more forward)."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for predict.md and predict.png (default: tables "
                                                          "on the console only).", callback=nonempty_out),
):
    """Predict step time, throughput and efficiency at N devices from measured results and link figures."""
    from ..predict import check, check_table, inputs_from, measured_cells, prediction_table, write_markdown

    intra, inter, counts, kinds = _options(devices, per_node, strategies, link, inter_link)
    if grad_accum < 1:
        fail(f"--grad-accum {grad_accum}: give 1 or more micro-steps per optimiser step")
    from ..config import AC_MODES

    if ac not in AC_MODES:
        fail(f"--ac {ac} is not one of {', '.join(AC_MODES)}")
    results, _ = load_or_fail([results_dir])
    inputs = inputs_from(results)
    if not inputs:
        fail(f"no ok single-device result under {results_dir}: predict needs the single run's step time")
    if intra is None:
        intra = _link_beside(results_dir, results)
    predicted = prediction_table(inputs, kinds, counts, per_node, intra, inter, measured_cells(results, grad_accum, ac),
                                 grad_accum=grad_accum, ac=ac)
    console.print(table(*narrow(predicted, {"cell": "cell", "devices": "N", "nodes": "nodes", "step (ms)": "ms/step",
                                            "throughput (samples/s)": "samples/s", "efficiency": "eff."}),
                        justify="right"))
    checked = check(results, intra, inter)
    measured = check_table(checked)
    if measured[2]:
        console.print(table(*narrow(measured, {"cell": "cell", "devices": "N", "measured (samples/s)": "measured",
                                               "predicted (samples/s)": "predicted", "error": "error"}),
                            justify="right"))
    if out is None:
        info("predict: tables only (pass --out DIR for predict.md and predict.png)")
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    write_markdown(Path(out) / "predict.md", predicted, measured)
    from ..report.plots import prediction

    prediction(inputs, kinds, counts, per_node, intra, inter, checked, Path(out) / "predict.png")
    info(f"predict: {Path(out) / 'predict.md'}, {Path(out) / 'predict.png'}")


def narrow(tab: tuple[str, list[str], list[list[str]]], keep: dict[str, str]) -> tuple[str, list, list[list[str]]]:
    """A table for 80 columns: the columns named in keep under their short headers (units in the
    caption), the others as 'name value' in a last column that wraps; predict.md keeps them all."""
    title, header, rows = tab
    idx = [header.index(k) for k in keep]
    rest = [i for i in range(len(header)) if i not in idx]
    out = []
    for r in rows:
        terms = "; ".join(f"{header[i]} {r[i]}" for i in rest if r[i] not in ("", "–"))
        out.append([r[i] for i in idx] + [terms])
    shown = [short if short == "cell" else (short, {"no_wrap": True}) for short in keep.values()]
    return title, [*shown, ("model terms, notes", {"justify": "left"})], out


def _link_beside(results_dir: str, results: list[dict]):
    """The intra-node link when --link is not given: the newest bench comm result under the results'
    folder on the same kind of device; else a preset, said in one line with why it may differ from
    the hardware measured: nvlink4 for GPU results, 100gbe for CPU results (the slowest preset; none
    describes CPU workers, and an H100's link would flatter them by two orders of magnitude)."""
    from ..comm import load
    from ..predict import Link

    kinds = {r["config"].get("device_type") for r in results if r["status"] == "ok"}
    found = []
    for path in sorted(Path(results_dir).rglob("*.comm.json")):
        try:
            comm = load(str(path))
        except (OSError, ValueError):
            continue
        if comm["config"].get("device_type") in kinds:
            found.append(comm)
    if found:
        chosen = Link.measured(max(found, key=lambda c: c["run_id"]))  # run ids start with their UTC time
        info(f"link: measured beside the results: {chosen.source}")
        return chosen
    if "cpu" in kinds:
        assumed = Link.named("100gbe")
        info(f"link: no bench comm result under {results_dir}; assumed the 100gbe preset ({assumed.source}) for CPU "
             "results, though no preset describes CPU workers: take the communication terms as a shape, not a "
             f"figure, or run `bench comm --gpus 2 --device cpu --out {Path(results_dir) / 'comm'}` first")
        return assumed
    gpus = sorted({g["name"] for r in results for g in (r.get("env") or {}).get("gpus") or []}) or ["unknown GPUs"]
    assumed = Link.named("nvlink4")
    info(f"link: no bench comm result under {results_dir}; assumed the nvlink4 preset ({assumed.source}) for "
         f"results measured on {', '.join(gpus)}, which may have another link: pass --link, or run bench comm "
         "on these GPUs")
    return assumed


def _options(devices: str, per_node: int, strategies: str, link: str, inter_link: str):
    """(intra-node link, inter-node link, device counts, strategies); exit 2 on a bad option."""
    try:
        intra, inter = parse_link(link), parse_link(inter_link)
        counts = split_csv(devices, int) or []
        if not counts or min(counts) < 1 or per_node < 1:
            raise ValueError("--gpus: give device counts of 1 or more, and --per-node 1 or more")
        from ..predict import PREDICTED
        from ..strategies import parse_cell

        kinds = split_csv(strategies) or []
        bad = [k for k in kinds if not _predictable(k, PREDICTED, parse_cell)]
        if bad:
            raise ValueError(f"--strategies: no model for {bad}; use {', '.join(PREDICTED)}, with fsdp:tpT, "
                             "hsdp:repR, hsdp:repR:tpT or pipeline:ppP for a mesh")
    except ValueError as exc:
        fail(str(exc))
    return intra, inter, counts, kinds


def _predictable(cell: str, predicted, parse_cell) -> bool:
    """Whether bench predict has a model for a cell name: a strategy it covers, and a mesh only where
    the model reads one (fsdp / hsdp: tpT, repR; pipeline: ppP), no schedule."""
    strategy, mesh, schedule = parse_cell(cell)
    if strategy not in predicted or ":" not in cell:
        return strategy in predicted
    allowed = {"fsdp": {"tp", "dp_replicate"}, "hsdp": {"tp", "dp_replicate"}, "pipeline": {"pp"}}.get(strategy, set())
    changed = {d for d, v in mesh.items() if v != 1}
    return schedule is None and bool(changed) and changed <= allowed
