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
- The objective (OBJECTIVES) is what a window's figure is: throughput (samples/s), energy (samples
  per joule, 1 / the run's GPU energy per sample from NVML's counters; refused in one line where
  the devices have none) or time-to-f1 (windows measure throughput; then the measured candidates,
  best first, train whole runs toward single's best validation macro-F1 less --f1-tolerance until
  F1_CHECKS have reached it, and the quickest of those wins: F1Target).
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
# --objective energy: a window of this many times WINDOW_STEPS, so that it spans many of the monitor's
# 0.2 s power samples and NVML counter updates even where a step takes milliseconds (not yet run on a GPU)
ENERGY_WINDOW_X = 5
# --objective: the unit of a window's figure (higher is better for each)
OBJECTIVES = {"throughput": "samples/s", "energy": "samples/J", "time-to-f1": "samples/s"}
F1_CHECKS = 3  # time-to-f1: the fastest measured candidates that must each reach the F1 target
TRAIN_TIMEOUT_S = 4 * 3600  # time-to-f1: the longest a whole training run of a candidate may take
DRY_RUN_MFU = 0.4  # --dry-run's assumed share of the peak a training step reaches
GiB = 2**30


def check_objective(objective: str, device_type: str) -> None:
    """ValueError with the line where the objective is unknown or cannot be measured on these devices."""
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective {objective}: not one of {', '.join(OBJECTIVES)}")
    if objective == "energy" and device_type != "cuda":
        raise ValueError(f"--objective energy: a window's energy is read from NVML's counters on NVIDIA GPUs, and "
                         f"this run's devices are {device_type}: tune --objective throughput here")


