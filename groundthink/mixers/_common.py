"""Pieces shared by the recurrent mixers: impl choice per op, StateNorm, trainable h0, official-init helpers.

StateNorm (a GroundThink switch, no parameters): the recurrent state of each head is split into `groups`
groups along its key axis (RWKV-6: K of [K,V]; Mamba-2: P of [P,N]) and each group is scaled to unit RMS. It
is applied at fixed absolute stream positions, every `interval` tokens counted from the stream start
(LMState.position), never at segment ends, so that running [seg1, seg2] with the carried state gives exactly
the same result as one pass over seg1+seg2 wherever the split falls. The closest published analogue is the
per-head state-norm cap of "Stuffed Mamba" (arXiv 2410.07145), which is inference-only and thresholded.

Trainable h0 (a switch): a zero-initialised nn.Parameter per recurrent mixer, `_no_weight_decay = True`. A
stream (or a lane reset at a document start) starts from `grounding_strength · h0`: the legacy knob
`grounding_strength` (default 1.0) is read as the scale of the learned initial state, so 0 turns the learned
state off without changing the parameter count. Precedents: RWKV-LM `RWKV_Tmix_x060_state.time_state` and
mamba_ssm `Mamba2Simple(learnable_init_states=True)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from groundthink.mixers.base import no_weight_decay
from groundthink.ops import resolve_impl
from groundthink.ops.dispatch import compiler_boundary

STATE_NORM_EPS = 1e-8
# init="identity_bias": every recurrent decay starts at this per-token retention ("for long memory").
IDENTITY_BIAS_RETENTION = 0.9999


def default_device() -> torch.device:
    """The device a freshly built model is expected to run on: CUDA when available, else CPU."""
    current = torch.empty(0).device  # honours `with torch.device(...)` (meta when counting parameters)
    if current.type != "cpu":
        return current
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_op_impl(op: str, impl: str, device) -> str:
    return resolve_impl(op, impl, device if device is not None else default_device())


def state_norm(state: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped RMS normalisation of a recurrent state [B,H,K,V] along K (or [B,H,P,N] along P)."""
    b, h, k, v = state.shape
    grouped = state.reshape(b, h, groups, (k // groups) * v)
    rms = grouped.pow(2).mean(-1, keepdim=True).add(STATE_NORM_EPS).sqrt()
    return (grouped / rms).reshape(b, h, k, v)


@compiler_boundary(only_if="enabled")
def scan_with_state_norm(
    step: Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    T: int,
    state: torch.Tensor,
    *,
    position: int,
    interval: int,
    groups: int,
    enabled: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `step(start, end, state) -> (out, state)` over [0, T), normalising the state at absolute positions.

    With StateNorm on, the input is cut wherever `position + t` is a positive multiple of `interval`, and the
    state leaving each such point is normalised. Returns (outputs concatenated along time, final state).
    With StateNorm on, a compiled block (trainer.compile) calls the whole scan outside its graphs, not just the op
    in each `step`: every cut point (an int) would otherwise specialise the graphs of `step`'s frame, past dynamo's
    recompile limit. With trainer.compile_ops it is traced into the block's graph, one graph per StateNorm phase.
    """
    if not enabled:
        return step(0, T, state)
    outs = []
    start = 0
    while start < T:
        end = min(T, start + interval - (position + start) % interval)
        out, state = step(start, end, state)
        outs.append(out)
        if (position + end) % interval == 0:
            state = state_norm(state, groups)
        start = end
    return torch.cat(outs, dim=1), state


class InitialState(nn.Module):
    """The state a stream starts from: zeros, or grounding_strength · h0 with a trainable zero-init h0."""

    def __init__(self, shape: tuple[int, ...], *, learn_h0: bool, grounding_strength: float) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.grounding_strength = float(grounding_strength)
        if learn_h0:
            self.h0 = no_weight_decay(nn.Parameter(torch.zeros(self.shape)))
        else:
            self.h0 = None

    def forward(self, batch_size: int, device) -> torch.Tensor:
        if self.h0 is None:
            return torch.zeros(batch_size, *self.shape, device=device, dtype=torch.float32)
        h0 = (self.grounding_strength * self.h0.float()).to(device)
        return h0.unsqueeze(0).expand(batch_size, *self.shape).contiguous()


def layer_ratios(layer_id: int, n_layers: int) -> tuple[float, float]:
    """RWKV-LM's depth ratios: r0 = layer/(L-1) (0 for a single layer), r1 = 1 - layer/L."""
    r0 = layer_id / (n_layers - 1) if n_layers > 1 else 0.0
    r1 = 1.0 - layer_id / n_layers
    return r0, r1


def identity_log_decay(n: int) -> torch.Tensor:
    """GroundThink's long-memory init: log w = ln(1 - exp(linspace(-4, -9, n))), decays ≈ 0.982 .. 0.99988."""
    return torch.log1p(-torch.exp(torch.linspace(-4.0, -9.0, n, dtype=torch.float64))).float()


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; choose one of {list(allowed)}")


def log_min_retention(min_retention: float) -> float | None:
    """ln(min_retention), or None when the floor is off (min_retention = 0)."""
    if not 0.0 <= min_retention < 1.0:
        raise ValueError(f"min_retention={min_retention} must be in [0, 1) (0 disables the decay floor)")
    return math.log(min_retention) if min_retention > 0 else None
