import numpy as np

from conftest import bench
from emotion_models.labels import CLASSES
from emotion_models.scan import scan_folder
from emotion_models.synthetic import FULL_COUNTS, class_counts, render, synthetic_clips


def test_full_size_matches_real_balance():
    counts = class_counts("full")
    assert counts == FULL_COUNTS and sum(counts.values()) == 12798


def test_smaller_sizes_keep_proportions():
    small = class_counts("small")
    for c in CLASSES:
        assert abs(small[c] / sum(small.values()) - FULL_COUNTS[c] / 12798) < 0.005


def test_deterministic_and_seed_dependent():
    a = synthetic_clips("tiny", 0)
    b = synthetic_clips("tiny", 0)
    assert [c.label for c in a] == [c.label for c in b]
    assert np.array_equal(render(a[5]), render(b[5]))
    assert not np.array_equal(render(a[5]), render(synthetic_clips("tiny", 1)[5]))


def test_clips_vary_in_length_and_are_normalised():
    clips = synthetic_clips("tiny", 0)[:20]
    lengths = {len(render(c)) for c in clips}
    assert len(lengths) > 10 and min(lengths) >= 1.6 * 16000 and max(lengths) <= 3.6 * 16000
    y = render(clips[0])
    assert y.dtype == np.float32 and 0.5 < np.abs(y).max() <= 1.0


def test_emotions_differ_in_pitch():
    """Fearful is rendered higher than sad for the same speaker (the table's F0 shifts)."""
    import torch

    clips = synthetic_clips("small", 0)
    spk = clips[0].speaker

    def centroid(label):
        ys = [render(c) for c in clips if c.label == label and c.speaker == spk][:5]
        spec = [torch.stft(torch.from_numpy(y), 1024, return_complex=True, window=torch.hann_window(1024)).abs().mean(1) for y in ys]
        s = torch.stack(spec).mean(0)
        return float((s[:40] * torch.arange(40)).sum() / s[:40].sum())

    assert centroid("fearful") > centroid("sad")


def test_synth_writes_kaggle_layout_that_scan_reads(tmp_path):
    proc = bench("data", "synth", "--out", tmp_path, "--size", "tiny")
    assert proc.returncode == 0, proc.stderr
    folders = sorted(p.name for p in (tmp_path / "Emotions").iterdir())
    assert folders == ["Angry", "Disgusted", "Fearful", "Happy", "Neutral", "Sad", "Suprised"]
    report = scan_folder(tmp_path)
    assert len(report.rows) == len(synthetic_clips("tiny", 0)) and not report.skipped
    assert all(r.corpus == "synthetic" and r.speaker.startswith("synthetic:S") for r in report.rows)
    assert sum(report.disagreements.values()) == 0
