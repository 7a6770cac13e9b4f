"""`bench env`: the hardware and software fingerprint every result records."""
from __future__ import annotations

import json

import typer

from ..ui import console, table

LABELS = {"host": "host", "os": "OS", "python": "Python", "cpu_model": "CPU", "cpu_cores_logical": "CPU cores (logical)",
          "cpu_cores_physical": "CPU cores (physical)", "ram_bytes": "RAM", "gpu_count": "GPUs", "cuda": "CUDA",
          "cudnn": "cuDNN", "nccl": "NCCL", "torch": "torch", "torchaudio": "torchaudio", "git": "git commit",
          "hardware_id": "hardware id"}


def env_rows(fp: dict) -> list[tuple[str, str]]:
    """The fingerprint as (what, value) in words: sizes in GiB, absent values said as such."""
    rows = []
    for key, value in fp.items():
        if key == "gpus":
            rows += [(f"GPU {g['index']}", f"{g['name']}, {g['memory_bytes'] / 2**30:.1f} GiB, "
                                           f"capability {g['capability']}, driver {g['driver']}") for g in value]
            continue
        if key == "ram_bytes":
            value = f"{value / 2**30:.1f} GiB"
        elif key == "git":
            value = "not a git checkout" if not value else f"{value.get('commit') or 'unknown'}" + \
                (" (uncommitted changes)" if value.get("dirty") else "")
        elif value is None:
            value = "none" if key in ("cuda", "cudnn", "nccl") else "unknown"
        rows.append((LABELS.get(key, key), str(value)))
    return rows


def env_cmd(json_out: bool = typer.Option(False, "--json", help="Print the fingerprint as JSON.")):
    """Print the hardware and software fingerprint recorded with every result."""
    from ..envinfo import fingerprint

    fp = fingerprint()
    if json_out:
        print(json.dumps(fp, indent=1))
        return
    console.print(table("this machine, as every result records it", ["what", "value"], env_rows(fp), plain=True))
