"""The strategy matrix on CPU with real processes: gloo, world size 2, tiny models."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

from bench.results import load_result
from conftest import ROOT, bench, no_process_outlives, probe

TINY = ["--size", "tiny", "--epochs", "2", "--batch-size", "8", "--model-size", "small", "--warmup-steps", "2",
        "--device", "cpu"]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return load_result(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("strategy,extra", [
    ("ddp", ["--precision", "bf16"]),
    ("fsdp", ["--precision", "bf16"]),
    ("pipeline", ["--schedule", "gpipe", "--microbatches", "4"]),
    ("independent", []),
])
def test_multiprocess_strategy_end_to_end(tmp_path, strategy, extra):
    probes = tmp_path / "probe"
    probes.mkdir()
    proc = bench("run", "--strategy", strategy, "--gpus", "2", *TINY, *extra, "--out", tmp_path,
                 env={"EMOTION_BENCH_PROBE": str(probes)})
    r = _ok(proc)
    assert "2 CPU worker processes with gloo" in proc.stdout
    # rank 0's line per epoch, relayed by the launcher from the workers' log as it comes
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("epoch ")] == \
        ["epoch 1/2", "epoch 2/2"], proc.stdout
    c = r["config"]
    assert (c["strategy"], c["devices"], c["world_size"], c["backend"], c["device_type"]) == (strategy, 2, 2, "gloo", "cpu")
    assert c["global_batch_size"] == 16 and c["batch_size_per_device"] == 8
    assert len(r["utilization"]["per_rank"]) == 2 and all(x["peak_rss_bytes"] > 0 for x in r["utilization"]["per_rank"])
    # each step's time is its slowest rank's, so its median is at least each rank's own median
    own = [x["own_step_time_ms_p50"] for x in r["utilization"]["per_rank"]]
    assert all(0 < t <= r["throughput"]["step_time_ms_p50"] * (1 + 1e-9) for t in own), (own, r["throughput"])
    assert r["throughput"]["samples_per_s"] > 0 and len(r["losses"]) == r["timing"]["steps"]
    assert all(l == l and l > 0 for l in r["losses"])  # finite, global mean over ranks
    assert r["quality"]["test"]["num_samples"] > 0
    if strategy == "pipeline":
        assert c["num_microbatches"] == 4 and c["schedule"] == "gpipe"
        assert c["bubble_fraction"] == pytest.approx(1 / 5)
    assert len(list(tmp_path.glob("*.json"))) == 1  # rank 0 alone writes
    seen = [probe(probes, rank) for rank in (0, 1)]
    if strategy == "ddp":  # autocast: bf16 compute on fp32 weights, every rank holds them all
        for s in seen:
            assert s["modules"]["Conv2d"] == {"output": "torch.bfloat16", "params": ["torch.float32"]}
            assert all(p["local"] == p["global"] and p["dtype"] == "torch.float32" for p in s["params"])
        # every rank steps with the all-reduced gradients (the same on both, though the slices differ)
        assert seen[0]["grad_projection"] == pytest.approx(seen[1]["grad_projection"], rel=1e-6)
    if strategy == "independent":  # each replica steps with its own slice's gradients: none exchanged
        assert all(p["local"] == p["global"] for s in seen for p in s["params"])
        assert seen[0]["grad_projection"] != pytest.approx(seen[1]["grad_projection"], rel=1e-3)
    if strategy == "fsdp":  # MixedPrecisionPolicy: bf16 weights in the forward, BatchNorm kept fp32
        for s in seen:
            assert s["modules"]["Conv2d"] == {"output": "torch.bfloat16", "params": ["torch.bfloat16"]}
            assert s["modules"]["BatchNorm2d"]["params"] == ["torch.float32"]
            assert all(p["type"] == "DTensor" and p["dtype"] == "torch.float32" for p in s["params"])
        # sharded: each parameter's two shards add up to it, and each rank holds about half of the model
        assert [a["local"] + b["local"] for a, b in zip(seen[0]["params"], seen[1]["params"])] == \
               [p["global"] for p in seen[0]["params"]]
        total = sum(p["global"] for p in seen[0]["params"])
        for s in seen:
            assert 0.45 < sum(p["local"] for p in s["params"]) / total < 0.55


def test_conformer_trains_under_fsdp_bf16(tmp_path):
    """BatchNorm's own fp32 group under FSDP2 gave an fp32 output that torchaudio's conformer feeds
    straight into a bf16 Conv1d ("Input type (float) and bias type (c10::BFloat16) should be the
    same"): it now casts its output back. Every model with BatchNorm inside a block needs it."""
    probes = tmp_path / "probe"
    probes.mkdir()
    r = _ok(bench("run", "--strategy", "fsdp", "--gpus", "2", "--model", "conformer", "--model-size", "small",
                  "--precision", "bf16", "--size", "tiny", "--epochs", "1", "--batch-size", "4", "--max-steps", "3",
                  "--warmup-steps", "1", "--device", "cpu", "--out", tmp_path, env={"EMOTION_BENCH_PROBE": str(probes)}))
    assert r["status"] == "ok" and len(r["losses"]) == 3 and all(l == l for l in r["losses"])
    for rank in (0, 1):
        seen = probe(probes, rank)["modules"]
        # (the probe's global hook sees BatchNorm's output before FSDP2's own hook casts it)
        assert seen["BatchNorm1d"]["params"] == ["torch.float32"]
        assert seen["Conv1d"] == {"output": "torch.bfloat16", "params": ["torch.bfloat16"]}


@pytest.mark.parametrize("strategy", ["dp", "model-parallel"])
def test_cuda_only_strategies_fail_clearly_on_cpu(tmp_path, strategy):
    proc = bench("run", "--strategy", strategy, "--gpus", "2", *TINY, "--device", "cpu", "--out", tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "needs CUDA" in proc.stderr and "ddp" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_impossible_combinations_fail_before_starting(tmp_path):
    from bench.config import ConfigError, RunConfig
    from bench.strategies import check_strategy

    cases = [
        (dict(strategy="pipeline", devices=6), "at most 5 stages"),
        (dict(strategy="pipeline", devices=2, microbatches=3), "micro-batches"),
        (dict(strategy="single", devices=2), "uses one device"),
        (dict(strategy="ddp", devices=2, sync_bn=True), "--sync-bn needs CUDA"),
        (dict(strategy="pipeline", devices=2, precision="fp16"), "fp16 needs CUDA"),
        (dict(strategy="ddp", devices=3, nodes=2, rdzv_endpoint="127.0.0.1:1"), "does not divide"),
        (dict(strategy="ddp", devices=2, nodes=2), "needs --rdzv-endpoint"),
        (dict(strategy="pipeline", devices=2, grad_accum=2), "raise --microbatches"),
        (dict(strategy="ddp", devices=2, offload=True), "use it with --strategy fsdp"),
        (dict(strategy="fsdp", devices=2, offload=True), "on CPU they live on the host already"),
        (dict(strategy="ddp", devices=2, reshard_after_forward="false"), "applies to --strategy fsdp"),
        (dict(strategy="ddp", devices=2, ac="some"), "--ac some is not one of none, full, selective"),
        (dict(strategy="ddp", devices=2, grad_accum=0), "--grad-accum must be at least 1"),
        (dict(strategy="ddp", devices=2, scaling="strong", grad_accum=3), "use a multiple of 6"),
        (dict(strategy="tp", devices=8, model="wavlm-base"), "4 attention heads .* degree 8"),
        (dict(strategy="tp", devices=2, model="cnn"), "no attention and feed-forward layers"),
        (dict(strategy="fsdp", devices=16, tp=8, model="transformer"), "4 attention heads .* degree 8"),
        (dict(strategy="ddp", devices=4, tp=2), "--tp 2 composes with --strategy fsdp or hsdp"),
        (dict(strategy="ddp", devices=4, dp_replicate=2), "use it with --strategy fsdp or hsdp"),
        (dict(strategy="fsdp", devices=4, tp=3, model="transformer"), "does not split into 1 replicas x 3"),
        (dict(strategy="hsdp", devices=4, model="transformer"), "give --dp-replicate R"),
        (dict(strategy="tp", devices=4, tp=2, model="transformer"), "use --strategy fsdp --tp"),
        (dict(strategy="fsdp", devices=4, tp=0), "--tp must be at least 1"),
        (dict(strategy="tp", devices=5, model="wav2vec2-base"), "must divide by the tensor-parallel degree"),
        (dict(strategy="tp-rank", devices=2, tp=2, model="transformer"), "use --gpus 1 --tp T"),
        (dict(strategy="tp-rank", devices=1, model="transformer"), "use --gpus 1 --tp T"),
        (dict(strategy="tp-rank", devices=1, tp=8, model="transformer"), "4 attention heads .* degree 8"),
        (dict(strategy="tp-rank", devices=1, tp=2, model="cnn"), "no attention and feed-forward layers"),
        (dict(strategy="pipeline", devices=2, schedule="interleaved-1f1b", stages_per_rank=3), "2 x 3 stages"),
        (dict(strategy="ddp", devices=4, pp=2), "--pp 2 is the pipeline's degree"),
        (dict(strategy="pipeline", devices=4, pp=3), "does not split into pipelines of --pp 3"),
        (dict(strategy="pipeline", devices=12, pp=6), "--pp 6: 6 stages, but cnn has 5 blocks"),
        (dict(strategy="pipeline", devices=4, pp=2, schedule="zero-bubble"), "zero-bubble with --pp 2"),
        (dict(strategy="pipeline", devices=4, pp=2, microbatches=3), "2 pipelines x 3 micro-batches"),
    ]
    for kwargs, text in cases:
        cfg = RunConfig(model_size="small", batch_size=8, **kwargs)
        with pytest.raises(ConfigError, match=text):
            cfg.validate()
            check_strategy(cfg, "cpu")
    # and through the CLI: one line, exit 2, no result file
    proc = bench("run", *TINY, "--strategy", "pipeline", "--gpus", "6", "--out", tmp_path)
    assert proc.returncode == 2 and "at most 5 stages" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def _parity_exact(model: str, cells: tuple[str, ...]) -> None:
    proc = bench("parity", "--gpus", "2", "--model", model, "--model-size", "small", "--steps", "4",
                 "--batch-size", "8", "--strategies", ",".join(cells), "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│ ")]
    for cell in cells:
        assert any(r.split("│")[1].strip() == cell and "exact" in r and "ok" in r for r in rows), proc.stdout
    assert "FAIL" not in proc.stdout


def test_parity_exact_for_batch_independent_models():
    """No BatchNorm: each strategy computes the same mathematics as single. The default run checks
    one model and one pipeline schedule (each cell is a 2-process launch, the single reference one
    more; interleaved-1f1b cuts it into 2 x 2 stages); -m slow runs every cell and schedule for lstm and
    wav2vec2."""
    _parity_exact("wav2vec2-base", ("ddp", "fsdp", "pipeline:1f1b", "pipeline:interleaved-1f1b"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lstm", "wav2vec2-base"])
def test_parity_exact_every_strategy(model):
    _parity_exact(model, ("ddp", "fsdp", "pipeline:gpipe", "pipeline:1f1b", "pipeline:interleaved-1f1b",
                          "pipeline:zero-bubble"))


def test_accumulation_and_checkpointing_train_singles_model_and_sync_once(tmp_path):
    """ddp and fsdp with --grad-accum 2 --ac full against plain single, the same global batch: the
    same mathematics (transformer: no BatchNorm; dropout off; the recompute replays the RNG), so the
    exact basis. And the accumulation holds gradients back: the reductions torch starts up to the
    first optimiser step (DDP buckets handed to the comm hook, FSDP2 group reduces, counted by the
    probe) are as many with 2 micro-steps as with 1."""
    proc = bench("parity", "--gpus", "2", "--model", "transformer", "--model-size", "small", "--steps", "3",
                 "--batch-size", "8", "--strategies", "ddp,fsdp", "--grad-accum", "2", "--ac", "full", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--grad-accum 2, --ac full" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│ ")]
    for cell in ("ddp", "fsdp"):
        assert any(r.split("│")[1].strip() == cell and "exact" in r and "ok" in r for r in rows), proc.stdout
    counts = {}
    for strategy, k in (("ddp", 2), ("fsdp", 1), ("fsdp", 2)):
        folder = tmp_path / f"{strategy}{k}"
        folder.mkdir()
        got = bench("run", *TINY, "--strategy", strategy, "--gpus", "2", "--grad-accum", str(k), "--max-steps", "1",
                    "--epochs", "1", "--warmup-steps", "0", "--out", folder, env={"EMOTION_BENCH_PROBE": str(folder)})
        assert got.returncode == 0, got.stdout + got.stderr
        counts[strategy, k] = probe(folder, 0)["reductions"]
        (result,) = [load_result(f) for f in folder.glob("*.json") if not f.name.startswith("probe")]
        assert result["config"]["grad_accum"] == k and result["config"]["batch_size_per_device"] == 8
        assert result["config"]["global_batch_size"] == 2 * 8 * k
    # the cnn's gradients fit one of DDP's 25 MiB buckets: one all-reduce a step, however many micro-steps
    from emotion_models.models import build_model

    assert 4 * sum(p.numel() for p in build_model("cnn", size="small", device="meta").parameters()) < 25 * 2**20
    assert counts["ddp", 2]["ddp_buckets"] == 1, counts
    assert counts["fsdp", 2]["fsdp_reduces"] == counts["fsdp", 1]["fsdp_reduces"] >= 1, counts


def test_parity_batchnorm_tolerance(tmp_path):
    from bench.parity import BASES, ParityRow, tolerance

    assert tolerance("ddp", 2, "cnn", "fp32", False)[2] == "batchnorm"
    assert tolerance("ddp", 2, "lstm", "fp32", False)[2] == "exact"
    assert tolerance("fsdp", 2, "lstm", "bf16", False)[2] == "bf16"
    assert tolerance("fsdp", 2, "lstm", "fp32", False, grad_accum=2)[2] == "exact"
    assert tolerance("ddp", 2, "cnn", "fp32", True, grad_accum=2)[2] == "batchnorm"  # micro-batch statistics
    assert not ParityRow("x", BASES["exact"][0] * 2, 0.0, *BASES["exact"][:2], "exact").ok
    proc = bench("parity", "--gpus", "2", "--model", "cnn", "--strategies", "ddp", "--steps", "4", "--device", "cpu")
    assert proc.returncode == 0 and "batchnorm" in proc.stdout, proc.stdout + proc.stderr


def test_parity_catches_a_planted_deviation():
    """Rank 1 stops applying its gradients at step 2 (a replica out of step): parity must fail."""
    proc = bench("parity", "--gpus", "2", "--model", "lstm", "--strategies", "ddp", "--steps", "4", "--device", "cpu",
                 env={"EMOTION_BENCH_FAULT": "grad:1:2"})
    assert proc.returncode == 1 and "error:" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    # the cell ran and deviated beyond the exact tolerance (1e-4): a measured failure, not a crash
    row = next(line for line in proc.stdout.splitlines() if line.startswith("│ ddp"))
    assert float(row.split("│")[2]) > 1e-4 and "FAIL" in row, proc.stdout


def test_parity_refuses_independent_before_running(capsys):
    from conftest import invoke

    code, out = invoke(["parity", "--gpus", "2", "--strategies", "ddp,independent", "--device", "cpu"], capsys)
    assert code == 2 and "independent trains N separate replicas" in out and "Traceback" not in out, out


def test_parity_exits_non_zero_on_a_failed_cell():
    proc = bench("parity", "--gpus", "2", "--model", "lstm", "--strategies", "nosuch", "--steps", "2", "--device", "cpu")
    assert proc.returncode == 1 and "FAIL" in proc.stdout and "unknown strategy" in proc.stderr


def test_compile_aot_eager_ddp(tmp_path):
    r = _ok(bench("run", "--strategy", "ddp", "--gpus", "2", *TINY, "--epochs", "1", "--compile", "--compile-backend",
                  "aot_eager", "--out", tmp_path, env={"EMOTION_BENCH_PROBE": str(tmp_path)}))
    assert r["config"]["compile"] is True and r["throughput"]["samples_per_s"] > 0
    for rank in (0, 1):  # dynamo's own count: every rank captured graphs
        assert probe(tmp_path, rank)["dynamo_graphs"] >= 1


def test_compile_aot_eager_single_matches_eager(tmp_path):
    for d in ("e", "c"):
        (tmp_path / d).mkdir()
    eager = _ok(bench("run", *TINY, "--out", tmp_path / "e", env={"EMOTION_BENCH_PROBE": str(tmp_path / "e")}))
    comp = _ok(bench("run", *TINY, "--compile", "--compile-backend", "aot_eager", "--out", tmp_path / "c",
                     env={"EMOTION_BENCH_PROBE": str(tmp_path / "c")}))
    torch.testing.assert_close(torch.tensor(comp["losses"]), torch.tensor(eager["losses"]), rtol=1e-3, atol=1e-4)
    # a --compile that did nothing would pass the line above: dynamo's counter says it compiled
    assert probe(tmp_path / "e", 0)["dynamo_graphs"] == 0
    assert probe(tmp_path / "c", 0)["dynamo_graphs"] >= 3  # at least one graph per block of the cnn


@pytest.mark.slow
def test_compile_inductor(tmp_path):
    r = _ok(bench("run", *TINY, "--compile", "--out", tmp_path))
    assert r["config"]["compile_backend"] == "inductor"


def test_killed_worker_ends_the_run_with_a_failed_result(tmp_path):
    t = time.monotonic()
    proc = bench("run", "--strategy", "ddp", "--gpus", "2", *TINY, "--timeout-s", "30", "--out", tmp_path,
                 env={"EMOTION_BENCH_FAULT": "kill:1:3", "EMOTION_BENCH_TEST_TAG": "killed"}, timeout=180)
    assert time.monotonic() - t < 120  # bounded, not fast: generous for a busy 2-core machine (usually ~30 s)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    r = load_result(proc.stdout.strip().splitlines()[-1])
    assert r["status"] == "failed" and "rank 1" in r["error"] and "SIGKILL" in r["error"]
    assert no_process_outlives("killed")


def test_hung_worker_is_bounded_by_the_timeout(tmp_path):
    t = time.monotonic()
    # 15 s, not less: on a busy 2-core machine a healthy collective has been seen to take seconds
    proc = bench("run", "--strategy", "ddp", "--gpus", "2", *TINY, "--timeout-s", "15", "--out", tmp_path,
                 env={"EMOTION_BENCH_FAULT": "hang:1:3", "EMOTION_BENCH_TEST_TAG": "hung"}, timeout=180)
    assert time.monotonic() - t < 120  # bounded, not fast: generous for a busy 2-core machine (usually ~30 s)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    r = load_result(proc.stdout.strip().splitlines()[-1])
    # the hung rank is named, with what its peer saw (the collective's timeout)
    assert r["status"] == "failed" and "rank 1 died" in r["error"], r["error"]
    assert re.search(r"timed? ?out", r["error"], re.I), r["error"]
    assert no_process_outlives("hung")


def test_failing_rank_is_named_not_the_peer_that_lost_it(tmp_path):
    proc = bench("run", "--strategy", "ddp", "--gpus", "2", *TINY, "--out", tmp_path,
                 env={"EMOTION_BENCH_FAULT": "raise:1:3"}, timeout=180)
    assert proc.returncode == 1
    r = load_result(proc.stdout.strip().splitlines()[-1])
    assert r["error"].startswith("rank 1 failed: RuntimeError: injected fault on rank 1"), r["error"]
    log = tmp_path / f"{r['run_id']}.torchrun.log"  # the worker log is kept beside the failed result
    assert log.exists() and "Traceback" in log.read_text() and "injected fault on rank 1" in log.read_text()
    assert str(log) in proc.stderr


_TORCHRUN_SUMMARY = """
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : 143 (pid: 101)
  error_file: <N/A>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 102)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 102
"""


def test_a_rank_that_torchrun_stopped_is_not_the_cause_and_keeps_its_steps(tmp_path, monkeypatch):
    """The race seen in CI: rank 1 is killed, and torchrun's SIGTERM reaches rank 0 before its next
    collective fails, so rank 0 writes an interrupted result and exits 143. The run failed because
    of rank 1, not a signal to the launcher: failed, exit 1, rank 0's measured steps kept."""
    from bench import launch, lifecycle
    from bench.config import RunConfig
    from test_sweep_report import fixture_result

    message, rank = launch._failure_message(str(tmp_path), _TORCHRUN_SUMMARY, 1)
    assert rank == 1 and message.startswith("rank 1 died (killed by SIGKILL)"), message
    prior = {**fixture_result(strategy="ddp", devices=2, status="interrupted"),
             "error": "interrupted by SIGTERM at step 4 of 12", "losses": [1.9, 1.8, 1.7]}
    (tmp_path / f"{prior['run_id']}.json").write_text(json.dumps(prior))
    monkeypatch.setattr(launch, "launch", lambda *a, **k: launch.Launched(ok=False, error=message, failed_rank=1))
    cfg = RunConfig(strategy="ddp", devices=2, device="cpu", out_dir=str(tmp_path), run_id=prior["run_id"])
    out = lifecycle._launched(cfg, "cpu", None, time.perf_counter(), lambda _: None)
    r = load_result(out.path)
    assert (out.status, out.code, r["status"]) == ("failed", 1, "failed")
    assert r["error"].startswith("rank 1 died (killed by SIGKILL)") and "rank 0 was stopped" in r["error"]
    assert r["losses"] == [1.9, 1.8, 1.7]
    # rank 0's own signal (the launcher not signalled, no other rank the cause) stays interrupted
    (tmp_path / f"{prior['run_id']}.json").write_text(json.dumps(prior))
    monkeypatch.setattr(launch, "launch", lambda *a, **k: launch.Launched(ok=False, error="x", failed_rank=0))
    assert lifecycle._launched(cfg, "cpu", None, time.perf_counter(), lambda _: None).status == "interrupted"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost(tmp_path):
    for attempt in range(3):
        # the port is free when asked, but another process may take it before torchrun binds it:
        # then the rendezvous fails (said in the worker logs kept beside the failed results) and
        # the test asks for another port, into a fresh folder
        port, out = _free_port(), tmp_path / f"try{attempt}"
        procs = [subprocess.Popen([sys.executable, "-m", "bench", "run", "--strategy", "ddp", "--gpus", "2", *TINY,
                                   "--nnodes", "2", "--node-rank", str(r), "--rdzv-endpoint", f"127.0.0.1:{port}",
                                   "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        outs = [p.communicate(timeout=300) for p in procs]
        said = "".join(o + e for o, e in outs) + "".join(p.read_text(errors="replace") for p in out.glob("*.torchrun.log"))
        if not re.search(r"address already in use|EADDRINUSE", said, re.I):
            break
    assert all(p.returncode == 0 for p in procs), outs
    files = list(out.glob("*.json"))
    assert len(files) == 1
    r = load_result(files[0])
    assert (r["config"]["nodes"], r["config"]["world_size"], r["config"]["devices"]) == (2, 2, 2)
    assert sum("rank 0 on another node" in o for o, _ in outs) == 1


def test_users_own_torchrun(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "bench", "run", "--strategy", "ddp", *TINY, "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    r = load_result(files[0])
    assert r["config"]["devices"] == 2 and r["config"]["world_size"] == 2


gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(gpus < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("strategy", ["dp", "model-parallel", "ddp", "fsdp", "pipeline"])
def test_multi_gpu_strategies(tmp_path, strategy):
    r = _ok(bench("run", "--strategy", strategy, "--gpus", "2", *TINY, "--device", "cuda", "--out", tmp_path))
    assert r["config"]["device_type"] == "cuda"


def test_every_preset_is_a_mesh_of_degrees_with_each_ranks_coordinates():
    from bench.config import RunConfig
    from bench.strategies import parallelism

    fsdp = parallelism(RunConfig(strategy="fsdp", devices=4))
    assert fsdp["degrees"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "tp": 1}
    assert fsdp["mesh_shape"] == [4] and fsdp["mesh_dims"] == ["dp_shard"]
    assert [fsdp["rank_coords"][str(r)]["dp_shard"] for r in range(4)] == [0, 1, 2, 3]
    assert parallelism(RunConfig(strategy="ddp", devices=2))["degrees"]["dp_replicate"] == 2
    assert parallelism(RunConfig(strategy="pipeline", devices=3))["mesh_dims"] == ["pp"]
    single = parallelism(RunConfig())
    assert single["mesh_shape"] == [] and single["rank_coords"] == {"0": {}}
    independent = parallelism(RunConfig(strategy="independent", devices=2))
    assert independent["mesh_shape"] == [] and independent["replicas"] == 2
    # 2-D and HSDP: the innermost dimension's ranks are neighbours (rank = (r x S + s) x T + t)
    two_d = parallelism(RunConfig(devices=64, tp=8))  # --tp without a strategy: fsdp over the rest
    assert two_d["degrees"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 8, "tp": 8}
    assert two_d["mesh_dims"] == ["dp_shard", "tp"] and two_d["rank_coords"]["11"] == {"dp_shard": 1, "tp": 3}
    three = parallelism(RunConfig(strategy="hsdp", devices=16, nodes=2, tp=2, rdzv_endpoint="h:1"))
    assert three["mesh_shape"] == [2, 4, 2] and three["rank_coords"]["13"] == {"dp_replicate": 1, "dp_shard": 2, "tp": 1}
    assert RunConfig(devices=4, tp=4).strategy == "tp" and RunConfig(devices=4, tp=2).strategy == "fsdp"
    # one run, one name: --tp N or --pp N over all N devices is the strategy itself
    from bench.cells import cell_key

    assert cell_key(RunConfig(devices=4, tp=4)) == cell_key(RunConfig(strategy="tp", devices=4))
    assert cell_key(RunConfig(devices=4, pp=4)) == cell_key(RunConfig(strategy="pipeline", devices=4))
    # independent replicas each train on their slice, as ddp's: the memory estimate's micro-batch too
    from bench.memory import estimate

    assert estimate(RunConfig(strategy="independent", devices=4, batch_size=8)).batch == 8


def _packed_tp_shards(model: str, n: int) -> list[tuple[list[int], list[int]]]:
    """The oracle for the layers with nn.MultiheadAttention, from torch's own modules of a model built
    here: (full shape, one rank's shape) of every parameter tensor parallel over n divides. The
    packed in_proj weight (3E x E) holds q, k and v, each split by rows (heads); the output
    projection and the second feed-forward projection by columns (their biases stay whole)."""
    from emotion_models.models import build_model
    from torchaudio.models.conformer import ConformerLayer

    meta = build_model(model, size="small", device="meta")
    shards = []
    for mha in (m for m in meta.modules() if isinstance(m, torch.nn.MultiheadAttention)):
        e = mha.embed_dim
        shards += [([e, e], [e // n, e])] * 3 + [([e], [e // n])] * 3 + [([e, e], [e, e // n])]
    ffns = [(m.linear1, m.linear2) for m in meta.modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
    ffns += [(f.sequential[1], f.sequential[4]) for m in meta.modules() if isinstance(m, ConformerLayer)
             for f in (m.ffn1, m.ffn2)]
    for first, second in ffns:
        h, e = first.weight.shape
        shards += [([h, e], [h // n, e]), ([h], [h // n]), ([e, h], [e, h // n])]
    return sorted(shards)


@pytest.mark.parametrize("model", ["transformer", pytest.param("conformer", marks=pytest.mark.slow)])
def test_tensor_parallel_splits_packed_attention_and_trains_singles_model(tmp_path, model):
    """tp x2 where q, k and v share nn.MultiheadAttention's packed weight: each rank holds half of
    every head-sharded projection, the shards add up to the layer, the rest is whole; the run trains
    single's model (exact basis) and its evaluation loads the model's own packed keys."""
    got = bench("run", "--size", "tiny", "--epochs", "1", "--max-steps", "1", "--warmup-steps", "0", "--batch-size", "4",
                "--model", model, "--model-size", "small", "--strategy", "tp", "--gpus", "2", "--device", "cpu",
                "--out", tmp_path, env={"EMOTION_BENCH_PROBE": str(tmp_path)})
    assert got.returncode == 0, got.stdout + got.stderr
    ranks = [probe(tmp_path, r)["params"] for r in (0, 1)]
    split = sorted((a["global_shape"], a["shape"]) for a in ranks[0] if a["local"] < a["global"])
    assert split == _packed_tp_shards(model, 2)
    assert all(a["local"] + b["local"] == a["global"] for a, b in zip(*ranks) if a["local"] < a["global"])
    r = _ok(got)
    assert r["quality"]["test"]["num_samples"] > 0  # rank 0's full model (the model's own keys) evaluated
    assert r["config"]["parallelism"]["degrees"]["tp"] == 2
    _assert_sequence_shards(tmp_path, seq=1 if model == "transformer" else 0)
    _parity_exact(model, ("tp", "tp:nosp"))


@pytest.mark.parametrize("model", ["transformer", "wavlm-base", pytest.param("conformer", marks=pytest.mark.slow),
                                   pytest.param("wav2vec2-base", marks=pytest.mark.slow)])
def test_tensor_parallel_gradients_equal_singles_parameter_by_parameter(model):
    """The oracle a few AdamW steps cannot be (their first step normalises a gradient's scale away): one
    backward, every gradient gathered whole against single's, with and without sequence parallel. It
    caught WavLM's gate reading this rank's heads of a replicated input without summing the input's
    gradient over the ranks (a 1e-3 error everywhere upstream that passed bench parity's 1e-4 loss
    limit at 2e-5). The gradients are compared after the partial ones were reduced as the tp plan does,
    each laid out as its parameter, with no all-reduce left for the optimiser step (AdamW had made 3 a
    layer norm parameter, 48 a step for the transformer)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "tp_grads.py"), model],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stdout + proc.stderr[-3000:]


def test_tp_rank_holds_one_ranks_shapes_of_tensor_parallel_alone(tmp_path):
    """bench predict's compute anchor for tp: one process, no communication, each split projection
    rank 0's half of the torchaudio layer (the oracle: a model built here), everything else whole,
    and with sequence parallel its layer norms on rank 0's chunk of the sequence (torch.chunk's)."""
    from emotion_models.models import build_model

    meta = build_model("wav2vec2-base", size="small", device="meta")
    atts = [m for m in meta.modules() if hasattr(m, "q_proj") and hasattr(m, "out_proj")]
    ffs = [m for m in meta.modules() if hasattr(m, "intermediate_dense")]
    split = [p for a in atts for lin in (a.q_proj, a.k_proj, a.v_proj) for p in lin.parameters()] \
        + [p for f in ffs for p in f.intermediate_dense.parameters()] \
        + [a.out_proj.weight for a in atts] + [f.output_dense.weight for f in ffs]
    whole = [p.numel() for p in meta.parameters() if all(p is not q for q in split)]
    got = bench("run", "--size", "tiny", "--epochs", "1", "--max-steps", "2", "--warmup-steps", "0", "--batch-size", "8",
                "--model", "wav2vec2-base", "--model-size", "small", "--strategy", "tp-rank", "--tp", "2", "--gpus", "1",
                "--device", "cpu", "--out", tmp_path, env={"EMOTION_BENCH_PROBE": str(tmp_path)})
    r = _ok(got)
    assert (r["config"]["strategy"], r["config"]["tp"], r["config"]["world_size"]) == ("tp-rank", 2, 1)
    assert r["config"]["parallelism"]["degrees"]["tp"] == 1  # no mesh: one rank's shapes, alone
    seen = probe(tmp_path, 0)
    assert sorted(p["local"] for p in seen["params"]) == sorted(whole + [p.numel() // 2 for p in split])
    norms = seen["shapes"]["LayerNorm"]
    frames = max(s[1] for s in norms)
    assert any(s[1] == len(torch.arange(frames).chunk(2)[0]) for s in norms), norms
    # the transformer's split attention evaluates in its own shapes too (nn.TransformerEncoderLayer's
    # eval fast path reads a packed bias the split one lacks)
    r = _ok(bench("run", *TINY, "--max-steps", "2", "--model", "transformer", "--strategy", "tp-rank", "--tp", "2",
                  "--out", tmp_path / "transformer"))
    assert r["quality"]["test"]["num_samples"] > 0


def _assert_sequence_shards(folder, seq: int) -> None:
    """Sequence parallel, against torch.chunk: inside the layers each rank's layer norms (sequence on dim
    seq: conformer's layers work time-first) see its chunk of the sequence whose whole the probe saw in
    a batch-first layer norm outside them (the head's; conformer's convolution module's)."""
    shapes = [probe(folder, r)["shapes"]["LayerNorm"] for r in (0, 1)]
    whole = max(s[1] for s in shapes[0])
    for rank, seen in enumerate(shapes):
        part = len(torch.arange(whole).chunk(2)[rank])
        assert part < whole and any(s[seq] == part for s in seen), (rank, whole, seen)


def test_two_dimensional_meshes_train_singles_model():
    """--gpus 4 --tp 2: FSDP2 over 2 data-parallel ranks of a model tensor-parallel over 2; --gpus 4
    --pp 2: two pipelines of 2 stages, DDP over each stage's 2 replicas (4 worker processes on a 2 x 2
    mesh each): the same mathematics as single (exact basis)."""
    proc = bench("parity", "--gpus", "4", "--model", "transformer", "--model-size", "small", "--steps", "3",
                 "--batch-size", "8", "--strategies", "fsdp:tp2,pipeline:pp2", "--device", "cpu")
    assert proc.returncode == 0 and "FAIL" not in proc.stdout, proc.stdout + proc.stderr
    for cell in ("fsdp:tp2", "pipeline:pp2"):
        assert any(r.split("│")[1].strip() == cell and "exact" in r and "ok" in r
                   for r in proc.stdout.splitlines() if r.startswith("│ ")), proc.stdout


@pytest.mark.slow
def test_hsdp_and_three_dimensional_meshes_train_singles_model():
    proc = bench("parity", "--gpus", "4", "--model", "transformer", "--model-size", "small", "--steps", "3",
                 "--batch-size", "8", "--strategies", "hsdp:rep2,fsdp:rep2:tp2", "--device", "cpu")
    assert proc.returncode == 0 and "FAIL" not in proc.stdout and proc.stdout.count("exact") >= 2, proc.stdout


def test_tensor_parallel_shards_each_layers_projections_and_trains_singles_model(tmp_path):
    """tp x2 on wav2vec2-base: per layer, q, k, v and the first feed-forward projection (weights and
    biases) and the attention output and second projection (weights) are split in halves, the two
    ranks' shards adding up to the layer's own size (the oracle: the torchaudio layers of a model
    built here); everything else is whole on each rank. And it trains single's model (exact basis)."""
    from emotion_models.models import build_model

    meta = build_model("wav2vec2-base", size="small", device="meta")
    atts = [m for m in meta.modules() if hasattr(m, "q_proj") and hasattr(m, "out_proj")]
    ffs = [m for m in meta.modules() if hasattr(m, "intermediate_dense")]
    halves = sorted([p.numel() for a in atts for lin in (a.q_proj, a.k_proj, a.v_proj) for p in lin.parameters()]
                    + [p.numel() for f in ffs for p in f.intermediate_dense.parameters()]
                    + [lin.weight.numel() for a in atts for lin in (a.out_proj,)]
                    + [f.output_dense.weight.numel() for f in ffs])
    got = bench("run", "--size", "tiny", "--epochs", "1", "--max-steps", "1", "--warmup-steps", "0", "--batch-size", "4",
                "--model", "wav2vec2-base", "--model-size", "small", "--strategy", "tp", "--gpus", "2", "--device", "cpu",
                "--out", tmp_path, env={"EMOTION_BENCH_PROBE": str(tmp_path)})
    assert got.returncode == 0, got.stdout + got.stderr
    ranks = [probe(tmp_path, r)["params"] for r in (0, 1)]
    assert [p["global"] for p in ranks[0]] == [p["global"] for p in ranks[1]]
    split = [(a["global"], a["local"], b["local"]) for a, b in zip(*ranks) if a["local"] < a["global"]]
    assert sorted(g for g, _, _ in split) == halves
    assert all(x + y == g and x == g // 2 for g, x, y in split)
    whole = sum(p["global"] for p in ranks[0]) - sum(g for g, _, _ in split)
    assert whole == sum(p.numel() for p in meta.parameters()) - sum(halves)  # the rest replicated, whole
    _assert_sequence_shards(tmp_path, seq=1)  # 3 s of audio: 149 frames, 75 on rank 0 and 74 on rank 1
    _parity_exact("wav2vec2-base", ("tp",))
