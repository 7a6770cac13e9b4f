"""`bench predict`: each strategy's step time, throughput and efficiency at N devices and nodes, from
what was measured, with the model written out (README: "Scaling past the machines we have").

Inputs: the `single` run at the per-device batch b (its step time t1: compute, optimiser and all;
for a strategy that was also measured at one device, that run's step time instead, since FSDP2's
hooks, DTensor optimiser step and copies cost time without any communication), the contention
factor c_n of n devices per node (the step time of an `independent` run at n, n replicas training
side by side with no communication, over the single step time; 1 where none was measured), the
model's parameter bytes S and blocks L, the pipeline schedule, and links (alpha: latency of a
hop, B: bus bandwidth) from `bench comm` or a named preset. Weak scaling, N = nodes x per-node.

    compute at N        t1' = c_n x t1                                   n = N / nodes devices per node
    ring all-reduce     T_ar(S) = 2(N-1) alpha + 2(N-1)/N x S / B
    all-gather, reduce-scatter   T(S) = (N-1) alpha + (N-1)/N x S / B      (S the whole buffer)
    waiting at meetings W_N = W_N0 x g(N) / g(N0)     g(N): the expected maximum of N standard normals
    ddp       t = t1' + W_N + (1 - o) x k x T_ar(S / k)       k = buckets of 25 MiB
    fsdp      t = t1' + W_N + (1 - o) x L x [2 T_ag(S_p / L) + T_rs(S / L)]       S_p: S in the parameter dtype
    pipeline  t = t1' x (m + p - 1) / m + 2 (m + p - 2) x (alpha + A / B)  p = N stages, m micro-batches,
                                                                            A one micro-batch's activations
    hsdp      fsdp's terms over its shard group (N / R ranks), + L x T_ar(S / (L x N/R)) across the R replicas
    tp        t = K x [t1' x s_T + C_tp] + W + the data-parallel terms over N / T ranks; s_T a tp-rank run's
              step (one rank's shapes alone at T b) over single's, where one was measured, else T(1 - f) + f
              T the tensor-parallel degree (--strategy tp: N; fsdp:tpT); the T ranks of a group share
              T b samples; f the share of forward FLOPs TP divides (counted on the meta device: the
              model against one rank's shapes of it); A_tp = T b x one layer's output (bytes in the
              compute dtype), inside the node; W from a profiled tp run, as for ddp and fsdp, except
              where bench comm measured the tp_ collectives' meeting cost m: each call of C_tp (and of
              the once-a-step partial gradients) then costs m more, and --strategy tp's W is 0.
              C_tp, summed over the layers (r row-parallel, c column-parallel projections, q, k and v
              three, Megatron fuses them): without sequence parallel (r + c) T_ar(A_tp); with it
              r [T_rs(A_tp) + T_ag(A_tp)] + g T_ag(A_tp) + c T_ar(A_tp), g the gathers (attention
              entry, first feed-forward projections, modules needing the whole sequence twice, the
              region's two edges); WavLM's gate inputs add an all-gather each in both. Once per
              optimiser step (outside K): the replicated parameters' partial gradients (the layer norms'
              with sequence parallel, WavLM's gate linear's; TpProfile) in one flat all-reduce under
              --strategy tp, one all-reduce each under fsdp --tp (FSDP2 redistributes each one)
    T_ag and T_rs use bench comm's all-gather and reduce-scatter fits where it measured them (Link.op);
              tensor parallel's collectives (C_tp and the partial gradients' all-reduce) its tp_ fits where
              it measured those over T ranks: the same collectives as DTensor issues them, with its
              Python, the result's wrapping and the copy off dim 0 (Link.tensor_parallel)
    throughput = N b / t; efficiency = throughput / (N x single throughput)

    --grad-accum K      K micro-steps of t1' r_K each (r_K an independent x n run with --grad-accum K: its step
                        over K x independent x n's, where one was measured; else a single run's with it over
                        K t1; else 1), communication once (DDP, FSDP's reduce-scatter; FSDP2
                        still all-gathers every micro-step): ddp t = K r_K t1' + W + (1-o) k T_ar(S/k); fsdp
                        t = K r_K t1' + W + (1-o) L [2K T_ag(S_p/L) + T_rs(S/L)]; throughput = N b K / t;
                        efficiency against single without accumulation (so above 1 can be where r_K < 1)
    --ac full|selective t1 x r, r the measured single step with that --ac over t1 where a single run
                        has it, else one more forward: r = 4/3 (full; a forward is about a third of a
                        training step), 7/6 (selective, every other block)

Across nodes every data-parallel collective goes through the slower link (B and alpha of the
inter-node link). o, the share of communication hidden behind compute, is measured from a
profiled run's breakdown of that strategy (overlapped / (overlapped + exposed)); without one it is
0, the pessimistic bound, and the table says so. W, like o, comes from a profiled run of that
strategy at N0 devices: the time its slowest rank still spent waiting for others inside collectives
(the breakdown's slowest rank: the one with the least wait and idle), in timed milliseconds (scaled by the run's
timed step over its profiled step: the profiler stretches every step). c_n already holds the
slowest replica's pace; W is the jitter it meets on top when the ranks meet many times a step
(fsdp: 3 collectives per block) and a peer happens to be behind. From N0 to N it grows as the
expected lateness of the latest of N ranks, g(N), for jitter independent across ranks; 0 where no
profiled run measured it. A pipeline's waits on its neighbour are its bubble, modelled above.
c_n matters where workers share what a device does not hold alone: CPU workers share cores and
memory bandwidth (measured here: see the README); GPUs of one node share host cores, data loading
and PCIe switches, usually little.
"""
from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from emotion_models.models import build_model

from . import trust

