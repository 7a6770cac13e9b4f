"""Decoding and the fixed feature pipeline: mono, 16 kHz, peak-normalised, fixed window; log-mel,
MFCC, or the waveform itself (for the speech encoders).

soundfile and soxr are imported only where files are decoded and resampled: synthetic runs need
neither (the GPU machine we check on has neither).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchaudio

SAMPLE_RATE = 16_000
SHORT_CLIP_S = 0.05  # clips under 50 ms are flagged


_DATA_SHORT = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)


class DecodeError(ValueError):
    """A file that cannot be turned into a waveform; the message is the reason shown to users."""


@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """The fixed front end (DESIGN.md). Changing any field changes the feature cache key."""

    kind: str = "logmel"  # logmel (64 bands) | mfcc (40 coefficients) | waveform (raw 16 kHz samples)
    sample_rate: int = SAMPLE_RATE  # Hz, everything is resampled to this
    crop_seconds: float = 3.0  # the model input window
    cache_seconds: float = 4.0  # window kept in the cache; training crops crop_seconds at random inside it
    n_fft: int = 512
    win_length: int = 400  # samples (25 ms)
    hop_length: int = 160  # samples (10 ms)
    n_mels: int = 64
    n_mfcc: int = 40
    f_min: float = 20.0  # Hz
    f_max: float = 8000.0  # Hz

    @property
    def n_features(self) -> int:
        return {"logmel": self.n_mels, "mfcc": self.n_mfcc, "waveform": 1}[self.kind]

    def _frames(self, seconds: float) -> int:
        samples = int(round(seconds * self.sample_rate))
        return samples if self.kind == "waveform" else samples // self.hop_length + 1

    @property
    def crop_frames(self) -> int:
        """Model input length: 301 feature frames, or 48,000 samples for the waveform."""
        return self._frames(self.crop_seconds)

    @property
    def cache_frames(self) -> int:
        """Cached window length: 401 feature frames, or 64,000 samples for the waveform."""
        return self._frames(self.cache_seconds)

    def to_dict(self) -> dict:
        return asdict(self)


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """Decode any soundfile-readable file to float32 mono; raise DecodeError with the reason."""
    import soundfile as sf

    try:
        with sf.SoundFile(path) as f:
            frames, sr, extra = f.frames, f.samplerate, f.extra_info
            if f.subtype == "PCM_16":
                # 16-bit PCM (all four corpora): libsndfile's int16 read and one multiply here are
                # twice as fast as its float conversion, and give the same values (x / 32768)
                data = f.read(dtype="int16", always_2d=True).astype(np.float32) * np.float32(1 / 32768)
            else:
                data = f.read(dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's errors are RuntimeError/LibsndfileError/OSError
        raise DecodeError(f"cannot decode: {str(exc).strip().splitlines()[0]}") from None
    if frames > 0 and data.shape[0] < frames:
        raise DecodeError(f"truncated: header says {frames} frames, body holds {data.shape[0]}")
    # libsndfile shortens a WAV whose body ends early and notes it: "data : 16000 (should be 7978)"
    m = _DATA_SHORT.search(extra or "")
    if m and int(m.group(1)) > int(m.group(2)):
        raise DecodeError(f"truncated: header declares {m.group(1)} data bytes, the file holds {m.group(2)}")
    if data.shape[0] == 0:
        raise DecodeError("no audio frames")
    return (data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)), sr


def resample(wave: np.ndarray, sr: int, target: int) -> np.ndarray:
    """Any rate to target with libsoxr's high-quality polyphase filter (python-soxr, as librosa uses).

    torchaudio's sinc resampler builds its kernel from the reduced ratio, which is huge for
    TESS's 24,414 Hz (12,207 : 8,000): seconds and gigabytes per clip. soxr handles arbitrary
    ratios in about a millisecond per clip; tests/test_audio_quality.py measures its error.
    """
    if sr == target:
        return wave
    import soxr  # only where a file is not at 16 kHz: synthetic runs need no soxr

    return soxr.resample(wave, sr, target, quality="HQ")


def prepare_waveform(wave: np.ndarray | torch.Tensor, sr: int,
                     cfg: FeatureConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resample to cfg.sample_rate, peak-normalise, centre crop/pad to cfg.cache_seconds.

    Returns the window and the span [start, end) of samples that hold the clip (the rest is the
    zero padding of a clip shorter than the window).
    """
    x = np.asarray(wave, dtype=np.float32)
    x = resample(x, sr, cfg.sample_rate).astype(np.float32, copy=False)
    peak = np.abs(x).max() if x.size else 0.0
    if peak > 0:
        x = x / peak
    n = int(round(cfg.cache_seconds * cfg.sample_rate))
    if x.size >= n:
        start = (x.size - n) // 2
        return torch.from_numpy(np.ascontiguousarray(x[start : start + n])), (0, n)
    out = torch.zeros(n)
    start = (n - x.size) // 2
    out[start : start + x.size] = torch.from_numpy(x)
    return out, (start, start + x.size)


