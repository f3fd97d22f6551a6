"""The sequence-mixer contract and registry: what a mixer declares so that nothing else guesses it from names.

A sequence mixer is an nn.Module subclass of `SequenceMixer`, registered with `@register_mixer`:

    forward(x [B,T,D], state=None, *, position=0) -> (y [B,T,D], new_state: dict[str, Tensor])
    init_state(batch_size, device) -> dict[str, Tensor]      everything needed to continue a stream exactly
    state_size(seq_len=None) -> int                          floats per batch lane in that state (constant; with
                                                             seq_len: what a sequence that long fills, which
                                                             only a window/KV cache shorter than it changes)
    build(settings, ctx) -> mixer                            from its own settings and the layer's LayerContext

and declares as class attributes:

    name             registry key and config key: `model.mixers.<name>.*` holds its settings (e.g. "rwkv6")
    Config           its settings dataclass (the one source of its defaults; the Hydra schema is made from it)
    letter           its layer-pattern letter: a block of this mixer alone (e.g. "R")
    branch           the attribute, state key and parameter prefix in a Block, and its gradient-diagnostics
                     component (e.g. "rwkv": parameters `blocks.3.rwkv.*`, metric `diag/grad_norm/rwkv`)
    recurrent_state  the keys of its matrix-valued recurrent states, measured by the state-health diagnostics
                     (e.g. ("wkv",)); token-shift tails, conv tails and KV windows are not listed
    ops              the ops whose implementation it resolves once at build time (reported by `impls()`)

`position` is the stream position of x's first token as far as the mixer reads it. HybridLM finds what its mixers
read from their attributes and passes no more: the exact position when one has RoPE (`rope_base` set), its phase
(position mod `state_norm_interval`) when StateNorm is on (`state_norm`), else 0. A new mixer that reads the
position in another way must extend `HybridLM.position_period` (groundthink/models/lm.py), which would otherwise
pass it 0. (The reduction lets a compiled block, trainer.compile, trace once per phase rather than once per step.)

A recurrent mixer calls `self.observe_decay(log_retention)` with its per-step natural-log retention factors
(<= 0) in its forward; the decay-saturation diagnostic installs an observer for one forward and removes it, and
with no observer the call costs one attribute test. Parameters it wants kept out of weight decay are marked with
`no_weight_decay(param)` (never decayed) or `lora(param)` (the low-rank data-dependent mixing/decay projections,
decayed only when the optimizer's `lora_weight_decay` switch is on); see `HybridLM.param_groups`.
A new mixer = its op + its file here + one registration line in `groundthink/mixers/__init__.py` + its
`conf/mixer/<name>.yaml` + tests; the contract tests, diagnostics and gates pick it up from this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

INITS = ("official", "identity", "identity_bias")


@dataclass(frozen=True)
class LayerContext:
    """The block-level settings every mixer of one layer is built with (besides its own settings)."""

    d_model: int
    n_layers: int
    layer_id: int = 0
    init: str = "official"  # official | identity (long-memory spread) | identity_bias (every decay 0.9999)
    impl: str = "auto"  # model-wide impl: auto | reference | chunked | a kernel name (groundthink.ops.model_impls)
    learn_h0: bool = False
    grounding_strength: float = 1.0
    state_norm: bool = False
    state_norm_groups: int = 4
    state_norm_interval: int = 64
    device: Any = None

    @classmethod
    def of(cls, cfg: Any, layer_id: int, device: Any = None) -> LayerContext:
        """The context of layer `layer_id` of a ModelConfig-like object (read by field name)."""
        names = [f.name for f in fields(cls) if f.name not in ("layer_id", "device")]
        return cls(**{n: getattr(cfg, n) for n in names}, layer_id=layer_id, device=device)

    def recurrent_kwargs(self) -> dict[str, Any]:
        """The constructor arguments every recurrent mixer takes from its layer (depth, init, h0, StateNorm, device);
        the model-wide `impl` is translated per op by each mixer (groundthink.ops.op_impl)."""
        return {"layer_id": self.layer_id, "n_layers": self.n_layers, "init": self.init, "learn_h0": self.learn_h0,
                "grounding_strength": self.grounding_strength, "state_norm": self.state_norm,
                "state_norm_groups": self.state_norm_groups, "state_norm_interval": self.state_norm_interval,
                "device": self.device}


class SequenceMixer(nn.Module):
    """Base class of the registered sequence mixers (see the module docstring for the contract)."""

    name: ClassVar[str]
    Config: ClassVar[type]
    letter: ClassVar[str]
    branch: ClassVar[str]
    recurrent_state: ClassVar[tuple[str, ...]] = ()
    ops: ClassVar[tuple[str, ...]] = ()

    decay_observer: Callable[[SequenceMixer, torch.Tensor], None] | None = None

    @classmethod
    def build(cls, settings: Any, ctx: LayerContext) -> SequenceMixer:
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: Any, layer_id: int, device: Any = None) -> SequenceMixer:
        """Build layer `layer_id`'s mixer from a ModelConfig (its settings are `cfg.mixers[cls.name]`)."""
        return cls.build(cfg.mixers[cls.name], LayerContext.of(cfg, layer_id, device))

    def impls(self) -> dict[str, str]:
        """{op: the implementation it resolved to at build time}, e.g. {"wkv6": "chunked"}."""
        return {op: self.impl for op in self.ops}

    def observe_decay(self, log_retention: torch.Tensor) -> None:
        if self.decay_observer is not None:
            self.decay_observer(self, log_retention.detach())


MIXERS: dict[str, type[SequenceMixer]] = {}


def register_mixer(cls: type[SequenceMixer]) -> type[SequenceMixer]:
    """Class decorator: add a SequenceMixer subclass to MIXERS under `cls.name` (letters and branches unique)."""
    for attr in ("name", "Config", "letter", "branch"):
        if not hasattr(cls, attr):
            raise TypeError(f"mixer {cls.__name__} must declare the class attribute {attr!r}")
    for other in MIXERS.values():
        if other is cls:
            continue
        clash = [a for a in ("name", "letter", "branch") if getattr(other, a) == getattr(cls, a)]
        if clash:
            raise ValueError(f"mixer {cls.__name__} reuses the {clash} of {other.__name__}")
    MIXERS[cls.name] = cls
    return cls


def mixer_for_letter(letter: str) -> type[SequenceMixer] | None:
    return next((cls for cls in MIXERS.values() if cls.letter == letter), None)


def mixer_for_branch(branch: str) -> type[SequenceMixer] | None:
    return next((cls for cls in MIXERS.values() if cls.branch == branch), None)


def no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter that is never weight-decayed (decays, bonus, h0, ...)."""
    param._no_weight_decay = True
    return param


def lora(param: nn.Parameter) -> nn.Parameter:
    """Mark a low-rank data-dependent mixing/decay projection: decayed only with `lora_weight_decay`."""
    param._lora = True
    return param


def require(field: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise the ValueError every config check uses: the field (as a user writes it), the value, what is allowed."""
    if not ok:
        raise ValueError(f"ModelConfig.{field}={value!r} is not allowed: must be {allowed}")


def is_power_of_two_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1
                             and value & (value - 1) == 0)


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
