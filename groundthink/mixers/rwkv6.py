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
  (long memory from the start); everything else is the official init.
- Optional trainable h0 and StateNorm (see groundthink/mixers/_common.py).
- Lerp coefficients and time_decay are 1-D parameters (official: [1,1,D]) so the ndim < 2 rule of the
  weight-decay isolation covers them; time_faaaa [H,K] is marked `_no_weight_decay`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from groundthink.mixers._common import (
    InitialState,
    check_choice,
    identity_log_decay,
    layer_ratios,
    log_min_retention,
    no_weight_decay,
    op_impl,
    resolve_op_impl,
    scan_with_state_norm,
)
from groundthink.ops import wkv6

D_MIX_LORA = 32
D_DECAY_LORA = 64
GROUP_NORM_EPS = 64e-5  # 1e-5 · head_size_divisor² with divisor 8, as in RWKV-LM
INITS = ("official", "identity")


class RWKV6TimeMix(nn.Module):
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
        self.time_maa_w1 = nn.Parameter(torch.empty(d_model, 5 * d_mix_lora))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, d_mix_lora, d_model))
        self.time_decay = nn.Parameter(torch.empty(d_att))
        self.time_decay_w1 = nn.Parameter(torch.empty(d_model, d_decay_lora))
        self.time_decay_w2 = nn.Parameter(torch.empty(d_decay_lora, d_att))
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
    def from_config(cls, cfg, layer_id: int, device=None) -> RWKV6TimeMix:
        """Build from a ModelConfig-like object (read by field name; mixers do not import models)."""
        return cls(
            cfg.d_model,
            cfg.n_heads,
            cfg.rwkv_head_dim,
            layer_id=layer_id,
            n_layers=cfg.n_layers,
            impl=op_impl(cfg.impl, "wkv6"),
            chunk_size=cfg.wkv_chunk_size,
            init=cfg.init,
            learn_h0=cfg.learn_h0,
            grounding_strength=cfg.grounding_strength,
            state_norm=cfg.state_norm,
            state_norm_groups=cfg.state_norm_groups,
            state_norm_interval=cfg.state_norm_interval,
            min_retention=cfg.min_retention,
            device=device,
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

    def state_size(self) -> int:
        return self.n_heads * self.head_dim * self.head_dim + self.d_model

    def log_decay(self, x_w: torch.Tensor) -> torch.Tensor:
        """log w_t = -exp(d_t) in fp32, floored at ln(min_retention). x_w [B,T,D] -> [B,T,A]."""
        d = self.time_decay + torch.tanh(x_w @ self.time_decay_w1) @ self.time_decay_w2
        d = d.float()
        if self.max_decay_exponent is not None:
            d = d.clamp(max=self.max_decay_exponent)
        return -torch.exp(d)

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
