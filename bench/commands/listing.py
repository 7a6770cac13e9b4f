"""`bench list`: the models with their size and training memory, the strategies, the dataset sources."""
from __future__ import annotations

import typer

from ..config import RunConfig
from ..ui import console, table
from .common import fail

MEMORY_PRECISIONS = ("fp32", "bf16")  # the memory columns' precisions
MODELS_NOTE = "forward GFLOP: one 3 s sample. Memory per device below."
MEMORY_NOTE = ("parameters + gradients + AdamW state per device, fp32 / bf16 (activations come on top and grow with "
               "the batch; bench run --dry-run estimates them). single and ddp keep fp32 weights under bf16 "
               "autocast; fsdp bf16 gathers each block in bf16.")


def list_cmd(devices: int = typer.Option(8, "--gpus", "--devices", help="Device count N of the ddp and fsdp memory columns.")):
    """Show the models (parameters, GFLOP, training memory per device), strategies and dataset sources."""
    from emotion_models.models import MODELS
    from emotion_models.synthetic import SIZES as DATA_SIZES, class_counts

    from ..strategies import all_strategies

    if devices < 1:
        fail(f"--gpus {devices}: give a device count of 1 or more")
    cells = [("single", 1), ("ddp", devices), ("fsdp", devices)]
    sizes, memory = _model_rows(cells)
    right = {"justify": "right"}
    console.print(table("models", ["name", "size", "input", ("params (M)", right), ("blocks", right),
                                   ("forward (GFLOP)", right)], sizes, caption=MODELS_NOTE))
    console.print(table("training memory per device", ["name", "size"] + [(f"{s} x{n}", right) for s, n in cells],
                        memory, caption=MEMORY_NOTE))
    console.print(table("what each model is", ["name", "description"], [[n, d] for n, (_, _, d) in MODELS.items()]))
    console.print(table("strategies", ["name", "processes", "needs CUDA", "what it does"],
                        [[spec.name, "N (torchrun)" if spec.multiprocess else "1", "yes" if spec.needs_cuda else "no",
                          spec.summary] for spec in all_strategies().values()]))
    data_sizes = ", ".join(f"{s} ({sum(class_counts(s).values()):,} clips)" for s in DATA_SIZES)
    console.print(table("dataset sources", ["--dataset", "what"], [
        ["synthetic", f"embedded procedural emotional speech, 7 classes, real class balance; --size {data_sizes}"],
        ["PATH", "a folder: the Kaggle audio-emotions merge (Emotions/Angry/...) or RAVDESS, CREMA-D, TESS, SAVEE as distributed"],
    ]))


def memory_text(values: list[float]) -> str:
    """Bytes as 'fp32 / bf16' in one unit, MiB below 1 GiB so a small model does not read 0.00."""
    from ..memory import GiB

    if max(values) < GiB:
        return " / ".join(f"{v / 2**20:.1f}" for v in values) + " MiB"
    return " / ".join(f"{v / GiB:.2f}" for v in values) + " GiB"


def _model_rows(cells: list[tuple[str, int]]) -> tuple[list[list[str]], list[list[str]]]:
    """Per model and size: (name, size, input, parameters, blocks, GFLOP) and (name, size, the static
    memory of each cell at fp32 / bf16), from counts kept in the cache folder."""
    from emotion_models.models import MODELS, SIZES

    from ..memory import model_stats, static_bytes

    sizes, memory = [], []
    for name, (_, kind, _) in MODELS.items():
        for size in SIZES:
            try:
                stats = model_stats(name, size)
            except ValueError:
                continue  # an encoder has one published size
            per_cell = []
            for strategy, n in cells:
                got = [static_bytes(RunConfig(model=name, model_size=size, strategy=strategy, devices=n, precision=p))
                       for p in MEMORY_PRECISIONS]
                per_cell.append(memory_text([w + extra for w, extra, _ in got]))
            sizes.append([name, size, kind, f"{sum(stats['params_per_block']) / 1e6:,.1f}",
                          str(len(stats["params_per_block"])), f"{stats['forward_flops'] / 1e9:,.2f}"])
            memory.append([name, size, *per_cell])
    return sizes, memory
