"""Datasets as tensors: a source (synthetic or a folder) -> manifest -> cached features.

The feature cache is built once per (manifest content, feature config) and keyed by a hash of
both; every run, strategy and rank loads the same file, so F1 and throughput are comparable.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import synthetic
from .atomic import atomic_write
from .audio import DecodeError, FeatureConfig, FeatureExtractor, prepare_waveform, read_audio
from .labels import CLASS_INDEX, CLASSES
from .scan import ManifestRow, scan_folder
from .splits import SPLITS, group_key, speaker_split

CACHE_VERSION = 1
POOL_MIN_CLIPS = 400  # below this a process pool costs more to start than it saves
CHUNK = 64  # clips per work item


def default_cache_dir() -> Path:
    env = os.environ.get("EMOTION_BENCH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emotion-bench"


@dataclass
class Dataset:
    """All clips of one source as tensors; `features` is (N, n_features, cache_frames) float16."""

    features: torch.Tensor
    labels: torch.Tensor  # (N,) int64 class index into CLASSES
    split: torch.Tensor  # (N,) int64 index into SPLITS
    paths: list[str]
    speakers: list[str]
    feature_cfg: FeatureConfig
    key: str
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    flagged: list[tuple[str, str]] = field(default_factory=list)

    def subset(self, split: str, device: torch.device | str = "cpu", dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of one split, on device."""
        mask = self.split == SPLITS.index(split)
        return self.features[mask].to(device=device, dtype=dtype), self.labels[mask].to(device)

    def summary(self) -> dict:
        counts = {s: int((self.split == i).sum()) for i, s in enumerate(SPLITS)}
        per_class = {c: int((self.labels == i).sum()) for i, c in enumerate(CLASSES)}
        return {"source": self.source, "clips": len(self.paths), "per_split": counts, "per_class": per_class,
                "speakers": len(set(self.speakers)), "cache_key": self.key,
                "skipped": len(self.skipped), "flagged": len(self.flagged)}


# ---------------------------------------------------------------- work items (run in pool workers)

def _features_of(waves: list[torch.Tensor], cfg: FeatureConfig) -> np.ndarray:
    extract = FeatureExtractor(cfg)
    # small batches stay in cache: about 1.5x faster than one big batch on CPU
    feats = [extract(torch.stack(waves[i : i + 8])) for i in range(0, len(waves), 8)]
    return torch.cat(feats).to(torch.float16).numpy()


def _synth_chunk(clips: list[synthetic.SynthClip], cfg: FeatureConfig) -> tuple[np.ndarray, list]:
    torch.set_num_threads(1)
    waves = [prepare_waveform(synthetic.render(c), synthetic.SAMPLE_RATE, cfg) for c in clips]
    return _features_of(waves, cfg), [None] * len(clips)


def _file_chunk(paths: list[str], cfg: FeatureConfig) -> tuple[np.ndarray | None, list]:
    """Decode files; returns features of the good ones and, per file, None or (kind, reason)."""
    torch.set_num_threads(1)
    waves, status = [], []
    for p in paths:
        try:
            wave, sr = read_audio(p)
        except DecodeError as exc:
            status.append(("skip", str(exc)))
            continue
        status.append(("silent", "silent: every sample is zero") if not np.any(wave) else None)
        waves.append(prepare_waveform(wave, sr, cfg))
    return (_features_of(waves, cfg) if waves else None), status


def _run_chunks(fn: Callable, items: Sequence, cfg: FeatureConfig, progress: Callable[[int], None] | None):
    chunks = [list(items[i : i + CHUNK]) for i in range(0, len(items), CHUNK)]
    workers = min(os.cpu_count() or 1, 4)
    if len(items) < POOL_MIN_CLIPS or workers < 2:
        for ch in chunks:
            yield fn(ch, cfg)
            if progress:
                progress(len(ch))
        return
    # spawn, not fork: forking a process that already runs torch's thread pools can deadlock
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, ch, cfg) for ch in chunks]
        for ch, fut in zip(chunks, futures):
            yield fut.result()
            if progress:
                progress(len(ch))


# ---------------------------------------------------------------- cache

def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"features-{key}.pt"


