"""The model zoo at the scale GPUs are bought for, checked on CPU: published sizes on the meta
device, blocks that partition the parameters, FLOP-balanced stages, a tiny wav2vec 2.0 trained
by every strategy, the memory check before a run, and out-of-memory as a failed result."""
import subprocess
import sys

import pytest
import torch
import torchaudio

from bench.results import load_result
from conftest import ROOT, bench
from emotion_models.models import MODELS, SIZES, build_model

# torchaudio's own builders, counted on the meta device: the 94.4 M / 315 M / 962 M / 2,159 M
PUBLISHED = {"wav2vec2-base": ("wav2vec2_base", 94.4e6), "hubert-large": ("hubert_large", 315e6),
             "wavlm-large": ("wavlm_large", 315e6), "xlsr-1b": ("wav2vec2_xlsr_1b", 962e6),
             "xlsr-2b": ("wav2vec2_xlsr_2b", 2159e6)}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_encoders_have_the_published_size(name):
    builder, millions = PUBLISHED[name]
    with torch.device("meta"):
        reference = _count(getattr(torchaudio.models, builder)())
    model = build_model(name, device="meta")
    head = model.blocks[-1].fc
    assert _count(model) == reference + _count(head)  # the encoder whole, plus a 7-class linear
    assert reference == pytest.approx(millions, rel=5e-3)
    assert head.out_features == 7 and model.feature_kind == "waveform"


@pytest.mark.parametrize("name", list(MODELS))
def test_blocks_partition_every_parameter_once(name):
    for size in SIZES:
        try:
            model = build_model(name, size=size, device="meta")
        except ValueError:
            continue  # the encoders have one published size (and a tiny one)
        owners: dict[int, int] = {}
        for i, block in enumerate(model.blocks):
            for p in block.parameters():
                assert id(p) not in owners, f"{name} {size}: a parameter in blocks {owners[id(p)]} and {i}"
                owners[id(p)] = i
        assert len(owners) == len(list(model.parameters()))


def test_stages_are_balanced_by_flops():
    model = build_model("xlsr-1b", device="meta")
    flops = model.block_flops(1)
    for n in (2, 4, 8):
        bounds = model.stage_boundaries(n)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(model.blocks)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        per_stage = [sum(flops[a:b]) for a, b in bounds]
        # 48 near-equal layers after a heavy conv front end (one block, 16 % of the forward): no stage
        # above 1.25 x the mean, unless it is that one block alone
        assert max(per_stage) <= max(1.25 * sum(per_stage) / n, max(flops)), per_stage


