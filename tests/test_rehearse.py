"""Scale rehearsed on the CPU (issue 20): one rank of 8 or 64 built in this process under torch's
fake process group, on the meta device, through the run's own code (distenv.init_env reading the
torchrun environment, the strategy's wrapping). Its shards and stages are checked against
arithmetic written here: torch.chunk's split of dim 0 (FSDP2's Shard(0)), the pipeline's blocks."""
import math
import re
from types import SimpleNamespace

import pytest
import torch

from bench.config import RunConfig
from bench.rehearse import rehearse, text


def _chunk_rows(rows: int, world: int, rank: int) -> int:
    """Rows of dim 0 that rank holds when torch.chunk splits `rows` into `world` parts."""
    size = math.ceil(rows / world)
    return max(0, min(size, rows - rank * size))


@pytest.mark.parametrize("world,ranks", [(8, [0, 7]), (64, [0, 1, 63])])
def test_fsdp_shards_of_a_rank_of_n_are_torch_chunks_of_dim_0(world, ranks):
    from emotion_models.models import build_model

    model = "cnn" if world == 8 else "wav2vec2-base"
    shapes = [p.shape for p in build_model(model, device="meta").parameters()]
    for rank in ranks:
        r = rehearse(RunConfig(strategy="fsdp", devices=world, model=model, precision="bf16"), rank)
        assert (r.rank, r.world_size, r.local_rank, r.local_world_size, r.node) == (rank, world, rank, world, 0)
        expected = [_chunk_rows(s[0], world, rank) * math.prod(s[1:]) for s in shapes]
        assert sorted(loc for _, loc in r.shards) == sorted(expected)  # FSDP2 may order them by block
        assert r.params_local == sum(expected) and r.params_total == sum(math.prod(s) for s in shapes)
    # the shards of all ranks add up to the model (arithmetic), and rank 0 holds the most
    per_rank = [sum(_chunk_rows(s[0], world, k) * math.prod(s[1:]) for s in shapes) for k in range(world)]
    assert sum(per_rank) == sum(math.prod(s) for s in shapes) and max(per_rank) == per_rank[0]


def test_two_nodes_of_eight_ddp_ranks_know_where_they_are():
    for rank, node, local in ((0, 0, 0), (7, 0, 7), (8, 1, 0), (13, 1, 5), (15, 1, 7)):
        cfg = RunConfig(strategy="ddp", devices=16, nodes=2, rdzv_endpoint="node0:29400", model="wav2vec2-base")
        r = rehearse(cfg, rank, "cuda")
        assert (r.rank, r.world_size, r.node, r.local_rank, r.local_world_size) == (rank, 16, node, local, 8)
        assert r.device == f"cuda:{local}" and r.params_local == r.params_total  # every replica whole


def test_pipeline_ranks_hold_their_own_stage_and_64_stages_are_refused():
    from bench.config import ConfigError
    from bench.strategies import check_strategy
    from emotion_models.models import build_model

    meta = build_model("wav2vec2-base", device="meta")
    bounds = meta.stage_boundaries(8)
    per_block = [sum(p.numel() for p in b.parameters()) for b in meta.blocks]
    held = []
    for rank in (0, 3, 7):
        r = rehearse(RunConfig(strategy="pipeline", devices=8, model="wav2vec2-base", batch_size=4), rank)
        assert r.stage_blocks == bounds[rank]
        assert r.params_local == sum(per_block[bounds[rank][0]:bounds[rank][1]])
        held.append(r.params_local)
    assert [b for b, _ in bounds] == [0] + [e for _, e in bounds[:-1]] and bounds[-1][1] == len(per_block)
    with pytest.raises(ConfigError, match="at most 15 stages"):
        check_strategy(RunConfig(strategy="pipeline", devices=64, model="wav2vec2-base"), "cpu")


