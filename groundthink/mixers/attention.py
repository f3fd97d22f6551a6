"""Causal sliding-window softmax attention with a fixed-size carried KV window; no positional encoding (NoPE) by
default, rotary positions (RoPE) as an option.

Papers: Vaswani et al., "Attention Is All You Need" (arXiv 1706.03762) for the layer; sliding-window attention
as in Longformer/Mistral and the hybrid precedents Samba (arXiv 2406.07522) and Griffin (arXiv 2402.19427),
which keep a fixed local window so memory does not grow with the stream. The softmax itself is torch's
`scaled_dot_product_attention` (it dispatches to flash/efficient kernels on CUDA).

Window: the query at stream position t attends to itself and the `window` previous tokens, positions
[t - window, t]. The state {"k","v" [B,H,W,hd], "valid" [B,W] bool} holds the keys and values of the last W
tokens (W = window), so carrying it across segments gives exactly the one-pass result and its size never
changes. A segment is processed in query blocks of at most W tokens, each attending to the cached window plus
its own block, so memory is O(W²) per block rather than O(T²).

Why NoPE: as in Jamba (arXiv 2403.19887), the recurrent RWKV/Mamba layers below an attention layer already
make its inputs order-aware, so explicit positions are not needed; and with no positions the cached keys are
valid wherever a segment boundary falls and at any stream length (no RoPE offsets to carry, no extrapolation
beyond the training length).

RoPE (`rope_base`, e.g. 10000; Su et al., arXiv 2104.09864): queries and keys are rotated by their absolute stream
position (the `position` the model passes: the tokens before this segment), so cached keys carry their rotation
and a query's scores depend only on the distance back to each key; carrying the window across segments still gives
the one-pass result. It is what attention needs on its own, without recurrent layers to order its inputs: an
attention-only stack (`model.pattern=A`) on MQAR (Zoology's attention baseline has positions; a NoPE stack learns
the task far more slowly, experiments/mqar-recall/).

Key shift (`key_shift`, off by default): the keys are computed from a learned per-channel mix of each token and the
one before it (RWKV's token shift, applied to keys only; the previous token of a segment's first position is carried
in the state). A key then says "I follow token a", which is what recall needs: the query "a" finds the value that
followed "a" in one layer. Zoology's attention baselines get the same cue from a short convolution before the
attention layer; without either, a 2-layer attention stack stays on the 1/kv-pairs plateau of MQAR (it outputs
one of the context's values at random) for thousands of steps (experiments/mqar-recall/).

What differs from a plain transformer attention: the carried window state. Init: qkv ~ N(0, 0.02),
out_proj ~ N(0, 0.02/sqrt(2·n_layers)) (GPT-2's residual rescale). `impl` is always "sdpa" (torch picks the
backend); the model-wide `impl` only concerns the recurrent ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from groundthink.mixers.base import LayerContext, SequenceMixer, is_positive_int, register_mixer, require


@dataclass
class AttentionConfig:
    """Settings of the sliding-window attention: `model.mixers.attention.*`."""

    n_heads: int = 4
    window: int = 512  # tokens before the current one that a query sees (and that the carried KV cache holds)
    rope_base: float | None = None  # rotary positions with this base (e.g. 10000); null = no positions (NoPE)
    key_shift: bool = False  # keys from a learned mix of each token and the previous one (module docstring)

    # Flat ModelConfig fields of runs saved before mixers had their own settings -> the field here.
    LEGACY_FIELDS: ClassVar[dict[str, str]] = {"attn_heads": "n_heads", "attn_window": "window"}

    def check(self, d_model: int, state_norm_groups: int | None) -> None:
        f = "mixers.attention."
        require(f + "n_heads", self.n_heads, is_positive_int(self.n_heads) and d_model % self.n_heads == 0,
                f"a positive divisor of d_model={d_model}")
        require(f + "window", self.window, is_positive_int(self.window), "a positive integer")
        if self.rope_base is not None:
            require(f + "rope_base", self.rope_base, self.rope_base > 1, "a number > 1 (e.g. 10000), or null")
            require(f + "n_heads", self.n_heads, (d_model // self.n_heads) % 2 == 0,
                    f"a divisor of d_model={d_model} leaving an even head size (RoPE rotates pairs)")

    def d_model_multiple(self, state_norm_groups: int | None) -> int:
        return self.n_heads


@register_mixer
class SlidingWindowAttention(SequenceMixer):
    name = "attention"
    Config = AttentionConfig
    letter = "A"
    branch = "attention"
    ops = ("attention",)

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        window: int = 512,
        rope_base: float | None = None,
        key_shift: bool = False,
        layer_id: int = 0,
        n_layers: int = 1,
        impl: str = "auto",
        device=None,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"attn_heads={n_heads} must divide d_model={d_model}")
        if window < 1:
            raise ValueError(f"attn_window={window} must be >= 1")
        self.d_model, self.n_heads, self.head_dim, self.window = d_model, n_heads, d_model // n_heads, window
        self.rope_base = rope_base
        self.key_shift = key_shift
        if key_shift:  # the share of the previous token in each key channel, learned, starting at one half
            self.key_shift_mix = nn.Parameter(torch.full((d_model,), 0.5))
        self.impl = "sdpa"
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        with torch.no_grad():
            nn.init.normal_(self.qkv.weight, std=0.02)
            nn.init.normal_(self.out_proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    @classmethod
    def build(cls, settings: AttentionConfig, ctx: LayerContext) -> SlidingWindowAttention:
        return cls(
            ctx.d_model,
            settings.n_heads,
            window=settings.window,
            rope_base=settings.rope_base,
            key_shift=settings.key_shift,
            layer_id=ctx.layer_id,
            n_layers=ctx.n_layers,
            impl=ctx.impl,
            device=ctx.device,
        )

    def init_state(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        shape = (batch_size, self.n_heads, self.window, self.head_dim)
        state = {
            "k": torch.zeros(shape, device=device),
            "v": torch.zeros(shape, device=device),
            "valid": torch.zeros(batch_size, self.window, dtype=torch.bool, device=device),
        }
        if self.key_shift:
            state["shift"] = torch.zeros(batch_size, self.d_model, device=device)
        return state

    def state_size(self, seq_len: int | None = None) -> int:
        """K and V of the window (and its validity flags); with seq_len, the KV cache that a sequence of that length
        fills (min(window, seq_len) positions): attention's recall memory grows with the context up to the window."""
        span = self.window if seq_len is None else min(self.window, int(seq_len))
        return 2 * self.n_heads * span * self.head_dim + span + (self.d_model if self.key_shift else 0)

    def forward(
        self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None, *, position: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, T, _ = x.shape
        H, hd, W = self.n_heads, self.head_dim, self.window
        if state is None:
            state = self.init_state(B, x.device)
        if self.key_shift:
            x_prev = torch.cat([state["shift"].to(x.dtype)[:, None], x[:, :-1]], dim=1)
            shifted = x + (x_prev - x) * self.key_shift_mix
            # through the qkv layer itself (not its weight), so a replaced layer (stage=ste's ternary) still applies
            q, _, v = self.qkv(x).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
            k = self.qkv(shifted).view(B, T, 3, H, hd)[:, :, 1].transpose(1, 2)
        else:
            q, k, v = self.qkv(x).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B,H,T,hd] each
        if self.rope_base is not None:
            q, k = self._rotate(q, position), self._rotate(k, position)
        cache_k, cache_v, valid = state["k"].to(k.dtype), state["v"].to(v.dtype), state["valid"]
        outs = []
        for a in range(0, T, W):
            b = min(T, a + W)
            n = b - a
            keys = torch.cat([cache_k, k[:, :, a:b]], dim=2)  # [B,H,W+n,hd]
            values = torch.cat([cache_v, v[:, :, a:b]], dim=2)
            key_valid = torch.cat([valid, valid.new_ones(B, n)], dim=1)  # [B,W+n]
            i = torch.arange(n, device=x.device)[:, None]
            j = torch.arange(W + n, device=x.device)[None, :]
            in_window = (j >= i) & (j <= i + W)  # key j sits at block position j - W
            mask = in_window[None, None] & key_valid[:, None, None, :]  # [B,1,n,W+n]
            outs.append(F.scaled_dot_product_attention(q[:, :, a:b], keys, values, attn_mask=mask))
            cache_k, cache_v, valid = keys[:, :, -W:], values[:, :, -W:], key_valid[:, -W:]
        y = torch.cat(outs, dim=2).transpose(1, 2).reshape(B, T, self.d_model)
        new_state = {"k": cache_k.float(), "v": cache_v.float(), "valid": valid}
        if self.key_shift:
            new_state["shift"] = x[:, -1].float()
        return self.out_proj(y), new_state

    def _rotate(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """RoPE: x [B,H,T,hd] rotated pairwise (first half, second half) by angle (position + t) * base^(-2i/hd)."""
        half = self.head_dim // 2
        inv_freq = self.rope_base ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)
        t = torch.arange(position, position + x.shape[2], device=x.device, dtype=torch.float64)
        angles = torch.outer(t, inv_freq)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
