import pytest
import torch

from emotion_models import FeatureConfig, build_model, load_synthetic
from emotion_models.audio import FeatureExtractor, crop_frames
from emotion_models.models import MODELS


def test_feature_shapes():
    wave = torch.randn(2, 48000)
    assert FeatureExtractor(FeatureConfig(crop_seconds=3.0, cache_seconds=3.0))(wave).shape == (2, 64, 301)
    assert FeatureExtractor(FeatureConfig(kind="mfcc", cache_seconds=3.0))(wave).shape == (2, 40, 301)
    feats = torch.randn(3, 64, 401)
    out = crop_frames(feats, torch.tensor([0, 50, 100]), 301)
    assert out.shape == (3, 64, 301) and torch.equal(out[1], feats[1, :, 50:351])


def test_synthetic_cache_is_built_once_and_reused(tmp_path):
    calls = []

    def progress(total, desc):
        calls.append(total)
        return lambda n: None

    a = load_synthetic("tiny", cache_dir=tmp_path, progress=progress)
    b = load_synthetic("tiny", cache_dir=tmp_path, progress=progress)
    assert calls == [len(a.paths)]  # second load hits the cache
    assert torch.equal(a.features, b.features) and a.features.shape[1:] == (64, 401)
    assert a.key == b.key and len(list(tmp_path.glob("features-*.npy"))) == 1
    mfcc = load_synthetic("tiny", cache_dir=tmp_path, feature_cfg=FeatureConfig(kind="mfcc"))
    assert mfcc.key != a.key and mfcc.features.shape[1] == 40
    # splits are speaker-disjoint
    spk = {}
    for s, sp in zip(a.speakers, a.split.tolist()):
        assert spk.setdefault(s, sp) == sp


def _params(name, size):
    return sum(p.numel() for p in build_model(name, size=size, device="meta").parameters())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("size", ["small", "base"])
def test_forward_backward(name, size):
    if _params(name, size) > 30e6:
        pytest.skip("full-size speech encoders are checked on the meta device (tests/test_zoo.py)")
    torch.manual_seed(0)
    m = build_model(name, size=size)
    x = m.example_input(4)
    out = m(x)
    assert out.shape == (4, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_stages_in_sequence_equal_the_model(name):
    torch.manual_seed(0)
    m = build_model(name, size="small").eval()
    x = m.example_input(3)
    whole = m(x)
    for n in sorted({1, 2, 3, len(m.blocks)}):
        y = x
        stages = m.stages(n)
        assert len(stages) == n and sum(len(s) for s in stages) == len(m.blocks)
        for s in stages:
            y = s(y)
        torch.testing.assert_close(y, whole)
    with pytest.raises(ValueError, match="at most"):
        m.stages(len(m.blocks) + 1)


def test_stages_are_balanced_by_cost():
    m = build_model("cnn")
    bounds = m.stage_boundaries(2)
    costs = m.block_flops()
    parts = [sum(costs[a:b]) for a, b in bounds]
    assert max(parts) / sum(parts) < 0.75  # the cheapest split, not 1 + 4 blocks


@pytest.mark.parametrize("model", ["lstm", "crnn"])
def test_recurrent_flops_are_the_textbook_count_once(model):
    """A bidirectional LSTM/GRU layer of hidden size h over t steps of width d, batch b: per
    sample, direction and step, gates x 2 h (d + h) FLOPs (a multiply-add counts 2). Counted once (torch's meta LSTM unrolls the
    steps, and a flop counter around it used to count them on top of the formula: 2x)."""
    from torch import nn

    m = build_model(model, size="small").eval()  # on the CPU: its blocks give each next input's shape
    x = m.example_input(2)
    costs = m.block_flops(2)
    checked = 0
    for block, cost in zip(m.blocks, costs):
        with torch.no_grad():
            y = block(x)
        rnns = [r for r in block.modules() if isinstance(r, nn.RNNBase)]
        if rnns:
            (r,) = rnns
            gates = 4 if isinstance(r, nn.LSTM) else 3
            t = x.shape[1]
            assert cost == 2 * 2 * t * gates * 2 * r.hidden_size * (r.input_size + r.hidden_size), (model, cost)
            checked += 1
        x = y
    assert checked >= 1
