"""`bench parity`: each strategy's losses and parameters against `single` over a few steps."""
from __future__ import annotations

from typing import Optional

import typer

from ..ui import console, error, info, table
from .common import Exit, config_options, fail


@config_options(("devices", "model", "model_size", "precision", "batch_size", "size", "sync_bn", "device",
                 "grad_accum", "ac"),
                defaults={"devices": 2, "model_size": "small", "batch_size": 16, "size": "tiny"},
                helps={"devices": "Devices (CPU worker processes without CUDA) per strategy.",
                       "batch_size": "Global batch (the same for every cell), samples.",
                       "grad_accum": "Micro-steps per optimiser step in every cell (single, the reference, takes one).",
                       "ac": "Activation checkpointing in every cell: none, full, selective (single trains without)."})
def parity(
    strategies: str = typer.Option("ddp,fsdp,pipeline:gpipe,pipeline:1f1b",
                                   help="Comma-separated cells; pipeline:SCHEDULE picks the schedule."),
    steps: int = typer.Option(6, help="Optimiser steps compared."),
    compile_backend: Optional[str] = typer.Option(None, help="Compile every cell with this torch.compile backend."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the cells and stop."),
    **settings,
):
    """Train a few steps of each strategy and compare losses and parameters with `single`."""
    from ..parity import BASES, check_parity, run_parity

    cells = [c.strip() for c in strategies.split(",") if c.strip()]
    try:
        check_parity(strategies=cells, steps=steps, compile_backend=compile_backend, **settings)
    except ValueError as exc:
        fail(str(exc))
    if dry_run:
        info(f"parity would compare {', '.join(cells)} with single over {steps} steps")
        return
    rows = run_parity(strategies=cells, steps=steps, compile_backend=compile_backend, **settings)
    # 80 columns: short words in the headers (the definitions follow the table)
    header = [("cell", {"no_wrap": True}), "loss dev (max)", "param dev", "limit loss / params", "basis",
              "verdict"]
    extra = "".join([f", --grad-accum {settings['grad_accum']}" if settings["grad_accum"] > 1 else "",
                     f", --ac {settings['ac']}" if settings["ac"] != "none" else ""])
    console.print(table(f"parity against single: {settings['model']}-{settings['model_size']}, "
                        f"{settings['precision']}, {steps} steps, global batch {settings['batch_size']}{extra}", header,
                        [[r.cell, f"{r.loss_dev:.1e}", f"{r.param_dev:.1e}", f"{r.loss_tol:.0e} / {r.param_tol:.0e}",
                          r.basis.replace("+", " + "), "[green]ok[/]" if r.ok else "[red]FAIL[/]"] for r in rows]))
    info("deviations are relative to single: per loss step |l - l_single| / |l_single|; parameters ||p - p_single|| / ||p_single||")
    for basis in sorted({b for r in rows for b in r.basis.split("+")}):
        info(f"  {basis}: {BASES[basis][2]}")
    for r in rows:
        if r.error:
            error(f"{r.cell}: {r.error}")
    if not all(r.ok for r in rows):
        raise Exit(1)
