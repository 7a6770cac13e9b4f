"""Why a strategy scales as it does: the step breakdown (arithmetic and real profiled runs), the
collective benchmark, and the scaling model."""
import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from bench.breakdown import PARTS, Collective, StepTrace, breakdown, busbw_factor, merge, parts, subtract, transfer_times
from bench.predict import (Inputs, Link, check, expected_max, inputs_from, predict, prediction_table, slowest_rank_wait_s,
                           t_all_reduce, t_gather)
from bench.results import load_result
from conftest import bench
from test_sweep_report import fixture_result

TINY = ["--size", "tiny", "--epochs", "2", "--batch-size", "8", "--model-size", "small", "--device", "cpu"]


# ------------------------------------------------------------------------------------------ arithmetic

def test_interval_arithmetic():
    assert merge([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    assert subtract([(0, 10)], [(2, 3), (5, 7)]) == [(0, 2), (3, 5), (7, 10)]
    assert subtract([(0, 4), (6, 9)], [(3, 7)]) == [(0, 3), (7, 9)]


def test_each_moment_goes_to_one_part_by_priority():
    # a 100 µs step: compute 0-40, an all-reduce 30-80 (transfer 20 µs: its last 20), optimizer 85-95
    step = StepTrace(duration=100, compute=[(0, 40), (85, 95)], optimizer=[(85, 95)],
                     collectives=[Collective("all_reduce", 30, 80)])
    got, overlapped = parts(step, [20.0])
    assert got["optimizer"] == 10 and got["compute"] == 40  # the optimiser's ops count once, as optimiser
    assert got["exposed_comm"] == 20  # 60-80
    assert got["wait"] == 20  # 40-60: 30-60 is waiting, of which 30-40 is under compute
    assert got["idle"] == 10  # 80-85 and 95-100
    assert sum(got.values()) == 100 and overlapped == 10  # 30-40


def test_transfer_is_the_shortest_duration_across_ranks_and_p2p_waits_are_idle():
    fast = StepTrace(duration=50, compute=[(0, 10)], collectives=[Collective("all_reduce", 10, 40)])
    slow = StepTrace(duration=50, compute=[(0, 35)], collectives=[Collective("all_reduce", 35, 40)])
    assert transfer_times([fast, slow]) == [[5.0], [5.0]]
    bd = breakdown([[fast], [slow]])
    assert bd.ranks[0]["parts_ms"]["wait"] == pytest.approx(0.025) and bd.ranks[1]["parts_ms"]["wait"] == 0
    assert bd.slowest_rank() == 1
    stage = StepTrace(duration=50, compute=[(0, 10)], collectives=[Collective("recv", 10, 40)])
    peer = StepTrace(duration=50, compute=[(0, 35)], collectives=[Collective("send", 35, 40)])
    got, _ = parts(stage, transfer_times([stage, peer])[0])
    assert got["wait"] == 0 and got["exposed_comm"] == 5 and got["idle"] == 35  # 10-35 is the bubble


def test_breakdown_of_two_ranks_by_hand():
    """Rank 0 computes 0-40 µs, then waits in an all-reduce 40-70 for rank 1, which computes 0-60;
    the all-reduce's transfer is its shortest duration, 10 µs (rank 1's 60-70). Step 0 also has an
    unsized all-gather and a send/receive; rank 1 profiled one step more than rank 0 (ignored)."""
    def steps(compute_end, optimizer, durations, extra):
        out = []
        for i, d in enumerate(durations):
            colls = [Collective("all_reduce", compute_end, 70, bytes=4_000_000)] + (extra if i == 0 else [])
            out.append(StepTrace(duration=d, compute=[(0, compute_end)] + optimizer, optimizer=optimizer,
                                 collectives=colls))
        return out

    r0 = steps(40, [(80, 90)], [100, 120, 110, 130],
               [Collective("all_gather", 70, 75), Collective("send", 75, 78, bytes=3000)])
    r1 = steps(60, [], [90, 130, 95, 140, 1000], [Collective("all_gather", 70, 72), Collective("recv", 72, 78)])
    bd = breakdown([r0, r1]).to_dict()
    # the median of 4 steps is the second shortest: 110 µs on rank 0, 95 µs on rank 1
    assert [r["step_ms"] for r in bd["per_rank"]] == [pytest.approx(0.110), pytest.approx(0.095)]
    assert bd["step_ms"] == pytest.approx(0.110) and bd["per_rank"][0]["rank"] == 0 and bd["per_rank"][1]["rank"] == 1
    ms = {k: v * 1000 for k, v in bd["parts_ms"].items()}  # back to µs
    assert ms == pytest.approx({"optimizer": 10, "compute": 40, "memcpy": 0, "exposed_comm": 10, "wait": 20,
                                "runtime": 0, "idle": 30})  # idle: 70-80 and 90-110
    assert bd["parts_share"] == pytest.approx({k: v / 110 for k, v in ms.items()})
    assert {k: v * 1000 for k, v in bd["per_rank"][1]["parts_ms"].items()} == pytest.approx(
        {"optimizer": 0, "compute": 60, "memcpy": 0, "exposed_comm": 10, "wait": 0, "runtime": 0, "idle": 25})
    assert bd["overlapped_comm_ms"] == 0 and bd["slowest_rank"] == 1 and bd["parts_meaning"] == PARTS
    c = bd["collectives"]
    assert set(c) == {"all_reduce", "all_gather", "send_recv"}
    # all-reduce: 4 of 4 steps, 4 MB each, 10 µs transfer: algbw 4e6 / 10e-6 = 400 GB/s, busbw x 2(2-1)/2
    assert c["all_reduce"] == pytest.approx({"count_per_step": 1, "bytes_per_step": 4e6, "transfer_ms_per_step": 0.01,
                                             "algbw_GBps": 400.0, "busbw_GBps": 400.0})
    # the all-gather's size is unknown: no bandwidth rather than a wrong one; transfer 2 µs in 1 of 4 steps
    assert c["all_gather"] == pytest.approx({"count_per_step": 0.25, "bytes_per_step": None,
                                             "transfer_ms_per_step": 0.0005, "algbw_GBps": None, "busbw_GBps": None})
    # send/recv pair up: transfer min(3, 6) = 3 µs, 3000 B: 1 GB/s, busbw factor 1
    assert c["send_recv"] == pytest.approx({"count_per_step": 0.25, "bytes_per_step": 750, "transfer_ms_per_step": 0.00075,
                                            "algbw_GBps": 1.0, "busbw_GBps": 1.0})
    single = breakdown([r0[:1]])
    assert single.slowest_rank() is None and single.ranks[0]["step_ms"] == pytest.approx(0.1)


def test_bandwidth_definitions_follow_nccl_tests():
    assert busbw_factor("all_reduce", 4) == 1.5 and busbw_factor("all_gather", 4) == 0.75
    assert busbw_factor("reduce_scatter", 2) == 0.5 and busbw_factor("send", 8) == busbw_factor("broadcast", 8) == 1
    step = StepTrace(duration=100, collectives=[Collective("all_reduce", 0, 50, bytes=10_000_000)])
    c = breakdown([[step], [step]]).collectives["all_reduce"]
    assert c["algbw_GBps"] == pytest.approx(10e6 / 50e-6 / 1e9)  # S / t
    assert c["busbw_GBps"] == pytest.approx(c["algbw_GBps"] * 2 * 1 / 2)


def test_scaling_model_formulas():
    link = Link(busbw_GBps=10.0, alpha_us=5.0, source="test")
    # ring all-reduce: 2(N-1)/N x S / B + 2(N-1) alpha
    assert t_all_reduce(1e9, 4, link) == pytest.approx(2 * 3 / 4 * 1e9 / 10e9 + 2 * 3 * 5e-6)
    assert t_gather(1e9, 4, link) == pytest.approx(3 / 4 * 1e9 / 10e9 + 3 * 5e-6)
    inp = Inputs("cnn", "base", "fp32", 32, single_step_s=0.1, single_throughput=320.0, params=25_000_000, blocks=5)
    ddp = predict(inp, "ddp", 8, 1, link, None)  # 100 MB of gradients: four 25 MiB buckets
    assert ddp["step_ms"] == pytest.approx(1000 * (0.1 + 4 * t_all_reduce(4 * 25e6 / 4, 8, link)))
    assert ddp["efficiency"] == pytest.approx(0.1 / (ddp["step_ms"] / 1000))
    slow = Link(busbw_GBps=1.0, alpha_us=50.0, source="slow")
    assert predict(inp, "ddp", 16, 2, link, slow)["step_ms"] > predict(inp, "ddp", 16, 1, link, slow)["step_ms"]
    pipe = predict(inp, "pipeline", 2, 1, Link(float("inf"), 0.0, "free"), None)
    assert pipe["step_ms"] == pytest.approx(100 * (4 + 2 - 1) / 4)  # the bubble alone: m = 4, p = 2
    # a strategy measured at one device starts from its own step there, not single's
    own = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 25_000_000, 5, one_device={"fsdp": 0.125})
    fsdp = predict(own, "fsdp", 4, 1, link, None)
    per_block = 2 * t_gather(4 * 25e6 / 5, 4, link) + t_gather(4 * 25e6 / 5, 4, link)
    assert fsdp["step_ms"] == pytest.approx(1000 * (0.125 + 5 * per_block))
    assert fsdp["efficiency"] == pytest.approx(4 * 32 / (fsdp["step_ms"] / 1000) / (4 * 320.0))
    assert predict(own, "ddp", 4, 1, link, None)["step_ms"] == predict(inp, "ddp", 4, 1, link, None)["step_ms"]
    # contention: c_n scales the compute of n devices per node, before communication is added
    busy = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 25_000_000, 5, contention={4: 1.5})
    assert predict(busy, "ddp", 4, 1, link, None)["step_ms"] == pytest.approx(
        1000 * (1.5 * 0.1 + 4 * t_all_reduce(25e6, 4, link)))
    assert predict(busy, "ddp", 8, 2, link, None)["contention"] == 1.5  # 4 per node on 2 nodes
    assert busy.contention_measured(4) and busy.contention_measured(1) and not busy.contention_measured(2)
    assert predict(busy, "ddp", 2, 1, link, None)["step_ms"] == predict(inp, "ddp", 2, 1, link, None)["step_ms"]
    own_busy = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 25_000_000, 5, one_device={"fsdp": 0.125},
                      contention={4: 1.5})
    assert predict(own_busy, "fsdp", 4, 1, link, None)["step_ms"] == pytest.approx(1000 * (1.5 * 0.125 + 5 * per_block))


