"""Where a step's time goes, from each rank's profiled timeline: pure arithmetic on intervals.

Each moment of a step goes to exactly one part, by priority (the PyTorch profiler plugin's rule,
with the optimiser singled out first):

    optimizer > compute > memcpy > communication > waiting > runtime > idle/other

so the parts add up to the step. A collective's time is split as the profiler plugin does: its
transfer time is its shortest duration across ranks (the rank that arrived last waited for no
one), the rest of it, at its start, is waiting for the slowest rank. For pipeline parallel, the
waiting of sends and receives is the bubble: it is counted as idle. Communication that runs
while compute does is reported as overlapped, not added.

Bandwidth follows nccl-tests: algbw = S / t, busbw = algbw x 2(n-1)/n for all-reduce, x (n-1)/n
for all-gather and reduce-scatter (S the whole buffer), x 1 for broadcast and send/recv; t is the
transfer time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

Interval = tuple[float, float]

# part -> what it means, in the order the parts are reported (every part's ms adds up to the step)
PARTS: dict[str, str] = {
    "compute": "compute (aten ops on CPU, kernels on GPU)",
    "optimizer": "optimizer step",
    "memcpy": "memory copies (GPU)",
    "exposed_comm": "communication not overlapped by compute (transfer)",
    "wait": "waiting for the slowest rank in collectives",
    "runtime": "CUDA runtime calls (GPU)",
    "idle": "idle: pipeline bubble, or host work outside ops (Python, data indexing)",
}
P2P = ("send", "recv")


def busbw_factor(kind: str, n: int) -> float:
    """nccl-tests' bus bandwidth factor of a collective over n ranks."""
    if kind == "all_reduce":
        return 2 * (n - 1) / n
    if kind in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    return 1.0


