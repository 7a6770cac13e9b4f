"""Tensor parallel's gradients against single's, parameter by parameter (run by tests/test_strategies.py).

    python tests/helpers/tp_grads.py MODEL

Two gloo processes shard MODEL (--model-size small, dropout 0) with bench.strategies.tp.parallelize,
with sequence parallel off and on; each runs one forward and backward on the batch a single model
also sees here, reduces the partial gradients as the tp plan does (each then laid out as its
parameter, and an AdamW step under the profiler all-reduces nothing more), gathers its gradients
whole (DTensor's full_tensor, packed back into the model's own keys) and rank 0 prints one line per
parameter whose gradient differs from single's by more than 3e-5 of its largest element (by more
than 1e-5 of the model's largest, for gradients that are zero by the mathematics), then 'done'. The bench parity runs compare losses and parameters after
a few AdamW steps, whose first step normalises a gradient's scale away; this compares the gradients
themselves.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _model_and_batch(model: str):
    from emotion_models.models import build_model

    torch.manual_seed(0)
    m = build_model(model, size="small", dropout=0.0)
    torch.manual_seed(1)
    return m, m.example_input(4), torch.randint(0, 7, (4,))


def work(rank: int, model: str, port: int, sequence: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from bench.strategies.tp import merge_state, parallelize, reduce_partial_grads

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ref, x, y = _model_and_batch(model)
    F.cross_entropy(ref(x), y).backward()
    m, _, _ = _model_and_batch(model)
    parallelize(m, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)), sequence)
    F.cross_entropy(m(x), y).backward()
    reduce_partial_grads(list(m.parameters()))  # what the tp plan does before every optimiser step
    tag = "sp" if sequence else "nosp"
    for name, p in m.named_parameters():  # each gradient now laid out as its parameter
        if rank == 0 and hasattr(p, "placements") and p.grad is not None \
                and tuple(p.grad.placements) != tuple(p.placements):
            print(f"{tag} {name} placements {p.grad.placements} for {p.placements}", flush=True)
    opt = torch.optim.AdamW(m.parameters())  # reads the gradients as they are: no collective left for it
    with torch.profiler.profile() as prof:
        opt.step()
    left = sum(e.name == "gloo:all_reduce" for e in prof.events())
    if rank == 0 and left:
        print(f"{tag} the optimiser step all-reduced {left} times", flush=True)
    got = merge_state({n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                       for n, p in m.named_parameters()})
    if rank == 0:
        # relative to the parameter's largest gradient element; a gradient zero by the mathematics (k's
        # bias under softmax, a bias just before BatchNorm) holds float32 rounding of sums that cancel,
        # which no two layouts share: held to 1e-5 of the model's largest gradient instead. The errors
        # this is for are 4e-4 of a parameter's own gradient and more
        scale = max(p.grad.abs().max().item() for p in ref.parameters())
        for name, p in ref.named_parameters():
            diff, own = (got[name] - p.grad).abs().max().item(), p.grad.abs().max().item()
            bad = diff > 1e-5 * scale if own < 1e-4 * scale else diff > 3e-5 * own
            if bad:
                print(f"{tag} {name} {diff / max(own, 1e-30):.3g}", flush=True)
    from bench.control import leave_group

    leave_group()  # barrier, destroy_process_group, exit without interpreter finalisation


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    torch.set_num_threads(1)
    for seq in (False, True):
        mp.spawn(work, args=(sys.argv[1], _free_port(), seq), nprocs=2)
    print("done")
