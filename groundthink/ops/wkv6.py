"""RWKV-6 ("Finch") WKV recurrence with per-channel data-dependent decay and a bonus.

Paper: Peng et al., "Eagle and Finch", arXiv 2404.05892. Semantics follow the official CUDA kernel
(BlinkDL/RWKV-LM `RWKV-v5/cuda/wkv6_cuda.cu`) and fla's `chunk_rwkv6` with `scale=1.0`, in fla's layout:

    o_t = r_t · (S_{t-1} + diag(u) k_tᵀ v_t)        (the output reads the state *before* step t decays it)
    S_t = diag(exp(log_w_t)) S_{t-1} + k_tᵀ v_t

r, k, log_w: [B,T,H,K]; v: [B,T,H,V]; u: [H,K]; state: [B,H,K,V] in fp32; log_w <= 0 is the natural-log decay.
There is no 1/sqrt(K) scale. The equations and the chunked form's stability argument are in README.md.

The chunked path is GLA's secondary-level chunking (Yang et al., arXiv 2312.06635, §4.3; fla's
`chunk_rwkv6_fwd_intra` uses it with C=64, c=16) applied recursively: the intra-chunk term is split into
(second half × first half) blocks of sizes C/2, C/4, ..., 1, each a matmul whose two decay factors are taken
relative to the block's midpoint, so every exponent evaluated is <= 0 and the op is exact and finite for any
log_w <= 0 without clamping. fla forms its 16×16 diagonal blocks pairwise instead; on CPU the recursion is
faster (no [.., c, c, K] tensors) and its backward is written by hand (see `_IntraChunk`).

`decay_attention_chunked` is that machinery for both readings of the state: WKV-6's (the query reads the state
before step t decays it, plus the bonus u) and GLA's (groundthink/ops/gla.py: the query reads the state after step
t's decay and update, no bonus).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from groundthink.ops._checks import check_rank, check_shape, compute_dtype
from groundthink.ops._scan import chunk_state_scan
from groundthink.ops.dispatch import compiler_boundary, register_op, resolve_impl

WKV6_IMPLS = ("reference", "chunked", "fla")
register_op("wkv6", fallback="chunked", kernel="fla", module="fla.ops.rwkv6", impls=WKV6_IMPLS)
DEFAULT_CHUNK_SIZE = 32


def _validate(r, k, v, log_w, u, initial_state):
    check_rank("r", r, 4, "[B,T,H,K]")
    B, T, H, K = r.shape
    if T < 1:
        raise ValueError(f"r must hold at least one time step (T >= 1), got shape {tuple(r.shape)}")
    check_shape("k", k, (B, T, H, K), "[B,T,H,K]")
    check_shape("log_w", log_w, (B, T, H, K), "[B,T,H,K]")
    check_rank("v", v, 4, "[B,T,H,V]")
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(
            f"v must have shape [B,T,H,V] with B,T,H = {(B, T, H)} as in r, got {tuple(v.shape)}"
        )
    check_shape("u", u, (H, K), "[H,K]")
    if initial_state is not None:
        check_shape("initial_state", initial_state, (B, H, K, v.shape[-1]), "[B,H,K,V]")


def wkv6_reference(r, k, v, log_w, u, initial_state=None):
    """The specification: a plain loop over time in fp32 (fp64 for fp64 inputs). Slow: tests and decoding."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    dtype = compute_dtype(v.dtype)
    r, k, v, log_w, u = (t.to(dtype) for t in (r, k, v, log_w, u))
    S = r.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    w = torch.exp(log_w)
    outs = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B,H,K,V]
        outs.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S + u[None, :, :, None] * kv))
        S = w[:, t, :, :, None] * S + kv
    return torch.stack(outs, dim=1).to(out_dtype), S


def _to_chunks(x, n_chunks, chunk, pad):
    """[B,T,H,X] -> [B,H,N,C,X], zero-padded at the end of time."""
    B, _, H, X = x.shape
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.view(B, n_chunks, chunk, H, X).permute(0, 3, 1, 2, 4).contiguous()


