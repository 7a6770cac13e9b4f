"""bench tune's search on a known landscape with noise (bench/tune.py): no process is started, nothing
is timed. The landscape: a throughput per cell from a formula; the model's prediction is off by a
bias per strategy family and some noise; each measured window is off by a little noise."""
import itertools
import random

import pytest

from bench.cells import cell_key
from bench.config import ConfigError, RunConfig
from bench.tune import Candidate, prune, search

STRATEGY = {"single": 100.0, "ddp": 180.0, "fsdp": 150.0, "pipeline": 120.0}
BIAS = {"single": 1.0, "ddp": 0.8, "fsdp": 1.25, "pipeline": 1.1}  # the model's error per family


def space() -> list[Candidate]:
    """The issue's space: cnn and transformer; single / ddp / fsdp / pipeline x2; fp32 / bf16; batch
    16 / 32 / 64; AC on / off; accumulation 1 / 2 (pipeline without it)."""
    out = []
    for model, strategy, precision, batch, ac, k in itertools.product(
            ("cnn", "transformer"), STRATEGY, ("fp32", "bf16"), (16, 32, 64), ("none", "full"), (1, 2)):
        if strategy == "pipeline" and k > 1:
            continue
        cfg = RunConfig(model=model, strategy=strategy, devices=1 if strategy == "single" else 2, precision=precision,
                        batch_size=batch, ac=ac, grad_accum=k)
        out.append(Candidate(cell_key(cfg), cfg))
    return out


def truth(cfg: RunConfig) -> float:
    t = STRATEGY[cfg.strategy] * (1.3 if cfg.model == "cnn" else 1.0) * (1.2 if cfg.precision == "bf16" else 1.0)
    t *= {16: 0.8, 32: 1.0, 64: 1.1}[cfg.batch_size] * (0.75 if cfg.ac == "full" else 1.0)
    return t * (1.05 if cfg.grad_accum == 2 else 1.0)


class Landscape:
    def __init__(self, seed=0, predict_noise=0.05, measure_noise=0.02, bias=True):
        self.rng = random.Random(seed)
        self.predict_noise, self.measure_noise, self.bias = predict_noise, measure_noise, bias
        self.calls: list[str] = []
        self.now = 0.0

    def predict(self, cfg):
        return truth(cfg) * (BIAS[cfg.strategy] if self.bias else 1.0) * (1 + self.rng.gauss(0, self.predict_noise))

    def measure(self, cfg):
        self.calls.append(cell_key(cfg))
        self.now += 10.0  # a window: 10 s of the fake clock
        return truth(cfg) * (1 + self.rng.gauss(0, self.measure_noise))

    def clock(self):
        return self.now


def _best(cands):
    return max(truth(c.cfg) for c in cands)


@pytest.mark.parametrize("seed", range(5))
def test_search_finds_the_optimum_with_a_third_of_the_measurements(seed):
    land, cands = Landscape(seed), space()
    got = search(cands, land.predict, land.measure, lambda cfg: None, budget_s=1e9, noise=0.05, clock=land.clock)
    assert truth(got.winner.cfg) >= _best(cands) / 1.05  # the best, or within the noise of it
    assert len(set(land.calls)) <= len(cands) / 3, (len(set(land.calls)), len(cands), got.stopped)


def test_search_stops_early_when_the_predictions_say_nothing_can_beat_the_incumbent():
    land = Landscape(predict_noise=0.0, measure_noise=0.0, bias=False)
    got = search(space(), land.predict, land.measure, lambda cfg: None, budget_s=1e9, clock=land.clock)
    assert got.stopped.startswith("no remaining candidate's optimistic prediction")
    assert len(set(land.calls)) <= 6 and truth(got.winner.cfg) == _best(space())


def test_a_pruned_candidate_is_never_measured_and_a_space_pruned_to_nothing_says_why():
    land, cands = Landscape(1), space()

    def why_not(cfg):
        return "does not fit: 30 GiB > 24 GiB" if cfg.strategy == "ddp" else None

    live = prune(cands, why_not)
    got = search(live, land.predict, land.measure, lambda cfg: None, budget_s=1e9, clock=land.clock)
    assert not any("-ddp-" in k for k in land.calls) and got.winner.cfg.strategy != "ddp"
    assert all(c.pruned == "does not fit: 30 GiB > 24 GiB" for c in cands if c.cfg.strategy == "ddp")
    with pytest.raises(ConfigError, match=r"prunes to nothing \(.* candidates\): no GPU here"):
        prune(space(), lambda cfg: "no GPU here")


def test_a_killed_search_resumes_without_measuring_a_window_twice(tmp_path):
    state = str(tmp_path / "tune.json")
    land = Landscape(2)
    calls = [0]

    def dies_at_three(cfg):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return land.measure(cfg)

    with pytest.raises(KeyboardInterrupt):
        search(space(), land.predict, dies_at_three, lambda cfg: None, budget_s=1e9, state_path=state,
               clock=land.clock)
    first = list(land.calls)
    again = Landscape(2)
    got = search(space(), again.predict, again.measure, lambda cfg: None, budget_s=1e9, state_path=state,
                 resume=True, clock=lambda: land.now + again.now)
    assert first and again.calls
    # what was measured before the kill is kept: no candidate but an incumbent (measured beside each
    # challenger) is measured again after the resume, and every window is one trial
    incumbents = {t.incumbent for t in got.trials}
    assert not [k for k in set(first) - incumbents if k in again.calls], (first, again.calls)
    assert len(got.trials) == len(first) + len(again.calls)


