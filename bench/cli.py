"""The `bench` command line (typer): the apps, their commands in --help order, and main(), the one
way out. Each command parses, calls and renders in its own module (bench/commands/); runs go through
bench.lifecycle, sweeps through bench.sweep; nothing below the commands raises a CLI exception."""
from __future__ import annotations

import os
import sys

import typer

from .commands.ab import ab
from .commands.comm import comm
from .commands.common import Exit
from .commands.compare import compare_cmd
from .commands.data import data_scan, data_synth
from .commands.env import env_cmd
from .commands.export import export_cmd
from .commands.history import history_cmd
from .commands.listing import list_cmd
from .commands.parity import parity
from .commands.predict import predict
from .commands.report import report
from .commands.run import run
from .commands.sweep import sweep
from .commands.tune import tune
from .ui import error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="emotion-bench: PyTorch parallel-training strategies measured on speech emotion recognition.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: scan a folder of WAV files, write the synthetic set.")
app.add_typer(data_app, name="data")

# typer's --help lists the commands in this order
app.command()(run)
app.command()(parity)
app.command()(sweep)
app.command()(comm)
app.command()(predict)
app.command()(tune)
app.command()(report)
app.command("compare")(compare_cmd)
app.command()(ab)
app.command("history")(history_cmd)
app.command("export")(export_cmd)
app.command("env")(env_cmd)
app.command("list")(list_cmd)
data_app.command("scan")(data_scan)
data_app.command("synth")(data_synth)


def main() -> None:
    try:
        app(standalone_mode=False)
    except Exit as exc:
        sys.exit(exc.code)
    except typer.Abort:
        error("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and anything unexpected: one line, no traceback
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # typer's (vendored) click usage errors
            exc.show()
            sys.exit(exc.exit_code)
        if os.environ.get("EMOTION_BENCH_DEBUG"):
            raise
        error(f"{type(exc).__name__}: {exc} (internal error; set EMOTION_BENCH_DEBUG=1 for the traceback)")
        sys.exit(1)
