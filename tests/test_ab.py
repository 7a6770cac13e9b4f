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
    # the same mean slowdown with a spread that reaches past -5 %: not "no change" (it could not see):
    # inconclusive, with the smallest change this run could have seen, the interval's half-width
    noisy = _verdicts([_pair(100, 80), _pair(100, 100), _pair(100, 85), _pair(100, 96)])
    v = noisy["throughput"]
    assert v.verdict == "inconclusive" and v.low < 0.9 < v.high and v.high > 0.95
    assert v.smallest_visible == pytest.approx(math.sqrt(v.high / v.low) - 1)
    assert v.text() == (f"{(v.ratio - 1) * 100:+.1f}% [{(v.low - 1) * 100:+.1f}, {(v.high - 1) * 100:+.1f}] "
                        f"inconclusive, smallest change this run could see: {v.smallest_visible * 100:.1f} %")
    # no change only when the whole interval lies within +-5 %
    same = _verdicts([_pair(100, 99), _pair(100, 101), _pair(100, 100), _pair(100, 100.5)])
    assert same["throughput"].verdict == "no change" and 0.95 < same["throughput"].low < same["throughput"].high < 1.05
    # 10 % faster, tight: an improvement, never a regression
    fast = _verdicts([_pair(100, 110), _pair(100, 111), _pair(100, 109)])
    assert fast["throughput"].verdict == "improvement" and fast["step_time"].verdict == "improvement"
    # a single pair cannot make an interval
    assert _verdicts([_pair(100, 50)])["throughput"].verdict == "not measured"
    # the gate's one word: an improvement seen is said (exit 0 all the same), never over an undecided metric
    from bench.ab import ABOutcome

    def gate(*metrics):
        return ABOutcome(None, None, 3, 1.0, [m for vs in metrics for m in vs.values()]).verdict

    assert (gate(fast, same), gate(same), gate(fast, noisy)) == ("improvement", "no change", "inconclusive")


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
    from bench.cells import cell_label

    round_ = {cell_label(cells[0], from_config=True): single, cell_label(cells[1], from_config=True): ddp}
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


# ------------------------------------------------------------------------------------------ the sequential rule

def _simulated_gate(rng, effect: float, noise: float, planned: int, extra: int, rule_looks: str = "two"):
    """One gate on a simulated measurer: each pair's head/base throughput ratio is lognormal around
    1 + effect with `noise` spread (sd of the log ratio). The planned look after `planned` pairs,
    then `extra` more pairs and the last look, as run_ab does; or (rule_looks="every") a naive rule
    that looks after every pair from the 3rd up to the same total at the same 95 % interval."""
    import random  # noqa: F401

    from bench.ab import judge, sequential

    def measure():
        ratio = math.exp(rng.gauss(math.log(1 + effect), noise))
        unjudged = {"step_time": None, "memory": None, "efficiency": None, "macro_f1": 0.5}
        return ({"cnn single": {"throughput": 100.0, **unjudged}},
                {"cnn single": {"throughput": 100.0 * ratio, **unjudged}})

    if rule_looks == "two":
        verdicts, looks, _ = sequential(measure, lambda done: planned, lambda done: extra, 0.05)
        return next(v for v in verdicts if v.metric == "throughput").verdict, looks
    pairs = [measure() for _ in range(2)]
    for n in range(3, planned + extra + 1):  # a look after every pair: stops at the first claim
        pairs.append(measure())
        v = next(v for v in judge(pairs, 0.05) if v.metric == "throughput")
        if v.verdict != "inconclusive":
            return v.verdict, [n]
    return "inconclusive", [planned + extra]


def _rates(effect, noise, planned=8, extra=8, n=1000, seed=0, rule_looks="two"):
    import random
    from collections import Counter

    rng = random.Random(seed)
    return Counter(_simulated_gate(rng, effect, noise, planned, extra, rule_looks)[0] for _ in range(n))


def test_a_large_effect_under_noise_too_wide_to_judge_is_inconclusive_never_no_change():
    """The issue's case: a planted 15 % slowdown on a machine whose intervals were 24-32 points wide
    (noise 0.15 per pair, 7 pairs) read "no change". Now it is regression or inconclusive."""
    got = _rates(effect=-0.15 / 1.15, noise=0.15, planned=7, extra=7, n=300)
    assert got["no change"] == 0 and got["improvement"] == 0
    assert got["inconclusive"] > 0  # the noise does hide it at times: said so


