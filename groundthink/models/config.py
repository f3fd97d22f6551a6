"""ModelConfig: the block-level architecture switches of a GroundThink model, plus each mixer's own settings.

The layer pattern is a string of letters tiled over depth. Every registered sequence mixer has a letter (R =
RWKV-6, M = Mamba-2, A = sliding-window attention, ...: `groundthink.mixers.MIXERS`), and H is the parallel
hybrid: the two mixers named in `hybrid` (RWKV-6 and Mamba-2 by default) mixed by α. `attn_layers` turns explicit
0-based depths into attention layers. So "H" is the hybrid stack, "R"/"M" the pure baselines, "HHHHHA" an attention
layer every 6th block, and pattern="H", attn_layers=[5] one attention layer at depth 6.

Each mixer's settings live in its own dataclass (`RWKV6Config`, `Mamba2Config`, ...: the one place their defaults
are written) under `mixers[<name>]`; `ModelConfig(mixers={"rwkv6": {"n_heads": 8}})` fills in every other mixer
and field from those defaults. A config is validated when it is built: each error names the field as a user writes
it (`ModelConfig.mixers.rwkv6.n_heads=3 ...`), the value and what is allowed. Only the mixers the pattern uses are
checked against d_model.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from groundthink.mixers import FFNS, MIXERS
from groundthink.mixers.base import INITS, is_positive_int, require
from groundthink.ops import model_impls

HYBRID_LETTER = "H"
NORMS = ("layernorm", "rmsnorm")
# Fields of runs saved by earlier versions that no longer exist (nothing read them).
_DROPPED_LEGACY_FIELDS = ("max_seq_len",)


@dataclass
class ModelConfig:
    vocab_size: int = 264
    d_model: int = 256
    n_layers: int = 12
    pattern: str = "H"  # layer letters tiled over depth (module docstring)
    attn_layers: list[int] | None = None  # explicit 0-based depths that use attention, e.g. [5]
    hybrid: list[str] = field(default_factory=lambda: ["rwkv6", "mamba2"])  # the two mixers of an H block
    alpha: float = 0.6  # weight of the first hybrid mixer (RWKV share); the second gets 1 - alpha
    learn_alpha: bool = False
    gamma_init: float = 0.01  # residual scale of the mixer branch
    learn_gamma: bool = True
    branch_norm: bool = False  # RMSNorm each branch before mixing (Hymba)
    state_norm: bool = False
    state_norm_groups: int = 4
    state_norm_interval: int = 64
    learn_h0: bool = False
    grounding_strength: float = 1.0  # scale of the learned h0 a stream starts from
    init: str = "official"  # official | identity (decays spread 0.982..0.99988) | identity_bias (all 0.9999)
    ffn: str = "rwkv_cmix"
    ffn_mult: float = 3.5
    impl: str = "auto"  # auto | reference | chunked | fla | mamba_ssm
    tie_embeddings: bool = False
    norm: str = "layernorm"  # pre-norm of every block and the final norm: layernorm | rmsnorm
    mixers: dict[str, Any] = field(default_factory=dict)  # <mixer name> -> its settings (module docstring)

    def __post_init__(self) -> None:
        self.mixers = _mixer_settings(self.mixers)
        if self.attn_layers is not None:
            require("attn_layers", self.attn_layers, isinstance(self.attn_layers, (list, tuple)),
                    "null or a list of 0-based layer indices")
            self.attn_layers = [int(i) for i in self.attn_layers]
        self.hybrid = list(self.hybrid)
        for name in ("vocab_size", "d_model", "n_layers", "state_norm_groups", "state_norm_interval"):
            require(name, getattr(self, name), is_positive_int(getattr(self, name)), "a positive integer")
        letters = sorted(self.letters())
        require("pattern", self.pattern, isinstance(self.pattern, str) and len(self.pattern) > 0,
                f"a non-empty string of the letters {letters}")
        bad = sorted(set(self.pattern) - set(letters))
        require("pattern", self.pattern, not bad, f"letters from {letters} (unknown letter(s) {bad})")
        if self.attn_layers is not None:
            outside = [i for i in self.attn_layers if not 0 <= i < self.n_layers]
            require("attn_layers", self.attn_layers, not outside,
                    f"0-based layer indices in [0, {self.n_layers - 1}] (n_layers={self.n_layers})")
        require("hybrid", self.hybrid, len(self.hybrid) == 2 and len(set(self.hybrid)) == 2
                and all(name in MIXERS for name in self.hybrid),
                f"two different mixer names from {sorted(MIXERS)}")
        for name in ("alpha", "gamma_init", "grounding_strength", "ffn_mult"):
            value = getattr(self, name)
            require(name, value, _is_number(value) and math.isfinite(value), "a finite number")
        require("alpha", self.alpha, 0.0 <= self.alpha <= 1.0, "a number in [0, 1]")
        require("ffn_mult", self.ffn_mult, self.ffn_mult > 0, "a positive number")
        require("init", self.init, self.init in INITS, f"one of {list(INITS)}")
        require("ffn", self.ffn, self.ffn in FFNS, f"one of {sorted(FFNS)}")
        require("impl", self.impl, self.impl in model_impls(), f"one of {list(model_impls())}")
        require("norm", self.norm, self.norm in NORMS, f"one of {list(NORMS)}")
        for name in ("learn_alpha", "learn_gamma", "branch_norm", "state_norm", "learn_h0", "tie_embeddings"):
            require(name, getattr(self, name), isinstance(getattr(self, name), bool), "true or false")
        groups = self.state_norm_groups if self.state_norm else None
        for name in self.used_mixers():
            self.mixers[name].check(self.d_model, groups)

    # ----- structure -------------------------------------------------------------------------------------
    def letters(self) -> dict[str, tuple[str, ...]]:
        """{letter: the mixer names of a block with that letter}: one per registered mixer, and H = hybrid."""
        found = {cls.letter: (name,) for name, cls in MIXERS.items()}
        found[HYBRID_LETTER] = tuple(self.hybrid)
        return found

    def layer_letters(self) -> list[str]:
        """The block letter of every layer: the pattern tiled over depth, then attn_layers set to attention."""
        letters = [self.pattern[i % len(self.pattern)] for i in range(self.n_layers)]
        for i in self.attn_layers or []:
            letters[i] = MIXERS["attention"].letter
        return letters

    def block_mixers(self, letter: str) -> tuple[str, ...]:
        """The mixer names of a block with this letter, in branch order (for H: weights α, 1 − α)."""
        return self.letters()[letter]

    def used_mixers(self) -> list[str]:
        """Every mixer some layer uses, in order of first use."""
        names: list[str] = []
        for letter in self.layer_letters():
            names += [n for n in self.block_mixers(letter) if n not in names]
        return names

    def d_model_multiple(self) -> int:
        """d_model must be a multiple of this for every head split of the used mixers to stay whole (and of 8)."""
        groups = self.state_norm_groups if self.state_norm else None
        g = 8
        for name in self.used_mixers():
            g = math.lcm(g, self.mixers[name].d_model_multiple(groups))
        return g

    # ----- conversion ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields_: Mapping[str, Any]) -> ModelConfig:
        """A ModelConfig from a plain dict such as a run's saved `config["model"]`; unknown keys are an error.

        Runs saved before mixers had their own settings stored them as flat fields (n_heads, d_state,
        mamba_expand, attn_window, ...): those are moved to `mixers[<name>]` as each mixer's Config declares
        (`LEGACY_FIELDS`), and win over the same setting given nested.
        """
        data = dict(fields_)
        mixers = {name: dict(settings) for name, settings in (data.pop("mixers", None) or {}).items()}
        for name, mixer in MIXERS.items():
            for old, new in getattr(mixer.Config, "LEGACY_FIELDS", {}).items():
                if old in data:  # given flat, it wins over the same setting given nested (replace(n_heads=8))
                    mixers.setdefault(name, {})[new] = data.pop(old)
        for old in _DROPPED_LEGACY_FIELDS:
            data.pop(old, None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            detail = ", ".join(f"{k} (did you mean {h[0]}?)" if h else k for k, h in hints.items())
            raise ValueError(f"unknown ModelConfig field(s): {detail}; allowed: {sorted(known)}")
        return cls(**data, mixers=mixers)

    def replace(self, **changes) -> ModelConfig:
        """A copy with `changes`; `mixers={"rwkv6": {"n_heads": 8}}` changes only the settings named."""
        current = self.to_dict()
        mixers = current.pop("mixers")
        for name, settings in (changes.pop("mixers", None) or {}).items():
            settings = asdict(settings) if not isinstance(settings, Mapping) else settings
            mixers[name] = {**mixers.get(name, {}), **settings}
        return ModelConfig.from_dict({**current, **changes, "mixers": mixers})


def _mixer_settings(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every registered mixer's settings object, from `given` (settings objects or dicts of fields) and defaults."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(MIXERS))
    require("mixers", sorted(given), not unknown, f"names of registered mixers {sorted(MIXERS)} (unknown {unknown})")
    out = {}
    for name, mixer in MIXERS.items():
        value = given.get(name)
        if value is None:
            value = mixer.Config()
        elif isinstance(value, Mapping):
            allowed = {f.name for f in fields(mixer.Config)}
            bad = sorted(set(value) - allowed)
            require(f"mixers.{name}", dict(value), not bad, f"a mapping of {sorted(allowed)} (unknown {bad})")
            value = mixer.Config(**value)
        elif not isinstance(value, mixer.Config):
            require(f"mixers.{name}", value, False, f"a {mixer.Config.__name__} or a mapping of its fields")
        out[name] = value
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

