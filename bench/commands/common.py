"""What the commands share: the exit they raise, RunConfig settings as options, and the parsing of
options and result paths every command turns into one error line."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import NoReturn, Optional

import typer
from rich.markup import escape

from ..config import RunConfig, cli_fields
from ..ui import console, error, info, table


class Exit(Exception):
    """Leave with this exit code (the message has been shown)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def fail(message: str, code: int = 2) -> NoReturn:
    error(message)
    raise Exit(code)


# where the work runs (bench.executors): bench sweep's cells, bench tune's measuring run
JOB_OPTIONS = {
    "executor": ("--executor", str, "Where it runs: local (here, as always), slurm (jobs through submitit), "
                                    "submitit-local (such jobs on this machine)."),
    "partition": ("--partition", str, "slurm: the partition (sbatch --partition)."),
    "account": ("--account", str, "slurm: the account (sbatch --account)."),
    "time": ("--time", str, "A job's time limit: 90m, 2h (default 60m)."),
    "gpus_per_node": ("--gpus-per-node", int, "slurm: the partition's GPUs per node; a cell of more devices spans "
                                              "whole nodes."),
    "cpus_per_task": ("--cpus-per-task", int, "slurm: CPUs of each node's task."),
    "array_parallelism": ("--array-parallelism", int, "slurm (sweep): jobs of one array running at once (default "
                                                      "16)."),
}
JOB_FLAGS = tuple(flag for flag, _, _ in JOB_OPTIONS.values())


def job_options(fn):
    """Add the executor's options (JOB_OPTIONS) to a command; it gets them as one dict, job_flags
    (name -> value, None where not given). Apply it under config_options."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.name != "job_flags"]
    tail = [p for p in own if p.kind is p.VAR_KEYWORD]
    added = [inspect.Parameter(f"job_{name}", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[cast],
                               default=typer.Option(None, flag, help=help_))
             for name, (flag, cast, help_) in JOB_OPTIONS.items()]

    @functools.wraps(fn)
    def command(**kwargs):
        flags = {name: kwargs.pop(f"job_{name}", None) for name in JOB_OPTIONS}
        return fn(**kwargs, job_flags=flags)

    command.__signature__ = inspect.Signature([p for p in own if p not in tail] + added + tail)
    command.__annotations__ = {**{k: v for k, v in typing.get_type_hints(fn).items() if k != "job_flags"},
                               **{p.name: p.annotation for p in added}}
    return command


def executor_or_fail(table: dict, flags: dict):
    """The executor from its options over a TOML's [executor] table; exit 2 with one line if bad."""
    from ..executors import executor_spec

    options = dict(flags)
    try:
        return executor_spec(options.pop("executor"), table, **options)
    except ValueError as exc:
        fail(str(exc))


def without_job_flags(argv: list[str]) -> list[str]:
    """A command line without the executor's options (and their values): what the job itself runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in JOB_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{f}=" for f in JOB_FLAGS)):
            out.append(arg)
    return out


def nonempty_out(value: str) -> str:
    """An empty --out would write into whatever folder the shell is in: refused."""
    if value is not None and not value.strip():
        raise typer.BadParameter("empty: give a folder, e.g. --out results/")
    return value


def config_options(names: tuple[str, ...] | None = None, *, defaults: dict | None = None, helps: dict | None = None,
                   preset_default: str | None = None):
    """Add RunConfig settings to a command as typer options: flag, default, type and help come from
    the field (bench/config.py), so they are written once.

    names: which settings (default: all that `bench run` exposes); defaults/helps: a command's own;
    preset_default: the options default to None (unset) and the help says what applies instead.
    """
    hints = typing.get_type_hints(RunConfig)
    chosen = [f for f in cli_fields() if names is None or f.name in names]

    def option(f: dataclasses.Field) -> inspect.Parameter:
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        help_ = (helps or {}).get(f.name, f.metadata["help"])
        default = (defaults or {}).get(f.name, f.default)
        annotation = hints[f.name]
        if preset_default is not None:
            help_ = f"{help_} (default: {preset_default}, else {default})"
            default, annotation = None, Optional[annotation]
        opt = typer.Option(default, flag, *f.metadata["aliases"], help=help_)
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation)

    def deco(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]

        @functools.wraps(fn)
        def command(**kwargs):
            return fn(**kwargs)

        params = own + [option(f) for f in chosen]
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {**typing.get_type_hints(fn), **{p.name: p.annotation for p in params[len(own):]}}
        return command

    return deco


def split_csv(value: str | None, cast=str) -> list | None:
    """A comma-separated option as a list (None when not given)."""
    return [cast(v.strip()) for v in value.split(",") if v.strip()] if value else None


def parse_bytes(text: str) -> int:
    """'1K', '256M', '1G', '4096' -> bytes (binary multiples)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        value = 0
    if value < 4:
        raise ValueError(f"{text!r} is not a size like 1K, 256M or 4096 (bytes)")
    return value


def parse_link(text: str | None):
    """A --link option: a preset's name or a bench comm result (file or folder) as a predict.Link."""
    from ..comm import load
    from ..predict import LINKS, Link

    if text is None:
        return None
    if text in LINKS:
        return Link.named(text)
    try:
        return Link.measured(load(text))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--link {text}: neither a preset ({', '.join(LINKS)}) nor a bench comm result ({exc})") from None


def load_or_fail(paths: list[str]):
    """The results under these files or folders, and the files that are not results; exit 2 on a
    path that does not exist."""
    from ..results import load_results

    try:
        return load_results(paths)
    except FileNotFoundError as exc:
        fail(f"{exc}: pass result folders or files")


def verdict_table(header: list[str], rows: list[list[str]], summary: str, fmt: str, title: str,
                  style: typing.Callable[[list[str]], str | None]) -> None:
    """compare's and ab's verdicts: markdown for a PR comment, else a rich table; then the summary line."""
    from ..report import md_table

    if fmt == "md":
        print(md_table(header, rows))
        print()
        print(summary)
        return
    console.print(table(escape(title), header, rows, plain=True, style=style))
    info(summary)
