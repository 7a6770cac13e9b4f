"""bench tune's search (issue 25): the fastest configuration of a space that fits and still learns,
with a fraction of a sweep's measurements.

The search is given its three instruments as functions, so that it is tested on a known landscape
with noise (tests/test_tune.py) and run for real by the command with `bench predict`, short
measured windows and `bench parity`:

- predict(cfg) -> samples/s: the model's figure for a candidate, before anything is measured;
- measure(cfg) -> samples/s: one short measured window of it;
- parity(cfg) -> None when the candidate still trains single's model, else why not; or, for
  --objective time-to-f1, the seconds its training run took to reach the F1 target.

Every figure is the objective's, higher better: samples/s, or samples/J for --objective energy
(`unit` names it in what the search says).

1. Pruned candidates are never measured: the sweep's own skip rules (validity, the memory
   estimate against the device's memory, the devices at hand) give each its reason.
2. Each strategy family's best-predicted candidate is measured first (one family's prediction error
   says nothing of another's); one whose first window is faster than the incumbent's challenges it
   as in 3, the first measured is the first incumbent. Then candidates are visited best learned
   prediction first. After each measurement the predictions learn: every candidate of
   a family is scaled by the median of that family's measured / predicted ratios.
3. A challenger is judged against the incumbent as bench ab judges a change: windows in pairs,
   challenger then incumbent, and the paired 95 % interval of their ratios (bench/ab.py interval).
   It becomes the incumbent only when the whole interval lies above 1, i.e. it clears the noise
   this pairing sees; it is out after a pair it loses, or once its interval's top lies under
   1 + `noise` (it cannot be a gain worth having), or after MAX_PAIRS pairs. The search stops when
   no unmeasured candidate's optimistic prediction (its learned prediction x (1 + the largest
   prediction error seen, at least 15 %)) beats the incumbent by more than the noise (the spread
   of repeated windows, at least `noise`), when `patience` challengers in a row did not win, or
   when the budget ends.
4. The winner must still learn: the incumbent is checked with parity first, then the other measured
   candidates in order of their measured figure; the first that passes wins, the others are
   reported with why. With best_of = k (time-to-f1), checks go on until k have passed (or none is
   left), and the one whose check returned the fewest seconds to the F1 target wins.

The state (every window measured, every parity verdict, the candidates that failed) is written after
each step, atomically, so an interrupted search resumes where it stopped and never measures a
window twice; a candidate whose run fails (measure raises Failed) is out with its reason.
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ConfigError, RunConfig

MIN_OPTIMISM = 0.15  # how far above its learned prediction a candidate may turn out, before any error is seen
MAX_PAIRS = 4  # challenger / incumbent window pairs at most per challenge (t with 3 degrees of freedom: 3.18)


class Failed(Exception):
    """A candidate's window could not be measured (its run failed); the message says why."""


@dataclass
class Candidate:
    key: str  # cells.cell_key: the name in tables, state and result files
    cfg: RunConfig
    pruned: str | None = None  # why it cannot run here (never measured)
    predicted: float | None = None  # the objective's figure (samples/s, samples/J), the model's, before learning
    windows: list[float] = field(default_factory=list)  # measured, in the same unit, one per window
    parity: str | None = None  # "ok", or why it does not still learn
    time_to_f1_s: float | None = None  # time-to-f1: training seconds its check took to reach the target
    memory_gib: float | None = None  # the memory estimate per device (bench/memory.py), for tables and plots

    @property
    def measured(self) -> float | None:
        return statistics.median(self.windows) if self.windows else None


@dataclass
class Trial:
    key: str
    value: float  # the window's figure: samples/s (samples/J for --objective energy)
    incumbent: str | None  # after this trial
    elapsed_s: float  # since the search started, this trial included


@dataclass
class TuneResult:
    winner: Candidate | None
    candidates: list[Candidate]
    trials: list[Trial]
    stopped: str  # why the search stopped


def family(cfg: RunConfig) -> str:
    """The group whose prediction errors are alike: a strategy and its mesh, compiled or not (bench
    predict has no model of what torch.compile gains)."""
    return f"{cfg.strategy}:tp{cfg.tp}:pp{cfg.pp}:rep{cfg.dp_replicate}" + (":compiled" if cfg.compile else "")


def prune(candidates: list[Candidate], why_not: Callable[[RunConfig], str | None]) -> list[Candidate]:
    """Mark what cannot run (the sweep's skip rules); the candidates that can. None left: one line
    saying what pruned them, as ConfigError."""
    for c in candidates:
        c.pruned = why_not(c.cfg)
    live = [c for c in candidates if not c.pruned]
    if not live:
        reasons = sorted({c.pruned for c in candidates if c.pruned})
        raise ConfigError(f"the space prunes to nothing ({len(candidates)} candidates): " + "; ".join(reasons[:3])
                          + ("; ..." if len(reasons) > 3 else ""))
    return live


