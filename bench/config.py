"""Run configuration: one frozen, keyword-only dataclass.

Each field is a setting declared once, with its default, its help text (unit included) and, for
the settings `bench run` exposes, its flag: the CLI derives its options from these fields
(bench/commands/common.py: `config_options`), so a default or a help text is never written twice.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

PRECISIONS = ("fp32", "bf16", "fp16")
SCALINGS = ("weak", "strong")
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")
MULTI_STAGE = ("interleaved-1f1b", "zero-bubble")  # --stages-per-rank V stages on each rank, looped
AC_EVERY = {"none": 0, "full": 1, "selective": 2}  # --ac: one block in every this many is checkpointed (0: none)
AC_MODES = tuple(AC_EVERY)
RESHARD = ("auto", "true", "false")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A flag or combination that cannot run; the message is the one line users see."""


def setting(default, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (), cli: bool = True):
    """A RunConfig field: its default, its help (with the unit), its CLI flag (default --field-name).

    cli=False: a setting that callers (sweep, parity, benchmarks) set, not users of `bench run`.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "aliases": aliases, "cli": cli})


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    strategy: str = setting("single", "Parallelism strategy (bench list): single, dp, ddp, fsdp, hsdp, tp, pipeline, "
                                      "model-parallel, independent, tp-rank.")
    devices: int = setting(1, "Devices in the whole run; without CUDA, CPU worker processes (gloo).",
                           flag="--gpus", aliases=("--devices",))
    model: str = setting("cnn", "Model zoo name (bench list): cnn, crnn, lstm, transformer, conformer, wav2vec2-base, hubert-large, xlsr-2b, ...")
    model_size: str = setting("base", "Model size: small, base, large.")
    precision: str = setting("fp32", "fp32, bf16 (autocast) or fp16 (autocast + GradScaler, CUDA only).")
    compile: bool = setting(False, "torch.compile each block before wrapping.", flag="--compile/--no-compile")
    compile_backend: str = setting("inductor", "torch.compile backend (aot_eager compiles in seconds, for tests).")
    epochs: int = setting(8, "Passes over the training split.")
    batch_size: int = setting(32, "Samples per step: per device (weak scaling) or global (strong scaling).")
    scaling: str = setting("weak", "weak: --batch-size per device; strong: --batch-size is the global batch.")
    dataset: str = setting("synthetic", "'synthetic' (embedded default) or a folder of WAV files.")
    size: str = setting("small", "Synthetic size: tiny (128 clips), small (1,281), medium (3,201), full (12,798), "
                                 "or a clip count.")
    seed: int = setting(0, "Seed of model init, batch order and crops.")
    data_seed: int = setting(0, "Seed of the synthetic data and the speaker split (same for every run by default).")
    device: str = setting("auto", "auto (CUDA if available), cpu or cuda.")
    warmup_steps: int = setting(5, "Steps run before the timed window (not measured).")
    target_f1: float | None = setting(None, "Val macro-F1 to reach; its training time (s) is recorded.")
    lr: float = setting(2e-3, "AdamW learning rate.")
    dropout: float = setting(0.1, "Model dropout probability.")
    schedule: str = setting("1f1b", "Pipeline schedule: gpipe, 1f1b, interleaved-1f1b or zero-bubble (torch's "
                                    "interleaved zero bubble); the last two hold --stages-per-rank stages per rank.")
    stages_per_rank: int = setting(2, "Pipeline stages (virtual stages) per rank with --schedule interleaved-1f1b "
                                      "or zero-bubble: the model is cut into --gpus x V stages.")
    microbatches: int | None = setting(None, "Pipeline micro-batches per step (default: 2 x stages).")
    sync_bn: bool = setting(False, "ddp: synchronise BatchNorm statistics across ranks.", flag="--sync-bn")
    grad_accum: int = setting(1, "Micro-steps per optimiser step (gradient accumulation), gradients synchronised on "
                                 "the last only: global batch = devices x --batch-size x K (weak scaling).")
    ac: str = setting("none", "Activation checkpointing: none, full (every block recomputed in backward) or "
                              "selective (every other block).")
    reshard_after_forward: str = setting("auto", "fsdp: true frees each block's gathered parameters after its "
                                                 "forward (ZeRO-3), false keeps them to backward (ZeRO-2-like); "
                                                 "auto: FSDP2's default (true for blocks, false for the root).")
    offload: bool = setting(False, "fsdp: parameters, gradients and optimiser state on the host (FSDP2's "
                                   "CPUOffloadPolicy, optimiser step on the CPU); CUDA only.",
                            flag="--offload/--no-offload")
    tp: int = setting(1, "Tensor-parallel degree beside data parallel: with fsdp or hsdp a 2-D mesh (FSDP2 over "
                         "--gpus / N data-parallel ranks, tensor parallel over N); alone, --tp N = --gpus is "
                         "--strategy tp and a smaller N is fsdp over the rest.")
    dp_replicate: int = setting(1, "fsdp / hsdp: replicas of the sharded model (HSDP: shard within each group of "
                                   "--gpus / R ranks, all-reduce across the R groups); hsdp's default: --nnodes.")
    pp: int = setting(1, "Pipeline degree beside data parallel: --strategy pipeline --gpus N --pp P runs N / P "
                         "pipeline replicas of P stages, each stage's gradients all-reduced over its replicas "
                         "(DDP); alone, --pp N = --gpus is --strategy pipeline.")
    sequence_parallel: bool = setting(True, "With tensor parallel: each rank holds 1/T of the sequence for the layer "
                                            "norms, dropouts and residuals (Megatron style; an all-gather and a "
                                            "reduce-scatter in place of each all-reduce).",
                                      flag="--sequence-parallel/--no-sequence-parallel")
    nodes: int = setting(1, "Machines taking part (torchrun --nnodes); run the same command on each.", flag="--nnodes")
    node_rank: int = setting(0, "This machine's index, 0 .. nnodes-1.")
    rdzv_endpoint: str | None = setting(None, "HOST:PORT of the rendezvous (multi-node), the same on every node.")
    threads: int | None = setting(None, "torch threads per process (default: cores / processes on this machine).")
    timeout_s: float = setting(300.0, "Seconds a collective may wait for a hung or dead peer before the run fails.")
    max_steps: int | None = setting(None, "Stop after this many optimiser steps (default: all epochs).")
    peak_tflops: float | None = setting(None, "Per-device peak TFLOP/s used for MFU (default: data-sheet table).")
    profile: bool = setting(False, "Profile --profile-steps steps after the timed window on every rank: Chrome traces "
                                   "beside the result and a step breakdown in it (timed figures unaffected).",
                            flag="--profile/--no-profile")
    profile_steps: int = setting(5, "Steps profiled after the timed window with --profile.")
    out_dir: str = setting("results/runs", "Folder for the result file <run_id>.json.", flag="--out")
    # set by callers, not by `bench run` users
    weight_decay: float = setting(1e-2, "AdamW weight decay.", cli=False)
    eval_each_epoch: bool = setting(True, "Val macro-F1 after every epoch (outside the timed window).", cli=False)
    save_params: str | None = setting(None, "Write the final full state dict here (bench parity).", cli=False)
    repeat: int = setting(0, "Index of this repeat of a sweep cell (its seed differs per repeat).", cli=False)
    run_id: str | None = setting(None, "Name of the result file; derived from the cell when None.", cli=False)
    threads_source: str | None = setting(None, "What decided --threads: the flag, OMP_NUM_THREADS or the default "
                                               "(set when the run starts).", cli=False)

    def __post_init__(self):
        # --tp N without a strategy (single is the default): tensor parallel over every device, or
        # FSDP2 over the rest of them, as torchtitan's data-parallel shard degree fills what is left
        if self.tp > 1 and self.strategy == "single":
            object.__setattr__(self, "strategy", "tp" if self.tp == self.devices else "fsdp")
        if self.pp > 1 and self.strategy == "single":  # --pp P: pipeline, replicated over what is left
            object.__setattr__(self, "strategy", "pipeline")
        # one run, one name: tensor parallel over every device is --strategy tp, a pipeline over every
        # device is --strategy pipeline, whatever the flag said
        for flag, strategy in (("tp", "tp"), ("pp", "pipeline")):
            if self.strategy == strategy and getattr(self, flag) == self.devices > 1:
                object.__setattr__(self, flag, 1)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def global_batch_size(self) -> int:
        """Samples per optimiser step over all devices (K micro-batches each, with --grad-accum K)."""
        return self.batch_size * self.devices * self.grad_accum if self.scaling == "weak" else self.batch_size

    def validate(self) -> None:
        """Checks that need no hardware; strategy-specific checks live with the strategies."""
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision} is not one of {', '.join(PRECISIONS)}")
        if self.scaling not in SCALINGS:
            raise ConfigError(f"--scaling {self.scaling} is not one of {', '.join(SCALINGS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule} is not one of {', '.join(SCHEDULES)}")
        if self.ac not in AC_MODES:
            raise ConfigError(f"--ac {self.ac} is not one of {', '.join(AC_MODES)}")
        if self.reshard_after_forward not in RESHARD:
            raise ConfigError(f"--reshard-after-forward {self.reshard_after_forward} is not one of {', '.join(RESHARD)}")
        if self.stages_per_rank < 1:
            raise ConfigError(f"--stages-per-rank must be at least 1 (got {self.stages_per_rank})")
        if self.grad_accum < 1:
            raise ConfigError(f"--grad-accum must be at least 1 (got {self.grad_accum}): 1 is no accumulation")
        if self.offload and self.strategy not in ("fsdp", "hsdp"):
            raise ConfigError(f"--offload is FSDP2's CPUOffloadPolicy: use it with --strategy fsdp, not {self.strategy}")
        if self.reshard_after_forward != "auto" and self.strategy not in ("fsdp", "hsdp"):
            raise ConfigError(f"--reshard-after-forward applies to --strategy fsdp, not {self.strategy}")
        self._validate_mesh()
        if self.device not in DEVICES:
            raise ConfigError(f"--device {self.device} is not one of {', '.join(DEVICES)}")
        for name in ("devices", "nodes", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag_of(name)} must be at least 1 (got {getattr(self, name)})")
        # optional counts: None is the default, so 0 would silently mean it; refused, like negatives
        for name, default in (("threads", "cores / processes on this machine"), ("max_steps", "all epochs"),
                              ("microbatches", "2 x stages")):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{flag_of(name)} must be at least 1 (got {value}); leave it out for the default "
                                  f"({default})")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"--peak-tflops must be a positive number of TFLOP/s per device (got {self.peak_tflops})")
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout-s must be a positive number of seconds (got {self.timeout_s})")
        if self.warmup_steps < 0:
            raise ConfigError("--warmup-steps must be 0 or more")
        if self.profile and self.profile_steps < 1:
            raise ConfigError(f"--profile-steps must be at least 1 with --profile (got {self.profile_steps})")
        if self.devices % self.nodes:
            raise ConfigError(f"--gpus {self.devices} does not divide over --nnodes {self.nodes}: "
                              "give the total device count, a multiple of the node count")
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        if self.scaling == "strong" and self.batch_size % (self.devices * self.grad_accum):
            over = f"{self.devices} devices" + (f" x {self.grad_accum} micro-steps" if self.grad_accum > 1 else "")
            what = "the device count" if self.grad_accum == 1 else f"{self.devices * self.grad_accum} (devices x --grad-accum)"
            raise ConfigError(f"strong scaling splits --batch-size {self.batch_size} over {over}: use a multiple of {what}")
        if self.dataset != "synthetic" and not os.path.exists(self.dataset):
            raise ConfigError(f"--dataset {self.dataset}: no such folder; pass 'synthetic' or a folder of WAV files")

    def _validate_mesh(self) -> None:
        for name in ("tp", "dp_replicate", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag_of(name)} must be at least 1 (got {getattr(self, name)}): 1 is none")
        if self.dp_replicate > 1 and self.strategy not in ("fsdp", "hsdp"):
            raise ConfigError(f"--dp-replicate replicates FSDP2's sharded model (HSDP): use it with --strategy fsdp or "
                              f"hsdp, not {self.strategy}")
        if self.tp > 1 and self.strategy not in ("fsdp", "hsdp", "tp", "tp-rank"):
            raise ConfigError(f"--tp {self.tp} composes with --strategy fsdp or hsdp (2-D) or is --strategy tp (or "
                              f"tp-rank, one rank's shapes alone), not {self.strategy}")
        if self.pp > 1 and self.strategy != "pipeline":
            raise ConfigError(f"--pp {self.pp} is the pipeline's degree: use it with --strategy pipeline, not "
                              f"{self.strategy}")
        if self.pp > 1 and self.devices % self.pp:
            raise ConfigError(f"--gpus {self.devices} does not split into pipelines of --pp {self.pp} stages: use a "
                              f"multiple of {self.pp}")
        if self.strategy in ("fsdp", "hsdp"):
            from .strategies import replicas

            r = replicas(self)
            if self.devices % (r * self.tp):
                raise ConfigError(f"--gpus {self.devices} does not split into {r} replicas x {self.tp} tensor-parallel "
                                  f"ranks: use a multiple of {r * self.tp}")


def cli_fields() -> list[dataclasses.Field]:
    """The settings `bench run` exposes, in the order its --help lists them."""
    return [f for f in dataclasses.fields(RunConfig) if f.metadata["cli"]]


def flag_of(name: str) -> str:
    """The user-facing flag of a setting: devices -> --gpus, out_dir -> --out."""
    f = next(f for f in dataclasses.fields(RunConfig) if f.name == name)
    flag = f.metadata.get("flag")
    return flag.split("/")[0] if flag else "--" + name.replace("_", "-")


def parse_duration(text: str) -> float:
    """'20m', '90s', '1h', '1h30m' or a number of seconds -> seconds."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
    if not parts or "".join(a + u for a, u in parts) != t:
        raise ConfigError(f"--budget {text}: give a duration like 20m, 90s, 1h30m or seconds")
    return sum(float(a) * {"h": 3600, "m": 60, "s": 1}[u] for a, u in parts)
