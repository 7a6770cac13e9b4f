"""`bench ab BASE [HEAD]`: a regression gate that measures base and head in the same job.

BASE (and HEAD, when it is a revision rather than the working tree) is checked out into a
temporary git worktree; the same short cells (the `gate` preset: single and ddp x2, 40 timed
steps) run with the base code and the head code alternately, A B B A A B ..., K pairs, in the
same environment (`--base-env` / `--head-env` set variables for one side only, so BASE = HEAD
A/B-tests a setting instead of a change). Each side has a measuring job (bench/ab_driver.py:
torchrun over the side's code, data loaded once, started anew every PAIRS_PER_JOB pairs, on huge
pages: see job_env), so a visit costs its 45 steps and not a start-up, and the two members of a
pair run seconds apart: this machine's speed
drifts over tens of seconds by more than the 10 % the gate must catch, and pairing only cancels
what both members share. A pair's efficiency divides its ddp cell by the single cell of the same
side measured just before.

Per cell and metric the verdict rests on the K paired ratios head/base: a 95 % paired t interval
on their logarithms (back-transformed), so machine drift, which moves both sides of a pair, cancels.
The verdicts are those of an equivalence test (two one-sided tests) against --max-regression (5 %):

    regression    the whole interval lies beyond the threshold in the bad direction
    improvement   the whole interval lies beyond it in the good direction
    no change     the whole interval lies within +-threshold
    inconclusive  otherwise: the run could not tell; it says the smallest change it could have seen

The sequential rule: the gate looks at the pairs --budget-s plans; while a judged metric is
inconclusive and none is a regression (which decides the gate) it measures more pairs, up to
--max-budget-s, and looks once more. Two looks at
most, each at the 95 % interval: each of the claims above is wrong at most 2.5 % of the time at a
look (one-sided), so at most 5 % over both (Bonferroni), whatever the true change; no other look
is taken. A rule that looked after every pair at 95 % would claim more often than it says
(tests/test_ab.py measures both on a simulated measurer). Throughput and weak-scaling efficiency
(both from each visit's fastest step, see JUDGED), step time p50 and peak memory are judged;
macro-F1 is compared exactly (the runs are deterministic): a regression when head's is below the
lowest of base's by more than base's own spread.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cells import cell_label

REPO = Path(__file__).resolve().parent.parent
# what the gate judges: name -> (label, +1 if higher is better). Throughput and efficiency come from
# the fastest step of each visit (the driver's own clock on both sides): contention on a shared
# machine only ever slows a step, so the fastest is the machine's speed and moves with the code;
# measured here, visit-to-visit noise of the fastest step is about a third of the median's.
JUDGED: dict[str, tuple[str, int]] = {
    "throughput": ("throughput, fastest step (samples/s)", +1),
    "step_time": ("step time p50 (ms)", -1),
    "efficiency": ("weak-scaling efficiency, fastest steps", +1),
    "memory": ("peak memory (MiB)", -1),
}
# two-sided 97.5 % quantiles of Student's t, by degrees of freedom (no scipy at run time)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}


class ABError(ValueError):
    """A gate that cannot run (bad revision, not a git checkout, a side that fails); one line."""


def t975(df: int) -> float:
    """Student's t 0.975 quantile: the table up to 30 (between rows the row below, a little wider),
    above it the Cornish-Fisher expansion around the normal quantile (within 1e-4 of scipy there)."""
    if df in _T975:
        return _T975[df]
    if df < 30:
        return _T975[max(k for k in _T975 if k <= df)]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


@dataclass
class Side:
    name: str  # base | head
    rev: str  # a git revision, or "working tree"
    root: Path  # where its code is
    env: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def checkout(rev: str | None) -> Iterator[Path]:
    """rev's code in a temporary git worktree; None: this working tree, as it is."""
    if rev is None:
        yield REPO
        return
    check = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True, text=True)
    if check.returncode != 0:
        raise ABError(f"{rev}: not a commit of this repository ({REPO}): {check.stderr.strip() or 'git failed'}")
    path = Path(tempfile.mkdtemp(prefix="emotion-bench-ab-"))
    add = subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=REPO, capture_output=True, text=True)
    if add.returncode != 0:
        raise ABError(f"git worktree add {rev} failed: {add.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)


DRIVER = Path(__file__).resolve().parent / "ab_driver.py"


def job_env(side: Side, threads: int) -> dict[str, str]:
    """The environment of one side's job.

    THP_MEM_ALLOC_ENABLE=1: torch's CPU allocator aligns tensors of 2 MiB and more to 2 MiB and asks
    for transparent huge pages (this kernel gives them on madvise only). Without it a job's speed
    depends on where its tensors landed: measured (tools/studies/gate_jobs.py, 6 fresh jobs x 3
    visits per cell, two runs), job means spread 7-8 % (single) and 4-8 % (ddp), with it 1.6-2.3 %,
    and visits within a job about 3 % instead of 5-10 %. Both sides alike; a user's own setting or
    a side's --base-env/--head-env wins."""
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1"), **side.env,
           "EMOTION_BENCH_AB_ROOT": str(side.root), "PYTHONPATH": str(side.root),
           "OMP_NUM_THREADS": str(threads), "EMOTION_BENCH_AB_THREADS": str(threads)}
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


