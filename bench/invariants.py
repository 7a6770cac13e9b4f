"""What must hold of a GPU run's result, checked one invariant at a time: the verdicts of
benchmarks/gpu_check.py, the acceptance test of the CUDA paths.

Each check returns a Check: ok (True / False), or None where it cannot tell, with the reason in
words ("window too short for NVML's power samples"), never a silent pass.
"""
from __future__ import annotations

from dataclasses import dataclass

ENERGY_TOLERANCE = 0.25  # energy against mean power x timed window
MEMORY_TOLERANCE = 0.30  # torch's measured training peak against the estimate's training bytes
MIN_POWER_SAMPLES = 10  # NVML power samples inside the timed windows for a mean power worth comparing


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: this result cannot tell
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "ok", False: "FAIL", None: "cannot tell"}[self.ok]


def _gpu_memory(result: dict) -> int | None:
    gpus = (result.get("env") or {}).get("gpus") or []
    return min(g["memory_bytes"] for g in gpus) if gpus else None


def status(result: dict, expect: str = "ok") -> Check:
    got = result.get("status")
    return Check("status", got == expect, f"{got}" + (f" ({result.get('error')})" if got != "ok" else "")
                 + ("" if got == expect else f", expected {expect}"))


def mfu(result: dict) -> Check:
    f = result.get("flops") or {}
    value = f.get("mfu")
    if value is None:
        return Check("0 < MFU < 1", False, f"no MFU: {f.get('peak_source')}")
    return Check("0 < MFU < 1", 0 < value < 1, f"{value * 100:.2f} % of {f.get('peak_tflops_per_device')} TFLOP/s "
                                                f"({f.get('peak_source')})")


def busy(result: dict) -> Check:
    value = (result.get("utilization") or {}).get("gpu_busy_percent_mean")
    if value is None:
        return Check("busy % in [0, 100]", False, "NVML reported no utilisation")
    return Check("busy % in [0, 100]", 0 <= value <= 100, f"{value:.1f} %")


def energy(result: dict) -> Check:
    """Energy over the timed windows against mean power x their length, where the windows held
    enough power samples for a mean."""
    name = f"energy within {ENERGY_TOLERANCE:.0%} of power x window"
    u, t = result.get("utilization") or {}, result.get("throughput") or {}
    joules, watts, window_s = u.get("gpu_energy_j"), u.get("gpu_power_w_mean"), t.get("timed_window_s")
    if joules is None or watts is None:
        return Check(name, False, f"NVML reported no {'energy' if joules is None else 'power'}")
    samples = u.get("samples_in_windows")
    if samples is None or samples < MIN_POWER_SAMPLES:
        return Check(name, None, f"{samples or 0} power samples in a {window_s:.2f} s window (at least "
                                 f"{MIN_POWER_SAMPLES} needed): too short to compare; energy {joules:.1f} J")
    expected = watts * window_s
    off = joules / expected - 1 if expected else float("inf")
    return Check(name, abs(off) <= ENERGY_TOLERANCE, f"{joules:.1f} J against {watts:.0f} W x {window_s:.2f} s = "
                                                     f"{expected:.1f} J ({off:+.0%}; {u.get('gpu_energy_source')})")


def memory(result: dict) -> list[Check]:
    """The training peak under the card's memory, and within MEMORY_TOLERANCE of the estimate."""
    u = result.get("utilization") or {}
    peak, card = u.get("peak_allocated_bytes"), _gpu_memory(result)
    gib = 2**30
    if peak is None:
        return [Check("peak memory under the card's", False, "no torch peak allocated recorded")]
    out = [Check("peak memory under the card's", card is not None and peak < card,
                 f"{peak / gib:.2f} GiB of {card / gib:.1f} GiB" if card else f"{peak / gib:.2f} GiB, card unknown")]
    mem = result.get("memory") or {}
    est = (mem.get("estimate") or {}).get("training_bytes")
    ratio = mem.get("training_measured_over_estimated")
    name = f"peak within {MEMORY_TOLERANCE:.0%} of the estimate"
    if not est or ratio is None:
        out.append(Check(name, False, f"no estimate recorded ({mem.get('error', 'no memory section')})"))
    else:
        out.append(Check(name, abs(ratio - 1) <= MEMORY_TOLERANCE,
                         f"measured {peak / gib:.2f} GiB, estimated {est / gib:.2f} GiB (x{ratio:.2f}; "
                         f"outside torch's allocator {_gib((mem.get('measured') or {}).get('outside_allocator_bytes'))})"))
    return out


def _gib(value) -> str:
    return f"{value / 2**30:.2f} GiB" if value is not None else "not measured"


def interrupted(result: dict) -> list[Check]:
    """SIGINT mid-window: interrupted, its measured steps kept."""
    steps = (result.get("throughput") or {}).get("measured_steps") or 0
    return [status(result, "interrupted"),
            Check("steps kept", steps > 0 and len(result.get("losses") or []) > 0,
                  f"{steps} timed steps, {len(result.get('losses') or [])} losses")]


def out_of_memory(result: dict) -> list[Check]:
    """A planted out-of-memory error: a failed result whose error is the one OOM line."""
    error = result.get("error") or ""
    return [status(result, "failed"),
            Check("the one-line OOM result", error.startswith("out of memory at step") and "\n" not in error
                  and "--strategy fsdp" in error, error[:120])]


def of_run(result: dict) -> list[Check]:
    """Every invariant of a run that finished."""
    return [status(result), mfu(result), busy(result), energy(result), *memory(result)]


def sharding_saves_memory(single: dict, sharded: dict) -> Check:
    """fsdp xN's training peak below single's, for the same model."""
    a = (single.get("utilization") or {}).get("peak_allocated_bytes")
    b = (sharded.get("utilization") or {}).get("peak_allocated_bytes")
    n = (sharded.get("config") or {}).get("devices")
    if a is None or b is None:
        return Check(f"fsdp x{n} peak below single's", False, "a peak is missing")
    return Check(f"fsdp x{n} peak below single's", b < a, f"{b / 2**30:.2f} GiB against {a / 2**30:.2f} GiB")