def _halves(x, s):
    """[B,H,N,C,X] -> (first halves, second halves) of every 2s-block, each [B,H,N,C/(2s),s,X] (views)."""
    B, H, N, C, X = x.shape
    return x.view(B, H, N, C // (2 * s), 2, s, X).unbind(-3)


def _decay_factors(gi, ge, s):
    """exp(ge_t - ref) for the second halves and exp(ref - gi_j) for the first halves, ref = ge at the start
    of the second half (= gi at the end of the first half); both exponents are <= 0."""
    gi_a, _ = _halves(gi, s)
    _, ge_b = _halves(ge, s)
    ref = ge_b[..., :1, :]
    return torch.exp(ge_b - ref), torch.exp(ref - gi_a)


class _IntraChunk(torch.autograd.Function):
    """The strictly causal intra-chunk term o_t = Σ_{j<t in the chunk} (Σ_k r_tk k_jk exp(ge_tk - gi_jk)) v_j.

    Every block of size 2s (s = C/2, ..., 1) adds what the keys of its first half give the queries of its
    second half, relative to ref = gi at the end of the first half: the query factor exp(ge_t - ref) and the
    key factor exp(ref - gi_j) both have exponents <= 0 because gi only decreases along time. Each pair j < t
    of a chunk lies in exactly one such (second half, first half) block. The backward is written out by hand:
    it avoids autograd's full-size zero fills for the half-block slices, which otherwise dominate the time.
    """

    @staticmethod
    def forward(ctx, r, k, v, gi, ge, unit_pairs):  # r,k,gi,ge [B,H,N,C,K]; v [B,H,N,C,V]
        # unit_pairs: the query decay is exclusive (ge_t = gi_{t-1}), so for adjacent pairs (s = 1) both factors
        # are exactly 1. With an inclusive query decay (GLA, ge = gi) the s = 1 blocks take the general path.
        o = torch.zeros_like(v)
        factors = []  # (e_q, e_k) per level, kept for the backward
        C = r.shape[3]
        s = C // 2
        while s >= 1:
            _, r_b = _halves(r, s)
            k_a, _ = _halves(k, s)
            v_a, _ = _halves(v, s)
            _, o_b = _halves(o, s)
            if s == 1 and unit_pairs:  # ref = ge_t = gi_j, both factors are exactly 1
                o_b += (r_b * k_a).sum(-1, keepdim=True) * v_a
            else:
                e_q, e_k = _decay_factors(gi, ge, s)
                factors += [e_q, e_k]
                o_b += ((r_b * e_q) @ (k_a * e_k).transpose(-1, -2)) @ v_a
            s //= 2
        ctx.unit_pairs = unit_pairs
        ctx.save_for_backward(r, k, v, *factors)
        return o

    @staticmethod
    def backward(ctx, do):
        r, k, v, *factors = ctx.saved_tensors
        do = do.contiguous()
        dr, dk, dv = (torch.zeros_like(t) for t in (r, k, v))
        dgi, dge = torch.zeros_like(r), torch.zeros_like(r)
        C = r.shape[3]
        s = C // 2
        while s >= 1:
            _, r_b = _halves(r, s)
            k_a, _ = _halves(k, s)
            v_a, _ = _halves(v, s)
            _, do_b = _halves(do, s)
            _, dr_b = _halves(dr, s)
            dk_a, _ = _halves(dk, s)
            dv_a, _ = _halves(dv, s)
            if s == 1 and ctx.unit_pairs:
                A = (r_b * k_a).sum(-1, keepdim=True)  # [...,1,1]
                dA = (do_b * v_a).sum(-1, keepdim=True)
                dv_a += A * do_b
                dr_b += dA * k_a
                dk_a += dA * r_b
            else:
                e_q, e_k = factors.pop(0), factors.pop(0)
                q, kk = r_b * e_q, k_a * e_k
                P = q @ kk.transpose(-1, -2)  # [...,s,s]
                dP = do_b @ v_a.transpose(-1, -2)
                dv_a += P.transpose(-1, -2) @ do_b
                dq = dP @ kk
                dkk = dP.transpose(-1, -2) @ q
                dr_b += dq * e_q
                dk_a += dkk * e_k
                xq = dq * q  # d(exponent of the query factor)
                xk = dkk * kk  # d(exponent of the key factor)
                _, dge_b = _halves(dge, s)
                gi_a_grad, _ = _halves(dgi, s)
                dge_b += xq
                gi_a_grad -= xk
                dge_b[..., :1, :] += xk.sum(-2, keepdim=True) - xq.sum(-2, keepdim=True)
            s //= 2
        return dr, dk, dv, dgi, dge, None


def wkv6_chunked(r, k, v, log_w, u, initial_state=None, chunk_size=None):
    """Chunked WKV, exact for every log_w <= 0 (every exponent it evaluates is <= 0). See README.md."""
    return decay_attention_chunked(r, k, v, log_w, u, initial_state, chunk_size, query_after_decay=False)


def decay_attention_chunked(r, k, v, log_w, u, initial_state, chunk_size, *, query_after_decay):
    """The exact two-level chunked form of a per-channel-decay linear recurrence S_t = diag(w_t) S_{t-1} + k_tᵀ v_t.

    query_after_decay=False (WKV-6): o_t = r_t · (S_{t-1} + diag(u) k_tᵀ v_t).
    query_after_decay=True (GLA, u must be None): o_t = r_t · S_t = r_t · (diag(w_t) S_{t-1} + k_tᵀ v_t).
    Layouts as `wkv6`. Every exponent evaluated is <= 0 in both readings (README.md).
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    dtype = compute_dtype(v.dtype)
    C = chunk_size or DEFAULT_CHUNK_SIZE
    if C < 1 or C & (C - 1):
        raise ValueError(f"chunk_size must be a power of two (the intra-chunk part halves it), got {C}")
    pad = (-T) % C
    N = (T + pad) // C
    # Padding with k = 0 and log_w = 0 leaves the state untouched, so the final state is exact.
    r_, k_, v_, g = (_to_chunks(t.to(dtype), N, C, pad) for t in (r, k, v, log_w))  # [B,H,N,C,*]

    gi = g.cumsum(-2)  # inclusive cumulative log decay inside each chunk
    # The query's decay from the chunk start: exclusive (ge_t = gi_{t-1}, ge_0 = 0) when it reads the state before
    # step t decays it, inclusive (gi_t) when it reads the state after.
    ge = gi if query_after_decay else F.pad(gi[..., :-1, :], (0, 0, 1, 0))
    g_last = gi[..., -1:, :]  # [B,H,N,1,K] total log decay of the chunk

    # Inter-chunk: each chunk's own state contribution, then a cheap elementwise scan over chunks.
    k_end = k_ * torch.exp(g_last - gi)  # decay from t to the chunk end, exponent <= 0
    contrib = k_end.transpose(-1, -2) @ v_  # [B,H,N,K,V]
    chunk_decay = torch.exp(g_last).transpose(-1, -2)  # [B,H,N,K,1]
    S = r_.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    S_start, S = chunk_state_scan(chunk_decay, contrib, S, dim=2)  # S_start: [B,H,N,K,V] entering each chunk
    o = (r_ * torch.exp(ge)) @ S_start  # [B,H,N,C,V]

    # The diagonal of the intra-chunk matrix: WKV-6's bonus u, or GLA's own token (factor exp(0) = 1).
    if u is None:
        o = o + (r_ * k_).sum(-1, keepdim=True) * v_
    else:
        o = o + (r_ * u.to(dtype)[None, :, None, None, :] * k_).sum(-1, keepdim=True) * v_

    # Intra-chunk, j < t: split every block of size 2s into halves and add the (second half × first half)
    # sub-block, for s = C/2, C/4, ..., 1. All pairs j < t of the chunk are covered exactly once.
    o = o + _IntraChunk.apply(r_, k_, v_, gi, ge, not query_after_decay)
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2).to(out_dtype)  # [B,T,H,V]
    return o, S


@compiler_boundary
def wkv6(r, k, v, log_w, u, initial_state=None, *, impl="chunked", chunk_size=None):
    """RWKV-6 WKV: returns (o [B,T,H,V] in v's dtype, final_state [B,H,K,V] fp32 (fp64 for fp64 inputs)).

    impl: "chunked" (exact two-level chunked torch), "reference" (step loop), "fla" (CUDA kernel) or "auto".
    """
    impl = resolve_impl("wkv6", impl, r.device)
    _validate(r, k, v, log_w, u, initial_state)
    if impl == "reference":
        return wkv6_reference(r, k, v, log_w, u, initial_state)
    if impl == "fla":
        from groundthink.ops.kernels import fla_wkv6

        return fla_wkv6(r, k, v, log_w, u, initial_state, chunk_size=chunk_size)
    return wkv6_chunked(r, k, v, log_w, u, initial_state, chunk_size=chunk_size)
