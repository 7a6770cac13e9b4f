"""The result file: one JSON per run, written atomically. Schema notes: results/README.md."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from emotion_models.atomic import atomic_write_text

SCHEMA = 1

REQUIRED: dict[str, tuple] = {
    "schema": (int,),
    "run_id": (str,),
    "status": (str,),
    "config": (dict,),
    "env": (dict,),
    "throughput": (dict,),
    "utilization": (dict,),
    "quality": (dict,),
    "timing": (dict,),
    "losses": (list,),
}
CONFIG_KEYS = ("strategy", "devices", "device_type", "nodes", "model", "precision", "compile",
               "batch_size_per_device", "global_batch_size", "epochs", "seed", "dataset")
THROUGHPUT_KEYS = ("samples_per_s", "samples_per_s_per_device", "step_time_ms_p50", "step_time_ms_p90")
TEST_KEYS = ("accuracy", "macro_f1", "uar", "per_class", "confusion_matrix")


# JSON files that live beside results but are not results: a sweep's manifest, bench tune's record, state,
# anchors, job and time-to-f1 target
NOT_RESULTS = {"sweep.json", "tune.json", "tune-state.json", "anchors.json", "tune-job.json", "f1-target.json"}
# ok: finished, every figure measured; failed: did not finish (error says why); interrupted: SIGINT
# or SIGTERM, what was measured until then; diverged: the loss stopped being finite, likewise;
# skipped: a sweep cell that cannot run on this machine (in the sweep's manifest, with the reason)
STATUSES = ("ok", "failed", "interrupted", "diverged", "skipped")


# ---------------------------------------------------------------------------- the typed run summary
# What the measured loop returns on rank 0; each dataclass serialises to the result file's keys,
# in this order.

@dataclass
class Throughput:
    samples_per_s: float  # global samples per second over the timed window
    samples_per_s_per_device: float
    step_time_ms_p50: float  # per step the slowest rank's time
    step_time_ms_p90: float
    step_time_ms_mean: float | None
    measured_steps: int  # steps inside the timed window
    warmup_steps: int
    timed_window_s: float
    timed_samples: int


@dataclass
class RankUsage:
    rank: int
    peak_allocated_bytes: int | None  # CUDA allocator peak; None on CPU
    peak_rss_bytes: int
    gpu_busy_percent_mean: float | None
    gpu_energy_j: float | None
    # this rank's own step time p50 (ms), before the slowest rank sets each step's time: where ranks
    # never wait for each other (independent), their spread is the jitter every synchronisation pays
    own_step_time_ms_p50: float | None = None
    gpu_power_w_mean: float | None = None  # this rank's GPUs together, W
    # each GPU this rank computes on (several for dp and model-parallel): index, busy %, memory used
    # peak (NVML), power, energy over the timed windows, torch's peak allocated; None on CPU
    per_device: list[dict] | None = None


@dataclass
class Utilization:
    num_samples: int  # monitor samples the means are over (rank 0)
    sample_interval_s: float
    cpu_percent_mean: float | None  # whole machine, psutil
    process_rss_peak_bytes: int | None  # rank 0's process
    gpu_busy_percent_mean: float | None  # NVML utilisation rate, mean over every GPU of the run
    gpu_mem_used_peak_bytes: int | None  # NVML, the fullest GPU's
    gpu_power_w_mean: float | None  # every GPU of the run together, W
    gpu_energy_j: float | None  # every GPU of the run, over the timed windows, J
    gpu_energy_source: str | None
    per_rank: list[RankUsage]
    peak_allocated_bytes: int | None  # torch's peak over the training steps, the fullest GPU's
    gpu_energy_j_per_epoch: float | None  # gpu_energy_j per timed sample x samples in an epoch
    gpu_energy_j_per_sample: float | None = None
    samples_in_windows: int | None = None  # of num_samples, inside the timed windows (0: none fell there)
    load_avg_1m_mean: float | None = None  # the machine's 1-minute load average (runnable threads), psutil
    cpu_steal_percent_mean: float | None = None  # CPU time a hypervisor gave to other guests, % (Linux VMs)


@dataclass
class Flops:
    train_flops_per_sample: float  # 3 x forward (backward ~ 2 x forward)
    forward_flops_per_sample: float
    achieved_tflops: float
    peak_tflops_per_device: float | None
    peak_source: str
    mfu: float | None
    # what fp32 computes in on a GPU: TF32 allowed for matmuls / cuDNN convolutions, cuDNN autotuning
    math_settings: dict | None = None
    cudnn_flop_share: float | None = None  # of the forward FLOPs, cuDNN's (convolutions, RNNs)


@dataclass
class Quality:
    test: dict | None  # bench.quality.quality() of the test split
    val_macro_f1_by_epoch: list[float]
    target_f1: float | None
    time_to_target_s: float | None
    epochs_to_target: int | None


@dataclass
class Timing:
    setup_s: float
    train_s: float
    eval_s: float
    steps: int
    steps_per_epoch: int


@dataclass
class RunSummary:
    plan_info: dict  # the strategy's own facts, merged into the result's config
    throughput: Throughput
    utilization: Utilization
    flops: Flops
    quality: Quality
    timing: Timing
    losses: list[float]  # per step, the global mean training loss
    breakdown: dict | None = None  # with --profile: where the profiled steps' time went (bench/breakdown.py)
    memory: dict | None = None  # the memory estimate beside what was measured (bench/train.memory_record)


def build_result(*, run_id: str, status: str, error: str | None, config: dict, env: dict, data: dict | None,
                 summary: RunSummary | None, wall_s: float) -> dict:
    """The result file's content; a run without a summary (failed) has empty measurement sections."""
    body = dataclasses.asdict(summary) if summary else {}
    return {
        "schema": SCHEMA,
        "run_id": run_id,
        "status": status,
        "error": error,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "env": env,
        "data": data,
        "throughput": body.get("throughput", {}),
        "utilization": body.get("utilization", {}),
        "flops": body.get("flops", {}),
        "quality": body.get("quality", {}),
        "timing": {**body.get("timing", {}), "wall_s": wall_s},
        "losses": body.get("losses", []),
        "breakdown": body.get("breakdown"),
        "memory": body.get("memory"),
    }


