"""The settings of a training run, as dataclasses: the one place their defaults are written.

Each is the schema of one config group (`trainer`, `optim`, `callbacks`, `logger`, `diagnostics`, `paths`) or key
(`faults`);
groundthink/schema.py turns them into Hydra structured configs, so a YAML file holds only what differs from these
defaults and a wrong type or an unknown key is refused when the config is composed (before a run folder exists).
Code below the entry point receives these objects, never the whole config. This module imports nothing heavy
(no torch, no Lightning), so composing and checking a config does not pay for the training stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class TrainerSettings:
    """The `trainer` group: how long, on what, in which precision."""

    max_steps: int = 300
    # fp32 is the default, so runs compare exactly with earlier ones. On a CPU with bf16 matmuls bf16-mixed is faster
    # (2 cores, AVX-512 bf16: the default run 7.6k vs 6.1k tokens/s, `8m` at 8 x 256 1.6k vs 0.87k; README "Speed on
    # CPU"). fp16 autocast is slow on CPU. Use bf16-mixed on GPU (trainer=gpu).
    precision: str = "32-true"  # 32-true | bf16-mixed
    accelerator: str = "auto"
    devices: Any = 1  # a count, "auto" or a list of device indices (Lightning's `devices`)
    num_nodes: int = 1
    strategy: str = "auto"
    val_every_n_steps: int = 50  # also validates after the last step
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    deterministic: bool = True
    num_threads: int | None = None  # torch CPU threads; null = torch's default
    # glibc's malloc keeps the memory a step frees for the next step's tensors instead of giving it back to the
    # kernel (groundthink/training/host_memory.py): thousands of page faults per CPU step down to about none, the
    # default run's median step 1.1x faster on 2 cores, the numbers computed unchanged. No effect without glibc.
    keep_freed_memory: bool = True
    # torch.compile each block in place (regional: one set of graphs for all blocks, one more for validation's
    # no-grad mode, one per StateNorm phase; refused with RoPE attention, which reads the exact stream position).
    # The recurrence ops (WKV-6, SSD, GLA, the causal conv) run between the graphs, uncompiled. 8m on 2 CPU cores:
    # first step 26-45 s with an empty inductor cache, steps 1.0-1.2x faster (README: Speed on CPU).
    compile: bool = False
    # With compile: trace the ops' pure-PyTorch paths into the graphs too (8m: first step 75-91 s cold, steps 1.2-1.4x
    # faster). The CUDA kernels always run outside the graphs.
    compile_ops: bool = False

    def __post_init__(self) -> None:
        if self.compile_ops and not self.compile:
            raise ValueError(
                "trainer.compile_ops=true only changes what trainer.compile traces, and trainer.compile is false: "
                "set trainer.compile=true as well, or drop trainer.compile_ops"
            )


@dataclass
class OptimSettings:
    """The `optim` group: AdamW over the model's parameter groups, linear warmup then cosine decay."""

    lr: float = 3.0e-3
    weight_decay: float = 0.1
    # Weight decay on the low-rank data-dependent mixing/decay projections (RWKV-6's time_maa_w1/w2 and
    # time_decay_w1/w2). RWKV-LM's optimizer groups do not decay them, and neither does GroundThink by default.
    lora_weight_decay: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0  # clip the total gradient norm (null = no clipping)
    # Entropy regularisation of the output distribution: loss - entropy_coef * mean entropy (0 = off).
    entropy_coef: float = 0.0


@dataclass
class CheckpointSettings:
    every_n_steps: int = 100
    keep: int = 3  # newest step_* checkpoints kept besides last (-1 keeps all)


@dataclass
class ThroughputSettings:
    every_n_steps: int = 10  # window of perf/tokens_per_s and perf/mfu
    peak_flops: float | None = None  # peak FLOP/s for MFU; null = a default per device (training/callbacks.py)


@dataclass
class EarlyStopSettings:
    """End a run at the first validation where `metric` reaches `target` (>= for accuracies, <= for losses and
    the like), e.g. `callbacks.early_stop.target=0.99` on data=mqar. null target = off."""

    metric: str = "val/acc"
    target: float | None = None