def merge(intervals) -> list[Interval]:
    out: list[list[float]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def subtract(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """a minus b; both merged."""
    out, j = [], 0
    for lo, hi in a:
        cur = lo
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < hi:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < hi:
            out.append((cur, hi))
    return out


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    return subtract(a, subtract(a, b))


def total(intervals: list[Interval]) -> float:
    return sum(b - a for a, b in intervals)


@dataclass
class Collective:
    kind: str  # all_reduce, all_gather, reduce_scatter, broadcast, send, recv
    start: float  # µs from the step's start
    end: float
    bytes: int = 0  # S of nccl-tests: the whole buffer (0 when the trace does not say)


@dataclass
class StepTrace:
    """One rank's profiled step, times in µs from the step's start."""

    duration: float
    compute: list[Interval] = field(default_factory=list)
    optimizer: list[Interval] = field(default_factory=list)
    memcpy: list[Interval] = field(default_factory=list)
    runtime: list[Interval] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)


def transfer_times(steps: list[StepTrace]) -> list[list[float]]:
    """Per collective of the step (one StepTrace per rank, the same step), its transfer time: the
    shortest duration across ranks. Collectives are matched by kind and order of completion (ranks
    finish a collective together; they start it when each gets there)."""
    def key(c: Collective) -> str:  # a send pairs with its peer's receive
        return "send_recv" if c.kind in P2P else c.kind

    by_rank = [sorted(s.collectives, key=lambda c: c.end) for s in steps]
    out = []
    for rank_colls in by_rank:
        seen: dict[str, int] = {}
        times = []
        for c in rank_colls:
            i = seen.get(key(c), 0)
            seen[key(c)] = i + 1
            peers = [[x for x in other if key(x) == key(c)] for other in by_rank]
            times.append(min(p[i].end - p[i].start for p in peers if len(p) > i))
        out.append(times)
    return out


def parts(step: StepTrace, transfers: list[float]) -> tuple[dict[str, float], float]:
    """(µs per part, adding up to the step; overlapped communication µs) of one rank's step."""
    colls = sorted(step.collectives, key=lambda c: c.end)
    transfer = merge((max(c.start, c.end - t), c.end) for c, t in zip(colls, transfers) if c.kind not in P2P)
    waiting = merge((c.start, max(c.start, c.end - t)) for c, t in zip(colls, transfers) if c.kind not in P2P)
    p2p = merge((c.start, c.end) for c in colls if c.kind in P2P)
    p2p_transfer = merge((max(c.start, c.end - t), c.end) for c, t in zip(colls, transfers) if c.kind in P2P)
    whole = [(0.0, step.duration)]
    taken: list[Interval] = []
    out: dict[str, float] = {}
    for name, intervals in (("optimizer", step.optimizer), ("compute", step.compute), ("memcpy", step.memcpy),
                            ("exposed_comm", merge(transfer + p2p_transfer)), ("wait", waiting),
                            ("runtime", step.runtime)):
        mine = subtract(intersect(merge(intervals), whole), taken)
        out[name] = total(mine)
        taken = merge(taken + mine)
    out["idle"] = total(subtract(whole, taken))  # includes a pipeline stage's waits on its neighbours
    overlapped = total(intersect(merge(transfer + waiting + p2p), merge(step.compute)))
    return out, overlapped


@dataclass
class Breakdown:
    """The median profiled step of every rank, and the communication it did."""

    ranks: list[dict]  # per rank: step_ms, parts_ms, parts_share, overlapped_comm_ms
    collectives: dict[str, dict]  # per kind: count and bytes per step, transfer ms, algbw/busbw GB/s

    def to_dict(self) -> dict:
        head = self.ranks[0]
        return {"step_ms": head["step_ms"], "parts_ms": head["parts_ms"], "parts_share": head["parts_share"],
                "overlapped_comm_ms": head["overlapped_comm_ms"], "slowest_rank": self.slowest_rank(),
                "per_rank": self.ranks, "collectives": self.collectives,
                "parts_meaning": PARTS}

    def slowest_rank(self) -> int | None:
        """The rank the others waited for: the one that waited least."""
        if len(self.ranks) < 2:
            return None
        return min(self.ranks, key=lambda r: r["parts_ms"]["wait"] + r["parts_ms"]["idle"])["rank"]


def breakdown(steps_by_rank: list[list[StepTrace]]) -> Breakdown:
    """steps_by_rank[r][k]: rank r's k-th profiled step (every rank profiled the same steps)."""
    n = len(steps_by_rank)
    k = min(len(s) for s in steps_by_rank)
    per_step = []  # per step: per rank (parts, overlapped, transfers)
    for i in range(k):
        same = [steps_by_rank[r][i] for r in range(n)]
        transfers = transfer_times(same)
        per_step.append([(*parts(s, t), t) for s, t in zip(same, transfers)])
    ranks = []
    for r in range(n):
        durations = [steps_by_rank[r][i].duration for i in range(k)]
        median_i = sorted(range(k), key=lambda i: durations[i])[(k - 1) // 2]  # the median step, whole
        part_us, overlapped, _ = per_step[median_i][r]
        dur = durations[median_i]
        ranks.append({"rank": r, "step_ms": dur / 1000, "parts_ms": {p: v / 1000 for p, v in part_us.items()},
                      "parts_share": {p: v / dur if dur else 0.0 for p, v in part_us.items()},
                      "overlapped_comm_ms": overlapped / 1000})
    return Breakdown(ranks, _collectives(steps_by_rank, per_step, n, k))


def _collectives(steps_by_rank, per_step, n: int, k: int) -> dict[str, dict]:
    """Rank 0's collectives per kind: per step count and bytes, transfer time, algbw and busbw."""
    out: dict[str, dict] = {}
    for i in range(k):
        colls = sorted(steps_by_rank[0][i].collectives, key=lambda c: c.end)
        for c, t in zip(colls, per_step[i][0][2]):
            kind = "send_recv" if c.kind in P2P else c.kind
            e = out.setdefault(kind, {"count": 0, "bytes": 0, "transfer_us": 0.0, "sized": 0})
            e["count"] += 1
            e["transfer_us"] += t
            if c.bytes:
                e["bytes"] += c.bytes
                e["sized"] += 1
    result = {}
    for kind, e in out.items():
        seconds = e["transfer_us"] / 1e6
        algbw = e["bytes"] / seconds / 1e9 if seconds > 0 and e["sized"] == e["count"] else None
        result[kind] = {"count_per_step": e["count"] / k, "bytes_per_step": e["bytes"] / k if e["sized"] else None,
                        "transfer_ms_per_step": e["transfer_us"] / k / 1000,
                        "algbw_GBps": algbw,
                        "busbw_GBps": algbw * busbw_factor(kind, n) if algbw is not None else None}
    return result
