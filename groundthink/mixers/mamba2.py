"""Mamba-2 (SSD) as a carried-state sequence mixer.

Paper: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State
Space Duality", arXiv 2405.21060. Follows state-spaces/mamba `mamba_ssm/modules/mamba2.py::Mamba2` (ngroups G
= 1 by default, no d_mlp split): in_proj -> [z | x | B | C | dt]; depthwise causal conv (kernel d_conv, bias)
over xBC, SiLU; SSD scan h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t, y_t = h_t C_t (groundthink.ops.ssd); y +=
D·x; gated RMSNorm y = RMSNorm(y ⊙ SiLU(z))·weight (norm_before_gate=False, eps 1e-5); out_proj. Official
init: A_log = ln U[1,16], dt = exp(U[ln 1e-3, ln 0.1]) clamped >= 1e-4 with dt_bias = softplus⁻¹(dt), D = 1,
conv as torch's Conv1d default, out_proj as nn.Linear's default divided by sqrt(2·n_layers) (mamba_ssm's
prenorm rescale with two residual branches per block).

What differs:
- The state is carried across segments: {"ssm" [B,H,P,N] fp32, "conv" [B,d_conv-1,conv_dim] = the last
  d_conv-1 *pre-conv* xBC columns} (the stock module starts every forward from zeros; see model_anchors.md
  §2.4).
- `init="identity"`: dt starts at 0.01 in every head (the geometric middle of the official range) and A is set
  so exp(dt·A) spans 0.982..0.99988 over the heads, the same range as RWKV's identity init; `init=
  "identity_bias"`: the same dt, and exp(dt·A) = 0.9999 in every head.
- Optional trainable h0 [H,P,N] and StateNorm (grouped along P; see groundthink/mixers/_common.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from groundthink.mixers._common import (
    IDENTITY_BIAS_RETENTION,
    InitialState,
    check_choice,
    identity_log_decay,
    inverse_softplus,
    resolve_op_impl,
    scan_with_state_norm,
)
from groundthink.mixers.base import (
    INITS,
    LayerContext,
    SequenceMixer,
    is_positive_int,
    is_power_of_two_or_none,
    no_weight_decay,
    register_mixer,
    require,
)
from groundthink.ops import causal_conv1d, op_impl, ssd

IDENTITY_DT = 0.01
NORM_EPS = 1e-5


@dataclass
class Mamba2Config:
    """Settings of the Mamba-2 mixer: `model.mixers.mamba2.*`."""

    d_state: int = 64  # state size N
    expand: int = 2  # d_inner = expand · d_model
    head_dim: int = 64  # head size P (n_heads = d_inner / P)
    d_conv: int = 4  # width of the causal depthwise conv over xBC
    n_groups: int = 1  # B/C groups G (heads per group = n_heads / G)
    chunk_size: int | None = None  # the chunked op's chunk length (a power of two); None = the op's default

    # Flat ModelConfig fields of runs saved before mixers had their own settings -> the field here.
    LEGACY_FIELDS: ClassVar[dict[str, str]] = {
        "d_state": "d_state", "mamba_expand": "expand", "mamba_head_dim": "head_dim", "d_conv": "d_conv",
        "ssd_chunk_size": "chunk_size",
    }

    def check(self, d_model: int, state_norm_groups: int | None) -> None:
        """Raise ValueError naming the field when these settings cannot build a layer of width d_model."""
        f = "mixers.mamba2."
        for name in ("d_state", "expand", "head_dim", "d_conv", "n_groups"):
            require(f + name, getattr(self, name), is_positive_int(getattr(self, name)), "a positive integer")
        d_inner = self.expand * d_model
        require(f + "head_dim", self.head_dim, d_inner % self.head_dim == 0,
                f"a divisor of expand·d_model={d_inner}")
        require(f + "n_groups", self.n_groups, (d_inner // self.head_dim) % self.n_groups == 0,
                f"a divisor of the number of heads {d_inner // self.head_dim}")
        require(f + "chunk_size", self.chunk_size, is_power_of_two_or_none(self.chunk_size),
                "null (the op's default) or a positive power of two")
        if state_norm_groups is not None:
            require("state_norm_groups", state_norm_groups, self.head_dim % state_norm_groups == 0,
                    f"a divisor of mixers.mamba2.head_dim={self.head_dim}")

    def d_model_multiple(self, state_norm_groups: int | None) -> int:
        """d_model must be a multiple of this so that expand·d_model splits into whole heads."""
        return self.head_dim // math.gcd(self.expand, self.head_dim)


@register_mixer
class Mamba2(SequenceMixer):
    name = "mamba2"
    Config = Mamba2Config
    letter = "M"
    branch = "mamba"
    recurrent_state = ("ssm",)
    ops = ("ssd", "conv")

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 64,
        expand: int = 2,
        head_dim: int = 64,
        d_conv: int = 4,
        n_groups: int = 1,
        layer_id: int = 0,
        n_layers: int = 1,
        impl: str = "auto",
        conv_impl: str = "auto",
        chunk_size: int | None = None,
        init: str = "official",
        learn_h0: bool = False,
        grounding_strength: float = 1.0,
        state_norm: bool = False,
        state_norm_groups: int = 4,
        state_norm_interval: int = 64,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        device=None,
    ) -> None:
        super().__init__()
        check_choice("init", init, INITS)
        self.d_model, self.d_state, self.d_conv, self.n_groups = d_model, d_state, d_conv, n_groups
        self.d_inner = expand * d_model
        if self.d_inner % head_dim:
            raise ValueError(
                f"mamba_head_dim={head_dim} must divide "
                f"mamba_expand·d_model={expand}·{d_model}={self.d_inner}"
            )
        self.head_dim = head_dim
        self.n_heads = self.d_inner // head_dim
        if state_norm and head_dim % state_norm_groups:
            raise ValueError(f"state_norm_groups={state_norm_groups} must divide mamba_head_dim={head_dim}")
        self.impl = resolve_op_impl("ssd", impl, device)
        self.conv_impl = resolve_op_impl("conv", conv_impl, device)
        self.chunk_size = chunk_size
        self.state_norm, self.state_norm_groups = state_norm, state_norm_groups
        self.state_norm_interval = state_norm_interval
        self.conv_dim = self.d_inner + 2 * n_groups * d_state

        self.in_proj = nn.Linear(
            d_model, 2 * self.d_inner + 2 * n_groups * d_state + self.n_heads, bias=False
        )
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, d_conv))  # depthwise [C,W]
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.A_log = no_weight_decay(nn.Parameter(torch.empty(self.n_heads)))
        self.dt_bias = no_weight_decay(nn.Parameter(torch.empty(self.n_heads)))
        self.D = no_weight_decay(nn.Parameter(torch.empty(self.n_heads)))
        self.norm_weight = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.h0 = InitialState(
            (self.n_heads, head_dim, d_state), learn_h0=learn_h0, grounding_strength=grounding_strength
        )
        self.reset_parameters(n_layers, init, A_init_range, dt_min, dt_max, dt_init_floor)

    @classmethod
    def build(cls, settings: Mamba2Config, ctx: LayerContext) -> Mamba2:
        return cls(
            ctx.d_model,
            d_state=settings.d_state,
            expand=settings.expand,
            head_dim=settings.head_dim,
            d_conv=settings.d_conv,
            n_groups=settings.n_groups,
            impl=op_impl(ctx.impl, "ssd"),
            conv_impl=op_impl(ctx.impl, "conv"),
            chunk_size=settings.chunk_size,
            **ctx.recurrent_kwargs(),
        )

    def impls(self) -> dict[str, str]:
        return {"ssd": self.impl, "conv": self.conv_impl}

    @torch.no_grad()
    def reset_parameters(self, n_layers, init, A_init_range, dt_min, dt_max, dt_init_floor) -> None:
        self.in_proj.reset_parameters()
        bound = 1.0 / math.sqrt(self.d_conv)  # Conv1d default: fan_in = in_channels/groups · kernel = d_conv
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        if init in ("identity", "identity_bias"):
            if init == "identity":
                log_decay = identity_log_decay(self.n_heads)  # [H] target ln exp(dt·A)
            else:
                log_decay = torch.full((self.n_heads,), math.log(IDENTITY_BIAS_RETENTION))
            dt = torch.full((self.n_heads,), IDENTITY_DT)
            self.A_log.copy_(torch.log(-log_decay / IDENTITY_DT))
        else:
            self.A_log.uniform_(*A_init_range).log_()
            u = torch.rand(self.n_heads)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(
                min=dt_init_floor
            )
        self.dt_bias.copy_(inverse_softplus(dt))
        nn.init.ones_(self.D)
        nn.init.ones_(self.norm_weight)
        self.out_proj.reset_parameters()
        self.out_proj.weight.div_(math.sqrt(2 * n_layers))

    def init_state(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        return {
            "ssm": self.h0(batch_size, device),
            "conv": torch.zeros(batch_size, self.d_conv - 1, self.conv_dim, device=device),
        }

    def state_size(self, seq_len: int | None = None) -> int:  # constant: seq_len does not change it
        return self.n_heads * self.head_dim * self.d_state + (self.d_conv - 1) * self.conv_dim

    def forward(
        self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None, *, position: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        Bsz, T, _ = x.shape
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        if state is None:
            state = self.init_state(Bsz, x.device)
        z, xBC, dt_raw = self.in_proj(x).split([self.d_inner, self.conv_dim, H], dim=-1)
        xBC, conv_state = causal_conv1d(
            xBC, self.conv_weight, self.conv_bias, state["conv"], impl=self.conv_impl
        )
        xBC = F.silu(xBC)
        xs, Bm, Cm = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        xs = xs.reshape(Bsz, T, H, P)
        Bm = Bm.reshape(Bsz, T, G, N)
        Cm = Cm.reshape(Bsz, T, G, N)
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())  # [B,T,H]
        A = -torch.exp(self.A_log.float())  # [H]
        if self.decay_observer is not None:
            self.observe_decay(dt * A)  # ln exp(dt·A) per step and head

        def step(a: int, b: int, s: torch.Tensor):
            return ssd(
                xs[:, a:b],
                dt[:, a:b],
                A,
                Bm[:, a:b],
                Cm[:, a:b],
                s,
                impl=self.impl,
                chunk_size=self.chunk_size,
            )

        y, ssm_state = scan_with_state_norm(
            step,
            T,
            state["ssm"],
            position=position,
            interval=self.state_norm_interval,
            groups=self.state_norm_groups,
            enabled=self.state_norm,
        )
        y = torch.addcmul(y, xs, self.D.to(y.dtype)[:, None])  # the D skip, [B,T,H,P]
        y = y.reshape(Bsz, T, self.d_inner) * F.silu(z)
        y = y * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + NORM_EPS).to(y.dtype)
        if type(self.out_proj) is nn.Linear:
            # The gated RMSNorm's gain folded into out_proj's columns: W·(y ⊙ g) = (W diag(g))·y, a [D, d_inner]
            # product instead of a pass over [B,T,d_inner] (and its backward).
            out = F.linear(y, self.out_proj.weight * self.norm_weight.to(self.out_proj.weight.dtype))
        else:  # a replaced projection (ternary STE, packed) computes from its own weight: keep its forward
            out = self.out_proj(y * self.norm_weight)
        return out, {"ssm": ssm_state, "conv": conv_state.float()}  # fp32 so the state dtype never changes
