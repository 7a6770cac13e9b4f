"""The CUDA paths a line-by-line review found wrong, each shown on the CPU where a CPU can show it
(issue 20). What only a GPU can show is benchmarks/gpu_check.py's business."""
from types import SimpleNamespace

import pytest
import torch

from bench.distenv import DistEnv

CPU1 = DistEnv(0, 1, 0, 1, torch.device("cpu"), None)


# ------------------------------------------------------------------------------------------ step events

class _Device:
    """A device that has executed the events numbered up to `reached` (it runs behind the host), and
    catches up by `pace` events each time it is asked; `error`: a sticky CUDA error."""

    def __init__(self, reached: int, pace: int = 0, error: bool = False):
        self.reached, self.pace, self.error = reached, pace, error


class _Event:
    """torch.cuda.Event's contract: elapsed_time between two events raises unless both completed."""

    def __init__(self, device: _Device, n: int, t_s: float):
        self.device, self.n, self.t_s = device, n, t_s

    def query(self) -> bool:
        if self.device.error:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.device.reached += self.device.pace
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


def _cuda_clock(monkeypatch, devices=None):
    from bench.train import _Clock

    clock = _Clock(torch.device("cpu"), devices)
    clock.cuda = True  # read marks as CUDA events
    clock.stop_deadline_s = 0.3
    # the side-stream copy of the losses needs a GPU; the losses here are CPU tensors already
    monkeypatch.setattr(clock, "read_losses", lambda losses, marks, done: [float(v) for v in losses[:done]])
    return clock


def _never_block(*a, **k):
    raise AssertionError("a stopped loop must not wait on the device: a peer's collective may never come")


def _stopped(clock, device):
    from bench.train import Measured, local_gather

    m = Measured(losses=[torch.tensor(v) for v in (2.0, 1.9, 1.8, 1.7)], step_marks=_marks(device),
                 windows=[(0.0, 1.0)])
    return local_gather(CPU1, m, clock, SimpleNamespace(summary=lambda windows: {}, window_edge=lambda s: None), 1)


def test_stopped_mid_window_the_step_events_are_read_once_the_device_reaches_them(monkeypatch):
    """Item 5: a signal stops the loop while the device is behind the host; reading the events as
    they were raised, and the run ended failed with its steps lost instead of interrupted. The
    stop path polls them, and never synchronises: under NCCL a rank may have queued a collective
    that its stopped peer never will, and a synchronize would wait for NCCL's watchdog."""
    device = _Device(reached=3)  # the host has recorded 8 events, the device reached 3
    with pytest.raises(RuntimeError, match="Both events must be completed"):
        [a.elapsed_time(b) for a, b in _marks(device)]  # what reading them unsynchronised did
    monkeypatch.setattr(torch.cuda, "synchronize", _never_block)
    g = _stopped(_cuda_clock(monkeypatch), _Device(reached=3, pace=1))  # catching up
    assert g.step_s == pytest.approx([0.010, 0.020, 0.030, 0.040])
    assert g.losses == pytest.approx([2.0, 1.9, 1.8, 1.7])


def test_a_peer_that_never_comes_leaves_the_steps_the_device_completed(monkeypatch):
    import time

    monkeypatch.setattr(torch.cuda, "synchronize", _never_block)
    t = time.monotonic()
    g = _stopped(_cuda_clock(monkeypatch), _Device(reached=5))  # step 3 waits in a collective, forever
    assert g.step_s == pytest.approx([0.010, 0.020]) and g.losses == pytest.approx([2.0, 1.9])
    assert time.monotonic() - t < 5  # the deadline (0.3 s here), not the collective's timeout


def test_a_device_in_error_gives_no_steps_and_no_exception(monkeypatch):
    """After a sticky CUDA error every query fails too: nothing can be read, and nothing raises."""
    monkeypatch.setattr(torch.cuda, "synchronize", _never_block)
    g = _stopped(_cuda_clock(monkeypatch), _Device(reached=5, error=True))
    assert g.step_s == [] and g.losses == []


