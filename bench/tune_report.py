"""What `bench tune` writes: tune.json (every candidate, the trials, the winner and its command),
tune.md (the same as tables) and tune.png (the objective's figure against memory per device, the
front). Every figure is in the objective's unit (tuning.OBJECTIVES: samples/s, or samples/J)."""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from .cells import cell_label
from .tune import Candidate, Trial

def candidate_header(unit: str = "samples/s") -> list[str]:
    return ["candidate", f"predicted ({unit})", f"measured ({unit}, median)", "windows", f"range ({unit})",
            "memory (GiB per device, estimate)", "state"]


def number(value: float) -> str:
    """A figure with the decimals that show it: 1 for samples/s, 3 for samples/J."""
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def check_name(objective: str) -> str:
    """What the winner's learning check is called: parity, or time-to-f1's F1 check."""
    return "the F1 check" if objective == "time-to-f1" else "parity"


def state(c: Candidate, check: str = "parity") -> str:
    if c.pruned:
        return f"pruned: {c.pruned}"
    if c.time_to_f1_s is not None:
        return f"measured, reaches the F1 target in {c.time_to_f1_s:.1f} s of training"
    if c.parity and c.parity != "ok":
        return f"fails {check}: {c.parity}"
    if c.parity == "ok":
        return "measured, passes parity"
    return "measured" if c.windows else ("not measured" + ("" if c.predicted else " (no prediction for it)"))


def candidate_rows(cands: list[Candidate], unit: str = "samples/s",
                   check: str = "parity") -> tuple[list[str], list[list[str]]]:
    """Every candidate, measured first (best first), then the rest by prediction, the pruned last;
    cands is put in the same order, so rows[i] is cands[i]."""
    order = sorted(cands, key=lambda c: (bool(c.pruned), not c.windows, -(c.measured or c.predicted or 0)))
    rows = []
    for c in order:
        mem = c.memory_gib
        rows.append([cell_label(c.cfg, from_config=True), number(c.predicted) if c.predicted else "–",
                     number(c.measured) if c.windows else "", str(len(c.windows)) if c.windows else "",
                     f"{number(min(c.windows))}-{number(max(c.windows))}" if len(c.windows) > 1 else "",
                     f"{mem:.2f}" if mem is not None else "", state(c, check)])
    cands[:] = order
    return candidate_header(unit), rows


def console_rows(cands: list[Candidate], check: str = "parity") -> tuple[list, list[list[str]]]:
    """The candidates measured (in candidate_rows' order) for 80 columns: the label without the
    model (a tune is of one), figures that never wrap, the state in the last column."""
    rows = [[cell_label(c.cfg, from_config=True).split(" ", 1)[1], number(c.predicted) if c.predicted else "–",
             number(c.measured), str(len(c.windows)), f"{c.memory_gib:.2f}" if c.memory_gib is not None else "",
             state(c, check)] for c in cands if c.windows]
    fixed = {"justify": "right", "no_wrap": True}
    return ["candidate", ("predicted", fixed), ("measured", fixed), ("windows", fixed), ("GiB", fixed), "state"], rows


def dry_run_rows(ranked: list[Candidate]) -> tuple[list[str], list[list[str]]]:
    """The top candidates by prediction with rank 0's memory: the estimate, and the parameters its
    fake-process-group rehearsal holds (bench/rehearse.py)."""
    from .rehearse import rehearse

    rows = []
    for c in ranked:
        try:
            r = rehearse(c.cfg, 0, "cuda")
            held = f"{r.params_local / 1e6:,.1f} M of {r.params_total / 1e6:,.1f} M"
        except Exception as exc:  # the rehearsal is a check beside the estimate, never the reason to stop
            held = f"not rehearsed ({type(exc).__name__}: {exc})"[:80]
        mem = c.memory_gib
        rows.append([cell_label(c.cfg, from_config=True).split(" ", 1)[1], f"{c.predicted:.1f}" if c.predicted else "–",
                     f"{mem:.2f}" if mem is not None else "", held])
    fixed = {"justify": "right", "no_wrap": True}
    return ["candidate", ("predicted", fixed), ("GiB", fixed), "parameters rank 0 holds (rehearsed)"], rows


