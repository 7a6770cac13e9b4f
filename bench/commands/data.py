"""`bench data scan` and `bench data synth`: a folder of WAV files labelled and split; the synthetic
set written out as WAV files."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from ..ui import console, info, progress_factory, table
from .common import fail, nonempty_out


def data_scan(
    path: str = typer.Argument(..., help="Folder to walk recursively."),
    out: Optional[str] = typer.Option(None, "--out", help="Write the manifest CSV (path,label,corpus,speaker,split) here."),
    seed: int = typer.Option(0, help="Seed of the speaker-disjoint split."),
    show_skipped: Optional[int] = typer.Option(None, help="List at most this many skipped/flagged files (default: all); all are counted."),
):
    """Label every clip under PATH, split speakers 80/10/10, and summarise what was found and skipped."""
    from emotion_models.labels import CLASSES
    from emotion_models.scan import ScanError, scan_folder, write_manifest

    try:
        report = scan_folder(path, seed=seed)
    except ScanError as exc:
        fail(str(exc))
    for column, keys in (("label", CLASSES), ("corpus", None), ("split", ("train", "val", "test"))):
        counts = report.counts(column)
        console.print(table(f"clips per {column}", [column, ("clips", {"justify": "right"})],
                            [[k, str(counts.get(k, 0))] for k in keys or sorted(counts)]))
    speakers = {r.speaker for r in report.rows if r.speaker}
    unknown = sum(1 for r in report.rows if not r.speaker)
    info(f"{len(report.rows)} clips, {len(speakers)} speakers" + (f", {unknown} clips of unknown speaker (each its own group)" if unknown else ""))
    if report.disagreements:
        info(f"file name and folder disagree on {sum(report.disagreements.values())} clips (the file name wins):")
        for (corpus, folder, name), n in sorted(report.disagreements.items()):
            info(f"  {corpus}: folder says {folder}, file name says {name}: {n}")
    for title, items in (("skipped", report.skipped), ("flagged (kept)", report.flagged)):
        if items:
            reasons = Counter(r.split(":")[0] for _, r in items)
            info(f"{title}: {len(items)} files (" + ", ".join(f"{k}: {v}" for k, v in reasons.most_common()) + ")")
            limit = len(items) if show_skipped is None else show_skipped
            for p, r in items[:limit]:
                info(f"  {p}: {r}")
            if len(items) > limit:
                info(f"  ... and {len(items) - limit} more (raise --show-skipped to list them)")
    if out:
        write_manifest(report.rows, out)
        info(f"manifest: {out}")


def data_synth(
    out: str = typer.Option(..., "--out", callback=nonempty_out,
                            help="Folder to write Emotions/<Class>/synth_*.wav into (Kaggle layout)."),
    size: str = typer.Option("small", help="tiny, small, medium, full, or a clip count."),
    seed: int = typer.Option(0, help="Seed of the synthetic data."),
):
    """Write the synthetic dataset as 16 kHz 16-bit WAV files in the Kaggle audio-emotions layout."""
    import soundfile as sf

    from emotion_models.synthetic import SAMPLE_RATE, render, synthetic_clips

    folders = {"angry": "Angry", "happy": "Happy", "sad": "Sad", "neutral": "Neutral", "fearful": "Fearful",
               "disgusted": "Disgusted", "surprised": "Suprised"}  # the merge's own spelling
    try:
        clips = synthetic_clips(size, seed)
    except ValueError as exc:
        fail(str(exc))
    root = Path(out) / "Emotions"
    with progress_factory() as progress:
        tick = progress(len(clips), "writing WAV files")
        for c in clips:
            d = root / folders[c.label]
            d.mkdir(parents=True, exist_ok=True)
            sf.write(d / c.filename, render(c), SAMPLE_RATE, subtype="PCM_16")
            tick(1)
    info(f"wrote {len(clips)} clips to {root}")