def test_waiting_at_meetings_is_carried_to_n_devices_by_the_expected_maximum():
    # E[max of n standard normals]: closed forms at 2 and 3 (1/sqrt(pi), 3/(2 sqrt(pi))), tables beyond
    assert expected_max(1) == 0.0 and expected_max(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-6)
    assert expected_max(3) == pytest.approx(1.5 / math.sqrt(math.pi), rel=1e-6)
    assert expected_max(4) == pytest.approx(1.0293754, rel=1e-6) and expected_max(8) == pytest.approx(1.4236003, rel=1e-6)
    free = Link(float("inf"), 0.0, "free")
    inp = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 1_000_000, 5, wait={"fsdp": {2: 0.02, 8: 0.05}, "ddp": {4: 0.01}})
    assert predict(inp, "fsdp", 2, 1, free, None)["step_ms"] == pytest.approx(100 + 20)  # measured at 2
    assert predict(inp, "fsdp", 8, 1, free, None)["wait_ms"] == pytest.approx(50)  # measured at 8: as it is
    # 4 carries 2's (the nearest measured below); 64 carries 8's
    assert predict(inp, "fsdp", 4, 1, free, None)["wait_ms"] == pytest.approx(20 * 1.0293754 / 0.5641896, rel=1e-5)
    assert predict(inp, "fsdp", 64, 8, free, None)["step_ms"] == pytest.approx(
        100 + 50 * expected_max(64) / expected_max(8))
    # ddp measured only at 4: 2 is carried down from it; one device never waits
    assert predict(inp, "ddp", 2, 1, free, None)["wait_ms"] == pytest.approx(10 * 0.5641896 / 1.0293754, rel=1e-5)
    assert predict(inp, "ddp", 1, 1, free, None)["step_ms"] == pytest.approx(100)
    # ddp adds W to its compute, beside the all-reduce it does not hide
    link = Link(10.0, 5.0, "in")
    half = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 1_000_000, 5, wait={"ddp": {2: 0.01}}, overlap={"ddp": 0.25})
    assert predict(half, "ddp", 2, 1, link, None)["step_ms"] == pytest.approx(
        1000 * (0.1 + 0.01 + 0.75 * t_all_reduce(4e6, 2, link)))
    # a pipeline's waits are its bubble: no W, even where one was given
    piped = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 1_000_000, 5, wait={"pipeline": {2: 0.5}})
    p = predict(piped, "pipeline", 2, 1, free, None)
    assert p["step_ms"] == pytest.approx(100 * 5 / 4) and p["wait_ms"] == 0.0
    none = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 1_000_000, 5)
    assert predict(none, "fsdp", 4, 1, free, None)["wait_ms"] == 0.0
    # a W given at one device (no meeting there) is not a starting point: 2 is carried down from 4
    one = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 1_000_000, 5, wait={"fsdp": {1: 0.3, 4: 0.02}})
    assert predict(one, "fsdp", 2, 1, free, None)["wait_ms"] == pytest.approx(20 * 0.5641896 / 1.0293754, rel=1e-5)


def test_predict_reads_the_wait_of_the_slowest_rank_in_timed_milliseconds():
    def profiled(strategy, step_ms, waits, profiled_ms, slowest, exposed=1.0, overlapped=1.0):
        r = fixture_result(strategy=strategy, devices=len(waits), thr=64000 / step_ms, step_ms=step_ms)
        r["breakdown"] = {"parts_ms": {"exposed_comm": exposed}, "overlapped_comm_ms": overlapped, "slowest_rank": slowest,
                          "per_rank": [{"rank": i, "step_ms": profiled_ms, "parts_ms": {"wait": w}}
                                       for i, w in enumerate(waits)]}
        return r

    runs = [fixture_result(strategy="single", thr=320.0),
            # the slowest rank waited 12 ms of a 240 ms profiled step; timed, the step is 200 ms
            profiled("fsdp", 200.0, [40.0, 12.0], 240.0, slowest=1, exposed=0.3, overlapped=0.2),
            profiled("fsdp", 220.0, [8.0, 50.0], 220.0, slowest=0),
            profiled("fsdp", 300.0, [30.0, 60.0], 300.0, slowest=0, exposed=0.3, overlapped=0.2),
            profiled("ddp", 200.0, [3.0, 9.0], 200.0, slowest=0),
            # its waits are the bubble: no W; no communication measured: no overlap either
            profiled("pipeline", 200.0, [0.0, 99.0], 200.0, slowest=0, exposed=0.0, overlapped=0.0)]
    (inp,) = inputs_from(runs)
    assert slowest_rank_wait_s(runs[1]) == pytest.approx(0.010)  # 12 ms x 200 / 240, in seconds
    assert inp.wait == {"fsdp": {2: pytest.approx(0.010)},  # median of 10, 8 and 30 ms
                        "ddp": {2: pytest.approx(0.003)}}
    assert inp.overlap == {"fsdp": pytest.approx(0.4), "ddp": 0.5}  # fsdp: median of 0.2 / 0.5, 1 / 2, 0.2 / 0.5
    unprofiled = fixture_result(strategy="fsdp", devices=2, thr=300.0)
    (plain,) = inputs_from([runs[0], unprofiled])
    assert plain.wait == {}
    lost = profiled("fsdp", 200.0, [5.0, 6.0], 200.0, slowest=3)  # names a rank it does not list: no W
    assert slowest_rank_wait_s(lost) is None and slowest_rank_wait_s(unprofiled) is None


