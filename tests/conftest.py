import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Every test shares one feature cache in a temp folder, never the user's."""
    path = tmp_path_factory.mktemp("feature-cache")
    os.environ["EMOTION_BENCH_CACHE"] = str(path)
    yield path


@pytest.fixture(autouse=True, scope="session")
def _bytecode_cached_for_the_processes_tests_start():
    """The suite starts about 200 Python processes; where the environment sets
    PYTHONDONTWRITEBYTECODE (this project's CI machines do), each recompiled bench/ and
    emotion_models/ from source, about 0.1 s of CPU apiece. Their __pycache__ is git-ignored."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    yield


@pytest.fixture(autouse=True, scope="session")
def _cores_shared_between_test_processes():
    """Under pytest-xdist each test process gets its share of the cores for the runs it starts (the
    `bench` default is every core per process: two test processes, each starting a 2-thread run
    beside a 2-worker one, ran the suite 4x oversubscribed). Through OMP_NUM_THREADS, which `bench`
    respects; a value the caller set stays."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    yield


def tone(seconds=1.0, sr=16000, freq=220.0, channels=1, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    y = amp * np.sin(2 * np.pi * freq * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))
    return np.stack([y] * channels, axis=1) if channels > 1 else y


def write_wav(path: Path, seconds=1.0, sr=16000, channels=1, subtype="PCM_16", freq=220.0):
    import soundfile as sf  # here, not at the top: the GPU machine has no soundfile (python -m pytest -m gpu)

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, sr, freq, channels), sr, subtype=subtype)
    return path


def invoke(argv: list, capsys) -> tuple[int, str]:
    """The real CLI in this process (no interpreter start): (exit code, stdout + stderr)."""
    from bench.cli import main

    old = sys.argv
    sys.argv = ["bench", *map(str, argv)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out + out.err


def bench(*args, env=None, timeout=600, cwd=None):
    """Run the real `bench` CLI in a subprocess; returns CompletedProcess with text output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or ROOT)


def probe(folder: Path, rank: int) -> dict:
    """What a rank saw at its first step (bench/faults.py probe, armed by EMOTION_BENCH_PROBE=folder)."""
    import json

    return json.loads((folder / f"probe-rank{rank}.json").read_text())


def processes_tagged(tag: str) -> list:
    """Processes still alive from a run started with EMOTION_BENCH_TEST_TAG=tag."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("EMOTION_BENCH_TEST_TAG") == tag:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def no_process_outlives(tag: str, within_s: float = 30) -> bool:
    """True once no process of that tag is left (polled: a killed tree takes a moment to go)."""
    deadline = time.monotonic() + within_s
    while processes_tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not processes_tagged(tag)
