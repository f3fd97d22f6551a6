"""Channel mixers (the FFN half of a block): RWKV-6 channel mix and a SwiGLU alternative.

RWKV channel mix — Peng et al., arXiv 2404.05892; official BlinkDL/RWKV-LM
`RWKV-v5/src/model.py::RWKV_CMix_x060`: token shift with static lerps time_maa_k/time_maa_r = 1 - (i/D)^r1,
k = relu(W_k x_k)², out = σ(W_r x_r) ⊙ W_v k, hidden size int(ffn_mult·D) rounded down to a multiple of 32
(official: 3.5·D), W_r and W_v zero-initialised (official `generate_init_weight`). Differs: the token-shift
tail is carried as state {"shift" [B,D]} so TBPTT segments continue exactly, and the lerps are 1-D parameters.

SwiGLU — Shazeer, "GLU Variants Improve Transformer", arXiv 2002.05202; out = W_2 (SiLU(W_1 x) ⊙ W_3 x),
hidden size ⅔·ffn_mult·D rounded up to a multiple of 32 (LLaMA's rule, so its parameter count is close to
the channel mix's), W_2 zero-initialised like the RWKV value so every block starts as the identity.
Stateless: its state is an empty dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from groundthink.mixers._common import layer_ratios


def _round_to(n: float, multiple: int, up: bool) -> int:
    q = math.ceil(n / multiple) if up else math.floor(n / multiple)
    return max(multiple, int(q) * multiple)


class RWKVChannelMix(nn.Module):
    def __init__(self, d_model: int, *, ffn_mult: float = 3.5, layer_id: int = 0, n_layers: int = 1) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_hidden = _round_to(ffn_mult * d_model, 32, up=False)
        self.time_maa_k = nn.Parameter(torch.empty(d_model))
        self.time_maa_r = nn.Parameter(torch.empty(d_model))
        self.key = nn.Linear(d_model, self.d_hidden, bias=False)
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(self.d_hidden, d_model, bias=False)
        self.reset_parameters(layer_id, n_layers)

    @classmethod
    def from_config(cls, cfg, layer_id: int, device=None) -> RWKVChannelMix:
        """Build from a ModelConfig-like object (d_model, ffn_mult, n_layers read by field name)."""
        return cls(cfg.d_model, ffn_mult=cfg.ffn_mult, layer_id=layer_id, n_layers=cfg.n_layers)

    @torch.no_grad()
    def reset_parameters(self, layer_id: int, n_layers: int) -> None:
        _, r1 = layer_ratios(layer_id, n_layers)
        ddd = torch.arange(self.d_model, dtype=torch.float32) / self.d_model
        self.time_maa_k.copy_(1.0 - ddd.pow(r1))
        self.time_maa_r.copy_(1.0 - ddd.pow(r1))
        gain = math.sqrt(self.d_hidden / self.d_model)
        nn.init.orthogonal_(self.key.weight, gain=gain)
        nn.init.zeros_(self.receptance.weight)
        nn.init.zeros_(self.value.weight)

    def init_state(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        return {"shift": torch.zeros(batch_size, self.d_model, device=device)}

    def state_size(self, seq_len: int | None = None) -> int:
        return self.d_model

    def forward(
        self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None, *, position: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if state is None:
            state = self.init_state(x.shape[0], x.device)
        x_prev = torch.cat([state["shift"].to(x.dtype)[:, None], x[:, :-1]], dim=1)
        xx = x_prev - x  # [B,T,D]
        x_k = x + xx * self.time_maa_k
        x_r = x + xx * self.time_maa_r
        k = torch.relu(self.key(x_k)).square()
        out = torch.sigmoid(self.receptance(x_r)) * self.value(k)
        return out, {"shift": x[:, -1]}


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, *, ffn_mult: float = 3.5, layer_id: int = 0, n_layers: int = 1) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_hidden = _round_to(2.0 / 3.0 * ffn_mult * d_model, 32, up=True)
        self.w1 = nn.Linear(d_model, self.d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, self.d_hidden, bias=False)
        self.w2 = nn.Linear(self.d_hidden, d_model, bias=False)
        nn.init.zeros_(self.w2.weight)

    @classmethod
    def from_config(cls, cfg, layer_id: int, device=None) -> SwiGLU:
        return cls(cfg.d_model, ffn_mult=cfg.ffn_mult, layer_id=layer_id, n_layers=cfg.n_layers)

    def init_state(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        return {}

    def state_size(self, seq_len: int | None = None) -> int:
        return 0

    def forward(
        self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None, *, position: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), {}
