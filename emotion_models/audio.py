"""Decoding and the fixed feature pipeline: mono, 16 kHz, peak-normalised, fixed window, log-mel or MFCC."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import soundfile as sf
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

    kind: str = "logmel"  # logmel (64 bands) | mfcc (40 coefficients)
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
        return self.n_mels if self.kind == "logmel" else self.n_mfcc

    @property
    def crop_frames(self) -> int:
        return int(round(self.crop_seconds * self.sample_rate)) // self.hop_length + 1  # 301

    @property
    def cache_frames(self) -> int:
        return int(round(self.cache_seconds * self.sample_rate)) // self.hop_length + 1  # 401

    def to_dict(self) -> dict:
        return asdict(self)


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """Decode any soundfile-readable file to float32 mono; raise DecodeError with the reason."""
    try:
        info = sf.info(path)
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's errors are RuntimeError/LibsndfileError/OSError
        raise DecodeError(f"cannot decode: {str(exc).strip().splitlines()[0]}") from None
    if info.frames > 0 and data.shape[0] < info.frames:
        raise DecodeError(f"truncated: header says {info.frames} frames, body holds {data.shape[0]}")
    # libsndfile shortens a WAV whose body ends early and notes it: "data : 16000 (should be 7978)"
    m = _DATA_SHORT.search(info.extra_info or "")
    if m and int(m.group(1)) > int(m.group(2)):
        raise DecodeError(f"truncated: header declares {m.group(1)} data bytes, the file holds {m.group(2)}")
    if data.shape[0] == 0:
        raise DecodeError("no audio frames")
    return data.mean(axis=1), sr


def prepare_waveform(wave: np.ndarray | torch.Tensor, sr: int, cfg: FeatureConfig) -> torch.Tensor:
    """Resample to cfg.sample_rate, peak-normalise, centre crop/pad to cfg.cache_seconds."""
    x = torch.as_tensor(wave, dtype=torch.float32)
    if sr != cfg.sample_rate:
        x = torchaudio.functional.resample(x, sr, cfg.sample_rate)
    peak = x.abs().max()
    if peak > 0:
        x = x / peak
    n = int(round(cfg.cache_seconds * cfg.sample_rate))
    if x.numel() >= n:
        start = (x.numel() - n) // 2
        return x[start : start + n]
    out = torch.zeros(n)
    start = (n - x.numel()) // 2
    out[start : start + x.numel()] = x
    return out


class FeatureExtractor(torch.nn.Module):
    """Batched log-mel or MFCC with per-utterance mean/variance normalisation.

    torchaudio's Spectrogram (complex) -> power -> MelScale -> log(mel + 1e-6) [-> DCT-II for
    MFCC, as torchaudio.transforms.MFCC(log_mels=True)]. The power is taken as re^2 + im^2,
    about twice as fast on CPU as |z|^2, which keeps the cache build fast.
    """

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        if cfg.kind not in ("logmel", "mfcc"):
            raise ValueError(f"unknown feature kind {cfg.kind!r}: use logmel or mfcc")
        self.cfg = cfg
        self.spec = torchaudio.transforms.Spectrogram(n_fft=cfg.n_fft, win_length=cfg.win_length,
                                                      hop_length=cfg.hop_length, power=None)
        self.mel = torchaudio.transforms.MelScale(n_mels=cfg.n_mels, sample_rate=cfg.sample_rate, f_min=cfg.f_min,
                                                  f_max=cfg.f_max, n_stft=cfg.n_fft // 2 + 1)
        if cfg.kind == "mfcc":
            self.register_buffer("dct", torchaudio.functional.create_dct(cfg.n_mfcc, cfg.n_mels, norm="ortho"))

    @torch.no_grad()
    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, n_features, frames)."""
        spec = self.spec(waves)
        power = spec.real.square() + spec.imag.square()
        feats = torch.log(self.mel(power) + 1e-6)
        if self.cfg.kind == "mfcc":
            feats = torch.matmul(feats.transpose(1, 2), self.dct).transpose(1, 2)
        mean = feats.mean(dim=(1, 2), keepdim=True)
        std = feats.std(dim=(1, 2), keepdim=True)
        return (feats - mean) / (std + 1e-5)


def crop_frames(feats: torch.Tensor, offsets: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-sample time crop: feats (B, F, T_cache), offsets (B,) -> (B, F, frames)."""
    idx = offsets.view(-1, 1, 1) + torch.arange(frames, device=feats.device).view(1, 1, -1)
    return torch.gather(feats, 2, idx.expand(feats.shape[0], feats.shape[1], frames))


def centre_offset(cfg: FeatureConfig) -> int:
    return (cfg.cache_frames - cfg.crop_frames) // 2
