"""The `rl` config block of stage=rl (conf/stage/rl.yaml): the one place its defaults are written.

An episode is one prompt from the reward's task and one completion sampled from the policy; a step trains on
`batch_size` episodes, so a run is ceil(num_episodes / batch_size) optimizer steps (trainer.max_steps is set from
it). The defaults are the plan's (issue 16): 10000 episodes, batch 32, validation every 1000 episodes, patience 10;
the learning rate (1e-4), warmup and gradient clipping (1.0) are the optim group's, set in conf/stage/rl.yaml.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RLSettings:
    """REINFORCE with a learned baseline: the task, the sampling, the loss and the stopping rule."""

    # The task and its verifiable reward (groundthink/rl/rewards.py: copy | arithmetic | passkey | mqar).
    reward: str = "copy"
    # The task's own settings (each task's Settings dataclass; unknown keys are refused), e.g. {max_len: 4}.
    task: dict[str, Any] = field(default_factory=dict)
    num_episodes: int = 10000
    batch_size: int = 32  # episodes per optimizer step
    temperature: float = 1.0  # sampling temperature of training episodes (1.0 = on-policy)
    # Learned value baseline: a linear head on the final hidden state at the prompt's last token predicts the
    # episode's reward; advantage = reward - value. false = plain REINFORCE (advantage = reward).
    baseline: bool = True
    value_coef: float = 0.5  # weight of the value head's squared-error loss
    normalize_advantages: bool = True  # (A - mean) / std over each batch
    entropy_coef: float = 0.01  # bonus on the policy's mean per-token entropy ...
    entropy_decay: float = 0.995  # ... multiplied by this every step (coef_s = entropy_coef * decay ** (s - 1))
    val_every_episodes: int = 1000  # validation reward every N training episodes (and after the last step)
    val_episodes: int = 64  # held-out prompts per validation (the same ones every time)
    val_temperature: float = 0.0  # 0 = greedy completions for validation
    patience: int = 10  # stop after this many validations in a row without improvement (0 = never stop early)
    min_delta: float = 0.0  # an improvement must beat the best validation reward by more than this

    @property
    def max_steps(self) -> int:
        return math.ceil(self.num_episodes / self.batch_size)

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range (before any compute)."""
        from groundthink.rl.rewards import REWARDS

        if self.reward not in REWARDS:
            raise ValueError(f"rl.reward={self.reward!r} is not a registered reward; registered: {sorted(REWARDS)} "
                             "(groundthink/rl/rewards.py)")
        for name in ("num_episodes", "batch_size", "val_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name}={getattr(self, name)} must be >= 1")
        if self.val_every_episodes < 0 or self.patience < 0:
            raise ValueError(f"rl.val_every_episodes={self.val_every_episodes} and rl.patience={self.patience} must "
                             "be >= 0 (0 turns them off)")
        if not self.temperature > 0:
            raise ValueError(f"rl.temperature={self.temperature} must be > 0: REINFORCE needs sampled episodes")
        if self.val_temperature < 0 or self.value_coef < 0 or self.entropy_coef < 0:
            raise ValueError("rl.val_temperature, rl.value_coef and rl.entropy_coef must be >= 0")
        if not 0 < self.entropy_decay <= 1:
            raise ValueError(f"rl.entropy_decay={self.entropy_decay} must be in (0, 1]")


def validation_due(step: int, batch_size: int, every_episodes: int) -> bool:
    """True when the episodes trained up to `step` cross a multiple of `every_episodes` (0 = never)."""
    if every_episodes <= 0:
        return False
    return (step * batch_size) // every_episodes > ((step - 1) * batch_size) // every_episodes
