"""bench ab's arithmetic and settings, worked out by hand: the paired interval, the verdicts, the
A B B A order, efficiency per side and round, the jobs' environment. The gate's power is measured
by benchmarks/gate_power.py (a benchmark, not a timed test)."""
import math

import pytest

from bench.ab import ABError, Side, interval, job_env, judge, order, parse_env, visit_metrics, with_efficiency


def test_interval_is_the_paired_t_interval_on_log_ratios():
    ratios = [0.90, 0.92, 0.88, 0.91]
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 3)
    half = 3.182 * sd / 2  # t(0.975, 3 df) x sd / sqrt(4)
    got = interval(ratios)
    assert got == pytest.approx((math.exp(mean), math.exp(mean - half), math.exp(mean + half)), rel=1e-12)
    assert interval([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)


def _pair(base_tp: float, head_tp: float, f1: tuple[float, float] = (0.5, 0.5)) -> tuple[dict, dict]:
    def side(tp, f):
        return {"cnn single": {"throughput": tp, "step_time": 1000 / tp, "memory": 100.0, "macro_f1": f,
                               "efficiency": None}}
    return side(base_tp, f1[0]), side(head_tp, f1[1])


def _verdicts(pairs, max_regression=0.05):
    return {v.metric: v for v in judge(pairs, max_regression)}


def test_a_regression_needs_the_whole_interval_beyond_the_threshold():
    # head 10 % slower in every pair, +-1 %: the interval lies wholly below -5 %
    slow = _verdicts([_pair(100, 90), _pair(100, 91), _pair(100, 89), _pair(100, 90)])
    assert slow["throughput"].verdict == "regression" and slow["throughput"].high < 0.95
    assert slow["step_time"].verdict == "regression"  # lower is better: the interval lies above +5 %
    assert slow["memory"].verdict == "no change" and "efficiency" not in slow  # a single cell has none
    # the same mean slowdown with a spread that reaches past -5 %: no change, interval shown
    noisy = _verdicts([_pair(100, 80), _pair(100, 100), _pair(100, 85), _pair(100, 96)])
    v = noisy["throughput"]
    assert v.verdict == "no change" and v.low < 0.9 < v.high and v.high > 0.95
    assert v.text().startswith(f"{(v.ratio - 1) * 100:+.1f}% [") and v.text().endswith("no change")
    # 10 % faster, tight: an improvement, never a regression
    fast = _verdicts([_pair(100, 110), _pair(100, 111), _pair(100, 109)])
    assert fast["throughput"].verdict == "improvement" and fast["step_time"].verdict == "improvement"
    # a single pair cannot make an interval
    assert _verdicts([_pair(100, 50)])["throughput"].verdict == "not measured"


def test_the_threshold_moves_the_verdict():
    pairs = [_pair(100, 93), _pair(100, 94), _pair(100, 93), _pair(100, 94)]  # about -6.5 %, tight
    assert _verdicts(pairs, 0.05)["throughput"].verdict == "regression"
    assert _verdicts(pairs, 0.10)["throughput"].verdict == "no change"


def test_f1_is_judged_against_base_spread():
    same = _verdicts([_pair(100, 100, (0.50, 0.50)), _pair(100, 100, (0.50, 0.50))])["macro_f1"]
    assert same.verdict == "no change" and same.note == "0.5000 vs 0.5000"
    lower = _verdicts([_pair(100, 100, (0.50, 0.45)), _pair(100, 100, (0.50, 0.45))])["macro_f1"]
    assert lower.verdict == "regression"  # base has no spread: any drop is one
    within = _verdicts([_pair(100, 100, (0.50, 0.47)), _pair(100, 100, (0.54, 0.47))])["macro_f1"]
    assert within.verdict == "no change"  # 0.47 is above min(base) - spread = 0.50 - 0.04
    below = _verdicts([_pair(100, 100, (0.50, 0.45)), _pair(100, 100, (0.54, 0.45))])["macro_f1"]
    assert below.verdict == "regression" and below.note == "0.4500 vs 0.5000-0.5400"


def test_order_alternates_who_goes_first():
    assert order(4) == ["base", "head", "head", "base", "base", "head", "head", "base"]


def test_efficiency_divides_by_the_same_side_and_round_single():
    cells = [{"devices": 1, "batch_size": 16, "scaling": "weak", "model": "cnn", "strategy": "single",
              "precision": "fp32"},
             {"devices": 2, "batch_size": 16, "scaling": "weak", "model": "cnn", "strategy": "ddp",
              "precision": "fp32"}]
    single = visit_metrics(cells[0], {"throughput": {"step_time_ms_p50": 80.0}, "quality": None,
                                      "step_ms_sorted": [64.0, 70.0, 90.0], "peak_bytes": 3 * 2**20})
    ddp = visit_metrics(cells[1], {"throughput": {"step_time_ms_p50": 90.0}, "quality": None,
                                   "step_ms_sorted": [80.0, 85.0], "peak_bytes": None})
    assert single["throughput"] == pytest.approx(16 / 0.064) and single["memory"] == 3.0
    assert ddp["throughput"] == pytest.approx(32 / 0.080) and ddp["memory"] is None  # global batch 2 x 16
    from bench.ab import _label

    round_ = {_label(cells[0]): single, _label(cells[1]): ddp}
    with_efficiency(cells, round_)
    assert ddp["efficiency"] == pytest.approx((32 / 0.080) / (2 * 16 / 0.064))  # 0.8
    assert single["efficiency"] is None


def test_jobs_get_huge_pages_unless_the_user_or_a_side_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    env = job_env(Side("base", "HEAD", tmp_path), 1)
    assert env["THP_MEM_ALLOC_ENABLE"] == "1" and env["PYTHONPATH"] == str(tmp_path)
    assert env["OMP_NUM_THREADS"] == "1" and "TORCHELASTIC_RUN_ID" not in env
    assert job_env(Side("head", "wt", tmp_path, {"THP_MEM_ALLOC_ENABLE": "0"}), 1)["THP_MEM_ALLOC_ENABLE"] == "0"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert job_env(Side("base", "HEAD", tmp_path), 2)["THP_MEM_ALLOC_ENABLE"] == "0"


def test_side_env_parsing():
    assert parse_env(["A=1", "B=x=y", "C="], "--head-env") == {"A": "1", "B": "x=y", "C": ""}
    for bad in ("A", "=1"):
        with pytest.raises(ABError, match=f"--head-env '{bad}': use KEY=VALUE"):
            parse_env([bad], "--head-env")
