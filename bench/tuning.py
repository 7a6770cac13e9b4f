"""bench tune on real hardware (issue 25): the space, the instruments bench/tune.py's search is
given, and the command line of the winner.

- The space is a sweep TOML or preset (bench/presets/tune.toml by default, a `batch` axis among its
  keys) with --model and --gpus put in. Every cell is a candidate; the sweep's own rules prune
  it before anything runs: validity, the strategy's refusals, the memory estimate against the
  device's memory, the devices at hand.
- Anchors, measured first (measure_anchors): single at the smallest and the largest batch of the
  space in each precision (a step time a + b x batch through the two), independent at N for
  contention, and a `bench comm` fit of the link. From them every candidate gets bench predict's
  figure (bench/predict.py). The search then measures each strategy family once before it ranks
  the rest, and scales the family's predictions by what it measured: that first window plays the
  profiled run's part (overlap and waits are in what it measured).
- A window (Windows) is one candidate's short run in a bench ab job (bench/ab.py's Job: one
  torchrun job whose processes stay between visits, each rank pinned to its core, tensors on huge
  pages): WINDOW_STEPS timed steps after the run's warm-up; its figure is the run's own samples/s.
- Parity (parity_check): bench parity of a candidate against single, on its stated basis.
- --dry-run measures nothing: single's step time is the model's FLOPs (3 x forward) at an assumed
  MFU of a stated peak, the links are presets, and the memory is the estimate, rehearsed with the
  fake process group for the top candidates (bench/rehearse.py).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, RunConfig, cli_fields, flag_of
from .tune import Candidate

WINDOW_STEPS = 12  # timed steps of one window, after the run's own --warmup-steps
DRY_RUN_MFU = 0.4  # --dry-run's assumed share of the peak a training step reaches
GiB = 2**30


def load_space(space: str, model: str | None, gpus: int | None, nodes: int, run: dict):
    """The sweep spec of the space with --model, --gpus, --nnodes and the run settings put in."""
    from .sweep import load_spec

    spec = load_spec(space)
    if model:
        spec.models = [model]
    if gpus:
        spec.gpus = [gpus]
    spec.repeat = 1
    spec.run.update({k: v for k, v in run.items() if v is not None}, nodes=nodes)
    spec.check()
    return spec


def candidates(spec, device_type: str) -> list[Candidate]:
    """Every cell of the space as a candidate (nothing pruned yet); a one-device cell on one node."""
    from .sweep import expand

    return [Candidate(c.key, c.cfg.replace(nodes=1, rdzv_endpoint=None) if c.cfg.devices == 1 else c.cfg)
            for c in expand(spec, device_type, "unused", why_not=lambda cfg: None)]


def why_not(device_type: str, capacity_bytes: int | None) -> Callable[[RunConfig], str | None]:
    """The sweep's skip rules: here (capacity None) this machine's devices and memory; in a dry run
    at any scale, validity, the strategy's own refusals and the estimate against capacity_bytes."""
    from .sweep import why_not_here

    if capacity_bytes is None:
        return lambda cfg: why_not_here(cfg, device_type)

    def at_scale(cfg: RunConfig) -> str | None:
        from .memory import estimate
        from .strategies import check_strategy

        try:
            cfg.validate()
            check_strategy(cfg, device_type)
            est = estimate(cfg, device_type)
        except (ConfigError, ValueError) as exc:
            return str(exc)
        if est.total_bytes > capacity_bytes:
            return f"does not fit: estimated {est.text()} > {capacity_bytes / GiB:.0f} GiB per device (--device-memory)"
        return None

    return at_scale


def with_memory(live: list[Candidate], device_type: str) -> None:
    """Each candidate's memory estimate per device, in GiB (None where the estimate has none)."""
    from .memory import estimate

    for c in live:
        try:
            c.memory_gib = estimate(c.cfg, device_type).total_bytes / GiB
        except (ConfigError, ValueError, RuntimeError):
            c.memory_gib = None


def family_mesh(cfg: RunConfig) -> tuple[int, int]:
    """(tensor-parallel degree, replicas) as bench predict reads a cell (predict.mesh_of for a config)."""
    from .strategies import replicas

    if cfg.strategy == "pipeline":
        return 1, cfg.devices // cfg.pp if cfg.pp > 1 else 1
    if cfg.strategy in ("fsdp", "hsdp"):
        return cfg.tp, replicas(cfg)
    return 1, 1


