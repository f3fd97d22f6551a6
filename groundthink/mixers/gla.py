"""Gated Linear Attention (GLA) as a carried-state sequence mixer (layer letter G).

Paper: Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with Hardware-Efficient Training", arXiv
2312.06635. Follows fla's `fla.layers.gla.GatedLinearAttention` with its defaults (expand_k 0.5, expand_v 1.0, no
short convolution, no feature map, output gate with swish and a fused per-head RMSNorm): q, k, v projections; a
per-key-channel data-dependent decay through a low-rank gate, log g_t = logsigmoid(W_up W_down x_t + b) / 16
(gate_logit_normalizer); the recurrence groundthink.ops.gla (S_t = diag(g_t) S_{t-1} + k_tᵀ v_t, o_t = q_t S_t /
sqrt(K)); o = RMSNorm_head(o) ⊙ weight ⊙ SiLU(W_g x); o_proj. Init as fla's GLA models: every projection N(0, 0.02),
biases zero, o_proj's std divided by sqrt(2·n_layers) (the prenorm residual rescale).

What differs:
- The state is carried: {"state" [B,H,K,V] fp32} (K = expand_k·d_model/H, V = expand_v·d_model/H).
- `init="identity"` sets the gate bias so the per-token decays start spread over 0.982..0.99988 across key
  channels, `init="identity_bias"` at 0.9999 in every channel (the shared GroundThink init options).
- Optional trainable h0 and StateNorm (grouped along K; groundthink/mixers/_common.py).
- The low-rank gate's matrices are marked `lora` for the weight-decay switch, as RWKV-6's decay LoRA is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from groundthink.mixers._common import (
    IDENTITY_BIAS_RETENTION,
    InitialState,
    check_choice,
    identity_log_decay,
    resolve_op_impl,
    scan_with_state_norm,
)
from groundthink.mixers.base import (
    INITS,
    LayerContext,
    SequenceMixer,
    is_positive_int,
    is_power_of_two_or_none,
    lora,
    register_mixer,
    require,
)
from groundthink.ops import op_impl
from groundthink.ops.gla import gla

NORM_EPS = 1e-5


@dataclass
class GLAConfig:
    """Settings of the GLA mixer: `model.mixers.gla.*`."""

    n_heads: int = 4
    expand_k: float = 0.5  # key (and state) width = expand_k · d_model
    expand_v: float = 1.0  # value width = expand_v · d_model
    gate_low_rank_dim: int = 16  # rank of the decay gate's projection
    gate_logit_normalizer: float = 16.0  # log g = logsigmoid(gate logits) / this
    chunk_size: int | None = None  # the chunked op's chunk length (a power of two); None = the op's default

    def widths(self, d_model: int) -> tuple[float, float]:
        return d_model * self.expand_k, d_model * self.expand_v

    def check(self, d_model: int, state_norm_groups: int | None) -> None:
        f = "mixers.gla."
        for name in ("n_heads", "gate_low_rank_dim"):
            require(f + name, getattr(self, name), is_positive_int(getattr(self, name)), "a positive integer")
        for name, width in zip(("expand_k", "expand_v"), self.widths(d_model)):
            whole = width == int(width) and width >= 1 and int(width) % self.n_heads == 0
            require(f + name, getattr(self, name), whole,
                    f"such that {name}·d_model (d_model={d_model}) is a whole multiple of n_heads={self.n_heads}")
        require(f + "gate_logit_normalizer", self.gate_logit_normalizer, self.gate_logit_normalizer > 0,
                "a positive number")
        require(f + "chunk_size", self.chunk_size, is_power_of_two_or_none(self.chunk_size),
                "null (the op's default) or a positive power of two")
        head_k = int(self.widths(d_model)[0]) // self.n_heads
        if state_norm_groups is not None:
            require("state_norm_groups", state_norm_groups, head_k % state_norm_groups == 0,
                    f"a divisor of the GLA key head size {head_k}")

    def d_model_multiple(self, state_norm_groups: int | None) -> int:
        """The smallest d_model step that keeps both widths whole multiples of n_heads (and the state groups)."""
        for m in range(1, 1 << 16):
            k, v = self.widths(m)
            if k == int(k) and v == int(v) and int(k) % (self.n_heads * (state_norm_groups or 1)) == 0 \
                    and int(v) % self.n_heads == 0:
                return m
        raise ValueError(f"mixers.gla: no d_model fits expand_k={self.expand_k}, expand_v={self.expand_v}")


@register_mixer
class GatedLinearAttention(SequenceMixer):
    name = "gla"
    Config = GLAConfig
    letter = "G"
    branch = "gla"
    recurrent_state = ("state",)
    ops = ("gla",)

    def __init__(
        self,
        d_model: int,
        *,
        n_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        layer_id: int = 0,
        n_layers: int = 1,
        impl: str = "auto",
        chunk_size: int | None = None,
        init: str = "official",
        learn_h0: bool = False,
        grounding_strength: float = 1.0,
        state_norm: bool = False,
        state_norm_groups: int = 4,
        state_norm_interval: int = 64,
        device=None,
    ) -> None:
        super().__init__()
        check_choice("init", init, INITS)
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        self.n_heads, self.head_k, self.head_v = n_heads, key_dim // n_heads, value_dim // n_heads
        self.impl = resolve_op_impl("gla", impl, device)
        self.chunk_size = chunk_size
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.state_norm, self.state_norm_groups = state_norm, state_norm_groups
        self.state_norm_interval = state_norm_interval
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, value_dim, bias=False)
        self.gk_down = nn.Linear(d_model, gate_low_rank_dim, bias=False)
        self.gk_up = nn.Linear(gate_low_rank_dim, key_dim, bias=True)
        lora(self.gk_down.weight)
        lora(self.gk_up.weight)
        self.norm_weight = nn.Parameter(torch.ones(self.head_v))
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)
        self.h0 = InitialState((n_heads, self.head_k, self.head_v), learn_h0=learn_h0,
                               grounding_strength=grounding_strength)
        self.reset_parameters(n_layers, init)

    @classmethod
    def build(cls, settings: GLAConfig, ctx: LayerContext) -> GatedLinearAttention:
        return cls(
            ctx.d_model,
            n_heads=settings.n_heads,
            expand_k=settings.expand_k,
            expand_v=settings.expand_v,
            gate_low_rank_dim=settings.gate_low_rank_dim,
            gate_logit_normalizer=settings.gate_logit_normalizer,
            layer_id=ctx.layer_id,
            n_layers=ctx.n_layers,
            impl=op_impl(ctx.impl, "gla"),
            chunk_size=settings.chunk_size,
            init=ctx.init,
            learn_h0=ctx.learn_h0,
            grounding_strength=ctx.grounding_strength,
            state_norm=ctx.state_norm,
            state_norm_groups=ctx.state_norm_groups,
            state_norm_interval=ctx.state_norm_interval,
            device=ctx.device,
        )

    @torch.no_grad()
    def reset_parameters(self, n_layers: int, init: str) -> None:
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.gk_down, self.gk_up):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.normal_(self.o_proj.weight, std=0.02 / math.sqrt(2 * n_layers))
        key_dim = self.n_heads * self.head_k
        if init == "official":
            nn.init.zeros_(self.gk_up.bias)
            return
        if init == "identity":
            target = identity_log_decay(key_dim).double()  # ln g per key channel: 0.982 .. 0.99988
        else:
            target = torch.full((key_dim,), math.log(IDENTITY_BIAS_RETENTION), dtype=torch.float64)
        # logsigmoid(b) / normalizer = target  <=>  b = -ln(expm1(-normalizer · target))
        self.gk_up.bias.copy_(-torch.log(torch.expm1(-self.gate_logit_normalizer * target)))

    def init_state(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        return {"state": self.h0(batch_size, device)}

    def state_size(self, seq_len: int | None = None) -> int:  # constant: seq_len does not change it
        return self.n_heads * self.head_k * self.head_v

    def forward(
        self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None, *, position: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_k, self.head_v
        if state is None:
            state = self.init_state(B, x.device)
        q = self.q_proj(x).view(B, T, H, K)
        k = self.k_proj(x).view(B, T, H, K)
        v = self.v_proj(x).view(B, T, H, V)
        log_g = F.logsigmoid(self.gk_up(self.gk_down(x)).float()).view(B, T, H, K) / self.gate_logit_normalizer
        self.observe_decay(log_g)

        def step(a: int, b: int, s: torch.Tensor):
            return gla(q[:, a:b], k[:, a:b], v[:, a:b], log_g[:, a:b], s, impl=self.impl, chunk_size=self.chunk_size)

        o, new_state = scan_with_state_norm(step, T, state["state"], position=position,
                                            interval=self.state_norm_interval, groups=self.state_norm_groups,
                                            enabled=self.state_norm)
        o = o.float()  # [B,T,H,V]
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + NORM_EPS) * self.norm_weight.float()
        gate = F.silu(self.g_proj(x).float()).view(B, T, H, V)
        return self.o_proj((o * gate).reshape(B, T, H * V).to(x.dtype)), {"state": new_state}
