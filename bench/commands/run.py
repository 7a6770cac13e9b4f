"""`bench run`: one cell of the matrix, trained and measured, one result file."""
from __future__ import annotations

import os

import typer

from .. import trust
from ..config import RunConfig
from ..ui import console, error, info, progress_factory, run_table
from .common import Exit, config_options


@config_options()
def run(
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate every flag, estimate memory and say what would "
                                                          "run; no data, no training, no result file."),
    **settings,
):
    """Train one cell of the matrix, measure it, and write one result file (its path is the last line)."""
    from .. import lifecycle
    from ..distenv import under_torchrun
    from ..results import load_result

    cfg = RunConfig(**settings)
    if under_torchrun():
        lifecycle.worker_exit(cfg)  # never returns
    if os.environ.get(lifecycle.CELL_ENV):  # one cell of a sweep or parity, in its own process
        raise Exit(lifecycle.cell_main())
    said: set[str] = set()

    def say(message: str) -> None:  # a warning said before training is not repeated at the end
        said.add(message)
        info(message)

    outcome = lifecycle.run(cfg, say=say, progress=progress_factory, dry_run=dry_run)
    if outcome.error:
        error(outcome.error)
    elif outcome.path is None and not dry_run and outcome.status != "refused":
        info("done: this node's ranks finished; rank 0 on another node wrote the result file")
    flags: list[str] = []
    if outcome.path is not None and not outcome.error:
        result = load_result(outcome.path)
        console.print(run_table(result))
        flags = trust.result_flags(result)  # what the figures carry, the busy machine's load included
    for note in dict.fromkeys([*outcome.notes, *flags]):
        if f"warning: {note}" not in said:
            info(f"warning: {note}")
    if outcome.path is not None:
        print(outcome.path)
    if outcome.code:
        raise Exit(outcome.code)