@functools.lru_cache(maxsize=None)
def _shape(model: str, size: str) -> tuple[int, int]:
    """(parameters, blocks) of a model, counted on the meta device."""
    from emotion_models.models import build_model

    m = build_model(model, size=size, device="meta")
    return sum(p.numel() for p in m.parameters()), len(m.blocks)


@dataclasses.dataclass
class Anchors:
    """What every prediction starts from: single's step time in seconds by (precision, batch), the
    contention c_N of N independent replicas, and the links."""

    single_s: dict[tuple[str, int], float]
    contention: dict[int, float]
    intra: object  # predict.Link
    inter: object
    per_node: int
    source: str  # how the single figures were had: measured, or assumed (dry run)
    windows: dict[str, float] = dataclasses.field(default_factory=dict)  # cell key -> samples/s of each anchor

    def step_s(self, precision: str, batch: int) -> float | None:
        """Single's step at a batch: measured, else on the line through the two measured batches
        nearest it (a fixed cost plus one per sample), else in proportion to the one measured."""
        pts = sorted((b, t) for (p, b), t in self.single_s.items() if p == precision)
        if not pts:
            return None
        if len(pts) == 1:
            return pts[0][1] * batch / pts[0][0]
        (b0, t0), (b1, t1) = sorted(pts, key=lambda bt: abs(bt[0] - batch))[:2]
        slope = (t1 - t0) / (b1 - b0)
        # below the smallest anchor a steep line could reach 0: never under a tenth of proportion
        return max(t0 + slope * (batch - b0), t0 * batch / b0 * 0.1)

    def predict(self, cfg: RunConfig) -> float | None:
        """bench predict's samples/s for a candidate; None where its model has no figure."""
        from .predict import PREDICTED, Inputs, predict

        if cfg.strategy not in (*PREDICTED, "single") or cfg.scaling != "weak":
            return None
        t1 = self.step_s(cfg.precision, cfg.batch_size)
        if t1 is None:
            return None
        inp = Inputs(cfg.model, cfg.model_size, cfg.precision, cfg.batch_size, t1, cfg.batch_size / t1,
                     *_shape(cfg.model, cfg.model_size), cfg.microbatches, contention=self.contention)
        tp, rep = family_mesh(cfg)
        nodes = max(cfg.nodes, -(-cfg.devices // self.per_node))
        try:
            return predict(inp, cfg.strategy, cfg.devices, nodes, self.intra, self.inter, grad_accum=cfg.grad_accum,
                           ac=cfg.ac, tp=tp, replicate=rep)["samples_per_s"]
        except ValueError:
            return None


def assumed_anchors(live: list[Candidate], peak_tflops: float | None, per_node: int) -> Anchors:
    """--dry-run's anchors: single's step = 3 x forward FLOPs / (peak x DRY_RUN_MFU), nvlink4 within
    a node and ib-ndr across."""
    from emotion_models.models import build_model

    from .predict import Link

    single: dict[tuple[str, int], float] = {}
    for c in live:
        key = (c.cfg.precision, c.cfg.batch_size)
        if key not in single:
            peak = peak_tflops or {"fp32": 67.0, "bf16": 989.5, "fp16": 989.5}[c.cfg.precision]  # H100 SXM
            flops = 3 * sum(build_model(c.cfg.model, size=c.cfg.model_size, device="meta").block_flops(c.cfg.batch_size))
            single[key] = flops / (peak * 1e12 * DRY_RUN_MFU)
    where = f"--peak-tflops {peak_tflops:g}" if peak_tflops else "an H100 SXM's data-sheet peak"
    return Anchors(single, {}, Link.named("nvlink4"), Link.named("ib-ndr"), per_node,
                   f"assumed: {DRY_RUN_MFU:.0%} of {where}, links nvlink4 / ib-ndr")


def run_command(cfg: RunConfig) -> str:
    """The `bench run` command line of a configuration: every setting that is not the default."""
    default = RunConfig()
    parts = ["bench run"]
    for f in cli_fields():
        value = getattr(cfg, f.name)
        if f.name in ("out_dir", "max_steps", "epochs", "warmup_steps") or value == getattr(default, f.name):
            continue
        flag = f.metadata.get("flag") or ""
        if isinstance(value, bool):
            on, _, off = (flag or f"--{f.name.replace('_', '-')}").partition("/")
            parts.append(on if value else (off or f"--no-{f.name.replace('_', '-')}"))
        elif value is not None:
            parts.append(f"{flag_of(f.name)} {value}")
    return " ".join(parts)


class Windows:
    """Short measured windows in one bench ab job of this working tree (world = the space's largest
    device count); single cells run on rank 0 while the others wait, as in the gate. Each window is
    also a result file, `<cell key>-w<k>.json` in `results` (bench report and compare read them);
    the job's own files live in a temporary folder."""

    def __init__(self, setup: RunConfig, world: int, device_type: str, results: Path, timeout_s: float = 900):
        from .ab import REPO, Side

        cores = len(os.sched_getaffinity(0))
        self.threads = max(1, cores // world)  # on CPU one core per rank, as the gate pins them
        self.side = Side("tune", "working tree", REPO, {"EMOTION_BENCH_AB_DEVICE": device_type})
        self.setup, self.world, self.results, self.timeout_s = dataclasses.asdict(setup), world, results, timeout_s
        self.jobs = Path(tempfile.mkdtemp(prefix="emotion-bench-tune-"))
        results.mkdir(parents=True, exist_ok=True)
        self.job = self._start()

    def _start(self):
        from .ab import Job

        job = Job(self.side, self.world, self.threads, self.setup, self.jobs / f"job-{len(list(self.jobs.iterdir()))}")
        job.wait_ready(self.timeout_s)
        return job

    def window(self, cfg: RunConfig) -> dict:
        from .cells import cell_key

        key = cell_key(cfg)
        k = len(list(self.results.glob(f"{key}-w*.json")))
        c = cfg.replace(max_steps=cfg.warmup_steps + WINDOW_STEPS, epochs=10_000, eval_each_epoch=False,
                        threads=self.threads, target_f1=None, profile=False, out_dir=str(self.results),
                        run_id=f"{key}-w{k}")
        return self.job.run(dataclasses.asdict(c), self.timeout_s, result=True)

    def __call__(self, cfg: RunConfig) -> float:
        """samples/s of one window, the run's own figure. A run that fails takes its job down: a new
        job is started for the next window, and this candidate fails (tune.Failed, with the reason)."""
        from .ab import ABError
        from .tune import Failed

        try:
            return float(self.window(cfg)["throughput"]["samples_per_s"])
        except ABError as exc:
            self.job.close()
            self.job = self._start()
            raise Failed(str(exc)) from None

    def close(self) -> None:
        import shutil

        self.job.close()
        shutil.rmtree(self.jobs, ignore_errors=True)


def _plain(cfg: RunConfig, **changes) -> RunConfig:
    """An anchor: cfg's model and run settings, with none of a candidate's trades or mesh."""
    return cfg.replace(nodes=1, rdzv_endpoint=None, ac="none", grad_accum=1, compile=False, tp=1, pp=1, dp_replicate=1,
                       offload=False, reshard_after_forward="auto", microbatches=None, **changes)


def measure_anchors(live: list[Candidate], windows: Windows, link, per_node: int, say: Callable[[str], None]) -> Anchors:
    """Single at the smallest and largest batch of each precision, and independent at the largest
    device count (its contention c_N), each one window."""
    from .cells import cell_key

    single: dict[tuple[str, int], float] = {}
    measured: dict[str, float] = {}
    first = live[0].cfg
    for precision in sorted({c.cfg.precision for c in live}):
        batches = sorted({c.cfg.batch_size for c in live if c.cfg.precision == precision})
        for b in dict.fromkeys((batches[0], batches[-1])):
            cfg = _plain(first, strategy="single", devices=1, precision=precision, batch_size=b)
            thr = windows(cfg)
            single[(precision, b)] = b / thr
            measured[cell_key(cfg)] = thr
            say(f"anchor: single {precision} b{b}: {thr:.1f} samples/s")
    contention: dict[int, float] = {}
    n = max(c.cfg.devices for c in live) // max(first.nodes, 1)
    if n > 1:
        precision, b = min(single)
        cfg = _plain(first, strategy="independent", devices=n, precision=precision, batch_size=b)
        try:
            thr = windows(cfg)  # all n replicas' samples
            measured[cell_key(cfg)] = thr
            contention[n] = (b * n / thr) / single[(precision, b)]
            say(f"anchor: independent x{n}: contention c_{n} = {contention[n]:.2f}")
        except Exception as exc:  # contention stays the assumed 1, and the family's first window corrects it
            say(f"anchor: independent x{n} did not run ({exc}); contention assumed 1")
    return Anchors(single, contention, link, link, per_node, "measured", measured)


def parity_check(cfg: RunConfig, steps: int = 3) -> str | None:
    """None when cfg still trains single's model (bench parity on its basis), else why not."""
    from .parity import run_parity

    if cfg.strategy == "single" and cfg.grad_accum == 1 and cfg.ac == "none" and not cfg.compile:
        return None  # the reference itself
    mesh = "".join(f":{tag}{v}" for tag, v in (("tp", cfg.tp), ("rep", cfg.dp_replicate), ("pp", cfg.pp)) if v > 1)
    schedule = f":{cfg.schedule}" if cfg.strategy == "pipeline" and cfg.schedule != "1f1b" else ""
    tensor_parallel = cfg.tp > 1 or cfg.strategy == "tp"
    cell = cfg.strategy + mesh + schedule + (":nosp" if tensor_parallel and not cfg.sequence_parallel else "")
    row = run_parity(strategies=[cell], devices=cfg.devices, model=cfg.model, model_size=cfg.model_size,
                     precision=cfg.precision, steps=steps, batch_size=cfg.batch_size * cfg.devices * cfg.grad_accum,
                     size=cfg.size, sync_bn=cfg.sync_bn, compile_backend=cfg.compile_backend if cfg.compile else None,
                     device=cfg.device, grad_accum=cfg.grad_accum, ac=cfg.ac)[0]
    if row.ok:
        return None
    if row.error:
        return f"parity run failed: {row.error}"
    return (f"parity ({row.basis}): loss {row.loss_dev:.1e} (limit {row.loss_tol:.0e}), parameters "
            f"{row.param_dev:.1e} (limit {row.param_tol:.0e}) from single's")


def link_for(folder: Path, devices: int, device_type: str, say: Callable[[str], None]):
    """The link a prediction's communication crosses: a `bench comm` fit measured here once (kept in
    folder/comm and reused on --resume), else a preset, said in one line."""
    import subprocess
    import sys

    from .comm import load
    from .predict import Link

    preset = "100gbe" if device_type == "cpu" else "nvlink4"
    if devices < 2:
        return Link.named(preset)
    comm_dir = folder / "comm"
    if not list(comm_dir.glob("*.comm.json")):
        say(f"anchor: bench comm --gpus {devices} (the link's fit)")
        cmd = [sys.executable, "-m", "bench", "comm", "--gpus", str(devices), "--device", device_type,
               "--ops", "all_reduce,all_gather,reduce_scatter", "--max-bytes", "64M", "--out", str(comm_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["no output"])[-1]
            say(f"anchor: bench comm failed ({why}); the {preset} preset stands in for the link")
            return Link.named(preset)
    found = sorted(comm_dir.glob("*.comm.json"))
    return Link.measured(load(str(found[-1])))


def anchors_cached(path: Path, resume: bool, make: Callable[[], Anchors]) -> Anchors:
    """The anchors of an interrupted tune (path, on --resume), else measured now and kept there."""
    import json

    from emotion_models.atomic import atomic_write_text

    from .predict import Link

    if resume and path.exists():
        raw = json.loads(path.read_text())
        return Anchors({(p, int(b)): t for p, b, t in raw["single_s"]}, {int(n): c for n, c in raw["contention"].items()},
                       Link(**raw["intra"]), Link(**raw["inter"]), raw["per_node"], raw["source"], raw["windows"])
    a = make()
    atomic_write_text(path, json.dumps({"single_s": [[p, b, t] for (p, b), t in a.single_s.items()],
                                        "contention": a.contention, "intra": dataclasses.asdict(a.intra),
                                        "inter": dataclasses.asdict(a.inter), "per_node": a.per_node,
                                        "source": a.source, "windows": a.windows}, indent=1))
    return a


def seed_state(path: Path, anchors: Anchors, keys: set[str]) -> None:
    """A new search's state holding the anchors' windows of candidates (single at the smallest and
    largest batch is one): measured once, they count as those candidates' first windows."""
    import json

    from emotion_models.atomic import atomic_write_text

    windows = {k: [v] for k, v in anchors.windows.items() if k in keys}
    atomic_write_text(path, json.dumps({"windows": windows, "parity": {}, "trials": [], "losses": 0}, indent=1))
