"""Class labels and the corpus-native file-name conventions of the four source corpora.

The label comes from the corpus-native file name whenever it carries one, from the folder
otherwise; `parse_clip` returns both so that the scanner can count disagreements.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

CLASSES: tuple[str, ...] = ("angry", "happy", "sad", "neutral", "fearful", "disgusted", "surprised")
CLASS_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}

# Kaggle "audio-emotions" folder names (lower-cased); `suprised` is the merge's own spelling.
FOLDER_LABELS: dict[str, str] = {
    "angry": "angry", "happy": "happy", "sad": "sad", "neutral": "neutral",
    "fearful": "fearful", "disgusted": "disgusted", "surprised": "surprised", "suprised": "surprised",
}

_RAVDESS = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")
_RAVDESS_EMOTION = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry",
                    "06": "fearful", "07": "disgusted", "08": "surprised"}
_CREMA = re.compile(r"^(\d{4})_([A-Za-z]{3})_(ANG|DIS|FEA|HAP|NEU|SAD)_([A-Za-z]{1,2})$", re.I)
_CREMA_EMOTION = {"ANG": "angry", "DIS": "disgusted", "FEA": "fearful", "HAP": "happy",
                  "NEU": "neutral", "SAD": "sad"}
_TESS = re.compile(r"^(OAF|YAF|OA)_([A-Za-z]+)_(angry|disgust|fear|happy|neutral|ps|sad)$", re.I)
_TESS_EMOTION = {"angry": "angry", "disgust": "disgusted", "fear": "fearful", "happy": "happy",
                 "neutral": "neutral", "ps": "surprised", "sad": "sad"}
_SAVEE_SPEAKERS = ("DC", "JE", "JK", "KL")
_SAVEE_PREFIXED = re.compile(r"^(DC|JE|JK|KL)_(sa|su|a|d|f|h|n)(\d\d)$", re.I)
_SAVEE_BARE = re.compile(r"^(sa|su|a|d|f|h|n)(\d\d)$", re.I)
_SAVEE_EMOTION = {"a": "angry", "d": "disgusted", "f": "fearful", "h": "happy", "n": "neutral",
                  "sa": "sad", "su": "surprised"}
# Files written by `bench data synth`: synth_S03_angry_00012.wav
_SYNTH = re.compile(r"^synth_(S\d+)_([a-z]+)_(\d+)$")


@dataclass(frozen=True)
class ClipLabel:
    """What a clip's path says about it."""

    label: str | None  # one of CLASSES, or None when the clip must be skipped
    corpus: str  # ravdess | crema-d | tess | savee | synthetic | unknown
    speaker: str  # "corpus:id", or "" when it cannot be known
    folder_label: str | None  # the label its Kaggle folder implies, if any
    skip_reason: str | None = None  # why it is not one of our classes (e.g. RAVDESS calm)


def folder_label_of(parts: list[str]) -> str | None:
    """The label implied by the nearest emotion-named folder above the file, if any."""
    for part in reversed(parts[:-1]):
        lab = FOLDER_LABELS.get(part.lower())
        if lab:
            return lab
    return None


def parse_clip(relpath: str) -> ClipLabel:
    """Label, corpus and speaker of a clip from its path relative to the scanned root."""
    parts = relpath.replace("\\", "/").split("/")
    stem = parts[-1].rsplit(".", 1)[0]
    folder_label = folder_label_of(parts)

    if m := _RAVDESS.match(stem):
        emotion = _RAVDESS_EMOTION.get(m.group(3))
        speaker = f"ravdess:{m.group(7)}"
        if emotion is None:
            return ClipLabel(None, "ravdess", speaker, folder_label, f"unknown RAVDESS emotion code {m.group(3)}")
        if emotion == "calm":
            return ClipLabel(None, "ravdess", speaker, folder_label, "calm (not one of the 7 classes)")
        return ClipLabel(emotion, "ravdess", speaker, folder_label)
    if m := _CREMA.match(stem):
        return ClipLabel(_CREMA_EMOTION[m.group(3).upper()], "crema-d", f"crema-d:{m.group(1)}", folder_label)
    if m := _TESS.match(stem):
        who = m.group(1).upper()
        who = "OAF" if who == "OA" else who
        return ClipLabel(_TESS_EMOTION[m.group(3).lower()], "tess", f"tess:{who}", folder_label)
    if m := _SAVEE_PREFIXED.match(stem):
        return ClipLabel(_SAVEE_EMOTION[m.group(2).lower()], "savee", f"savee:{m.group(1).upper()}", folder_label)
    if m := _SAVEE_BARE.match(stem):
        label = _SAVEE_EMOTION[m.group(1).lower()]
        parent = parts[-2] if len(parts) >= 2 else ""
        if parent.upper() in _SAVEE_SPEAKERS:  # original AudioData/DC/a01.wav
            return ClipLabel(label, "savee", f"savee:{parent.upper()}", folder_label)
        if parent.lower() in FOLDER_LABELS:
            # Kaggle merge: each emotion folder holds one speaker's whole set, so the folder
            # names the speaker, not the emotion.
            return ClipLabel(label, "savee", f"savee:{parent.lower()}", folder_label)
        return ClipLabel(label, "savee", "", folder_label)
    if m := _SYNTH.match(stem):
        if m.group(2) in CLASS_INDEX:
            return ClipLabel(m.group(2), "synthetic", f"synthetic:{m.group(1)}", folder_label)
    if folder_label is not None:
        return ClipLabel(folder_label, "unknown", "", folder_label)
    return ClipLabel(None, "unknown", "", None,
                     "no label: neither a known corpus file name nor an emotion folder")
