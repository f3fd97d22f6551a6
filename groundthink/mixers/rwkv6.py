"""RWKV-6 ("Finch") time mixing as a carried-state sequence mixer.

Paper: Peng et al., "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence", arXiv
2404.05892. Follows the official BlinkDL/RWKV-LM `RWKV-v5/src/model.py::RWKV_Tmix_x060` (with
`RWKV.generate_init_weight`): token shift with the data-dependent lerp (ddlerp, a 5-way LoRA of rank
D_MIX_LORA = 32), data-dependent decay d_t = time_decay + tanh(x_w A) B (LoRA rank D_DECAY_LORA = 64), log w_t
= -exp(d_t), bonus u (time_faaaa), the WKV recurrence (groundthink.ops.wkv6), per-head GroupNorm with eps
64e-5, SiLU gate, output projection. Official init: time_maa_* = 1 - (i/D)^r1 (and its v/r/g variants),
time_decay = -6 + 5 (n/(A-1))^(0.7+1.3 r0), time_faaaa = r0 (1 - n/(A-1)) + 0.1 ((n+1) % 3 - 1), LoRA first
matrices zero and second U(±0.01), key/gate orthogonal ×0.1, receptance/value orthogonal, output zero,
ln_x.weight = ((1+layer)/L)^0.7.

What differs:
- The state is carried: {"wkv" [B,H,K,V] fp32 in fla's key-major layout, "shift" [B,D] = the last input
  token}.
- Decay floor: log w_t >= ln(min_retention) (legacy knob, default 0.01; 0 disables). It is applied to d_t as
  d_t <= ln(-ln(min_retention)), which is the same floor but keeps the gradient finite where exp(d_t) would
  overflow. Every impl sees the same floored log w, so reference/chunked/fla agree.
- `init="identity"`: time_decay starts at ln(-ln(1 - exp(linspace(-4, -9, A)))), i.e. decays 0.982..0.99988
  (long memory from the start); `init="identity_bias"`: every channel's decay starts at 0.9999; everything else is
  the official init.
- Optional trainable h0 and StateNorm (see groundthink/mixers/_common.py).
- Lerp coefficients and time_decay are 1-D parameters (official: [1,1,D]) so the ndim < 2 rule of the
  weight-decay isolation covers them; time_faaaa [H,K] is never decayed; the token-shift and decay LoRA matrices
  (time_maa_w1/w2, time_decay_w1/w2) are marked `lora`: RWKV-LM's optimizer groups put them with the undecayed
  parameters, and so does GroundThink unless `optim.lora_weight_decay` is on.
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
    layer_ratios,
    log_min_retention,
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
    no_weight_decay,
    register_mixer,
    require,
)
from groundthink.ops import op_impl, wkv6

D_MIX_LORA = 32
D_DECAY_LORA = 64
GROUP_NORM_EPS = 64e-5  # 1e-5 · head_size_divisor² with divisor 8, as in RWKV-LM


@dataclass
class RWKV6Config:
    """Settings of the RWKV-6 time mix: `model.mixers.rwkv6.*`."""

    n_heads: int = 4
    head_dim: int | None = None  # head size K = V; None = d_model // n_heads
    chunk_size: int | None = None  # the chunked op's chunk length (a power of two); None = the op's default
    min_retention: float = 0.01  # legacy knob: decay floor w_t >= min_retention; 0 disables it
    d_mix_lora: int = D_MIX_LORA  # rank of the 5-way token-shift (ddlerp) LoRA
    d_decay_lora: int = D_DECAY_LORA  # rank of the data-dependent decay LoRA

    # Flat ModelConfig fields of runs saved before mixers had their own settings -> the field here.
    LEGACY_FIELDS: ClassVar[dict[str, str]] = {
        "n_heads": "n_heads", "head_dim": "head_dim", "wkv_chunk_size": "chunk_size", "min_retention": "min_retention"
    }

    def head_size(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.n_heads

    def check(self, d_model: int, state_norm_groups: int | None) -> None:
        """Raise ValueError naming the field when these settings cannot build a layer of width d_model."""
        f = "mixers.rwkv6."
        for name in ("n_heads", "d_mix_lora", "d_decay_lora"):
            require(f + name, getattr(self, name), is_positive_int(getattr(self, name)), "a positive integer")
        if self.head_dim is None:
            require(f + "n_heads", self.n_heads, d_model % self.n_heads == 0,
                    f"a divisor of d_model={d_model} (or set mixers.rwkv6.head_dim explicitly)")
        else:
            require(f + "head_dim", self.head_dim, is_positive_int(self.head_dim),
                    "a positive integer or null (= d_model // n_heads)")
        require(f + "chunk_size", self.chunk_size, is_power_of_two_or_none(self.chunk_size),
                "null (the op's default) or a positive power of two")
        ok = isinstance(self.min_retention, (int, float)) and not isinstance(self.min_retention, bool)
        require(f + "min_retention", self.min_retention, ok and 0.0 <= self.min_retention < 1.0,
                "a number in [0, 1) (0 = off)")
        if state_norm_groups is not None:
            require("state_norm_groups", state_norm_groups, self.head_size(d_model) % state_norm_groups == 0,
                    f"a divisor of the RWKV head size {self.head_size(d_model)}")

    def d_model_multiple(self, state_norm_groups: int | None) -> int:
        """d_model must be a multiple of this for the head split to stay whole (used by parameter matching)."""
        return self.n_heads * (state_norm_groups or 1) if self.head_dim is None else 1


@register_mixer
class RWKV6TimeMix(SequenceMixer):
    name = "rwkv6"
    Config = RWKV6Config
    letter = "R"
    branch = "rwkv"
    recurrent_state = ("wkv",)
    ops = ("wkv6",)

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        *,
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
        min_retention: float = 0.01,
        d_mix_lora: int = D_MIX_LORA,
        d_decay_lora: int = D_DECAY_LORA,
        device=None,
    ) -> None:
        super().__init__()
        check_choice("init", init, INITS)
        if state_norm and head_dim % state_norm_groups:
            raise ValueError(
                f"state_norm_groups={state_norm_groups} must divide the RWKV head_dim={head_dim}"
            )
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.d_att = d_att = n_heads * head_dim
        self.impl = resolve_op_impl("wkv6", impl, device)
        self.chunk_size = chunk_size
        self.state_norm, self.state_norm_groups = state_norm, state_norm_groups
        self.state_norm_interval = state_norm_interval
        log_floor = log_min_retention(min_retention)
        self.max_decay_exponent = None if log_floor is None else math.log(-log_floor)

        self.time_maa_x = nn.Parameter(torch.empty(d_model))
        self.time_maa_w = nn.Parameter(torch.empty(d_model))
        self.time_maa_k = nn.Parameter(torch.empty(d_model))
        self.time_maa_v = nn.Parameter(torch.empty(d_model))
        self.time_maa_r = nn.Parameter(torch.empty(d_model))
        self.time_maa_g = nn.Parameter(torch.empty(d_model))
        self.time_maa_w1 = lora(nn.Parameter(torch.empty(d_model, 5 * d_mix_lora)))
        self.time_maa_w2 = lora(nn.Parameter(torch.empty(5, d_mix_lora, d_model)))
        self.time_decay = nn.Parameter(torch.empty(d_att))
        self.time_decay_w1 = lora(nn.Parameter(torch.empty(d_model, d_decay_lora)))
        self.time_decay_w2 = lora(nn.Parameter(torch.empty(d_decay_lora, d_att)))
        self.time_faaaa = no_weight_decay(nn.Parameter(torch.empty(n_heads, head_dim)))  # u [H,K]
        self.receptance = nn.Linear(d_model, d_att, bias=False)
        self.key = nn.Linear(d_model, d_att, bias=False)
        self.value = nn.Linear(d_model, d_att, bias=False)
        self.gate = nn.Linear(d_model, d_att, bias=False)
        self.output = nn.Linear(d_att, d_model, bias=False)
        self.ln_x = nn.GroupNorm(n_heads, d_att, eps=GROUP_NORM_EPS)
        self.h0 = InitialState(
            (n_heads, head_dim, head_dim), learn_h0=learn_h0, grounding_strength=grounding_strength
        )
        self.reset_parameters(layer_id, n_layers, init)

    @classmethod
    def build(cls, settings: RWKV6Config, ctx: LayerContext) -> RWKV6TimeMix:
        return cls(
            ctx.d_model,
            settings.n_heads,
            settings.head_size(ctx.d_model),
            impl=op_impl(ctx.impl, "wkv6"),
            chunk_size=settings.chunk_size,
            min_retention=settings.min_retention,
            d_mix_lora=settings.d_mix_lora,
            d_decay_lora=settings.d_decay_lora,
            **ctx.recurrent_kwargs(),
        )

    @torch.no_grad()
    def reset_parameters(self, layer_id: int, n_layers: int, init: str) -> None:
        r0, r1 = layer_ratios(layer_id, n_layers)
        ddd = torch.arange(self.d_model, dtype=torch.float32) / self.d_model
        self.time_maa_x.copy_(1.0 - ddd.pow(r1))
        self.time_maa_w.copy_(1.0 - ddd.pow(r1))
        self.time_maa_k.copy_(1.0 - ddd.pow(r1))
        self.time_maa_v.copy_(1.0 - (ddd.pow(r1) + 0.3 * r0))
        self.time_maa_r.copy_(1.0 - ddd.pow(0.5 * r1))
        self.time_maa_g.copy_(1.0 - ddd.pow(0.5 * r1))
        nn.init.zeros_(self.time_maa_w1)
        nn.init.uniform_(self.time_maa_w2, -0.01, 0.01)
        n = torch.arange(self.d_att, dtype=torch.float32) / max(self.d_att - 1, 1)
        if init == "identity":
            self.time_decay.copy_(torch.log(-identity_log_decay(self.d_att)))
        elif init == "identity_bias":  # w = exp(-exp(d)) = IDENTITY_BIAS_RETENTION in every channel
            self.time_decay.fill_(math.log(-math.log(IDENTITY_BIAS_RETENTION)))
        else:
            self.time_decay.copy_(-6.0 + 5.0 * n.pow(0.7 + 1.3 * r0))
        nn.init.zeros_(self.time_decay_w1)
        nn.init.uniform_(self.time_decay_w2, -0.01, 0.01)
        bonus = r0 * (1.0 - n) + 0.1 * ((torch.arange(self.d_att) + 1) % 3 - 1).float()
        self.time_faaaa.copy_(bonus.view(self.n_heads, self.head_dim))
        gain = math.sqrt(self.d_att / self.d_model) if self.d_att > self.d_model else 1.0
        nn.init.orthogonal_(self.receptance.weight, gain=gain)
        nn.init.orthogonal_(self.value.weight, gain=gain)
        nn.init.orthogonal_(self.key.weight, gain=0.1 * gain)
        nn.init.orthogonal_(self.gate.weight, gain=0.1 * gain)
        nn.init.zeros_(self.output.weight)
        nn.init.constant_(self.ln_x.weight, ((1 + layer_id) / n_layers) ** 0.7)
        nn.init.zeros_(self.ln_x.bias)

    def init_state(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        return {
            "wkv": self.h0(batch_size, device),
            "shift": torch.zeros(batch_size, self.d_model, device=device),
        }

    def state_size(self, seq_len: int | None = None) -> int:  # constant: seq_len does not change it
        return self.n_heads * self.head_dim * self.head_dim + self.d_model

    def log_decay(self, x_w: torch.Tensor) -> torch.Tensor:
        """log w_t = -exp(d_t) in fp32, floored at ln(min_retention). x_w [B,T,D] -> [B,T,A]."""
        d = self.time_decay + torch.tanh(x_w @ self.time_decay_w1) @ self.time_decay_w2
        d = d.float()
        if self.max_decay_exponent is not None:
            d = d.clamp(max=self.max_decay_exponent)
        log_w = -torch.exp(d)
        self.observe_decay(log_w)
        return log_w

    def forward(
        self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None, *, position: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, T, D = x.shape
        H, K = self.n_heads, self.head_dim
        if state is None:
            state = self.init_state(B, x.device)
        x_prev = torch.cat([state["shift"].to(x.dtype)[:, None], x[:, :-1]], dim=1)
        xx = x_prev - x  # [B,T,D]
        xxx = x + xx * self.time_maa_x
        lora = torch.tanh(xxx @ self.time_maa_w1).view(B, T, 5, -1)  # [B,T,5,R]
        mw, mk, mv, mr, mg = torch.einsum("btfr,frd->fbtd", lora, self.time_maa_w2).unbind(0)
        x_w = x + xx * (self.time_maa_w + mw)
        x_k = x + xx * (self.time_maa_k + mk)
        x_v = x + xx * (self.time_maa_v + mv)
        x_r = x + xx * (self.time_maa_r + mr)
        x_g = x + xx * (self.time_maa_g + mg)
        r = self.receptance(x_r).view(B, T, H, K)
        k = self.key(x_k).view(B, T, H, K)
        v = self.value(x_v).view(B, T, H, K)
        g = F.silu(self.gate(x_g))
        log_w = self.log_decay(x_w).view(B, T, H, K)
        u = self.time_faaaa

        def step(a: int, b: int, s: torch.Tensor):
            return wkv6(
                r[:, a:b],
                k[:, a:b],
                v[:, a:b],
                log_w[:, a:b],
                u,
                s,
                impl=self.impl,
                chunk_size=self.chunk_size,
            )

        y, wkv_state = scan_with_state_norm(
            step,
            T,
            state["wkv"],
            position=position,
            interval=self.state_norm_interval,
            groups=self.state_norm_groups,
            enabled=self.state_norm,
        )
        y = self.ln_x(y.reshape(B * T, self.d_att)).view(B, T, self.d_att)
        out = self.output(y * g)
        return out, {"wkv": wkv_state, "shift": x[:, -1]}