# named links: (bus bandwidth GB/s, hop latency µs, source). Bandwidths are the data sheets'
# per-direction figures x 0.8 (nccl-tests reach 70-90 % of them); latencies are typical
# small-message figures, assumptions rather than measurements: measure yours with bench comm.
LINKS: dict[str, tuple[float, float, str]] = {
    "nvlink4": (0.8 * 450, 10.0, "NVIDIA H100 SXM data sheet: NVLink 4, 900 GB/s bidirectional"),
    "pcie4": (0.8 * 31.5, 15.0, "PCIe 4.0 x16: 31.5 GB/s per direction"),
    "pcie5": (0.8 * 63.0, 15.0, "PCIe 5.0 x16: 63 GB/s per direction"),
    "ib-ndr": (0.8 * 50.0, 10.0, "InfiniBand NDR: 400 Gb/s = 50 GB/s per port and direction"),
    "100gbe": (0.8 * 12.5, 30.0, "100 Gb Ethernet: 12.5 GB/s per direction"),
}
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


@dataclass(frozen=True)
class Link:
    busbw_GBps: float
    alpha_us: float  # one hop
    source: str
    # a bench comm fit's own figures per collective: ((op, bus bandwidth GB/s, µs a hop), ...); a
    # preset has none, and every collective reads the two above
    ops: tuple = ()
    devices: int = 0  # the ranks bench comm measured over (0: a preset)
    # bench comm's meeting cost of tensor parallel's collectives, ((op, µs a call), ...): what a call
    # costs after compute beyond back to back (bench/comm.py meeting); met: tensor_parallel added it
    meet: tuple = ()
    met: bool = False

    def __post_init__(self):
        for name in ("ops", "meet"):  # read back from JSON as lists
            object.__setattr__(self, name, tuple(tuple(o) for o in getattr(self, name)))

    def op(self, kind: str) -> Link:
        """The link as one collective (all_reduce, all_gather, reduce_scatter) sees it: that op's own
        fit where bench comm measured it (gloo's all-gather and reduce-scatter run at a third to a
        half of its all-reduce's bus bandwidth), else this link's figures."""
        for name, bw, alpha in self.ops:
            if name == kind:
                return Link(bw, alpha, f"{self.source}, {kind}")
        return self

    def tensor_parallel(self, degree: int) -> Link:
        """The link as tensor parallel's collectives over `degree` ranks see it: where bench comm measured
        them as DTensor issues them (tp_all_gather, tp_reduce_scatter, tp_all_reduce: DTensor's own
        Python, the wrapping and the copy off dim 0 on top of the raw call) over that many ranks, those
        fits stand for all_gather, reduce_scatter and all_reduce; else this link as it is. Only at the
        degree measured: DTensor's cost is per call, not per hop, and the alpha-beta form carries it to
        another rank count by hops, which would shrink it from 8 ranks to 2 by 7 times. Where bench comm
        also timed every one of them after compute, each call's meeting cost is added to its latency
        (met): a tensor-parallel step meets each of its collectives after compute, tens a step. Where
        only some were (bench comm --ops), none is added: the others would go without it while W,
        which predict leaves out when met, went too."""
        tp = {name[3:]: (name, bw, alpha) for name, bw, alpha in self.ops if name.startswith("tp_")}
        if not tp or degree != self.devices:
            return self
        meet = {name[3:]: us for name, us in self.meet}
        if set(meet) != set(tp):
            meet = {}
        ops = tuple((name, bw, alpha) for name, bw, alpha in self.ops if name not in tp and not name.startswith("tp_"))
        return Link(self.busbw_GBps, self.alpha_us, self.source,
                    ops + tuple((plain, bw, alpha + meet.get(plain, 0.0) / _hops(plain, degree))
                                for plain, (_, bw, alpha) in tp.items()), self.devices, met=bool(meet))

    @classmethod
    def named(cls, name: str) -> Link:
        if name not in LINKS:
            raise ValueError(f"--link {name}: not a preset ({', '.join(LINKS)}) or a bench comm result")
        return cls(*LINKS[name])

    @classmethod
    def measured(cls, comm: dict, kind: str = "all_reduce") -> Link:
        """From a `bench comm` fit: its latency is a whole collective at n ranks; a ring all-reduce
        takes 2(n-1) hops, the others n-1. The link's figures are kind's; every measured op's are
        kept beside them (Link.op)."""
        n = comm["config"]["devices"]

        def figures(op: str, f: dict) -> tuple[float, float]:
            return f["busbw_GBps"] or float("inf"), f["alpha_us"] / _hops(op.removeprefix("tp_"), n)

        # the link's own figures: kind's fit, else the first raw one (a tp_ fit holds DTensor's cost too)
        used = kind if kind in comm["fit"] else next((op for op in comm["fit"] if not op.startswith("tp_")),
                                                     next(iter(comm["fit"])))
        c = comm["config"]
        ops = tuple((op, *figures(op, fit)) for op, fit in comm["fit"].items()
                    if op in ("all_reduce", "all_gather", "reduce_scatter", "tp_all_reduce", "tp_all_gather",
                              "tp_reduce_scatter"))
        # a negative meeting cost is noise around none: read as 0
        meet = tuple((op, max(m["meet_us"], 0.0)) for op, m in (comm.get("meet") or {}).items() if op in comm["fit"])
        return cls(*figures(kind, comm["fit"][used]), f"bench comm {comm['run_id']}: {n} x {c['device_type']} "
                   f"({c['backend']}), {used} fit", ops, n, meet)


def _hops(op: str, n: int) -> int:
    """Hops of a ring collective over n ranks: 2(n - 1) for an all-reduce, n - 1 for the others."""
    return 2 * (n - 1) if op == "all_reduce" else max(n - 1, 1)


def t_all_reduce(nbytes: float, n: int, link: Link) -> float:
    """Seconds of a ring all-reduce of nbytes over n ranks."""
    if n < 2:
        return 0.0
    link = link.op("all_reduce")
    return 2 * (n - 1) * link.alpha_us * 1e-6 + 2 * (n - 1) / n * nbytes / (link.busbw_GBps * 1e9)


