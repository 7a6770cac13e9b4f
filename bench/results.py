"""The result file: one JSON per run, written atomically. Schema notes: results/README.md."""
from __future__ import annotations

import json
import math
import os
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


NOT_RESULTS = {"sweep.json"}  # JSON files that live beside results but are not results


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
    if result["status"] not in ("ok", "failed"):
        raise ResultError(f"status {result['status']!r} is neither ok nor failed")
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


def iter_result_files(paths) -> list[Path]:
    """Result files under the given files or folders (recursively), sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*.json") if not q.name.startswith(".") and q.name not in NOT_RESULTS))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def load_results(paths) -> tuple[list[dict], list[tuple[str, str]]]:
    """All valid results under paths, and (file, reason) for every file that is not one."""
    results, bad = [], []
    for f in iter_result_files(paths):
        try:
            r = load_result(f)
        except (OSError, json.JSONDecodeError, ResultError) as exc:
            bad.append((str(f), str(exc)))
            continue
        r.setdefault("_path", str(f))
        results.append(r)
    return results, bad
