"""Feature-cache build speed, clips per second, into a fresh cache folder each repeat.

    python benchmarks/data_speed.py [--size small]                 # synthetic: generation + features (target >= 200)
    python benchmarks/data_speed.py --folder [--clips 2000]        # WAV folder, end to end (target >= 1,000)
    python benchmarks/data_speed.py --folder --kind waveform       # the speech encoders' waveform cache

Folder mode first writes a folder of WAV files in the real corpora's mix (the Kaggle merge's
proportions): CREMA-D 16 kHz (61 %), TESS 24,414 Hz (23 %), RAVDESS 48 kHz (12 %), SAVEE 44.1 kHz
(4 %), all 16-bit mono as distributed, with each corpus's clip lengths; then times
`load_folder` on it: scan (labels, headers), decode, resample to 16 kHz, features, cache write.
The files were just written, so they come from the page cache, as on a second run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from emotion_models import FeatureConfig, load_folder, load_synthetic


def _word(i: int) -> str:
    return "w" + "".join(chr(97 + (i // 26**k) % 26) for k in range(3))


# corpus: (clips in the Kaggle merge, sample rate Hz, clip length range s, file name of clip i);
# names follow each corpus's convention and are unique within a folder of 100 clips
CORPORA = {
    "crema-d": (7442, 16000, (1.3, 5.0), lambda i: f"{1001 + i % 91}_IEO_{['ANG', 'HAP', 'SAD', 'NEU', 'FEA', 'DIS'][i % 6]}_XX.wav"),
    "tess": (2800, 24414, (1.3, 2.8), lambda i: f"{['OAF', 'YAF'][i % 2]}_{_word(i)}_{['angry', 'happy', 'sad', 'neutral', 'fear', 'disgust', 'ps'][i % 7]}.wav"),
    "ravdess": (1440, 48000, (3.0, 4.5), lambda i: f"03-01-{[5, 3, 4, 1, 6, 7, 8][i % 7]:02d}-01-01-01-{1 + i % 24:02d}.wav"),
    "savee": (480, 44100, (2.5, 7.0), lambda i: f"{['DC', 'JE', 'JK', 'KL'][i % 4]}_{['a', 'h', 'sa', 'n', 'f', 'd', 'su'][i % 7]}{i // 28 % 100:02d}.wav"),
}


def write_folder(root: Path, clips: int, seed: int = 0) -> dict[str, int]:
    """clips WAV files in the corpora's proportions, rates, lengths and bit depth; counts per corpus."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    total = sum(c[0] for c in CORPORA.values())
    counts = {}
    for name, (n_real, sr, (lo, hi), filename) in CORPORA.items():
        n = max(1, round(clips * n_real / total))
        counts[name] = n
        for i in range(n):
            folder = root / name / f"part{i // 100}"
            folder.mkdir(parents=True, exist_ok=True)
            seconds = rng.uniform(lo, hi)
            t = np.arange(int(seconds * sr)) / sr
            f0 = rng.uniform(90, 250)
            wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
            wave = 0.3 * wave / np.abs(wave).max() + 0.01 * rng.standard_normal(t.size)
            sf.write(folder / filename(i), wave.astype(np.float32), sr, subtype="PCM_16")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", help="synthetic size")
    ap.add_argument("--folder", action="store_true", help="time a folder of WAV files at the corpora's native rates")
    ap.add_argument("--clips", type=int, default=2000, help="folder mode: clips to write")
    ap.add_argument("--kind", default="logmel", help="logmel, mfcc or waveform")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = FeatureConfig(kind=args.kind)
    with tempfile.TemporaryDirectory() as work:
        if args.folder:
            counts = write_folder(Path(work, "wav"), args.clips)
            print("folder:", ", ".join(f"{k} {v}" for k, v in counts.items()))
            load = lambda cache: load_folder(Path(work, "wav"), feature_cfg=cfg, cache_dir=cache)  # noqa: E731
            target, what = 1000, "scan + decode + resample + features + cache write"
        else:
            load = lambda cache: load_synthetic(args.size, feature_cfg=cfg, cache_dir=cache)  # noqa: E731
            target, what = 200, "synthesis + features + cache write"
        rates = []
        for r in range(args.repeats):
            cache = Path(work, f"cache{r}")
            t = time.perf_counter()
            ds = load(cache)
            dt = time.perf_counter() - t
            n = ds.features.shape[0]
            rates.append(n / dt)
            print(f"{n} clips ({args.kind}, {what}) in {dt:.2f} s: {n / dt:.0f} clips/s")
    print(f"median: {statistics.median(rates):.0f} clips/s on {os.cpu_count()} cores (target >= {target} clips/s)")


if __name__ == "__main__":
    main()