def t_gather(nbytes: float, n: int, link: Link, kind: str = "all_gather") -> float:
    """Seconds of an all-gather (kind reduce_scatter: a reduce-scatter) whose whole buffer is nbytes."""
    if n < 2:
        return 0.0
    link = link.op(kind)
    return (n - 1) * link.alpha_us * 1e-6 + (n - 1) / n * nbytes / (link.busbw_GBps * 1e9)


@dataclass
class Inputs:
    """What a prediction of one (model, precision, batch) starts from."""

    model: str
    model_size: str
    precision: str
    batch: int  # per device
    single_step_s: float  # the single run's step time p50 at this batch
    single_throughput: float  # samples/s
    params: int
    blocks: int
    microbatches: int | None = None  # pipeline's m (None: 2 x stages)
    overlap: dict | None = None  # strategy -> measured share of communication hidden behind compute
    one_device: dict | None = None  # strategy -> its step time (s) measured at one device, when it was
    contention: dict | None = None  # devices per node n -> c_n, from independent runs at n
    wait: dict | None = None  # strategy -> {devices N0 (any node count): W_N0 in seconds per step}, profiled runs
    recompute: dict | None = None  # --ac mode -> a single run's step time with it over t1, where one was measured
    flags: str = ""  # the single runs' trust flags (bench/trust.py): every prediction from them carries them
    # (tensor-parallel degree T, sequence parallel) -> a tp-rank run's step time (s): one rank's shapes of
    # tp x T alone at T x this batch
    tp_rank: dict | None = None
    # --grad-accum K -> a single run's step with it over K t1 (r_K: one micro-step over a whole step),
    # where one was measured
    accum: dict | None = None
    # (devices per node n, K) -> an independent x n run with --grad-accum K: its step over K x the
    # independent x n step (r_K measured where n workers contend, as the predicted cell's do)
    accum_at: dict | None = None

    def contention_at(self, per_node: int) -> float:
        """c_n: 1 at one device per node, and where no independent run at n was measured."""
        return (self.contention or {}).get(per_node, 1.0) if per_node > 1 else 1.0

    def contention_measured(self, per_node: int) -> bool:
        """Whether c_n is a measurement (an independent run at n) rather than the assumed 1."""
        return per_node < 2 or per_node in (self.contention or {})

    def wait_at(self, strategy: str, devices: int) -> float:
        """W_N in seconds: measured at N, else carried from the nearest measured N0 below N (above,
        where none is below) by g(N) / g(N0); 0 where none was measured, and at one device."""
        measured = {k: v for k, v in ((self.wait or {}).get(strategy) or {}).items() if k >= 2}
        if devices < 2 or not measured:
            return 0.0
        below = [k for k in measured if k <= devices]
        n0 = max(below) if below else min(measured)
        return measured[n0] * expected_max(devices) / expected_max(n0)


@functools.lru_cache(maxsize=None)
def expected_max(n: int) -> float:
    """E[max of n independent standard normals]: 0 at n = 1, 1/sqrt(pi) at 2, 1.0294 at 4. By the
    integral of x n phi(x) Phi(x)^(n-1), trapezoids on [-10, 10]."""
    if n < 2:
        return 0.0
    steps, lo, hi = 4000, -10.0, 10.0
    h = (hi - lo) / steps
    total = 0.0
    for i in range(steps + 1):
        x = lo + i * h
        f = x * n * math.exp(-x * x / 2) / math.sqrt(2 * math.pi) * (0.5 * (1 + math.erf(x / math.sqrt(2)))) ** (n - 1)
        total += f / 2 if i in (0, steps) else f
    return total * h


def slowest_rank_wait_s(r: dict) -> float | None:
    """A profiled run's W: the wait of its slowest rank as the breakdown names it (the one with the
    least wait and idle), per step, in timed seconds (scaled by the timed step p50 over that rank's
    profiled step). None without a breakdown that names one."""
    b = r.get("breakdown")
    if not b or b.get("slowest_rank") is None:
        return None
    rank = next((x for x in b["per_rank"] if x["rank"] == b["slowest_rank"]), None)
    if rank is None or not rank["step_ms"]:
        return None
    return rank["parts_ms"]["wait"] * r["throughput"]["step_time_ms_p50"] / rank["step_ms"] / 1000


def _sort_run(g: dict, r: dict, c: dict, rank_of: int) -> None:
    """Put one ok result into its group's anchors (inputs_from): single, --ac's and --grad-accum's own,
    tp-rank, contention, one-device steps, overlap and W."""
    k = int(c.get("grad_accum") or 1)
    # every anchor but --ac's and --grad-accum's own is a run without either: a step of theirs holds
    # the recomputation or the K micro-steps, which predict() applies once, from their own anchors
    plain = (c.get("ac") or "none") == "none" and k == 1
    if c["strategy"] == "tp-rank":
        if plain:
            g["tp_rank"].setdefault((rank_of, c.get("sequence_parallel", True) is not False), []).append(
                r["throughput"]["step_time_ms_p50"] / 1000)
    elif c["strategy"] == "single" and (c.get("ac") or "none") != "none":
        if k == 1:  # --ac's anchor (with --grad-accum too it would hold r_K as well)
            g["ac"].setdefault(c["ac"], []).append(r["throughput"]["step_time_ms_p50"] / 1000)
    elif c["strategy"] == "single":
        if k == 1:  # the baseline: one micro-step per optimiser step
            g["single"].append(r)
        else:  # the accumulation anchor: its step over k
            g["accum"].setdefault(k, []).append(r["throughput"]["step_time_ms_p50"] / 1000 / k)
    elif c["strategy"] == "independent" and (c.get("ac") or "none") == "none" and k > 1:
        per_node = c["devices"] // c.get("nodes", 1)  # the accumulation anchor where n workers contend
        g["accum_at"].setdefault((per_node, k), []).append(r["throughput"]["step_time_ms_p50"] / 1000 / k)
    elif not plain:
        pass  # contention, one-device steps, overlap and W are read from plain runs only
    elif c["strategy"] == "independent":
        per_node = c["devices"] // c.get("nodes", 1)
        g["independent"].setdefault(per_node, []).append(r["throughput"]["step_time_ms_p50"] / 1000)
    elif c["devices"] == 1:
        g["one"].setdefault(c["strategy"], []).append(r["throughput"]["step_time_ms_p50"] / 1000)
    elif r.get("breakdown"):
        b = r["breakdown"]
        exposed = b["parts_ms"]["exposed_comm"] + b["overlapped_comm_ms"]
        if exposed > 0:
            g["overlap"].setdefault(c["strategy"], []).append(b["overlapped_comm_ms"] / exposed)
        w = slowest_rank_wait_s(r)
        if w is not None and c["strategy"] in ("ddp", "fsdp", "hsdp", "tp"):
            g["wait"].setdefault(c["strategy"], {}).setdefault(c["devices"], []).append(w)


