"""One generic block for every layer letter: pre-norm, parallel mixer branches with a residual scale, then an
FFN.

    h   = norm1(x)
    x  += γ · Σ_i weight_i · branch_i(h)      H: weights (α, 1-α) for its two mixers; one-mixer letters: weight 1
    x  += ffn(norm2(x))

With branch_norm each branch output passes its own RMSNorm (learnable gain) before mixing, as Hymba does
(NVlabs/hymba `barebones_hymba_block.py`: (norm1(attn) + norm2(ssm)) / 2), so that α weighs branches of
comparable magnitude. γ is a learnable scalar initialised at gamma_init (0.01 by default); α is fixed or a
learnable scalar clamped to [0, 1] (a clamp rather than a logit so α = 0 and α = 1 are representable).
"""

from __future__ import annotations

import torch
from torch import nn

from groundthink.mixers import FFNS, MIXERS, LayerContext

NORM_EPS = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * scale).to(x.dtype) * self.weight


def make_norm(kind: str, dim: int) -> nn.Module:
    return RMSNorm(dim) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=NORM_EPS)


class Block(nn.Module):
    def __init__(self, cfg, layer_id: int, letter: str, device=None) -> None:
        super().__init__()
        self.letter = letter
        mixers = [MIXERS[name] for name in cfg.block_mixers(letter)]
        self.branch_names = tuple(mixer.branch for mixer in mixers)
        self.norm1 = make_norm(cfg.norm, cfg.d_model)
        ctx = LayerContext.of(cfg, layer_id, device)
        for mixer in mixers:  # the branch name is the attribute, the state key and the parameter prefix
            self.add_module(mixer.branch, mixer.build(cfg.mixers[mixer.name], ctx))
        self.branch_norms = (
            nn.ModuleDict({name: RMSNorm(cfg.d_model) for name in self.branch_names})
            if cfg.branch_norm
            else None
        )
        if cfg.learn_gamma:
            self.gamma = nn.Parameter(torch.tensor(float(cfg.gamma_init)))
        else:
            self.register_buffer("gamma", torch.tensor(float(cfg.gamma_init)))
        if len(self.branch_names) == 2:  # the hybrid letter: α weighs its two branches
            if cfg.learn_alpha:
                self.alpha = nn.Parameter(torch.tensor(float(cfg.alpha)))
            else:
                self.register_buffer("alpha", torch.tensor(float(cfg.alpha)))
        else:
            self.alpha = None
        self.norm2 = make_norm(cfg.norm, cfg.d_model)
        self.ffn = FFNS[cfg.ffn].from_config(cfg, layer_id, device=device)

    def branch_weights(self) -> list[torch.Tensor | float]:
        if self.alpha is None:
            return [1.0]
        alpha = self.alpha.clamp(0.0, 1.0)
        return [alpha, 1.0 - alpha]

    def init_state(self, batch_size: int, device) -> dict[str, dict[str, torch.Tensor]]:
        state = {name: getattr(self, name).init_state(batch_size, device) for name in self.branch_names}
        state["ffn"] = self.ffn.init_state(batch_size, device)
        return state

    def state_size(self, seq_len: int | None = None) -> int:
        return (sum(getattr(self, name).state_size(seq_len) for name in self.branch_names)
                + self.ffn.state_size(seq_len))

    def forward(
        self, x: torch.Tensor, state: dict[str, dict[str, torch.Tensor]] | None = None, *, position: int = 0
    ) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
        state = state or {}
        h = self.norm1(x)
        mixed = None
        new_state = {}
        for name, weight in zip(self.branch_names, self.branch_weights()):
            out, new_state[name] = getattr(self, name)(h, state.get(name), position=position)
            if self.branch_norms is not None:
                out = self.branch_norms[name](out)
            out = out * weight if not isinstance(weight, float) or weight != 1.0 else out
            mixed = out if mixed is None else mixed + out
        x = x + self.gamma * mixed
        out, new_state["ffn"] = self.ffn(self.norm2(x), state.get("ffn"), position=position)
        return x + out, new_state
