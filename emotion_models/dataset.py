"""Datasets as tensors: a source (synthetic or a folder) -> manifest -> cached features.

The feature cache is built once per (manifest content, feature config) and keyed by a hash of
both; every run, strategy and rank loads the same file, so F1 and throughput are comparable.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import synthetic
from .atomic import atomic_write, atomic_write_text
from .audio import DecodeError, FeatureConfig, FeatureExtractor, prepare_waveform, read_audio
from .labels import CLASS_INDEX, CLASSES
from .scan import ManifestRow, scan_folder
from .splits import SPLITS, group_key, speaker_split

CACHE_VERSION = 2  # 2: folders resampled with soxr; the waveform kind; arrays and JSON, no pickle
POOL_MIN_CLIPS = 64  # below this the work is done in this process
CHUNK = 16  # clips per work item


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

def _features_of(prepared: list[tuple[torch.Tensor, tuple[int, int]] | None], cfg: FeatureConfig) -> np.ndarray:
    """(window, span) per clip -> (clips, n_features, cache_frames) float16; None (a file that
    could not be decoded) gives a row of zeros, which the dataset leaves out."""
    out = np.zeros((len(prepared), cfg.n_features, cfg.cache_frames), dtype=np.float16)
    extract = FeatureExtractor(cfg) if cfg.kind != "waveform" else None
    for i, item in enumerate(prepared):
        if item is None:
            continue
        wave, span = item
        # the speech encoders read the 16 kHz samples themselves
        out[i] = (wave[None] if extract is None else extract.one(wave, span)).to(torch.float16).numpy()
    return out


def _synth_chunk(clips: list[synthetic.SynthClip], cfg: FeatureConfig) -> tuple[np.ndarray, list]:
    waves = [prepare_waveform(synthetic.render(c), synthetic.SAMPLE_RATE, cfg) for c in clips]
    return _features_of(waves, cfg), [None] * len(clips)


def _file_chunk(paths: list[str], cfg: FeatureConfig) -> tuple[np.ndarray, list]:
    """Decode files; features of each (zeros where a file cannot be decoded) and, per file, None
    or (kind, reason)."""
    prepared, status = [], []
    for p in paths:
        try:
            wave, sr = read_audio(p)
        except DecodeError as exc:
            status.append(("skip", str(exc)))
            prepared.append(None)
            continue
        status.append(("silent", "silent: every sample is zero") if not np.any(wave) else None)
        prepared.append(prepare_waveform(wave, sr, cfg))
    return _features_of(prepared, cfg), status


class _Chunks(torch.utils.data.Dataset):
    """Work items for a DataLoader: item i is fn(chunk i, cfg)."""

    def __init__(self, fn: Callable, chunks: list[list], cfg: FeatureConfig):
        self.fn, self.chunks, self.cfg = fn, chunks, cfg

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int):
        return self.fn(self.chunks[i], self.cfg)


def _as_is(item):
    return item


def _run_chunks(fn: Callable, items: Sequence, cfg: FeatureConfig, progress: Callable[[int], None] | None,
                chunk: int = CHUNK):
    """fn over chunks of items in worker processes, results in order.

    torch's DataLoader does the process work: forked workers (started in milliseconds, not the
    seconds a spawned process takes to import torch), one thread each (which is what makes a
    fork after torch started its thread pools safe), results back through shared memory.
    """
    chunks = [list(items[i : i + chunk]) for i in range(0, len(items), chunk)]
    workers = min(os.cpu_count() or 1, 4) if len(items) >= POOL_MIN_CLIPS else 0
    loader = torch.utils.data.DataLoader(_Chunks(fn, chunks, cfg), batch_size=None, num_workers=workers,
                                         collate_fn=_as_is, multiprocessing_context="fork" if workers else None,
                                         prefetch_factor=4 if workers else None)
    for ch, out in zip(chunks, loader):
        yield out
        if progress:
            progress(len(ch))


# ---------------------------------------------------------------- cache

def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """The features (.npy, no pickle) and their description (.json, written last: it marks a complete entry)."""
    return cache_dir / f"features-{key}.npy", cache_dir / f"features-{key}.json"


def _read_cache(cache_dir: Path, key: str, notify: Callable[[str], None]) -> dict | None:
    """The cache entry for key, or None when there is none or it cannot be trusted.

    Plain arrays and JSON, never pickle: on a cluster the cache usually sits on a shared file
    system, and a replaced pickle would run its code on every rank. A file that fails to load,
    or whose key or shape does not match, counts as missing and is rebuilt.
    """
    data_path, meta_path = _cache_paths(cache_dir, key)
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            raise ValueError(f"it holds key {meta.get('key')!r}")
        features = np.load(data_path, allow_pickle=False)
        if list(features.shape) != meta["shape"] or features.dtype != np.float16:
            raise ValueError(f"its array is {features.dtype} {list(features.shape)}, expected float16 {meta['shape']}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        notify(f"feature cache {meta_path.name} is unusable ({str(exc).splitlines()[0]}): rebuilding it")
        return None
    return {**meta, "features": torch.from_numpy(features)}


def _load_or_build(cache_dir: Path, key: str, shape: tuple[int, ...], build: Callable[[Callable], dict],
                   notify: Callable[[str], None] | None = None) -> dict:
    """Load the cache entry for key, building it under a file lock if missing.

    build(emit) passes the features to emit(array) chunk by chunk, in order, and returns the
    entry's description (JSON-able). Each chunk goes to the file as it comes, so writing the
    cache overlaps with the workers computing the next chunks. The lock makes concurrent builders
    (ranks of a user's own torchrun, parallel sweeps) wait for the first instead of building the
    same entry twice.
    """
    notify = notify or (lambda message: None)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = _read_cache(cache_dir, key, notify)
    if cached is not None:
        return cached
    with open(cache_dir / f"features-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_cache(cache_dir, key, lambda message: None)  # built by another process meanwhile?
        if cached is not None:
            return cached
        features = np.empty(shape, dtype=np.float16)
        described: dict = {}

        def write_array(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": shape})
                rows = 0

                def emit(chunk: np.ndarray) -> None:
                    nonlocal rows
                    features[rows : rows + len(chunk)] = chunk
                    f.write(memoryview(features[rows : rows + len(chunk)]))
                    rows += len(chunk)

                described.update(build(emit))
                if rows != shape[0]:
                    raise RuntimeError(f"the cache build produced {rows} of {shape[0]} clips")

        data_path, meta_path = _cache_paths(cache_dir, key)
        atomic_write(data_path, write_array)
        meta = {"key": key, "shape": list(shape), **described}
        atomic_write_text(meta_path, json.dumps(meta))
        return {**meta, "features": torch.from_numpy(features)}


def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def load_synthetic(size: str | int = "small", *, data_seed: int = 0, feature_cfg: FeatureConfig | None = None,
                   cache_dir: Path | None = None, progress: Callable[[int, int], Callable[[int], None]] | None = None,
                   notify: Callable[[str], None] | None = None) -> Dataset:
    """The embedded synthetic dataset at a size, rendered and featurised once per key."""
    cfg = feature_cfg or FeatureConfig()
    clips = synthetic.synthetic_clips(size, data_seed)
    labels = [c.label for c in clips]
    speakers = [f"synthetic:{c.speaker.name}" for c in clips]
    splits = speaker_split(speakers, labels, seed=data_seed)
    key = _key({"v": CACHE_VERSION, "source": "synthetic", "gen": synthetic.GENERATOR_VERSION,
                "size": synthetic.class_counts(size), "seed": data_seed, "features": cfg.to_dict()})

    def build(emit: Callable[[np.ndarray], None]) -> dict:
        tick = progress(len(clips), "synthesising + features") if progress else None
        for f, _ in _run_chunks(_synth_chunk, clips, cfg, tick):
            emit(f)
        return {"skipped": [], "flagged": [], "keep": list(range(len(clips)))}

    shape = (len(clips), cfg.n_features, cfg.cache_frames)
    payload = _load_or_build(cache_dir or default_cache_dir(), key, shape, build, notify)
    return Dataset(payload["features"], torch.tensor([CLASS_INDEX[x] for x in labels]),
                   torch.tensor([SPLITS.index(s) for s in splits]), [c.filename for c in clips], speakers,
                   cfg, key, f"synthetic:{size}:seed{data_seed}")


def load_folder(root: str | os.PathLike, *, data_seed: int = 0, feature_cfg: FeatureConfig | None = None,
                cache_dir: Path | None = None, progress=None, rows: list[ManifestRow] | None = None,
                scan_report=None, notify: Callable[[str], None] | None = None) -> Dataset:
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

    def build(emit: Callable[[np.ndarray], None]) -> dict:
        tick = progress(len(rows), "decoding + features") if progress else None
        paths = [str(root / r.path) for r in rows]
        statuses = []
        for f, st in _run_chunks(_file_chunk, paths, cfg, tick):
            emit(f)
            statuses.extend(st)
        keep = [i for i, s in enumerate(statuses) if s is None or s[0] != "skip"]
        skipped = [(rows[i].path, s[1]) for i, s in enumerate(statuses) if s is not None and s[0] == "skip"]
        flagged = [(rows[i].path, s[1]) for i, s in enumerate(statuses) if s is not None and s[0] != "skip"]
        if not keep:
            raise DecodeError(f"none of the {len(rows)} clips under {root} could be decoded")
        return {"skipped": skipped, "flagged": flagged, "keep": keep}

    shape = (len(rows), cfg.n_features, cfg.cache_frames)
    payload = _load_or_build(cache_dir or default_cache_dir(), key, shape, build, notify)
    features = payload["features"]
    if len(payload["keep"]) < len(rows):  # rows of files that could not be decoded are zeros: leave them out
        features = features[torch.tensor(payload["keep"])]
    kept = [rows[i] for i in payload["keep"]]
    return Dataset(features, torch.tensor([CLASS_INDEX[r.label] for r in kept]),
                   torch.tensor([SPLITS.index(r.split) for r in kept]), [r.path for r in kept],
                   [r.speaker or group_key("", r.path) for r in kept], cfg, key, str(root),
                   skipped=list(report.skipped) + [tuple(x) for x in payload["skipped"]],
                   flagged=list(report.flagged) + [tuple(x) for x in payload["flagged"]])
