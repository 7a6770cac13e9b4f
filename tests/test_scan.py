import csv

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")  # the GPU machine has none (python -m pytest -m gpu)

from conftest import bench, write_wav
from emotion_models.scan import scan_folder


def make_corpus(root):
    """A small Kaggle-style merge with every corpus, awkward formats and bad files."""
    e = root / "Emotions"
    good = []
    for actor in range(1, 7):  # RAVDESS, 48 kHz 16-bit; actors are speakers
        for code in ("01", "03", "04", "05"):
            folder = {"01": "Neutral", "03": "Happy", "04": "Sad", "05": "Angry"}[code]
            good.append(write_wav(e / folder / f"03-01-{code}-01-01-01-{actor:02d}.wav", 0.5, 48000))
    write_wav(e / "Neutral" / "03-01-02-01-01-01-01.wav", 0.5, 48000)  # calm: skipped and counted
    for actor in (1001, 1002, 1003, 1004):  # CREMA-D, 16 kHz
        for emo, folder in (("ANG", "Angry"), ("DIS", "Disgusted"), ("FEA", "Fearful")):
            good.append(write_wav(e / folder / f"{actor}_DFA_{emo}_XX.wav", 0.4, 16000))
    for who in ("OAF", "YAF"):  # TESS, 24,414 Hz, stereo float to exercise decoding
        good.append(write_wav(e / "Suprised" / f"{who}_back_ps.wav", 0.3, 24414, channels=2, subtype="FLOAT"))
        good.append(write_wav(e / "Sad" / f"{who}_back_sad.wav", 0.3, 24414, subtype="PCM_24"))
    good.append(write_wav(e / "Angry" / "sa01.wav", 0.3, 44100, subtype="PCM_32"))  # SAVEE: sad in Angry/
    good.append(write_wav(e / "Angry" / "a01.wav", 0.3, 44100, subtype="PCM_U8"))
    good.append(write_wav(e / "Happy" / "blip.wav", 0.02, 16000))  # 20 ms: flagged, kept
    (e / "Happy" / "empty.wav").write_bytes(b"")
    (e / "Happy" / "notes.wav").write_text("this is not audio")
    (e / "readme.txt").write_text("hello")
    return good


def test_scan_reports_everything(tmp_path):
    good = make_corpus(tmp_path)
    report = scan_folder(tmp_path, seed=0)
    assert len(report.rows) == len(good)
    reasons = dict(report.skipped)
    assert "empty" in reasons["Emotions/Happy/empty.wav"]
    assert "header" in reasons["Emotions/Happy/notes.wav"]
    assert "calm" in reasons["Emotions/Neutral/03-01-02-01-01-01-01.wav"]
    assert "not an audio" in reasons["Emotions/readme.txt"]
    assert [p for p, _ in report.flagged] == ["Emotions/Happy/blip.wav"]
    by_path = {r.path: r for r in report.rows}
    assert by_path["Emotions/Angry/sa01.wav"].label == "sad"
    assert by_path["Emotions/Angry/sa01.wav"].speaker == "savee:angry"
    assert by_path["Emotions/Suprised/OAF_back_ps.wav"].label == "surprised"
    assert report.disagreements[("savee", "angry", "sad")] == 1
    # speaker-disjoint
    where = {}
    for r in report.rows:
        if r.speaker:
            assert where.setdefault(r.speaker, r.split) == r.split


def test_scan_cli_writes_manifest(tmp_path):
    make_corpus(tmp_path / "data")
    out = tmp_path / "manifest.csv"
    proc = bench("data", "scan", tmp_path / "data", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "skipped: 4 files" in proc.stdout
    assert "notes.wav" in proc.stdout and "folder says angry, file name says sad: 1" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "corpus", "speaker", "split"]
    assert all("/" in r["path"] and not r["path"].startswith("/") for r in rows)
    assert {r["split"] for r in rows} <= {"train", "val", "test"}


def test_scan_missing_path_is_one_clear_line(tmp_path):
    proc = bench("data", "scan", tmp_path / "nope")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().startswith("error:") and "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_scan_folder_without_audio(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    proc = bench("data", "scan", tmp_path)
    assert proc.returncode != 0 and "no audio files" in proc.stderr and "Traceback" not in proc.stderr


def test_original_corpus_layouts(tmp_path):
    write_wav(tmp_path / "AudioData" / "DC" / "a01.wav", 0.2)
    write_wav(tmp_path / "SAVEE" / "JE_su03.wav", 0.2)
    write_wav(tmp_path / "TESS" / "YAF_disgust" / "YAF_bar_disgust.wav", 0.2)
    write_wav(tmp_path / "Actor_05" / "03-02-06-01-02-01-05.wav", 0.2)
    rows = {r.path: r for r in scan_folder(tmp_path).rows}
    assert rows["AudioData/DC/a01.wav"].speaker == "savee:DC"
    assert rows["SAVEE/JE_su03.wav"].label == "surprised"
    assert rows["TESS/YAF_disgust/YAF_bar_disgust.wav"].label == "disgusted"
    assert rows["Actor_05/03-02-06-01-02-01-05.wav"].label == "fearful"


def test_decoding_formats(tmp_path):
    from emotion_models.audio import FeatureConfig, prepare_waveform, read_audio

    cfg = FeatureConfig()
    for i, (sr, ch, sub) in enumerate([(8000, 1, "PCM_U8"), (22050, 2, "PCM_24"), (44100, 1, "PCM_32"),
                                       (48000, 2, "FLOAT"), (24414, 1, "PCM_16")]):
        p = write_wav(tmp_path / f"{i}.wav", 0.5, sr, ch, sub)
        wave, got_sr = read_audio(str(p))
        assert got_sr == sr and wave.ndim == 1 and abs(len(wave) - sr // 2) <= 1
        x, (start, end) = prepare_waveform(wave, sr, cfg)
        assert (start, end) == (int((x != 0).nonzero()[0]), int((x != 0).nonzero()[-1]) + 1)
        assert x.shape == (64000,) and abs(float(x.abs().max()) - 1.0) < 1e-3  # peak-normalised
        assert int((x != 0).sum()) in range(7900, 8100)  # 0.5 s at 16 kHz, centred in 4 s


def test_truncated_body_is_skipped_at_cache_build(tmp_path):
    from emotion_models.dataset import load_folder

    root = tmp_path / "Emotions"
    for actor in range(1, 11):
        write_wav(root / "Angry" / f"03-01-05-01-01-01-{actor:02d}.wav", 0.5)
        write_wav(root / "Sad" / f"03-01-04-01-01-01-{actor:02d}.wav", 0.5)
    bad = root / "Sad" / "03-01-04-01-01-01-03.wav"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # header still claims the full length
    silent = root / "Angry" / "03-01-05-01-01-01-04.wav"
    sf.write(silent, np.zeros(8000), 16000)
    ds = load_folder(tmp_path, cache_dir=tmp_path / "cache")
    assert len(ds.paths) == 19
    skipped = dict(ds.skipped)
    assert "truncated" in skipped["Emotions/Sad/03-01-04-01-01-01-03.wav"]
    assert "silent" in dict(ds.flagged)["Emotions/Angry/03-01-05-01-01-01-04.wav"]
    assert ds.features.shape == (19, 64, 401)
