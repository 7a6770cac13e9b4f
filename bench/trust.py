"""Trust flags: why a figure may not mean what it seems, in words, computed once and shown with it.

A flag does not change a figure; it travels with it (the run's console table, the report's tables
and verdict) so a reader sees the reason beside the number. Each rule lives here once: the run's
own warnings (bench.lifecycle) and the report's flags (bench.frame) call the same functions.
"""
from __future__ import annotations

MIN_STEPS = 10  # fewer timed steps than this make an unstable figure
SPREAD_LIMIT = 0.10  # repeats further apart than this ((max - min) / median) are noise, not a figure
EFFICIENCY_LIMIT = 1.02  # weak-scaling efficiency above this is not N devices' work; 2 % for noise


def oversubscribed(device_type: str, processes: int, threads: int, cores: int) -> str | None:
    """Worker processes x threads that share fewer CPU cores than they use."""
    if device_type == "cpu" and processes * threads > cores:
        return (f"oversubscribed: {processes} process(es) x {threads} thread(s) share {cores} cores, so throughput "
                "and efficiency are not those of as many devices (use fewer --gpus or --threads)")
    return None


def few_steps(steps: int | None) -> str | None:
    if steps is None or steps >= MIN_STEPS:
        return None
    return (f"only {steps} timed step(s): too few for a stable figure (raise --epochs or --max-steps, or lower "
            "--warmup-steps)")


LOAD_FACTOR = 1.25  # runnable threads per core above which the machine was busier than the run alone
STEAL_LIMIT = 5.0  # % of CPU time a hypervisor gave to other guests


def busy_machine(load_avg: float | None, steal: float | None, processes: int, threads: int, cores: int) -> str | None:
    """Load from outside the run during its timed window: a load average beyond what the run's own
    threads and the cores explain, or CPU time stolen by other guests of a VM. The 1-minute load
    average lags by design, so a short run reads the minute before it too."""
    own = min(processes * threads, cores)
    if load_avg is not None and load_avg > max(own, cores) * LOAD_FACTOR:
        return (f"busy machine: load average {load_avg:.1f} on {cores} cores during the run (the run's own threads "
                f"explain {own}): other work shared the cores, throughput is low")
    if steal is not None and steal > STEAL_LIMIT:
        return f"busy machine: {steal:.0f} % of CPU time stolen by other guests of this VM during the run"
    return None


def result_flags(r: dict) -> list[str]:
    """The flags a result file carries on its own: oversubscribed cores, too few timed steps, a busy
    machine."""
    if r.get("status") != "ok":
        return []
    c, e, u = r["config"], r.get("env") or {}, r.get("utilization") or {}
    processes = max(1, int(c.get("world_size") or 1) // max(1, int(c.get("nodes") or 1)))
    threads, cores = int(c.get("threads") or 1), int(e.get("cpu_cores_logical") or 1)
    flags = [oversubscribed(c.get("device_type", "cpu"), processes, threads, cores),
             few_steps((r.get("throughput") or {}).get("measured_steps")),
             busy_machine(u.get("load_avg_1m_mean"), u.get("cpu_steal_percent_mean"), processes, threads, cores)]
    return [f for f in flags if f]


def _known(x) -> bool:
    return x is not None and x == x  # None or NaN (a frame's missing value): not known


def baseline_flags(cell_threads, base_threads, efficiency: float) -> list[str]:
    """What makes an efficiency against its `single` baseline suspect."""
    flags = []
    if _known(cell_threads) and _known(base_threads) and int(cell_threads) != int(base_threads):
        flags.append(f"baseline differs: single ran {int(base_threads)} thread(s) per process, this cell "
                     f"{int(cell_threads)}, so the efficiency compares unlike processes")
    if efficiency == efficiency and efficiency > EFFICIENCY_LIMIT:  # not NaN
        flags.append(f"efficiency {efficiency:.2f} above 1: N devices did more than N times single's work, which "
                     "points at the baseline (more threads per process, a busier moment, a cold cache), not at "
                     "the strategy")
    return flags


def spread_flag(spread: float) -> str | None:
    if spread == spread and spread > SPREAD_LIMIT:
        return f"repeats {spread * 100:.0f} % apart (over {SPREAD_LIMIT * 100:.0f} %): the median is noise-bound"
    return None


def steps_flag(cell_steps, base_steps) -> str | None:
    """F1 is comparable between cells that took as many optimiser steps."""
    if not (_known(cell_steps) and _known(base_steps)) or int(cell_steps) == int(base_steps):
        return None
    return (f"{int(cell_steps)} optimiser steps against single's {int(base_steps)} (a larger global batch at the "
            "same epochs): its F1 is not single's at equal training")


def machines_differ(ids: list[str | None]) -> str | None:
    """Gates (or results) from more than one machine in one series: a step may be the machine's."""
    seen = sorted({i for i in ids if i})
    if len(seen) < 2:
        return None
    return (f"{len(seen)} machines ({', '.join(seen)}): a step between them may be the machine, not the commit "
            "(pass bench history one machine's gate folder)")


def inconclusive_gates(verdicts: list[str]) -> str | None:
    k = sum(v == "inconclusive" for v in verdicts)
    if not k:
        return None
    return f"{k} of {len(verdicts)} gate(s) inconclusive: their points rest on intervals wider than the threshold"


SEP = "; "  # no flag's text holds it


def joined(flags) -> str:
    """Flags (texts, already joined texts, or None) as one text, each once, in order."""
    parts = [p for f in flags if f for p in str(f).split(SEP)]
    return SEP.join(dict.fromkeys(p for p in parts if p))


def split(text) -> list[str]:
    return [p for p in str(text or "").split(SEP) if p]
