"""The state pass across chunks shared by the chunked ops (WKV-6, GLA, SSD): S_{n+1} = decay_n ⊙ S_n + contrib_n,
and `mul_into`, an in-place product that also traces under torch.compile (the causal conv's backward uses it).

Written as one autograd Function instead of a Python loop that autograd records step by step: the forward writes
each chunk's entering state straight into one preallocated tensor (no list of states and no `stack` copying them
together), and the backward runs the loop in reverse, writing each chunk's state gradient straight into the
contribution gradient (no per-step graph nodes, no `stack` of per-chunk gradients). The arithmetic is the loop's,
operation for operation, so results are bitwise those of the loop (tests/test_ops.py checks forward and
gradients). Measurements: ops/README.md.
"""

from __future__ import annotations

import torch


def mul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out[...] = a * b, written in place without a temporary. Under torch.compile (trainer.compile_ops), which
    refuses `out=` for a non-contiguous view, the product is copied in instead (inductor fuses the two)."""
    if torch.compiler.is_compiling():
        return out.copy_(a * b)
    return torch.mul(a, b, out=out)


class _ChunkStateScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, decay, contrib, initial, dim):
        n_chunks = contrib.shape[dim]
        starts = torch.empty_like(contrib, memory_format=torch.contiguous_format)
        starts.select(dim, 0).copy_(initial)
        state = initial
        # decay_n * S + contrib_n, as two roundings (mul, then add) like the expression itself; every state but the
        # last is written into `starts`.
        for n in range(n_chunks - 1):
            state = mul_into(starts.select(dim, n + 1), decay.select(dim, n), state).add_(contrib.select(dim, n))
        final = (decay.select(dim, n_chunks - 1) * state).add_(contrib.select(dim, n_chunks - 1))
        ctx.save_for_backward(decay, starts)
        ctx.dim = dim
        return starts, final

    @staticmethod
    def backward(ctx, d_starts, d_final):
        decay, starts = ctx.saved_tensors
        dim = ctx.dim
        n_chunks = starts.shape[dim]
        # d_contrib_n is the gradient of S_{n+1} (what contrib_n is added into); it is built in place, chunk by
        # chunk from the last: dS_n = dS_{n+1} ⊙ decay_n + d_starts_n.
        d_contrib = torch.empty_like(starts)
        d_decay = torch.empty_like(decay) if ctx.needs_input_grad[0] else None
        grad = d_contrib.select(dim, n_chunks - 1).copy_(d_final)
        for n in range(n_chunks - 1, -1, -1):
            decay_n = decay.select(dim, n)
            if d_decay is not None:
                d_decay.select(dim, n).copy_((grad * starts.select(dim, n)).sum_to_size(decay_n.shape))
            if n > 0:
                grad = mul_into(d_contrib.select(dim, n - 1), grad, decay_n).add_(d_starts.select(dim, n))
        d_initial = None
        if ctx.needs_input_grad[2]:
            d_initial = grad * decay.select(dim, 0) + d_starts.select(dim, 0)
        return d_decay, d_contrib if ctx.needs_input_grad[1] else None, d_initial, None


def chunk_state_scan_loop(decay: torch.Tensor, contrib: torch.Tensor, initial: torch.Tensor, dim: int):
    """The same scan as a loop that autograd records step by step: the specification of the Function (the tests
    compare them bitwise) and what torch.compile traces (trainer.compile_ops): inductor fuses the loop, and the
    traced Function made the compiled step slower (ops/README.md).

    unbind, not contrib.select(dim, n): the backward of each index op would write a zero tensor the size of all
    chunks (quadratic in T); unbind's backward is one stack."""
    starts, state = [], initial
    for decay_n, contrib_n in zip(decay.unbind(dim), contrib.unbind(dim)):
        starts.append(state)
        state = decay_n * state + contrib_n
    return torch.stack(starts, dim=dim), state


def chunk_state_scan(decay: torch.Tensor, contrib: torch.Tensor, initial: torch.Tensor, dim: int):
    """Carry a state across the chunks laid out along `dim`: S_0 = initial, S_{n+1} = decay_n ⊙ S_n + contrib_n.

    contrib: [..., n_chunks (at dim), *state]; decay: the same rank, broadcasting against contrib (e.g. a size-1
    value axis); initial: the state, shaped like contrib without the chunk axis. Returns (the state entering each
    chunk, contiguous and shaped like contrib, and the state after the last chunk).
    """
    if torch.compiler.is_compiling():
        return chunk_state_scan_loop(decay, contrib, initial, dim)
    return _ChunkStateScan.apply(decay, contrib, initial, dim)
