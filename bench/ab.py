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
Regression when the whole interval lies beyond --max-regression (5 %) in the bad direction,
improvement likewise in the good one, otherwise no change, with the interval shown. Throughput
and weak-scaling efficiency (both from each visit's fastest step, see JUDGED), step time p50 and
peak memory are judged; macro-F1 is compared exactly (the runs are deterministic): a regression
when head's is below the lowest of base's by more than base's own spread.
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
    depends on where its tensors landed: measured here (benchmarks/gate_jobs.py, 6 fresh jobs x 3
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

    def run(self, cfg: dict, timeout_s: float) -> dict:
        """One cell, measured by this side's loop; what it measured."""
        tmp = self.dir / f".cmd-{self.n}.json"
        tmp.write_text(json.dumps({"op": "run", "cfg": cfg}))
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
    single = next((round_[_label(c)] for c in cells if c["devices"] == 1), None)
    for c in cells:
        if c["devices"] > 1 and single and single["throughput"]:
            m = round_[_label(c)]
            m["efficiency"] = m["throughput"] / (c["devices"] * single["throughput"])


def _label(cfg: dict) -> str:
    return cell_label({**cfg, "batch_per_device": cfg["batch_size"] if cfg["scaling"] == "weak" else
                       cfg["batch_size"] // cfg["devices"]})


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
    verdict: str  # regression | improvement | no change | not measured
    ratio: float | None = None  # head / base, geometric mean over pairs
    low: float | None = None
    high: float | None = None
    note: str = ""

    def text(self) -> str:
        if self.ratio is None:
            return f"– ({self.note})" if self.note else "–"
        if self.metric == "macro_f1":
            return f"{self.note} {self.verdict}"
        return f"{(self.ratio - 1) * 100:+.1f}% [{(self.low - 1) * 100:+.1f}, {(self.high - 1) * 100:+.1f}] {self.verdict}"


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
            ratio, low, high = interval([y / x for x, y in values])
            worse = high < 1 - max_regression if better > 0 else low > 1 + max_regression
            improved = low > 1 + max_regression if better > 0 else high < 1 - max_regression
            out.append(Verdict(cell, name, "regression" if worse else "improvement" if improved else "no change",
                               ratio, low, high))
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

    @property
    def regressed(self) -> bool:
        return any(v.verdict == "regression" for v in self.verdicts)


def order(pairs: int) -> list[str]:
    """A B B A A B B A ...: each side goes first in half the pairs, so drift hits both alike."""
    return [s for k in range(pairs) for s in (("base", "head") if k % 2 == 0 else ("head", "base"))]


# Both sides' jobs are started anew every this many pairs. A job keeps its processes, and with
# them a speed of its own (cause not pinned down): in two CI runs of the same code against the
# same base, head's job ran 5-10 % faster than base's in one and 17-19 % slower in the next, and
# each time the pairs agreed with each other, so both gates reported a change that was not there.
# Pairs measured by one pair of jobs share that speed; fresh jobs sample it anew, so the interval
# over pairs carries it instead of hiding it.
PAIRS_PER_JOB = 2


def run_ab(base_rev: str, head_rev: str | None, *, cells: str, pairs: int | None, budget_s: float,
           max_regression: float, base_env: dict, head_env: dict, say: Callable[[str], None] = lambda _: None,
           tick: Callable[[str], None] = lambda _: None, timeout_s: float = 600) -> ABOutcome:
    """Measure base and head alternately and judge the paired ratios."""
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
        jobs: dict[str, Job] = {}

        def fresh_jobs() -> float:
            """Both sides' jobs started anew; seconds it took."""
            t = time.perf_counter()
            for job in jobs.values():
                job.close()
            jobs.clear()
            for name, side in sides.items():
                jobs[name] = Job(side, world, threads, todo[0], Path(tmp, f"{name}-{k}"))
            for job in jobs.values():
                job.wait_ready(timeout_s)
            return time.perf_counter() - t

        rounds: dict[str, list[dict]] = {"base": [], "head": []}
        k, target, start_s = 0, pairs, 0.0
        try:
            while target is None or k < target:
                if k % PAIRS_PER_JOB == 0:
                    start_s = fresh_jobs()
                t_pair = time.perf_counter()
                current = {"base": {}, "head": {}}
                for j, c in enumerate(todo):  # A B, then B A for the next cell, and so on
                    for name in (("base", "head") if (k + j) % 2 == 0 else ("head", "base")):
                        tick(f"pair {k + 1} {name}")
                        current[name][_label(c)] = visit_metrics(c, jobs[name].run(c, timeout_s))
                for name in sides:
                    with_efficiency(todo, current[name])
                    rounds[name].append(current[name])
                k += 1
                if target is None:  # sized to the budget by the first pair and job start, at least 3
                    per_pair = time.perf_counter() - t_pair + start_s / PAIRS_PER_JOB
                    target = max(3, int(budget_s // per_pair))
                    say(f"a pair takes {per_pair:.0f} s with its share of fresh jobs: {target} pairs fit "
                        f"--budget-s {budget_s:.0f}")
        finally:
            for job in jobs.values():
                job.close()
        verdicts = judge(list(zip(rounds["base"], rounds["head"])), max_regression)
    return ABOutcome(sides["base"], sides["head"], k, time.perf_counter() - t0, verdicts)


def table(outcome: ABOutcome) -> tuple[list[str], list[list[str]]]:
    header = ["cell"] + [f"{label}: head/base, 95 % CI" for label, _ in JUDGED.values()] + ["macro-F1 (head vs base)"]
    rows = []
    for cell in dict.fromkeys(v.cell for v in outcome.verdicts):
        by = {v.metric: v.text() for v in outcome.verdicts if v.cell == cell}
        rows.append([cell] + [by.get(n, "–") for n in JUDGED] + [by.get("macro_f1", "–")])
    return header, rows


def parse_env(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ABError(f"{flag} {item!r}: use KEY=VALUE")
        out[key.strip()] = value
    return out
