"""Atomic file writes: a temp file in the same folder, fsync, then rename."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

def _umask() -> int:
    """This process's umask, read where Linux says it (setting it to read it back would race with
    threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then rename tmp_path over path; a crash leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file 0600; the finished file gets the mode open() would give it, like the
    # files written beside it (plots, traces)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, _write)
