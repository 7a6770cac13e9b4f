"""Sweeps, reports, hardware comparison and regression comparison."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.compare import compare
from bench.frame import aggregate, frame
from bench.report import main_tables
from bench.results import load_result, write_result
from bench.sweep import SweepSpec, expand, load_spec
from conftest import ROOT, bench, invoke


def fixture_result(*, strategy="single", devices=1, precision="fp32", thr=100.0, f1=0.8, repeat=0, batch=32,
                   model="cnn", cpu="Test CPU", torch_version="2.11.0", hardware_id="hwA", step_ms=None, mem=1e9,
                   status="ok", energy=None):
    run_id = f"{hardware_id}-{model}-{strategy}-{devices}x-{precision}-r{repeat}"
    return {
        "schema": 1, "run_id": run_id, "status": status, "error": None if status == "ok" else "boom",
        "config": {"strategy": strategy, "devices": devices, "device_type": "cpu", "nodes": 1, "model": model,
                   "model_size": "small", "precision": precision, "compile": False, "batch_size_per_device": batch,
                   "global_batch_size": batch * devices, "epochs": 2, "seed": repeat, "repeat": repeat,
                   "dataset": "synthetic", "size": "tiny", "scaling": "weak"},
        "env": {"cpu_model": cpu, "cpu_cores_logical": 2, "gpus": [], "torch": torch_version, "hardware_id": hardware_id},
        "throughput": {"samples_per_s": thr, "samples_per_s_per_device": thr / devices,
                       "step_time_ms_p50": step_ms or 1000 * batch * devices / thr,
                       "step_time_ms_p90": 1.1 * (step_ms or 1000 * batch * devices / thr)} if status == "ok" else {},
        "utilization": {"cpu_percent_mean": 90.0, "process_rss_peak_bytes": mem, "gpu_energy_j_per_epoch": energy},
        "quality": {"test": {"accuracy": f1, "macro_f1": f1, "uar": f1, "per_class": {},
                             "confusion_matrix": [[5 if i == j else 1 for j in range(7)] for i in range(7)]},
                    "val_macro_f1_by_epoch": [f1 - 0.1, f1], "time_to_target_s": 12.0, "target_f1": 0.5}
        if status == "ok" else {},
        "timing": {"wall_s": 10.0}, "losses": [1.0, 0.9],
    }


def write_all(folder, results):
    for r in results:
        write_result(r, folder)
    return folder


def matrix(hardware_id="hwA", scale=1.0, f1_shift=0.0, cpu="Test CPU", torch_version="2.11.0", jitter=0.02):
    out = []
    for rep in range(3):
        j = 1 + jitter * (rep - 1)
        out += [
            fixture_result(thr=100 * scale * j, f1=0.80 + f1_shift + 0.01 * (rep - 1), repeat=rep, hardware_id=hardware_id, cpu=cpu, torch_version=torch_version),
            fixture_result(strategy="ddp", devices=2, thr=180 * scale * j, f1=0.78 + f1_shift, repeat=rep, hardware_id=hardware_id, cpu=cpu, torch_version=torch_version),
            fixture_result(precision="bf16", thr=150 * scale * j, f1=0.79 + f1_shift, repeat=rep, hardware_id=hardware_id, cpu=cpu, torch_version=torch_version),
            fixture_result(strategy="ddp", devices=2, precision="bf16", thr=240 * scale * j, f1=0.77 + f1_shift, repeat=rep, hardware_id=hardware_id, cpu=cpu, torch_version=torch_version),
        ]
    return out


# ------------------------------------------------------------------------------------------ sweep

def test_sweep_expansion_and_skipping(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    spec = SweepSpec(strategies=["single", "dp", "ddp", "pipeline"], gpus=[2, 4], precision=["fp32", "fp16"],
                     repeat=2, run={"threads": 1})
    cells = {c.key: c for c in expand(spec, "cpu", str(tmp_path))}
    # single is added on 1 device as the baseline, once per precision and repeat
    assert "cnn-single-1x-fp32-eager-weak-b32-r0" in cells and "cnn-single-1x-fp32-eager-weak-b32-r1" in cells
    assert not any(k.startswith("cnn-single-2x") for k in cells)
    reasons = {k: c.skip_reason for k, c in cells.items()}
    assert "needs CUDA" in reasons["cnn-dp-2x-fp32-eager-weak-b32-r0"]
    assert "this machine has 2" in reasons["cnn-ddp-4x-fp32-eager-weak-b32-r0"]
    assert "fp16 needs CUDA" in reasons["cnn-ddp-2x-fp16-eager-weak-b32-r0"]
    assert reasons["cnn-ddp-2x-fp32-eager-weak-b32-r1"] is None
    assert cells["cnn-ddp-2x-fp32-eager-weak-b32-r1"].cfg.seed == 1  # seeds differ per repeat
    assert len(cells) == len(set(cells))


def test_presets_load():
    for name in ("smoke", "cpu", "gpu-node", "tune", "tune-cpu"):
        spec = load_spec(name)
        assert spec.strategies and spec.gpus and spec.repeat >= 1
    from bench.config import ConfigError

    with pytest.raises(ConfigError, match="no such file or preset"):
        load_spec("nosuch")


def test_sweep_resumes_after_being_killed_mid_cell(tmp_path):
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "bench", "sweep", "--strategies", "single", "--gpus", "1", "--repeat", "3",
            "--size", "tiny", "--epochs", "1", "--batch-size", "8", "--model-size", "small", "--device", "cpu",
            "--out", str(out)]
    mark = tmp_path / "step-2"  # every cell creates it at its second optimiser step
    env = {**os.environ, "EMOTION_BENCH_FAULT": "mark:0:2", "EMOTION_BENCH_MARK": str(mark)}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env=env)
    deadline = time.monotonic() + 240  # generous: a busy 2-core machine, and this only bounds a failure
    while time.monotonic() < deadline and not list(out.glob("cnn-*-r0.json")) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    first = next(out.glob("cnn-*-r0.json"))
    first_mtime = first.stat().st_mtime_ns
    mark.unlink(missing_ok=True)
    while time.monotonic() < deadline and not mark.exists():  # a later cell is now under way
        time.sleep(0.05)
    assert mark.exists() and proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)  # as a killed machine: no clean-up of any kind
    proc.wait()
    done_before = sorted(p.name for p in out.glob("cnn-*.json"))
    assert len(done_before) < 3
    resumed = bench(*args[3:], "--resume", env={"COLUMNS": "200"})
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done_before)} already done" in resumed.stdout
    files = sorted(out.glob("cnn-*.json"))
    assert len(files) == 3 and all(load_result(f)["status"] == "ok" for f in files)
    assert first.stat().st_mtime_ns == first_mtime  # finished cells are not run again
    assert not list(out.glob(".*.tmp"))
    states = {c["key"]: c["state"] for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert set(states.values()) == {"done"}
    # the closing table: every cell, resumed ones included, with its throughput from its own file
    rows = {line.split("│")[1].strip(): line for line in resumed.stdout.splitlines() if line.startswith("│ cnn ")}
    assert len(rows) == len(states), resumed.stdout
    for key in states:
        r = load_result(out / f"{key}.json")
        c = r["config"]
        line = rows[f"cnn {c['strategy']} {c['devices']}x fp32 b{c['batch_size_per_device']}"
                    + (f" r{c['repeat']}" if c["repeat"] else "")]
        assert f"{r['throughput']['samples_per_s']:.1f}" in line and "│ done" in line, line


def test_failed_cell_is_recorded_and_sweep_goes_on(tmp_path):
    # two cells, both failing: single (a process of its own) first, then pipeline x2 (launched)
    proc = bench("sweep", "--strategies", "single,pipeline", "--gpus", "2", "--size", "tiny", "--epochs", "1",
                 "--batch-size", "8", "--device", "cpu", "--out", tmp_path,
                 env={"EMOTION_BENCH_FAULT": "raise:0:2", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    results = {r["config"]["strategy"]: r for r in map(load_result, tmp_path.glob("cnn-*.json"))}
    assert set(results) == {"single", "pipeline"} and all(r["status"] == "failed" for r in results.values())
    assert all("injected fault" in r["error"] for r in results.values()), results
    table = [line for line in proc.stdout.splitlines() if line.startswith("│ cnn ")]
    assert len(table) == 2 and all("failed" in line and "injected fault" in line for line in table), proc.stdout


def test_a_cell_refused_at_run_time_is_in_the_manifest_only(tmp_path, monkeypatch):
    """A refused run writes no result file; the sweep keeps the refusal, with its reason, in sweep.json."""
    from bench import lifecycle
    from bench.sweep import run_sweep

    def refuse(cfg, **_):
        if cfg.strategy == "ddp":
            return lifecycle.Outcome("refused", 2, None, "ddp: refused for this test")
        return lifecycle.Outcome("ok", 0, tmp_path / "single.json")  # the sweep reads only the outcome

    monkeypatch.setattr(lifecycle, "run", refuse)
    done = run_sweep(SweepSpec(strategies=["single", "ddp"], gpus=[1]), str(tmp_path), device_type="cpu")
    assert (done.ran, done.failed) == (1, 1)
    cells = {c["key"]: c for c in json.loads((tmp_path / "sweep.json").read_text())["cells"]}
    refused = [c for c in cells.values() if c.get("state") == "refused"]
    assert len(refused) == 1 and refused[0]["error"] == "ddp: refused for this test" and refused[0]["result"] is None
    assert not (tmp_path / f"{refused[0]['key']}.json").exists()


# ------------------------------------------------------------------------------------------ report

def test_table_computed_from_known_results(tmp_path):
    df = frame(matrix())
    agg = aggregate(df)
    ddp = agg[(agg.strategy == "ddp") & (agg.precision == "fp32")].iloc[0]
    assert ddp.samples_per_s == pytest.approx(180) and ddp.efficiency == pytest.approx(0.9)
    assert ddp.repeats == 3 and ddp.samples_per_s_spread == pytest.approx(0.04)
    tables = {t[0]: t for t in main_tables(agg)}
    title, header, rows, note = tables["cnn · ddp · Test CPU (2 cores)"]
    assert header[:7] == ["devices", "batch per device (samples)", "throughput fp32 (samples/s)",
                          "throughput bf16 (samples/s)", "speedup bf16/fp32 (x)", "weak-scaling fp32", "weak-scaling bf16"]
    assert rows[0][:2] == ["2", "32"] and rows[0][4] == "1.33" and rows[0][5] == "0.90" and rows[0][6] == "0.80"
    assert rows[0][7].startswith("0.780") and "n=3" in rows[0][7]
    assert "single fp32 1x b32 (100.0 samples/s, median of 3)" in note


def test_report_writes_files_and_plots(tmp_path):
    src = write_all(tmp_path / "runs", matrix())
    proc = bench("report", src, "--out", tmp_path / "rep")
    assert proc.returncode == 0, proc.stderr
    rep = tmp_path / "rep"
    for name in ("report.md", "report.html", "results.csv", "scaling.png", "efficiency.png", "precision_speedup.png",
                 "pareto.png", "memory_pareto.png", "utilization.png", "confusion.png"):
        path = rep / name
        assert path.exists() and path.stat().st_size > 1000, name
    assert (rep / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (rep / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6  # self-contained
    md = (rep / "report.md").read_text()
    assert "throughput fp32 (samples/s)" in md and "energy: not measured" in md
    import pandas as pd

    assert len(pd.read_csv(rep / "results.csv")) == 12
    # one file mode for everything the report writes (the atomic writes' temp files start 0600);
    # the oracle: the mode a plain open() gives under this process's umask
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in rep.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_hardware_comparison_of_two_folders(tmp_path):
    a = write_all(tmp_path / "a", matrix("hwA", cpu="CPU A"))
    b = write_all(tmp_path / "b", matrix("hwB", scale=2.0, cpu="CPU B", torch_version="2.10.0"))
    proc = bench("report", a, b, "--out", tmp_path / "rep")
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    section = md.split("## hardware comparison")[1]
    assert "A = CPU A (2 cores), B = CPU B (2 cores)" in section
    line = next(l for l in section.splitlines() if l.startswith("| cnn ddp 2x fp32"))
    assert "| 2.00 |" in line  # B/A throughput
    assert "warning: torch differs: 2.11.0 vs 2.10.0" in section


def test_a_report_over_three_machines_puts_each_beside_the_baseline_the_user_names(tmp_path):
    a = write_all(tmp_path / "a", matrix("hwA", cpu="CPU A"))
    b = write_all(tmp_path / "b", matrix("hwB", scale=2.0, cpu="CPU B"))
    c = write_all(tmp_path / "c", matrix("hwC", scale=0.5, cpu="CPU C"))
    proc = bench("report", a, b, c, "--baseline", "hwB", "--out", tmp_path / "rep")
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    section = md.split("## hardware comparison")[1].split("\n## ")[0]
    assert "3 machines, baseline CPU B (2 cores)" in section
    header = next(l for l in section.splitlines() if l.startswith("| cell"))
    cols = [h.strip() for h in header.strip("|").split("|")]
    assert cols == ["cell", "CPU B (2 cores) [hwB] (baseline) throughput (samples/s)",
                    "CPU A (2 cores) [hwA] throughput (samples/s)", "CPU C (2 cores) [hwC] throughput (samples/s)"]
    line = next(l for l in section.splitlines() if l.startswith("| cnn ddp 2x fp32 "))
    # by hand: ddp fp32 runs 180 samples/s x scale (median over repeats 0.98, 1, 1.02): B 360, A 180, C 90
    assert [x.strip() for x in line.strip("|").split("|")][1:] == ["360.0", "180.0 (0.50x)", "90.0 (0.25x)"]
    assert "hardware comparison: 3 machines, against CPU B (2 cores)" in proc.stdout.replace("\n", " ")
    bad = bench("report", a, b, c, "--baseline", "nosuch", "--out", tmp_path / "rep2")
    assert bad.returncode == 2 and "--baseline nosuch: names no machine" in bad.stderr and "hwC" in bad.stderr
    assert "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------ compare

def test_compare_flags_throughput_drop(tmp_path, capsys):
    base = write_all(tmp_path / "base", matrix())
    slow = matrix()
    for r in slow:
        if r["config"]["strategy"] == "ddp" and r["config"]["precision"] == "fp32":
            r["throughput"]["samples_per_s"] *= 0.7  # a planted 30 % drop
    cur = write_all(tmp_path / "cur", slow)
    proc = bench("compare", base, cur, "--format", "md")
    assert proc.returncode == 1, proc.stdout
    line = next(l for l in proc.stdout.splitlines() if l.startswith("| cnn ddp 2x fp32"))
    assert "-30.0% ✗" in line and "regression" in line
    others = [l for l in proc.stdout.splitlines() if l.startswith("| cnn single 1x fp32")]
    assert "within noise" in others[0]
    # the console's form at 80 columns: a row per cell, its verdict whole, nothing cut
    code, out = invoke(["compare", str(base), str(cur)], capsys)
    drawn = [line for line in out.splitlines() if line[:1] in "┏┃┡│└"]
    assert code == 1 and drawn and max(map(len, drawn)) <= 80 and "…" not in out, out
    assert any(line.startswith("│ cnn ddp") and "│ regression " in line for line in drawn), out


def test_compare_flags_f1_drop_even_when_faster():
    base = matrix()
    cur = matrix(f1_shift=-0.1, scale=1.2)
    verdicts = {v.cell: v for v in compare(base, cur)}
    v = verdicts["cnn single 1x fp32 b32"]
    assert v.verdict == "regression"
    assert any(c.name == "macro_f1" and c.worse for c in v.changes)
    assert any(c.name == "throughput" and c.better for c in v.changes)


def test_compare_identical_passes_and_noise_is_respected(tmp_path):
    a = write_all(tmp_path / "a", matrix())
    assert bench("compare", a, a).returncode == 0
    # 6 % slower, but the baseline's own repeats spread 4 %: k=2 -> 8 % needed
    verdicts = compare(matrix(), matrix(scale=0.94))
    assert all(v.verdict == "within noise" for v in verdicts)
    # without repeats the verdict says it is noise-blind
    single = [r for r in matrix() if r["config"]["repeat"] == 0]
    v = compare(single, single)[0]
    assert "noise-blind" in v.note


def test_compare_gate_limits_what_fails():
    cur = matrix(scale=0.5)
    assert any(v.verdict == "regression" for v in compare(matrix(), cur))
    assert all(v.verdict != "regression" for v in compare(matrix(), cur, gate=["macro_f1", "efficiency"]))


def test_compare_failed_cell_is_a_regression():
    cur = [r for r in matrix() if not (r["config"]["strategy"] == "ddp" and r["config"]["precision"] == "fp32")]
    cur.append(fixture_result(strategy="ddp", devices=2, status="failed"))
    verdicts = {v.cell: v for v in compare(matrix(), cur)}
    assert verdicts["cnn ddp 2x fp32 b32"].verdict == "failed"


def test_a_sweep_cell_inherits_nothing_of_the_process_before_it(tmp_path):
    """Item 7 of issue 20: cells ran in the sweep's process, so each inherited what came before,
    the kernel's peak RSS of the process (the CPU's peak memory figure) first of all, and on a GPU
    the allocator's peak and cache and dynamo's caches. The test's own process holds 2 GiB of
    ballast, touched, before the sweep starts: a cell in this process would report at least that."""
    import numpy as np

    from bench.sweep import SweepSpec, run_sweep

    ballast = np.ones(2 * 2**30 // 8)  # 2 GiB, every page written
    spec = SweepSpec(strategies=["single"], gpus=[1], run=dict(size="tiny", epochs=1, batch_size=8,
                                                               model_size="small", device="cpu", warmup_steps=1))
    done = run_sweep(spec, str(tmp_path), device_type="cpu")
    assert done.ran == 1 and ballast[-1] == 1.0
    (result,) = [load_result(p) for p in tmp_path.glob("cnn-*.json")]
    peak = result["utilization"]["per_rank"][0]["peak_rss_bytes"]
    assert result["status"] == "ok" and 0 < peak < 1.5 * 2**30, peak


def test_the_sweeps_closing_table_fits_80_columns():
    """The longest cells a sweep names, a long error note: every line within 80 columns, nothing cut."""
    import io

    from rich.console import Console

    from bench.commands.sweep import SUMMARY_HEADER
    from bench.ui import table

    rows = [["wav2vec2 pipeline 8x bf16 compiled b32 r2", "failed", "1234.5", "0.91", "0.812",
             "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)"],
            ["conformer fsdp 4x fp16 b16", "skipped", "", "", "", "fp16 needs a GPU (GradScaler): run on CUDA"],
            ["cnn single 1x fp32 b32", "done", "119.3", "", "0.800", ""]]
    buf = io.StringIO()
    Console(file=buf, width=80, color_system=None).print(table("sweep: 3 cells", SUMMARY_HEADER, rows, plain=True))
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80, buf.getvalue()
    assert "…" not in buf.getvalue() and "1234.5" in buf.getvalue() and "0.812" in buf.getvalue()
    shown = set(buf.getvalue().replace("│", " ").split())  # wrapped, not cut: every word is there
    assert all(set(r[0].split() + r[-1].split()) <= shown for r in rows), buf.getvalue()


def test_sweep_axes_name_meshes_and_memory_trades(tmp_path):
    """A sweep's strategies name a mesh as parity does ('fsdp:tp2', 'hsdp:rep2', 'pipeline:gpipe'),
    and --ac and --grad-accum are axes: every cell gets its degrees, its settings and a single
    baseline with the same accumulation and checkpointing (the efficiency's baseline matches them)."""
    from bench.config import ConfigError

    spec = SweepSpec(strategies=["fsdp:tp2", "hsdp:rep2", "pipeline:gpipe"], gpus=[2], models=["transformer"],
                     ac=["none", "full"], grad_accum=[1, 2], run={"model_size": "small"})
    cells = {c.key: c.cfg for c in expand(spec, "cpu", str(tmp_path))}
    two_d = cells["transformer-fsdp-2x-fp32-eager-weak-b32-tp2-ga2-acfull-r0"]
    assert (two_d.strategy, two_d.tp, two_d.dp_replicate, two_d.grad_accum, two_d.ac) == ("fsdp", 2, 1, 2, "full")
    assert cells["transformer-hsdp-2x-fp32-eager-weak-b32-rep2-r0"].dp_replicate == 2
    assert cells["transformer-pipeline-2x-fp32-eager-weak-b32-r0"].schedule == "gpipe"
    singles = {(c.grad_accum, c.ac) for c in cells.values() if c.strategy == "single"}
    assert singles == {(1, "none"), (1, "full"), (2, "none"), (2, "full")}
    assert len(cells) == 4 + 3 * 4
    more = {c.key: c.cfg for c in expand(SweepSpec(strategies=["pipeline:pp2", "tp:nosp"], gpus=[4],
                                                   models=["transformer"]), "cpu", str(tmp_path))}
    assert (more["transformer-pipeline-4x-fp32-eager-weak-b32-pp2-r0"].pp,
            more["transformer-tp-4x-fp32-eager-weak-b32-nosp-r0"].sequence_parallel) == (2, False)
    for bad, text in ((dict(ac=["some"]), "--ac some"), (dict(grad_accum=[0]), "--grad-accum 0"),
                      (dict(strategies=["nope:tp2"]), "unknown strategy 'nope'"), (dict(batch=[0]), "--batch 0"),
                      (dict(batch=[]), "--batch: empty list"),
                      (dict(strategies=["fsdp:gpipe"]), "'gpipe' is not a mesh part")):
        with pytest.raises(ConfigError, match=text):
            SweepSpec(**{"strategies": ["ddp"], "gpus": [2], **bad}).check()
    toml = tmp_path / "s.toml"
    toml.write_text('strategies = ["fsdp:tp2"]\ngpus = [2]\nmodels = ["transformer"]\nac = ["full"]\ngrad_accum = [2]\n')
    loaded = load_spec(str(toml))
    assert loaded.ac == ["full"] and loaded.grad_accum == [2] and loaded.batch is None


def test_batch_is_an_axis_of_the_sweep(tmp_path):
    """`batch` in a TOML (or --batch) gives every cell each batch size, the single baselines too;
    without it the [run] batch_size is the one value."""
    toml = tmp_path / "s.toml"
    toml.write_text('strategies = ["ddp"]\ngpus = [2]\nbatch = [16, 64]\n[run]\nbatch_size = 8\n')
    cells = {c.key: c.cfg for c in expand(load_spec(str(toml)), "cpu", str(tmp_path))}
    assert sorted(cells) == ["cnn-ddp-2x-fp32-eager-weak-b16-r0", "cnn-ddp-2x-fp32-eager-weak-b64-r0",
                             "cnn-single-1x-fp32-eager-weak-b16-r0", "cnn-single-1x-fp32-eager-weak-b64-r0"]
    assert cells["cnn-ddp-2x-fp32-eager-weak-b64-r0"].batch_size == 64
    plain = {c.key for c in expand(SweepSpec(strategies=["ddp"], gpus=[2], run={"batch_size": 8}), "cpu", str(tmp_path))}
    assert plain == {"cnn-ddp-2x-fp32-eager-weak-b8-r0", "cnn-single-1x-fp32-eager-weak-b8-r0"}
