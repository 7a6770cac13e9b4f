"""The embedded default dataset: procedural emotional speech, deterministic from the seed.

A glottal pulse train follows an F0 contour and is shaped by formant resonances, spectral tilt
and breath noise, one syllable at a time. Emotions change prosody relative to neutral (rough
values from the speech-emotion literature); simulated speakers differ more in F0 and formants
than some emotions do, so only a speaker-disjoint split measures generalisation, as on real data.
Every clip's intensity is drawn per clip, as CREMA-D's LO/MD/HI levels, so classes overlap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .labels import CLASSES

GENERATOR_VERSION = 2  # bump when the output changes: it is part of the feature cache key
SAMPLE_RATE = 16_000

# Real class balance of the Kaggle merge after relabelling by native file name (12,798 clips).
FULL_COUNTS: dict[str, int] = {"angry": 2107, "happy": 2107, "sad": 2107, "neutral": 1795,
                               "fearful": 2107, "disgusted": 1923, "surprised": 652}
SIZES: dict[str, float] = {"tiny": 0.01, "small": 0.1, "medium": 0.25, "full": 1.0}


@dataclass(frozen=True)
class Prosody:
    """Changes relative to neutral: rough values from the speech-emotion literature."""

    f0_st: float  # mean F0 shift, semitones
    range_x: float  # F0 range factor
    rate_x: float  # syllable-rate factor
    level_db: float  # loudness change, dB (peak normalisation leaves it as SNR)
    tilt_db: float  # spectral tilt change, dB/octave (+ flatter, - steeper)
    jitter_pct: float  # period-to-period F0 perturbation, %
    breath: float = 0.0  # extra aspiration noise
    tremor_hz: float = 0.0  # F0 tremor frequency
    creak: float = 0.0  # share of irregular (creaky) periods
    contour: str = "fall"  # fall | accents-abrupt | accents-rise | fall-steep | fall-ends | final-rise
    f1_x: float = 1.0  # first formant factor
    pause_x: float = 1.0  # pause length factor


PROSODY: dict[str, Prosody] = {
    "neutral": Prosody(0, 1.0, 1.0, 0, 0, 0.7, contour="fall"),
    "angry": Prosody(5, 1.6, 1.1, 6, 3, 1.0, contour="accents-abrupt", f1_x=1.12),
    "happy": Prosody(4, 1.7, 1.05, 3, 2, 0.6, contour="accents-rise"),
    "sad": Prosody(-2, 0.6, 0.8, -5, -4, 1.2, breath=0.25, contour="fall-steep", pause_x=1.8),
    "fearful": Prosody(7, 1.2, 1.2, 1, 2, 1.8, tremor_hz=6.0, breath=0.1, contour="fall"),
    "disgusted": Prosody(-3, 1.1, 0.75, -2, -3, 1.0, creak=0.35, contour="fall-ends"),
    "surprised": Prosody(5, 1.8, 1.1, 3, 2, 0.7, contour="final-rise"),
}

# Vowel formants (Hz) of an adult male tract; speakers scale them.
VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480],
                   [570, 840, 2410], [660, 1720, 2410], [440, 1020, 2240]], dtype=np.float64)
BANDWIDTHS = np.array([90.0, 110.0, 170.0])

N_FFT, HOP = 512, 128


@dataclass(frozen=True)
class Speaker:
    name: str
    f0_hz: float
    formant_x: float
    breath: float
    rate_sps: float  # syllables per second


@dataclass(frozen=True)
class SynthClip:
    index: int
    label: str
    speaker: Speaker
    seed: int

    @property
    def filename(self) -> str:
        return f"synth_{self.speaker.name}_{self.label}_{self.index:05d}.wav"


def class_counts(size: str | int) -> dict[str, int]:
    """Clips per class at a named size (tiny|small|medium|full) or a total clip count."""
    total_full = sum(FULL_COUNTS.values())
    if isinstance(size, str) and size.isdigit():
        size = int(size)
    if isinstance(size, int):
        if size < len(CLASSES) * 3:
            raise ValueError(f"synthetic size {size} is too small: use at least {len(CLASSES) * 3} clips")
        frac = size / total_full
    elif size in SIZES:
        frac = SIZES[size]
    else:
        raise ValueError(f"unknown synthetic size {size!r}: use one of {', '.join(SIZES)} or a clip count")
    return {c: max(3, int(round(FULL_COUNTS[c] * frac))) for c in CLASSES}


def make_speakers(n: int, seed: int) -> list[Speaker]:
    rng = np.random.default_rng([seed, 7_001])
    speakers = []
    for i in range(n):
        female = i % 2 == 1
        f0 = (205.0 if female else 115.0) * 2 ** (rng.uniform(-3.5, 3.5) / 12)
        fx = (1.15 if female else 1.0) * rng.uniform(0.92, 1.08)
        speakers.append(Speaker(f"S{i:02d}", f0, fx, rng.uniform(0.0, 0.12), rng.uniform(3.6, 5.0)))
    return speakers


def synthetic_clips(size: str | int, seed: int) -> list[SynthClip]:
    """The clip list (labels, speakers, per-clip seeds) of a synthetic dataset."""
    counts = class_counts(size)
    total = sum(counts.values())
    speakers = make_speakers(int(np.clip(total // 40, 10, 60)), seed)
    labels = [c for c in CLASSES for _ in range(counts[c])]
    rng = np.random.default_rng([seed, 7_002])
    rng.shuffle(labels)
    return [SynthClip(i, lab, speakers[i % len(speakers)], int(rng.integers(2**31))) for i, lab in enumerate(labels)]


def _resonance(freqs: np.ndarray, formants: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Magnitude of a cascade of second-order resonators. freqs (F,), formants (T,K) -> (T,F)."""
    f = freqs[None, :, None]
    fk = formants[:, None, :]
    h = fk**2 / np.sqrt((fk**2 - f**2) ** 2 + (bandwidths[None, None, :] * f) ** 2)
    return h.prod(axis=2)