def inputs_from(results: list[dict]) -> list[Inputs]:
    """One Inputs per (model, size, precision, batch) that has ok single runs, with overlaps and
    waits measured by profiled multi-device runs of the same."""
    groups: dict[tuple, dict] = {}
    for r in results:
        if r["status"] != "ok":
            continue
        c = r["config"]
        rank_of = int(c.get("tp") or 1) if c["strategy"] == "tp-rank" else 1  # at T x the group's batch
        if c["batch_size_per_device"] % rank_of:
            continue  # no tp x T cell has a batch per device it could be the anchor of
        key = (c["model"], c.get("model_size", "base"), c["precision"], c["batch_size_per_device"] // rank_of)
        g = groups.setdefault(key, {"single": [], "overlap": {}, "micro": None, "one": {}, "independent": {},
                                     "wait": {}, "ac": {}, "tp_rank": {}, "accum": {},
                                     "accum_at": {}})
        _sort_run(g, r, c, rank_of)
        if c["strategy"] == "pipeline":
            g["micro"] = c.get("microbatches")
    out = []
    for (model, size, precision, batch), g in groups.items():
        if not g["single"]:
            continue
        m = build_model(model, size=size, device="meta")
        t1 = statistics.median(r["throughput"]["step_time_ms_p50"] for r in g["single"]) / 1000
        out.append(Inputs(model, size, precision, batch, t1,
                          statistics.median(r["throughput"]["samples_per_s"] for r in g["single"]),
                          sum(p.numel() for p in m.parameters()), len(m.blocks), g["micro"],
                          {s: statistics.median(v) for s, v in g["overlap"].items()},
                          {s: statistics.median(v) for s, v in g["one"].items()},
                          {n: statistics.median(v) / t1 for n, v in g["independent"].items()},
                          {s: {n: statistics.median(v) for n, v in by_n.items()} for s, by_n in g["wait"].items()},
                          {mode: statistics.median(v) / t1 for mode, v in g["ac"].items()},
                          trust.joined(f for r in g["single"] for f in trust.result_flags(r)),
                          {k: statistics.median(v) for k, v in g["tp_rank"].items()},
                          {k: statistics.median(v) / t1 for k, v in g["accum"].items()},
                          {(n, k): statistics.median(v) / statistics.median(g["independent"][n])
                           for (n, k), v in g["accum_at"].items() if n in g["independent"]}))
    return out


def _boundary_bytes(inp: Inputs, stages: int, micro_batch: int) -> float:
    """Bytes of one micro-batch's activations crossing the busiest stage boundary (fp32)."""
    import torch

    m = build_model(inp.model, size=inp.model_size, device="meta")
    x = m.example_input(micro_batch, "meta")
    sizes = []
    with torch.no_grad():
        for block in m.blocks:
            x = block(x)
            parts = x if isinstance(x, tuple) else (x,)
            sizes.append(sum(t.numel() * 4 for t in parts))
    cuts = [b for _, b in m.stage_boundaries(stages)[:-1]]
    return max((sizes[c - 1] for c in cuts), default=0)


RECOMPUTE = {"none": 1.0, "full": 4 / 3, "selective": 7 / 6}  # --ac's step over t1 where none was measured


def accumulate_factor(inp: Inputs, k: int, per_node: int = 1) -> tuple[float, bool]:
    """(r_K: one micro-step of --grad-accum K over a whole step, whether a run measured it). The
    optimiser step, zero_grad and the harness's per-step work are paid once per K micro-steps, and
    on the 2-core CPU a micro-step ran 4 % under a whole step's forward and backward besides
    (docs/measurements/). At n > 1 devices per node, from an independent x n run with --grad-accum K
    over independent x n, where one was measured: the saving where the workers contend, as they do in
    the predicted cell (on 2 CPU workers it differed from one process's; docs/measurements/
    ddp-accum-step_*); else from a single run with --grad-accum K over single; else 1."""
    if k < 2:
        return 1.0, True
    for measured in ((inp.accum_at or {}).get((per_node, k)) if per_node > 1 else None, (inp.accum or {}).get(k)):
        if measured is not None:
            return measured, True
    return 1.0, False


def recompute_factor(inp: Inputs, ac: str) -> tuple[float, bool]:
    """(a step with --ac over one without, whether a single run measured it)."""
    measured = (inp.recompute or {}).get(ac)
    return (measured, True) if measured is not None and ac != "none" else (RECOMPUTE[ac], ac == "none")


@dataclass(frozen=True)
class TpProfile:
    """What tensor parallel over a degree does to a model, counted on the meta device: f, the share of
    forward FLOPs it divides; per training step over all its layers, the row-parallel and
    column-parallel projections, the gathers sequence parallel adds (each layer's attention entry,
    its first feed-forward projections', a module that needs the whole sequence both ways, the
    region's own edges), WavLM's gate inputs (cut into heads as DTensors: gathered backward, with or
    without sequence parallel), and the replicated parameters whose gradients come out partial (the
    layer norms' with sequence parallel, WavLM's gate linear always); elements of one layer's output
    per sample."""

    f: float
    rows: int
    cols: int
    gathers: int
    norm_params: int
    norm_elems: int  # of all those parameters together
    elems: int
    gate_gathers: int = 0
    gate_params: int = 0
    gate_elems: int = 0

    def comm_s(self, act_bytes: float, degree: int, link: Link, sequence_parallel: bool) -> float:
        """Seconds of a micro-step's tensor-parallel collectives of activations, each on the critical
        path (no async TP). Without sequence parallel: an all-reduce per row-parallel projection forward
        and per column-parallel one backward (q, k and v are three; Megatron fuses them). With it
        (torch's form, bench/strategies/tp.py): each row-parallel output is reduce-scattered forward and
        all-gathered backward; each gather is one all-gather forward (its backward is a local chunk);
        the column-parallel projections still all-reduce their input gradients backward. WavLM's gate
        inputs are all-gathered backward in both."""
        gate = self.gate_gathers * t_gather(act_bytes, degree, link)
        if not sequence_parallel:
            return (self.rows + self.cols) * t_all_reduce(act_bytes, degree, link) + gate
        return (self.rows * (t_gather(act_bytes, degree, link, "reduce_scatter") + t_gather(act_bytes, degree, link))
                + self.gathers * t_gather(act_bytes, degree, link) + self.cols * t_all_reduce(act_bytes, degree, link)
                + gate)

    def step_s(self, degree: int, link: Link, sequence_parallel: bool, flat: bool = True) -> float:
        """Seconds of the all-reduces of replicated parameters' partial gradients (the gate's linear; with
        sequence parallel the layer norms'), once per optimiser step. flat: --strategy tp sums them all
        in one all-reduce before the optimiser reads them (bench/strategies/tp.py reduce_partial_grads);
        else FSDP2 (fsdp --tp) redistributes each parameter's on its own in its gradient reduce."""
        sets = [(self.gate_params, self.gate_elems)] + ([(self.norm_params, self.norm_elems)] if sequence_parallel else [])
        if flat:
            elems = sum(e for _, e in sets)
            return t_all_reduce(4 * elems, degree, link) if elems else 0.0
        return sum(n * t_all_reduce(4 * e / n, degree, link) for n, e in sets if n)


@functools.lru_cache(maxsize=32)
def tp_profile(model: str, size: str, degree: int) -> TpProfile:
    """tensor parallel over `degree` on the model, counted on the meta device: the FLOPs of the model
    and of one rank's shapes of it (bench/strategies/tp.py localize), its layers' plans."""
    import torch

    from .strategies.tp import COL, ROW, SplitWavLMAttention, layers, localize, split

    full = build_model(model, size=size, device="meta")
    total = sum(full.block_flops(2))
    local = build_model(model, size=size, device="meta")
    localize(local, degree)
    f = (total - sum(local.block_flops(2))) / (total * (1 - 1 / degree))
    found = layers(full)
    split(found)  # packed attention into its q, k and v projections, as tensor parallel runs it
    rows = sum(style == ROW for layer in found for style in layer.plan.values())
    # a column-parallel embedding (WavLM's relative position bias) reads indices: no input gradient
    cols = sum(style == COL and isinstance(layer.module.get_submodule(path), torch.nn.Linear)
               for layer in found for path, style in layer.plan.items())
    attention = [layer.entry.split(".")[0] + "." for layer in found]
    gathers = sum(1 + sum(style == COL and not path.startswith(att) for path, style in layer.plan.items())
                  + 2 * len(layer.whole) for layer, att in zip(found, attention)) + 2 * bool(found)
    norms = [p for layer in found for name in layer.norms for p in layer.module.get_submodule(name).parameters()]
    gates = [layer.module.attention for layer in found
             if isinstance(getattr(layer.module, "attention", None), SplitWavLMAttention)
             and layer.module.attention.gru_rel_pos]
    gate_params = [p for g in gates for p in g.gru_rel_pos_linear.parameters()]
    seen: list[int] = []
    hook = found[0].module.register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).numel()))
    with torch.no_grad():
        full(full.example_input(1, "meta"))
    hook.remove()
    return TpProfile(f, rows, cols, gathers, len(norms), sum(p.numel() for p in norms), seen[0], len(gates),
                     len(gate_params), sum(p.numel() for p in gate_params))


