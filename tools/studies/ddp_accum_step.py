"""Where DDP's --grad-accum K step saves time on 2 CPU workers: two gloo processes of 1 thread each, the
base cnn at batch 32 a micro-step, plain PyTorch (no harness), four kinds of step taking turns in a
rotation that changes its first kind every round:

    ddp       a DDP step, one micro-step (its backward all-reduces the gradients)
    ddp_ga    a DDP step of K micro-steps, no_sync on all but the last
    indep     the unwrapped model, one micro-step (independent's step: no communication)
    indep_ga  the unwrapped model, K micro-steps

Both ranks start each step together (a barrier outside the timing); a step's time is the slower
rank's. Prints each kind's median forward+backward and optimiser time, and, from the medians over
rounds of ratios within a round: ddp_ga / ddp, indep_ga / indep, and the no-sync micro-step
(ddp_ga - ddp) / (K - 1) over indep. bench predict gives ddp --grad-accum K K micro-steps of the
independent step (times r_K) plus the all-reduce; this says which of its terms the measured runs do
not follow.

    python tools/studies/ddp_accum_step.py [--k 2] [--rounds 10] [--model cnn]

Under a minute on 2 cores at 10 rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

KINDS = ("ddp", "ddp_ga", "indep", "indep_ga")


def _rank(rank: int, init: str, out: str, k: int, rounds: int, model: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from emotion_models.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    torch.manual_seed(0)
    plain = build_model(model, size="base")
    wrapped = DDP(plain)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    torch.manual_seed(1 + rank)
    x, y = plain.example_input(32 * k, "cpu"), torch.randint(0, 7, (32 * k,))
    nets = {"ddp": (wrapped, 1), "ddp_ga": (wrapped, k), "indep": (plain, 1), "indep_ga": (plain, k)}

    def step(kind: str) -> tuple[float, float]:
        net, n = nets[kind]
        dist.barrier()
        t0 = time.perf_counter()
        for i, (xi, yi) in enumerate(zip(x[: 32 * n].chunk(n), y[: 32 * n].chunk(n))):
            quiet = wrapped.no_sync() if net is wrapped and i < n - 1 else contextlib.nullcontext()
            with quiet:
                (torch.nn.functional.cross_entropy(net(xi), yi) / n).backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t1

    for _ in range(2):  # warm-up
        for kind in KINDS:
            step(kind)
    got = {kind: [] for kind in KINDS}
    for r in range(rounds):  # a rotation: each kind comes first, second, ... in turn
        for kind in KINDS[r % 4:] + KINDS[:r % 4]:
            got[kind].append(step(kind))
    every = [None, None]
    dist.all_gather_object(every, got)
    if rank == 0:
        Path(out).write_text(json.dumps(every))
    from bench.control import leave_group

    leave_group()  # barrier, destroy_process_group, exit without interpreter finalisation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--model", default="cnn")
    args = ap.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        mp.spawn(_rank, args=(str(Path(tmp) / "init"), str(out), args.k, args.rounds, args.model), nprocs=2)
        ranks = json.loads(out.read_text())
    # the slower rank's time, per step and part (forward+backward, optimiser)
    slow = {kind: [tuple(max(a, b) for a, b in zip(s0, s1)) for s0, s1 in zip(ranks[0][kind], ranks[1][kind])]
            for kind in KINDS}
    whole = {kind: [sum(s) for s in v] for kind, v in slow.items()}
    print(f"{args.model}, batch 32 a micro-step, --grad-accum {args.k}, 2 gloo processes of 1 thread, "
          f"{args.rounds} rounds (ms, medians; a step is the slower rank's)")
    for kind in KINDS:
        fb, o = (statistics.median(s[i] for s in slow[kind]) * 1000 for i in (0, 1))
        print(f"  {kind:9} forward+backward {fb:7.1f}, optimiser {o:5.1f}, step {statistics.median(whole[kind]) * 1000:7.1f}")
    ratio = lambda f: statistics.median(f(*(whole[kd][r] for kd in KINDS)) for r in range(args.rounds))  # noqa: E731
    k = args.k
    print(f"ddp_ga / ddp:     {ratio(lambda d, dg, i, ig: dg / d):.3f} (K = {k})")
    print(f"indep_ga / indep: {ratio(lambda d, dg, i, ig: ig / i):.3f}")
    print(f"ddp / indep:      {ratio(lambda d, dg, i, ig: d / i):.3f}")
    print(f"no-sync micro-step (ddp_ga - ddp) / (K - 1) over indep: {ratio(lambda d, dg, i, ig: (dg - d) / (k - 1) / i):.3f}")
    print(f"ddp_ga over bench predict's K indep + (ddp - indep), r_K = 1: "
          f"{ratio(lambda d, dg, i, ig: dg / (k * i + d - i)):.3f}")


if __name__ == "__main__":
    main()