def test_after_the_loop_every_device_of_the_process_is_synchronised(monkeypatch):
    """Item 8's other half: model-parallel and dp compute on several GPUs from one process; the
    window's edges and the reading of the events wait for each, not for cuda:0 alone."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: synced.append(d))
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    clock = _cuda_clock(monkeypatch, devices)
    assert clock.durations_s(_marks(_Device(reached=8))) == pytest.approx([0.010, 0.020, 0.030, 0.040])
    assert synced == devices
    from bench.train import _sync

    synced.clear()
    _sync(devices + [torch.device("cpu")])
    assert synced == devices


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


# ------------------------------------------------------------------------------------------ memory, energy

GiB = 2**30


def test_peak_memory_is_the_training_steps_not_setup_nor_evaluation(tmp_path, monkeypatch):
    """Item 7: an allocator whose peak the test drives: setup builds a 10 GiB full model before
    sharding, training steps reach 2 GiB, evaluation 7 GiB (rank 0's evaluation copy at a large
    batch). The run's peak is the training steps' 2 GiB; read once at the end it was 10."""
    from bench import lifecycle, train
    from bench.config import RunConfig
    from bench.results import load_result
    from bench.strategies import STRATEGIES, get_strategy

    allocator = {"current": 1 * GiB, "peak": 1 * GiB}
    resets = []

    def reach(nbytes):
        allocator["peak"] = max(allocator["peak"], nbytes)

    def reset(device):
        resets.append(device)
        allocator["peak"] = allocator["current"]

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)  # the plan's "GPU" has no work
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator["peak"])
    spec = get_strategy("single")

    def built_big(model, env, cfg):
        reach(10 * GiB)
        plan = spec.fn(model, env, cfg)
        plan.devices = [torch.device("cuda", 0)]  # read as a GPU's allocator
        return plan

    monkeypatch.setitem(STRATEGIES, "single", type(spec)(**{**vars(spec), "fn": built_big}))
    orig_eval, orig_step = train.evaluate, torch.optim.AdamW.step

    def evaluate(*a, **k):
        reach(7 * GiB)
        return orig_eval(*a, **k)

    def step(self, *a, **k):
        reach(2 * GiB)
        return orig_step(self, *a, **k)

    monkeypatch.setattr(train, "evaluate", evaluate)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = RunConfig(size="tiny", epochs=2, batch_size=16, model_size="small", warmup_steps=1, device="cpu",
                    out_dir=str(tmp_path))
    r = load_result(lifecycle.run(cfg).path)
    u = r["utilization"]
    assert u["peak_allocated_bytes"] == 2 * GiB and u["per_rank"][0]["peak_allocated_bytes"] == 2 * GiB
    assert len(resets) == 3  # before each epoch's steps, and before the test evaluation
    assert r["memory"]["measured"]["eval_peak_allocated_bytes"] == 7 * GiB  # measured apart


class _NVML:
    """nvidia-ml-py's calls for GPUs drawing known constant power (W) at known busy %."""

    def __init__(self, watts: list[float], busy: list[float], counter: bool = True):
        import time

        self.watts, self.busy, self.counter, self.t0 = watts, busy, counter, time.perf_counter()

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, h):  # mJ since t0
        import time

        if not self.counter:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return int(self.watts[h] * (time.perf_counter() - self.t0) * 1000)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self.busy[h])

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=(h + 1) * GiB, free=GiB)

    def nvmlDeviceGetPowerUsage(self, h):  # mW
        return self.watts[h] * 1000


@pytest.mark.parametrize("counter", [True, False], ids=["energy-counter", "integrated-power"])
def test_every_gpu_of_a_process_is_read_and_energy_is_the_timed_windows(monkeypatch, counter):
    """Items 8 and 9: a process driving two GPUs (dp, model-parallel) reads both, not cuda:0
    alone; energy covers the timed windows, not the evaluation between them nor what follows."""
    import sys
    import time

    from bench.monitor import Monitor

    monkeypatch.setitem(sys.modules, "pynvml", _NVML([100.0, 300.0], [50.0, 90.0], counter))
    mon = Monitor(cuda_devices=[0, 1], interval_s=0.01)
    windows = []
    with mon:
        for _ in range(2):
            mon.window_edge(True)
            a = time.perf_counter()
            time.sleep(0.25)  # a timed window
            windows.append((a, time.perf_counter()))
            mon.window_edge(False)
            time.sleep(0.3)  # evaluation, outside
    s = mon.summary(windows)
    inside_s = sum(b - a for a, b in windows)
    assert s["gpu_energy_source"] == ("nvml-energy-counter" if counter else "integrated-power")
    # 400 W over the windows; over the whole time it would be about 2.2 x that
    assert s["gpu_energy_j"] == pytest.approx(400 * inside_s, rel=0.02 if counter else 0.2)
    assert [d["gpu_energy_j"] for d in s["per_device"]] == pytest.approx([100 * inside_s, 300 * inside_s],
                                                                         rel=0.02 if counter else 0.2)
    assert s["gpu_power_w_mean"] == pytest.approx(400.0) and s["gpu_busy_percent_mean"] == pytest.approx(70.0)
    assert s["gpu_mem_used_peak_bytes"] == 2 * GiB and [d["index"] for d in s["per_device"]] == [0, 1]


