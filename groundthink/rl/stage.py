"""Assembling a stage=rl run (the hook groundthink/train.py calls): the same run folder, lineage, loggers,
checkpointing and Trainer as every stage, with RLModule and the RL callbacks in place of the LM module, the data
stream and the held-out loss.

Order: every check that needs no compute first (init_from given, rl.* in range, the reward registered, the task's
settings), then the run folder, the parent (strict shape and vocabulary checks, groundthink/training/lineage.py),
the Trainer. A bad input is a UserError (one line, no run folder left behind).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from groundthink.training.run import UserError


def rl_settings(cfg: DictConfig) -> Any:
    """The `rl` block as RLSettings, checked (a UserError naming the first bad setting)."""
    from groundthink.rl.settings import RLSettings
    from groundthink.train import _structured

    rl = _structured(RLSettings, cfg.get("rl") or {}, "rl")
    try:
        rl.check()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return rl


class StepDataModule(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(StepBatches(), batch_size=None, num_workers=0)


class StepBatches(IterableDataset):
    """The training 'data': one empty batch per step (the episodes are a function of the step, RLModule)."""

    def __iter__(self):
        while True:
            yield {"input_ids": torch.zeros(0, dtype=torch.long)}


def prepare(cfg: DictConfig, job: Any, s: dict[str, Any]) -> SimpleNamespace:
    """Everything before the first RL step; the SimpleNamespace that groundthink.train._fit runs."""
    from groundthink.training import lineage

    init_from = lineage.required(cfg)
    rl = rl_settings(cfg)
    if s["gate"] is not None:
        raise UserError("gates judge language-model runs (val/loss, diagnostics); stage=rl runs take no gate= "
                        "(judge an RL run by its val/reward, or groundthink-eval on it)")

    from groundthink.models import HybridLM
    from groundthink.rl.callbacks import EpisodeThroughput, RewardValidation
    from groundthink.rl.module import RLModule
    from groundthink.rl.rewards import build_task
    from groundthink.training import assembly
    from groundthink.training.callbacks import Checkpointing, StepMetrics, count_flops_params
    from groundthink.training.console import quiet_lightning
    from groundthink.training.provenance import collect_provenance
    from groundthink.training.run import RunFolder

    quiet_lightning()
    trainer_s = dataclasses.replace(s["trainer"], max_steps=rl.max_steps, val_every_n_steps=0)
    if trainer_s.accumulate_grad_batches != 1:
        raise UserError("stage=rl takes one optimizer step per batch of episodes: use "
                        "trainer.accumulate_grad_batches=1 (a larger rl.batch_size instead)")
    folder = RunFolder(job.run_dir, resume=bool(cfg.resume), budget=("rl.num_episodes", rl.num_episodes, rl.max_steps))
    folder.write_config(OmegaConf.to_yaml(cfg, resolve=True))
    assembly.apply_host_settings(trainer_s)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    parent = lineage.load_parent(init_from, s["tokenizer"], folder.tokenizer_dir, resume=folder.resume)
    tokenizer = parent.tokenizer
    model = HybridLM(s["model"].replace(vocab_size=tokenizer.vocab_size))
    lineage_fields = {"parent": lineage.init_weights(model, parent, init_from)}
    try:
        task = build_task(rl.reward, rl.task, tokenizer=tokenizer, vocab_size=model.cfg.vocab_size,
                          seed=int(cfg.seed))
    except ValueError as exc:  # also the synthetic generators' DataError
        raise UserError(str(exc)) from None
    config = OmegaConf.to_container(cfg, resolve=True)
    run_meta = {"run_id": folder.run_id, "wandb_run_id": folder.wandb_run_id, "config": config,
                "provenance": collect_provenance(), "num_params": model.num_params(), "impl": model.impls(),
                **lineage_fields}
    module = RLModule(model, tokenizer, task, rl=rl, optim=s["optim"], max_steps=rl.max_steps, seed=int(cfg.seed),
                      faults=s["faults"], run_meta=run_meta)
    logger_s, callbacks_s = s["logger"], s["callbacks"]
    loggers, wandb_record = assembly.build_loggers(folder, logger_s, name=f"{cfg.name}-{folder.run_id}",
                                                   group=job.group, tags=list(cfg.tags) + job.overrides,
                                                   config=config)
    throughput = EpisodeThroughput(callbacks_s.throughput.every_n_steps, count_flops_params(model),
                                   callbacks_s.throughput.peak_flops, trainer_s.precision)
    checkpointing = Checkpointing(folder.checkpoints, callbacks_s.checkpoint.every_n_steps, callbacks_s.checkpoint.keep,
                                  sigkill_after_step=s["faults"].sigkill_after_checkpoint_at_step)
    ordered: list[Any] = [
        throughput,
        StepMetrics(trainer_s.log_every_n_steps, rl.max_steps),
        RewardValidation(folder.checkpoints, batch_size=rl.batch_size, every_episodes=rl.val_every_episodes,
                         max_steps=rl.max_steps, patience=rl.patience, min_delta=rl.min_delta),
        checkpointing,
    ]
    if callbacks_s.progress_bar:
        from lightning.pytorch.callbacks import TQDMProgressBar

        ordered.append(TQDMProgressBar(refresh_rate=max(1, trainer_s.log_every_n_steps)))
    trainer = assembly.build_trainer(trainer_s, s["optim"], loggers=loggers, callbacks=ordered, run_dir=folder.path,
                                     progress_bar=callbacks_s.progress_bar)
    if trainer.world_size != 1:
        raise UserError(f"stage=rl runs in one process, this Trainer has {trainer.world_size}: use "
                        "trainer.devices=1 trainer.num_nodes=1")
    datamodule = StepDataModule()
    data = SimpleNamespace(description=f"rl.reward={rl.reward}, {rl.num_episodes} episodes of {rl.batch_size}",
                           tokenizer=tokenizer, val_texts=[])
    return SimpleNamespace(s=s, folder=folder, data=data, model=model, module=module, loggers=loggers,
                           extra=lineage_fields, callbacks={"checkpointing": checkpointing, "throughput": throughput},
                           trainer=trainer, datamodule=datamodule, wandb_record=wandb_record, ste=None)

