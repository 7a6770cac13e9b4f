"""The report as a reader first sees it: report.html rendered by headless Chromium, a screenshot, and
a check that the verdict is the first thing on the page after the title and the environment line.

    python tools/report_screenshot.py REPORT_DIR [--width 1100] [--height 900]

REPORT_DIR holds a report.html (bench report RESULTS --out REPORT_DIR). Writes
REPORT_DIR/report-screenshot.png (the first screen, as a browser window of that size shows it) and
REPORT_DIR/report-print.pdf, then reads the PDF's text in reading order (pdftotext, poppler-utils)
to check the order as rendered, not as the HTML source has it: a stylesheet could move or hide
what the source puts first. Exit 0 when the verdict comes first, 1 when it does not, 2 when Chromium
or pdftotext is missing (Debian: apt-get install chromium poppler-utils).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
VERDICT_MARKERS = ("fastest that learns", "no cell both learned", "no verdict")  # bench/verdict.py's headlines


def browser() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def render(report: Path, width: int, height: int) -> tuple[Path, Path]:
    """(screenshot, PDF) of report.html beside it, both from headless Chromium."""
    chrome = browser()
    if chrome is None or shutil.which("pdftotext") is None:
        raise FileNotFoundError("headless Chromium and pdftotext are needed: apt-get install chromium poppler-utils")
    shot, pdf = report.parent / "report-screenshot.png", report.parent / "report-print.pdf"
    common = [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-pdf-header-footer"]
    url = report.resolve().as_uri()
    for extra in ([f"--window-size={width},{height}", f"--screenshot={shot}"], [f"--print-to-pdf={pdf}"]):
        got = subprocess.run([*common, *extra, url], capture_output=True, text=True, timeout=120)
        out = shot if "--screenshot" in extra[-1] else pdf
        if got.returncode != 0 or not out.exists():
            raise RuntimeError(f"chromium could not render {report}: {got.stderr.strip()[-300:]}")
    return shot, pdf


def first_lines(pdf: Path, n: int = 6) -> list[str]:
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in text.splitlines() if line.strip()][:n]


def verdict_first(lines: list[str]) -> bool:
    """The title, the environment line, the verdict heading, then the verdict itself (it may wrap, so
    its first words are matched over the lines after the heading)."""
    if len(lines) < 4 or lines[0] != "emotion-bench report" or not lines[1].startswith("machine:"):
        return False
    at = next((i for i, line in enumerate(lines) if line.lower() == "verdict"), None)
    if at is None or at > 3:  # the environment line may wrap onto a third line, no further
        return False
    following = " ".join(lines[at + 1:at + 3])
    return any(m in following for m in VERDICT_MARKERS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report_dir")
    ap.add_argument("--width", type=int, default=1100)
    ap.add_argument("--height", type=int, default=900)
    args = ap.parse_args()
    report = Path(args.report_dir) / "report.html"
    if not report.is_file():
        print(f"{report}: no report.html there; run bench report RESULTS --out {args.report_dir} first", file=sys.stderr)
        return 2
    try:
        shot, pdf = render(report, args.width, args.height)
    except FileNotFoundError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    lines = first_lines(pdf)
    ok = verdict_first(lines)
    print(f"screenshot: {shot}; the page's first lines as rendered: {' | '.join(lines[:5])}")
    print("verdict first: yes" if ok else "verdict first: NO, the page opens with something else")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
