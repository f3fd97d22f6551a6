"""Causal depthwise 1-D convolution with a carried input tail (Mamba-2's short conv over xBC).

Paper: Gu & Dao, "Mamba" (arXiv 2312.00752) and Dao & Gu, "Transformers are SSMs" (arXiv 2405.21060) use it
before the scan. Semantics follow `causal_conv1d_ref` in Dao-AILab/causal-conv1d
(`causal_conv1d_interface.py`): convolve cat(initial_state, x) with no padding. Differences: our layout is
[B,T,C] (time before channels, like the rest of the model), the state is the last W-1 *pre-conv* input
columns [B,W-1,C], and there is no activation inside (the mixer applies SiLU).
"""

from __future__ import annotations

import torch

from groundthink.ops._checks import check_rank, check_shape, compute_dtype
from groundthink.ops._scan import mul_into
from groundthink.ops.dispatch import compiler_boundary, register_op, resolve_impl

CONV_IMPLS = ("torch", "causal_conv1d")
register_op("conv", fallback="torch", kernel="causal_conv1d", module="causal_conv1d", impls=CONV_IMPLS)


def _validate(x, weight, bias, initial_state):
    check_rank("x", x, 3, "[B,T,C]")
    b, T, C = x.shape
    if T < 1:
        raise ValueError(f"x must hold at least one time step (T >= 1), got shape {tuple(x.shape)}")
    check_rank("weight", weight, 2, "[C,W]")
    if weight.shape[0] != C:
        raise ValueError(
            f"weight must have shape [C,W] with C={C} channels as in x, got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_shape("bias", bias, (C,), "[C]")
    if initial_state is not None:
        check_shape("initial_state", initial_state, (b, weight.shape[1] - 1, C), "[B,W-1,C]")


class _DepthwiseCausalConv(torch.autograd.Function):
    """y_t = bias + Σ_i weight[:, i] · xx_{t+i} over xx = cat(initial_state, x) [B,W-1+T,C], as W shifted
    multiply-adds in the [B,T,C] layout, with the backward written out the same way.

    On CPU this is cheaper than F.conv1d for the short widths (2-4) Mamba uses: conv1d wants channels before time,
    so it costs two transposed copies, and its depthwise backward is slow; here every pass reads contiguous rows.
    """

    @staticmethod
    def forward(ctx, xx, weight, bias, T):
        W = weight.shape[1]
        w = weight.to(xx.dtype)
        y = xx[:, W - 1 :] * w[:, W - 1]
        if bias is not None:
            y += bias.to(xx.dtype)
        for i in range(W - 1):
            y.addcmul_(xx[:, i : i + T], w[:, i])
        ctx.save_for_backward(xx, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xx, weight = ctx.saved_tensors
        W, T = weight.shape[1], dy.shape[1]
        w = weight.to(dy.dtype)
        dxx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            # dxx[:, i:i+T] += dy · w_i for i = 0..W-1 in that order; tap 0 is written, not added to zeros (the
            # same numbers, one pass fewer), and only the W-1 rows past it are zeroed.
            dxx = torch.empty_like(xx)
            mul_into(dxx[:, :T], dy, w[:, 0])
            dxx[:, T:].zero_()
            for i in range(1, W):
                dxx[:, i : i + T].addcmul_(dy, w[:, i])
        if ctx.needs_input_grad[1]:
            # The product of dy with the strided window comes out contiguous, so its reshape is a view: the window is
            # not copied first (reshaping the window itself would copy it).
            dweight = torch.stack(
                [(dy * xx[:, i : i + T]).reshape(-1, dy.shape[-1]).sum(0) for i in range(W)], dim=1
            ).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum((0, 1))
        return dxx, dweight, dbias, None


@compiler_boundary
def causal_conv1d(x, weight, bias=None, initial_state=None, *, impl="torch"):
    """y_t = bias + Σ_i weight[:, i] · xx_{t+i}, xx = cat(initial_state, x) along time.

    x [B,T,C], weight [C,W], bias [C], initial_state [B,W-1,C] (zeros if None).
    Returns (y [B,T,C], final_state [B,W-1,C] = the last W-1 columns of cat(initial_state, x)).
    impl: "torch" (pure torch, see _DepthwiseCausalConv), "causal_conv1d" (CUDA kernel) or "auto".
    """
    impl = resolve_impl("conv", impl, x.device)
    _validate(x, weight, bias, initial_state)
    b, T, C = x.shape
    W = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(b, W - 1, C)
    xx = torch.cat([initial_state.to(x.dtype), x], dim=1)  # [B,W-1+T,C]
    final_state = xx[:, xx.shape[1] - (W - 1) :]
    if impl == "causal_conv1d":
        from groundthink.ops.kernels import causal_conv1d_kernel

        return causal_conv1d_kernel(x, weight, bias, initial_state), final_state
    # In fp32 (fp64 for fp64 inputs) whatever the input dtype: on CPU, bf16 elementwise arithmetic is slower than
    # the two casts (benchmarks/bench_train.py: the conv of `8m` under bf16 autocast).
    y = _DepthwiseCausalConv.apply(xx.to(compute_dtype(x.dtype)), weight, bias, T)
    return y.to(x.dtype), final_state