def _learned(c: Candidate, measured: list[Candidate]) -> float:
    """c's prediction scaled by its family's median measured / predicted ratio (its own where its
    family has none measured: one family's error says nothing of another's, which is why each family
    is measured once before the search may stop); 0 for a candidate the model gave no figure."""
    if not c.predicted:
        return 0.0
    own = [m.measured / m.predicted for m in measured if m.predicted and family(m.cfg) == family(c.cfg)]
    return c.predicted * (statistics.median(own) if own else 1.0)


def _noise(measured: list[Candidate], floor: float) -> float:
    """The relative spread of repeated windows of one candidate (the largest seen), at least floor."""
    spreads = [(max(c.windows) - min(c.windows)) / c.measured for c in measured if len(c.windows) > 1]
    return max([floor, *spreads])


def _optimism(measured: list[Candidate]) -> float:
    """How far above its learned prediction a candidate may turn out: the largest error of the
    measured ones against their own learned predictions, at least MIN_OPTIMISM."""
    errors = [c.measured / _learned(c, measured) - 1 for c in measured if c.predicted]
    return max([MIN_OPTIMISM, *errors])


class State:
    """The search's record on disk (windows and parity verdicts by key), rewritten atomically after
    each step; a fresh search without a path keeps it in memory only."""

    def __init__(self, path: str | None, resume: bool):
        self.path = Path(path) if path else None
        self.data = {"windows": {}, "parity": {}, "trials": [], "losses": 0}
        if resume and self.path and self.path.exists():
            self.data = json.loads(self.path.read_text())

    def save(self) -> None:
        if self.path:
            from emotion_models.atomic import atomic_write_text

            atomic_write_text(self.path, json.dumps(self.data, indent=1))


class _Search:
    """The search's moving parts: the windows measured so far (the trials), the incumbent, and the
    state on disk, saved after every change."""

    def __init__(self, live: list[Candidate], predict: Callable, measure: Callable, state: State, clock: Callable,
                 say: Callable[[str], None], noise: float, budget_s: float, unit: str = "samples/s"):
        self.measure, self.state, self.clock, self.say, self.noise = measure, state, clock, say, noise
        self.budget_s, self.unit = budget_s, unit
        self.trials, self.incumbent = _restore(live, predict, state)
        self.start = clock() - (self.trials[-1].elapsed_s if self.trials else 0.0)
        self.losses = state.data.get("losses", 0)

    def save(self) -> None:
        self.state.data.update(trials=[asdict(t) for t in self.trials], losses=self.losses)
        self.state.save()

    def window(self, c: Candidate) -> bool:
        """One window of c, kept; False (and c out of the search, with its reason) when it failed."""
        try:
            value = self.measure(c.cfg)
        except Failed as exc:
            c.pruned = f"failed when measured: {exc}"
            self.state.data.setdefault("failed", {})[c.key] = c.pruned
            self.save()
            self.say(f"{c.key}: {c.pruned}")
            return False
        c.windows.append(value)
        self.state.data["windows"][c.key] = c.windows
        self.trials.append(Trial(c.key, value, self.incumbent.key if self.incumbent else None,
                                 self.clock() - self.start))
        self.save()
        self.say(f"window {len(self.trials)}: {c.key} {value:.{_digits(value)}f} {self.unit} "
                 f"({self.trials[-1].elapsed_s:.0f} s)")
        return True

    def beats(self, c: Candidate) -> bool:
        """Whether c takes the incumbent's place: there is none yet, or c wins a paired challenge."""
        if self.incumbent is None:
            return True

        def paired(x: Candidate) -> bool:
            ok = self.window(x)
            if not ok and x is not c:  # the incumbent failing when measured again ends the tune
                raise Failed(f"the incumbent {x.key} failed when measured again: {x.pruned}")
            return ok

        return _challenge(c, self.incumbent, paired, self.noise, lambda: self.clock() - self.start < self.budget_s)

    def promote(self, c: Candidate) -> None:
        self.incumbent = c
        self.trials[-1].incumbent = c.key
        self.save()
        self.say(f"incumbent: {c.key}")


