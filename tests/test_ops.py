"""Parity of the chunked ops with their step-loop references (outputs, final states, every input gradient),
the strong-decay regime, the causal conv, and the errors users see."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from groundthink.ops import causal_conv1d, resolve_impl, ssd, ssd_reference, wkv6, wkv6_reference
from tests._numerics import rel_err

LENGTHS = [1, 15, 63, 100, 257]
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def _grads(fn, inputs, seed=0):
    """Run fn, contract (out, state) with fixed random cotangents, return [out, state, *input grads]."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out, state = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=g, dtype=state.dtype)).sum()
    return [out, state, *torch.autograd.grad(loss, inputs)]


def _assert_parity(actual, expected, tol, names):
    for name, a, e in zip(names, actual, expected):
        assert torch.isfinite(a).all(), f"{name} is not finite"
        err = rel_err(a, e)
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


def _wkv6_inputs(B, T, H, K, V, dtype, mean_abs_log_w=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    log_w = -2 * mean_abs_log_w * torch.rand(B, T, H, K, generator=g, dtype=dtype)  # mean |log w| = m
    u = torch.randn(H, K, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    return [r, k, v, log_w, u, s0]


WKV6_NAMES = ["o", "final_state", "dr", "dk", "dv", "dlog_w", "du", "dinitial_state"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", LENGTHS)
def test_wkv6_chunked_matches_reference(T, dtype):
    inputs = _wkv6_inputs(2, T, 2, 8, 6, dtype)
    expected = _grads(wkv6_reference, inputs)
    actual = _grads(lambda *a: wkv6(*a, impl="chunked", chunk_size=16), inputs)
    _assert_parity(actual, expected, TOL[dtype], WKV6_NAMES)


@pytest.mark.parametrize("chunk_size", [None, 4, 64])
def test_wkv6_chunk_sizes(chunk_size):
    inputs = _wkv6_inputs(1, 100, 2, 8, 8, torch.float64, seed=1)
    expected = _grads(wkv6_reference, inputs)
    actual = _grads(lambda *a: wkv6(*a, chunk_size=chunk_size), inputs)
    _assert_parity(actual, expected, TOL[torch.float64], WKV6_NAMES)


def _naive_factorised_intra(r, k, log_w, chunk_size):
    """The single-reference factorisation exp(ge_t - gi_j) = exp(ge_t) · exp(-gi_j) relative to the chunk
    start: the intra-chunk score matrix that the two-level form avoids. Returns [B,H,N,C,C]."""
    B, T, H, K = r.shape
    N = T // chunk_size
    r, k, g = (t.view(B, N, chunk_size, H, K).permute(0, 3, 1, 2, 4) for t in (r, k, log_w))
    gi = g.cumsum(-2)
    ge = gi - g
    return ((r * torch.exp(ge)) @ (k * torch.exp(-gi)).transpose(-1, -2)).tril(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wkv6_strong_decay_is_exact_where_naive_overflows(dtype):
    T, m = 64, 16.0  # mean |log w| = 16: summed decay over 64 steps ~1000 > ln(max) of fp32 (89), fp64 (709)
    inputs = _wkv6_inputs(1, T, 2, 8, 8, dtype, mean_abs_log_w=m, seed=2)
    assert inputs[3].abs().mean() >= 6
    r, k, _, log_w, _, _ = inputs
    naive = _naive_factorised_intra(r, k, log_w, chunk_size=64)
    assert not torch.isfinite(naive).all(), "the naive factorisation should overflow in this regime"
    expected = _grads(wkv6_reference, inputs)
    actual = _grads(lambda *a: wkv6(*a, chunk_size=64), inputs)
    _assert_parity(actual, expected, TOL[dtype], WKV6_NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wkv6_extreme_decay_and_no_decay_stay_finite(dtype):
    inputs = _wkv6_inputs(1, 40, 1, 4, 4, dtype, seed=3)
    log_w = inputs[3]
    log_w[:, ::2] = -1e4  # decays to exactly zero
    log_w[:, 1::4] = 0.0  # no decay at all
    expected = _grads(wkv6_reference, inputs)
    actual = _grads(lambda *a: wkv6(*a, chunk_size=16), inputs)
    # Exponents are differences of in-chunk cumsums of size ~1e5 here: fp32 rounds them to ~1e-3 absolute.
    _assert_parity(actual, expected, 1e-3 if dtype == torch.float32 else 1e-9, WKV6_NAMES)


def test_wkv6_dtypes_and_no_initial_state():
    r, k, v, log_w, u, _ = _wkv6_inputs(2, 20, 2, 4, 4, torch.float32)
    o, state = wkv6(r.bfloat16(), k.bfloat16(), v.bfloat16(), log_w, u)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    o_ref, state_ref = wkv6_reference(r, k, v, log_w, u)
    o, state = wkv6(r, k, v, log_w, u)
    assert rel_err(o, o_ref) <= 1e-4 and rel_err(state, state_ref) <= 1e-4


def test_wkv6_carried_state_equals_one_pass():
    r, k, v, log_w, u, s0 = _wkv6_inputs(2, 50, 2, 4, 4, torch.float64)
    o_full, s_full = wkv6(r, k, v, log_w, u, s0)
    o1, s1 = wkv6(r[:, :17], k[:, :17], v[:, :17], log_w[:, :17], u, s0)
    o2, s2 = wkv6(r[:, 17:], k[:, 17:], v[:, 17:], log_w[:, 17:], u, s1)
    assert rel_err(torch.cat([o1, o2], 1), o_full) <= 1e-12 and rel_err(s2, s_full) <= 1e-12


def _ssd_inputs(B, T, H, P, G, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(B, T, H, generator=g, dtype=dtype))
    A = -(0.1 + 3 * torch.rand(H, generator=g, dtype=dtype))
    Bm, Cm = (torch.randn(B, T, G, N, generator=g, dtype=dtype) for _ in range(2))
    h0 = torch.randn(B, H, P, N, generator=g, dtype=dtype)
    return [x, dt, A, Bm, Cm, h0]


SSD_NAMES = ["y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dinitial_state"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("G", [1, 2])
def test_ssd_chunked_matches_reference(T, G, dtype):
    inputs = _ssd_inputs(2, T, 4, 5, G, 3, dtype)
    expected = _grads(ssd_reference, inputs)
    actual = _grads(lambda *a: ssd(*a, impl="chunked", chunk_size=16), inputs)
    _assert_parity(actual, expected, TOL[dtype], SSD_NAMES)


def test_ssd_default_chunk_and_strong_decay():
    inputs = _ssd_inputs(1, 130, 2, 4, 1, 4, torch.float64, seed=4)
    inputs[1] = inputs[1] * 50  # dt·A down to about -500 per step
    expected = _grads(ssd_reference, inputs)
    actual = _grads(ssd, inputs)
    _assert_parity(actual, expected, TOL[torch.float64], SSD_NAMES)


def test_ssd_carried_state_equals_one_pass():
    x, dt, A, Bm, Cm, h0 = _ssd_inputs(2, 50, 4, 3, 2, 3, torch.float64)
    y_full, h_full = ssd(x, dt, A, Bm, Cm, h0)
    y1, h1 = ssd(x[:, :21], dt[:, :21], A, Bm[:, :21], Cm[:, :21], h0)
    y2, h2 = ssd(x[:, 21:], dt[:, 21:], A, Bm[:, 21:], Cm[:, 21:], h1)
    assert rel_err(torch.cat([y1, y2], 1), y_full) <= 1e-12 and rel_err(h2, h_full) <= 1e-12


def _conv_step_loop(x, weight, bias, initial_state):
    W = weight.shape[1]
    window = initial_state.clone()  # [B,W-1,C]
    ys = []
    for t in range(x.shape[1]):
        full = torch.cat([window, x[:, t : t + 1]], 1)  # [B,W,C]
        ys.append((full * weight.t()[None]).sum(1) + (0 if bias is None else bias))
        window = full[:, 1:]
    return torch.stack(ys, 1), window[:, window.shape[1] - (W - 1) :]


@pytest.mark.parametrize("T", [1, 2, 15])
@pytest.mark.parametrize("W", [1, 4])
def test_conv_matches_step_loop(T, W):
    g = torch.Generator().manual_seed(T + W)
    x = torch.randn(2, T, 6, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(6, W, generator=g, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    init = torch.randn(2, W - 1, 6, generator=g, dtype=torch.float64)
    expected = _grads(lambda *a: _conv_step_loop(*a), [x, weight, bias, init])
    actual = _grads(lambda *a: causal_conv1d(*a), [x, weight, bias, init])
    names = ["y", "final_state", "dx", "dweight", "dbias", "dinitial_state"]
    _assert_parity(actual, expected, TOL[torch.float64], names)


def test_conv_chunked_with_carried_state_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 11, 5, generator=g), torch.randn(5, 4, generator=g)
    y_full, tail_full = causal_conv1d(x, weight)
    tail, ys = None, []
    for piece in (x[:, :2], x[:, 2:7], x[:, 7:]):  # the first piece is shorter than W-1
        y, tail = causal_conv1d(piece, weight, initial_state=tail)
        ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_full) <= 1e-6 and rel_err(tail, tail_full) == 0.0
    assert tail.shape == (2, 3, 5)


@pytest.mark.parametrize(
    "decay_shape, contrib_shape, dim",
    [((2, 3, 5, 4, 1), (2, 3, 5, 4, 6), 2),  # WKV-6 / GLA: [B,H,N,K,1] against [B,H,N,K,V]
     ((2, 5, 2, 3, 1, 1), (2, 5, 2, 3, 4, 6), 1),  # SSD: [b,nc,G,R,1,1] against [b,nc,G,R,P,N]
     ((3, 1, 4, 1), (3, 1, 4, 5), 1)],  # one chunk
)
@pytest.mark.parametrize("initial_grad", [True, False])
def test_chunk_state_scan_is_bitwise_the_loop(decay_shape, contrib_shape, dim, initial_grad):
    """The autograd Function writes into preallocated tensors instead of stacking; the arithmetic is the loop's,
    so forward and every gradient match it exactly (fp32), and gradcheck passes in fp64."""
    from groundthink.ops._scan import chunk_state_scan, chunk_state_scan_loop

    g = torch.Generator().manual_seed(len(contrib_shape) + dim)
    decay = torch.rand(decay_shape, generator=g)
    contrib = torch.randn(contrib_shape, generator=g)
    state_shape = contrib_shape[:dim] + contrib_shape[dim + 1 :]
    initial = torch.randn(state_shape, generator=g)
    results = []
    for fn in (chunk_state_scan_loop, chunk_state_scan):
        d, c = decay.clone().requires_grad_(), contrib.clone().requires_grad_()
        h0 = initial.clone().requires_grad_(initial_grad)
        starts, final = fn(d, c, h0, dim)
        g_out = torch.Generator().manual_seed(1)
        loss = (starts * torch.randn(starts.shape, generator=g_out)).sum() + (final * torch.randn(
            final.shape, generator=g_out)).sum()
        loss.backward()
        results.append([starts, final, d.grad, c.grad, h0.grad])
    for name, expected, actual in zip(["starts", "final", "d_decay", "d_contrib", "d_initial"], *results):
        if expected is None:
            assert actual is None, name
        else:
            assert torch.equal(actual, expected), f"{name}: max diff {(actual - expected).abs().max():.3e}"
    assert results[1][0].is_contiguous()
    double = [t.double().requires_grad_() for t in (decay, contrib, initial)]
    assert torch.autograd.gradcheck(lambda d, c, h: chunk_state_scan(d, c, h, dim), double)


def test_conv_backward_is_bitwise_the_accumulation_it_replaces():
    """The conv's backward writes tap 0 instead of adding it to zeros and reduces the weight gradient without
    copying the strided window: the numbers must be exactly those of the plain accumulation."""
    g = torch.Generator().manual_seed(0)
    B, T, C, W = 3, 17, 8, 4
    x, weight, bias = torch.randn(B, T, C, generator=g), torch.randn(C, W, generator=g), torch.randn(C, generator=g)
    init, dy = torch.randn(B, W - 1, C, generator=g), torch.randn(B, T, C, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, init)]
    causal_conv1d(*leaves)[0].backward(dy)
    xx = torch.cat([init, x], 1)
    dxx = torch.zeros_like(xx)
    for i in range(W):
        dxx[:, i : i + T].addcmul_(dy, weight[:, i])
    dweight = torch.stack([(dy.reshape(-1, C) * xx[:, i : i + T].reshape(-1, C)).sum(0) for i in range(W)], 1)
    assert torch.equal(leaves[0].grad, dxx[:, W - 1 :]) and torch.equal(leaves[3].grad, dxx[:, : W - 1])
    assert torch.equal(leaves[1].grad, dweight) and torch.equal(leaves[2].grad, dy.sum((0, 1)))


def test_resolve_impl_on_cpu():
    assert resolve_impl("wkv6", "auto", "cpu") == "chunked"
    assert resolve_impl("ssd", "auto", torch.device("cpu")) == "chunked"
    assert resolve_impl("conv", "auto", "cpu") == "torch"
    assert resolve_impl("wkv6", "reference", "cpu") == "reference"


@pytest.mark.parametrize(("op", "kernel"), [("wkv6", "fla"), ("ssd", "mamba_ssm"), ("conv", "causal_conv1d")])
def test_kernel_without_cuda_is_a_clear_error(op, kernel):
    with pytest.raises(RuntimeError, match=rf"impl='{kernel}'.*CUDA.*impl="):
        resolve_impl(op, kernel, "cpu")


def test_unknown_impl_and_op_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"unknown impl 'fast'.*allowed.*'chunked'"):
        wkv6(*_wkv6_inputs(1, 3, 1, 2, 2, torch.float32)[:5], impl="fast")
    with pytest.raises(ValueError, match=r"unknown impl 'chunked'.*allowed.*'torch'"):
        causal_conv1d(torch.zeros(1, 3, 2), torch.zeros(2, 4), impl="chunked")
    with pytest.raises(ValueError, match=r"unknown op 'no_such_op'"):
        resolve_impl("no_such_op", "auto", "cpu")


def test_bad_shapes_are_clear_errors():
    r, k, v, log_w, u, s0 = _wkv6_inputs(2, 5, 2, 4, 3, torch.float32)
    with pytest.raises(ValueError, match=r"r must have rank 4"):
        wkv6(r[0], k, v, log_w, u)
    with pytest.raises(ValueError, match=r"k must have shape"):
        wkv6(r, k[:1], v, log_w, u)
    with pytest.raises(ValueError, match=r"v must have shape \[B,T,H,V\]"):
        wkv6(r, k, v[:1], log_w, u)
    with pytest.raises(ValueError, match=r"u must have shape \[H,K\]"):
        wkv6(r, k, v, log_w, u[:1])
    with pytest.raises(ValueError, match=r"initial_state must have shape"):
        wkv6(r, k, v, log_w, u, s0[:1])
    x, dt, A, Bm, Cm, h0 = _ssd_inputs(2, 5, 4, 3, 2, 3, torch.float32)
    with pytest.raises(ValueError, match=r"dt must have shape"):
        ssd(x, dt[:1], A, Bm, Cm)
    with pytest.raises(ValueError, match=r"divisible by the number of B/C groups G=3"):
        ssd(x, dt, A, torch.zeros(2, 5, 3, 3), torch.zeros(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"initial_state must have shape"):
        ssd(x, dt, A, Bm, Cm, h0[:, :2])
    with pytest.raises(ValueError, match=r"weight must have shape \[C,W\]"):
        causal_conv1d(torch.zeros(1, 3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"initial_state must have shape"):
        causal_conv1d(torch.zeros(1, 3, 2), torch.zeros(2, 4), initial_state=torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"chunk_size must be a power of two"):
        wkv6(r, k, v, log_w, u, chunk_size=12)