def score(result: dict, objective: str) -> float:
    """A window's figure for the objective: samples/s, or samples per joule for energy (tune.Failed
    where the run read no energy)."""
    if objective != "energy":
        return float(result["throughput"]["samples_per_s"])
    per_sample = (result.get("utilization") or {}).get("gpu_energy_j_per_sample")
    if not per_sample:
        from .tune import Failed

        raise Failed("the run read no GPU energy (NVML gave no counter and no power samples in its window)"
                     if per_sample is None else "its window read 0 J: shorter than NVML's counter can see")
    return 1.0 / float(per_sample)


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
    windows: dict[str, float] = dataclasses.field(default_factory=dict)  # cell key -> the objective's figure of each anchor
    power_w: float | None = None  # --objective energy: one device's mean power in the single anchors' windows, W

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
                           ac=cfg.ac, tp=tp, replicate=rep, sequence_parallel=cfg.sequence_parallel)["samples_per_s"]
        except ValueError:
            return None

    def figure(self, cfg: RunConfig, objective: str = "throughput") -> float | None:
        """The objective's predicted figure of a candidate: samples/s; for energy, samples/J at the
        single anchors' power on each of its devices (the search's learned ratios correct the rest)."""
        thr = self.predict(cfg)
        if objective != "energy" or thr is None:
            return thr
        return thr / (cfg.devices * self.power_w) if self.power_w else None


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

    def __init__(self, setup: RunConfig, world: int, device_type: str, results: Path, timeout_s: float = 900,
                 objective: str = "throughput"):
        from .ab import REPO, Side

        self.objective = objective
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

    def record(self, cfg: RunConfig, **changes) -> dict:
        """One window's result record; changes (a whole training run's epochs, target F1) replace the
        window's settings. A run that fails takes its job down: a new job is started for the next
        window, and this candidate fails (tune.Failed, with the reason)."""
        from .ab import ABError
        from .cells import cell_key
        from .tune import Failed

        key = cell_key(cfg)
        tag = "f1" if changes else "w"
        k = len(list(self.results.glob(f"{key}-{tag}*.json")))
        steps = WINDOW_STEPS * (ENERGY_WINDOW_X if self.objective == "energy" else 1)
        window = dict(max_steps=cfg.warmup_steps + steps, epochs=10_000, eval_each_epoch=False, target_f1=None)
        c = cfg.replace(**{**window, **changes}, threads=self.threads, profile=False, out_dir=str(self.results),
                        run_id=f"{key}-{tag}{k}")
        # a whole training run (time-to-f1) may take hours on a large model: its own, longer limit
        try:
            return self.job.run(dataclasses.asdict(c), max(self.timeout_s, TRAIN_TIMEOUT_S) if changes else self.timeout_s,
                                result=True)
        except ABError as exc:
            self.job.close()
            self.job = self._start()
            raise Failed(str(exc)) from None

    def __call__(self, cfg: RunConfig) -> float:
        """The objective's figure of one window: the run's own samples/s, or samples/J."""
        return score(self.record(cfg), self.objective)

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
    device count (its contention c_N), each one window; with --objective energy, one device's mean
    power in the single windows too."""
    from .cells import cell_key
    from .tune_report import number

    single: dict[tuple[str, int], float] = {}
    measured: dict[str, float] = {}  # the objective's figure of each anchor
    power: list[float] = []
    first, unit = live[0].cfg, OBJECTIVES[windows.objective]
    for precision in sorted({c.cfg.precision for c in live}):
        batches = sorted({c.cfg.batch_size for c in live if c.cfg.precision == precision})
        for b in dict.fromkeys((batches[0], batches[-1])):
            cfg = _plain(first, strategy="single", devices=1, precision=precision, batch_size=b)
            rec = windows.record(cfg)
            measured[cell_key(cfg)] = score(rec, windows.objective)  # no energy on a single anchor: the tune stops
            thr = float(rec["throughput"]["samples_per_s"])
            single[(precision, b)] = b / thr
            power += [w for w in [(rec.get("utilization") or {}).get("gpu_power_w_mean")] if w]
            say(f"anchor: single {precision} b{b}: {thr:.1f} samples/s"
                + (f", {number(measured[cell_key(cfg)])} {unit}" if windows.objective == "energy" else ""))
    contention: dict[int, float] = {}
    n = max(c.cfg.devices for c in live) // max(first.nodes, 1)
    if n > 1:
        precision, b = min(single)
        cfg = _plain(first, strategy="independent", devices=n, precision=precision, batch_size=b)
        try:
            rec = windows.record(cfg)
            thr = float(rec["throughput"]["samples_per_s"])  # all n replicas' samples
            contention[n] = (b * n / thr) / single[(precision, b)]
            say(f"anchor: independent x{n}: contention c_{n} = {contention[n]:.2f}")
            measured[cell_key(cfg)] = score(rec, windows.objective)
        except Exception as exc:  # did not run: contention stays the assumed 1 (the family's first window
            say(f"anchor: independent x{n}: {exc}" + ("" if contention else "; contention assumed 1"))  # corrects it)
    return Anchors(single, contention, link, link, per_node, "measured", measured,
                   sum(power) / len(power) if power else None)


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


class F1Target:
    """--objective time-to-f1's check in the place of parity: the target is the reference's (single,
    plain) best validation macro-F1 over its epochs less `tolerance`; a candidate passes when a whole
    training run of it, with the same epochs, reaches the target, and its figure is the training
    time that took (s; evaluation excluded). The target is measured at the first check and kept in
    `path` (a resumed tune does not train the reference again)."""

    def __init__(self, windows: Windows, reference: RunConfig, tolerance: float, path: Path,
                 say: Callable[[str], None]):
        import json

        self.windows, self.reference, self.tolerance, self.path, self.say = windows, reference, tolerance, path, say
        self.target = json.loads(path.read_text())["target"] if path.exists() else None

    def _train(self, cfg: RunConfig, target: float | None) -> dict:
        return self.windows.record(cfg, epochs=cfg.epochs, max_steps=None, eval_each_epoch=True, target_f1=target)

    def _reference_target(self) -> float:
        """The target, from single's training run; tune.Failed (the tune stops, one line) where that run
        fails or records no validation F1: no candidate is judged against a target never measured."""
        import json

        from emotion_models.atomic import atomic_write_text

        from .tune import Failed

        try:
            q = self._train(self.reference, None).get("quality") or {}
        except Failed as exc:
            raise Failed(f"time-to-f1: single's reference run failed, so there is no F1 target: {exc}") from None
        if not q.get("val_macro_f1_by_epoch"):
            raise Failed("time-to-f1: single's reference run recorded no validation macro-F1 (a split without a "
                         "validation part?), so there is no F1 target")
        best = max(q["val_macro_f1_by_epoch"])
        target = best - self.tolerance
        atomic_write_text(self.path, json.dumps({"reference": dataclasses.asdict(self.reference), "best_val_f1": best,
                                                 "tolerance": self.tolerance, "target": target}, indent=1))
        self.say(f"time-to-f1: single's best val macro-F1 {best:.3f} in {self.reference.epochs} epochs; "
                 f"target {target:.3f} (--f1-tolerance {self.tolerance:g})")
        return target

    def __call__(self, cfg: RunConfig) -> str | float:
        """Seconds of training to the target, else why not (one line)."""
        from .tune import Failed

        if self.target is None:
            self.target = self._reference_target()
        try:
            q = self._train(cfg, self.target).get("quality") or {}
        except Failed as exc:
            return f"its training run failed: {exc}"
        if q.get("time_to_target_s") is None:
            best = max(q.get("val_macro_f1_by_epoch") or [float("nan")])
            return f"did not reach val macro-F1 {self.target:.3f} in {cfg.epochs} epochs (best {best:.3f})"
        self.say(f"time-to-f1: {cfg.strategy} reached {self.target:.3f} in {q['time_to_target_s']:.1f} s of training "
                 f"({q.get('epochs_to_target')} epochs)")
        return float(q["time_to_target_s"])


def f1_reference(live: list[Candidate]) -> RunConfig:
    """time-to-f1's reference: single, plain, at the space's smallest batch, fp32 where the space has it."""
    precisions = {c.cfg.precision for c in live}
    precision = "fp32" if "fp32" in precisions else sorted(precisions)[0]
    return _plain(live[0].cfg, strategy="single", devices=1, precision=precision,
                  batch_size=min(c.cfg.batch_size for c in live))


def link_for(folder: Path, devices: int, device_type: str, say: Callable[[str], None], tensor_parallel: bool = False):
    """The link a prediction's communication crosses: a `bench comm` fit measured here once (kept in
    folder/comm and reused on --resume), else a preset, said in one line. tensor_parallel: the space has
    tp candidates, so their collectives are measured as DTensor issues them too (comm's tp_ ops)."""
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
               "--ops", "all_reduce,all_gather,reduce_scatter" + (",tp_all_gather,tp_reduce_scatter,tp_all_reduce"
                                                                   if tensor_parallel else ""),
               "--max-bytes", "64M", "--out", str(comm_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["no output"])[-1]
            say(f"anchor: bench comm failed ({why}); the {preset} preset stands in for the link")
            return Link.named(preset)
    found = sorted(comm_dir.glob("*.comm.json"))
    return Link.measured(load(str(found[-1])))


def anchors_cached(path: Path, resume: bool, make: Callable[[], Anchors], objective: str = "throughput") -> Anchors:
    """The anchors of an interrupted tune (path, on --resume), else measured now and kept there."""
    import json

    from emotion_models.atomic import atomic_write_text

    from .predict import Link

    if resume and path.exists():
        raw = json.loads(path.read_text())
        return Anchors({(p, int(b)): t for p, b, t in raw["single_s"]}, {int(n): c for n, c in raw["contention"].items()},
                       Link(**raw["intra"]), Link(**raw["inter"]), raw["per_node"], raw["source"], raw["windows"],
                       raw.get("power_w"))
    a = make()
    atomic_write_text(path, json.dumps({"single_s": [[p, b, t] for (p, b), t in a.single_s.items()],
                                        "contention": a.contention, "intra": dataclasses.asdict(a.intra),
                                        "inter": dataclasses.asdict(a.inter), "per_node": a.per_node,
                                        "source": a.source, "windows": a.windows, "power_w": a.power_w,
                                        "objective": objective}, indent=1))
    return a


def seed_state(path: Path, anchors: Anchors, keys: set[str], objective: str = "throughput") -> None:
    """A new search's state holding the anchors' windows of candidates (single at the smallest and
    largest batch is one): measured once, they count as those candidates' first windows."""
    import json

    from emotion_models.atomic import atomic_write_text

    windows = {k: [v] for k, v in anchors.windows.items() if k in keys}
    atomic_write_text(path, json.dumps({"windows": windows, "parity": {}, "trials": [], "losses": 0,
                                        "objective": objective}, indent=1))
