"""The report's tables, every cell worked out by hand from results written here (in process, so
that mutation testing sees these tests)."""
import math

from bench.frame import aggregate, frame
from bench.report.tables import fmt, hardware_comparison, main_tables, results_table
from test_sweep_report import fixture_result, matrix

NOTE = "weak-scaling = throughput / (devices x throughput of the baseline cell); baselines: "
F1_HEADER, T2T_HEADER = "macro-F1 (median, min–max)", "time to target F1 (s)"


def extra_cells() -> list[dict]:
    """Beside matrix(): a compiled bf16-only single cell run once, a strong-scaling ddp cell, and
    an lstm ddp cell with no single baseline, no F1 and no time to target."""
    compiled = fixture_result(precision="bf16", thr=120.0, f1=0.75)
    compiled["config"]["compile"] = True
    compiled["run_id"] += "-compiled"
    strong = fixture_result(strategy="ddp", devices=2, thr=150.0, f1=0.7, batch=16)
    strong["config"].update(scaling="strong", global_batch_size=32)
    strong["run_id"] += "-strong"
    lstm = fixture_result(strategy="ddp", devices=2, model="lstm", thr=50.0)
    lstm["quality"]["test"]["macro_f1"] = None
    lstm["quality"]["time_to_target_s"] = None
    return [compiled, strong, lstm]


def tables():
    return {t[0]: t[1:] for t in main_tables(aggregate(frame(matrix() + extra_cells())))}


def test_main_tables_every_cell_by_hand():
    t = tables()
    assert list(t) == ["cnn · single · Test CPU (2 cores)", "cnn · single · compiled · Test CPU (2 cores)",
                       "cnn · ddp · Test CPU (2 cores)", "lstm · ddp · Test CPU (2 cores)"]  # single first
    header, rows, note = t["cnn · ddp · Test CPU (2 cores)"]
    assert header == ["devices", "batch per device (samples)", "throughput fp32 (samples/s)",
                      "throughput bf16 (samples/s)", "speedup bf16/fp32 (x)", "weak-scaling fp32", "weak-scaling bf16",
                      F1_HEADER, T2T_HEADER]
    # repeats at 0.98, 1.00, 1.02 x: spread (max - min) / median = 4 %, shown as +-2 %
    # efficiency 180 / (2 x 100) and 240 / (2 x 150); speedup 240 / 180; F1 and time of the fp32 cell.
    # The strong-scaling cell (batch 16, global 32) has no weak-scaling efficiency.
    assert rows == [["2", "16", "150.0", "–", "–", "–", "–", "0.700", "12.0"],
                    ["2", "32", "180.0 ±2%", "240.0 ±2%", "1.33", "0.90", "0.80", "0.780 (0.780–0.780, n=3)", "12.0"]]
    assert note == NOTE + ("bf16: single bf16 1x b32 (150.0 samples/s, median of 3); "
                           "fp32: single fp32 1x b32 (100.0 samples/s, median of 3)")

    header, rows, note = t["cnn · single · Test CPU (2 cores)"]
    assert rows == [["1", "32", "100.0 ±2%", "150.0 ±2%", "1.50", "1.00", "1.00", "0.800 (0.790–0.810, n=3)", "12.0"]]

    # bf16 only: no fp32 column, no speedup; one repeat: no spread; its own compiled baseline
    header, rows, note = t["cnn · single · compiled · Test CPU (2 cores)"]
    assert header == ["devices", "batch per device (samples)", "throughput bf16 (samples/s)", "weak-scaling bf16",
                      F1_HEADER, T2T_HEADER]
    assert rows == [["1", "32", "120.0", "1.00", "0.750", "12.0"]]
    assert note == NOTE + "bf16: single bf16 compiled 1x b32 (120.0 samples/s, median of 1)"

    header, rows, note = t["lstm · ddp · Test CPU (2 cores)"]
    assert rows == [["2", "32", "50.0", "–", "–", "–"]]
    assert note == "no single-device baseline in these results: no efficiency"