@pytest.mark.parametrize("world", [8, 64])
def test_each_rank_trains_its_own_disjoint_slice_of_the_global_batch(world):
    """plan_batches as rank r of N: a local batch of global / N, the N slices of a step disjoint."""
    from bench.distenv import DistEnv
    from bench.train import plan_batches

    n = 4096
    data = SimpleNamespace(subset=lambda split, device: (torch.zeros(n, 1, 10), torch.zeros(n, dtype=torch.long)),
                           feature_cfg=SimpleNamespace(crop_frames=8))
    cfg = RunConfig(strategy="ddp", devices=world, batch_size=4, epochs=1)
    first_steps = []
    for rank in range(world):
        env = DistEnv(rank, world, rank % 8, 8, torch.device("cpu"), "fake")
        b = plan_batches(cfg, env, SimpleNamespace(shard_batch=True, data_slice=None), data)
        order, _ = b.epoch(0)
        assert b.local_batch == 4 and order.shape[1] == 4
        first_steps.append(set(order[0].tolist()))
    assert len(set().union(*first_steps)) == 4 * world  # disjoint: one global batch of 4 x N samples
    # --tp 2: the two ranks of a tensor-parallel group (neighbours) train on the same slice of N / 2
    cfg = RunConfig(strategy="fsdp", tp=2, devices=world, batch_size=4, epochs=1)
    slices = []
    for rank in range(world):
        env = DistEnv(rank, world, rank % 8, 8, torch.device("cpu"), "fake")
        b = plan_batches(cfg, env, SimpleNamespace(shard_batch=True, data_slice=(rank // 2, world // 2)), data)
        slices.append(b.epoch(0)[0][0].tolist())
        assert b.local_batch == 8
    assert all(slices[r] == slices[r + 1] for r in range(0, world, 2))
    assert len(set().union(*map(set, slices))) == 4 * world


def test_the_dry_run_of_64_gpus_states_what_rank_0_holds_from_its_shards(capsys):
    from conftest import invoke

    code, out = invoke(["run", "--dry-run", "--strategy", "fsdp", "--gpus", "64", "--model", "xlsr-2b",
                        "--precision", "bf16", "--batch-size", "8", "--device", "cuda"], capsys)
    text = " ".join(out.split())
    if not torch.cuda.is_available():
        assert "no CUDA on this machine: planned for CUDA GPUs" in text
    assert code == 0, out
    assert "rehearsed as rank 0 of 64 (node 0, local rank 0, cuda:0)" in text
    assert "33.7 M of 2,159.3 M parameters" in text and "0.50 GiB from its shards, 0.50 GiB by the estimate" in text
    assert not torch.distributed.is_initialized()  # the rehearsal's group is gone


def test_an_interleaved_pipeline_rank_holds_its_looped_stages():
    """--schedule interleaved-1f1b --stages-per-rank 2 on 4 ranks: 8 stages, rank r holding stages r
    and r + 4 (torch's looped placement), each its blocks of the model's 8-way cut."""
    from emotion_models.models import build_model

    meta = build_model("wav2vec2-base", device="meta")
    bounds = meta.stage_boundaries(8)
    per_block = [sum(p.numel() for p in b.parameters()) for b in meta.blocks]
    cfg = RunConfig(strategy="pipeline", devices=4, model="wav2vec2-base", batch_size=4, schedule="interleaved-1f1b",
                    stages_per_rank=2)
    r = rehearse(cfg, 1)
    assert r.stages == ((1, bounds[1]), (5, bounds[5]))
    assert r.params_local == sum(per_block[bounds[1][0]:bounds[1][1]]) + sum(per_block[bounds[5][0]:bounds[5][1]])
    assert "(stage 1: block 1, stage 5: block 5)" in text(cfg, r)  # these two stages hold one block each


def test_a_rank_of_a_64_gpu_2d_mesh_holds_its_tensor_parallel_shard_of_its_fsdp_chunk():
    """--gpus 64 --tp 8 on xlsr-2b: rank r is tensor-parallel rank r % 8 of data-parallel rank r // 8.
    The oracle, from torchaudio's own layers of a model built here: q, k, v and the first feed-forward
    projection split by output rows over the 8 tensor-parallel ranks, the attention output and the
    second projection by input columns (their biases whole); FSDP2 then chunks dim 0 of what is left
    over the 8 data-parallel ranks (torch.chunk), every other parameter too."""
    from emotion_models.models import build_model

    meta = build_model("xlsr-2b", device="meta")
    col, row = set(), set()
    for m in meta.modules():
        if hasattr(m, "q_proj") and hasattr(m, "out_proj"):
            col |= {id(p) for lin in (m.q_proj, m.k_proj, m.v_proj) for p in lin.parameters()}
            row.add(id(m.out_proj.weight))
        if hasattr(m, "intermediate_dense"):
            col |= {id(p) for p in m.intermediate_dense.parameters()}
            row.add(id(m.output_dense.weight))
    for rank in (0, 13, 63):
        r = rehearse(RunConfig(devices=64, tp=8, model="xlsr-2b", precision="bf16"), rank)
        dp = rank // 8
        expected = []
        for p in meta.parameters():
            shape = list(p.shape)
            if id(p) in col:
                shape[0] //= 8
            elif id(p) in row:
                shape[1] //= 8
            expected.append(_chunk_rows(shape[0], 8, dp) * math.prod(shape[1:]))
        assert sorted(loc for _, loc in r.shards) == sorted(expected)
        assert r.params_total == sum(p.numel() for p in meta.parameters())


def test_the_dry_run_of_64_gpus_with_tp_8_states_the_real_shards(capsys):
    """The issue's command: `bench run --dry-run --gpus 64 --tp 8 --model xlsr-2b` is fsdp over 8 x
    tensor parallel over 8, and states rank 0's memory from the shards it holds on the fake group."""
    from conftest import invoke

    code, out = invoke(["run", "--dry-run", "--gpus", "64", "--tp", "8", "--model", "xlsr-2b", "--device", "cuda"],
                       capsys)
    text = " ".join(out.split())
    assert code == 0, out
    assert "-fsdp-xlsr-2b-" in text and "-tp8" in text  # the run id names the 2-D cell
    assert "rehearsed as rank 0 of 64" in text and "37.6 M of 2,159.3 M parameters" in text
    held = re.search(r"AdamW ([\d.]+) GiB from its shards, ([\d.]+) GiB by the estimate", text)
    assert held and held[1] == held[2], text