def search(live: list[Candidate], predict: Callable, measure: Callable, parity: Callable, *, budget_s: float,
           noise: float = 0.05, patience: int = 5, state_path: str | None = None, resume: bool = False,
           clock: Callable[[], float] = time.monotonic, say: Callable[[str], None] = lambda _: None,
           unit: str = "samples/s", best_of: int = 1) -> TuneResult:
    """The search above over the unpruned candidates; say(line) after each window."""
    state = State(state_path, resume)
    s = _Search(live, predict, measure, state, clock, say, noise, budget_s, unit)
    stopped = "every candidate measured"
    while True:
        measured = [c for c in live if c.windows]
        todo = sorted((c for c in live if not c.windows and not c.pruned), key=lambda c: -_learned(c, measured))
        if not todo:
            break
        if clock() - s.start >= budget_s:
            stopped = f"budget of {budget_s:.0f} s spent"
            break
        known = {family(c.cfg) for c in measured}
        first = next((c for c in todo if family(c.cfg) not in known), None)  # each family's best prediction, first
        if first is not None:
            # a family's first window that looks faster than the incumbent is challenged as any other
            if s.window(first) and (s.incumbent is None or first.measured > s.incumbent.measured) and s.beats(first):
                s.promote(first)
            continue
        if _learned(todo[0], measured) * (1 + _optimism(measured)) <= s.incumbent.measured * (
                1 + _noise(measured, noise)):
            stopped = "no remaining candidate's optimistic prediction beats the incumbent by more than the noise"
            break
        if s.losses >= patience:
            stopped = f"{patience} challengers in a row did not beat the incumbent"
            break
        challenger = todo[0]
        if s.beats(challenger):
            s.losses = 0
            s.promote(challenger)
        else:
            s.losses += 1
            s.save()
    return TuneResult(_still_learns(live, s.incumbent, parity, state, best_of), live, s.trials, stopped)


def _restore(live: list[Candidate], predict: Callable, state: State) -> tuple[list[Trial], Candidate | None]:
    """Each candidate's prediction, and what the state measured of it; the trials and the incumbent."""
    for c in live:
        figure = predict(c.cfg)
        c.predicted = figure if figure and figure > 0 else None
        c.windows = list(state.data["windows"].get(c.key, []))
        c.parity = state.data["parity"].get(c.key)
        c.pruned = state.data.get("failed", {}).get(c.key, c.pruned)
    for c in live:
        c.time_to_f1_s = state.data.get("time_to_f1", {}).get(c.key)
    # a state written before the figure was the objective's called it samples_per_s
    trials = [Trial(**{"value" if k == "samples_per_s" else k: v for k, v in t.items()}) for t in state.data["trials"]]
    incumbent = {c.key: c for c in live}.get(trials[-1].incumbent) if trials else None
    if incumbent is None and any(c.windows for c in live):  # killed before a trial's incumbent was saved
        incumbent = max((c for c in live if c.windows), key=lambda c: c.measured)
    return trials, incumbent


def _challenge(challenger: Candidate, incumbent: Candidate, window: Callable[[Candidate], bool], noise: float,
               time_left: Callable[[], bool] = lambda: True) -> bool:
    """Pairs of windows, challenger then incumbent, until the paired interval of their ratios lies
    wholly above 1 (a win), or the challenger loses a pair (or fails), or the interval's top lies
    under 1 + noise, or MAX_PAIRS pairs are spent, or the budget is (no win)."""
    from .ab import interval

    ratios: list[float] = []
    for k in range(MAX_PAIRS):
        if k and not time_left():
            return False
        if not window(challenger):
            return False
        window(incumbent)  # alternate: the incumbent measured again beside each challenger
        ratios.append(challenger.windows[-1] / incumbent.windows[-1])
        if ratios[-1] <= 1:
            return False
        if len(ratios) > 1:
            _, low, high = interval(ratios)
            if low > 1:
                return True
            if high < 1 + noise:
                return False
    return False


def _still_learns(live: list[Candidate], incumbent: Candidate | None, parity: Callable, state: State,
                  best_of: int = 1) -> Candidate | None:
    """The incumbent if it passes parity, else the fastest other measured candidate that does (each
    checked once, in measured order): a challenger that did not beat the incumbent by more than the
    noise does not win on one lucky window. best_of > 1: the first best_of that pass are checked,
    and the one whose check took the fewest seconds to the F1 target wins."""
    # a candidate whose later window failed (pruned: failed when measured) is not checked
    others = sorted((c for c in live if c.windows and not c.pruned and c is not incumbent), key=lambda c: -c.measured)
    passed = []
    for c in ([incumbent] if incumbent else []) + others:
        if c.parity is None:
            verdict = parity(c.cfg)
            if isinstance(verdict, (int, float)) and not isinstance(verdict, bool):  # seconds to the F1 target
                c.time_to_f1_s, verdict = float(verdict), None
                state.data.setdefault("time_to_f1", {})[c.key] = c.time_to_f1_s
            c.parity = verdict or "ok"
            state.data["parity"][c.key] = c.parity
            state.save()
        if c.parity == "ok":
            passed.append(c)
            if len(passed) >= best_of:
                break
    if best_of > 1 and passed:
        return min(passed, key=lambda c: c.time_to_f1_s if c.time_to_f1_s is not None else float("inf"))
    return passed[0] if passed else None


def _digits(value: float) -> int:
    """Decimals that show a figure's change: 1 for samples/s, more for samples/J (a few a joule)."""
    return 1 if abs(value) >= 10 else 3