# ---------------------------------------------------------------------------- files

class ResultError(ValueError):
    """A result file that does not follow the schema."""


def validate(result: dict) -> None:
    """Raise ResultError naming the first missing or mistyped key."""
    for key, types in REQUIRED.items():
        if key not in result:
            raise ResultError(f"missing key {key!r}")
        if not isinstance(result[key], types):
            raise ResultError(f"key {key!r} is {type(result[key]).__name__}, expected {types[0].__name__}")
    if "error" not in result:
        raise ResultError("missing key 'error'")
    if result["status"] not in STATUSES:
        raise ResultError(f"status {result['status']!r} is not one of {', '.join(STATUSES)}")
    for key in CONFIG_KEYS:
        if key not in result["config"]:
            raise ResultError(f"missing key config.{key}")
    if result["status"] == "ok":
        for key in THROUGHPUT_KEYS:
            v = result["throughput"].get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ResultError(f"throughput.{key} is {v!r}, expected a positive number")
        test = result["quality"].get("test") or {}
        for key in TEST_KEYS:
            if key not in test:
                raise ResultError(f"missing key quality.test.{key}")
        if "val_macro_f1_by_epoch" not in result["quality"]:
            raise ResultError("missing key quality.val_macro_f1_by_epoch")


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf; null means "not measured"
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_result(result: dict, out_dir: str | os.PathLike) -> Path:
    """Validate, then write out_dir/<run_id>.json atomically (temp file + rename)."""
    result = _jsonable(result)
    validate(result)
    path = Path(out_dir) / f"{result['run_id']}.json"
    atomic_write_text(path, json.dumps(result, indent=1, sort_keys=False) + "\n")
    return path


def load_result(path: str | os.PathLike) -> dict:
    with open(path) as f:
        result = json.load(f)
    validate(result)
    return result


def iter_result_files(path: str | os.PathLike) -> list[Path]:
    """Result files under a file or folder (recursively), sorted."""
    p = Path(path)
    if p.is_dir():
        return sorted(q for q in p.rglob("*.json") if not q.name.startswith(".") and q.name not in NOT_RESULTS
                      and not q.name.endswith(".comm.json"))
    if p.exists():
        return [p]
    raise FileNotFoundError(f"{p}: no such file or folder")


def load_results(paths) -> tuple[list[dict], list[tuple[str, str]]]:
    """All valid results under the given files or folders, each tagged with the one it came from
    (`_source`, which tells machines apart in a report), and (file, reason) for every file that is
    not a result. FileNotFoundError names a path that does not exist."""
    results, bad = [], []
    for source in paths:
        for f in iter_result_files(source):
            try:
                r = load_result(f)
            except (OSError, json.JSONDecodeError, ResultError) as exc:
                bad.append((str(f), str(exc)))
                continue
            r.setdefault("_path", str(f))
            r["_source"] = str(source)
            results.append(r)
    return results, bad