def test_a_winner_that_fails_parity_is_passed_over():
    land, cands = Landscape(3), space()
    best = max(cands, key=lambda c: truth(c.cfg))

    def parity(cfg):
        return "loss 3e-2 from single's (limit 1e-4)" if cell_key(cfg) == best.key else None

    got = search(cands, land.predict, land.measure, parity, budget_s=1e9, clock=land.clock)
    assert got.winner.key != best.key and best.parity.startswith("loss 3e-2")
    assert got.winner.parity == "ok"


def test_the_budget_stops_the_search():
    land = Landscape(4)
    got = search(space(), land.predict, land.measure, lambda cfg: None, budget_s=35, clock=land.clock)
    assert got.stopped == "budget of 35 s spent" and len(land.calls) <= 5


def test_a_candidate_whose_run_fails_is_out_with_its_reason_and_the_search_goes_on():
    from bench.tune import Failed

    land, cands = Landscape(5), space()
    best = max(cands, key=lambda c: truth(c.cfg))

    def measure(cfg):
        if cell_key(cfg) == best.key:
            raise Failed("out of memory at step 3")
        return land.measure(cfg)

    got = search(cands, land.predict, measure, lambda cfg: None, budget_s=1e9, clock=land.clock)
    assert best.pruned == "failed when measured: out of memory at step 3" and not best.windows
    assert got.winner is not None and got.winner.key != best.key


def test_a_challenger_no_faster_than_the_incumbent_never_takes_its_place():
    """Two candidates of the same true speed, windows off by 3 %: the paired interval must clear 1
    before a challenger wins, so over 200 searches the second one measured wins rarely."""
    wins = 0
    for seed in range(200):
        rng = random.Random(seed)
        a = Candidate("a", RunConfig(strategy="ddp", devices=2, batch_size=16))
        b = Candidate("b", RunConfig(strategy="ddp", devices=2, batch_size=32))
        got = search([a, b], lambda cfg: 100.0 if cfg.batch_size == 16 else 99.0,
                     lambda cfg: 100.0 * (1 + rng.gauss(0, 0.03)), lambda cfg: None, budget_s=1e9, noise=0.0)
        wins += got.winner.key == "b"
    # each look at 2 to 4 pairs errs upward at most 2.5 % of the time (one-sided t interval): 7.5 % over
    # three looks by the union bound; 10 % of 200 leaves room for the binomial spread of 200 searches
    assert wins <= 20, wins


def test_time_to_f1_picks_the_quickest_to_the_target_of_the_checked_and_passes_over_one_that_never_gets_there():
    """best_of = 3 (--objective time-to-f1): the check returns the training seconds to the F1 target or
    why not. Planted: the fastest-measured candidate never reaches the target, the second takes 95 s
    (a large global batch needs more epochs), the third 40 s, the fourth 60 s, the fifth would take
    10 s. The winner is the third: checks stop once three have passed, so the fifth is never run."""
    cands = space()
    ranked = cands[:6]
    for i, c in enumerate(ranked):  # measured, fastest first
        c.windows = [200.0 - 10 * i]
    planted = {ranked[0].key: "did not reach val macro-F1 0.810 in 8 epochs (best 0.702)",
               ranked[1].key: 95.0, ranked[2].key: 40.0, ranked[3].key: 60.0, ranked[4].key: 10.0}
    checked = []

    def check(cfg):
        checked.append(cell_key(cfg))
        return planted[cell_key(cfg)]

    from bench.tune import State, _still_learns

    incumbent = ranked[0]
    winner = _still_learns(cands, incumbent, check, State(None, False), best_of=3)
    assert winner.key == ranked[2].key and winner.time_to_f1_s == 40.0
    assert checked == [c.key for c in ranked[:4]]  # the fifth (10 s) is never checked: three passed before it
    assert ranked[0].parity.startswith("did not reach") and ranked[0].time_to_f1_s is None
    # best_of = 1 (parity) keeps the first that passes, whatever its seconds
    for c in cands:
        c.parity, c.time_to_f1_s = None, None
    assert _still_learns(cands, incumbent, check, State(None, False)).key == ranked[1].key


def test_a_search_in_samples_per_joule_says_its_unit_and_a_state_of_before_reads_back(tmp_path):
    """The figure is the objective's: what the search says names its unit; a state written when the
    trials called their figure samples_per_s resumes."""
    land, said = Landscape(6), []
    state = tmp_path / "state.json"
    search(space(), lambda cfg: land.predict(cfg) / 300, lambda cfg: land.measure(cfg) / 300, lambda cfg: None,
           budget_s=40, clock=land.clock, say=said.append, unit="samples/J", state_path=str(state))
    windows = [s for s in said if s.startswith("window ")]
    assert windows and all(" samples/J (" in s for s in windows), windows
    import json

    raw = json.loads(state.read_text())
    for t in raw["trials"]:
        t["samples_per_s"] = t.pop("value")
    state.write_text(json.dumps(raw))
    again = search(space(), land.predict, land.measure, lambda cfg: None, budget_s=0, clock=land.clock,
                   state_path=str(state), resume=True)
    assert [t.value for t in again.trials] == [t["samples_per_s"] for t in raw["trials"]]
