"""Chunked torch ops vs the CUDA kernels (fla, mamba_ssm, causal-conv1d): outputs, states and gradients."""

from __future__ import annotations

import pytest
import torch

from groundthink.ops import causal_conv1d, ssd, wkv6
from groundthink.ops.dispatch import kernel_import_error
from tests._numerics import rel_err


def _needs(module: str):
    if not torch.cuda.is_available():
        return pytest.mark.skipif(True, reason=f"needs CUDA (for {module}); none is available")
    reason = kernel_import_error(module)
    return pytest.mark.skipif(
        reason is not None, reason=f"needs {module} (pip install groundthink[kernels]): {reason}"
    )


def _grads(fn, inputs, seed=0):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out, state = fn(*inputs)
    g = torch.Generator(device=out.device).manual_seed(seed)
    loss = (out.float() * torch.randn(out.shape, generator=g, device=out.device)).sum()
    loss = loss + (state.float() * torch.randn(state.shape, generator=g, device=out.device)).sum()
    return [out, state, *torch.autograd.grad(loss, inputs)]


def _assert_close(actual, expected, tol, names):
    for name, a, e in zip(names, actual, expected):
        err = rel_err(a, e)
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


WKV6_NAMES = ["o", "state", "dr", "dk", "dv", "dlog_w", "du", "dinitial_state"]
SSD_NAMES = ["y", "state", "dx", "ddt", "dA", "dB", "dC", "dinitial_state"]


def wkv6_inputs(T: int, device: str) -> list[torch.Tensor]:
    """r, k, v, log_w, u, initial state of the fla parity test (benchmarks/kernel_interpret.py uses them on CPU)."""
    g = torch.Generator(device=device).manual_seed(T)
    B, H, K, V = 2, 2, 64, 64
    r, k = (torch.randn(B, T, H, K, device=device, generator=g) for _ in range(2))
    v = torch.randn(B, T, H, V, device=device, generator=g)
    log_w = -torch.exp(torch.randn(B, T, H, K, device=device, generator=g) - 1)
    u = torch.randn(H, K, device=device, generator=g)
    s0 = torch.randn(B, H, K, V, device=device, generator=g)
    return [r, k, v, log_w, u, s0]


def ssd_inputs(T: int, device: str) -> list[torch.Tensor]:
    """x, dt, A, B, C, initial state of the mamba_ssm parity test."""
    g = torch.Generator(device=device).manual_seed(T)
    B, H, P, G, N = 2, 4, 64, 2, 64
    x = torch.randn(B, T, H, P, device=device, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(B, T, H, device=device, generator=g))
    A = -(0.1 + 3 * torch.rand(H, device=device, generator=g))
    Bm, Cm = (torch.randn(B, T, G, N, device=device, generator=g) for _ in range(2))
    h0 = torch.randn(B, H, P, N, device=device, generator=g)
    return [x, dt, A, Bm, Cm, h0]


@pytest.mark.gpu
@_needs("fla.ops.rwkv6")
@pytest.mark.parametrize("T", [15, 100, 257])
def test_fla_matches_chunked(T):
    inputs = wkv6_inputs(T, "cuda")
    expected = _grads(lambda *a: wkv6(*a, impl="chunked"), inputs)
    actual = _grads(lambda *a: wkv6(*a, impl="fla"), inputs)
    _assert_close(actual, expected, 2e-3, WKV6_NAMES)


@pytest.mark.gpu
@_needs("mamba_ssm.ops.triton.ssd_combined")
@pytest.mark.parametrize("T", [15, 100, 257])
def test_mamba_ssm_matches_chunked(T):
    inputs = ssd_inputs(T, "cuda")
    expected = _grads(lambda *a: ssd(*a, impl="chunked"), inputs)
    actual = _grads(lambda *a: ssd(*a, impl="mamba_ssm", chunk_size=64), inputs)
    _assert_close(actual, expected, 2e-3, SSD_NAMES)


@pytest.mark.gpu
@_needs("causal_conv1d")
@pytest.mark.parametrize("T", [1, 15, 100])
def test_causal_conv1d_kernel_matches_torch(T):
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(2, T, 64, device="cuda", generator=g)
    weight, bias = torch.randn(64, 4, device="cuda", generator=g), torch.randn(64, device="cuda", generator=g)
    init = torch.randn(2, 3, 64, device="cuda", generator=g)
    inputs = [x, weight, bias, init]
    expected = _grads(lambda *a: causal_conv1d(*a, impl="torch"), inputs)
    actual = _grads(lambda *a: causal_conv1d(*a, impl="causal_conv1d"), inputs)
    _assert_close(actual, expected, 1e-4, ["y", "state", "dx", "dweight", "dbias", "dinitial_state"])
