"""The LightningModule of stage=rl: REINFORCE with a learned value baseline over sampled completions.

Each step (s, 1-based) takes the task's training episodes (s-1)*B .. s*B-1 (B = rl.batch_size), samples one
completion per prompt from the policy with the generation engine (groundthink/generation.py; sampling seed a
function of the run's seed, the step and the lane, so a resumed run samples exactly what it would have), scores it
with the task's reward, then scores prompt + completion again in one right-padded forward pass with gradients:

    logp_i   = sum over the completion's tokens of log pi(token | prefix)          (the policy's log-likelihood)
    V_i      = value_head(h_i), h_i the final hidden state at the prompt's last token, detached from the LM
    A_i      = R_i - V_i (rl.baseline) or R_i; then (A - mean A) / (std A + 1e-8) over the batch (normalize;
               zero for a batch whose rewards are all equal)
    H        = mean per-token entropy of the policy over the completion tokens
    loss     = -mean_i(A_i * logp_i) + value_coef * mean_i((V_i - R_i)^2) - entropy_coef * decay^(s-1) * H

The value head reads the hidden state detached, so its loss trains the head only: the LM's weights move by the
policy gradient and the entropy bonus alone, and the saved LM is a plain HybridLM. The head's weights are saved
in every checkpoint under `state_dict.value_head.*`, next to the LM's `state_dict.model.*`; groundthink.load reads
only the latter, so an RL checkpoint loads as a normal LM (for groundthink-eval, -generate, -serve, init_from=).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
import torch
from torch import nn

from groundthink.generation import GenerationEngine, SamplingParams
from groundthink.rl.loss import reinforce_loss
from groundthink.rl.rewards import Episode, Task
from groundthink.rl.settings import RLSettings
from groundthink.training.module import NonFiniteLossError
from groundthink.training.schedules import warmup_cosine
from groundthink.training.settings import FaultSettings, OptimSettings

_SEED_STRIDE = 1_000_003


class RLModule(L.LightningModule):
    def __init__(self, model: Any, tokenizer: Any, task: Task, *, rl: RLSettings, optim: OptimSettings,
                 max_steps: int, seed: int, faults: FaultSettings | None = None,
                 run_meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.value_head = nn.Linear(model.cfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.tokenizer = tokenizer
        self.task = task
        self.rl = rl
        self.optim = optim
        self.max_steps = max_steps
        self.seed = int(seed)
        self.faults = faults or FaultSettings()
        self.run_meta = run_meta if run_meta is not None else {}
        self.step_metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}
        self.step_tokens = 0  # tokens of the step's scoring pass (prompt + completion), for the throughput
        self.step_started: int | None = None  # callbacks.completed_step
        # Early stopping (kept in checkpoints, so a resumed run stops where the uninterrupted one would).
        self.best_val: float | None = None
        self.bad_validations = 0
        self.stopped_early_at: int | None = None

    @property
    def current_step(self) -> int:
        return self.global_step + 1

    def entropy_coef(self, step: int) -> float:
        """The entropy coefficient of (1-based) step `step`: rl.entropy_coef * rl.entropy_decay ** (step - 1)."""
        return self.rl.entropy_coef * self.rl.entropy_decay ** (step - 1)

    # ----- episodes -------------------------------------------------------------------------------------
    def _engine(self) -> GenerationEngine:
        return GenerationEngine.for_model(self.model, self.tokenizer, device=self.device)

    def sample(self, episodes: list[Episode], *, temperature: float, seed: int) -> list[list[int]]:
        """One completion per episode (its answer's length, end tokens ignored); lane i's sampling seed is
        seed * 1000003 + i."""
        engine = self._engine()
        was_training = self.model.training
        self.model.eval()
        try:
            return [engine.complete(ep.prompt_ids, SamplingParams(
                max_tokens=ep.max_tokens, temperature=temperature, seed=seed * _SEED_STRIDE + i,
                ignore_eos=True)).token_ids for i, ep in enumerate(episodes)]
        finally:
            self.model.train(was_training)

    def score(self, episodes: list[Episode], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        """One right-padded forward pass over prompt + completion (with gradients): per-episode summed
        log-likelihood of the completion [B], mean per-token entropy over completion tokens, and the value
        prediction at each prompt's last token [B]."""
        seqs = [ep.prompt_ids + list(c) for ep, c in zip(episodes, completions)]
        longest = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        ids = torch.full((len(seqs), longest), pad, dtype=torch.long, device=self.device)
        targets = torch.full_like(ids, -100)
        for row, (ep, c) in enumerate(zip(episodes, completions)):
            n, m = len(ep.prompt_ids), len(c)
            ids[row, : n + m] = torch.as_tensor(seqs[row], dtype=torch.long)
            targets[row, n - 1: n + m - 1] = torch.as_tensor(list(c), dtype=torch.long)  # position t predicts t+1
        hidden: list[torch.Tensor] = []
        handle = self.model.norm_f.register_forward_hook(lambda _m, _i, out: hidden.append(out))
        try:
            logits, _ = self.model(ids, self.model.init_state(len(seqs), self.device))
        finally:
            handle.remove()
        logp_all = logits.float().log_softmax(-1)
        mask = targets != -100
        token_logp = logp_all.gather(-1, targets.clamp_min(0)[..., None])[..., 0] * mask
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        last_prompt = torch.as_tensor([len(ep.prompt_ids) - 1 for ep in episodes], device=self.device)
        h = hidden[0][torch.arange(len(seqs), device=self.device), last_prompt].detach().float()
        self.step_tokens = int(sum(len(s) for s in seqs))
        return {"logp": token_logp.sum(-1), "entropy": (entropy * mask).sum() / mask.sum().clamp_min(1),
                "values": self.value_head(h)[:, 0]}

    def episodes(self, step: int) -> list[Episode]:
        """The training episodes of (1-based) step `step`."""
        b = self.rl.batch_size
        return [self.task.episode((step - 1) * b + i, "train") for i in range(b)]

    def rewards_of(self, episodes: list[Episode], completions: list[list[int]]) -> torch.Tensor:
        return torch.tensor([self.task.reward(ep, c) for ep, c in zip(episodes, completions)],
                            dtype=torch.float32, device=self.device)

    def batch_loss(self, episodes: list[Episode], completions: list[list[int]], step: int):
        """The loss of one batch of scored episodes at (1-based) step `step`, and its parts."""
        rewards = self.rewards_of(episodes, completions)
        scored = self.score(episodes, completions)
        loss, parts = reinforce_loss(
            scored["logp"], scored["entropy"], rewards, scored["values"] if self.rl.baseline else None,
            normalize=self.rl.normalize_advantages, value_coef=self.rl.value_coef if self.rl.baseline else 0.0,
            entropy_coef=self.entropy_coef(step))
        return loss, {**parts, **scored, "rewards": rewards}

    # ----- training -------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        step = self.current_step
        self.step_started = step
        self._inject_faults()
        episodes = self.episodes(step)
        completions = self.sample(episodes, temperature=self.rl.temperature, seed=self.seed * _SEED_STRIDE + step)
        loss, parts = self.batch_loss(episodes, completions, step)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"The RL loss became {loss.item()} at step {step} (policy-gradient "
                                     f"{float(parts['pg_loss'])}, value {float(parts['value_loss'])})")
        rewards = parts["rewards"]
        self.step_metrics = {
            "train/loss": float(loss.detach()),
            "train/reward": float(rewards.mean()),
            "train/reward_std": float(rewards.std(unbiased=False)),
            "train/pg_loss": float(parts["pg_loss"].detach()),
            "train/value_loss": float(parts["value_loss"].detach()),
            "train/value_mean": float(parts["values"].detach().mean()),
            "train/entropy": float(parts["entropy"].detach()),
            "train/entropy_coef": self.entropy_coef(step),
            "train/logp_mean": float(parts["logp"].detach().mean()),
            "train/episodes": float(step * self.rl.batch_size),
            "train/lr": float(self.optimizers().param_groups[0]["lr"]),
        }
        self.log("train/reward", rewards.mean(), prog_bar=True, logger=False, batch_size=len(episodes))
        return loss

    def _inject_faults(self) -> None:
        step, faults = self.current_step, self.faults
        if faults.sigterm_at_step is not None and step == faults.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if faults.raise_at_step is not None and step == faults.raise_at_step:
            raise RuntimeError(f"deliberate failure at step {step} (faults.raise_at_step)")

    # ----- validation (groundthink.rl.callbacks.RewardValidation) ----------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean reward over the rl.val_episodes held-out prompts (greedy at val_temperature 0), and the share of
        episodes answered fully right."""
        episodes = [self.task.episode(i, "val") for i in range(self.rl.val_episodes)]
        completions = self.sample(episodes, temperature=self.rl.val_temperature, seed=self.seed)
        rewards = self.rewards_of(episodes, completions)
        self.val_metrics = {"val/reward": float(rewards.mean()), "val/exact": float((rewards >= 1.0).float().mean())}
        return self.val_metrics

    # ----- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.optim
        groups = self.model.param_groups(opt.weight_decay, lora_weight_decay=opt.lora_weight_decay)
        groups.append({"params": list(self.value_head.parameters()), "weight_decay": 0.0, "group": "value_head"})
        optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)

        def lr_lambda(step: int) -> float:
            return warmup_cosine(step, warmup_steps=opt.warmup_steps, max_steps=self.max_steps,
                                 min_lr_ratio=opt.min_lr_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- checkpoint content ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["groundthink"] = {
            **self.run_meta,
            "step": self.global_step,
            "metrics": {**self.step_metrics, **self.val_metrics},
            "rl": {"best_val": self.best_val, "bad_validations": self.bad_validations,
                   "stopped_early_at": self.stopped_early_at, "value_head": "state_dict.value_head.*"},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = (checkpoint.get("groundthink") or {}).get("rl") or {}
        self.best_val = state.get("best_val")
        self.bad_validations = int(state.get("bad_validations") or 0)
        self.stopped_early_at = state.get("stopped_early_at")