def test_results_table_every_column_by_hand():
    header, rows = results_table(aggregate(frame(matrix())))
    assert header == ["cell", "repeats", "throughput (samples/s)", "per device (samples/s)", "step p50 (ms)",
                      "efficiency", "macro-F1", "UAR", "busy (%)", "peak memory (MiB)", "energy/epoch (J)", "flags"]
    by_cell = {r[0]: r for r in rows}
    assert list(by_cell) == ["cnn single 1x bf16 b32", "cnn single 1x fp32 b32", "cnn ddp 2x bf16 b32",
                             "cnn ddp 2x fp32 b32"]
    # step p50 of the fixture: 1000 x 64 samples / throughput, median 1000 x 64 / 180 = 355.6 ms;
    # memory 1e9 bytes = 953.7 MiB; CPU busy 90 %; no energy measured
    assert by_cell["cnn ddp 2x fp32 b32"] == ["cnn ddp 2x fp32 b32", "3", "180.0 ±2%", "90.0", "355.6", "0.90",
                                             "0.780 (0.780–0.780, n=3)", "0.780", "90 CPU", "954", "–", "–"]
    assert by_cell["cnn single 1x fp32 b32"][2:6] == ["100.0 ±2%", "100.0", "320.0", "1.00"]


def test_hardware_comparison_every_column_by_hand():
    a = matrix("hwA", cpu="CPU A")
    b = matrix("hwB", scale=2.0, f1_shift=0.01, cpu="CPU B")
    for r in b:
        r["utilization"]["gpu_energy_j_per_epoch"] = 40.0
    for r in a:
        r["utilization"]["gpu_energy_j_per_epoch"] = 0.0 if r["config"]["strategy"] == "ddp" else 50.0
    df = frame(a + b)
    header, rows, warnings, machines = hardware_comparison(aggregate(df), df)
    assert machines == ["CPU A (2 cores)", "CPU B (2 cores)"] and warnings == []
    assert header == ["cell", "A throughput (samples/s)", "B throughput (samples/s)", "B/A throughput (x)",
                      "A efficiency", "B efficiency", "B/A efficiency (x)",
                      "A energy/epoch (J)", "B energy/epoch (J)", "B/A energy/epoch (x)",
                      "A macro-F1", "B macro-F1", "B-A macro-F1"]
    by_cell = {r[0]: r for r in rows}
    # B is twice as fast everywhere, so its efficiency is the same; F1 +0.01; an energy of 0 on A
    # gives no ratio rather than a division by zero
    assert by_cell["cnn ddp 2x fp32"] == ["cnn ddp 2x fp32", "180.0", "360.0", "2.00", "0.90", "0.90", "1.00",
                                      "0", "40", "–", "0.780", "0.790", "+0.010"]
    assert by_cell["cnn single 1x fp32"][7:10] == ["50", "40", "0.80"]
    assert len(rows) == 4


def test_hardware_comparison_needs_two_machines():
    df = frame(matrix())
    assert hardware_comparison(aggregate(df), df) is None
    assert hardware_comparison(aggregate(frame([])), frame([])) is None


def test_fmt_blanks_missing_values():
    assert fmt(None) == "–" and fmt(math.nan) == "–" and fmt(float("nan"), ".2f") == "–"
    assert fmt(1.25) == "1.2" and fmt(1.25, ".2f") == "1.25" and fmt(3, "d") == "3"


def test_an_accumulating_cell_has_a_table_of_its_own():
    """ddp at 2 devices, batch 32, with and without --grad-accum 2: two cells, two tables (one line
    of devices x batch would hold only one of them)."""
    plain = fixture_result(strategy="ddp", devices=2, thr=180.0)
    accumulating = fixture_result(strategy="ddp", devices=2, thr=190.0, repeat=1)
    accumulating["config"]["grad_accum"] = 2
    accumulating["run_id"] += "-ga2"
    tables = {title: rows for title, _, rows, _ in main_tables(aggregate(frame([plain, accumulating])))}
    assert set(tables) == {"cnn · ddp · Test CPU (2 cores)", "cnn · ddp · ga2 · Test CPU (2 cores)"}
    assert tables["cnn · ddp · ga2 · Test CPU (2 cores)"][0][2].startswith("190.0")
    assert tables["cnn · ddp · Test CPU (2 cores)"][0][2].startswith("180.0")