def test_predict_inputs_take_one_device_and_independent_runs_and_check_skips_them():
    runs = [fixture_result(strategy=s, devices=n, thr=thr, step_ms=ms)
            for s, n, ms, thr in (("single", 1, 100.0, 320.0), ("fsdp", 1, 125.0, 256.0), ("fsdp", 2, 140.0, 457.0),
                                  ("independent", 2, 110.0, 580.0), ("independent", 2, 130.0, 490.0),
                                  ("independent", 2, 120.0, 530.0))]
    (inp,) = inputs_from(runs)
    assert inp.single_step_s == 0.1 and inp.one_device == {"fsdp": 0.125}
    assert inp.contention == {2: pytest.approx(1.2)}  # the median independent step over single's
    rows = check(runs, Link(1.0, 100.0, "t"), None)  # independent runs are inputs, not predictions
    assert [(r["strategy"], r["devices"]) for r in rows] == [("fsdp", 2)] and rows[0]["measured"] == 457.0
    assert rows[0]["contention"] == pytest.approx(1.2)


def test_links_from_presets_and_from_a_comm_fit():
    nv = Link.named("nvlink4")
    assert (nv.busbw_GBps, nv.alpha_us) == (pytest.approx(0.8 * 450), 10.0) and "NVLink" in nv.source
    with pytest.raises(ValueError, match="not a preset"):
        Link.named("token-ring")
    comm = {"run_id": "c1", "config": {"devices": 4, "device_type": "cpu", "backend": "gloo"},
            "fit": {"all_gather": {"busbw_GBps": 3.0, "alpha_us": 90.0},
                    "all_reduce": {"busbw_GBps": 2.0, "alpha_us": 600.0}}}
    ar = Link.measured(comm)  # a fit's latency is the whole collective: a ring all-reduce is 2(n-1) hops
    assert (ar.busbw_GBps, ar.alpha_us) == (2.0, 100.0)
    assert ar.source == "bench comm c1: 4 x cpu (gloo), all_reduce fit"
    ag = Link.measured(comm, "all_gather")  # the others n-1
    assert (ag.busbw_GBps, ag.alpha_us) == (3.0, 30.0) and ag.source.endswith("all_gather fit")
    only = {**comm, "fit": {"all_gather": {"busbw_GBps": None, "alpha_us": 90.0}}}
    first = Link.measured(only)  # the kind asked for is missing: the first fit, as an all-reduce
    assert first.busbw_GBps == float("inf") and first.alpha_us == 15.0
    dtensor_first = {**comm, "fit": {"tp_all_gather": {"busbw_GBps": 0.5, "alpha_us": 900.0}, **only["fit"]}}
    assert Link.measured(dtensor_first).alpha_us == 15.0  # never a tp_ fit, which holds DTensor's cost too
    two = {**comm, "config": {**comm["config"], "devices": 2}}
    assert Link.measured(two).alpha_us == 300.0 and Link.measured(two, "send").alpha_us == 90.0


def test_predict_by_hand_for_every_strategy_and_node_count():
    link, inter = Link(10.0, 5.0, "in"), Link(1.0, 50.0, "out")
    inp = Inputs("cnn", "base", "bf16", 32, single_step_s=0.1, single_throughput=320.0, params=10_000_000, blocks=5,
                 microbatches=8, overlap={"fsdp": 0.5})
    one = predict(inp, "ddp", 1, 1, link, inter)
    assert one["step_ms"] == pytest.approx(100.0) and one["efficiency"] == pytest.approx(1.0)
    assert predict(inp, "single", 4, 1, link, inter)["step_ms"] == pytest.approx(100.0)
    # ddp across 2 nodes: 40 MB of fp32 gradients in 2 buckets, through the inter-node link
    ddp = predict(inp, "ddp", 16, 2, link, inter)
    assert ddp["step_ms"] == pytest.approx(1000 * (0.1 + 2 * t_all_reduce(40e6 / 2, 16, inter)))
    assert predict(inp, "ddp", 16, 2, link, None)["step_ms"] == pytest.approx(
        1000 * (0.1 + 2 * t_all_reduce(40e6 / 2, 16, link)))  # no inter-node link given: the intra one
    assert ddp["overlap"] == 0.0 and ddp["contention"] == 1.0
    # fsdp in bf16 gathers 2-byte parameters and reduce-scatters 4-byte gradients, half of it hidden
    fsdp = predict(inp, "fsdp", 4, 1, link, inter)
    per_block = 2 * t_gather(2 * 10e6 / 5, 4, link) + t_gather(4 * 10e6 / 5, 4, link)
    assert fsdp["step_ms"] == pytest.approx(1000 * (0.1 + 0.5 * 5 * per_block)) and fsdp["overlap"] == 0.5
    assert fsdp["samples_per_s"] == pytest.approx(4 * 32 / (fsdp["step_ms"] / 1000))
    # pipeline: m = 8 micro-batches of 4 x 32 / 8 = 16 samples; A from the model itself, by hand below
    pipe = predict(inp, "pipeline", 4, 1, link, inter)
    act = _activation_bytes_at_cuts("cnn", 4, 16)
    assert pipe["step_ms"] == pytest.approx(1000 * (0.1 * (8 + 3) / 8 + 2 * (8 + 4 - 2) * (5e-6 + act / 10e9)))
    # --pp 4 at 8 devices: two such pipelines, each stage's 40 MB / 4 of gradients all-reduced over its 2 replicas
    assert predict(inp, "pipeline", 8, 1, link, inter, replicate=2)["step_ms"] == pytest.approx(
        pipe["step_ms"] + 1000 * t_all_reduce(40e6 / 4, 2, link))
    default_m = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 10_000_000, 5)  # m = 2 x stages
    assert predict(default_m, "pipeline", 2, 1, Link(float("inf"), 0.0, "free"), None)["step_ms"] == \
        pytest.approx(100 * (4 + 1) / 4)
    with pytest.raises(ValueError, match="no model for strategy"):
        predict(inp, "dp", 2, 1, link, inter)


def test_predict_accumulation_and_checkpointing_by_hand():
    """--grad-accum K: K micro-steps of compute, the gradients communicated once (DDP) or reduce-
    scattered once while FSDP2 gathers every micro-step; --ac: one more forward where no single run
    measured it (4/3 full, 7/6 selective), the measured ratio where one did. Ring all-reduce over N:
    2(N-1) hops of alpha and 2(N-1)/N of the bytes over B; a gather 1(N-1) and (N-1)/N."""
    link = Link(10.0, 5.0, "in")  # 10 GB/s, 5 us a hop
    inp = Inputs("cnn", "base", "fp32", 32, single_step_s=0.1, single_throughput=320.0, params=1_000_000, blocks=4)
    ar = 2 * 3 * 5e-6 + 2 * 3 / 4 * 4e6 / 10e9  # 4 MB of fp32 gradients, one bucket, 4 ranks
    ddp = predict(inp, "ddp", 4, 1, link, None, grad_accum=3)
    assert ddp["step_ms"] == pytest.approx(1000 * (3 * 0.1 + ar))
    assert ddp["samples_per_s"] == pytest.approx(4 * 32 * 3 / (3 * 0.1 + ar))
    gather = 3 * 5e-6 + 3 / 4 * 1e6 / 10e9  # a block's 1 MB of fp32 parameters (or gradients) over 4 ranks
    fsdp = predict(inp, "fsdp", 4, 1, link, None, grad_accum=2)
    assert fsdp["step_ms"] == pytest.approx(1000 * (2 * 0.1 + 4 * (2 * 2 * gather + gather)))
    assert predict(inp, "ddp", 4, 1, link, None, ac="full")["step_ms"] == pytest.approx(1000 * (0.1 * 4 / 3 + ar))
    assert predict(inp, "ddp", 4, 1, link, None, ac="selective")["step_ms"] == pytest.approx(1000 * (0.1 * 7 / 6 + ar))
    measured = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 1_000_000, 4, recompute={"full": 1.25})
    assert predict(measured, "ddp", 4, 1, link, None, ac="full")["step_ms"] == pytest.approx(1000 * (0.125 + ar))
    # a single run with --grad-accum 3 measured a micro-step at 0.9 of a whole step: K micro-steps of 0.09 s
    anchored = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 1_000_000, 4, accum={3: 0.9})
    assert predict(anchored, "ddp", 4, 1, link, None, grad_accum=3)["step_ms"] == pytest.approx(1000 * (3 * 0.09 + ar))
    assert predict(anchored, "ddp", 4, 1, link, None, grad_accum=2)["step_ms"] == pytest.approx(1000 * (2 * 0.1 + ar))
    assert predict(anchored, "ddp", 4, 1, link, None)["step_ms"] == pytest.approx(1000 * (0.1 + ar))
    with pytest.raises(ValueError, match="micro-batches are its accumulation"):
        predict(inp, "pipeline", 2, 1, link, None, grad_accum=2)