@dataclass
class CallbackSettings:
    """The `callbacks` group."""

    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    throughput: ThroughputSettings = field(default_factory=ThroughputSettings)
    early_stop: EarlyStopSettings = field(default_factory=EarlyStopSettings)
    progress_bar: bool = True


@dataclass
class WandbSettings:
    enabled: bool = True
    mode: str = "auto"  # auto | online | offline | disabled
    project: str = "groundthink"
    entity: str | None = None
    job_type: str = "train"


@dataclass
class LoggerSettings:
    """The `logger` group: W&B (offline without credentials or network) besides the always-written metrics.csv."""

    wandb: WandbSettings = field(default_factory=WandbSettings)


@dataclass
class PathSettings:
    """The `paths` group. Each run gets its own folder: <output_root>/<name>/<date>_<time>_<8-hex run id>."""

    output_root: str = "outputs"


@dataclass
class FaultSettings:
    """Deliberate faults for the failure-handling tests (all null in real runs)."""

    nan_at_step: int | None = None  # poison one mixer parameter with NaN at this (1-based) step
    sigterm_at_step: int | None = None  # send this process SIGTERM during this step
    sigkill_after_checkpoint_at_step: int | None = None  # SIGKILL right after the checkpoint of this step is written
    raise_at_step: int | None = None  # raise an ordinary exception during this step


@dataclass
class GradNormSettings:
    every_n_steps: int = 50
    ratio_band: list[float] = field(default_factory=lambda: [0.1, 10.0])  # hybrid branch gradient ratio band
    total_band: list[float] = field(default_factory=lambda: [0.5, 1.5])  # total norm (before clipping) band
    stop_on_non_finite: bool = True  # a NaN/Inf gradient stops the run naming the parameter; false = alert


@dataclass
class StateSettings:
    every_n_steps: int = 50
    top_k: int = 5  # singular values counted by svd_top<k> (G3.5 reads svd_top5)
    saturation_eps: float = 1.0e-3  # a decay a_t is saturated when a_t > 1 - eps or a_t < eps
    frozen_cos: float = 0.99  # alert when a layer's cosine to the previous step's state reaches this
    max_norm: float = 10.0  # alert when a layer's carried-state norm reaches this (off with StateNorm)
    max_lanes: int | None = 4  # batch lanes whose state matrices are decomposed (SVD cost); null = all


@dataclass
class EntropySettings:
    every_n_steps: int = 50
    collapse_below: float = 0.3  # alert below this entropy (SPEC §3: collapse)
    max_positions: int | None = 4096  # predicted positions used (bounds memory with a large vocabulary)


@dataclass
class DiagnosticsSettings:
    """The `diagnostics` config group; every_n_steps: 0 turns one diagnostic off, enabled: false all of them."""

    enabled: bool = True
    grad_norms: GradNormSettings = field(default_factory=GradNormSettings)
    state: StateSettings = field(default_factory=StateSettings)
    entropy: EntropySettings = field(default_factory=EntropySettings)

    @classmethod
    def from_dict(cls, given: Mapping[str, Any]) -> DiagnosticsSettings:
        """From a plain dict (partial); unknown keys are an error naming them and the known ones, so a typo does
        not silently turn a check off."""
        sections = {f.name: f.type for f in fields(cls) if f.name != "enabled"}
        unknown = sorted(set(given) - set(sections) - {"enabled"})
        if unknown:
            raise ValueError(f"diagnostics: unknown section(s) {unknown}; known: enabled, {', '.join(sections)}")
        kwargs: dict[str, Any] = {"enabled": bool(given.get("enabled", True))}
        for name, default in ((f.name, f.default_factory) for f in fields(cls) if f.name != "enabled"):
            section_cls = type(default())
            known = [f.name for f in fields(section_cls)]
            part = dict(given.get(name) or {})
            bad = sorted(set(part) - set(known))
            if bad:
                raise ValueError(f"diagnostics.{name}: unknown key(s) {bad}; known: {', '.join(known)}")
            kwargs[name] = section_cls(**part)
        return cls(**kwargs)
