"""pytest-benchmark micro-benchmarks: feature extraction and one training step per model.

    python -m pytest benchmarks/test_micro.py -n 0 --benchmark-autosave     # record a run
    python -m pytest benchmarks/test_micro.py -n 0 --benchmark-compare --benchmark-compare-fail=median:10%

(-n 0: one process; pytest-benchmark switches itself off under pytest-xdist.)

Not part of the default test run (testpaths = tests): timings are measurements, not tests.
Autosaved runs go to .benchmarks/ (git-ignored); compare on the same machine only.

Each benchmark also checks its result against a reference: the extractor against torchaudio's
MelSpectrogram / MFCC (benchmarked beside it in the same group, so the table shows the ratio),
a training step by the loss it lowers on the batch it trains on.
"""

import pytest
import torch
import torch.nn.functional as F

from emotion_models import FeatureConfig, build_model
from emotion_models.audio import FeatureExtractor
from emotion_models.models import MODELS

from test_audio_quality import torchaudio_reference  # tests/ is on the path (pyproject: pythonpath)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # one core: comparable across runs on a shared machine
    yield


def _waves() -> torch.Tensor:
    return 0.3 * torch.randn(8, 64000, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_feature_extraction(benchmark, kind):
    benchmark.group = f"features-{kind}"
    extract, waves = FeatureExtractor(FeatureConfig(kind=kind)), _waves()
    out = benchmark(extract, waves)
    reference = torch.stack([torchaudio_reference(w, kind) for w in waves])
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_feature_extraction_torchaudio_reference(benchmark, kind):
    """torchaudio's transforms on the same clips: the ratio to the row above is our extractor's speed."""
    benchmark.group = f"features-{kind}"
    waves = _waves()
    benchmark(lambda: torch.stack([torchaudio_reference(w, kind) for w in waves]))


@pytest.mark.parametrize("name", list(MODELS))
def test_train_step(benchmark, name):
    torch.manual_seed(0)
    model = build_model(name, size="small")
    opt = torch.optim.AdamW(model.parameters())
    x, y = model.example_input(16), torch.randint(0, 7, (16,))

    def step():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    first = step()
    benchmark(step)
    for _ in range(5):  # with --benchmark-disable the benchmark ran once
        last = step()
    assert last < first  # every step trained on the same batch: a step that learns has lowered its loss
