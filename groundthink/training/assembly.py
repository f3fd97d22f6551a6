"""Assembling a training run from its settings: the loggers, the callbacks (in the order they must run) and the
Lightning Trainer. Each function takes the settings objects it needs (groundthink/training/settings.py), never the
whole config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from groundthink.training.settings import (
    CallbackSettings,
    FaultSettings,
    LoggerSettings,
    OptimSettings,
    TrainerSettings,
)


def apply_host_settings(trainer: TrainerSettings) -> None:
    """The process-wide CPU settings of a run: torch's thread count and what the allocator does with freed memory."""
    import torch

    from groundthink.training.host_memory import keep_freed_memory

    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    if trainer.keep_freed_memory:
        keep_freed_memory()


def build_loggers(folder: Any, logger: LoggerSettings, *, name: str, group: str, tags: list[str],
                  config: dict[str, Any]) -> tuple[list[Any], dict[str, Any] | None]:
    """(loggers, W&B record): metrics.csv always; W&B unless its mode resolves to "disabled". `folder` is the
    RunFolder (path, resume_step, wandb_run_id); the record (mode, project, group, job_type, tags) goes to
    summary.json, None without W&B."""
    from groundthink.training.metrics_logger import CSVMetricsLogger
    from groundthink.training.wandb_setup import make_wandb_logger, wandb_mode

    mode = wandb_mode(logger.wandb.mode) if logger.wandb.enabled else "disabled"
    loggers: list[Any] = [CSVMetricsLogger(folder.path, resume_step=folder.resume_step)]
    if mode == "disabled":
        return loggers, None
    loggers.append(make_wandb_logger(
        folder.path, project=logger.wandb.project, entity=logger.wandb.entity, name=name, group=group, tags=tags,
        job_type=logger.wandb.job_type, config=config, run_id=folder.wandb_run_id, mode=mode,
    ))
    return loggers, {"mode": mode, "project": logger.wandb.project, "group": group, "job_type": logger.wandb.job_type,
                     "tags": tags}


def build_callbacks(callbacks: CallbackSettings, trainer: TrainerSettings, faults: FaultSettings, *,
                    checkpoint_dir: Path, val_batches: list[dict[str, Any]], diagnostics: list[Any],
                    flops_params: int) -> dict[str, Any]:
    """{"throughput", "checkpointing", "all"}: the callbacks in hook order (see groundthink/training/callbacks.py)."""
    from groundthink.training.callbacks import Checkpointing, StepMetrics, Throughput, Validation

    throughput = Throughput(callbacks.throughput.every_n_steps, flops_params, callbacks.throughput.peak_flops,
                            trainer.precision)
    checkpointing = Checkpointing(checkpoint_dir, callbacks.checkpoint.every_n_steps, callbacks.checkpoint.keep,
                                  sigkill_after_step=faults.sigkill_after_checkpoint_at_step)
    ordered: list[Any] = [
        throughput,
        *diagnostics,
        StepMetrics(trainer.log_every_n_steps, trainer.max_steps),
        Validation(trainer.val_every_n_steps, trainer.max_steps, val_batches, early_stop=callbacks.early_stop),
        checkpointing,
    ]
    if callbacks.progress_bar:
        from lightning.pytorch.callbacks import TQDMProgressBar

        ordered.append(TQDMProgressBar(refresh_rate=max(1, trainer.log_every_n_steps)))
    return {"throughput": throughput, "checkpointing": checkpointing, "all": ordered}


def build_trainer(trainer: TrainerSettings, optim: OptimSettings, *, loggers: list[Any], callbacks: list[Any],
                  run_dir: Path, progress_bar: bool) -> Any:
    """The Lightning Trainer. Validation is the Validation callback's (Lightning's own loop is off), checkpoints the
    Checkpointing callback's, written through SafetensorsCheckpointIO (never pickle)."""
    import lightning as L

    from groundthink.training.lightning_io import SafetensorsCheckpointIO

    return L.Trainer(
        max_steps=trainer.max_steps,
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=trainer.strategy,
        precision=trainer.precision,
        deterministic=trainer.deterministic,
        gradient_clip_val=optim.grad_clip or None,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=loggers,
        callbacks=callbacks,
        plugins=[SafetensorsCheckpointIO()],
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )


def compile_blocks(model: Any, *, trace_ops: bool = False, backend: str = "inductor") -> None:
    """trainer.compile: torch.compile each block in place (regional compilation: one set of graphs for all blocks,
    so the compile time does not grow with depth the way compiling the whole model does). The recurrence ops run
    between the graphs unless `trace_ops` (trainer.compile_ops), which traces their pure-torch paths as well
    (groundthink.ops.dispatch.compiler_boundary). Blocks see the stream position reduced to what they read
    (HybridLM.position_period), so StateNorm costs one graph per phase; RoPE attention reads the exact position,
    which would recompile every step until dynamo gives up, so it is refused. `backend`: torch.compile's (tests
    use dynamo's "eager" backend)."""
    from groundthink.ops.dispatch import trace_ops_when_compiling

    if getattr(model, "position_period", 1) is None:
        raise ValueError(
            "trainer.compile=true does not work with RoPE attention (rope_base set): the rotation reads the exact "
            "stream position, so every step would compile a new graph. Set trainer.compile=false, or rope_base=null."
        )
    trace_ops_when_compiling(trace_ops)
    for block in model.blocks:
        block.compile(dynamic=False, backend=backend)