_BLOCK = 80  # F0 is computed per 5 ms block (about one period), then held per sample


class _Syllables(NamedTuple):
    voiced: np.ndarray  # voicing envelope per sample, 0 in pauses
    accent: np.ndarray  # pitch accent per F0 block
    syl_index: np.ndarray  # each sample's syllable, -1 in pauses
    onsets: list[int]  # first sample of each syllable
    count: int  # number of syllables, at least 1


def _lerp(k: float, neutral: float, value: float) -> float:
    """A prosody value at intensity k: neutral at 0, the emotion's value at 1."""
    return neutral + k * (value - neutral)


def render(clip: SynthClip) -> np.ndarray:
    """The clip's waveform at 16 kHz, float32 in [-1, 1].

    One recipe (syllables -> F0 -> glottal source -> formants and tilt -> noise), every stage
    drawing from one seeded generator: the stages must run, and draw, in exactly this order, as
    any reordering of draws would silently change the dataset (and its cache key would not).
    """
    rng = np.random.default_rng(clip.seed)
    p = PROSODY[clip.label]
    sp = clip.speaker
    # intensity of the emotion for this clip: 0.35 (barely) .. 1.15 (strong)
    k = rng.uniform(0.35, 1.15)
    duration = rng.uniform(1.6, 3.6)
    n = int(duration * SAMPLE_RATE)
    nb = n // _BLOCK + 1
    rate = sp.rate_sps * _lerp(k, 1.0, p.rate_x) * rng.uniform(0.9, 1.1)
    syl = _syllables(rng, p, k, rate, n, nb)
    f0 = _f0_track(rng, p, sp, k, duration, syl.accent, n, nb)
    source = _glottal_source(rng, p, sp, k, f0, syl.voiced, syl.onsets, n)
    speech = _shape_spectrum(rng, p, sp, k, source, syl.syl_index, syl.count, n)

    speech *= 10 ** (_lerp(k, 0.0, p.level_db) / 20) / (np.abs(speech).max() + 1e-9)
    noise_db = rng.uniform(-38, -24)  # background noise relative to neutral speech peak
    y = speech + rng.standard_normal(n, dtype=np.float32) * 10 ** (noise_db / 20)
    return (y / (np.abs(y).max() + 1e-9) * 0.9).astype(np.float32)


def _syllables(rng: np.random.Generator, p: Prosody, k: float, rate: float, n: int, nb: int) -> _Syllables:
    """Syllable boundaries with pauses in between, and each syllable's pitch accent."""
    sr = SAMPLE_RATE
    voiced = np.zeros(n)
    accent = np.zeros(nb)
    syl_index = np.full(n, -1)
    onsets = []
    pos = rng.uniform(0.05, 0.25) * sr
    s = 0
    while pos < n - 0.1 * sr:
        syl = sr / rate * rng.uniform(0.7, 1.2)
        a, b = int(pos), int(min(pos + syl, n))
        ramp = np.sin(np.linspace(0, np.pi, b - a)) ** 0.6
        voiced[a:b] = ramp
        ab, bb = a // _BLOCK, max(b // _BLOCK, a // _BLOCK + 1)
        phase = np.linspace(0, 1, bb - ab)
        accent[ab:bb] = {
            "accents-abrupt": np.exp(-6 * phase),
            "accents-rise": phase**1.5,
        }.get(p.contour, np.sin(np.pi * phase)) * rng.uniform(0.3, 1.0)
        syl_index[a:b] = s
        onsets.append(a)
        gap = sr / rate * rng.uniform(0.1, 0.45) * _lerp(k, 1.0, p.pause_x)
        pos = b + gap
        s += 1
    return _Syllables(voiced, accent, syl_index, onsets, max(s, 1))