def _activation_bytes_at_cuts(model: str, stages: int, micro_batch: int) -> int:
    """The largest fp32 output of a block that ends a stage, by running the model's blocks on the meta
    device (shapes only: a real forward here would be slower, and mutmut forks the test process)."""
    from emotion_models.models import build_model

    m = build_model(model, device="meta").eval()
    x, sizes = m.example_input(micro_batch, "meta"), []
    with torch.no_grad():
        for block in m.blocks:
            x = block(x)
            sizes.append(x.numel() * 4)
    return max(sizes[end - 1] for _, end in m.stage_boundaries(stages)[:-1])


def test_predict_inputs_group_runs_and_check_compares_only_what_it_models():
    def run(strategy, devices, thr, *, precision="fp32", batch=32, status="ok", overlapped=None, **config):
        r = fixture_result(strategy=strategy, devices=devices, thr=thr, precision=precision, batch=batch, status=status)
        r["config"].update(config)
        if overlapped is not None:
            r["breakdown"] = {"parts_ms": {"exposed_comm": 10.0 - overlapped}, "overlapped_comm_ms": overlapped}
        return r

    runs = [run("single", 1, 300.0), run("single", 1, 320.0), run("single", 1, 340.0),
            run("single", 1, 999.0, status="failed"),  # not an input
            run("single", 1, 150.0, precision="bf16", batch=16), run("single", 1, 100.0, batch=64),
            run("ddp", 2, 500.0, overlapped=2.0), run("ddp", 2, 560.0, overlapped=4.0), run("ddp", 2, 520.0),
            run("ddp", 2, 1.0, scaling="strong"), run("ddp", 4, 1.0, status="failed"),
            run("pipeline", 2, 400.0, microbatches=6, overlapped=0.0), run("dp", 2, 1.0),
            run("ddp", 2, 290.0, precision="bf16", batch=16, model="lstm")]  # no lstm single: no prediction
    inputs = {(i.precision, i.batch): i for i in inputs_from(runs)}
    assert set(inputs) == {("fp32", 32), ("bf16", 16), ("fp32", 64)}
    inp = inputs[("fp32", 32)]
    assert inp.single_throughput == 320.0 and inp.single_step_s == pytest.approx(32 / 320.0)
    assert (inp.model, inp.model_size, inp.blocks, inp.microbatches) == ("cnn", "small", 5, 6)
    from emotion_models.models import build_model

    assert inp.params == sum(p.numel() for p in build_model("cnn", size="small", device="meta").parameters())
    assert inp.overlap == {"ddp": pytest.approx(0.3), "pipeline": 0.0}  # median of 0.2 and 0.4
    assert inp.one_device == {} and inp.contention == {}
    rows = check(runs, Link(1.0, 100.0, "t"), None)
    # only ok, weak-scaling, multi-device ddp / fsdp / pipeline cells that have their single baseline
    assert sorted((r["strategy"], r["devices"], r["repeats"]) for r in rows) == [("ddp", 2, 3), ("pipeline", 2, 1)]
    ddp = next(r for r in rows if r["strategy"] == "ddp")
    assert ddp["measured"] == 520.0 and (ddp["model"], ddp["precision"], ddp["batch"], ddp["nodes"]) == \
        ("cnn", "fp32", 32, 1)
    want = predict(inp, "ddp", 2, 1, Link(1.0, 100.0, "t"), None)["samples_per_s"]
    assert ddp["predicted"] == pytest.approx(want) and ddp["error"] == pytest.approx(want / 520.0 - 1)
    assert ddp["overlap"] == pytest.approx(0.3) and ddp["contention"] == 1.0


def test_predict_inputs_take_the_accumulation_anchor_from_single_runs_with_grad_accum():
    """A single run with --grad-accum K is r_K's anchor (its step over K x single's), never a baseline;
    ddp with --grad-accum 2 is then predicted from it: 2 micro-steps of 0.1 s x 0.9, one all-reduce."""
    runs = [fixture_result(strategy="single", devices=1, thr=320.0, step_ms=100.0),
            fixture_result(strategy="single", devices=1, thr=355.0, step_ms=180.0, repeat=1),
            fixture_result(strategy="ddp", devices=2, thr=600.0, step_ms=200.0, repeat=2)]
    runs[1]["config"]["grad_accum"] = 2
    runs[2]["config"]["grad_accum"] = 2
    (inp,) = inputs_from(runs)
    assert inp.single_step_s == pytest.approx(0.1) and inp.single_throughput == 320.0  # the ga2 run left out
    assert inp.accum == {2: pytest.approx(0.9)}  # 180 ms / 2 over 100 ms
    link = Link(1.0, 100.0, "t")
    ar = 2 * 1 * 100e-6 + 2 * 1 / 2 * 4 * inp.params / 1e9  # ring over 2: 2 hops, half the bytes twice
    (row,) = check(runs, link, None)
    assert row["grad_accum"] == 2 and row["predicted"] == pytest.approx(2 * 32 * 2 / (2 * 0.09 + ar))


def test_accumulation_and_checkpointing_runs_feed_only_their_own_anchors():
    """A run with --ac or --grad-accum feeds no other anchor: an fsdp x1 --grad-accum 2 step (two micro-
    steps) is not fsdp's one-device step, an independent --grad-accum 2 pair is no contention, and a
    single --ac full --grad-accum 2 run is not --ac's anchor (it would hold r_2 as well)."""
    runs = [fixture_result(strategy="single", devices=1, thr=320.0, step_ms=100.0),
            fixture_result(strategy="single", devices=1, thr=1.0, step_ms=250.0, repeat=1),
            fixture_result(strategy="single", devices=1, thr=1.0, step_ms=130.0, repeat=2),
            fixture_result(strategy="fsdp", devices=1, thr=1.0, step_ms=230.0, repeat=3),
            fixture_result(strategy="independent", devices=2, thr=1.0, step_ms=210.0, repeat=4)]
    runs[1]["config"].update(ac="full", grad_accum=2)
    runs[2]["config"].update(ac="full")
    runs[3]["config"]["grad_accum"] = 2
    runs[4]["config"]["grad_accum"] = 2
    (inp,) = inputs_from(runs)
    assert inp.recompute == {"full": pytest.approx(1.3)}  # 130 ms over 100: the --grad-accum 2 run left out
    assert inp.one_device == {} and inp.contention == {} and inp.accum == {}
    assert inp.accum_at == {}  # an independent --grad-accum 2 pair without its plain pair anchors nothing