def test_a_window_cut_short_by_a_signal_still_has_its_energy(monkeypatch):
    """The stop path closes the window a signal cut short: its energy was 0 J before (the counters
    were read at a right edge that never came), and a run stopped in warm-up reports none."""
    import sys
    import time

    from bench.monitor import Monitor
    from bench.train import Measured, _Clock, local_gather

    monkeypatch.setitem(sys.modules, "pynvml", _NVML([200.0], [80.0]))
    for opened in (True, False):
        mon = Monitor(cuda_devices=[0], interval_s=0.01)
        with mon:
            a = time.perf_counter()
            if opened:
                mon.window_edge(True)
            time.sleep(0.3)
        m = Measured(losses=[torch.tensor(1.0)] * 3, step_marks=[(0.0, 0.1)] * 3, in_steps=True,
                     window_open=a if opened else None)
        u = local_gather(CPU1, m, _Clock(torch.device("cpu")), mon, 0).ranks[0]["utilization"]
        if opened:
            assert u["gpu_energy_j"] == pytest.approx(200 * (time.perf_counter() - a), rel=0.1)
        else:
            assert u["gpu_energy_j"] is None


def test_utilisation_over_ranks_sums_energy_and_power_and_averages_busy():
    from bench.train import utilization

    def rank(r, busy, watts, joules, peak):
        return {"rank": r, "peak_allocated_bytes": peak, "peak_rss_bytes": GiB, "own_step_time_ms_p50": 10.0,
                "per_device": [{"index": r}],
                "utilization": {"num_samples": 5, "sample_interval_s": 0.2, "cpu_percent_mean": 50.0,
                                "process_rss_peak_bytes": GiB, "gpu_busy_percent_mean": busy,
                                "gpu_mem_used_peak_bytes": peak + GiB, "gpu_power_w_mean": watts,
                                "gpu_energy_j": joules, "gpu_energy_source": "nvml-energy-counter"}}

    u = utilization([rank(0, 80.0, 300.0, 600.0, 3 * GiB), rank(1, 60.0, 250.0, 500.0, 4 * GiB)],
                    timed_samples=2200, samples_per_epoch=1000)
    assert (u.gpu_busy_percent_mean, u.gpu_power_w_mean, u.gpu_energy_j) == (70.0, 550.0, 1100.0)
    assert u.gpu_energy_j_per_sample == pytest.approx(0.5) and u.gpu_energy_j_per_epoch == pytest.approx(500.0)
    assert u.peak_allocated_bytes == 4 * GiB and u.gpu_mem_used_peak_bytes == 5 * GiB


# ------------------------------------------------------------------------------------------ compile

def test_every_compiled_block_stays_compiled_past_dynamos_recompile_limit(caplog):
    """Suspected in the review, confirmed: blocks of one class share their forward's dynamo cache,
    one entry per shape and grad mode (the CNN's four ConvBlocks fill 8 in one run), and past
    recompile_limit (8) a block silently runs eager. Five ConvBlocks of five widths, trained and
    evaluated at two batch sizes (a last, smaller batch), need 15 entries: none may hit the limit
    (with the default limit, the ninth does)."""
    import logging

    import torch._dynamo

    from bench.train import compile_blocks
    from emotion_models.models import BlockModel, ConvBlock, PoolHead

    torch._dynamo.reset()
    widths = [2, 3, 4, 5, 6]
    blocks = [ConvBlock(1, widths[0], add_channel=True)] + [ConvBlock(a, b) for a, b in zip(widths, widths[1:])]
    model = BlockModel("deep-cnn", blocks + [PoolHead(widths[-1], 0.0)], feature_kind="logmel", n_features=64,
                       frames=128)
    before = torch._dynamo.config.recompile_limit
    try:
        compile_blocks(model, "aot_eager")
        with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
            model(torch.randn(2, 64, 128)).sum().backward()
            with torch.no_grad():
                model.eval()(torch.randn(4, 64, 128))
                model(torch.randn(3, 64, 128))
        assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()], caplog.text
        assert torch._dynamo.config.recompile_limit >= 15
    finally:
        torch._dynamo.config.recompile_limit = before
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ MFU

