"""Nothing lost, no traceback: fuzzed flags, unwritable or full disks, signals, divergence, a
poisoned cache, resume after a kill, and the warnings a run owes its user."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")  # a test extra; the GPU machine has none (python -m pytest -m gpu)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st

from bench.results import load_result, write_result
from conftest import ROOT, bench, invoke, no_process_outlives

TINY = ["--size", "tiny", "--epochs", "2", "--batch-size", "8", "--model-size", "small", "--warmup-steps", "2",
        "--device", "cpu"]


def _result(proc):
    return load_result(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ fuzzed flags

NUMBERS = st.sampled_from(["0", "-1", "-3", "1", "2", "3", "999999999", "1e9", "0.5", "", "nan", "x"])
NAMES = st.sampled_from(["", "single", "ddp", "fsdp", "pipeline", "dp", "model-parallel", "nosuch", "cnn", "lstm",
                         "xlsr-2b", "fp32", "bf16", "fp16", "weak", "strong", "gpipe", "1f1b", "cpu", "cuda", "tiny"])


# run flags whose value must be at least 1 (a positive number of seconds for --timeout-s)
POSITIVE = ("--gpus", "--epochs", "--batch-size", "--nnodes", "--threads", "--max-steps", "--microbatches",
            "--timeout-s")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value else None


def _paths(tmp: Path):
    missing, a_file = tmp / "missing" / "deeper", tmp / "a_file.txt"
    a_file.write_text("not a result")
    results = tmp / "results"
    if not results.exists():
        from test_sweep_report import matrix

        for r in matrix():
            write_result(r, results)
    return st.sampled_from([str(missing), str(a_file), str(results), "", str(tmp / "out")])


@settings(max_examples=int(os.environ.get("EMOTION_BENCH_FUZZ", "250")), derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_flags_never_end_in_a_traceback(data, tmp_path_factory, capsys, monkeypatch):
    tmp = tmp_path_factory.mktemp("fuzz")
    monkeypatch.chdir(tmp)  # a relative default (--out reports) lands here, never in the checkout
    path = _paths(tmp)
    command = data.draw(st.sampled_from(["run", "sweep", "parity", "compare", "report"]))
    flags = {
        "run": ["--strategy", "--gpus", "--model", "--precision", "--epochs", "--batch-size", "--scaling", "--size",
                "--warmup-steps", "--microbatches", "--nnodes", "--threads", "--max-steps", "--device", "--out",
                "--timeout-s", "--profile-steps", "--dataset", "--schedule", "--model-size"],
        "sweep": ["--strategies", "--gpus", "--precision", "--models", "--compile", "--repeat", "--epochs", "--size",
                  "--batch-size", "--device", "--config", "--out"],
        "parity": ["--gpus", "--strategies", "--model", "--precision", "--steps", "--batch-size", "--size", "--device"],
        "compare": ["--max-regression", "--max-f1-drop", "--noise-k", "--gate", "--format"],
        "report": ["--out", "--predict"],
    }[command]
    argv = [command]
    if command in ("compare", "report"):
        argv += [data.draw(path) for _ in range(2 if command == "compare" else 1)]
    for flag in data.draw(st.lists(st.sampled_from(flags), max_size=4, unique=True)):
        value = data.draw(path if flag in ("--out", "--dataset", "--config") else st.one_of(NUMBERS, NAMES))
        argv += [flag, value]
    if command in ("run", "sweep", "parity"):
        argv += ["--dry-run"]  # validation is what is fuzzed; a valid combination would start training
    code, out = invoke(argv, capsys)
    assert "Traceback" not in out and "internal error" not in out, (argv, out)
    assert code in (0, 1, 2), (argv, code, out)
    if command == "run":  # a count below 1 is refused before anything starts, never taken as a default
        counts = dict(zip(argv[1::2], argv[2::2]))
        low = [f for f in POSITIVE if f in counts and _number(counts[f]) is not None and _number(counts[f]) < 1]
        assert not low or code == 2, (argv, code, out)
    assert not list(tmp.rglob(".*.tmp")), argv  # no partial file, whatever failed


def test_absurd_matrices_and_empty_folders_are_refused_before_anything_is_built(tmp_path, capsys, monkeypatch):
    """Found by the fuzzer in CI: `sweep --repeat 999999999 --dry-run` expanded a billion cells and
    was killed for memory; an empty --out wrote a report into the working directory."""
    monkeypatch.chdir(tmp_path)
    code, out = invoke(["sweep", "--repeat", "999999999", "--dry-run"], capsys)
    assert code == 2 and "--repeat 999999999: use 1 to 100" in out
    code, out = invoke(["sweep", "--gpus", ",".join(map(str, range(1, 200))), "--precision", "fp32,bf16,fp16",
                         "--strategies", "ddp,fsdp", "--models", "cnn,lstm,crnn,transformer", "--repeat", "10",
                         "--dry-run"], capsys)
    assert code == 2 and "cells (more than 10000)" in out
    code, out = invoke(["sweep", "--precision", "fp8", "--dry-run"], capsys)
    assert code == 2 and "--precision fp8 is not one of" in out
    code, out = invoke(["sweep", "--models", "resnet", "--dry-run"], capsys)
    assert code == 2 and "--models resnet: unknown model" in out
    code, out = invoke(["report", str(ROOT / "results" / "baselines" / "cpu-smoke"), "--out", ""], capsys)
    assert code == 2 and "empty" in out
    code, out = invoke(["run", "--out", " ", "--dry-run"], capsys)
    assert code == 2 and "--out is empty" in out
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ disks and the cache

def test_unwritable_out_is_refused_before_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = bench("run", *TINY, "--out", blocker / "sub", env={"EMOTION_BENCH_FALLBACK": str(tmp_path / "fallback")})
    assert proc.returncode == 2 and "cannot write there" in proc.stderr and "Traceback" not in proc.stderr
    # refused before it started: nothing measured, so no result anywhere (not in the fallback either)
    assert not (tmp_path / "fallback").exists() and proc.stdout.strip() == ""


def test_full_disk_at_the_end_keeps_the_measurements(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        free = shutil.disk_usage(mnt).free
        (mnt / "filler").write_bytes(b"\0" * max(0, free - 4096))  # room for the probe, not for a result
        proc = bench("run", *TINY, "--out", mnt, env={"EMOTION_BENCH_FALLBACK": str(tmp_path / "fallback")})
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
        assert "could not write the result to" in proc.stdout and "No space left" in proc.stdout
        saved = load_result(proc.stdout.strip().splitlines()[-1])
        assert saved["status"] == "ok" and saved["throughput"]["samples_per_s"] > 0
        assert not [p for p in mnt.iterdir() if p.name != "filler"]  # no half-written file
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_poisoned_cache_entry_is_rebuilt_not_loaded(tmp_path):
    cache = tmp_path / "cache"
    env = {"EMOTION_BENCH_CACHE": str(cache)}
    first = bench("run", *TINY, "--out", tmp_path / "a", env=env)
    assert first.returncode == 0
    (meta,) = cache.glob("features-*.json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "key": "someone else's"}))
    (array,) = cache.glob("features-*.npy")
    array.write_bytes(b"\x93NUMPY" + b"\0" * 64)  # not a valid array: never executed, never trusted
    again = bench("run", *TINY, "--out", tmp_path / "b", env=env)
    assert again.returncode == 0 and "is unusable" in again.stdout and "rebuilding it" in again.stdout
    assert _result(again)["losses"] == _result(first)["losses"]


# ------------------------------------------------------------------------------------------ signals

@pytest.mark.parametrize("fault,status,code", [("term:0:2", "interrupted", 143), ("int:0:6", "interrupted", 130)],
                         ids=["sigterm-in-warmup", "sigint-in-timed-window"])
def test_a_signal_in_training_keeps_what_was_measured(tmp_path, fault, status, code):
    proc = bench("run", *TINY, "--out", tmp_path, env={"EMOTION_BENCH_FAULT": fault})
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    r = _result(proc)
    step = int(fault.split(":")[2])
    assert r["status"] == status and f"at step {step} of" in r["error"]
    assert len(r["losses"]) == step - 1  # the steps before the signal, measured
    if step > 3:  # past the 2 warm-up steps: timed steps, a throughput
        assert r["throughput"]["measured_steps"] == step - 3 and r["throughput"]["samples_per_s"] > 0
        from bench.invariants import interrupted

        assert all(c.ok for c in interrupted(r))  # what gpu_check.py asks of its SIGINT cell


def test_a_signal_after_the_training_steps_keeps_them(tmp_path, monkeypatch):
    """Found by a sweep stopped with SIGTERM: a signal during the test evaluation (or the profiled
    steps, or the gather) escaped the loop's handler, and the run was recorded as interrupted
    "before training started" with every measured step lost."""
    from bench import lifecycle, train
    from bench.config import RunConfig

    orig, calls = train.evaluate, []

    def evaluate(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # after the validation of both epochs: the test split
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here
        return orig(*a, **k)

    monkeypatch.setattr(train, "evaluate", evaluate)
    cfg = RunConfig(size="tiny", epochs=2, batch_size=16, model_size="small", warmup_steps=1, device="cpu",
                    out_dir=str(tmp_path))
    out = lifecycle.run(cfg)
    r = load_result(out.path)
    assert (out.status, out.code, r["status"]) == ("interrupted", 143, "interrupted"), r["error"]
    assert r["error"] == f"interrupted by SIGTERM after its {len(r['losses'])} training steps, during the test evaluation"
    assert r["throughput"]["measured_steps"] == len(r["losses"]) - 1 > 0 and not r["quality"]["test"]


def test_sigterm_to_a_ddp_launcher_stops_every_worker_and_keeps_the_result(tmp_path):
    mark = tmp_path / "timed-window"
    env = {**os.environ, "EMOTION_BENCH_FAULT": "mark:0:6", "EMOTION_BENCH_MARK": str(mark),
           "EMOTION_BENCH_TEST_TAG": "sigterm-ddp"}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--strategy", "ddp", "--gpus", "2", *TINY,
                             "--epochs", "40", "--out", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a condition: the workers are in the timed window
    assert mark.exists(), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, out + err
    r = load_result(out.strip().splitlines()[-1])
    assert r["status"] == "interrupted" and "SIGTERM" in r["error"] and r["throughput"]["measured_steps"] >= 3
    assert no_process_outlives("sigterm-ddp")


def test_a_failure_that_a_signal_caused_is_that_signal_and_keeps_the_steps(tmp_path, monkeypatch):
    """The CI race, staged in one process: SIGTERM is taken by another thread (as by a gloo thread
    of a worker) while the training thread is blocked in a call that then fails because its peer,
    stopped by the same signal, went away. The failure comes first and the handler runs on the way
    out; the run must still end interrupted, with the steps measured before it."""
    import socket
    import struct
    import threading

    from bench import lifecycle, strategies
    from bench.config import RunConfig

    server = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(server.getsockname())
    theirs, _ = server.accept()
    at_step, seen = 7, []

    def peer_stops() -> None:  # this thread takes the signal, then resets the connection
        time.sleep(0.2)  # the training thread is in recv by now (if not, it is when the reset comes)
        os.kill(os.getpid(), signal.SIGTERM)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()

    real_forward_backward = strategies.forward_backward

    def forward_backward(model):
        real_step = real_forward_backward(model)
        return lambda x, y, precision: step(real_step, x, y, precision)

    def step(real_step, x, y, precision):
        seen.append(1)
        if len(seen) == at_step:
            peer = threading.Thread(target=peer_stops)
            peer.start()  # created before the mask below: SIGTERM can reach only it
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # unblocked below: unblocking runs the handler
            ours.recv(1)  # blocked in C until the reset, then raises ConnectionResetError; no handler has run
        return real_step(x, y, precision)

    monkeypatch.setattr(strategies, "forward_backward", forward_backward)
    cfg = RunConfig(size="tiny", epochs=2, batch_size=8, model_size="small", warmup_steps=2, device="cpu",
                    out_dir=str(tmp_path))
    try:
        outcome = lifecycle.run(cfg)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        server.close()
    r = load_result(outcome.path)
    assert (outcome.status, outcome.code) == ("interrupted", 143), outcome.error
    assert f"at step {at_step} of" in r["error"] and r["throughput"]["measured_steps"] == at_step - 3


def test_a_second_signal_does_not_cut_the_stop_short():
    """A worker gets SIGTERM twice (the launcher's to the group, torchrun's forwarded): the second
    must not raise inside the handling of the first, where the result is being written."""
    from bench.stops import Interrupted, signals_raise

    written, before = [], signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted):
        with signals_raise():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted at once by the handler
            except Interrupted:
                os.kill(os.getpid(), signal.SIGTERM)  # the forwarded one, while "writing"
                for _ in range(50):
                    time.sleep(0.001)  # the handler runs between these
                written.append(True)
                raise
    assert written and signal.getsignal(signal.SIGTERM) == before  # and the old handler is back


def test_interrupted_sweep_resumes_and_cleans_up(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--strategies", "single", "--gpus", "1", "--repeat", "2", "--size", "tiny", "--epochs", "2",
            "--batch-size", "8", "--model-size", "small", "--device", "cpu", "--out", out]
    first = bench(*args, env={"EMOTION_BENCH_FAULT": "int:0:3"})  # every cell's run is interrupted at step 3
    assert first.returncode == 130 and "--resume" in first.stderr and "Traceback" not in first.stderr
    (stopped,) = out.glob("cnn-*.json")
    assert load_result(stopped)["status"] == "interrupted"
    (out / ".cnn-single.json.abc.tmp").write_text("{")  # as a kill during a write leaves it
    resumed = bench(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "removed temp files" in resumed.stdout and not list(out.glob(".*.tmp"))
    assert [load_result(p)["status"] for p in sorted(out.glob("cnn-*.json"))] == ["ok"] * 2


# ------------------------------------------------------------------------------------------ divergence, warnings

def test_a_nan_loss_stops_the_run_as_diverged_and_the_sweep_goes_on(tmp_path):
    proc = bench("sweep", "--strategies", "single,ddp", "--gpus", "2", "--size", "tiny", "--epochs", "3",
                 "--batch-size", "8", "--device", "cpu", "--out", tmp_path, env={"EMOTION_BENCH_FAULT": "nan:0:4"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    results = {p.name: load_result(p) for p in tmp_path.glob("cnn-*.json")}
    assert len(results) == 2 and all(r["status"] == "diverged" for r in results.values()), results
    for r in results.values():
        assert "not finite from step 5" in r["error"] and "last finite loss" in r["error"]
        assert len(r["losses"]) >= 4  # what was measured until the epoch's end
    report = bench("report", tmp_path, "--out", tmp_path / "rep")
    assert report.returncode == 0 and "diverged:" in (tmp_path / "rep" / "report.md").read_text()


def test_oversubscribed_cores_and_few_measured_steps_are_warned(tmp_path):
    # the launcher's check comes before anything starts: --dry-run shows it without 2 oversubscribed workers
    proc = bench("run", "--strategy", "ddp", "--gpus", "2", "--threads", "2", *TINY, "--dry-run", "--out", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es) on this node x 2 thread(s) (--threads)" in proc.stdout
    if (os.cpu_count() or 1) < 4:
        assert "warning: oversubscribed: 2 process(es) x 2 thread(s) share" in proc.stdout
    # too few timed steps is known after the run: 4 steps, 2 of them warm-up; a thread more than the
    # cores oversubscribes even one process; each warning is printed once (before the run or after it)
    threads = (os.cpu_count() or 1) + 1
    proc = bench("run", *TINY, "--threads", threads, "--max-steps", "4", "--out", tmp_path)
    out = proc.stdout
    assert "warning: only 2 timed step(s)" in out and "--max-steps" in out, out + proc.stderr
    assert out.count("warning: only 2 timed step(s)") == 1 and out.count("warning: oversubscribed:") == 1, out
    r = _result(proc)
    assert r["config"]["threads_source"] == "--threads"
    # and the result carries them as flags, for every table that shows its figures
    from bench.trust import result_flags

    flags = result_flags(r)
    # (a third, "busy machine", may join them: the test suite runs two tests at a time)
    assert flags[0].startswith("oversubscribed: 1 process(es)") and "2 timed step(s)" in flags[1], flags


def test_a_users_omp_num_threads_is_respected_and_recorded(tmp_path):
    proc = bench("run", *TINY, "--out", tmp_path, env={"OMP_NUM_THREADS": "1"})
    c = _result(proc)["config"]
    assert (c["threads"], c["threads_source"]) == (1, "OMP_NUM_THREADS")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "pipeline"])
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["term", "int"])
def test_every_multiprocess_strategy_stops_cleanly_on_a_signal(tmp_path, strategy, sig, code):
    mark, tag = tmp_path / "mark", f"sig-{strategy}-{sig}"
    env = {**os.environ, "EMOTION_BENCH_FAULT": "mark:0:4", "EMOTION_BENCH_MARK": str(mark),
           "EMOTION_BENCH_TEST_TAG": tag}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--strategy", strategy, "--gpus", "2", *TINY,
                             "--epochs", "40", "--out", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "Traceback" not in err, out + err
    assert load_result(out.strip().splitlines()[-1])["status"] == "interrupted"
    assert no_process_outlives(tag)


@pytest.mark.slow
def test_a_signal_while_the_cache_builds_leaves_no_partial_entry(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "EMOTION_BENCH_CACHE": str(cache), "EMOTION_BENCH_TEST_TAG": "sig-cache"}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--size", "medium", "--device", "cpu",
                             "--out", str(tmp_path / "runs")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(cache.glob("*.lock")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the build has begun
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, out + err
    r = load_result(out.strip().splitlines()[-1])
    assert r["status"] == "interrupted" and "before training started" in r["error"]
    assert not list(cache.glob("*.npy")) and not list(cache.glob(".*.tmp")) and not list(cache.glob("*.json"))
    assert no_process_outlives("sig-cache")