def test_accumulation_anchor_where_the_workers_contend_comes_from_independent_runs_with_grad_accum():
    """An independent x2 --grad-accum 2 run over independent x2 is r_2 at 2 workers a node: ddp x2
    --grad-accum 2 is then the independent pair's --grad-accum 2 step plus one all-reduce, whatever
    single's r_2; at 4 a node, where no independent run was, single's r_2 still holds."""
    runs = [fixture_result(strategy="single", devices=1, thr=320.0, step_ms=100.0),
            fixture_result(strategy="single", devices=1, thr=1.0, step_ms=180.0, repeat=1),
            fixture_result(strategy="independent", devices=2, thr=1.0, step_ms=110.0, repeat=2),
            fixture_result(strategy="independent", devices=2, thr=1.0, step_ms=209.0, repeat=3)]
    runs[1]["config"]["grad_accum"] = 2
    runs[3]["config"]["grad_accum"] = 2
    (inp,) = inputs_from(runs)
    assert inp.contention == {2: pytest.approx(1.1)} and inp.accum == {2: pytest.approx(0.9)}
    assert inp.accum_at == {(2, 2): pytest.approx(0.95)}  # 209 ms / 2 over 110 ms
    link = Link(1.0, 100.0, "t")
    ar = 2 * 1 * 100e-6 + 2 * 1 / 2 * 4 * inp.params / 1e9
    assert predict(inp, "ddp", 2, 1, link, None, grad_accum=2)["step_ms"] == pytest.approx(1000 * (0.209 + ar))
    ar4 = 2 * 3 * 100e-6 + 2 * 3 / 4 * 4 * inp.params / 1e9
    assert predict(inp, "ddp", 4, 1, link, None, grad_accum=2)["step_ms"] == pytest.approx(1000 * (2 * 0.09 + ar4))
    _, _, rows = prediction_table([inp], ["ddp"], [2], 2, link, link, grad_accum=2)
    assert "--grad-accum" not in rows[0][-1]


def test_prediction_table_says_where_accumulation_was_assumed():
    inp = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 1_000_000, 4)
    anchored = Inputs("cnn", "base", "fp32", 32, 0.1, 320.0, 1_000_000, 4, accum={2: 0.9})
    link = Link(10.0, 5.0, "in")
    notes = {}
    for name, i in (("assumed", inp), ("measured", anchored)):
        _, header, rows = prediction_table([i], ["ddp"], [2], 2, link, link, grad_accum=2)
        notes[name] = rows[0][-1]
    assert "--grad-accum 2: a micro-step assumed a whole single step" in notes["assumed"]
    assert "--grad-accum" not in notes["measured"]
    _, _, plain = prediction_table([inp], ["ddp"], [2], 2, link, link)
    assert "--grad-accum" not in plain[0][-1]


def test_predict_command_shows_where_contention_was_measured(tmp_path, capsys):
    """bench predict end to end in process: its table marks c_n measured (independent x2) or
    assumed (x4), and compares the measured ddp x2 cell."""
    from conftest import invoke
    from test_sweep_report import write_all

    runs = [fixture_result(strategy=s, devices=n, thr=thr, step_ms=ms, repeat=i)
            for i, (s, n, ms, thr) in enumerate((("single", 1, 100.0, 320.0), ("independent", 2, 120.0, 533.0),
                                                  ("ddp", 2, 130.0, 492.0)))]
    runs[2]["breakdown"] = {"parts_ms": {"exposed_comm": 2.0}, "overlapped_comm_ms": 0.0, "slowest_rank": 1,
                            "per_rank": [{"rank": 0, "step_ms": 130.0, "parts_ms": {"wait": 9.0}},
                                         {"rank": 1, "step_ms": 130.0, "parts_ms": {"wait": 4.0}}]}
    src = write_all(tmp_path / "runs", runs)
    code, out = invoke(["predict", src, "--gpus", "2,4", "--strategies", "ddp", "--link", "pcie4",
                        "--out", tmp_path / "rep"], capsys)
    assert code == 0, out
    drawn = [line for line in out.splitlines() if line[:1] in "┏┃┡│└"]  # the console's two tables
    assert drawn and max(map(len, drawn)) <= 80 and "…" not in out, out  # 80 columns, nothing cut
    assert "contention c_n 1.00 (none measured)" in " ".join(" ".join(out.replace("│", " ").split()).split())
    md = (tmp_path / "rep" / "predict.md").read_text()
    predicted, compared_table = md.split("\n\n")[:2]  # the prediction table, then the check against measured
    row = {line.split("|")[2].strip(): line for line in predicted.splitlines() if line.startswith("| cnn ddp")}
    assert "| 1.20 |" in row["2"] and "1.00 (none measured)" in row["4"], md
    # W: rank 1's 4.0 ms measured at 2, carried to 4 by E[max of 4] / E[max of 2] = 1.8245
    assert "| 4.0 | measured (predicted " in row["2"] and row["4"].rstrip().endswith("| 7.3 | predicted |"), md
    # at 2 devices ddp was measured: its throughput and efficiency are the measured 492 / (2 x 320)
    assert "| 492.0 | 0.77 |" in row["2"], md
    compared = [line for line in compared_table.splitlines() if "| 492.0 |" in line]
    assert len(compared) == 1 and compared[0].rstrip().endswith("| 1.20 | 4.0 | – |"), md
    code, out = invoke(["predict", write_all(tmp_path / "plain", runs[:2]), "--gpus", "2", "--strategies",
                        "ddp,pipeline", "--link", "pcie4", "--out", tmp_path / "rep2"], capsys)
    md = (tmp_path / "rep2" / "predict.md").read_text()
    assert code == 0 and "| 0.0 (none measured) |" in md and "| cnn pipeline fp32 b32 | 2 | 1 |" in md, md
    assert [line for line in md.splitlines() if "pipeline" in line][0].rstrip().endswith("|  | predicted |"), md


def test_predict_takes_the_link_measured_beside_the_results_or_says_what_it_assumed(tmp_path, capsys, monkeypatch):
    """Without --link: a bench comm result in the folder is the link; without one, CPU results are
    predicted on the slowest preset and the line says so (never an H100's NVLink); nothing is
    written without --out, in the working directory least of all."""
    import json

    from conftest import invoke
    from test_sweep_report import write_all

    monkeypatch.chdir(tmp_path)
    runs = [fixture_result(strategy=s, devices=n, thr=thr, repeat=i)
            for i, (s, n, thr) in enumerate((("single", 1, 320.0), ("ddp", 2, 492.0)))]
    src = write_all(tmp_path / "runs", runs)
    code, out = invoke(["predict", src, "--gpus", "2,8", "--strategies", "ddp,pipeline"], capsys)
    assert code == 0, out
    assert "assumed the 100gbe preset (100 Gb Ethernet" in out and "no preset describes CPU workers" in out
    assert "NVLink" not in out and "H100" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no predict.md or .png here
    comm = {"schema": 1, "kind": "comm", "run_id": "20261201-000000-comm-2xcpu-abcd", "status": "ok",
            "config": {"devices": 2, "device_type": "cpu", "backend": "gloo", "nodes": 1},
            "fit": {"all_reduce": {"busbw_GBps": 1.3, "alpha_us": 740.0}}, "ops": {}}
    (src / "comm").mkdir()
    (src / "comm" / f"{comm['run_id']}.comm.json").write_text(json.dumps(comm))
    code, out = invoke(["predict", src, "--gpus", "2,8", "--strategies", "ddp,pipeline", "--out", tmp_path / "rep"],
                       capsys)
    assert code == 0 and "link: measured beside the results: bench comm 20261201-000000-comm-2xcpu-abcd" in out, out
    assert "assumed" not in out
    md = (tmp_path / "rep" / "predict.md").read_text()
    pipe8 = next(line for line in md.splitlines() if line.startswith("| cnn pipeline fp32 b32 | 8 |"))
    assert "stops: cnn has" in pipe8 and "blocks, at most one pipeline stage each" in pipe8, md


# ------------------------------------------------------------------------------------------ real runs

def _trace_events(path):
    with gzip.open(path, "rt") as f:
        return json.load(f)["traceEvents"]


