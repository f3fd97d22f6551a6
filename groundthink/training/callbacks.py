"""Training callbacks, in the order a run installs them (each step's hooks run in this order):

1. `Throughput`: tokens/s and MFU over windows of steps, and for the whole run.
2. the diagnostics (groundthink/training/diagnostics.py), which log into the step they measure.
3. `StepMetrics`: the step's training metrics (loss, bits per byte, lr, ...) to every logger.
4. `Validation`: held-out loss every N steps and after the last step.
5. `Checkpointing`: safetensors checkpoints every N steps, at the end, and on SIGINT/SIGTERM.

Because the checkpoint of step s is written last, after everything logged for step s (and the loggers are flushed
first), a run killed at any moment and resumed from its newest checkpoint has every metrics row up to that step,
and the rows after it are written again by the resumed run. Steps are 1-based (module docstring of module.py).
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from groundthink.training.checkpoint import link_checkpoint, rotate_checkpoints
from groundthink.training.metrics_file import higher_is_better
from groundthink.training.settings import EarlyStopSettings

# Dense peak FLOP/s used for MFU when callbacks.throughput.peak_flops is null.
# CPU: measured 1024^3 matmul on this project's 2-core build machines (reference/environment.md).
DEFAULT_PEAK_FLOPS = {"cpu-32": 1.9e11, "cpu-bf16": 4.4e11, "cuda-32": 6.7e13, "cuda-bf16": 9.89e14}


def completed_step(pl_module: L.LightningModule) -> int | None:
    """The step that the batch just trained completed (its optimizer update ran), or None for a micro-batch
    that only accumulated gradients."""
    started = getattr(pl_module, "step_started", None)
    return pl_module.global_step if started is not None and pl_module.global_step == started else None


def log_metrics(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    if metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


class Throughput(L.Callback):
    """Tokens per second of training-step time: forward, backward and optimizer update; data loading,
    validation, checkpointing and logging are excluded, and so is the first step of each process (a fresh run's
    or a resumed one's), which carries one-time work: Triton compiling and autotuning the GPU kernels (minutes on
    a fresh machine), torch.compile, the allocator's first requests. Logs `perf/tokens_per_s` and `perf/mfu` (6 ·
    non-embedding parameters · tokens/s over the peak FLOP/s) every N steps over the steps since the last log;
    `tokens_per_s` (the process's, same definition; its one step when it made only one) goes into summary.json and
    is what groundthink-compare shows."""

    def __init__(self, every_n_steps: int, flops_params: int, peak_flops: float | None, precision: str) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.flops_per_token = 6.0 * flops_params
        self.peak_flops = peak_flops
        self.precision = precision
        self._t_batch: float | None = None
        self._window = [0, 0.0]  # tokens, seconds
        self._first = [0, 0.0]  # tokens, seconds of this process's first step, micro-batches included
        self.run_tokens = 0
        self.run_seconds = 0.0
        self.first_step_end: float | None = None  # time.time() at the end of the first step of this invocation

    @property
    def first_step(self) -> tuple[int, float] | None:
        """(tokens, seconds) of this process's first step, once it has ended."""
        return None if self.first_step_end is None else (self._first[0], self._first[1])

    @property
    def tokens_per_s(self) -> float | None:
        if self.run_seconds > 0:
            return self.run_tokens / self.run_seconds
        if self.first_step_end is not None and self._first[1] > 0:  # a process that made one step
            return self._first[0] / self._first[1]
        return None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None:
            self.peak_flops = default_peak_flops(pl_module.device.type, self.precision)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t_batch = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._t_batch if self._t_batch is not None else 0.0
        tokens = int(batch["input_ids"].numel()) * trainer.world_size
        if self.first_step_end is None:  # micro-batches of the first step accumulate here until its update
            self._first[0] += tokens
            self._first[1] += seconds
        else:
            self._window[0] += tokens
            self._window[1] += seconds
            self.run_tokens += tokens
            self.run_seconds += seconds
        step = completed_step(pl_module)
        if step is None:
            return
        if self.first_step_end is None:
            self.first_step_end = time.time()
        if step % self.every_n_steps == 0 and self._window[1] > 0:
            rate = self._window[0] / self._window[1]
            log_metrics(trainer, {"perf/tokens_per_s": rate, "perf/mfu": rate * self.flops_per_token
                                  / float(self.peak_flops)}, step)
            self._window = [0, 0.0]


class StepMetrics(L.Callback):
    """Logs the step's training metrics (`pl_module.step_metrics`) every N steps and at the last step."""

    def __init__(self, every_n_steps: int, max_steps: int) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.max_steps = max_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = completed_step(pl_module)
        if step is not None and (step % self.every_n_steps == 0 or step == self.max_steps):
            log_metrics(trainer, pl_module.step_metrics, step)


def check_early_stop(rule: EarlyStopSettings, val_every_n_steps: int, *, has_val_batches: bool = True) -> None:
    """ValueError unless the rule can work: its metric is a validation metric, and a target has
    validation to watch (train.py checks it before any data is read, and again once the held-out batches exist)."""
    if not str(rule.metric).startswith("val/"):
        raise ValueError(f"callbacks.early_stop.metric={rule.metric!r} is not a validation metric: early stopping "
                         "watches what validation logs, e.g. val/acc or val/loss")
    if rule.target is not None and (val_every_n_steps <= 0 or not has_val_batches):
        raise ValueError(f"callbacks.early_stop.target={rule.target} needs validation: set "
                         "trainer.val_every_n_steps > 0 and a data source with held-out batches")


class Validation(L.Callback):
    """Held-out loss (`LMTrainingModule.validate`) every N steps and after the last step, so the final val/loss
    is never stale; every_n_steps 0 turns it off. Not run on a step that an interrupt ends. With an early-stop
    target (callbacks.early_stop), the run ends after the validation that reaches it (recorded in
    `pl_module.stopped_early`, then in summary.json); the last checkpoint is written as at any end."""

    def __init__(self, every_n_steps: int, max_steps: int, batches: list[dict[str, torch.Tensor]], *,
                 early_stop=None) -> None:
        self.every_n_steps = every_n_steps
        self.max_steps = max_steps
        self.batches = batches
        self.early_stop = early_stop
        if early_stop is not None:
            check_early_stop(early_stop, every_n_steps, has_val_batches=bool(batches))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = completed_step(pl_module)
        if step is None or not self.batches or self.every_n_steps <= 0 or trainer.received_sigterm:
            return
        if step % self.every_n_steps == 0 or step == self.max_steps:
            metrics = pl_module.validate(self.batches)
            log_metrics(trainer, metrics, step)
            self._maybe_stop(trainer, pl_module, metrics, step)

    def _maybe_stop(self, trainer, pl_module, metrics: dict[str, float], step: int) -> None:
        rule = self.early_stop
        if rule is None or rule.target is None or step >= self.max_steps:
            return
        if rule.metric not in metrics:
            if metrics and not getattr(self, "_warned", False):
                self._warned = True
                warnings.warn(f"callbacks.early_stop.metric={rule.metric} is not a validation metric of this run "
                              f"(it logs {', '.join(sorted(metrics))}); the run will not stop early", stacklevel=2)
            return
        value, target = metrics[rule.metric], float(rule.target)
        if value >= target if higher_is_better(rule.metric) else value <= target:
            pl_module.stopped_early = {"step": step, "metric": rule.metric, "value": value, "target": target}
            print(f"\nEarly stop: {rule.metric}={value:.4f} reached callbacks.early_stop.target={target} at step "
                  f"{step} (of {self.max_steps})")
            trainer.should_stop = True


class Checkpointing(L.Callback):
    """Writes `checkpoints/step_XXXXXXX.safetensors` every N steps, `last.safetensors` (a hard link to the newest
    step file when they coincide) at the end and on an interrupt, after flushing the loggers.

    SIGINT (Ctrl+C) and SIGTERM finish the current step, write a checkpoint and stop; a second SIGINT aborts.
    Nothing is written after a failure, so the newest checkpoint on disk is always the last good one.
    """

    def __init__(self, directory: Path, every_n_steps: int, keep: int, *,
                 sigkill_after_step: int | None = None) -> None:
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.sigkill_after_step = sigkill_after_step  # fault injection for the kill-after-save tests
        self.interrupted_by: str | None = None
        self.saved_steps: list[int] = []
        self._previous_sigint = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._previous_sigint = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if self.interrupted_by is not None:
                raise KeyboardInterrupt
            self.interrupted_by = "SIGINT"
            print("\nSIGINT: finishing this step, writing a checkpoint, then stopping (Ctrl+C again to abort).")

        signal.signal(signal.SIGINT, on_sigint)

    def _save(self, trainer: L.Trainer, name: str) -> Path:
        for logger in trainer.loggers:  # the rows up to this step reach disk before the checkpoint does
            flush = getattr(logger, "flush", None)
            if callable(flush):
                flush()
        path = self.directory / f"{name}.safetensors"
        trainer.save_checkpoint(path, weights_only=False)
        return path

    def _save_step(self, trainer: L.Trainer, step: int, *, numbered: bool) -> None:
        if numbered:
            self._save(trainer, f"step_{step:07d}")
            if trainer.is_global_zero:
                link_checkpoint(self.directory, f"step_{step:07d}", "last")
                rotate_checkpoints(self.directory, keep=self.keep)
        else:
            self._save(trainer, "last")
        self.saved_steps.append(step)
        if self.sigkill_after_step is not None and step == self.sigkill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = completed_step(pl_module)
        if step is None:
            return
        if trainer.received_sigterm and self.interrupted_by is None:
            self.interrupted_by = "SIGTERM"
        if self.interrupted_by is not None:
            self._save_step(trainer, step, numbered=False)
            trainer.should_stop = True
        elif self.every_n_steps > 0 and step % self.every_n_steps == 0:
            self._save_step(trainer, step, numbered=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.saved_steps or self.saved_steps[-1] != trainer.global_step:
            self._save_step(trainer, trainer.global_step, numbered=False)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


def count_flops_params(model: torch.nn.Module) -> int:
    """Parameters that cost FLOPs per token: all but the embedding table (a lookup). With tied embeddings the
    shared matrix is the head's, so it counts once."""
    total = sum(p.numel() for p in model.parameters())  # a tied matrix is one parameter, counted once
    embed, head = getattr(model, "embed", None), getattr(model, "head", None)
    if isinstance(embed, torch.nn.Embedding) and not (head is not None and head.weight is embed.weight):
        total -= embed.weight.numel()
    return total


def default_peak_flops(device_type: str, precision: str) -> float:
    return DEFAULT_PEAK_FLOPS[f"{'cuda' if device_type == 'cuda' else 'cpu'}-{'bf16' if 'bf16' in precision else '32'}"]
