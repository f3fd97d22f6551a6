"""Mamba-2 state-space duality (SSD) scan with a scalar per-head decay.

Paper: Dao & Gu, "Transformers are SSMs", arXiv 2405.21060. Semantics follow `mamba_ssm`'s
`mamba_chunk_scan_combined` (state-spaces/mamba, `mamba_ssm/ops/triton/ssd_combined.py`) in its layout:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t        y_t = h_t C_t    (the output reads the *updated* state)

x: [B,T,H,P]; dt: [B,T,H] (positive, softplus already applied); A: [H] (negative); B, C: [B,T,G,N] with
H % G == 0 (head h reads group h // (H // G)); state: [B,H,P,N] in fp32. The D skip and the z gate live in the
mixer. Equations and the chunked form: README.md.

The chunked path is the four-step block decomposition of `mamba_ssm/modules/ssd_minimal.py` (the paper's
Listing 1) with its stable segment sum, plus what that listing lacks: any T (padded with dt = 0, which neither
decays nor writes the state), B/C groups without copying them per head, an initial state, and a sequential
(linear in T) pass over chunk states instead of the quadratic chunk-to-chunk matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from groundthink.ops._checks import check_rank, check_shape, compute_dtype
from groundthink.ops._scan import chunk_state_scan
from groundthink.ops.dispatch import compiler_boundary, register_op, resolve_impl

SSD_IMPLS = ("reference", "chunked", "mamba_ssm")
register_op("ssd", fallback="chunked", kernel="mamba_ssm", module="mamba_ssm.ops.triton.ssd_combined", impls=SSD_IMPLS)
DEFAULT_CHUNK_SIZE = 32  # CPU optimum (README.md: chunk sizes)


def _validate(x, dt, A, B, C, initial_state):
    check_rank("x", x, 4, "[B,T,H,P]")
    b, T, H, P = x.shape
    if T < 1:
        raise ValueError(f"x must hold at least one time step (T >= 1), got shape {tuple(x.shape)}")
    check_shape("dt", dt, (b, T, H), "[B,T,H]")
    check_shape("A", A, (H,), "[H]")
    check_rank("B", B, 4, "[B,T,G,N]")
    G, N = B.shape[2], B.shape[3]
    check_shape("B", B, (b, T, G, N), "[B,T,G,N]")
    check_shape("C", C, (b, T, G, N), "[B,T,G,N]")
    if H % G != 0:
        raise ValueError(f"the number of heads H={H} must be divisible by the number of B/C groups G={G}")
    if initial_state is not None:
        check_shape("initial_state", initial_state, (b, H, P, N), "[B,H,P,N]")


def ssd_reference(x, dt, A, B, C, initial_state=None):
    """The specification: a plain loop over time in fp32 (fp64 for fp64 inputs). Slow: tests and decoding."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    out_dtype = x.dtype
    dtype = compute_dtype(x.dtype)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    # Expand groups to heads: head h reads group h // (H // G).
    B = B.repeat_interleave(H // G, dim=2)  # [B,T,H,N]
    C = C.repeat_interleave(H // G, dim=2)
    h = x.new_zeros(b, H, P, N) if initial_state is None else initial_state.to(dtype)
    decay = torch.exp(dt * A)  # [B,T,H]
    ys = []
    for t in range(T):
        dBx = (dt[:, t, :, None, None] * x[:, t, :, :, None]) * B[:, t, :, None, :]  # [B,H,P,N]
        h = decay[:, t, :, None, None] * h + dBx
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(ys, dim=1).to(out_dtype), h


def segsum(a):
    """Stable segment sum: out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, -inf above the diagonal.

    Each entry is a direct masked cumsum, not a difference of two cumsums: no cancellation (ssd_minimal.py).
    """
    Q = a.shape[-1]
    strict = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)
    seg = a[..., :, None].expand(*a.shape, Q).masked_fill(~strict, 0).cumsum(-2)  # [..., i, j]
    return seg.masked_fill(~torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def ssd_chunked(x, dt, A, B, C, initial_state=None, chunk_size=None):
    """Chunked SSD (ssd_minimal's four steps); every exponent is <= 0. See README.md."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group
    out_dtype = x.dtype
    dtype = compute_dtype(x.dtype)
    Q = chunk_size or DEFAULT_CHUNK_SIZE
    pad = (-T) % Q
    nc = (T + pad) // Q
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    if pad:  # dt = 0 in the padding: no decay and no input, so the final state is exact
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    a = (dt * A).view(b, nc, Q, G, R)  # log decay per step, <= 0
    a_cs = a.cumsum(2)  # [b,nc,Q,G,R] cumulative within each chunk
    X = (x * dt[..., None]).view(b, nc, Q, G, R, P)
    Bc = B.view(b, nc, Q, G, N).transpose(2, 3)  # [b,nc,G,Q,N]
    Cc = C.view(b, nc, Q, G, N).transpose(2, 3)

    # 1. Within chunks: y = (L ∘ C Bᵀ) X per head with L = exp(segsum(a)); C Bᵀ is shared by the R heads of a group.
    L = torch.exp(segsum(a.permute(0, 1, 3, 4, 2)))  # [b,nc,G,R,Q,Q]
    CB = (Cc @ Bc.transpose(-1, -2))[:, :, :, None]  # [b,nc,G,1,Q,Q]
    y_diag = (CB * L) @ X.permute(0, 1, 3, 4, 2, 5)  # [b,nc,G,R,Q,P]

    # 2. Each chunk's contribution to the state at its end, Σ_s exp(a_cs_last - a_cs_s) X_s ⊗ B_s. B is shared by
    # the group's heads, so the R heads' X stack along P: one [R·P, Q] @ [Q, N] product per group and chunk.
    to_end = torch.exp(a_cs[:, :, -1:] - a_cs)[..., None]  # [b,nc,Q,G,R,1]
    X_end = (X * to_end).permute(0, 1, 3, 2, 4, 5).reshape(b, nc, G, Q, R * P)
    contrib = (X_end.transpose(-1, -2) @ Bc).view(b, nc, G, R, P, N)

    # 3. Pass states across chunks (sequential: linear in T; the loop body is elementwise; ops/_scan.py).
    chunk_decay = torch.exp(a_cs[:, :, -1]).view(b, nc, G, R, 1, 1)
    h = x.new_zeros(b, H, P, N) if initial_state is None else initial_state.to(dtype)
    h_start, h = chunk_state_scan(chunk_decay, contrib, h.view(b, G, R, P, N), dim=1)  # h_start: [b,nc,G,R,P,N]

    # 4. The state entering the chunk, read by C and decayed to each position, exp(a_cs_t) C_t h: again one
    # [Q, N] @ [N, R·P] product per group and chunk.
    y_off = (Cc @ h_start.view(b, nc, G, R * P, N).transpose(-1, -2)).view(b, nc, G, Q, R, P)
    y = y_off * torch.exp(a_cs).transpose(2, 3)[..., None] + y_diag.transpose(3, 4)  # [b,nc,G,Q,R,P]

    y = y.transpose(2, 3).reshape(b, nc * Q, H, P)[:, :T]
    return y.to(out_dtype), h.reshape(b, H, P, N)


@compiler_boundary
def ssd(x, dt, A, B, C, initial_state=None, *, impl="chunked", chunk_size=None):
    """Mamba-2 SSD: returns (y [B,T,H,P] in x's dtype, final_state [B,H,P,N] fp32 (fp64 for fp64 inputs)).

    impl: "chunked" (pure torch), "reference" (step loop), "mamba_ssm" (CUDA kernel) or "auto".
    """
    impl = resolve_impl("ssd", impl, x.device)
    _validate(x, dt, A, B, C, initial_state)
    if impl == "reference":
        return ssd_reference(x, dt, A, B, C, initial_state)
    if impl == "mamba_ssm":
        from groundthink.ops.kernels import mamba_ssd

        return mamba_ssd(x, dt, A, B, C, initial_state, chunk_size=chunk_size)
    return ssd_chunked(x, dt, A, B, C, initial_state, chunk_size=chunk_size)
