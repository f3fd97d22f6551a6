"""The REINFORCE loss of stage=rl, as plain functions of tensors (groundthink/rl/module.py has the formulas)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def advantages(rewards: torch.Tensor, values: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    """A = R - V (or R without a baseline), then normalised over the batch when `normalize`. A normalised batch
    whose rewards are all equal has zero advantages: it says nothing about which completions are better, and
    normalising R - V there would blow the value head's small errors up to unit-size noise."""
    adv = rewards - values.detach() if values is not None else rewards.clone()
    if normalize:
        if bool((rewards == rewards[0]).all()):
            return torch.zeros_like(adv)
        adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
    return adv


def reinforce_loss(logp: torch.Tensor, entropy: torch.Tensor, rewards: torch.Tensor, values: torch.Tensor | None,
                   *, normalize: bool, value_coef: float, entropy_coef: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss of one batch from per-episode log-likelihoods `logp` [B], the mean token entropy (a scalar), the
    rewards [B] and the value predictions [B] (None without a baseline); and its parts."""
    adv = advantages(rewards, values, normalize)
    pg = -(adv * logp).mean()
    value_loss = F.mse_loss(values, rewards) if values is not None else torch.zeros((), device=logp.device)
    loss = pg + value_coef * value_loss - entropy_coef * entropy
    return loss, {"pg_loss": pg, "value_loss": value_loss, "advantages": adv}
