"""bench history: gate files over commits, their change points (ruptures' PELT), the exit code."""
import json
import math
import random
import subprocess

import pytest

from bench.ab import t975
from bench.history import build, find_changes, history, load_gates
from conftest import bench, invoke

SIGMA = 0.03  # a point's noise (log ratio): gate intervals about +-6.5 % at 10 pairs


def _gate(folder, i, ratio, *, commit=None, created=None, cell="cnn single 1x fp32 b16", sigma=SIGMA, pairs=10,
          machine="hwA", verdict="no change"):
    half = t975(pairs - 1) * sigma
    record = {"kind": "gate", "schema": 1, "created_utc": created or f"2026-12-01T00:{i // 60:02d}:{i % 60:02d}+00:00",
              "base": {"rev": "base", "commit": "b" * 40}, "head": {"rev": "working tree", "commit": commit},
              "pairs": pairs, "looks": [pairs], "verdict": verdict, "max_regression": 0.05,
              "fingerprint": {"hardware_id": machine},
              "verdicts": [{"cell": cell, "metric": "throughput", "verdict": verdict, "ratio": ratio,
                            "low": ratio * math.exp(-half), "high": ratio * math.exp(half), "pairs": pairs},
                           {"cell": cell, "metric": "macro_f1", "verdict": "no change", "ratio": 1.0}]}
    path = folder / f"gate-{i:03d}.json"
    path.write_text(json.dumps(record))
    return path


def _series(folder, seed, step_at=None, n=30, step=0.9):
    rng = random.Random(seed)
    folder.mkdir()
    for i in range(n):
        level = step if step_at is not None and i >= step_at else 1.0
        _gate(folder, i, level * math.exp(rng.gauss(0, SIGMA)), commit=f"{i:040x}")


def test_a_10_percent_step_in_30_noisy_points_is_found_at_its_commit(tmp_path):
    found = 0
    for seed in range(10):
        _series(tmp_path / f"s{seed}", seed, step_at=20)
        (s,) = [x for x in history([str(tmp_path / f"s{seed}")])[0] if x.metric == "throughput"]
        hit = [c for c in s.changes if c.index == 20]
        if hit and hit[0].before == f"{19:040x}" and hit[0].after == f"{20:040x}":
            found += 1
            assert -0.14 < hit[0].step < -0.06  # the step's size: 10 % down, give or take the noise
    assert found >= 9, found


def test_a_flat_series_has_no_change_point(tmp_path):
    flat = 0
    for seed in range(10):
        _series(tmp_path / f"s{seed}", 100 + seed)
        (s,) = history([str(tmp_path / f"s{seed}")])[0]
        flat += not s.changes
    assert flat >= 9, flat


def test_points_go_in_git_order_not_file_or_time_order(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, check=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "c0")
    commits = []
    for i in range(5):
        git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", f"c{i}")
        commits.append(git("rev-parse", "HEAD").stdout.strip())
    gates = tmp_path / "gates"
    gates.mkdir()
    # written and timed in the reverse of the commits' order: git's order must win
    for i, c in enumerate(reversed(commits)):
        _gate(gates, i, 1.0 + 0.01 * (len(commits) - 1 - i), commit=c)
    loaded, _ = load_gates([str(gates)])
    (s,) = build(loaded, repo=repo)
    assert [p.commit for p in s.points] == commits
    assert [round(p.ratio, 2) for p in s.points] == [1.0, 1.01, 1.02, 1.03, 1.04]


