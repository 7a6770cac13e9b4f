"""`bench export --mlflow URI DIR...`: each result file becomes an MLflow run (an optional extra:
pip install 'emotion-bench[mlflow]').

Per result: the config as params (flattened, `config.` dropped), the METRICS table's values that
the result has as metrics (bench/frame.py; the per-step training loss as the series `loss`), the
status, error, machine and commit as tags, and the result file and every file beside it that
carries its run id (Chrome traces, the torchrun log) as artifacts. A result already exported to the
experiment (tag emotion_bench.run_id) is left as it is. The backend is a database (sqlite:///x.db,
or a tracking server's URL): MLflow deprecates its file store.
"""
from __future__ import annotations

import json
from pathlib import Path

from .results import iter_result_files, load_result

TAG = "emotion_bench.run_id"
BACKENDS = ("sqlite:///", "postgresql://", "mysql://", "mssql://", "http://", "https://", "databricks")


class ExportError(ValueError):
    """The one line users see."""


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def check_uri(uri: str) -> None:
    if not uri.startswith(BACKENDS):
        raise ExportError(f"--mlflow {uri}: give a database or server URI (sqlite:///path/mlflow.db, "
                          "postgresql://..., http://host:5000): MLflow deprecates its file store")


def export(uri: str, dirs: list[str], experiment: str = "emotion-bench", artifacts: str | None = None,
           say=lambda _: None) -> tuple[int, int, list[tuple[str, str]]]:
    """(exported, already there, [(file, why) not results]) for every result file under dirs."""
    check_uri(uri)
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ExportError("bench export --mlflow needs MLflow: pip install 'emotion-bench[mlflow]'") from None
    from .frame import METRICS

    files, bad = _result_files(dirs), []
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, uri, experiment, artifacts)
    done = new = 0
    for f in files:
        try:
            r = load_result(f)
        except Exception as exc:  # not a result: listed, never fatal
            bad.append((str(f), str(exc)))
            continue
        if client.search_runs([exp_id], filter_string=f"tags.`{TAG}` = '{r['run_id']}'", max_results=1):
            done += 1
            continue
        _log_run(client, exp_id, f, r, METRICS)
        new += 1
        say(f"exported {r['run_id']} ({r['status']})")
    del mlflow
    return new, done, bad


def _result_files(dirs: list[str]) -> list:
    files = []
    for d in dirs:
        try:
            files += iter_result_files(d)
        except FileNotFoundError as exc:
            raise ExportError(f"{exc}: pass result folders or files") from None
    return files


def _experiment_id(client, uri: str, experiment: str, artifacts: str | None) -> str:
    """The experiment's id, created where it is new: its artifacts in `artifacts`, or for a new sqlite
    experiment in mlartifacts/ beside the database (else MLflow's default)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = artifacts or (str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts")
                             if uri.startswith("sqlite:///") else None)
    return client.create_experiment(experiment, artifact_location=Path(location).resolve().as_uri()
                                    if location else None)


def _tags(r: dict) -> dict[str, str]:
    env = r.get("env") or {}
    return {TAG: r["run_id"], "status": r["status"], "error": str(r.get("error") or ""),
            "hardware_id": str(env.get("hardware_id")), "cpu_model": str(env.get("cpu_model")),
            "gpus": ", ".join(g.get("name", "") for g in env.get("gpus") or []) or "none",
            "git_commit": str((env.get("git") or {}).get("commit")), "mlflow.runName": r["run_id"]}


def _log_run(client, exp_id: str, f, r: dict, metrics: dict) -> None:
    """One result as a finished MLflow run: tags, params, metrics, the result and its files as artifacts."""
    run = client.create_run(exp_id, tags=_tags(r))
    rid = run.info.run_id
    for k, v in _flat(r.get("config") or {}).items():
        client.log_param(rid, k, v[:6000])
    for m in metrics.values():
        value = m.read(r) if m.read else None
        if isinstance(value, (int, float)) and value == value:
            client.log_metric(rid, m.column, float(value))
    for i, loss in enumerate(r.get("losses") or []):
        if isinstance(loss, (int, float)):
            client.log_metric(rid, "loss", float(loss), step=i)
    client.log_artifact(rid, str(f))
    for extra in sorted(Path(f).parent.glob(f"{r['run_id']}.*")):
        if extra != Path(f):
            client.log_artifact(rid, str(extra))
    client.set_terminated(rid, status="FINISHED" if r["status"] == "ok" else "FAILED")
