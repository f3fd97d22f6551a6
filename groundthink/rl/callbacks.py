"""The callbacks of stage=rl, installed where pretraining has its Throughput and Validation callbacks:

- `EpisodeThroughput`: pretraining's Throughput, counting the tokens of each step's scoring pass (prompt +
  completion of every episode) instead of a data batch.
- `RewardValidation`: the validation reward (RLModule.validate) before the first step, every
  rl.val_every_episodes training episodes and after the last step; early stopping (rl.patience validations in a
  row without beating the best by more than rl.min_delta stops the run; the last checkpoint is then written as at
  any end); and `checkpoints/best.safetensors` (+ .json sidecar), rewritten at every new best validation reward.
  best.safetensors is not a resume candidate (list_checkpoints knows only last and step_*): the run folder
  resumes from its newest checkpoint, and `groundthink.load(<run>/checkpoints/best.safetensors)` loads the best.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from groundthink.rl.settings import validation_due
from groundthink.training.callbacks import Throughput, completed_step, log_metrics

log = logging.getLogger("groundthink")
BEST = "best"


class EpisodeThroughput(Throughput):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, {"input_ids": _Count(pl_module.step_tokens)},
                                   batch_idx)


class _Count:
    """Stands in for a batch tensor whose numel() is the step's token count."""

    def __init__(self, n: int) -> None:
        self.n = n

    def numel(self) -> int:
        return self.n


class RewardValidation(L.Callback):
    def __init__(self, checkpoint_dir: Path, *, batch_size: int, every_episodes: int, max_steps: int,
                 patience: int, min_delta: float) -> None:
        self.directory = Path(checkpoint_dir)
        self.batch_size = batch_size
        self.every_episodes = every_episodes
        self.max_steps = max_steps
        self.patience = patience
        self.min_delta = min_delta

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:  # the starting policy's reward (a resumed run logged it already)
            log_metrics(trainer, pl_module.validate(), 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = completed_step(pl_module)
        if step is None:  # (also on a step that SIGTERM ends: the stopping rule's state must be the same on resume)
            return
        if not (validation_due(step, self.batch_size, self.every_episodes) or step == self.max_steps):
            return
        metrics = pl_module.validate()
        log_metrics(trainer, metrics, step)
        reward = metrics["val/reward"]
        if pl_module.best_val is None or reward > pl_module.best_val + self.min_delta:
            pl_module.best_val, pl_module.bad_validations = reward, 0
            self._save_best(trainer)
        else:
            pl_module.bad_validations += 1
            if self.patience > 0 and pl_module.bad_validations >= self.patience and step < self.max_steps:
                pl_module.stopped_early_at = step
                log_metrics(trainer, {"rl/early_stop_step": float(step)}, step)
                log.info(f"early stopping at step {step}: validation reward {reward:.4f} has not beaten the best "
                         f"{pl_module.best_val:.4f} for {pl_module.bad_validations} validations (rl.patience)")
                trainer.should_stop = True

    def _save_best(self, trainer) -> None:
        for logger in trainer.loggers:
            flush = getattr(logger, "flush", None)
            if callable(flush):
                flush()
        trainer.save_checkpoint(self.directory / f"{BEST}.safetensors", weights_only=False)
