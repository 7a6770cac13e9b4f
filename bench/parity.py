"""`bench parity`: does each strategy train the same model as `single`?

Every cell trains a few steps from the same seed, on the same global batches and crops, with
dropout off (its masks depend on how the batch is laid out), and is compared with `single`:
the per-step global-mean loss and the parameters after the last step.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from emotion_models.models import build_model

from .config import SCHEDULES, RunConfig
from .lifecycle import run
from .results import load_result
from .strategies import parse_cell

# Tolerances (loss, parameters), relative: per loss step |l - l_single| / |l_single|; for the
# parameters after the last step ||p - p_single|| / ||p_single|| over all of them together.
# Each basis says why its tolerance is what it is.
BASES: dict[str, tuple[float, float, str]] = {
    "exact": (1e-4, 1e-3, "same mathematics, only the order of floating-point sums differs; measured "
                          "about 1e-6 (loss) and 1e-4 (parameters: AdamW's normalisation amplifies "
                          "tiny gradient differences)"),
    "batchnorm": (0.15, 0.15, "BatchNorm normalises with the statistics of each rank's slice or "
                              "micro-batch, not of the global batch: a real change of the computation; "
                              "measured about 0.04 (loss) and 0.03 (parameters) after 6 steps"),
    "bf16": (0.05, 0.05, "bf16 keeps 8 mantissa bits, about 0.4 % rounding per operation; measured "
                         "about 3e-3 after 6 steps"),
}


@dataclass
class ParityRow:
    cell: str
    loss_dev: float
    param_dev: float
    loss_tol: float
    param_tol: float
    basis: str  # keys of BASES joined by "+"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.loss_dev <= self.loss_tol and self.param_dev <= self.param_tol


def has_batchnorm(model: str) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in build_model(model, device="meta").modules())


def tolerance(strategy: str, devices: int, model: str, precision: str, sync_bn: bool,
              grad_accum: int = 1, tp: int = 1) -> tuple[float, float, str]:
    """(loss tolerance, parameter tolerance, basis) of one cell. --grad-accum splits each rank's batch
    into micro-batches, so BatchNorm sees a micro-batch's statistics, as with a split over ranks; a
    tensor-parallel group shares its batch (--tp T: devices / T data-parallel slices)."""
    bases = []
    splits_bn_batch = strategy in ("ddp", "fsdp", "hsdp", "pipeline") and not (strategy == "ddp" and sync_bn)
    slices = devices // tp if strategy in ("fsdp", "hsdp") else devices
    if has_batchnorm(model) and ((splits_bn_batch and (slices > 1 or strategy == "pipeline")) or grad_accum > 1):
        bases.append("batchnorm")
    if precision != "fp32":
        bases.append("bf16")
    bases = bases or ["exact"]
    return max(BASES[b][0] for b in bases), max(BASES[b][1] for b in bases), "+".join(bases)


def _params(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {k: v.float() for k, v in state.items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _loss_dev(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-8) for x, y in zip(a, b))


def _param_dev(a: dict, b: dict) -> float:
    """Relative L2 distance of all parameters together: ||a - b|| / ||b||."""
    if a.keys() != b.keys():
        return float("inf")
    diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    norm = sum(float(b[k].pow(2).sum()) for k in b)
    return (diff / max(norm, 1e-30)) ** 0.5


def _configs(strategies: list[str], devices: int, model: str, model_size: str, precision: str, steps: int,
             batch_size: int, size: str, sync_bn: bool, compile_backend: str | None, device: str, out_dir: str,
             grad_accum: int = 1, ac: str = "none"):
    """(single's config, [(cell, config)]): every cell trains the same global batch per optimiser step;
    --grad-accum and --ac apply to the cells, never to the single reference, which trains plainly."""
    base = RunConfig(model=model, model_size=model_size, precision=precision, batch_size=batch_size,
                     scaling="strong", epochs=1000, max_steps=steps, warmup_steps=0, dropout=0.0, size=size,
                     eval_each_epoch=False, device=device, out_dir=out_dir, compile=compile_backend is not None,
                     compile_backend=compile_backend or "inductor")
    cells = []
    for cell in strategies:
        strategy, mesh, schedule = parse_cell(cell)  # 'fsdp:tp2', 'hsdp:rep2:tp2', 'pipeline:gpipe'
        cells.append((cell, base.replace(strategy=strategy, devices=devices, schedule=schedule or "1f1b", **mesh,
                                         sync_bn=sync_bn and strategy == "ddp", grad_accum=grad_accum, ac=ac)))
    return base, cells


def check_parity(*, strategies: list[str], steps: int, **settings) -> None:
    """Every flag of bench parity, before anything runs: ValueError with the one line."""
    if steps < 1:
        raise ValueError(f"--steps {steps}: compare at least 1 step")
    if not strategies:
        raise ValueError("--strategies: name at least one cell, e.g. ddp,fsdp,pipeline:1f1b")
    if settings["devices"] < 2:
        raise ValueError(f"--gpus {settings['devices']}: parity compares 2 or more devices with single")
    if "independent" in strategies:
        raise ValueError("--strategies: independent trains N separate replicas that never exchange gradients, "
                         "so it is not the model single trains; leave it out (it measures contention, not parity)")
    base, cells = _configs(strategies, steps=steps, out_dir=tempfile.gettempdir(), **settings)
    base.validate()
    from emotion_models.models import check_model

    check_model(base.model, base.model_size)
    for cell, cfg in cells:
        if cfg.strategy == "pipeline" and cfg.grad_accum > 1:
            raise ValueError(f"--strategies {cell} with --grad-accum {cfg.grad_accum}: a pipeline accumulates over "
                             "its micro-batches; compare it without --grad-accum")
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"--strategies: pipeline:{cfg.schedule}: the schedule is one of {', '.join(SCHEDULES)}")
        cfg.validate()


def _run(cfg: RunConfig) -> str:
    """Run one cell; its result path, or the reason it failed."""
    outcome = run(cfg, own_process=True)  # single too: nothing of the cell before carries over
    if outcome.status != "ok" or outcome.path is None:
        raise RuntimeError(outcome.error or "no result on this node")
    return str(outcome.path)


def run_parity(*, strategies: list[str], devices: int, model: str, model_size: str, precision: str, steps: int,
               batch_size: int, size: str, sync_bn: bool, compile_backend: str | None, device: str,
               grad_accum: int = 1, ac: str = "none") -> list[ParityRow]:
    """One row per strategy cell, each compared with a `single` run of the same settings."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="emotion-bench-parity-") as tmp:
        base, cells = _configs(strategies, devices, model, model_size, precision, steps, batch_size, size, sync_bn,
                               compile_backend, device, tmp, grad_accum, ac)
        ref_params = str(Path(tmp, "single.pt"))
        ref = load_result(_run(base.replace(strategy="single", devices=1, save_params=ref_params)))
        for cell, cfg in cells:
            cfg = cfg.replace(save_params=str(Path(tmp, f"{cell}.pt")))
            strategy = cfg.strategy
            lt, pt, basis = tolerance(strategy, devices, model, precision, cfg.sync_bn, cfg.grad_accum, cfg.tp)
            try:
                res = load_result(_run(cfg))
                rows.append(ParityRow(cell, _loss_dev(res["losses"], ref["losses"]),
                                      _param_dev(_params(cfg.save_params), _params(ref_params)), lt, pt, basis))
            except Exception as exc:  # a cell that cannot run is a failed row, not a crash
                rows.append(ParityRow(cell, float("nan"), float("nan"), lt, pt, basis, error=str(exc)))
    return rows
