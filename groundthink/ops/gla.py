"""Gated Linear Attention (GLA) recurrence: a linear-attention state with a per-key-channel data-dependent decay.

Paper: Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with Hardware-Efficient Training", arXiv
2312.06635. Semantics follow fla's `fla.ops.gla.chunk_gla` (fla-org/flash-linear-attention) in its [B,T,H,K]
layout:

    S_t = diag(exp(log_g_t)) S_{t-1} + k_tᵀ v_t        o_t = scale · q_t S_t     (reads the state *after* step t)

q, k, log_g: [B,T,H,K]; v: [B,T,H,V]; state: [B,H,K,V] in fp32; log_g <= 0 is the natural-log gate; scale defaults
to K^-1/2 as in fla. There is no bonus term: the current token enters through the state itself.

The chunked path is WKV-6's exact two-level form (groundthink.ops.wkv6.decay_attention_chunked) with the query's
decay taken inclusive of its own step; README.md maps the two recurrences onto each other.
"""

from __future__ import annotations

import torch

from groundthink.ops._checks import check_rank, check_shape, compute_dtype
from groundthink.ops.dispatch import compiler_boundary, register_op, resolve_impl
from groundthink.ops.wkv6 import decay_attention_chunked

GLA_IMPLS = ("reference", "chunked", "fla")
register_op("gla", fallback="chunked", kernel="fla", module="fla.ops.gla", impls=GLA_IMPLS)


def _validate(q, k, v, log_g, initial_state):
    check_rank("q", q, 4, "[B,T,H,K]")
    B, T, H, K = q.shape
    if T < 1:
        raise ValueError(f"q must hold at least one time step (T >= 1), got shape {tuple(q.shape)}")
    check_shape("k", k, (B, T, H, K), "[B,T,H,K]")
    check_shape("log_g", log_g, (B, T, H, K), "[B,T,H,K]")
    check_rank("v", v, 4, "[B,T,H,V]")
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must have shape [B,T,H,V] with B,T,H = {(B, T, H)} as in q, got {tuple(v.shape)}")
    if initial_state is not None:
        check_shape("initial_state", initial_state, (B, H, K, v.shape[-1]), "[B,H,K,V]")


def gla_reference(q, k, v, log_g, initial_state=None, scale=None):
    """The specification: a plain loop over time in fp32 (fp64 for fp64 inputs). Slow: tests and decoding."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
    scale = K**-0.5 if scale is None else scale
    q, k, v, log_g = (t.to(dtype) for t in (q, k, v, log_g))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        S = torch.exp(log_g[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, dim=1).to(out_dtype), S


def gla_chunked(q, k, v, log_g, initial_state=None, scale=None, chunk_size=None):
    """Chunked GLA, exact for every log_g <= 0 (every exponent it evaluates is <= 0)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q.to(compute_dtype(v.dtype)) * scale  # scaled in the compute precision, not in a bf16 input's
    return decay_attention_chunked(q, k, v, log_g, None, initial_state, chunk_size, query_after_decay=True)


@compiler_boundary
def gla(q, k, v, log_g, initial_state=None, *, scale=None, impl="chunked", chunk_size=None):
    """GLA: returns (o [B,T,H,V] in v's dtype, final_state [B,H,K,V] fp32 (fp64 for fp64 inputs)).

    impl: "chunked" (exact two-level chunked torch), "reference" (step loop), "fla" (CUDA kernel) or "auto".
    """
    impl = resolve_impl("gla", impl, q.device)
    _validate(q, k, v, log_g, initial_state)
    if impl == "reference":
        return gla_reference(q, k, v, log_g, initial_state, scale)
    if impl == "fla":
        from groundthink.ops.kernels import fla_gla

        return fla_gla(q, k, v, log_g, initial_state, scale, chunk_size)
    return gla_chunked(q, k, v, log_g, initial_state, scale, chunk_size)
