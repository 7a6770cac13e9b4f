"""benchmarks/predict_cpu.py's verdict on the bar, and its per-round predictions, on a kept run committed
under results/predict_cpu/ (the script is a benchmark: nothing here times anything)."""
import importlib.util
import sys

import pytest

from conftest import ROOT

KEPT = ROOT / "results" / "predict_cpu" / "2026-12-04-b21e4eae46-c"


@pytest.fixture(scope="module")
def pc():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports common.py beside it
    try:
        spec = importlib.util.spec_from_file_location("predict_cpu", ROOT / "benchmarks" / "predict_cpu.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_verdict_within_outside_inconclusive(pc):
    assert pc.verdict([0.02, -0.149, 0.15]) == "within"  # the bar itself counts as within
    assert pc.verdict([0.16, -0.30, 0.151]) == "outside"  # both signs, all beyond
    assert pc.verdict([0.10, 0.20, 0.05]) == "inconclusive"
    assert pc.verdict([0.12], bar=0.10) == "outside"
    with pytest.raises(ValueError):
        pc.verdict([])  # no round: nothing to tell


def test_round_errors_predict_each_round_from_its_own_inputs(pc):
    link, results = pc.kept(str(KEPT))
    errors = pc.round_errors(results, link)
    assert set(errors) == {("cnn", "ddp", 2, 1), ("cnn", "ddp", 2, 2), ("cnn", "fsdp", 2, 1),
                           ("cnn", "pipeline", 2, 1), ("transformer", "tp", 2, 1)}
    assert all(len(v) == 3 for v in errors.values())  # 3 rounds kept
    # pinned: each round's error as `--from` printed it when this kept run was committed (the per-round
    # lines of its predict_cpu.txt); the medians' errors are not among them
    assert errors[("transformer", "tp", 2, 1)] == pytest.approx([-0.189, -0.132, 0.027], abs=5e-4)
    assert errors[("cnn", "ddp", 2, 2)] == pytest.approx([0.079, -0.279, -0.044], abs=5e-4)
    whole = {pc._key(c): c["error"] for c in pc.check(results, link, None)}
    assert whole[("transformer", "tp", 2, 1)] == pytest.approx(-0.023, abs=5e-4)