class Job:
    """One side's measuring job: torchrun of ab_driver.py (head's) over the side's `bench` package,
    its processes kept between visits, so a visit costs its steps and not a start-up."""

    def __init__(self, side: Side, world: int, threads: int, setup: dict, folder: Path):
        self.side, self.dir, self.n = side, folder, 0
        folder.mkdir(parents=True)
        (folder / "setup.json").write_text(json.dumps({"cfg": setup}))
        env = job_env(side, threads)
        self.log = open(folder / "job.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                      str(world), "--max-restarts", "0", str(DRIVER), str(folder)],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float) -> None:
        """Until the job has loaded its data."""
        deadline = time.monotonic() + timeout_s
        while not (self.dir / "ready").exists():
            self._check(deadline)
            time.sleep(0.05)

    def _check(self, deadline: float) -> None:
        if self.proc.poll() is not None or time.monotonic() > deadline:
            log = (self.dir / "job.log").read_text(errors="replace").splitlines()
            why = [line.strip() for line in log if ("Error" in line or "error:" in line)
                   and "ChildFailedError" not in line][-1:] or ["timed out"]
            raise ABError(f"{self.side.name} ({self.side.rev}) could not run a cell: {why[0]}")

    def run(self, cfg: dict, timeout_s: float, result: bool = False) -> dict:
        """One cell, measured by this side's loop; what it measured (result: also written as a result
        file into cfg's out_dir, as bench tune keeps its windows)."""
        tmp = self.dir / f".cmd-{self.n}.json"
        tmp.write_text(json.dumps({"op": "run", "cfg": cfg, **({"result": True} if result else {})}))
        tmp.rename(self.dir / f"cmd-{self.n}.json")
        done = self.dir / f"done-{self.n}.json"
        deadline = time.monotonic() + timeout_s
        while not done.exists():
            self._check(deadline)
            time.sleep(0.02)
        self.n += 1
        return json.loads(done.read_text())

    def close(self) -> None:
        (self.dir / f"cmd-{self.n}.json").write_text(json.dumps({"op": "quit"}))
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


def gate_cells(cells: str) -> list[dict]:
    """The cells of a sweep preset or TOML (head's reading of it) as RunConfig dicts, single first."""
    from .sweep import expand, load_spec

    spec = load_spec(cells)
    found = [c for c in expand(spec, "cpu", "unused") if not c.skip_reason and c.cfg.repeat == 0]
    if not found:
        raise ABError(f"--cells {cells}: no cell of it can run on this machine")
    worlds = {c.cfg.devices for c in found if c.cfg.devices > 1}
    if len(worlds) > 1:
        raise ABError(f"--cells {cells}: bench ab runs one device count besides single, not {sorted(worlds)}")
    return [dataclasses.asdict(c.cfg) for c in sorted(found, key=lambda c: c.cfg.devices)]


def visit_metrics(cfg: dict, measured: dict) -> dict[str, float]:
    t = measured["throughput"]
    test = (measured["quality"] or {}).get("test") or {}
    fastest_ms = measured["step_ms_sorted"][0]
    global_batch = cfg["batch_size"] * cfg["devices"] if cfg["scaling"] == "weak" else cfg["batch_size"]
    return {"throughput": global_batch / fastest_ms * 1000, "step_time": t["step_time_ms_p50"],
            "memory": measured["peak_bytes"] / 2**20 if measured.get("peak_bytes") else None,
            "macro_f1": test.get("macro_f1"), "efficiency": None}


def with_efficiency(cells: list[dict], round_: dict[str, dict]) -> None:
    """Each multi-device cell's efficiency against the single cell of the same side and round."""
    single = next((round_[cell_label(c, from_config=True)] for c in cells if c["devices"] == 1), None)
    for c in cells:
        if c["devices"] > 1 and single and single["throughput"]:
            m = round_[cell_label(c, from_config=True)]
            m["efficiency"] = m["throughput"] / (c["devices"] * single["throughput"])


LOOKS = 2  # the planned look and, while a judged metric is inconclusive, one at --max-budget-s
CLAIM_ERROR = 0.05  # at most this often is a claim wrong over all looks (one-sided, Bonferroni)


def interval(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of paired ratios and its 95 % paired t interval (on log ratios)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else float("inf")
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


@dataclass
class Verdict:
    cell: str
    metric: str
    verdict: str  # regression | improvement | no change | inconclusive | not measured
    ratio: float | None = None  # head / base, geometric mean over pairs
    low: float | None = None
    high: float | None = None
    note: str = ""
    pairs: int = 0  # the pairs the interval rests on
    log_sd: float | None = None  # standard deviation of the log ratios (for the pairs still needed)

    @property
    def smallest_visible(self) -> float | None:
        """The smallest change this run could have seen: the interval's half-width, relative."""
        if self.low is None or self.high is None or self.low <= 0:
            return None
        return math.sqrt(self.high / self.low) - 1

    def text(self) -> str:
        if self.ratio is None:
            return f"– ({self.note})" if self.note else "–"
        if self.metric == "macro_f1":
            return f"{self.note} {self.verdict}"
        shown = f"{(self.ratio - 1) * 100:+.1f}% [{(self.low - 1) * 100:+.1f}, {(self.high - 1) * 100:+.1f}] {self.verdict}"
        if self.verdict == "inconclusive":
            shown += f", smallest change this run could see: {self.smallest_visible * 100:.1f} %"
        return shown


def rule(low: float, high: float, better: int, max_regression: float) -> str:
    """The equivalence test's verdict of one interval of head / base."""
    up, down = high < 1 - max_regression, low > 1 + max_regression  # wholly below / above the threshold
    if up or down:
        return "regression" if (up if better > 0 else down) else "improvement"
    if low > 1 - max_regression and high < 1 + max_regression:
        return "no change"
    return "inconclusive"


def pairs_needed(v: Verdict, max_regression: float) -> int | None:
    """About how many pairs in all would decide an inconclusive verdict at its present mean and spread:
    the interval's half-width must shrink below the distance from the mean to the threshold. None
    where the mean sits at the threshold (no number of pairs is enough) or the spread is unknown."""
    if v.ratio is None or not v.log_sd or v.ratio <= 0:
        return None
    distance = abs(abs(math.log(v.ratio)) - math.log(1 + max_regression))
    if distance < 1e-3:
        return None
    n = max(v.pairs, 2)
    for _ in range(20):  # t's quantile shrinks as n grows: iterate to a fixed point
        n = max(2, math.ceil((t975(n - 1) * v.log_sd / distance) ** 2))
    return n


def judge(pairs: list[tuple[dict, dict]], max_regression: float) -> list[Verdict]:
    """Verdicts per cell and metric from [(base metrics, head metrics)] of each pair."""
    out = []
    cells = sorted(set.intersection(*(set(b) & set(h) for b, h in pairs))) if pairs else []
    for cell in cells:
        for name, (_, better) in JUDGED.items():
            values = [(b[cell][name], h[cell][name]) for b, h in pairs]
            values = [(x, y) for x, y in values if _ok(x) and _ok(y) and x > 0 and y > 0]
            if not values:
                continue  # not a metric of this cell (a single cell has no efficiency)
            if len(values) < 2:
                out.append(Verdict(cell, name, "not measured", note="fewer than 2 pairs measured it"))
                continue
            ratios = [y / x for x, y in values]
            ratio, low, high = interval(ratios)
            out.append(Verdict(cell, name, rule(low, high, better, max_regression), ratio, low, high,
                               pairs=len(ratios), log_sd=statistics.stdev([math.log(r) for r in ratios])))
        out.append(_f1(cell, [(b[cell]["macro_f1"], h[cell]["macro_f1"]) for b, h in pairs]))
    return out


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _f1(cell: str, values: list[tuple[float, float]]) -> Verdict:
    base, head = [b for b, _ in values], [h for _, h in values]
    spread = max(base) - min(base)
    h = statistics.median(head)
    verdict = ("regression" if h < min(base) - spread else "improvement" if h > max(base) + spread else "no change")
    note = (f"{h:.4f} vs {statistics.median(base):.4f}" if spread == 0
            else f"{h:.4f} vs {min(base):.4f}-{max(base):.4f}")
    return Verdict(cell, "macro_f1", verdict, h / statistics.median(base) if statistics.median(base) else None,
                   note=note)


@dataclass
class ABOutcome:
    base: Side
    head: Side
    pairs: int
    seconds: float
    verdicts: list[Verdict]
    looks: list[int] = field(default_factory=list)  # the pairs at each look
    more_s: float | None = None  # inconclusive: about how many more seconds the rule would need
    fingerprint: dict = field(default_factory=dict)  # the machine's, recorded with every gate
    first_look: list[Verdict] = field(default_factory=list)  # the first look's verdicts, where a second was taken
    measured: list = field(default_factory=list)  # [(base metrics, head metrics)] per pair, cell -> metric -> value

    @property
    def regressed(self) -> bool:
        return any(v.verdict == "regression" for v in self.verdicts)

    @property
    def inconclusive(self) -> bool:
        return any(v.verdict == "inconclusive" for v in self.verdicts)

    @property
    def verdict(self) -> str:
        if self.regressed or self.inconclusive:
            return "regression" if self.regressed else "inconclusive"
        # exit 0 either way; the summary says an improvement where one was seen (it said "no change")
        return "improvement" if any(v.verdict == "improvement" for v in self.verdicts) else "no change"


def order(pairs: int) -> list[str]:
    """A B B A A B B A ...: each side goes first in half the pairs, so drift hits both alike."""
    return [s for k in range(pairs) for s in (("base", "head") if k % 2 == 0 else ("head", "base"))]


# Both sides' jobs are started anew every this many pairs. A job keeps its processes, and with
# them a speed of its own (cause not pinned down): with the same code on both sides, head's job
# can run 5-10 % faster than base's in one gate and 17-19 % slower in the next, its pairs agreeing
# with each other each time, so a gate on one pair of jobs reports a change that is not there.
# Pairs measured by one pair of jobs share that speed; fresh jobs sample it anew, so the interval
# over pairs carries it instead of hiding it.
PAIRS_PER_JOB = 2


def undecided(verdicts: list[Verdict]) -> bool:
    """More pairs would change the gate's outcome: no regression established yet, and a judged metric
    inconclusive. (Once one metric is a regression the gate fails whatever the others say.)"""
    judged = [v for v in verdicts if v.metric in JUDGED or v.metric == "macro_f1"]
    return (not any(v.verdict == "regression" for v in judged)
            and any(v.verdict == "inconclusive" for v in judged if v.metric in JUDGED))


def extra_pairs(k: int, elapsed_s: float, max_budget_s: float) -> int:
    """The pairs the second look adds: as many as --max-budget-s has room for at the pace so far."""
    if k == 0 or max_budget_s <= elapsed_s:
        return 0
    return int((max_budget_s - elapsed_s) // (elapsed_s / k))


def sequential(measure: Callable[[], tuple[dict, dict]], planned: Callable[[int], int], more: Callable[[int], int],
               max_regression: float, extendable: bool = True) -> tuple[list[Verdict], list[int], list]:
    """The gate's sequential rule, apart from any job: measure pairs until planned(1) pairs (asked
    after the first), look; while a judged metric is inconclusive and the rule has a look left, add
    more(k) pairs and look again. Returns the last look's verdicts, the pairs at each look, the pairs."""
    measured: list[tuple[dict, dict]] = []
    looks: list[int] = []
    target = None
    while True:
        if target is not None and len(measured) >= target:
            looks.append(len(measured))
            if not (extendable and len(looks) < LOOKS and undecided(judge(measured, max_regression))):
                break
            extra = more(len(measured))
            if extra < 1:
                break
            target += extra
            continue
        measured.append(measure())
        if target is None:
            target = planned(len(measured))
    return judge(measured, max_regression), looks, measured


def run_ab(base_rev: str, head_rev: str | None, *, cells: str, pairs: int | None, budget_s: float,
           max_regression: float, base_env: dict, head_env: dict, say: Callable[[str], None] = lambda _: None,
           tick: Callable[[str], None] = lambda _: None, timeout_s: float = 600,
           max_budget_s: float | None = None) -> ABOutcome:
    """Measure base and head alternately and judge the paired ratios: a look at the planned pairs
    and, while a judged metric is inconclusive, one more after the pairs --max-budget-s leaves room
    for (none with --pairs)."""
    from .envinfo import fingerprint
    from .stops import signals_raise

    t0 = time.perf_counter()
    todo = gate_cells(cells)
    world = max(c["devices"] for c in todo)
    threads = todo[0].get("threads") or 1
    # a signal raises, so the jobs and worktrees below are taken down, not orphaned
    with signals_raise(), checkout(base_rev) as base_root, checkout(head_rev) as head_root, \
            tempfile.TemporaryDirectory(prefix="emotion-bench-ab-") as tmp:
        sides = {"base": Side("base", base_rev, base_root, base_env),
                 "head": Side("head", head_rev or "working tree", head_root, head_env)}
        gate = _Pairs(sides, todo, world, threads, tmp, pairs=pairs, budget_s=budget_s, max_budget_s=max_budget_s,
                      t0=t0, timeout_s=timeout_s, say=say, tick=tick)
        try:
            verdicts, looks, measured = sequential(gate.measure, gate.planned, gate.more, max_regression,
                                                   extendable=pairs is None and max_budget_s is not None)
        finally:
            gate.close()
    seconds = time.perf_counter() - t0
    n = len(measured)
    needed = [pairs_needed(v, max_regression) for v in verdicts if v.verdict == "inconclusive" and v.metric in JUDGED]
    more_s = max(0.0, (max(needed) - n) * seconds / n) if needed and None not in needed and n else None
    first = judge(measured[:looks[0]], max_regression) if len(looks) > 1 else []  # what the rule saw at look 1
    return ABOutcome(sides["base"], sides["head"], n, seconds, verdicts, looks, more_s, fingerprint(), first, measured)


@dataclass
class _Pairs:
    """run_ab's measuring, as `sequential` calls it: both sides' jobs (anew every PAIRS_PER_JOB
    pairs), one pair at a time on them, and the pace that says how many pairs the budgets hold."""

    sides: dict[str, Side]
    todo: list[dict]  # the cells, single first
    world: int
    threads: int
    tmp: str  # the folder the jobs' folders go in
    pairs: int | None  # --pairs
    budget_s: float
    max_budget_s: float | None
    t0: float  # when the gate began
    timeout_s: float
    say: Callable[[str], None]
    tick: Callable[[str], None]
    jobs: dict[str, Job] = field(default_factory=dict)
    k: int = 0  # pairs measured so far
    start_s: float = 0.0  # seconds the latest fresh jobs took to start
    t_pair: float = 0.0  # when the latest pair began

    def close(self) -> None:
        for job in self.jobs.values():
            job.close()
        self.jobs.clear()

    def fresh_jobs(self) -> float:
        """Both sides' jobs started anew; seconds it took."""
        t = time.perf_counter()
        self.close()
        for name, side in self.sides.items():
            self.jobs[name] = Job(side, self.world, self.threads, self.todo[0], Path(self.tmp, f"{name}-{self.k}"))
        for job in self.jobs.values():
            job.wait_ready(self.timeout_s)
        return time.perf_counter() - t

    def measure(self) -> tuple[dict, dict]:
        """One pair: every cell on both sides, in A B / B A order; jobs anew every PAIRS_PER_JOB."""
        if self.k % PAIRS_PER_JOB == 0:
            self.start_s = self.fresh_jobs()
        self.t_pair = time.perf_counter()
        current = {"base": {}, "head": {}}
        for j, c in enumerate(self.todo):  # A B, then B A for the next cell, and so on
            for name in (("base", "head") if (self.k + j) % 2 == 0 else ("head", "base")):
                self.tick(f"pair {self.k + 1} {name}")
                measured = self.jobs[name].run(c, self.timeout_s)
                current[name][cell_label(c, from_config=True)] = visit_metrics(c, measured)
        for name in self.sides:
            with_efficiency(self.todo, current[name])
        self.k += 1
        return current["base"], current["head"]

    def planned(self, done: int) -> int:
        """After the first pair: the pairs --budget-s holds at its pace, at least 3 (or --pairs)."""
        if self.pairs is not None:
            return self.pairs
        per_pair = time.perf_counter() - self.t_pair + self.start_s / PAIRS_PER_JOB
        target = max(3, int(self.budget_s // per_pair))
        self.say(f"a pair takes {per_pair:.0f} s with its share of fresh jobs: {target} pairs fit "
                 f"--budget-s {self.budget_s:.0f}")
        return target

    def more(self, done: int) -> int:
        """The pairs a second look adds (0: none), as extra_pairs reckons them."""
        n = (extra_pairs(done, time.perf_counter() - self.t0, self.max_budget_s)
             if self.max_budget_s is not None else 0)
        if n:
            self.say(f"inconclusive at {done} pairs: {n} more fit --max-budget-s {self.max_budget_s:.0f}, then the "
                     "second and last look")
        return n


def table(outcome: ABOutcome) -> tuple[list[str], list[list[str]]]:
    header = ["cell"] + [f"{label}: head/base, 95 % CI" for label, _ in JUDGED.values()] + ["macro-F1 (head vs base)"]
    rows = []
    for cell in dict.fromkeys(v.cell for v in outcome.verdicts):
        by = {v.metric: v.text() for v in outcome.verdicts if v.cell == cell}
        rows.append([cell] + [by.get(n, "–") for n in JUDGED] + [by.get("macro_f1", "–")])
    return header, rows


def console_table(outcome: ABOutcome) -> tuple[list[str], list[list[str]]]:
    """The verdicts one per row (cell, metric), for a terminal of 80 columns; `table` is the wide
    markdown form for a PR comment."""
    header = ["cell", "metric", "head / base (95 % CI)", "verdict"]
    rows = []
    for v in outcome.verdicts:
        label = JUDGED[v.metric][0] if v.metric in JUDGED else "macro-F1 (head vs base)"
        if v.ratio is None:
            shown, verdict = "–", f"{v.verdict}" + (f" ({v.note})" if v.note else "")
        elif v.metric == "macro_f1":
            shown, verdict = v.note, v.verdict
        else:
            shown = f"{(v.ratio - 1) * 100:+.1f}% [{(v.low - 1) * 100:+.1f}, {(v.high - 1) * 100:+.1f}]"
            verdict = v.verdict + (f", smallest change this run could see: {v.smallest_visible * 100:.1f} %"
                                   if v.verdict == "inconclusive" else "")
        rows.append([v.cell, label, shown, verdict])
    return header, rows


def parse_env(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ABError(f"{flag} {item!r}: use KEY=VALUE")
        out[key.strip()] = value
    return out


def _verdict_json(v: Verdict) -> dict:
    return {"cell": v.cell, "metric": v.metric, "verdict": v.verdict, "ratio": v.ratio, "low": v.low, "high": v.high,
            "smallest_visible": v.smallest_visible, "pairs": v.pairs, "note": v.note}


def write_json(outcome: ABOutcome, max_regression: float, path: str) -> Path:
    """One gate's verdicts as one JSON file, atomically (bench history reads a folder of them)."""
    from datetime import datetime, timezone

    from emotion_models.atomic import atomic_write_text

    def commit(side: Side) -> str | None:
        got = subprocess.run(["git", "rev-parse", "HEAD" if side.rev == "working tree" else side.rev], cwd=side.root
                             if side.rev == "working tree" else REPO, capture_output=True, text=True)
        return got.stdout.strip() or None if got.returncode == 0 else None

    record = {"kind": "gate", "schema": 1, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "base": {"rev": outcome.base.rev, "commit": commit(outcome.base), "env": outcome.base.env},
              "head": {"rev": outcome.head.rev, "commit": commit(outcome.head), "env": outcome.head.env},
              "pairs": outcome.pairs, "looks": outcome.looks, "seconds": outcome.seconds,
              "max_regression": max_regression, "verdict": outcome.verdict, "more_s": outcome.more_s,
              "fingerprint": outcome.fingerprint,
              "verdicts": [_verdict_json(v) for v in outcome.verdicts],
              # why a second look was taken, and every pair's figures, so a rule can be studied offline
              "first_look": [_verdict_json(v) for v in outcome.first_look],
              "pair_metrics": [{"base": b, "head": h} for b, h in outcome.measured]}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    return out
