"""BitNet b1.58-style ternary linear layers: the quantisers, the straight-through estimator and 2-bit packing.

Weights (Ma et al. 2024, "The Era of 1-bit LLMs"): absmean scaling, per tensor or per output channel,

    s = mean(|W|)  (clamped at EPS)          q = clamp(round(W / s), -1, 1) in {-1, 0, +1}          W_q = q · s

Activations (optional, `bits` = 8 in BitNet): absmax per token (over the last dimension),

    Qp = 2^(bits-1) - 1     s_x = Qp / max|x|     x_q = clamp(round(x · s_x), -Qp-1, Qp) / s_x

Absmax maps the largest |x| of a token exactly to ±Qp, so nothing is ever clipped: the clamp is a guard only.

Straight-through estimator: the forward uses the quantised value exactly, the backward passes the gradient through
unchanged, `q(x).detach() + (x - x.detach())` (x - x.detach() is exactly zero, so the forward value is q(x) bit for
bit; its gradient is the identity). The scales are computed from detached tensors, as in BitNet's reference code.

`TernaryLinear` is an nn.Linear with the same parameters (the latent full-precision weight and bias: checkpoints keep
their names and shapes), whose forward quantises them. `PackedTernaryLinear` holds only the codes (int8 in memory,
2 bits per weight on disk: `pack_ternary`) and the scales, and computes exactly what `TernaryLinear` computes in
eval mode from the same latent weight: the same codes, the same scale tensor, the same ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5
SCALES = ("tensor", "channel")


def ternary_codes(weight: torch.Tensor, scale: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of a [out, in] weight: codes in {-1., 0., +1.} (weight's dtype, no -0.0), scale [1] or [out, 1];
    the ternarised weight is codes * scale. Computed without gradient."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: use one of {SCALES}")
    w = weight.detach()
    if scale == "channel":
        s = w.abs().mean(dim=-1, keepdim=True)
    else:
        s = w.abs().mean().reshape(1)
    s = s.clamp(min=EPS)
    codes = (w / s).round().clamp(-1.0, 1.0) + 0.0  # + 0.0 turns -0.0 into +0.0 (as int8 codes unpack)
    return codes, s


def ternarise(weight: torch.Tensor, scale: str = "tensor") -> torch.Tensor:
    """The ternary weight codes * scale, with the straight-through estimator when `weight` needs a gradient."""
    codes, s = ternary_codes(weight, scale)
    return ste(codes * s, weight)


def quantise_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Absmax per-token fake quantisation to signed `bits`-bit integers (values on the grid k / s_x), no gradient."""
    qmax = 2 ** (bits - 1) - 1
    x = x.detach()
    s = qmax / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * s).round().clamp(-qmax - 1, qmax) / s


def ste(quantised: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Forward value `quantised` exactly; gradient to `latent` unchanged (the identity)."""
    if torch.is_grad_enabled() and latent.requires_grad:
        return quantised.detach() + (latent - latent.detach())
    return quantised


class TernaryLinear(nn.Linear):
    """An nn.Linear trained quantisation-aware: ternary weights (x scale), optional per-token activation
    quantisation, STE backward. Shares the wrapped layer's Parameters (the latent weights); `quantise=False`
    makes it the full-precision layer again (for the full-precision reference loss)."""

    def __init__(self, linear: nn.Linear, *, scale: str = "tensor", activation_bits: int = 8) -> None:
        nn.Module.__init__(self)
        if scale not in SCALES:
            raise ValueError(f"scale={scale!r}: use one of {SCALES}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.scale = scale
        self.activation_bits = int(activation_bits)
        self.quantise = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantise:
            return F.linear(x, self.weight, self.bias)
        if self.activation_bits:
            x = ste(quantise_activations(x, self.activation_bits), x)
        return F.linear(x, ternarise(self.weight, self.scale), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ternary scale={self.scale}, activation_bits={self.activation_bits}"


class PackedTernaryLinear(nn.Module):
    """Inference-only ternary linear layer: int8 codes in {-1, 0, +1}, the scale, the bias (full precision)."""

    def __init__(self, out_features: int, in_features: int, *, scale: str, activation_bits: int, bias: bool,
                 device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scale_mode, self.activation_bits = scale, int(activation_bits)
        rows = out_features if scale == "channel" else 1
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(rows, 1, device=device) if scale == "channel"
                             else torch.ones(1, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits:
            x = quantise_activations(x, self.activation_bits)
        weight = self.codes.to(self.scale.dtype) * self.scale
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ternary packed "
                f"scale={self.scale_mode}, activation_bits={self.activation_bits}")


# ----- 2-bit packing: 4 weights per byte ------------------------------------------------------------------------
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, 0, +1} (any shape) -> uint8 [ceil(n / 4)]: code + 1 in 2 bits, element 4i+j at bits 2j..2j+1
    of byte i (the tail is padded with the code of 0)."""
    flat = codes.detach().flatten().to(torch.int16)
    if flat.numel() and (flat.min() < -1 or flat.max() > 1):
        raise ValueError("pack_ternary: codes must be in {-1, 0, +1}")
    u = (flat + 1).to(torch.uint8)
    pad = (-u.numel()) % 4
    if pad:
        u = torch.cat([u, torch.ones(pad, dtype=torch.uint8)])
    u = u.reshape(-1, 4) << _SHIFTS.to(u.device)
    return (u[:, 0] | u[:, 1] | u[:, 2] | u[:, 3]).contiguous()


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The inverse of pack_ternary: int8 codes of `shape`."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 3) // 4:
        raise ValueError(f"unpack_ternary: expected {(n + 3) // 4} uint8 bytes for shape {tuple(shape)}, got "
                         f"{packed.numel()} {packed.dtype}")
    u = (packed[:, None] >> _SHIFTS.to(packed.device)) & 3
    codes = u.flatten()[:n].to(torch.int8) - 1
    if n and int(codes.max()) > 1:
        raise ValueError("unpack_ternary: a 2-bit field holds 3, which no ternary code packs to (corrupt file)")
    return codes.reshape(tuple(shape))
