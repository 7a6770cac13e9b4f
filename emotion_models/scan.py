"""Scan a folder of audio into a manifest: path,label,corpus,speaker,split.

Headers only are read here (soundfile.info). Every file that is not used is listed with its
reason; nothing is dropped silently.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .audio import SHORT_CLIP_S
from .labels import parse_clip
from .splits import group_key, speaker_split

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3"}
MANIFEST_COLUMNS = ("path", "label", "corpus", "speaker", "split")


class ScanError(ValueError):
    """The scan cannot produce a manifest (missing folder, no audio); message is user-facing."""


@dataclass(frozen=True)
class ManifestRow:
    path: str  # relative to the scanned root, forward slashes
    label: str
    corpus: str
    speaker: str
    split: str


@dataclass
class ScanReport:
    root: str
    rows: list[ManifestRow]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    flagged: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): kept but odd
    disagreements: Counter = field(default_factory=Counter)  # (corpus, folder_label, name_label) -> n

    def counts(self, column: str) -> Counter:
        return Counter(getattr(r, column) for r in self.rows)


def scan_folder(root: str | os.PathLike, *, seed: int = 0) -> ScanReport:
    """Walk root recursively, label every clip and split the speakers."""
    import soundfile as sf  # here, not at import: synthetic runs need no soundfile

    root_path = Path(root)
    if not root_path.exists():
        raise ScanError(f"dataset folder {root} does not exist: pass the folder that holds the WAV files")
    if not root_path.is_dir():
        raise ScanError(f"dataset path {root} is not a folder: pass the folder that holds the WAV files")

    candidates: list[str] = []
    skipped: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root_path):
        dirnames.sort()
        for name in sorted(filenames):
            rel = Path(dirpath, name).relative_to(root_path).as_posix()
            if name.startswith("."):
                continue  # hidden files (.DS_Store, ._foo.wav from macOS zips) are not clips
            if Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                candidates.append(rel)
            else:
                skipped.append((rel, "not an audio file extension"))
    if not candidates:
        raise ScanError(f"no audio files (.wav, .flac, ...) found under {root}: check the path")

    labelled: list[tuple[str, str, str, str]] = []
    flagged: list[tuple[str, str]] = []
    disagreements: Counter = Counter()
    for rel in candidates:
        full = root_path / rel
        try:
            if full.stat().st_size == 0:
                skipped.append((rel, "empty file (0 bytes)"))
                continue
            info = sf.info(str(full))
        except Exception as exc:
            skipped.append((rel, f"unreadable audio header: {str(exc).strip().splitlines()[0]}"))
            continue
        if info.frames <= 0:
            skipped.append((rel, "no audio frames"))
            continue
        clip = parse_clip(rel)
        if clip.label is None:
            skipped.append((rel, clip.skip_reason or "no label"))
            continue
        if clip.folder_label is not None and clip.folder_label != clip.label:
            disagreements[(clip.corpus, clip.folder_label, clip.label)] += 1
        if info.frames / info.samplerate < SHORT_CLIP_S:
            flagged.append((rel, f"shorter than {SHORT_CLIP_S * 1000:.0f} ms ({info.frames / info.samplerate * 1000:.1f} ms)"))
        labelled.append((rel, clip.label, clip.corpus, clip.speaker))

    if not labelled:
        raise ScanError(f"no usable clips under {root}: {len(skipped)} files skipped (run `bench data scan` to list them)")

    splits = speaker_split([group_key(s, p) for p, _, _, s in labelled], [lab for _, lab, _, _ in labelled], seed=seed)
    rows = [ManifestRow(p, lab, c, s, sp) for (p, lab, c, s), sp in zip(labelled, splits)]
    return ScanReport(str(root_path), rows, skipped, flagged, disagreements)


def manifest_csv(rows: list[ManifestRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS)
    for r in rows:
        w.writerow([r.path, r.label, r.corpus, r.speaker, r.split])
    return buf.getvalue()


def write_manifest(rows: list[ManifestRow], out: str | os.PathLike) -> None:
    from .atomic import atomic_write_text

    atomic_write_text(out, manifest_csv(rows))
