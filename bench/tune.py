"""bench tune's search (issue 25): the fastest configuration of a space that fits and still learns,
with a fraction of a sweep's measurements.

The search is given its three instruments as functions, so that it is tested on a known landscape
with noise (tests/test_tune.py) and run for real by the command with `bench predict`, short
measured windows and `bench parity`:

- predict(cfg) -> samples/s: the model's figure for a candidate, before anything is measured;
- measure(cfg) -> samples/s: one short measured window of it;
- parity(cfg) -> None when the candidate still trains single's model, else why not.

1. Pruned candidates are never measured: the sweep's own skip rules (validity, the memory
   estimate against the device's memory, the devices at hand) give each its reason.
2. Each strategy family's best-predicted candidate is measured first (one family's prediction error
   says nothing of another's), the fastest of them the first incumbent; then candidates are visited
   best learned prediction first. After each measurement the predictions learn: every candidate of
   a family is scaled by the median of that family's measured / predicted ratios.
3. A challenger becomes the incumbent only when it beats it by more than the measured noise (the
   spread of repeated windows, at least `noise`); the incumbent is measured again each time it is
   challenged, so the two alternate. The search stops when no unmeasured candidate's optimistic
   prediction (its learned prediction x (1 + the largest prediction error seen, at least 15 %))
   beats the incumbent by more than the noise, when `patience` challengers in a row did not win,
   or when the budget ends.
4. The winner must still learn: the incumbent is checked with parity first, then the other measured
   candidates in order of their measured throughput; the first that passes wins, the others are
   reported with why.

The state (every window measured, every parity verdict) is written after each step, atomically, so
an interrupted search resumes where it stopped and never measures a window twice.
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


@dataclass
class Candidate:
    key: str  # cells.cell_key: the name in tables, state and result files
    cfg: RunConfig
    pruned: str | None = None  # why it cannot run here (never measured)
    predicted: float | None = None  # samples/s, the model's, before learning
    windows: list[float] = field(default_factory=list)  # measured samples/s, one per window
    parity: str | None = None  # "ok", or why it does not still learn

    @property
    def measured(self) -> float | None:
        return statistics.median(self.windows) if self.windows else None


@dataclass
class Trial:
    key: str
    samples_per_s: float
    incumbent: str | None  # after this trial
    elapsed_s: float  # since the search started, this trial included


@dataclass
class TuneResult:
    winner: Candidate | None
    candidates: list[Candidate]
    trials: list[Trial]
    stopped: str  # why the search stopped


def family(cfg: RunConfig) -> str:
    """The group whose prediction errors are alike: a strategy and its mesh."""
    return f"{cfg.strategy}:tp{cfg.tp}:pp{cfg.pp}:rep{cfg.dp_replicate}"


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


def search(live: list[Candidate], predict: Callable, measure: Callable, parity: Callable, *, budget_s: float,
           noise: float = 0.05, patience: int = 5, state_path: str | None = None, resume: bool = False,
           clock: Callable[[], float] = time.monotonic) -> TuneResult:
    """The search above over the unpruned candidates."""
    state = State(state_path, resume)
    for c in live:
        figure = predict(c.cfg)
        c.predicted = figure if figure and figure > 0 else None
        c.windows = list(state.data["windows"].get(c.key, []))
        c.parity = state.data["parity"].get(c.key)
    trials = [Trial(**t) for t in state.data["trials"]]
    start = clock() - (trials[-1].elapsed_s if trials else 0.0)
    by_key = {c.key: c for c in live}
    incumbent = by_key.get(trials[-1].incumbent) if trials else None
    if incumbent is None and any(c.windows for c in live):  # killed before a trial's incumbent was saved
        incumbent = max((c for c in live if c.windows), key=lambda c: c.measured)

    def window(c: Candidate) -> None:
        c.windows.append(measure(c.cfg))
        state.data["windows"][c.key] = c.windows
        trials.append(Trial(c.key, c.windows[-1], incumbent.key if incumbent else None, clock() - start))
        state.data["trials"] = [asdict(t) for t in trials]
        state.save()

    stopped, losses = "every candidate measured", state.data.get("losses", 0)
    while True:
        measured = [c for c in live if c.windows]
        todo = sorted((c for c in live if not c.windows), key=lambda c: -_learned(c, measured))
        if not todo:
            break
        if clock() - start >= budget_s:
            stopped = f"budget of {budget_s:.0f} s spent"
            break
        known = {family(c.cfg) for c in measured}
        anchors = [c for c in todo if family(c.cfg) not in known]  # each family's best prediction, first
        if anchors:
            window(anchors[0])
            if incumbent is None or anchors[0].measured > incumbent.measured:
                incumbent = anchors[0]
                trials[-1].incumbent = incumbent.key
                state.data["trials"] = [asdict(t) for t in trials]
                state.save()
            continue
        if _learned(todo[0], measured) * (1 + _optimism(measured)) <= incumbent.measured * (
                1 + _noise(measured, noise)):
            stopped = "no remaining candidate's optimistic prediction beats the incumbent by more than the noise"
            break
        if losses >= patience:
            stopped = f"{patience} challengers in a row did not beat the incumbent"
            break
        challenger = todo[0]
        window(challenger)
        window(incumbent)  # alternate: the incumbent measured again beside each challenger
        if challenger.measured > incumbent.measured * (1 + _noise([c for c in live if c.windows], noise)):
            incumbent, losses = challenger, 0
            trials[-1].incumbent = incumbent.key
        else:
            losses += 1
        state.data.update(trials=[asdict(t) for t in trials], losses=losses)
        state.save()
    return TuneResult(_still_learns(live, incumbent, parity, state), live, trials, stopped)


def _still_learns(live: list[Candidate], incumbent: Candidate | None, parity: Callable, state: State) -> Candidate | None:
    """The incumbent if it passes parity, else the fastest other measured candidate that does (each
    checked once, in measured order): a challenger that did not beat the incumbent by more than the
    noise does not win on one lucky window."""
    others = sorted((c for c in live if c.windows and c is not incumbent), key=lambda c: -c.measured)
    for c in ([incumbent] if incumbent else []) + others:
        if c.parity is None:
            c.parity = parity(c.cfg) or "ok"
            state.data["parity"][c.key] = c.parity
            state.save()
        if c.parity == "ok":
            return c
    return None
