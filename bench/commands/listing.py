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


TP_NOTE = ("parameters + gradients + AdamW state per device, fp32 / bf16, for the models tensor parallel splits; "
           "–: their heads or feed-forward units do not divide by the degree. 2-D: fsdp over N / T ranks of a model "
           "tensor-parallel over T (--tp T).")
ACT_NOTE = ("params + grads + AdamW, the strategy's buffers and one micro-batch's activations per device (bf16; "
            "bench run --dry-run adds the data and evaluation): --ac full keeps each block's input and recomputes "
            "one block at a time in backward; selective every other block.")


def list_cmd(devices: int = typer.Option(8, "--gpus", "--devices", help="Device count N of the ddp, fsdp and tp memory columns."),
             tp: int | None = typer.Option(None, "--tp", help="Tensor-parallel degree T of the 2-D column (fsdp over "
                                           "N / T ranks; default 2 where it divides --gpus, else 1)."),
             batch: int | None = typer.Option(None, "--batch-size", help="Also show training memory with activations "
                                              "at this batch per device, by --ac setting (counted once, then cached)."),
             models: list[str] = typer.Option(None, "--model", help="Only this model (repeat the flag for more).")):
    """Show the models (parameters, GFLOP, training memory per device), strategies and dataset sources."""
    from emotion_models.models import MODELS
    from emotion_models.synthetic import SIZES as DATA_SIZES, class_counts

    from ..strategies import all_strategies

    if devices < 1:
        fail(f"--gpus {devices}: give a device count of 1 or more")
    tp = tp if tp is not None else (2 if devices % 2 == 0 else 1)
    if tp < 1 or devices % tp:
        fail(f"--tp {tp}: the 2-D column's tensor-parallel degree must divide --gpus {devices}")
    if batch is not None and batch < 1:
        fail(f"--batch-size {batch}: give a batch of 1 or more samples per device")
    unknown = [m for m in models or [] if m not in MODELS]
    if unknown:
        fail(f"--model {unknown[0]}: not in the zoo; choose from {', '.join(MODELS)}")
    only = tuple(models or MODELS)
    cells = [RunConfig(strategy="single"), RunConfig(strategy="ddp", devices=devices),
             RunConfig(strategy="fsdp", devices=devices)]
    sizes, memory = _model_rows(cells, only)
    right = {"justify": "right"}
    console.print(table("models", ["name", "size", "input", ("params (M)", right), ("blocks", right),
                                   ("forward (GFLOP)", right)], sizes, caption=MODELS_NOTE))
    console.print(table("training memory per device", ["name", "size"] + [(_column(c), right) for c in cells],
                        memory, caption=MEMORY_NOTE))
    tp_cells = [RunConfig(strategy="tp", devices=devices), RunConfig(strategy="fsdp", devices=devices, tp=tp)]
    console.print(table(f"tensor parallel: training memory per device at {devices} devices",
                        ["name", "size"] + [(_column(c), right) for c in tp_cells], _model_rows(tp_cells, only, tp_only=True)[1],
                        caption=TP_NOTE))
    if batch is not None:
        console.print(_activation_table(devices, tp, batch, only))
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


def _column(cfg: RunConfig) -> str:
    """'fsdp x8', '2-D fsdp x4 · tp2': a memory column's cell."""
    if cfg.tp > 1 and cfg.strategy != "tp":
        return f"2-D {cfg.strategy} x{cfg.devices // cfg.tp} · tp{cfg.tp}"
    return f"{cfg.strategy} x{cfg.devices}" + (f" · ac {cfg.ac}" if cfg.ac != "none" else "")


def _applies(cfg: RunConfig) -> bool:
    from ..memory import tp_divides

    degree = cfg.devices if cfg.strategy == "tp" else cfg.tp
    return degree == 1 or tp_divides(cfg.model, cfg.model_size, degree)


def _sizes(only: tuple[str, ...]):
    """(name, input kind, size, stats) of every size of the zoo's models named in `only`, from counts in
    the cache folder."""
    from emotion_models.models import MODELS, SIZES

    from ..memory import model_stats

    for name, (_, kind, _) in MODELS.items():
        if name not in only:
            continue
        for size in SIZES:
            try:
                yield name, kind, size, model_stats(name, size)
            except ValueError:
                continue  # an encoder has one published size


def _model_rows(cells: list[RunConfig], only: tuple[str, ...], tp_only: bool = False) -> tuple[list[list[str]], list[list[str]]]:
    """Per model and size: (name, size, input, parameters, blocks, GFLOP) and (name, size, the static
    memory of each cell at fp32 / bf16), from counts kept in the cache folder. tp_only: the models
    tensor parallel splits, '–' where a cell's degree does not divide them."""
    from ..memory import static_bytes, tp_dims

    sizes, memory = [], []
    for name, kind, size, stats in _sizes(only):
        if tp_only and not tp_dims(name, size)[1]:
            continue
        per_cell = []
        for cell in cells:
            cfg = cell.replace(model=name, model_size=size)
            got = [static_bytes(cfg.replace(precision=p)) for p in MEMORY_PRECISIONS] if _applies(cfg) else None
            per_cell.append(memory_text([w + extra for w, extra, _ in got]) if got else "–")
        sizes.append([name, size, kind, f"{sum(stats['params_per_block']) / 1e6:,.1f}",
                      str(len(stats["params_per_block"])), f"{stats['forward_flops'] / 1e9:,.2f}"])
        memory.append([name, size, *per_cell])
    return sizes, memory


def _activation_table(devices: int, tp: int, batch: int, only: tuple[str, ...]):
    """Training memory with one micro-batch's activations at `batch` per device, bf16, by --ac setting
    (fsdp x N) and for tensor parallel (tp x N, 2-D), each in its own unit."""
    from ..memory import GiB, estimate

    cells = [RunConfig(strategy="fsdp", devices=devices, ac=ac) for ac in ("none", "selective", "full")]
    cells += [RunConfig(strategy="tp", devices=devices), RunConfig(strategy="fsdp", devices=devices, tp=tp)]
    rows = []
    for name, _, size, _ in _sizes(only):
        line = [name, size]
        for cell in cells:
            cfg = cell.replace(model=name, model_size=size, precision="bf16", batch_size=batch)
            line.append(f"{estimate(cfg, 'cuda').training_bytes / GiB:.2f}" if _applies(cfg) else "–")
        rows.append(line)
    heads = [f"fsdp x{devices}", "ac sel.", "ac full", f"tp x{devices}", f"2-D x{devices // tp}·tp{tp}"]
    return table(f"training memory per device with activations (GiB), batch {batch} per device, bf16; ac: fsdp with "
                 "--ac", ["name", "size"] + [(h, {"justify": "right"}) for h in heads], rows, caption=ACT_NOTE)
