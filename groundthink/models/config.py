"""ModelConfig: every architecture switch of a GroundThink model, validated when it is built.

The layer pattern is a string of letters tiled over depth: H = parallel hybrid (RWKV-6 and Mamba-2 branches
mixed by α), R = RWKV-6 only, M = Mamba-2 only, A = sliding-window attention; `attn_layers` turns explicit
0-based depths into A. So "H" is the hybrid stack, "R"/"M" the pure baselines, "HHHHHA" an attention layer
every 6th block, and pattern="H", attn_layers=[5] one attention layer at depth 6.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

LETTERS = {"H": "parallel hybrid RWKV-6 + Mamba-2", "R": "RWKV-6", "M": "Mamba-2", "A": "attention"}
IMPLS = ("auto", "reference", "chunked", "fla", "mamba_ssm")
INITS = ("official", "identity")
FFN_KINDS = ("rwkv_cmix", "swiglu")
NORMS = ("layernorm", "rmsnorm")


@dataclass
class ModelConfig:
    vocab_size: int = 264
    d_model: int = 256
    n_layers: int = 12
    n_heads: int = 4  # RWKV-6 heads
    head_dim: int | None = None  # RWKV-6 head size; None = d_model // n_heads
    d_state: int = 64  # Mamba-2 state size N
    mamba_expand: int = 2
    mamba_head_dim: int = 64  # Mamba-2 head size P
    d_conv: int = 4
    pattern: str = "H"
    attn_layers: list[int] | None = None
    attn_heads: int = 4
    attn_window: int = 512
    alpha: float = 0.6  # RWKV share of a hybrid block
    learn_alpha: bool = False
    gamma_init: float = 0.01  # residual scale of the mixer branch
    learn_gamma: bool = True
    branch_norm: bool = False  # RMSNorm each branch before mixing (Hymba)
    state_norm: bool = False
    state_norm_groups: int = 4
    state_norm_interval: int = 64
    learn_h0: bool = False
    grounding_strength: float = 1.0  # scale of the learned h0 a stream starts from
    min_retention: float = 0.01  # RWKV-6 decay floor w >= min_retention; 0 disables
    init: str = "official"
    ffn: str = "rwkv_cmix"
    ffn_mult: float = 3.5
    impl: str = "auto"
    wkv_chunk_size: int | None = None
    ssd_chunk_size: int | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 8192  # longest training segment; streaming (carried state) is not bounded by it
    norm: str = "layernorm"  # pre-norm of every block and the final norm: layernorm | rmsnorm

    def __post_init__(self) -> None:
        if self.attn_layers is not None:
            self.attn_layers = [int(i) for i in self.attn_layers]
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "mamba_expand",
            "mamba_head_dim",
            "d_state",
            "d_conv",
            "attn_heads",
            "attn_window",
            "state_norm_groups",
            "state_norm_interval",
            "max_seq_len",
        ):
            _require(
                name,
                getattr(self, name),
                isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                "a positive integer",
            )
        if self.head_dim is None:
            _require(
                "d_model",
                self.d_model,
                self.d_model % self.n_heads == 0,
                f"divisible by n_heads={self.n_heads} (or set head_dim explicitly)",
            )
        else:
            _require(
                "head_dim",
                self.head_dim,
                isinstance(self.head_dim, int) and self.head_dim >= 1,
                "a positive integer or null (= d_model // n_heads)",
            )
        _require(
            "pattern",
            self.pattern,
            isinstance(self.pattern, str) and len(self.pattern) > 0,
            f"a non-empty string of letters from {LETTERS}",
        )
        bad = sorted(set(self.pattern) - set(LETTERS))
        _require("pattern", self.pattern, not bad, f"letters from {LETTERS} (unknown letter(s) {bad})")
        if self.attn_layers is not None:
            outside = [i for i in self.attn_layers if not 0 <= i < self.n_layers]
            _require(
                "attn_layers",
                self.attn_layers,
                not outside,
                f"0-based layer indices in [0, {self.n_layers - 1}] (n_layers={self.n_layers})",
            )
        letters = set(self.layer_letters())
        if "A" in letters:
            _require(
                "attn_heads",
                self.attn_heads,
                self.d_model % self.attn_heads == 0,
                f"a divisor of d_model={self.d_model}",
            )
        if letters & {"H", "M"}:
            d_inner = self.mamba_expand * self.d_model
            _require(
                "mamba_head_dim",
                self.mamba_head_dim,
                d_inner % self.mamba_head_dim == 0,
                f"a divisor of mamba_expand·d_model={d_inner}",
            )
        _require(
            "alpha", self.alpha, _is_number(self.alpha) and 0.0 <= self.alpha <= 1.0, "a number in [0, 1]"
        )
        _require(
            "gamma_init",
            self.gamma_init,
            _is_number(self.gamma_init) and math.isfinite(self.gamma_init),
            "a finite number",
        )
        _require(
            "grounding_strength",
            self.grounding_strength,
            _is_number(self.grounding_strength) and math.isfinite(self.grounding_strength),
            "a finite number",
        )
        _require(
            "min_retention",
            self.min_retention,
            _is_number(self.min_retention) and 0.0 <= self.min_retention < 1.0,
            "a number in [0, 1) (0 = off)",
        )
        _require(
            "ffn_mult", self.ffn_mult, _is_number(self.ffn_mult) and self.ffn_mult > 0, "a positive number"
        )
        _require("init", self.init, self.init in INITS, f"one of {list(INITS)}")
        _require("ffn", self.ffn, self.ffn in FFN_KINDS, f"one of {list(FFN_KINDS)}")
        _require("impl", self.impl, self.impl in IMPLS, f"one of {list(IMPLS)}")
        _require("norm", self.norm, self.norm in NORMS, f"one of {list(NORMS)}")
        for name in ("wkv_chunk_size", "ssd_chunk_size"):
            value = getattr(self, name)
            _require(
                name,
                value,
                value is None or (isinstance(value, int) and value >= 1 and value & (value - 1) == 0),
                "null (the op's default) or a positive power of two",
            )
        if self.state_norm:
            if letters & {"H", "R"}:
                _require(
                    "state_norm_groups",
                    self.state_norm_groups,
                    self.rwkv_head_dim % self.state_norm_groups == 0,
                    f"a divisor of the RWKV head_dim={self.rwkv_head_dim}",
                )
            if letters & {"H", "M"}:
                _require(
                    "state_norm_groups",
                    self.state_norm_groups,
                    self.mamba_head_dim % self.state_norm_groups == 0,
                    f"a divisor of mamba_head_dim={self.mamba_head_dim}",
                )
        for name in ("learn_alpha", "learn_gamma", "branch_norm", "state_norm", "learn_h0", "tie_embeddings"):
            _require(name, getattr(self, name), isinstance(getattr(self, name), bool), "true or false")

    @property
    def rwkv_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def layer_letters(self) -> list[str]:
        """The block kind of every layer: the pattern tiled over depth, then attn_layers set to "A"."""
        letters = [self.pattern[i % len(self.pattern)] for i in range(self.n_layers)]
        for i in self.attn_layers or []:
            letters[i] = "A"
        return letters

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields_: dict) -> ModelConfig:
        """A ModelConfig from a plain dict such as a run's saved `config["model"]`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(fields_) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**fields_)

    def replace(self, **changes) -> ModelConfig:
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(
                f"unknown ModelConfig field(s) {unknown}; allowed: {[f.name for f in fields(self)]}"
            )
        return ModelConfig(**{**self.to_dict(), **changes})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(field: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{field}={value!r} is not allowed: must be {allowed}")
