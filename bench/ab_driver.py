"""One side's measuring job for `bench ab` (bench/ab.py starts it; not a module to import).

Run by torchrun (one process per device) with EMOTION_BENCH_AB_ROOT naming the side's checkout:
this file is the head's, the `bench` package it measures is the side's. Data is loaded once;
then each command (a file cmd-N.json in the command folder) is one cell: the single cell runs on
rank 0 alone while the other ranks wait, a multi-device cell on every rank; rank 0 writes
done-N.json with what the side's own loop measured. Between commands the processes sleep, so
the side not being measured costs the other nothing.
"""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path[0] = os.environ["EMOTION_BENCH_AB_ROOT"]  # the side's code, not this file's folder


def _load_data_fn():
    """The side's load_data: a side at a revision older than bench/lifecycle.py has it in bench.runner."""
    try:
        from bench.lifecycle import load_data
    except ImportError:
        from bench.runner import load_data
    return load_data


def _install_faults(env) -> None:
    """The side's planted faults: a side at a revision older than bench/faults.py has them in bench.runner."""
    try:
        from bench.faults import install

        install(env.rank)
    except ImportError:
        from bench.runner import _install_fault

        _install_fault(env)


def _begin(devices: int) -> None:
    """A command's start: its step times afresh, and a planted `solo` slowdown told how many devices
    it runs on (bench/faults.py; a side older than it has no such fault)."""
    STEP_ENDS.clear()
    try:
        from bench.faults import set_run_devices
    except ImportError:
        return
    set_run_devices(devices)


def _summary(body) -> dict:
    body = dataclasses.asdict(body) if dataclasses.is_dataclass(body) else body
    util = body["utilization"]
    return {"throughput": body["throughput"], "quality": body["quality"],
            "peak_bytes": util.get("peak_allocated_bytes") or util.get("process_rss_peak_bytes"),
            # bench tune --objective energy: the window's GPU energy and power (None on CPU)
            "utilization": {k: util.get(k) for k in ("gpu_energy_j_per_sample", "gpu_power_w_mean")}}


STEP_ENDS: list[float] = []


def _time_steps() -> None:
    """Note when each optimiser step ends, whichever side's loop calls it: the gate reads the
    same clock on both sides."""
    import torch

    orig = torch.optim.AdamW.step

    def timed(self, *a, **k):
        out = orig(self, *a, **k)
        STEP_ENDS.append(time.perf_counter())
        return out

    torch.optim.AdamW.step = timed


def _step_times_ms(warmup: int) -> list[float]:
    ends = STEP_ENDS[warmup:]
    return sorted((b - a) * 1000 for a, b in zip(ends, ends[1:]))


def _wait_for(path: Path) -> dict:
    while not path.exists():
        time.sleep(0.02)
    return json.loads(path.read_text())


def main(folder: str) -> None:
    import torch

    from bench.config import RunConfig
    from bench.distenv import DistEnv, init_env
    from bench.train import execute

    folder_path = Path(folder)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cores = sorted(os.sched_getaffinity(0))
    device_type = os.environ.get("EMOTION_BENCH_AB_DEVICE", "cpu")  # bench tune's windows on GPUs: cuda
    if device_type == "cpu" and len(cores) >= world:
        # rank r on core r, on both sides: the cores of a cloud machine differ in speed (measured
        # here: up to 30 % between the two, varying), so a visit must not depend on where it lands
        os.sched_setaffinity(0, {cores[rank]})
    torch.set_num_threads(int(os.environ.get("EMOTION_BENCH_AB_THREADS", "1")))
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    setup = json.loads((folder_path / "setup.json").read_text())
    base_cfg = RunConfig(**{k: v for k, v in setup["cfg"].items() if k in fields})
    data = _load_data_fn()(base_cfg)
    dist_env = init_env(base_cfg.replace(devices=world), device_type) if world > 1 else None
    local = DistEnv(0, 1, 0, 1, torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu"), None)
    faults_env = dist_env or local
    _install_faults(faults_env)
    _time_steps()  # after the faults: a planted slowdown is part of the step it slows
    if rank == 0:
        (folder_path / "ready").write_text("")
    n = 0
    while True:
        cmd = _wait_for(folder_path / f"cmd-{n}.json")
        if cmd["op"] == "quit":
            break
        cfg = RunConfig(**{k: v for k, v in cmd["cfg"].items() if k in fields})
        _begin(cfg.devices)
        t0 = time.perf_counter()
        env = local if cfg.devices == 1 else dist_env
        if cfg.devices == 1:
            body = execute(cfg, local, data) if rank == 0 else None
        else:
            body = execute(cfg, dist_env, data)  # collective; the summary on rank 0
        if rank == 0:
            if cmd.get("result"):  # bench tune: the window as a result file in cfg.out_dir (its run_id)
                from bench.lifecycle import write_summary

                write_summary(cfg, body, data, device_type, cfg.devices, env.backend, t0)
            out = _summary(body)
            out["step_ms_sorted"] = _step_times_ms(cfg.warmup_steps)
            tmp = folder_path / f".done-{n}.json"
            tmp.write_text(json.dumps(out))
            tmp.rename(folder_path / f"done-{n}.json")
        else:  # the next command only after rank 0 has finished this one
            _wait_for(folder_path / f"done-{n}.json")
        n += 1
    if dist_env is not None:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
