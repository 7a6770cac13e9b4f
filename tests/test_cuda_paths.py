"""The CUDA paths a line-by-line review found wrong, each shown on the CPU where a CPU can show it
(issue 20). What only a GPU can show is benchmarks/gpu_check.py's business."""
from types import SimpleNamespace

import pytest
import torch

from bench.distenv import DistEnv

CPU1 = DistEnv(0, 1, 0, 1, torch.device("cpu"), None)


# ------------------------------------------------------------------------------------------ step events

class _Device:
    """A device that has executed the events numbered up to `reached` (it runs behind the host)."""

    def __init__(self, reached: int):
        self.reached = reached


class _Event:
    """torch.cuda.Event's contract: elapsed_time between two events raises unless both completed."""

    def __init__(self, device: _Device, n: int, t_s: float):
        self.device, self.n, self.t_s = device, n, t_s

    def query(self) -> bool:
        return self.device.reached >= self.n

    def elapsed_time(self, end: "_Event") -> float:
        if not (self.query() and end.query()):
            raise RuntimeError("Both events must be completed before calculating elapsed time.")
        return (end.t_s - self.t_s) * 1000


def _marks(device: _Device) -> list[tuple]:
    # four steps of 10, 20, 30, 40 ms: events 1-2, 3-4, 5-6, 7-8
    ends = [0.0, 0.010, 0.010, 0.030, 0.030, 0.060, 0.060, 0.100]
    events = [_Event(device, i + 1, t) for i, t in enumerate(ends)]
    return list(zip(events[::2], events[1::2]))


def _cuda_clock():
    from bench.train import _Clock

    clock = _Clock(torch.device("cpu"))
    clock.cuda = True  # read marks as CUDA events
    return clock


def test_stopped_mid_window_the_step_events_are_read_after_a_sync(monkeypatch):
    """Item 5: a signal stops the loop while the device is behind the host; reading the events
    as they were raised, so the run ended failed with its steps lost instead of interrupted."""
    from bench.train import Measured, local_gather

    device = _Device(reached=3)  # the host has recorded 8 events, the device reached 3
    marks = _marks(device)
    with pytest.raises(RuntimeError, match="Both events must be completed"):
        [a.elapsed_time(b) for a, b in marks]  # what reading them unsynchronised does

    def synchronize(_device=None):
        device.reached = 8

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    m = Measured(losses=[torch.tensor(v) for v in (2.0, 1.9, 1.8, 1.7)], step_marks=marks,
                 windows=[(0.0, 1.0)])
    g = local_gather(CPU1, m, _cuda_clock(), SimpleNamespace(summary=lambda windows: {}), 1)
    assert g.step_s == pytest.approx([0.010, 0.020, 0.030, 0.040])
    assert g.losses == pytest.approx([2.0, 1.9, 1.8, 1.7])


def test_a_device_in_error_keeps_the_steps_it_completed(monkeypatch):
    from bench.train import Measured, local_gather

    device = _Device(reached=5)  # steps 1 and 2 completed, step 3 had started

    def synchronize(_device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    m = Measured(losses=[torch.tensor(v) for v in (2.0, 1.9, 1.8, 1.7)], step_marks=_marks(device),
                 windows=[(0.0, 1.0)])
    g = local_gather(CPU1, m, _cuda_clock(), SimpleNamespace(summary=lambda windows: {}), 0)
    assert g.step_s == pytest.approx([0.010, 0.020]) and g.losses == pytest.approx([2.0, 1.9])


# ------------------------------------------------------------------------------------------ dp

def test_dataparallel_replicas_compute_in_the_runs_dtype_in_their_own_threads():
    """Item 3: DataParallel enters autocast again in each replica's thread without a dtype (read from
    torch's own source below), and a new thread's autocast dtype is its default: a bf16 run's
    replicas computed in fp16. On the CPU the default is bf16, so the run's dtype here is fp16."""
    import inspect
    import threading

    import sys

    from bench.strategies.dp import CastInReplica

    source = inspect.getsource(sys.modules["torch.nn.parallel.parallel_apply"])
    assert "torch.amp.autocast(device_type, enabled=autocast_enabled)" in source
    linear = torch.nn.Linear(4, 4)
    seen = {}

    def replica(name, module):  # what parallel_apply's _worker does, on the CPU
        with torch.amp.autocast("cpu", enabled=enabled):
            seen[name] = module(torch.randn(2, 4)).dtype, seen.get("inner")

    def inner_dtype(module, args, output):
        seen["inner"] = output.dtype

    linear.register_forward_hook(inner_dtype)
    with torch.autocast("cpu", dtype=torch.float16):
        enabled = torch.is_autocast_enabled("cpu")  # read in the caller's thread, as parallel_apply does
        for name, module in (("plain", linear), ("cast", CastInReplica(linear, "cpu", torch.float16))):
            t = threading.Thread(target=replica, args=(name, module))
            t.start()
            t.join()
    assert seen["plain"] == (torch.bfloat16, torch.bfloat16)  # the thread's default, not the run's fp16
    assert seen["cast"] == (torch.float32, torch.float16)  # computed in fp16, logits out in fp32


def test_dataparallel_refuses_compile_on_several_gpus_and_why(monkeypatch):
    """Item 4: Module.compile binds the original module, and DataParallel's replicas copy its
    __dict__: every replica would run the original's weights. Refused in one line before anything
    starts; the binding itself is shown on the CPU."""
    from bench.config import ConfigError, RunConfig
    from bench.strategies.dp import _check

    block = torch.nn.Linear(2, 2)
    block.compile(backend="eager")
    replica = block._replicate_for_data_parallel()
    assert replica._compiled_call_impl is not None
    assert replica._compiled_call_impl._torchdynamo_orig_callable.__self__ is block  # not the replica
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(ConfigError, match=r"--strategy dp --compile --gpus 2: .* use --strategy ddp --compile"):
        _check(RunConfig(strategy="dp", devices=2, compile=True), "cuda")
    _check(RunConfig(strategy="dp", devices=1, compile=True), "cuda")  # one GPU replicates nothing
    _check(RunConfig(strategy="dp", devices=8, precision="bf16"), "cuda")