@pytest.mark.slow
def test_tiny_wavlm_passes_its_position_bias_between_pipeline_stages():
    proc = bench("parity", "--model", "wavlm-base", "--model-size", "small", "--gpus", "2", "--steps", "3",
                 "--batch-size", "8", "--strategies", "pipeline:gpipe,fsdp", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_model_that_cannot_fit_is_refused_before_it_allocates(tmp_path):
    proc = bench("run", "--model", "xlsr-2b", "--batch-size", "4096", "--device", "cpu", "--out", tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "does not fit: estimated" in line and "--strategy fsdp" in line
    assert not list(tmp_path.iterdir())  # refused before it started: no result file


def test_out_of_memory_is_a_failed_result_with_the_step(tmp_path):
    proc = bench("run", "--size", "tiny", "--epochs", "1", "--batch-size", "8", "--model-size", "small",
                 "--device", "cpu", "--out", tmp_path, env={"EMOTION_BENCH_FAULT": "oom:0:3"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    r = load_result(proc.stdout.strip().splitlines()[-1])
    assert r["status"] == "failed" and r["error"].startswith("out of memory at step 3, peak "), r["error"]
    assert "GiB of" in r["error"] and "--strategy fsdp" in r["error"]
    from bench.invariants import out_of_memory

    assert all(c.ok for c in out_of_memory(r))  # what gpu_check.py asks of its planted OOM


def test_synthetic_runs_need_neither_soundfile_nor_soxr(tmp_path):
    """The GPU machine has neither: block both imports and run the real CLI on synthetic data."""
    code = ("import sys; sys.modules['soundfile'] = None; sys.modules['soxr'] = None; sys.modules['cffi'] = None; "
            "from bench.cli import main; sys.argv = ['bench'] + sys.argv[1:]; main()")
    proc = subprocess.run([sys.executable, "-c", code, "run", "--size", "tiny", "--epochs", "1", "--batch-size", "16",
                           "--model-size", "small", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert load_result(proc.stdout.strip().splitlines()[-1])["status"] == "ok"


def test_the_activation_count_is_cached_per_model_code(tmp_path, monkeypatch):
    """Fake tensors import torch._dynamo (1.3 s of CPU that a launcher otherwise never pays): a run
    start reads a count made before by the same code; other code (or another torch) counts afresh."""
    import json

    from bench import memory

    monkeypatch.setenv("EMOTION_BENCH_CACHE", str(tmp_path))
    acts = memory.activation_bytes_per_block.__wrapped__  # past the in-process lru_cache, to the file
    first = acts("cnn", "small", 8, "fp32")
    assert list(first) == memory._measure_activation_bytes("cnn", "small", 8, "fp32") and sum(first) > 0
    assert len(first) == 5  # one count per block
    assert sum(acts("cnn", "small", 8, "bf16")) < sum(first)  # autocast saves bf16 activations
    file = tmp_path / "activation_bytes.json"
    assert len(json.loads(file.read_text())) == 2
    monkeypatch.setattr(memory, "_measure_activation_bytes", lambda *a: pytest.fail("counted again"))
    assert acts("cnn", "small", 8, "fp32") == first
    # the key follows the code: another torch (or model code) counts afresh
    import torch

    key = memory._code_key.__wrapped__()
    monkeypatch.setattr(torch, "__version__", "0.0-other")
    assert memory._code_key.__wrapped__() != key
    for i, code in enumerate(("code1", "code2", "code3", "code4", "code5")):
        monkeypatch.setattr(memory, "_code_key", lambda c=code: c)
        monkeypatch.setattr(memory, "_measure_activation_bytes", lambda *a, n=i: [n, 1])
        assert acts("cnn", "small", 8, "fp32") == (i, 1)
    # this code's entries and those of the 3 codes written before it stay; older ones go
    assert sorted(json.loads(file.read_text())) == [f"code{i} saved cnn small 8 fp32" for i in (2, 3, 4, 5)]
    for bad in ("{not json", '{"code5 saved cnn small 8 fp32": [-1]}', '{"code5 saved cnn small 8 fp32": [true]}',
                '{"code5 saved cnn small 8 fp32": 7}', '{"code5 saved cnn small 8 fp32": []}', "[]"):
        file.write_text(bad)  # unreadable, negative, a bool, not a list, empty, not a dict: counted afresh
        monkeypatch.setattr(memory, "_measure_activation_bytes", lambda *a: [456])
        assert acts("cnn", "small", 8, "fp32") == (456,)


def test_bench_list_fits_80_columns_and_names_its_units():
    proc = bench("list", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    assert "…" not in proc.stdout  # nothing cut short: columns wrap instead
    assert "params (M)" in proc.stdout and "forward (GFLOP)" in proc.stdout
    row = next(line for line in lines if line.startswith("│ cnn") and "MiB" in line)
    assert " 0.00 " not in row  # a small model's memory is in MiB, not 0.00 GiB
    one = bench("list", "--gpus", "1", "--model", "transformer")  # an odd count: the 2-D column's T is 1
    assert one.returncode == 0 and "tp x1" in one.stdout, one.stderr


def test_bench_list_shows_tensor_parallel_2d_and_ac_memory_against_arithmetic():
    """The tp and 2-D columns and the --ac columns of `bench list --batch-size 8`, at 80 columns. The
    oracle for xlsr-2b's tp x8 weights: (its parameters - those of the projections tensor parallel
    divides + 1/8 of them) x 16 bytes (fp32 weights, gradients and AdamW's two moments), counted here
    from torchaudio's own layers; full AC holds less than none for a speech encoder."""
    from emotion_models.models import build_model

    proc = bench("list", "--batch-size", "8", "--model", "cnn", "--model", "wavlm-base", "--model", "xlsr-2b",
                 env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in proc.stdout
    meta = build_model("xlsr-2b", device="meta")
    split = sum(p.numel() for m in meta.modules() if hasattr(m, "q_proj") and hasattr(m, "out_proj")
                for lin in (m.q_proj, m.k_proj, m.v_proj) for p in lin.parameters())
    split += sum(m.out_proj.weight.numel() for m in meta.modules() if hasattr(m, "q_proj") and hasattr(m, "out_proj"))
    split += sum(p.numel() for m in meta.modules() if hasattr(m, "intermediate_dense")
                 for p in (*m.intermediate_dense.parameters(), m.output_dense.weight))
    total = sum(p.numel() for p in meta.parameters())
    tp_fp32 = 16 * (total - split + split // 8) / 2**30
    start = next(i for i, line in enumerate(lines) if "tensor parallel: training memory" in line)
    row = next(line for line in lines[start:] if line.startswith("│ xlsr-2b") and "base" in line)
    assert f"{tp_fp32:.2f} /" in row.split("│")[3], (row, tp_fp32)
    next(line for line in lines[start:] if line.startswith("│ cnn"))  # the activations table has cnn's row
    act = next(line for line in lines[lines.index(next(l for l in lines if "with activations" in l)):]
               if line.startswith("│ xlsr-2b") and "base" in line)
    none, sel, full, tp, two_d = (float(c) for c in act.split("│")[3:8])
    assert full < sel < none
    wavlm = next(line for line in lines[start:] if line.startswith("│ wavlm-base") and "base" in line).split("│")
    assert wavlm[3].strip() == "–" and float(wavlm[4].split("/")[0]) > 0  # 12 heads: not over 8, over 2 (2-D)
    cnn = next(line for line in lines[start:] if line.startswith("│ cnn") and "base" in line)
    assert cnn.split("│")[6].strip() == "–"  # no attention to split