def predict(inp: Inputs, strategy: str, devices: int, nodes: int, intra: Link, inter: Link | None, *,
            grad_accum: int = 1, ac: str = "none", tp: int = 1, replicate: int = 1,
            sequence_parallel: bool = True) -> dict:
    """Predicted step time (s), throughput (samples/s) and efficiency of one cell. tp: fsdp's or hsdp's
    tensor-parallel degree (--strategy tp is tensor parallel over all devices); replicate: their
    replicas (HSDP); sequence_parallel: tensor parallel's setting."""
    if strategy == "pipeline" and grad_accum > 1:
        raise ValueError("pipeline with --grad-accum: the schedule's micro-batches are its accumulation")
    link = inter if nodes > 1 and inter is not None else intra
    grad_bytes = 4 * inp.params
    overlap = (inp.overlap or {}).get(strategy, 0.0)
    own = "fsdp" if strategy == "hsdp" else strategy  # hsdp is FSDP2 too, and never runs on one device
    t1, n, K = (inp.one_device or {}).get(own, inp.single_step_s), devices, grad_accum
    per_node = max(1, n // max(nodes, 1))
    contention = inp.contention_at(per_node)
    t1 *= contention * recompute_factor(inp, ac)[0] * accumulate_factor(inp, K, per_node)[0]  # one micro-step
    wait = inp.wait_at(strategy, n) if strategy in ("ddp", "fsdp", "hsdp", "tp") else 0.0
    in_meetings = strategy == "tp" and n > 1 and _tp_link(n, per_node, intra, inter).met
    if in_meetings:
        # the collectives' meeting cost holds the ranks' skew at each of them: W would count it twice. fsdp
        # --tp keeps its W (FSDP2's own collectives wait in it), the tp part's skew in both (a known overlap)
        wait = 0.0
    if strategy == "single" or n == 1:
        step = K * t1
    elif strategy == "ddp":
        k = max(1, math.ceil(grad_bytes / BUCKET_BYTES))
        step = K * t1 + wait + (1 - overlap) * k * t_all_reduce(grad_bytes / k, n, link)
    elif strategy in ("fsdp", "hsdp", "tp"):
        degree = n if strategy == "tp" else tp
        micro = _tp_micro_step(inp, t1, degree, per_node, intra, inter, sequence_parallel)
        comm = _sharded_comm(inp, n, nodes, degree, 1 if strategy == "tp" else replicate, K, intra, inter)
        step = K * micro + wait + (1 - overlap) * comm + _tp_step_s(inp, degree, per_node, intra, inter,
                                                                    sequence_parallel, flat=strategy == "tp")
    elif strategy == "pipeline":  # replicate: N / P pipelines of P stages (--pp P)
        p = n // replicate
        m = inp.microbatches or 2 * p
        mb = max(1, p * inp.batch // m)
        act = _boundary_bytes(inp, p, mb)
        step = t1 * (m + p - 1) / m + 2 * (m + p - 2) * (link.alpha_us * 1e-6 + act / (link.busbw_GBps * 1e9))
        if replicate > 1:  # each stage's gradients all-reduced over its replicas (DDP, after the last micro-batch)
            dp_link = intra if replicate <= per_node or inter is None else inter
            step += t_all_reduce(grad_bytes / p, replicate, dp_link)
    else:
        raise ValueError(f"no model for strategy {strategy!r}: predict ddp, fsdp, hsdp, tp or pipeline")
    throughput = n * inp.batch * K / step
    return {"step_ms": step * 1000, "samples_per_s": throughput,
            "efficiency": throughput / (n * inp.single_throughput), "overlap": overlap, "contention": contention,
            "wait_ms": wait * 1000, "wait_in_meetings": in_meetings}


def _tp_micro_step(inp: Inputs, t1: float, degree: int, per_node: int, intra: Link, inter: Link | None,
                   sequence_parallel: bool = True) -> float:
    """One micro-step of a rank of a tensor-parallel group of `degree` (t1 itself at degree 1): the
    group shares degree x b samples; its compute is t1 x s, s a tp-rank run's step (one rank's shapes
    alone at degree x b) over single's where one was measured, else by the FLOP share, the share f of
    the work dividing over the group and the rest every rank's (s = degree (1 - f) + f); then the
    layers' collectives (TpProfile.comm_s) inside the node."""
    if degree < 2:
        return t1
    prof = tp_profile(inp.model, inp.model_size, degree)
    act = degree * inp.batch * prof.elems * (2 if inp.precision in ("bf16", "fp16") else 4)
    tp_link = _tp_link(degree, per_node, intra, inter)
    return t1 * tp_compute_share(inp, degree, sequence_parallel)[0] + prof.comm_s(act, degree, tp_link,
                                                                                   sequence_parallel)


def tp_compute_share(inp: Inputs, degree: int, sequence_parallel: bool) -> tuple[float, str]:
    """(s, its basis): a rank of tensor parallel over `degree` computes s x one device's step at the
    same per-device batch. Measured where a tp-rank run was (its step over single's), else counted:
    degree (1 - f) + f, f the share of the FLOPs tensor parallel divides."""
    measured = (inp.tp_rank or {}).get((degree, sequence_parallel))
    if measured is not None:
        return measured / inp.single_step_s, "tp-rank run"
    f = tp_profile(inp.model, inp.model_size, degree).f
    return degree * (1 - f) + f, "FLOP share"


def _tp_step_s(inp: Inputs, degree: int, per_node: int, intra: Link, inter: Link | None,
               sequence_parallel: bool, flat: bool) -> float:
    """Tensor parallel's once-per-optimiser-step collectives (TpProfile.step_s); 0 at degree 1."""
    if degree < 2:
        return 0.0
    tp_link = _tp_link(degree, per_node, intra, inter)
    return tp_profile(inp.model, inp.model_size, degree).step_s(degree, tp_link, sequence_parallel, flat)


def _tp_link(degree: int, per_node: int, intra: Link, inter: Link | None) -> Link:
    """The link tensor parallel's collectives over `degree` ranks go through (Link.tensor_parallel):
    inside the node where the group fits in one."""
    return (intra if degree <= per_node or inter is None else inter).tensor_parallel(degree)


def _sharded_comm(inp: Inputs, n: int, nodes: int, degree: int, replicate: int, K: int, intra: Link,
                  inter: Link | None) -> float:
    """FSDP2's communication per optimiser step over the shard group (N / (degree x replicate) ranks;
    each rank's parameters after tensor parallel): per block two all-gathers of the parameters a
    micro-step and one reduce-scatter of the gradients; HSDP then all-reduces each shard's gradients
    across the replicas. A group that spans nodes goes through the inter-node link."""
    from .memory import tp_dims

    shards = n // (degree * replicate)
    split = tp_dims(inp.model, inp.model_size)[0] if degree > 1 else 0
    local = inp.params - split + split // degree
    param_bytes, grad_bytes = (2 if inp.precision in ("bf16", "fp16") else 4) * local, 4 * local
    per_node = max(1, n // max(nodes, 1))
    shard_link = intra if shards * degree <= per_node or inter is None else inter
    replica_link = intra if nodes == 1 or inter is None else inter
    L = inp.blocks
    return L * (2 * K * t_gather(param_bytes / L, shards, shard_link)
                + t_gather(grad_bytes / L, shards, shard_link, "reduce_scatter")
                + t_all_reduce(grad_bytes / (L * max(shards, 1)), replicate, replica_link))


def check(results: list[dict], intra: Link, inter: Link | None) -> list[dict]:
    """Predicted against measured for every ok multi-device cell that has its single baseline."""
    by_key = {(i.model, i.model_size, i.precision, i.batch): i for i in inputs_from(results)}
    rows: dict[tuple, list[float]] = {}
    flags: dict[tuple, list[str]] = {}
    for r in results:
        c = r["config"]
        if (r["status"] != "ok" or c["strategy"] not in PREDICTED or c["devices"] < 2
                or c.get("scaling", "weak") != "weak"):
            continue
        key = (c["model"], c.get("model_size", "base"), c["precision"], c["batch_size_per_device"])
        if key in by_key:
            tensor_parallel = c["strategy"] == "tp" or mesh_of(c)[0] > 1
            cell = (key, c["strategy"], c["devices"], c.get("nodes", 1), int(c.get("grad_accum") or 1),
                    c.get("ac") or "none", *mesh_of(c),
                    # SP on and off apart; a result from before --sequence-parallel existed ran without it
                    bool(c.get("sequence_parallel", False)) if tensor_parallel else None)
            rows.setdefault(cell, []).append(r["throughput"]["samples_per_s"])
            flags.setdefault(cell, []).extend(trust.result_flags(r))
    out = []
    for cell, measured in rows.items():
        key, strategy, n, nodes, k, ac, tp, rep, sequence_parallel = cell
        inp = by_key[key]
        p = predict(inp, strategy, n, nodes, intra, inter, grad_accum=k, ac=ac, tp=tp, replicate=rep,
                    sequence_parallel=sequence_parallel is not False)
        m = statistics.median(measured)
        degree = n if strategy == "tp" else tp
        basis = tp_compute_share(inp, degree, sequence_parallel is not False)[1] if degree > 1 else None
        out.append({"model": inp.model, "precision": inp.precision, "batch": inp.batch, "strategy": strategy,
                    "devices": n, "nodes": nodes, "grad_accum": k, "ac": ac, "tp": tp, "dp_replicate": rep,
                    "sequence_parallel": sequence_parallel, "tp_compute": basis,
                    "predicted": p["samples_per_s"], "measured": m,
                    "error": p["samples_per_s"] / m - 1, "overlap": p["overlap"], "contention": p["contention"],
                    "wait_ms": p["wait_ms"], "repeats": len(measured),
                    "flags": trust.joined([*flags[cell], *(f"single baseline: {f}" for f in trust.split(inp.flags))])})
    return out


PREDICTED = ("ddp", "fsdp", "hsdp", "tp", "pipeline")  # the strategies the model above covers


def mesh_of(c: dict) -> tuple[int, int]:
    """(fsdp's / hsdp's tensor-parallel degree, replicas) of a result's config, (1, pipelines) for a
    pipeline (1, 1 for the others and for results from before the mesh); --strategy tp's degree is its
    device count."""
    d = (c.get("parallelism") or {}).get("degrees") or {}
    if c["strategy"] == "pipeline":  # --pp P below --gpus: its pipelines
        return 1, int(d.get("dp_replicate") or 1)
    if c["strategy"] not in ("fsdp", "hsdp"):
        return 1, 1
    return int(d.get("tp") or c.get("tp") or 1), int(d.get("dp_replicate") or c.get("dp_replicate") or 1)


# ------------------------------------------------------------------------------------- bench predict's tables

def measured_cells(results: list[dict], grad_accum: int = 1, ac: str = "none") -> dict[tuple, float]:
    """Median throughput of every ok weak-scaling cell at this --grad-accum and --ac, by (model, size,
    strategy, precision, batch, devices, nodes, tensor-parallel degree, replicas, sequence parallel: None
    without tensor parallel)."""
    seen: dict[tuple, list[float]] = {}
    for r in results:
        c = r["config"]
        if (r["status"] == "ok" and c.get("scaling", "weak") == "weak" and int(c.get("grad_accum") or 1) == grad_accum
                and (c.get("ac") or "none") == ac):
            tensor_parallel = c["strategy"] == "tp" or mesh_of(c)[0] > 1
            key = (c["model"], c.get("model_size", "base"), c["strategy"], c["precision"], c["batch_size_per_device"],
                   c["devices"], c.get("nodes", 1), *mesh_of(c),
                   bool(c.get("sequence_parallel", False)) if tensor_parallel else None)  # as check() keys them
            seen.setdefault(key, []).append(r["throughput"]["samples_per_s"])
    return {k: statistics.median(v) for k, v in seen.items()}


def prediction_table(inputs: list[Inputs], strategies: list[str], counts: list[int], per_node: int, intra: Link,
                     inter: Link | None, measured: dict[tuple, float] | None = None, *, grad_accum: int = 1,
                     ac: str = "none") -> tuple[str, list[str], list[list[str]]]:
    """(title, header, rows) of every input, strategy and device count N; an overlap, contention or
    wait that no run measured says so. Where a cell was measured at N, its throughput and efficiency
    are the measured ones (said in the note); a pipeline past one stage per block says why it stops."""
    from .strategies import parse_cell

    rows = []
    for inp in inputs:
        for s in strategies:
            strategy, mesh, _ = parse_cell(s)  # 'fsdp:tp2', 'hsdp', 'hsdp:rep2:tp4'
            for n in counts:
                cell = f"{inp.model} {s} {inp.precision} b{inp.batch}"
                nodes = max(1, -(-n // per_node))
                tp = mesh["tp"]
                rep = mesh["dp_replicate"] if mesh["dp_replicate"] > 1 or strategy != "hsdp" else nodes
                if strategy == "pipeline" and mesh.get("pp", 1) > 1:  # 'pipeline:pp4': N / 4 pipelines, 0: none fit
                    rep = n // mesh["pp"] if n % mesh["pp"] == 0 else 0
                stop = _stops(inp, strategy, n, tp, rep, grad_accum)
                if stop:
                    rows.append([cell, str(n), "", "–", "–", "–", "", "", "", f"stops: {stop}"])
                    continue
                p = predict(inp, strategy, n, nodes, intra, inter, grad_accum=grad_accum, ac=ac, tp=tp, replicate=rep,
                            sequence_parallel=mesh.get("sequence_parallel", True))
                thr, eff, note = p["samples_per_s"], p["efficiency"], "predicted"
                sp = mesh.get("sequence_parallel", True) if strategy == "tp" or tp > 1 else None
                got = (measured or {}).get((inp.model, inp.model_size, strategy, inp.precision, inp.batch, n, nodes,
                                            *((tp, rep) if strategy in ("fsdp", "hsdp", "pipeline") else (1, 1)), sp))
                if got is not None:
                    thr, eff = got, got / (n * inp.single_throughput)
                    note = f"measured (predicted {p['samples_per_s']:.1f} samples/s)"
                rows.append([cell, str(n), str(nodes), f"{p['step_ms']:.1f}", f"{thr:.1f}", f"{eff:.2f}",
                             f"{p['overlap']:.2f}" + ("" if inp.overlap and strategy in inp.overlap else " (none measured)"),
                             f"{p['contention']:.2f}" + ("" if inp.contention_measured(n // nodes) else " (none measured)"),
                             "" if strategy == "pipeline" or n < 2 else
                             f"{p['wait_ms']:.1f}" + (" (in the meeting cost)" if p["wait_in_meetings"] else
                                                      "" if (inp.wait or {}).get(strategy) else " (none measured)"),
                             # a prediction rests on its single runs: their flags travel with every row
                             note + (f"; single baseline flagged: {inp.flags}" if inp.flags else "")
                             + ("" if recompute_factor(inp, ac)[1] else
                                f"; --ac {ac}: one more forward assumed (x{RECOMPUTE[ac]:.2f}), no single run measured it")
                             + ("" if accumulate_factor(inp, grad_accum, n // nodes)[1] else
                                f"; --grad-accum {grad_accum}: a micro-step assumed a whole single step, no single or "
                                "independent run with it measured it")])
    header = ["cell", "devices", "nodes", "step (ms)", "throughput (samples/s)", "efficiency", "overlap o",
              "contention c_n", "wait W (ms/step)", "note"]
    title = (f"predicted: intra-node {intra.source} ({intra.busbw_GBps:.1f} GB/s, {intra.alpha_us:.0f} us); "
             f"inter-node {inter.source}" + (f"; --grad-accum {grad_accum}" if grad_accum > 1 else "")
             + (f"; --ac {ac}" if ac != "none" else ""))
    return title, header, rows


def _stops(inp: Inputs, strategy: str, n: int, tp: int, rep: int, grad_accum: int) -> str | None:
    """Why a cell of the prediction table cannot run at n devices, else None."""
    from .memory import tp_divides

    degree = n if strategy == "tp" else tp
    if strategy == "pipeline" and rep < 1:
        return f"{n} devices do not split into pipelines of the cell's --pp stages"
    if strategy == "pipeline" and n // rep > inp.blocks:
        return f"{inp.model} has {inp.blocks} blocks, at most one pipeline stage each"
    if strategy == "pipeline" and grad_accum > 1:
        return "a pipeline accumulates over its micro-batches, not --grad-accum"
    if strategy in ("fsdp", "hsdp") and n % (tp * rep):
        return f"{n} devices do not split into {rep} replicas x {tp} tensor-parallel ranks"
    if strategy == "hsdp" and rep < 2:
        return "hsdp replicates across nodes: one node here (give hsdp:repR)"
    if degree > 1 and not tp_divides(inp.model, inp.model_size, degree):
        return f"{inp.model}'s heads or feed-forward units do not divide by the tensor-parallel degree {degree}"
    return None


def check_table(checked: list[dict]) -> tuple[str, list[str], list[list[str]]]:
    """(title, header, rows) of check()'s cells: measured against predicted throughput."""
    header = ["cell", "devices", "measured (samples/s)", "predicted (samples/s)", "error", "contention c_n",
              "wait W (ms/step)", "flags"]
    rows = [[f"{c['model']} {c['strategy']} {c['precision']} b{c['batch']}"
             + (f" rep{c['dp_replicate']}" if c.get("dp_replicate", 1) > 1 else "")
             + (f" tp{c['tp']}" if c.get("tp", 1) > 1 else "")
             + (f" ga{c['grad_accum']}" if c.get("grad_accum", 1) > 1 else "")
             + (f" ac-{c['ac']}" if c.get("ac", "none") != "none" else "")
             + (" nosp" if c.get("sequence_parallel") is False else ""), str(c["devices"]),
             f"{c['measured']:.1f}", f"{c['predicted']:.1f}", f"{c['error'] * 100:+.1f}%", f"{c['contention']:.2f}",
             "" if c["strategy"] == "pipeline" else f"{c['wait_ms']:.1f}",
             trust.joined([c.get("flags") or "", *([f"tp compute from the {c['tp_compute']}"] if c.get("tp_compute")
                                                    else [])]) or "–"]
            for c in checked]
    return "predicted against measured (the same links)", header, rows


def write_markdown(path: Path, *tables: tuple[str, list[str], list[list[str]]]) -> None:
    """predict.md: the tables' headers and rows, one markdown table after another."""
    from emotion_models.atomic import atomic_write_text

    from .report import md_table

    atomic_write_text(path, "\n\n".join(md_table(header, rows) for _, header, rows in tables) + "\n")