def trial_rows(trials: list[Trial], labels: dict[str, str] | None = None,
               unit: str = "samples/s") -> tuple[list[str], list[list[str]]]:
    """The windows in order; labels: cell key -> a shorter name (the console's), else the keys."""
    name = (lambda k: labels.get(k, k)) if labels else (lambda k: k)
    return (["#", "candidate measured", unit, "incumbent after it", "elapsed (s)"],
            [[str(i + 1), name(t.key), number(t.value), name(t.incumbent) if t.incumbent else "",
              f"{t.elapsed_s:.0f}"] for i, t in enumerate(trials)])


def write(folder: Path, winner: Candidate | None, cands: list[Candidate], trials: list[Trial], stopped: str, anchors,
          rows: tuple[list[str], list[list[str]]], objective: str = "throughput") -> None:
    """tune.json, tune.md and tune.png in folder, each written whole (atomically)."""
    from emotion_models.atomic import atomic_write_text

    from .envinfo import fingerprint
    from .report import md_table
    from .tuning import OBJECTIVES, run_command

    folder.mkdir(parents=True, exist_ok=True)
    unit = OBJECTIVES[objective]
    record = {"kind": "tune", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "env": fingerprint(),
              "objective": objective, "unit": unit, "stopped": stopped, "anchors": anchors.source,
              "winner": winner.key if winner else None, "command": run_command(winner.cfg) if winner else None,
              "measured": sum(1 for c in cands if c.windows), "windows": sum(len(c.windows) for c in cands),
              # anchors measured that are no candidate's window (independent's contention, a batch outside the space)
              "anchor_windows": len(set(getattr(anchors, "windows", {})) - {c.key for c in cands}),
              "candidates": [{"key": c.key, "config": dataclasses.asdict(c.cfg), "pruned": c.pruned,
                              "predicted": c.predicted, "windows": c.windows, "measured": c.measured,
                              "parity": c.parity, "time_to_f1_s": c.time_to_f1_s, "memory_gib": c.memory_gib}
                             for c in cands],
              "trials": [dataclasses.asdict(t) for t in trials]}
    atomic_write_text(folder / "tune.json", json.dumps(record, indent=1))
    lines = ["# bench tune", "", f"- objective: {objective} ({unit})", f"- stopped: {stopped}",
             f"- anchors: {anchors.source}",
             f"- measured: {record['measured']} of {len(cands)} candidates in {record['windows']} windows",
             f"- winner: {winner.key if winner else 'none'}" + (f": `{record['command']}`" if winner else ""), "",
             "## Candidates", "", md_table(*rows), ""]
    if trials:
        lines += ["## Trials, in order", "", md_table(*trial_rows(trials, unit=unit)), ""]
    atomic_write_text(folder / "tune.md", "\n".join(lines))
    _pareto(cands, folder / "tune.png", objective, unit)


