"""Audio front end against independent references: the resampler against signals synthesised
analytically at 16 kHz, the features against torchaudio's own transforms.

    python -m pytest tests/test_audio_quality.py -s     # prints the resampling SNR table (dB)
"""
import numpy as np
import pytest
import torch
import torchaudio

from emotion_models.audio import FeatureConfig, FeatureExtractor, prepare_waveform, resample

NATIVE_RATES = {"RAVDESS": 48000, "CREMA-D": 16000, "TESS": 24414, "SAVEE": 44100}
BAND_HZ = 7000  # content below the 16 kHz target's anti-aliasing transition band (8 kHz Nyquist)
MIN_SNR_DB = 70.0  # 16-bit audio, the corpora's format, has about 96 dB of dynamic range


def sweep(sr: int, seconds: float = 2.0) -> np.ndarray:
    """Linear sine sweep 50 Hz -> 7 kHz, evaluated exactly at any sample rate."""
    t = np.arange(int(seconds * sr)) / sr
    k = (BAND_HZ - 50) / seconds
    return np.sin(2 * np.pi * (50 * t + 0.5 * k * t * t))


def speech_like(sr: int, seconds: float = 2.0) -> np.ndarray:
    """Voiced speech: harmonics of an F0 wobbling 120 Hz +- 10 % at 3 Hz under two formant peaks,
    every harmonic below 7 kHz; evaluated exactly at any sample rate."""
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * (120 * t - 120 * 0.1 / (2 * np.pi * 3) * np.cos(2 * np.pi * 3 * t))
    x = np.zeros_like(t)
    for h in range(1, int(BAND_HZ / 132) + 1):
        f = h * 120
        x += (1 + 3 * np.exp(-((f - 700) / 200) ** 2) + 2 * np.exp(-((f - 1200) / 250) ** 2)) / h * np.sin(h * phase)
    return x


def snr_db(native: np.ndarray, sr: int, reference: np.ndarray) -> float:
    """SNR of native resampled to 16 kHz against the reference, 50 ms from either edge."""
    y = resample(native.astype(np.float32), sr, 16000).astype(np.float64)
    n, edge = min(len(y), len(reference)), 800
    ref, err = reference[edge : n - edge], y[edge : n - edge] - reference[edge : n - edge]
    return float(10 * np.log10(np.sum(ref**2) / np.sum(err**2)))


@pytest.mark.parametrize("signal", [sweep, speech_like], ids=["sweep", "speech"])
@pytest.mark.parametrize("corpus", list(NATIVE_RATES))
def test_resampling_snr(corpus, signal):
    sr = NATIVE_RATES[corpus]
    snr = snr_db(signal(sr), sr, signal(16000))
    print(f"{corpus} {sr} Hz -> 16 kHz, {signal.__name__}: SNR {snr:.1f} dB")
    assert snr >= MIN_SNR_DB


def test_resampling_keeps_length_and_level():
    x = speech_like(24414, 2.0).astype(np.float32)
    y = resample(x, 24414, 16000)
    assert abs(len(y) - 32000) <= 1
    assert np.sqrt(np.mean(y**2)) == pytest.approx(np.sqrt(np.mean(x**2)), rel=1e-3)


def torchaudio_reference(wave: torch.Tensor, kind: str) -> torch.Tensor:
    """torchaudio's own transforms with the front end's settings (also the reference of benchmarks/test_micro.py)."""
    mel = dict(n_fft=512, win_length=400, hop_length=160, f_min=20.0, f_max=8000.0, n_mels=64)
    if kind == "logmel":
        feats = torch.log(torchaudio.transforms.MelSpectrogram(16000, **mel)(wave) + 1e-6)
    else:
        feats = torchaudio.transforms.MFCC(16000, n_mfcc=40, log_mels=True, melkwargs=mel)(wave)
    return (feats - feats.mean()) / (feats.std() + 1e-5)


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
@pytest.mark.parametrize("span", [(0, 64000), (12000, 52000), (150, 63850), (31000, 33000)],
                         ids=["full", "padded", "near-edges", "short"])
def test_features_equal_torchaudio(kind, span):
    """The extractor transforms only the frames that touch the clip; the result must still be
    torchaudio's MelSpectrogram / MFCC of the whole window, normalised per utterance."""
    g = torch.Generator().manual_seed(0)
    wave = torch.zeros(64000)
    wave[span[0] : span[1]] = 0.3 * torch.randn(span[1] - span[0], generator=g)
    ours = FeatureExtractor(FeatureConfig(kind=kind))(wave[None], [span])[0]
    torch.testing.assert_close(ours, torchaudio_reference(wave, kind), rtol=0, atol=1e-5)


def test_prepared_window_and_span():
    cfg = FeatureConfig()
    x, (start, end) = prepare_waveform(speech_like(24414, 1.5), 24414, cfg)
    assert x.shape == (64000,) and (start, end) == (20000, 44000)
    assert float(x.abs().max()) == pytest.approx(1.0)
    assert not x[:start].any() and not x[end:].any()