# what `nvidia-smi --query-gpu=name` (and torch.cuda.get_device_name) report, and the card's dense
# data-sheet peaks (TFLOP/s: fp32, tf32, bf16) written out here, not read from the table under test
CARDS = {
    "NVIDIA H100 80GB HBM3": (67.0, 494.5, 989.5),  # H100 SXM5
    "NVIDIA H100 PCIe": (51.0, 378.0, 756.5),
    "NVIDIA H100 NVL": (60.0, 417.5, 835.5),
    "NVIDIA H200": (67.0, 494.5, 989.5),
    "NVIDIA H200 NVL": (60.0, 417.5, 835.5),
    "NVIDIA A100-SXM4-40GB": (19.5, 156.0, 312.0),
    "NVIDIA A100-SXM4-80GB": (19.5, 156.0, 312.0),
    "NVIDIA A100-PCIE-40GB": (19.5, 156.0, 312.0),
    "NVIDIA A100 80GB PCIe": (19.5, 156.0, 312.0),
    "NVIDIA L4": (30.3, 60.0, 121.0),
    "NVIDIA L40": (90.5, 90.5, 181.0),
    "NVIDIA L40S": (91.6, 183.0, 362.0),
    "NVIDIA B200": (75.0, 1100.0, 2250.0),
    "NVIDIA GB200": (80.0, 1250.0, 2500.0),
}
NO_TF32 = {"float32_matmul_precision": "highest", "cuda_matmul_allow_tf32": False, "cudnn_allow_tf32": False}
TORCH_DEFAULT = {"float32_matmul_precision": "highest", "cuda_matmul_allow_tf32": False, "cudnn_allow_tf32": True}


@pytest.mark.parametrize("name", list(CARDS))
def test_every_card_gets_its_own_peak_by_its_exact_name(name):
    """Item 10: names were matched by substring, so "H100 NVL" and "H200 NVL" got the SXM peak and
    "L40" matched "L4"."""
    from bench.envinfo import peak_tflops

    fp32, tf32, bf16 = CARDS[name]
    assert peak_tflops(name, "bf16", None)[0] == bf16
    assert peak_tflops(name, "fp16", None)[0] == bf16
    assert peak_tflops(name, "fp32", None, NO_TF32)[0] == pytest.approx(fp32)
    # torch's defaults run cuDNN's work (convolutions, RNNs) in TF32 and matmuls in fp32: an fp32
    # run is held to the rate of its own mix, a CNN's (all cuDNN) to TF32's, a transformer's to fp32's
    assert peak_tflops(name, "fp32", None, TORCH_DEFAULT, cudnn_share=1.0)[0] == pytest.approx(tf32)
    assert peak_tflops(name, "fp32", None, TORCH_DEFAULT, cudnn_share=0.0)[0] == pytest.approx(fp32)
    peak, source = peak_tflops(name, "fp32", None, TORCH_DEFAULT, cudnn_share=0.4)
    assert peak == pytest.approx(1 / (0.4 / tf32 + 0.6 / fp32)) and "40% of the FLOPs in cuDNN at tf32" in source
    both = {**TORCH_DEFAULT, "cuda_matmul_allow_tf32": True}
    assert peak_tflops(name, "fp32", None, both, cudnn_share=0.4)[0] == pytest.approx(tf32)


@pytest.mark.parametrize("name", ["NVIDIA H800", "NVIDIA GH200 480GB", "NVIDIA GeForce RTX 4090", "H100", "NVIDIA",
                                  "NVIDIA B300", "Tesla T4 (fake)", ""])
def test_an_unknown_card_has_no_mfu_and_says_how_to_give_one(name):
    from bench.envinfo import peak_tflops

    peak, source = peak_tflops(name, "bf16", None)
    assert peak is None
    if name:
        assert source == f"no peak known for {name}: pass --peak-tflops"
    assert peak_tflops(name, "bf16", 123.0) == (123.0, "--peak-tflops")