def _load_or_build(cache_dir: Path, key: str, build: Callable[[], dict]) -> dict:
    """Load the cache file for key, building it under a file lock if missing.

    The lock makes concurrent builders (ranks of a user's own torchrun, parallel sweeps) wait
    for the first instead of building the same file twice.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = _cache_path(cache_dir, key)
    if path.exists():
        return torch.load(path, weights_only=False)
    with open(cache_dir / f"features-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return torch.load(path, weights_only=False)
        payload = build()
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return payload


def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def load_synthetic(size: str | int = "small", *, data_seed: int = 0, feature_cfg: FeatureConfig | None = None,
                   cache_dir: Path | None = None, progress: Callable[[int, int], Callable[[int], None]] | None = None) -> Dataset:
    """The embedded synthetic dataset at a size, rendered and featurised once per key."""
    cfg = feature_cfg or FeatureConfig()
    clips = synthetic.synthetic_clips(size, data_seed)
    labels = [c.label for c in clips]
    speakers = [f"synthetic:{c.speaker.name}" for c in clips]
    splits = speaker_split(speakers, labels, seed=data_seed)
    key = _key({"v": CACHE_VERSION, "source": "synthetic", "gen": synthetic.GENERATOR_VERSION,
                "size": synthetic.class_counts(size), "seed": data_seed, "features": cfg.to_dict()})

    def build() -> dict:
        tick = progress(len(clips), "synthesising + features") if progress else None
        feats = np.concatenate([f for f, _ in _run_chunks(_synth_chunk, clips, cfg, tick)])
        return {"features": torch.from_numpy(feats), "skipped": [], "flagged": [], "keep": list(range(len(clips)))}

    payload = _load_or_build(cache_dir or default_cache_dir(), key, build)
    return Dataset(payload["features"], torch.tensor([CLASS_INDEX[x] for x in labels]),
                   torch.tensor([SPLITS.index(s) for s in splits]), [c.filename for c in clips], speakers,
                   cfg, key, f"synthetic:{size}:seed{data_seed}")


def load_folder(root: str | os.PathLike, *, data_seed: int = 0, feature_cfg: FeatureConfig | None = None,
                cache_dir: Path | None = None, progress=None, rows: list[ManifestRow] | None = None,
                scan_report=None) -> Dataset:
    """A scanned folder (Kaggle merge or original corpora) with its speaker-disjoint split."""
    cfg = feature_cfg or FeatureConfig()
    root = Path(root)
    report = scan_report or scan_folder(root, seed=data_seed)
    rows = rows or report.rows
    fingerprint = []
    for r in rows:
        st = (root / r.path).stat()
        fingerprint.append([r.path, r.label, r.speaker, r.split, st.st_size, st.st_mtime_ns])
    key = _key({"v": CACHE_VERSION, "source": "folder", "rows": fingerprint, "features": cfg.to_dict()})

    def build() -> dict:
        tick = progress(len(rows), "decoding + features") if progress else None
        paths = [str(root / r.path) for r in rows]
        feats, statuses = [], []
        for f, st in _run_chunks(_file_chunk, paths, cfg, tick):
            if f is not None:
                feats.append(f)
            statuses.extend(st)
        keep = [i for i, s in enumerate(statuses) if s is None or s[0] != "skip"]
        skipped = [(rows[i].path, s[1]) for i, s in enumerate(statuses) if s is not None and s[0] == "skip"]
        flagged = [(rows[i].path, s[1]) for i, s in enumerate(statuses) if s is not None and s[0] != "skip"]
        if not keep:
            raise DecodeError(f"none of the {len(rows)} clips under {root} could be decoded")
        return {"features": torch.from_numpy(np.concatenate(feats)), "skipped": skipped, "flagged": flagged,
                "keep": keep}

    payload = _load_or_build(cache_dir or default_cache_dir(), key, build)
    kept = [rows[i] for i in payload["keep"]]
    return Dataset(payload["features"], torch.tensor([CLASS_INDEX[r.label] for r in kept]),
                   torch.tensor([SPLITS.index(r.split) for r in kept]), [r.path for r in kept],
                   [r.speaker or group_key("", r.path) for r in kept], cfg, key, str(root),
                   skipped=list(report.skipped) + payload["skipped"],
                   flagged=list(report.flagged) + payload["flagged"])
