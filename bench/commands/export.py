"""`bench export`: result files as MLflow runs."""
from __future__ import annotations

from typing import Optional

import typer

from ..ui import error, info
from .common import fail


def export_cmd(
    dirs: list[str] = typer.Argument(..., help="Result folders (or files)."),
    mlflow_uri: str = typer.Option(..., "--mlflow", help="MLflow tracking URI: sqlite:///path/mlflow.db or a server's URL."),
    experiment: str = typer.Option("emotion-bench", help="The MLflow experiment the runs go to."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact folder of a new experiment (default: mlartifacts/ beside the sqlite file)."),
):
    """Each result file as an MLflow run: config as params, the metrics table as metrics, traces as artifacts."""
    from ..export import ExportError, export

    try:
        new, done, bad = export(mlflow_uri, dirs, experiment, artifacts, say=info)
    except ExportError as exc:
        fail(str(exc))
    for f, why in bad:
        error(f"not a result file: {f}: {why}")
    info(f"export: {new} run(s) exported to {mlflow_uri} (experiment {experiment}), {done} there already")