def _pareto(cands: list[Candidate], path: Path, objective: str = "throughput", unit: str = "samples/s") -> None:
    """The measured figure (predicted where nothing was measured) against the memory estimate per
    device, with the front: the best candidates for their memory."""
    from .report.plots import _axes

    pts = [(c.memory_gib, c.measured or c.predicted, c) for c in cands
           if not c.pruned and (c.measured or c.predicted) and c.memory_gib is not None]
    if not pts:
        return
    measured = any(c.windows for c in cands)
    if measured:
        pts = [p for p in pts if p[2].windows]
    fig, ax = _axes()
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=20)
    best, front = -1.0, []
    for m, thr, c in sorted(pts, key=lambda p: p[0]):
        if thr > best:
            best = thr
            front.append((m, thr))
            ax.annotate(cell_label(c.cfg, from_config=True).split(" ", 1)[1], (m, thr), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    what = "energy efficiency" if objective == "energy" else "throughput"
    ax.plot([f[0] for f in front], [f[1] for f in front], "r-", lw=1, label="front (best for its memory)")
    ax.set_xlabel("memory per device (GiB, estimate)")
    ax.set_ylabel(("measured" if measured else "predicted") + f" {what} ({unit})")
    ax.set_title(f"bench tune: {what} against memory per device")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def find(paths) -> tuple[list[tuple[str, dict]], list[tuple[str, str]]]:
    """Every tune.json under the given files or folders as (path, record), and (path, why) for one that
    cannot be read: bench report's tune section."""
    found, bad = [], []
    for source in paths:
        p = Path(source)
        for f in sorted(p.rglob("tune.json")) if p.is_dir() else ([p] if p.name == "tune.json" else []):
            try:
                record = json.loads(f.read_text())
                if not isinstance(record, dict) or record.get("kind") != "tune":
                    raise ValueError("not a bench tune record (no kind: tune)")
                from_record(record)  # every candidate reads back as a configuration
                summary(str(f), record)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                bad.append((str(f), f"unreadable tune record: {type(exc).__name__}: {exc}"))
                continue
            found.append((str(f), record))
    return found, bad


def from_record(record: dict) -> list[Candidate]:
    """The candidates of a tune.json, as the search held them."""
    from .config import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return [Candidate(c["key"], RunConfig(**{k: v for k, v in c["config"].items() if k in fields}), c.get("pruned"),
                      c.get("predicted"), list(c.get("windows") or []), c.get("parity"), c.get("time_to_f1_s"),
                      c.get("memory_gib")) for c in record["candidates"]]


def summary(path: str, record: dict) -> str:
    """One line of a tune: its objective, winner and command, what it measured, why it stopped."""
    unit = record.get("unit", "samples/s")
    winner = f"winner {record['winner']}: `{record['command']}`" if record.get("winner") else "no winner"
    return (f"{path}: --objective {record.get('objective', 'throughput')} ({unit}); {winner}; measured "
            f"{record['measured']} of {len(record['candidates'])} candidates in {record['windows']} windows; "
            f"stopped: {record['stopped']}")


def side_by_side(baseline: list[tuple[str, dict]], current: list[tuple[str, dict]]) -> list[str]:
    """bench compare's lines for the tunes of two result sets (find's records): for each model, size and
    objective both tuned, each side's winner and its figure (measured: the median of its windows;
    time-to-f1: the training seconds its F1 check took), their ratio, and the machines."""
    from .frame import machine_label  # the name reports give a machine

    sides = [_winners(found) for found in (baseline, current)]
    lines = []
    for key in sorted(sides[0].keys() | sides[1].keys(), key=str):
        model, size, objective = key
        head = f"tune {model} ({size}) --objective {objective}:"
        if key not in sides[0] or key not in sides[1]:
            lines.append(f"{head} tuned in the {'baseline' if key in sides[0] else 'current'} results only")
            continue
        (rb, wb), (rc, wc) = sides[0][key], sides[1][key]
        fb, fc = (_winner_figure(w, objective) for w in (wb, wc))
        if fb is None or fc is None:
            lines.append(f"{head} no measured winner in the {'baseline' if fb is None else 'current'} tune")
            continue
        unit = "s to the F1 target, lower is better" if objective == "time-to-f1" else rc.get("unit", "samples/s")
        same = "the same configuration wins" if wb["key"] == wc["key"] else "another configuration wins"
        lines.append(f"{head} baseline {wb['key']} {number(fb)} on {machine_label(rb.get('env') or {})}; current "
                     f"{wc['key']} {number(fc)} on {machine_label(rc.get('env') or {})} ({unit}): current / baseline "
                     f"{fc / fb:.3f} ({_basis(wb, objective)} against {_basis(wc, objective)}: no interval, not a "
                     f"verdict); {same}")
    return lines


def _winners(found: list[tuple[str, dict]]) -> dict[tuple[str, str, str], tuple[dict, dict | None]]:
    """(model, size, objective) -> (the newest such tune record, its winner's candidate entry or None)."""
    out = {}
    for _, record in sorted(found, key=lambda pr: pr[1].get("created") or ""):
        cands = {c["key"]: c for c in record["candidates"]}
        winner = cands.get(record.get("winner"))
        cfg = (winner or next(iter(cands.values()), {"config": {}}))["config"]
        out[(cfg.get("model"), cfg.get("model_size", "base"), record.get("objective", "throughput"))] = (record, winner)
    return out


def _basis(winner: dict, objective: str) -> str:
    """What a winner's figure rests on: its F1 check's one run, or the median of its windows."""
    return "one training run" if objective == "time-to-f1" else f"median of {len(winner.get('windows') or [])} windows"


def _winner_figure(winner: dict | None, objective: str) -> float | None:
    if winner is None:
        return None
    if objective == "time-to-f1":
        return winner.get("time_to_f1_s")
    windows = winner.get("windows") or []
    return statistics.median(windows) if windows else None