def test_no_claim_is_wrong_more_often_than_the_stated_5_percent_over_1000_gates():
    """At the edges, where a wrong claim is likeliest: a true change of exactly -5 % is not a
    regression beyond the threshold, so calling it one is a false alarm; a true change of exactly
    -5 % is not within it either, so calling it "no change" is wrong too. Over 1,000 simulated gates
    each stays at or under 5 % (plus 1.5 points of binomial slack for 1,000 draws); a rule looking
    after every pair at the same 95 % interval breaks the bound (why the rule has two looks)."""
    edge = 1 / 1.05 - 1  # head / base = 1 - 5 %: throughput exactly at the threshold
    two = _rates(effect=-0.05, noise=0.04)
    assert two["regression"] / 1000 <= 0.065 and two["no change"] / 1000 <= 0.065, two
    within = _rates(effect=edge * 0.999, noise=0.04, seed=1)
    assert within["regression"] / 1000 <= 0.065, within
    every = _rates(effect=-0.05, noise=0.04, rule_looks="every", seed=2)
    assert (every["regression"] + every["no change"]) / 1000 > (two["regression"] + two["no change"]) / 1000 + 0.05, \
        (every, two)
    none = _rates(effect=0.0, noise=0.04, seed=3)
    assert none["regression"] == 0 and none["no change"] / 1000 > 0.9  # no effect: no change, told


def test_the_sequential_rule_decides_a_10_percent_effect_under_5_percent_noise():
    """A planted 10 % slowdown (a step 10 % longer), 8 planned pairs and 8 more: with 5 % noise per
    pair it is called a regression in 9 of 10 gates (364 of 400 here), with 4 % (the AMD machine
    the README's figures come from) in 395 of 400; never no change."""
    got = _rates(effect=-0.1 / 1.1, noise=0.05, n=400, seed=8)
    assert got["regression"] / 400 >= 0.88 and got["no change"] == 0, got
    got = _rates(effect=-0.1 / 1.1, noise=0.04, n=400, seed=7)
    assert got["regression"] / 400 >= 0.97 and got["no change"] == 0, got
    # and it stops at the first look when that one can tell
    import random

    verdict, looks = _simulated_gate(random.Random(5), -0.3, 0.02, 8, 8)
    assert verdict == "regression" and looks == [8]


def test_a_regression_ends_the_gate_even_while_another_metric_is_inconclusive():
    from bench.ab import Verdict, undecided

    noisy = Verdict("c", "efficiency", "inconclusive", 1.0, 0.9, 1.1)
    assert undecided([Verdict("c", "throughput", "no change", 1.0, 0.99, 1.01), noisy])
    assert not undecided([Verdict("c", "throughput", "regression", 0.9, 0.88, 0.92), noisy])
    assert not undecided([Verdict("c", "throughput", "no change", 1.0, 0.99, 1.01)])
    # an F1 regression decides the gate too
    assert not undecided([Verdict("c", "macro_f1", "regression", 0.9, note="0.4 vs 0.5"), noisy])


def test_the_pairs_an_inconclusive_verdict_would_need():
    from bench.ab import Verdict, pairs_needed

    # mean -8 %, sd of log ratios 0.1: the half-width must shrink below |log 0.92| - log 1.05 = 0.0346
    v = Verdict("c", "throughput", "inconclusive", 0.92, 0.85, 0.99, pairs=8, log_sd=0.1)
    n = pairs_needed(v, 0.05)
    d = abs(math.log(0.92)) - math.log(1.05)
    assert n >= (1.96 * 0.1 / d) ** 2 and 2.0 * 0.1 / math.sqrt(n) <= d * 1.05
    assert pairs_needed(Verdict("c", "throughput", "inconclusive", 1 / 1.05, 0.9, 1.0, pairs=8, log_sd=0.1), 0.05) is None


def test_the_gate_s_new_flags_are_checked_before_anything_runs(capsys):
    from conftest import invoke

    for argv, text in ((["--inconclusive", "maybe"], "--inconclusive maybe: use ok or fail"),
                       (["--budget-s", "270", "--max-budget-s", "100"], "--max-budget-s 100 is below --budget-s 270"),
                       (["--json-out", " "], "--json-out is empty")):
        code, out = invoke(["ab", "HEAD", *argv], capsys)
        assert code == 2 and text in out and "Traceback" not in out, (argv, out)


def test_the_console_verdicts_fit_80_columns_and_keep_every_word():
    """A row per cell and metric at 80 columns: nothing cut, the inconclusive line whole."""
    import io
    from pathlib import Path

    from rich.console import Console

    from bench.ab import ABOutcome, Side, Verdict, console_table
    from bench.ui import table

    cell = "wav2vec2-base ddp 8x bf16 compiled b16"
    o = ABOutcome(Side("base", "HEAD", Path(".")), Side("head", "working tree", Path(".")), 20, 500.0,
                  [Verdict(cell, "efficiency", "inconclusive", 0.98, 0.91, 1.06, pairs=20),
                   Verdict(cell, "memory", "regression", 1.1, 1.07, 1.12, pairs=20),
                   Verdict(cell, "macro_f1", "no change", 1.0, note="0.8000 vs 0.8000")])
    header, rows = console_table(o)
    buf = io.StringIO()
    Console(file=buf, width=80, color_system=None).print(table("bench ab", header, rows, plain=True))
    out = buf.getvalue()
    assert max(map(len, out.splitlines())) <= 80 and "…" not in out, out
    shown = set(out.replace("│", " ").split())  # wrapped, never cut: every word of every cell is there
    assert all(set(" ".join(r).split()) <= shown for r in rows), out
    assert rows[0][3] == "inconclusive, smallest change this run could see: 7.9 %"