class FeatureExtractor(torch.nn.Module):
    """Log-mel or MFCC with per-utterance mean/variance normalisation, as torchaudio computes them.

    STFT (centred, reflect-padded, Hann window) -> power re^2 + im^2 -> torchaudio's mel filter
    bank -> log(mel + 1e-6) [-> torchaudio's DCT-II for MFCC, as transforms.MFCC(log_mels=True)]
    -> (x - mean) / (std + 1e-5) over the whole window. Equal to torchaudio.transforms to float
    rounding (tests/test_audio_quality.py). Only the frames that touch the clip are transformed:
    a frame entirely in the zero padding has zero power, so its log-mel is log(1e-6) exactly.
    That saves a third of the work on the real corpora's clips (2.7 s on average in a 4 s window).
    """

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        if cfg.kind not in ("logmel", "mfcc"):
            raise ValueError(f"unknown feature kind {cfg.kind!r}: use logmel or mfcc (waveforms need no extractor)")
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.win_length))
        mel = torchaudio.transforms.MelScale(n_mels=cfg.n_mels, sample_rate=cfg.sample_rate, f_min=cfg.f_min,
                                             f_max=cfg.f_max, n_stft=cfg.n_fft // 2 + 1)
        self.register_buffer("mel_fb", mel.fb.T.contiguous())  # (n_mels, n_fft // 2 + 1)
        if cfg.kind == "mfcc":
            dct = torchaudio.functional.create_dct(cfg.n_mfcc, cfg.n_mels, norm="ortho")
            self.register_buffer("dct", dct.T.contiguous())  # (n_mfcc, n_mels)

    @torch.no_grad()
    def forward(self, waves: torch.Tensor, spans: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """(B, samples) -> (B, n_features, frames); spans: where each clip lies (default: everywhere)."""
        spans = spans or [(0, waves.shape[1])] * waves.shape[0]
        return torch.stack([self.one(w, span) for w, span in zip(waves, spans)])

    @torch.no_grad()
    def one(self, wave: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
        """(samples,) -> (n_features, frames), transforming only the frames that touch span."""
        c = self.cfg
        n, half = wave.shape[0], c.n_fft // 2
        frames = n // c.hop_length + 1
        # frame t covers samples [t * hop - n_fft / 2, t * hop + n_fft / 2) of the window, reflected
        # at its edges; its Hann window reaches win_length / 2 either side of t * hop
        reach = c.win_length // 2
        first = max(0, (span[0] - reach) // c.hop_length)
        last = min(frames - 1, (span[1] + reach) // c.hop_length + 1)
        lo, hi = first * c.hop_length - half, last * c.hop_length + half
        if lo >= 0 and hi <= n:  # a clip shorter than the window: no reflection needed
            seg = wave[lo:hi]
        else:
            seg = torch.nn.functional.pad(wave[None], (half, half), mode="reflect")[0, lo + half : hi + half]
        spec = torch.stft(seg, c.n_fft, c.hop_length, c.win_length, window=self.window, center=False,
                          return_complex=True)
        feats = torch.full((c.n_mels, frames), math.log(1e-6))
        feats[:, first : last + 1] = torch.log(self.mel_fb @ (spec.real.square() + spec.imag.square()) + 1e-6)
        if c.kind == "mfcc":
            feats = self.dct @ feats
        # torch.std_mean is five times slower than this on one small tensor (CPU, torch 2.11)
        centred = feats - feats.mean()
        std = (centred.square().sum() / (centred.numel() - 1)).sqrt()
        return centred / (std + 1e-5)


def crop_frames(feats: torch.Tensor, offsets: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-sample time crop: feats (B, F, T_cache), offsets (B,) -> (B, F, frames)."""
    idx = offsets.view(-1, 1, 1) + torch.arange(frames, device=feats.device).view(1, 1, -1)
    return torch.gather(feats, 2, idx.expand(feats.shape[0], feats.shape[1], frames))


def centre_offset(cfg: FeatureConfig) -> int:
    return (cfg.cache_frames - cfg.crop_frames) // 2