def test_profiled_ddp_run_breaks_its_step_down_and_shows_a_slowed_rank(tmp_path):
    """One profiled ddp run with rank 1's steps made three times as long (a busy-wait: the losses do
    not change), beside the same run unprofiled and unslowed: two launches, not three. The price:
    the breakdown's sums are checked on a skewed run only, and equal losses show that neither
    profiling nor the busy-wait changed the training, not which one would have."""
    plain = bench("run", "--strategy", "ddp", "--gpus", "2", *TINY, "--out", tmp_path / "plain")
    proc = bench("run", "--strategy", "ddp", "--gpus", "2", *TINY, "--profile", "--profile-steps", "3",
                 "--out", tmp_path / "prof", env={"EMOTION_BENCH_FAULT": "slow:200:1"})
    assert proc.returncode == 0 and plain.returncode == 0, proc.stdout + proc.stderr
    r = load_result(proc.stdout.strip().splitlines()[-1])
    b = r["breakdown"]
    for rank in b["per_rank"]:
        assert sum(rank["parts_ms"].values()) == pytest.approx(rank["step_ms"], rel=0.05)
        assert rank["parts_ms"]["compute"] > 0
    ar = b["collectives"]["all_reduce"]
    assert ar["count_per_step"] >= 1 and ar["bytes_per_step"] > 0
    assert 0 < ar["busbw_GBps"] < 100  # gloo over loopback: positive, below any memory bandwidth
    assert set(b["ddp_logging_ms"]) >= {"forward_compute", "backward_comm"}
    assert len(b["traces"]) == 2 and any(e.get("name") == "emotion_bench.step" for e in _trace_events(b["traces"][1]))
    # the slowed rank shows as the other waiting. A loaded machine gives rank 1 waits of its own: with
    # 100 % (tests beside it) a ratio of 2.9, and with 200 % and other work on both cores 1.6 (159
    # against 97 ms, CI in a fresh clone, 2026-12-01); quiet, it is far above 3. So: clearly more
    wait = {x["rank"]: x["parts_ms"]["wait"] for x in b["per_rank"]}
    assert wait[0] > 1.25 * max(wait[1], 0.1) and b["slowest_rank"] == 1, b["per_rank"]
    # profiling comes after everything measured: the same run without it trains and scores the same
    unprofiled = load_result(plain.stdout.strip().splitlines()[-1])
    assert r["losses"] == unprofiled["losses"] and r["quality"]["test"] == unprofiled["quality"]["test"]
    assert unprofiled["breakdown"] is None


