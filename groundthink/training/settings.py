"""The settings of a training run, as dataclasses: the one place their defaults are written.

Each is the schema of one config group (`trainer`, `optim`, `callbacks`, `logger`, `paths`) or key (`faults`);
groundthink/schema.py turns them into Hydra structured configs, so a YAML file holds only what differs from these
defaults and a wrong type or an unknown key is refused when the config is composed (before a run folder exists).
Code below the entry point receives these objects, never the whole config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainerSettings:
    """The `trainer` group: how long, on what, in which precision."""

    max_steps: int = 300
    # fp32 is the default: on 2 CPU cores the default run measured 4.0k tokens/s in fp32 vs 3.5k with bf16-mixed
    # (per-op casts dominate at 1.6M params); only the 8m preset at batch 8 x 256 gains from bf16 (0.52k -> 0.67k,
    # `make bench`). fp16 autocast is slow on CPU. Use bf16-mixed on GPU (trainer=gpu).
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
    compile: bool = False  # torch.compile each block (regional compilation)


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
