"""pytest-benchmark micro-benchmarks: feature extraction and one training step per model.

    python -m pytest benchmarks/test_micro.py --benchmark-autosave            # record a run
    python -m pytest benchmarks/test_micro.py --benchmark-compare --benchmark-compare-fail=median:10%

Not part of the default test run (testpaths = tests): timings are measurements, not tests.
Autosaved runs go to .benchmarks/ (git-ignored); compare on the same machine only.
"""
import pytest
import torch
import torch.nn.functional as F

from emotion_models import FeatureConfig, build_model
from emotion_models.audio import FeatureExtractor
from emotion_models.models import MODELS


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # one core: comparable across runs on a shared machine
    yield


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_feature_extraction(benchmark, kind):
    extract = FeatureExtractor(FeatureConfig(kind=kind))
    waves = torch.randn(8, 64000)
    out = benchmark(extract, waves)
    assert out.shape[0] == 8


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

    loss = benchmark(step)
    assert torch.isfinite(loss)
