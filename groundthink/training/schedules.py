"""Learning-rate schedule (linear warmup + cosine) and the sequence-length curriculum."""

from __future__ import annotations

import math
from collections.abc import Sequence


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear from 1/warmup to 1 over `warmup_steps`, then cosine down to `min_lr_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Curriculum:
    """Sequence length by training step: stages [(start_step, seq_len), ...] sorted by start step."""

    def __init__(self, stages: Sequence[Sequence[int]] | None, default_seq_len: int) -> None:
        if default_seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {default_seq_len}")
        parsed = []
        for stage in stages or []:
            if len(stage) != 2 or int(stage[0]) < 0 or int(stage[1]) < 1:
                raise ValueError(
                    f"data.curriculum stages are [start_step, seq_len] pairs with start_step >= 0 and seq_len >= 1, "
                    f"got {list(stage)}"
                )
            parsed.append((int(stage[0]), int(stage[1])))
        parsed.sort()
        if parsed and parsed[0][0] != 0:
            parsed.insert(0, (0, default_seq_len))
        self.stages = parsed or [(0, default_seq_len)]

    def seq_len(self, step: int) -> int:
        current = self.stages[0][1]
        for start, length in self.stages:
            if step >= start:
                current = length
        return current

    @property
    def max_seq_len(self) -> int:
        return max(length for _, length in self.stages)