def test_comm_benchmark_bandwidth_rises_with_size(tmp_path):
    proc = bench("comm", "--gpus", "2", "--device", "cpu", "--ops", "all_reduce,send_recv,tp_all_reduce", "--max-bytes", "1M",
                 "--out", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(open(proc.stdout.strip().splitlines()[-1]).read())
    rows = result["ops"]["all_reduce"]
    assert [r["bytes"] for r in rows] == [2**k for k in range(10, 21)]
    assert all(r["busbw_GBps"] > 0 for r in rows) and rows[-1]["busbw_GBps"] > 5 * rows[0]["busbw_GBps"]
    assert rows[0]["busbw_GBps"] == pytest.approx(rows[0]["algbw_GBps"] * 2 * 1 / 2)
    assert result["fit"]["all_reduce"]["alpha_us"] > 0 and (tmp_path / (result["run_id"] + ".comm.png")).exists()
    assert "tp_all_reduce" in result["fit"] and len(result["ops"]["tp_all_reduce"]) == len(rows)  # every size measured
    # the tp_ op also timed after compute, at the meet buffer capped by --max-bytes (1M); the raw ops not
    from bench.comm import moved_bytes

    (kind,) = result["meet"]
    m = result["meet"][kind]
    assert kind == "tp_all_reduce" and m["bytes"] == moved_bytes("tp_all_reduce", 2**20, 2) and m["iters"] == 60
    assert m["compute_us"] > 0 and m["meet_us"] == pytest.approx(m["call_mean_us"] - m["tight_mean_us"])
    assert "meeting cost" in proc.stdout + proc.stderr


def test_bench_comm_refuses_a_negative_compute_segment_in_one_line(tmp_path):
    proc = bench("comm", "--gpus", "2", "--device", "cpu", "--meet-compute-ms", "-1", "--out", tmp_path)
    assert proc.returncode == 2 and "--meet-compute-ms -1" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing launched, nothing written


def test_bench_comm_records_the_bytes_its_buffers_hold():
    """S is what the buffer holds: fp32 elements the ranks split evenly, a tp_ buffer's whole (2n, 16)
    rows, and no tp_ point under 2 rows (the gather's rearranging copy would be a view). By hand."""
    from bench.comm import moved_bytes

    assert moved_bytes("all_gather", 1024, 2) == 1024 and moved_bytes("all_gather", 1026, 3) == 4 * 255
    assert moved_bytes("tp_all_gather", 1024, 2) == 1024  # 4 rows of 4 x 16 floats
    assert moved_bytes("tp_reduce_scatter", 4096, 3) == 4 * 10 * 6 * 16  # 10 rows of 6 x 16
    assert moved_bytes("tp_all_reduce", 2048, 16) == 0 and moved_bytes("tp_all_reduce", 4096, 16) == 4096


def _tp_ops_rank(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from bench.comm import _tp_op

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    got = {kind: _tp_op(kind, 4096, torch.device("cpu"), 2)() for kind in ("tp_all_gather", "tp_reduce_scatter",
                                                                           "tp_all_reduce")}
    dist.barrier()  # both ranks done with every collective before the group goes (else gloo aborts the peer)
    if rank == 0:
        Path(out).write_text(json.dumps({k: [list(v.shape), v.sum().item(), v.min().item()] for k, v in got.items()}))
    from bench.control import leave_group

    leave_group()  # barrier, destroy_process_group, exit without interpreter finalisation


def test_bench_comms_tensor_parallel_collectives_move_what_they_say(tmp_path):
    """Two gloo ranks, a 4 KiB buffer (16, 4, 16) of ones sharded on dim 1: the gather gives every rank
    the whole of ones, the reduce-scatter its half of twos, the all-reduce the whole of twos."""
    import torch.multiprocessing as mp

    out = tmp_path / "tp.json"
    mp.spawn(_tp_ops_rank, args=(str(tmp_path / "init"), str(out)), nprocs=2)
    got = json.loads(out.read_text())
    assert got == {"tp_all_gather": [[16, 4, 16], 1024.0, 1.0], "tp_reduce_scatter": [[16, 2, 16], 1024.0, 2.0],
                   "tp_all_reduce": [[16, 4, 16], 2048.0, 2.0]}


def test_check_keeps_tensor_parallel_runs_with_and_without_sequence_parallel_apart():
    """Sequence parallel changes the step (issue 24's measurement: 1.21x on a CPU): bench predict's
    check must compare each setting's runs with the prediction, not their median together."""
    from test_sweep_report import fixture_result

    from bench.predict import Link, check, check_table

    runs = [fixture_result(model="transformer", thr=100.0)]
    for thr, sp in ((150.0, True), (160.0, True), (120.0, False)):
        r = fixture_result(model="transformer", strategy="tp", devices=2, thr=thr)
        r["config"]["sequence_parallel"] = sp
        runs.append(r)
    rows = {r["sequence_parallel"]: r for r in check(runs, Link(1.0, 100.0, "t"), None)}
    assert set(rows) == {True, False}
    assert (rows[True]["measured"], rows[True]["repeats"]) == (155.0, 2)
    assert (rows[False]["measured"], rows[False]["repeats"]) == (120.0, 1)
    assert rows[True]["predicted"] < rows[False]["predicted"]  # sequence parallel's gathers cost time
    labels = sorted(line[0] for line in check_table(list(rows.values()))[2])
    assert labels == ["transformer tp fp32 b32", "transformer tp fp32 b32 nosp"]


def test_tensor_parallel_collectives_counted_against_the_torch_layers():
    """TpProfile's counts for the small transformer against an oracle outside bench/strategies/tp.py:
    torch's nn.TransformerEncoderLayer has 2 row-parallel projections (attention out, linear2), 4
    column-parallel ones (q, k, v split from the packed in-projection, linear1), 2 gathers with
    sequence parallel (attention entry, linear1) and 2 layer norms of 2 parameters each; the region
    adds its 2 edges. Then comm_s by hand from t_all_reduce and t_gather."""
    from torch import nn

    from bench.predict import tp_profile
    from emotion_models.models import build_model

    m = build_model("transformer", size="base", device="meta")
    layers = [x for x in m.modules() if isinstance(x, nn.TransformerEncoderLayer)]
    n, d = len(layers), layers[0].norm1.normalized_shape[0]
    prof = tp_profile("transformer", "base", 2)
    assert (prof.rows, prof.cols, prof.gathers, prof.norm_params, prof.norm_elems) == (2 * n, 4 * n, 2 * n + 2, 4 * n,
                                                                                      4 * n * d)
    link = Link(10.0, 5.0, "in", (("all_gather", 1.0, 50.0), ("reduce_scatter", 0.5, 80.0)))
    act = 1e6
    assert prof.comm_s(act, 2, link, False) == pytest.approx(6 * n * t_all_reduce(act, 2, link))
    ag, rs = t_gather(act, 2, link), t_gather(act, 2, link, "reduce_scatter")
    assert (ag, rs) == (pytest.approx(50e-6 + act / 2 / 1e9), pytest.approx(80e-6 + act / 2 / 0.5e9))  # their own fits
    assert prof.comm_s(act, 2, link, True) == pytest.approx(2 * n * (rs + ag) + (2 * n + 2) * ag
                                                            + 4 * n * t_all_reduce(act, 2, link))
    # once per optimiser step, whatever --grad-accum: the layer norms' partial gradients in one flat
    # all-reduce, with SP only
    assert prof.step_s(2, link, True) == pytest.approx(t_all_reduce(4 * n * d * 4, 2, link))
    # fsdp --tp: FSDP2 redistributes each parameter's partial gradient on its own (torch's
    # FSDPParam._get_grad_inner_tensor), one all-reduce each
    assert prof.step_s(2, link, True, flat=False) == pytest.approx(4 * n * t_all_reduce(d * 4, 2, link))
    assert prof.step_s(2, link, False) == 0.0 and prof.gate_gathers == 0
    inp = Inputs("transformer", "base", "fp32", 8, 0.1, 80.0, 10**6, n)
    one, two = (predict(inp, "tp", 2, 1, link, None, grad_accum=k)["step_ms"] for k in (1, 2))
    micro = one - 1000 * prof.step_s(2, link, True)
    assert two == pytest.approx(2 * micro + 1000 * prof.step_s(2, link, True))


def test_tensor_parallel_reads_the_collectives_as_dtensor_issues_them_where_bench_comm_measured_them():
    """bench comm's tp_ fits (the collective through DTensor.redistribute) stand for the raw ones in
    tensor parallel's collectives, and only there: ddp and fsdp's own collectives keep the raw fits.
    The oracle: the fits' alpha and bandwidth by hand, and a prediction made with a link holding the tp_
    figures under the raw names."""
    comm = {"run_id": "c2", "config": {"devices": 2, "device_type": "cpu", "backend": "gloo"},
            "fit": {"all_reduce": {"busbw_GBps": 2.0, "alpha_us": 400.0},
                    "all_gather": {"busbw_GBps": 1.0, "alpha_us": 100.0},
                    "tp_all_reduce": {"busbw_GBps": 1.0, "alpha_us": 800.0},
                    "tp_all_gather": {"busbw_GBps": 0.5, "alpha_us": 300.0}}}
    link = Link.measured(comm)
    tp = link.tensor_parallel(2)
    assert link.tensor_parallel(4) == link  # measured over 2 ranks: DTensor's cost per call does not scale by hops
    assert t_all_reduce(1e6, 2, link) == pytest.approx(400e-6 + 1e6 / 2e9)
    assert t_all_reduce(1e6, 2, tp) == pytest.approx(800e-6 + 1e6 / 1e9)  # 2(n-1) = 2 hops of 400 us
    assert t_gather(1e6, 2, tp) == pytest.approx(300e-6 + 0.5e6 / 0.5e9)
    assert t_gather(1e6, 2, tp, "reduce_scatter") == t_gather(1e6, 2, link, "reduce_scatter")  # none measured: as before
    assert Link(1.0, 5.0, "preset").tensor_parallel(2) == Link(1.0, 5.0, "preset")
    inp = Inputs("transformer", "base", "fp32", 8, 0.1, 80.0, 10**6, 4)
    by_hand = Link(2.0, 200.0, link.source, (("all_reduce", 1.0, 400.0), ("all_gather", 0.5, 300.0)))
    assert predict(inp, "tp", 2, 1, link, None)["step_ms"] == pytest.approx(predict(inp, "tp", 2, 1, by_hand, None)["step_ms"])
    assert predict(inp, "tp", 2, 1, link, None)["step_ms"] > predict(inp, "tp", 2, 1, Link.measured({
        **comm, "fit": {k: v for k, v in comm["fit"].items() if not k.startswith("tp_")}}), None)["step_ms"]
    assert predict(inp, "ddp", 2, 1, link, None)["step_ms"] == pytest.approx(
        100.0 + 1000 * t_all_reduce(4e6, 2, link))  # one 4 MB bucket, the raw fit
    # fsdp --tp at 4 ranks (2 x 2): its shard traffic keeps the raw fits, its tensor-parallel part (degree 2,
    # as measured) reads the tp_ ones: against the raw link alone, only the tensor-parallel terms differ
    from bench.predict import tp_profile

    raw = Link.measured({**comm, "fit": {k: v for k, v in comm["fit"].items() if not k.startswith("tp_")}})
    prof, act = tp_profile("transformer", "base", 2), 2 * 8 * tp_profile("transformer", "base", 2).elems * 4
    tp_terms = (lambda lk: prof.comm_s(act, 2, lk, True) + prof.step_s(2, lk, True, flat=False))
    assert (predict(inp, "fsdp", 4, 1, link, None, tp=2)["step_ms"] - predict(inp, "fsdp", 4, 1, raw, None, tp=2)["step_ms"]
            == pytest.approx(1000 * (tp_terms(by_hand) - tp_terms(raw))))
    assert tp_terms(by_hand) > tp_terms(raw)


def test_each_tensor_parallel_call_pays_bench_comms_meeting_cost_and_w_is_then_left_out():
    """bench comm's meeting cost (a tp_ call after compute beyond back to back) is added to every
    tensor-parallel collective, once a call whatever its size; a negative one reads as none; ddp's
    collectives keep the raw fits; and tp's profiled W (the ranks' skew, which the meeting cost
    holds) is left out where the link has it. The oracle: the calls counted from the profile's rows,
    columns and gathers (counted against torch's layers above), times the meeting costs by hand."""
    import dataclasses

    from bench.comm import meeting
    from bench.predict import tp_profile

    fits = {"all_reduce": {"busbw_GBps": 2.0, "alpha_us": 400.0}, "tp_all_reduce": {"busbw_GBps": 1.0, "alpha_us": 800.0},
            "tp_all_gather": {"busbw_GBps": 0.5, "alpha_us": 300.0},
            "tp_reduce_scatter": {"busbw_GBps": 0.25, "alpha_us": 500.0}}
    raw = {"tp_all_reduce": {"bytes": 2**20, "call_mean_us": 5000.0, "tight_mean_us": 3000.0},
           "tp_all_gather": {"bytes": 2**20, "call_mean_us": 4000.0, "tight_mean_us": 3000.0},
           "tp_reduce_scatter": {"bytes": 2**20, "call_mean_us": 3500.0, "tight_mean_us": 3000.0}}
    meet = meeting(raw, fits, 2)
    assert meet["tp_all_gather"]["fit_us"] == pytest.approx(300.0 + 2**20 / 2 / 0.5e3)  # alpha + S (n-1)/n / B
    assert [meet[k]["meet_us"] for k in raw] == pytest.approx([2000.0, 1000.0, 500.0])
    comm = {"run_id": "c3", "config": {"devices": 2, "device_type": "cpu", "backend": "gloo"}, "fit": fits, "meet": meet}
    link, plain = Link.measured(comm), Link.measured({**comm, "meet": {}})
    assert dict(link.meet) == {"tp_all_reduce": 2000.0, "tp_all_gather": 1000.0, "tp_reduce_scatter": 500.0}
    negative = {**meet, "tp_reduce_scatter": {**meet["tp_reduce_scatter"], "meet_us": -100.0}}
    assert dict(Link.measured({**comm, "meet": negative}).meet)["tp_reduce_scatter"] == 0.0  # noise around none
    tp, tp_plain = link.tensor_parallel(2), plain.tensor_parallel(2)
    assert tp.met and not tp_plain.met and not link.met
    assert t_all_reduce(1e6, 2, tp) == pytest.approx(t_all_reduce(1e6, 2, tp_plain) + 2000e-6)
    assert t_all_reduce(1e3, 2, tp) == pytest.approx(t_all_reduce(1e3, 2, tp_plain) + 2000e-6)  # a call, any size
    assert t_gather(1e6, 2, tp) == pytest.approx(t_gather(1e6, 2, tp_plain) + 1000e-6)
    assert t_gather(1e6, 2, tp, "reduce_scatter") == pytest.approx(t_gather(1e6, 2, tp_plain, "reduce_scatter") + 500e-6)
    # only some tp_ ops timed after compute (bench comm --ops): none added, W kept
    some = Link.measured({**comm, "meet": {k: v for k, v in meet.items() if k == "tp_all_reduce"}})
    assert not some.tensor_parallel(2).met and some.tensor_parallel(2) == tp_plain
    assert link.tensor_parallel(4) == link  # measured over 2 ranks only
    inp = Inputs("transformer", "base", "fp32", 8, 0.1, 80.0, 10**6, 4, wait={"tp": {2: 0.030}, "ddp": {2: 0.010}})
    with_meet, without = predict(inp, "tp", 2, 1, link, None), predict(inp, "tp", 2, 1, plain, None)
    prof = tp_profile("transformer", "base", 2)
    gathers = prof.rows + prof.gathers + prof.gate_gathers  # row-parallel outputs backward, SP's gathers
    all_reduces = prof.cols + 1  # the column-parallel inputs' gradients, the layer norms' one flat a step
    assert (with_meet["wait_ms"], without["wait_ms"]) == (0.0, pytest.approx(30.0))
    assert with_meet["step_ms"] - without["step_ms"] == pytest.approx(gathers * 1.0 + prof.rows * 0.5 + all_reduces * 2.0
                                                                      - 30.0)
    assert predict(inp, "tp", 2, 1, some, None)["wait_ms"] == pytest.approx(30.0)
    assert predict(inp, "ddp", 2, 1, link, None) == predict(inp, "ddp", 2, 1, plain, None)

    assert Link(**json.loads(json.dumps(dataclasses.asdict(link)))) == link  # bench tune's anchors file


def test_a_tp_rank_run_gives_tensor_parallels_compute_in_place_of_the_flop_share():
    """A tp-rank run (one rank's shapes of tp x2 alone, at twice the batch) joins the inputs of half its
    batch, and its step over single's is a tp rank's compute; without one (or for the other sequence
    parallel setting) the FLOP share counts it. The oracle: the two predictions differ by t1 times the
    two shares' difference, the collectives being the same terms in both."""
    import dataclasses

    from bench.predict import tp_compute_share, tp_profile

    def run(strategy, devices, step_ms, batch, **config):
        r = fixture_result(strategy=strategy, devices=devices, step_ms=step_ms, batch=batch, model="transformer",
                           thr=1000 * batch * devices / step_ms)
        r["config"].update(config)
        return r

    runs = [run("single", 1, 100.0, 8), run("tp-rank", 1, 150.0, 16, tp=2, sequence_parallel=True),
            run("tp-rank", 1, 999.0, 16, tp=2, sequence_parallel=True, ac="full"),  # not the plain step
            run("tp", 2, 200.0, 8, sequence_parallel=True)]
    (inp,) = inputs_from(runs)
    assert inp.batch == 8 and inp.tp_rank == {(2, True): pytest.approx(0.15)}
    assert tp_compute_share(inp, 2, True) == (pytest.approx(1.5), "tp-rank run")
    f = tp_profile("transformer", "small", 2).f
    assert tp_compute_share(inp, 2, False) == (pytest.approx(2 * (1 - f) + f), "FLOP share")
    link = Link(10.0, 5.0, "in")
    measured, counted = (predict(i, "tp", 2, 1, link, None)["step_ms"]
                         for i in (inp, dataclasses.replace(inp, tp_rank=None)))
    assert measured - counted == pytest.approx(100.0 * (1.5 - (2 * (1 - f) + f)))
    (row,) = check(runs, link, None)  # the tp-rank runs are inputs, not predictions
    assert (row["strategy"], row["tp_compute"]) == ("tp", "tp-rank run")


def test_wavlm_gates_are_gathered_backward_and_their_linear_reduced_once_a_step():
    """WavLM's gate cuts the layer's input into heads as a DTensor (backward: an all-gather) and its
    linear is a replicated DTensor (a partial gradient each step, summed with the others in one
    all-reduce). The oracle: torchaudio's own
    WavLMSelfAttention modules with the gate on, counted on a fresh model."""
    from torchaudio.models.wav2vec2.wavlm_attention import WavLMSelfAttention

    from bench.predict import tp_profile
    from emotion_models.models import build_model

    m = build_model("wavlm-base", size="base", device="meta")
    gated = [x for x in m.modules() if isinstance(x, WavLMSelfAttention) and x.gru_rel_pos]
    prof = tp_profile("wavlm-base", "base", 2)
    assert gated and prof.gate_gathers == len(gated)
    assert prof.gate_params == sum(len(list(g.gru_rel_pos_linear.parameters())) for g in gated)
    link = Link(10.0, 5.0, "in")
    assert prof.step_s(2, link, False) == pytest.approx(  # one flat all-reduce of them all
        t_all_reduce(4 * sum(p.numel() for g in gated for p in g.gru_rel_pos_linear.parameters()), 2, link), rel=1e-6)
    act = 1e6
    assert prof.comm_s(act, 2, link, False) == pytest.approx(
        (prof.rows + prof.cols) * t_all_reduce(act, 2, link) + len(gated) * t_gather(act, 2, link))


def test_a_measured_link_keeps_each_collectives_own_fit():
    comm = {"run_id": "c", "config": {"devices": 2, "device_type": "cpu", "backend": "gloo"},
            "fit": {"all_reduce": {"alpha_us": 500.0, "busbw_GBps": 2.4}, "all_gather": {"alpha_us": 300.0, "busbw_GBps": 1.0},
                    "reduce_scatter": {"alpha_us": 520.0, "busbw_GBps": 0.6}, "broadcast": {"alpha_us": 90.0, "busbw_GBps": 4.0}}}
    link = Link.measured(comm)
    assert (link.busbw_GBps, link.alpha_us) == (2.4, 250.0)  # the all-reduce's 500 us over its 2 hops
    assert (link.op("all_gather").busbw_GBps, link.op("all_gather").alpha_us) == (1.0, 300.0)
    assert link.op("reduce_scatter").busbw_GBps == 0.6 and link.op("broadcast") is link  # not a predicted op
    assert Link(**{**link.__dict__, "ops": [list(o) for o in link.ops]}) == link  # as read back from JSON
    assert Link.named("nvlink4").op("all_gather") == Link.named("nvlink4")  # a preset: one figure for every op
