"""Single-token A/B critics from log-probabilities, never sampled.

The critic prompt ends where the model should answer with one label. For each label the log-probabilities of its
spellings (with and without a leading space: "A" and " A") are summed in probability space,
log P(A) = log(P("A") + P(" A")). The decision is the label with the larger log P; the margin is
|log P(A) - log P(B)|; the judgement is confident when the margin reaches `min_margin`. A record is accepted only
when the decision is the accepting label ("A") and it is confident (an unsure critic does not let data through).

Where log P comes from: in-process backends compute it exactly from the model (each spelling scored as a
continuation); HTTP backends read the first generated token's top log-probabilities (temperature 0, one token,
`top_logprobs` alternatives), where a spelling that is not a single token, or not among the alternatives, is
absent. A label with no spelling found gets log P = -inf; with both labels absent the judgement is
`decision: null` and not accepted.

The previous version's sample critique: label "A", logp_a -0.089, logp_b -3.719, margin 3.630, confident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from groundthink.datagen.backends.base import LabelLogprobs


@dataclass(frozen=True)
class CriticSettings:
    spellings: dict[str, list[str]]  # label -> its spellings, e.g. {"A": ["A", " A"], "B": ["B", " B"]}
    accept: str = "A"
    min_margin: float = 1.0
    top_logprobs: int = 20
    batch_size: int = 8

    def validate(self) -> CriticSettings:
        if len(self.spellings) != 2:
            raise ValueError(f"critic.labels must name exactly two labels, got {list(self.spellings)}")
        if self.accept not in self.spellings:
            raise ValueError(f"critic.accept={self.accept!r} is not one of the labels {list(self.spellings)}")
        if any(not forms for forms in self.spellings.values()):
            raise ValueError("every critic label needs at least one spelling")
        if self.min_margin < 0 or self.top_logprobs < 1 or self.batch_size < 1:
            raise ValueError("critic.min_margin must be >= 0, critic.top_logprobs and critic.batch_size >= 1")
        return self

    @property
    def other(self) -> str:
        return next(label for label in self.spellings if label != self.accept)


def judge(scores: LabelLogprobs, settings: CriticSettings) -> dict[str, Any]:
    """The critique record: decision, logp per label, margin, confident, accepted, and the spellings found."""
    a, b = settings.accept, settings.other
    logp_a, logp_b = scores.logp[a], scores.logp[b]
    if logp_a == -math.inf and logp_b == -math.inf:
        decision, margin = None, 0.0
    else:
        decision = a if logp_a > logp_b else b
        margin = math.inf if -math.inf in (logp_a, logp_b) else abs(logp_a - logp_b)
    confident = decision is not None and margin >= settings.min_margin
    return {
        "decision": decision,
        "logp_a": _finite(logp_a),
        "logp_b": _finite(logp_b),
        "margin": _finite(margin),
        "confident": confident,
        "accepted": decision == a and confident,
        "spellings_found": {label: dict(parts) for label, parts in scores.found.items()},
        "exact": scores.exact,
        "min_margin": settings.min_margin,
    }


def _finite(value: float) -> float | None:
    """JSON has no infinities: an absent label is written as null."""
    return float(value) if math.isfinite(value) else None