def _f0_track(rng: np.random.Generator, p: Prosody, sp: Speaker, k: float, duration: float,
              accent: np.ndarray, n: int, nb: int) -> np.ndarray:
    """F0 per sample (Hz): a contour in semitones around the speaker's base, jittered per block."""
    tb = np.arange(nb) * _BLOCK / SAMPLE_RATE
    x = tb / duration
    range_st = 2.0 * _lerp(k, 1.0, p.range_x)
    contour = {
        "fall": 1.0 - 2.0 * x,
        "fall-steep": 1.5 - 3.5 * x,
        "accents-abrupt": 0.8 - 1.6 * x,
        "accents-rise": 0.5 - 0.8 * x,
        "fall-ends": 0.6 - 0.8 * x - 2.5 * np.clip((x - 0.75) / 0.25, 0, 1) ** 2,
        "final-rise": -0.3 * x + 4.0 * np.clip((x - 0.7) / 0.3, 0, 1) ** 2,
    }[p.contour]
    st = _lerp(k, 0.0, p.f0_st) + range_st * (contour + 1.2 * accent) + rng.normal(0, 0.7)
    if p.tremor_hz:
        st = st + k * 0.5 * np.sin(2 * np.pi * p.tremor_hz * tb + rng.uniform(0, 2 * np.pi))
    jitter = _lerp(k, 0.7, p.jitter_pct) / 100.0
    return np.repeat(sp.f0_hz * 2 ** (st / 12) * (1 + jitter * rng.normal(0, 1, nb)), _BLOCK)[:n]


def _glottal_source(rng: np.random.Generator, p: Prosody, sp: Speaker, k: float, f0: np.ndarray,
                    voiced: np.ndarray, onsets: list[int], n: int) -> np.ndarray:
    """Glottal pulses, one per F0 period, with shimmer, creaky periods, breath and onset bursts."""
    sr = SAMPLE_RATE
    phase = np.cumsum(f0 / sr)
    pulse_at = np.flatnonzero(np.diff(np.floor(phase), prepend=0.0) > 0)
    amp = 1 + 0.08 * rng.normal(size=pulse_at.size)
    creak = _lerp(k, 0.0, p.creak)
    if creak > 0:
        irregular = rng.random(pulse_at.size) < creak
        amp[irregular] *= rng.uniform(0.1, 0.5, irregular.sum())
    source = np.zeros(n)
    source[pulse_at] = amp
    source *= voiced
    breath = sp.breath + _lerp(k, 0.0, p.breath)
    source += rng.standard_normal(n, dtype=np.float32) * (0.02 + 0.25 * breath) * voiced
    # fricative bursts at syllable onsets
    for a in onsets:
        m = min(int(0.03 * sr), n - a)
        source[a : a + m] += rng.normal(0, 0.15, m) * np.linspace(1, 0, m)
    return source


def _shape_spectrum(rng: np.random.Generator, p: Prosody, sp: Speaker, k: float, source: np.ndarray,
                    syl_index: np.ndarray, n_syl: int, n: int) -> np.ndarray:
    """Spectral shaping per STFT frame: formants of each syllable's vowel, then tilt."""
    sr = SAMPLE_RATE
    frames = 1 + n // HOP
    vowel_of_syl = rng.integers(0, len(VOWELS), n_syl)
    frame_syl = syl_index[np.minimum(np.arange(frames) * HOP, n - 1)]
    formants = VOWELS[vowel_of_syl] * sp.formant_x
    formants[:, 0] *= _lerp(k, 1.0, p.f1_x)
    freqs = np.fft.rfftfreq(N_FFT, 1 / sr)
    env = _resonance(freqs, formants, BANDWIDTHS)[np.maximum(frame_syl, 0)]  # one per syllable
    tilt = -12.0 + _lerp(k, 0.0, p.tilt_db)  # dB per octave above 200 Hz
    env *= (np.maximum(freqs, 200.0) / 200.0) ** (tilt / 6.02)
    window = torch.hann_window(N_FFT)
    spec = torch.stft(torch.from_numpy(source.astype(np.float32)), N_FFT, HOP, window=window, return_complex=True)
    spec = spec * torch.from_numpy(env.T[:, : spec.shape[1]].astype(np.float32))
    return torch.istft(spec, N_FFT, HOP, window=window, length=n).numpy()