def test_the_command_fails_on_a_newest_step_worse_than_the_threshold(tmp_path, capsys):
    _series(tmp_path / "step", 0, step_at=20)
    _series(tmp_path / "flat", 100)
    code, out = invoke(["history", str(tmp_path / "step"), "--out", str(tmp_path / "rep")], capsys)
    assert code == 1 and "regression" in out, out
    assert "| at 0000000 (after 0000000): -" in (tmp_path / "rep" / "history.md").read_text()  # synthetic commits
    narrow = bench("history", tmp_path / "step", "--out", tmp_path / "rep3", env={"COLUMNS": "80"})
    drawn = [line for line in narrow.stdout.splitlines() if line[:1] in "┏┃┡│└"]  # the table (paths are lines)
    assert narrow.returncode == 1 and drawn and max(map(len, drawn)) <= 80, narrow.stdout
    assert "…" not in narrow.stdout and "regression" in narrow.stdout
    for name in ("history.md", "history.html", "history.csv", "history_throughput.png"):
        assert (tmp_path / "rep" / name).exists(), name
    assert "regression since" in (tmp_path / "rep" / "history.md").read_text()
    code, out = invoke(["history", str(tmp_path / "flat"), "--out", str(tmp_path / "rep2")], capsys)
    assert code == 0 and "no regression in the newest segment" in (tmp_path / "rep2" / "history.md").read_text()
    (tmp_path / "step" / "notes.json").write_text("[1, 2]")  # not a gate file: listed, not fatal
    code, out = invoke(["history", str(tmp_path / "step"), "--out", str(tmp_path / "rep3")], capsys)
    assert "notes.json: not a gate file" in " ".join(out.split())
    for argv, text in ((["history", str(tmp_path / "nope")], "no such file or folder"),
                       (["history", str(tmp_path / "rep")], "no gate files under"),
                       (["history", str(tmp_path / "flat"), "--metric", "speed"], "--metric speed: choose from")):
        code, out = invoke(argv + ["--out", str(tmp_path / "x")], capsys)
        assert code == 2 and text in out and "Traceback" not in out, (argv, out)


def test_a_gate_file_bench_ab_writes_is_read_back(tmp_path):
    from bench.ab import ABOutcome, Side, Verdict, write_json

    outcome = ABOutcome(Side("base", "HEAD", tmp_path), Side("head", "working tree", tmp_path), 12, 200.0,
                        [Verdict("cnn single 1x fp32 b16", "throughput", "no change", 0.99, 0.97, 1.01, pairs=12),
                         Verdict("cnn single 1x fp32 b16", "macro_f1", "no change", 1.0, note="0.2 vs 0.2")],
                        [8, 12], None, {"cpu_model": "Test CPU", "hardware_id": "hw"},
                        [Verdict("cnn single 1x fp32 b16", "throughput", "inconclusive", 0.97, 0.93, 1.01, pairs=8)],
                        [({"cnn single 1x fp32 b16": {"throughput": 100.0}}, {"cnn single 1x fp32 b16": {"throughput": 99.0}})])
    path = write_json(outcome, 0.05, str(tmp_path / "g" / "gate.json"))
    record = json.loads(path.read_text())
    assert record["kind"] == "gate" and record["fingerprint"]["hardware_id"] == "hw" and record["looks"] == [8, 12]
    # why the second look was taken, and each pair's figures for a study of the rule
    assert [(v["metric"], v["verdict"], v["pairs"]) for v in record["first_look"]] == [("throughput", "inconclusive", 8)]
    assert record["pair_metrics"][0]["head"]["cnn single 1x fp32 b16"]["throughput"] == 99.0
    (s,) = build(load_gates([str(tmp_path / "g")])[0])
    assert (s.cell, s.metric, s.points[0].ratio, s.points[0].pairs) == ("cnn single 1x fp32 b16", "throughput", 0.99, 12)
    find_changes(s)  # one point: no change points, no error
    assert s.changes == []


def test_a_series_over_two_machines_or_with_inconclusive_gates_says_so(tmp_path):
    from bench.history import rows

    one = tmp_path / "one"
    one.mkdir()
    for i in range(5):
        _gate(one, i, 1.0, commit=f"{i:040x}")
    ((s,), _) = history([str(one)])
    assert s.flags == "" and rows([s], 0.05)[1][0][-1] == "–"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(5):
        _gate(mixed, i, 1.0, commit=f"{i:040x}", machine="hwA" if i < 3 else "hwB",
              verdict="inconclusive" if i == 4 else "no change", sigma=0.05 if i == 4 else SIGMA)
    ((s,), _) = history([str(mixed)])
    header, table = rows([s], 0.05)
    assert header[-1] == "flags"
    assert table[0][-1] == ("2 machines (hwA, hwB): a step between them may be the machine, not the commit "
                            "(pass bench history one machine's gate folder); 1 of 5 gate(s) inconclusive: "
                            "their points rest on intervals wider than the threshold")
    assert [p.machine for p in s.points] == ["hwA", "hwA", "hwA", "hwB", "hwB"]
