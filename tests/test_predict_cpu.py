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


def test_round_errors_predict_each_round_from_its_own_inputs(pc):
    link, results = pc.kept(str(KEPT))
    errors = pc.round_errors(results, link)
    assert set(errors) == {("cnn", "ddp", 2, 1), ("cnn", "ddp", 2, 2), ("cnn", "fsdp", 2, 1),
                           ("cnn", "pipeline", 2, 1), ("transformer", "tp", 2, 1)}
    assert all(len(v) == 3 for v in errors.values())  # 3 rounds kept
    # the third round alone: its own single, tp x1, tp-rank and independent runs and its own tp x2
    third = [r for r in results if r["config"]["seed"] == 2]
    assert len(third) == 12
    alone = {pc._key(c): c for c in pc.check(third, link, None)}
    whole = {pc._key(c): c for c in pc.check(results, link, None)}
    tp = ("transformer", "tp", 2, 1)
    assert errors[tp][2] == pytest.approx(alone[tp]["error"])
    assert alone[tp]["repeats"] == 1 and whole[tp]["repeats"] == 3
    assert errors[tp][2] != pytest.approx(whole[tp]["error"], abs=0.01)  # its own inputs, not the medians
