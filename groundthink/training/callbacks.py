"""Training callbacks: periodic safetensors checkpoints with graceful SIGINT/SIGTERM, and throughput / MFU."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from groundthink.training.checkpoint import rotate_checkpoints

# Dense peak FLOP/s used for MFU when callbacks.throughput.peak_flops is null.
# CPU: measured 1024^3 matmul on this project's 2-core build machines (reference/environment.md).
DEFAULT_PEAK_FLOPS = {"cpu-32": 1.9e11, "cpu-bf16": 4.4e11, "cuda-32": 6.7e13, "cuda-bf16": 9.89e14}


class CheckpointCallback(L.Callback):
    """Writes `checkpoints/step_XXXXXXX.safetensors` every N steps and `last.safetensors` at the end.

    SIGINT (Ctrl+C) and SIGTERM finish the current step, write a checkpoint and stop; a second SIGINT aborts.
    Nothing is written after a failure, so the newest checkpoint on disk is always the last good one.
    """

    def __init__(self, directory: Path, every_n_steps: int, keep: int) -> None:
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.interrupted_by: str | None = None
        self._previous_sigint = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._previous_sigint = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if self.interrupted_by is not None:
                raise KeyboardInterrupt
            self.interrupted_by = "SIGINT"
            print("\nSIGINT: finishing this step, writing a checkpoint, then stopping (Ctrl+C again to abort).")

        signal.signal(signal.SIGINT, on_sigint)

    def save(self, trainer: L.Trainer, name: str) -> Path:
        path = self.directory / f"{name}.safetensors"
        trainer.save_checkpoint(path, weights_only=False)
        return path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.received_sigterm and self.interrupted_by is None:
            self.interrupted_by = "SIGTERM"
        if self.interrupted_by is not None:
            self.save(trainer, "last")
            trainer.should_stop = True
            return
        if self.every_n_steps > 0 and step % self.every_n_steps == 0:
            self.save(trainer, f"step_{step:07d}")
            self.save(trainer, "last")
            if trainer.is_global_zero:
                rotate_checkpoints(self.directory, keep=self.keep)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = self.directory / "last.json"
        # Avoid a duplicate write when the final step was just checkpointed.
        if not (last.exists() and _sidecar_step(last) == trainer.global_step):
            self.save(trainer, "last")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


def _sidecar_step(path: Path) -> int | None:
    import json

    try:
        return int(json.loads(path.read_text()).get("step"))
    except (OSError, ValueError, TypeError):
        return None


class ThroughputCallback(L.Callback):
    """Logs tokens/s (wall clock over the last N steps) and model FLOPs utilisation (6·params·tokens / peak)."""

    def __init__(self, every_n_steps: int, num_params: int, peak_flops: float | None, precision: str) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.flops_per_token = 6.0 * num_params
        self.peak_flops = peak_flops
        self.precision = precision
        self._t0: float | None = None
        self._tokens = 0
        self.tokens_per_s: float | None = None
        self.total_tokens = 0
        self.first_step_time: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None:
            kind = "cuda" if pl_module.device.type == "cuda" else "cpu"
            self.peak_flops = DEFAULT_PEAK_FLOPS[f"{kind}-{'bf16' if 'bf16' in self.precision else '32'}"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first_step_time is None:
            self.first_step_time = time.time()
        n = int(batch["input_ids"].numel()) * trainer.world_size
        self._tokens += n
        self.total_tokens += n
        if trainer.global_step % self.every_n_steps == 0 and self._t0 is not None:
            elapsed = time.perf_counter() - self._t0
            if elapsed > 0:
                self.tokens_per_s = self._tokens / elapsed
                pl_module.log("perf/tokens_per_s", self.tokens_per_s)
                pl_module.log("perf/mfu", self.tokens_per_s * self.flops_per_token / float(self.peak_flops))
            self._t0 = time.perf_counter()
            self._tokens = 0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._pause = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation time does not count against training throughput.
        if self._t0 is not None:
            self._t0 += time.perf_counter() - self._pause

    def state_dict(self) -> dict[str, Any]:
        return {"total_tokens": self.total_tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_tokens = int(state_dict.get("total_tokens", 0))


def count_flops_params(model: torch.nn.Module) -> int:
    """Parameters that cost FLOPs per token (the embedding lookup does not)."""
    total = sum(p.numel() for p in model.parameters())
    emb = getattr(model, "embedding", None)
    if isinstance(emb, torch.nn.Embedding):
        total -= emb.weight.numel()
    return total