def test_the_math_settings_are_read_even_when_the_two_tf32_apis_are_mixed():
    """torch raises on reading cudnn.allow_tf32 once the new fp32_precision API set conv and RNN
    apart: the reading must not cost the result (it runs after training)."""
    from bench.envinfo import math_settings

    before = torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        s = math_settings()
        assert s["cudnn_allow_tf32"] is None and s["cudnn_conv_fp32_precision"] == "ieee"
    finally:
        torch.backends.cudnn.conv.fp32_precision = before


def test_the_flops_an_fp32_peak_depends_on_are_split_by_kind():
    """cuDNN's share of the forward FLOPs, from torch's flop counter: the CNN's are all
    convolutions but the head, the small transformer's mostly matmuls, wav2vec2's a mix."""
    from emotion_models.models import build_model

    def share(name):
        kinds = build_model(name, size="small", device="meta").block_flop_kinds(2)
        return sum(c for _, c in kinds) / sum(t for t, _ in kinds)

    assert share("cnn") > 0.99 and share("transformer") < 0.2 and 0.2 < share("wav2vec2-base") < 0.9


def test_the_math_settings_in_force_are_recorded(tmp_path):
    from bench import lifecycle
    from bench.config import RunConfig
    from bench.results import load_result

    r = load_result(lifecycle.run(RunConfig(size="tiny", epochs=1, batch_size=16, model_size="small",
                                            warmup_steps=1, device="cpu", out_dir=str(tmp_path))).path)
    f = r["flops"]
    assert f["mfu"] is None and f["peak_source"] == "no peak for a CPU: pass --peak-tflops"
    assert f["math_settings"]["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert f["math_settings"]["cudnn_allow_tf32"] is torch.backends.cudnn.allow_tf32


# ------------------------------------------------------------------------------------------ the estimate

def test_a_forwards_live_peak_by_hand():
    """The evaluation term: live tensors of a forward without autograd. Linear(16, 32), ReLU,
    Linear(32, 8) at batch 4, fp32: the input (256 B), the first output (512) and the ReLU's (512)
    are alive together: 1280 B; with an in-place ReLU its result is the first output: 896 B."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.memory import live_peak_bytes

    with FakeTensorMode():
        for inplace, peak in ((False, 1280), (True, 896)):
            m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(inplace=inplace), torch.nn.Linear(32, 8))
            assert live_peak_bytes(m, (4, 16)) == peak


def _saved_bytes(module, x) -> int:
    """What autograd saves for backward in module(x), counted here on its own (not bench.memory's
    code): bases of saved tensors that are not parameters."""
    params, saved = {id(p) for p in module.parameters()}, {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params:
            saved[id(base)] = base
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return sum(t.numel() * t.element_size() for t in saved.values()), out


def test_each_stage_is_charged_its_own_blocks_activations():
    """Item 11: the estimate took whole-model activations times the largest stage's parameter share.
    The speech encoders' conv front end holds about 3 % of the parameters and a third of the
    activations, all on stage 0. Per-block counts add up to the model's (counted independently
    here), the front end's share is what the issue says, and pipeline 1F1B charges stage 0 its own
    blocks' activations for its n micro-batches in flight."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench import memory
    from bench.config import RunConfig
    from emotion_models.models import build_model

    per_block = memory._measure_activation_bytes("wav2vec2-base", "base", 4, "fp32")
    with FakeTensorMode():
        m = build_model("wav2vec2-base")
        total, _ = _saved_bytes(m, torch.randn(4, 1, 48_000))
    assert sum(per_block) == total
    params = [sum(p.numel() for p in b.parameters()) for b in build_model("wav2vec2-base", device="meta").blocks]
    assert params[0] / sum(params) < 0.05 and per_block[0] / total > 0.25, (params[0] / sum(params), per_block[0] / total)
    cfg = RunConfig(model="wav2vec2-base", strategy="pipeline", devices=4, batch_size=4, schedule="1f1b")
    est = memory.estimate(cfg, "cuda", (1000, 100))
    stages = build_model("wav2vec2-base", device="meta").stage_boundaries(4)
    micro = memory.activation_bytes_per_block("wav2vec2-base", "base", 16 // 8, "fp32")
    assert est.stage == 0 and est.activations_bytes == sum(micro[stages[0][0]:stages[0][1]]) * 4


def test_the_estimate_adds_the_split_setup_evaluation_and_what_the_allocator_never_sees():
    """Item 11, by hand for fsdp x8 on CUDA: the training split resident on every GPU, the full fp32
    model built before sharding, rank 0's evaluation copy and forward, the context and NCCL."""
    from bench import memory
    from bench.config import RunConfig

    cfg = RunConfig(model="cnn", strategy="fsdp", devices=8, batch_size=32)
    est = memory.estimate(cfg, "cuda", (1000, 120))
    params, largest, _ = memory._shape("cnn", "base")
    assert est.weights_bytes == 16 * params // 8 and est.extra_bytes == largest * (2 * 4 + 4)
    assert est.activations_bytes == memory.activation_bytes("cnn", "base", 32, "fp32")
    assert est.data_bytes == 4 * 1000 * 64 * 401  # float32 (N, 64 mel bands, 401 cached frames)
    assert est.setup_bytes == 4 * params
    assert est.eval_bytes == 4 * params + memory.eval_activation_bytes("cnn", "base", 120, "fp32")
    assert est.outside_bytes == memory.CONTEXT_BYTES + memory.NCCL_BYTES
    assert est.total_bytes == max(est.setup_bytes, est.training_bytes, est.evaluation_bytes) + est.outside_bytes
    single = memory.estimate(cfg.replace(strategy="single", devices=1), "cuda", (1000, 120))
    assert single.outside_bytes == memory.CONTEXT_BYTES and single.eval_bytes == est.eval_bytes - 4 * params


# ------------------------------------------------------------------------------------------ GPU breakdown

KINETO = __import__("pathlib").Path(__file__).parent / "data" / "kineto_cuda_ddp_rank0.json.gz"


def _union_us(intervals) -> float:
    """Length of a union of intervals, by a sweep written here (not bench.breakdown's)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def test_the_gpu_optimizer_part_is_the_device_time_of_what_the_optimizer_launched():
    """Item 12, on a real Kineto trace of a CUDA training run (DDP over NCCL on A100s, rank 0; one
    step of HolisticTraceAnalysis's test data, see tests/data/README.md). The optimiser's part was
    its CPU range; the host runs ahead of the device, so it is the kernels launched inside that
    range. An independent reader ties launches to kernels by the trace's flow events (ac2g), not by
    the correlation ids bench/profiling.py reads, and measures with its own interval sweep."""
    import gzip
    import json

    from bench.breakdown import breakdown
    from bench.profiling import read_trace

    steps = read_trace(KINETO, step="ProfilerStep#", optimizer="Optimizer.step#")
    got = breakdown([steps]).to_dict()
    events = json.load(gzip.open(KINETO))["traceEvents"]
    step = next(e for e in events if e["name"].startswith("ProfilerStep#") and e.get("cat") == "user_annotation")
    s, e = step["ts"], step["ts"] + step["dur"]
    opt = [(x["ts"], x["ts"] + x["dur"]) for x in events if x["name"].startswith("Optimizer.step#")
           and x.get("cat") == "user_annotation" and x["tid"] == step["tid"]]
    started = {f["id"] for f in events if f.get("cat") == "ac2g" and f["ph"] == "s" and f["tid"] == step["tid"]
               and any(a <= f["ts"] < b for a, b in opt)}
    landed = {(f["pid"], f["tid"], f["ts"]) for f in events if f.get("cat") == "ac2g" and f["ph"] == "f"
              and f["id"] in started}
    device = [x for x in events if x.get("ph") == "X" and x.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
              and s <= x["ts"] < e]
    on_opt = [(x["ts"], min(x["ts"] + x["dur"], e)) for x in device if (x["pid"], x["tid"], x["ts"]) in landed]
    assert on_opt, "the optimiser launched kernels in this step"
    assert got["parts_ms"]["optimizer"] == pytest.approx(_union_us(on_opt) / 1000, rel=1e-9)
    # the rest of the device's compute: every other kernel but NCCL's, what the optimiser's does not cover
    kernels = [(x["ts"], min(x["ts"] + x["dur"], e)) for x in device if x["cat"] == "kernel"
               and "nccl" not in x["name"].lower()]
    compute_us = _union_us(kernels + on_opt) - _union_us(on_opt)
    assert got["parts_ms"]["compute"] == pytest.approx(compute_us / 1000, rel=1e-9)
    # the CPU range, what the old rule took, is another figure altogether
    cpu_range = _union_us([(max(a, s), min(b, e)) for a, b in opt if b > s and a < e])
    assert abs(cpu_range - _union_us(on_opt)) > 0.5 * _union_us(on_opt), (cpu_range, _union_us(on_opt))
    # NCCL's kernels are communication: DDP's 5 bucket all-reduces and 2 broadcasts of this step
    assert {k: v["count_per_step"] for k, v in got["collectives"].items()} == {"all_reduce": 5, "broadcast": 2}


def test_collective_sizes_come_from_launches_on_any_thread(tmp_path):
    """Suspected in the review, seen in the real trace above: on CUDA, DDP launches its all-reduce
    from autograd's thread (c10d::allreduce_ on another tid than the step's). Only the training
    thread's launches were read, so such a collective had no size."""
    import gzip
    import json

    from bench.breakdown import breakdown
    from bench.profiling import OPTIMIZER, STEP, read_trace

    def x(name, cat, tid, ts, dur, **args):
        return {"ph": "X", "name": name, "cat": cat, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}

    events = [x(STEP, "user_annotation", 10, 0, 1000),
              x("aten::mm", "cpu_op", 10, 10, 50),
              x("c10d::allreduce_", "cpu_op", 11, 100, 20, **{"Input Dims": [[[1024, 256]]], "Input type": ["TensorList(float)"]}),
              x("cudaLaunchKernel", "cuda_runtime", 11, 110, 5, correlation=7),
              x("ampere_sgemm", "kernel", 40, 200, 100, correlation=5),
              x("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevComm*)", "kernel", 41, 300, 400, correlation=7),
              x(OPTIMIZER, "user_annotation", 10, 800, 100)]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    got = breakdown([read_trace(path)]).to_dict()
    assert got["collectives"]["all_reduce"]["bytes_per_step"] == 1024 * 256 * 4
    assert got["parts_ms"]["optimizer"] == 0.0  # it launched nothing on the device in this trace


# ------------------------------------------------------------------------------------------ gpu_check

def _gpu_result(**changes):
    """A finished H100 run's result, as the invariants read it; `changes` are dotted keys."""
    r = {"status": "ok", "error": None, "config": {"devices": 1},
         "env": {"gpus": [{"memory_bytes": 80 * GiB}]},
         "flops": {"mfu": 0.31, "peak_tflops_per_device": 989.5, "peak_source": "data sheet (H100 SXM, bf16, dense)"},
         "throughput": {"timed_window_s": 10.0, "measured_steps": 90},
         "utilization": {"gpu_busy_percent_mean": 97.0, "gpu_energy_j": 6200.0, "gpu_power_w_mean": 640.0,
                         "gpu_energy_source": "nvml-energy-counter", "samples_in_windows": 50,
                         "peak_allocated_bytes": 11 * GiB},
         "memory": {"estimate": {"training_bytes": 10 * GiB}, "training_measured_over_estimated": 1.1,
                    "measured": {"outside_allocator_bytes": GiB // 2}},
         "losses": [1.0] * 100}
    for key, value in changes.items():
        *path, last = key.split(".")
        d = r
        for p in path:
            d = d[p]
        d[last] = value
    return r


def test_gpu_checks_pass_a_sound_result_and_fail_each_broken_figure():
    from bench import invariants

    assert all(c.ok for c in invariants.of_run(_gpu_result()))
    broken = {
        "status": ("status", "failed"), "flops.mfu": ("0 < MFU < 1", 1.7), "utilization.gpu_busy_percent_mean":
        ("busy % in [0, 100]", None), "utilization.gpu_energy_j": ("energy within 25% of power x window", 2000.0),
        "utilization.peak_allocated_bytes": ("peak memory under the card's", 81 * GiB),
        "memory.training_measured_over_estimated": ("peak within 30% of the estimate", 1.45),
    }
    for key, (name, value) in broken.items():
        checks = {c.name: c for c in invariants.of_run(_gpu_result(**{key: value}))}
        assert checks[name].ok is False, (key, checks[name])
        assert sum(c.ok is False for c in checks.values()) == 1, key  # that check alone
    # a window too short for NVML's power samples: cannot tell, said so, not a pass
    c = invariants.energy(_gpu_result(**{"utilization.samples_in_windows": 3}))
    assert c.ok is None and "too short" in c.detail
    # MFU null (a card the table does not know) is a failure, with the reason
    c = invariants.mfu(_gpu_result(**{"flops.mfu": None, "flops.peak_source": "no peak known for X: pass --peak-tflops"}))
    assert c.ok is False and "no peak known" in c.detail
    single, sharded = _gpu_result(), _gpu_result(**{"config.devices": 4, "utilization.peak_allocated_bytes": 4 * GiB})
    assert invariants.sharding_saves_memory(single, sharded).ok
    assert not invariants.sharding_saves_memory(sharded, single).ok


@pytest.mark.parametrize("how", [["-m", "benchmarks.gpu_check"], ["benchmarks/gpu_check.py"]], ids=["module", "script"])
def test_gpu_check_refuses_in_one_line_without_cuda(tmp_path, how):
    """Both ways of starting it (the GPU machine uses -m: no installed package there)."""
    import subprocess
    import sys

    from conftest import ROOT

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check would run")
    proc = subprocess.run([sys.executable, *how, "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no CUDA GPU on this machine" in proc.stderr and not list(tmp_path.iterdir())


def test_gpu_check_runs_checks_and_reports_a_cell(tmp_path, monkeypatch, capsys):
    """The script's own plumbing on this CPU: a real cell run (on the CPU here), its result read
    and checked, the verdicts printed and written to gpu_check.json and gpu_check.md."""
    import importlib.util
    import json

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, "gpu_check", gc)  # dataclasses look their module up
    spec.loader.exec_module(gc)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc, "card", lambda: {"name": "NVIDIA H100 80GB HBM3", "count": 1, "memory_bytes": 80 * GiB,
                                             "free_bytes": 79 * GiB, "driver": "test"})
    monkeypatch.setattr(gc, "largest_fitting", lambda free: None)
    real = gc.run_cell
    monkeypatch.setattr(gc, "run_cell", lambda cell, out, timeout_s: real(cell, out, timeout_s, device="cpu"))
    monkeypatch.setattr(gc, "CNN", ["--size", "tiny", "--epochs", "1", "--batch-size", "16", "--model-size", "small"])
    monkeypatch.setattr("sys.argv", ["gpu_check.py", "--out", str(tmp_path), "--only",
                                     "cnn single: planted out-of-memory error"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert gc.main() == 0  # the planted OOM's checks pass on a CPU too
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (cell,) = report["cells"]
    assert [k["ok"] for k in cell["checks"]] == [True, True] and cell["result"]
    assert "| cnn single: planted out-of-memory error | the one-line OOM result | ok |" in (tmp_path / "gpu_check.md").read_text()
    out = capsys.readouterr().out
    assert "gpu_check: 2 checks, 0 failed" in out


def test_gpu_check_reads_an_energy_tunes_record(tmp_path, monkeypatch):
    """The energy tune cell is judged by its tune.json, not its exit code alone: samples/J, a winner,
    every window above 0; a record in samples/s or with a 0 window fails."""
    import importlib.util
    import json

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, "gpu_check", gc)
    spec.loader.exec_module(gc)
    (cell,) = [c for c in gc.one_gpu_cells() if c.expect == "tune"]
    ran = {"argv": [*cell.argv, "--device", "cuda", "--out", str(tmp_path)], "exit": 0, "stderr_tail": ""}
    rec = {"unit": "samples/J", "winner": "w", "candidates": [{"windows": [2.5, 2.4]}, {"windows": []}]}
    (tmp_path / "tune.json").write_text(json.dumps(rec))
    assert [c["ok"] for c in gc.check_cell(cell, ran)] == [True, True, True]
    (tmp_path / "tune.json").write_text(json.dumps({**rec, "unit": "samples/s", "candidates": [{"windows": [0.0]}]}))
    assert [c["ok"] for c in gc.check_cell(cell, ran)] == [True, False, False]
    (tmp_path / "tune.json").unlink()
    assert [c["ok"] for c in gc.check_cell(cell, {**ran, "exit": 1})] == [False, False, False]
