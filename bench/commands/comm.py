"""`bench comm`: collective bandwidth per message size, launched through torchrun as `bench run` is."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import NoReturn

import typer

from ..config import RunConfig
from ..ui import console, info, table
from .common import config_options, fail, nonempty_out, parse_bytes

COMM_ENV = "EMOTION_BENCH_COMM"  # the launcher's CommConfig, JSON, for every worker


@config_options(("devices", "device", "nodes", "node_rank", "rdzv_endpoint", "timeout_s"), defaults={"devices": 2},
                helps={"devices": "Devices (CPU worker processes without CUDA) taking part, at least 2."})
def comm(
    ops: str = typer.Option("all_reduce,all_gather,reduce_scatter,broadcast,send_recv,tp_all_gather,tp_reduce_scatter,"
                            "tp_all_reduce",
                            help="Comma-separated collectives: all_reduce, all_gather, reduce_scatter, broadcast, send_recv; "
                                 "tp_all_gather, tp_reduce_scatter, tp_all_reduce are the first three as tensor parallel "
                                 "issues them (DTensor redistribute on a buffer sharded on dim 1), which bench predict "
                                 "reads for tp."),
    min_bytes: str = typer.Option("1K", help="Smallest message S, bytes (1K = 1024)."),
    max_bytes: str = typer.Option("256M", help="Largest message S, bytes (sizes double from the smallest)."),
    out: str = typer.Option("results/comm", help="Folder for <run_id>.comm.json and its plot.", callback=nonempty_out),
    meet_compute_ms: float = typer.Option(5.0, help="Each tp_ collective is also timed after a compute segment of "
                                                     "this many ms, as a tensor-parallel step meets it (its meeting "
                                                     "cost, which bench predict adds to tp's collectives); 0: not."),
    meet_bytes: str = typer.Option("2M", help="The buffer of those after-compute calls (at most --max-bytes)."),
    **settings,
):
    """Collective bandwidth as nccl-tests measures it (time, algbw, busbw per size) and an alpha-beta fit."""
    from ..distenv import under_torchrun

    if under_torchrun():
        _worker()  # never returns
    cfg, comm_cfg, device_type = _plan(ops, min_bytes, max_bytes, out, settings, meet_compute_ms, meet_bytes)
    path = _launch(cfg, comm_cfg)
    if path is not None:
        _show(path, device_type)


def _worker() -> NoReturn:
    """One torchrun worker: measure with the launcher's CommConfig and leave with the worker's code."""
    from .. import launch
    from ..comm import CommConfig, worker_main

    raw = json.loads(os.environ[COMM_ENV])
    launch.worker_exit(worker_main(CommConfig(**{k: (tuple(v) if k == "ops" else v) for k, v in raw.items()})))


def _plan(ops: str, min_bytes: str, max_bytes: str, out: str, settings: dict, meet_compute_ms: float = 5.0,
          meet_bytes: str = "2M"):
    """The launch's RunConfig (its run id set), the workers' CommConfig and the device type; exit 2
    on a bad option."""
    from .. import launch
    from ..comm import OPS, CommConfig
    from ..distenv import resolve_device_type

    try:
        kinds = tuple(k.strip() for k in ops.split(",") if k.strip())
        bad = [k for k in kinds if k not in OPS]
        if bad or not kinds:
            raise ValueError(f"--ops: unknown collectives {bad}; choose from {', '.join(OPS)}")
        lo, hi = parse_bytes(min_bytes), parse_bytes(max_bytes)
        if lo > hi:
            raise ValueError(f"--min-bytes {min_bytes} is above --max-bytes {max_bytes}")
        if not 0 <= meet_compute_ms <= 1000:  # 3 ops x 63 segments: at 1 s a segment over 3 minutes
            raise ValueError(f"--meet-compute-ms {meet_compute_ms}: give 0 (not measured) to 1000 ms")
        try:
            meet = parse_bytes(meet_bytes)
        except ValueError as exc:
            raise ValueError(f"--meet-bytes: {exc}") from None
        cfg = RunConfig(strategy="ddp", out_dir=out, **settings)
        cfg.validate()
        if cfg.devices < 2:
            raise ValueError(f"--gpus {cfg.devices}: a collective needs at least 2 devices")
        device_type = resolve_device_type(cfg)
    except ValueError as exc:
        fail(str(exc))
    cfg = cfg.replace(run_id=launch.run_id("comm", cfg.devices, device_type))
    comm_cfg = CommConfig(ops=kinds, min_bytes=lo, max_bytes=hi, out=out, run_id=cfg.run_id, meet_bytes=meet,
                          meet_compute_ms=meet_compute_ms,
                          extra={"device_type": device_type, "timeout_s": cfg.timeout_s})
    return cfg, comm_cfg, device_type


def _launch(cfg: RunConfig, comm_cfg) -> Path | None:
    """Every worker through torchrun, waited for: the result file, or None where rank 0 is on another
    node; exit 1 when the launch failed."""
    from .. import launch

    path = Path(comm_cfg.out) / f"{cfg.run_id}.comm.json"
    Path(comm_cfg.out).mkdir(parents=True, exist_ok=True)
    done = launch.launch(cfg, time.perf_counter(), status=info, argv=("comm",), result=path,
                         extra_env={COMM_ENV: json.dumps(dataclasses.asdict(comm_cfg))})
    if not done.ok:
        fail(f"bench comm failed: {done.error} (worker log: {done.log_path})", 1)
    if done.other_node:
        info("done: rank 0 on another node wrote the result")
        return None
    return path


def _show(path: Path, device_type: str) -> None:
    from ..comm import fit_lines, load
    from ..comm import table as comm_table

    result = load(str(path))
    title, header, rows, note = comm_table(result, device_type)
    console.print(table(title, header, rows, caption=note, justify="right"))
    for line in fit_lines(result):
        info(line)
    print(path)
