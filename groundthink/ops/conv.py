"""Causal depthwise 1-D convolution with a carried input tail (Mamba-2's short conv over xBC).

Paper: Gu & Dao, "Mamba" (arXiv 2312.00752) and Dao & Gu, "Transformers are SSMs" (arXiv 2405.21060) use it
before the scan. Semantics follow `causal_conv1d_ref` in Dao-AILab/causal-conv1d
(`causal_conv1d_interface.py`): convolve cat(initial_state, x) with no padding. Differences: our layout is
[B,T,C] (time before channels, like the rest of the model), the state is the last W-1 *pre-conv* input
columns [B,W-1,C], and there is no activation inside (the mixer applies SiLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from groundthink.ops._checks import check_rank, check_shape
from groundthink.ops.dispatch import register_op, resolve_impl

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


def causal_conv1d(x, weight, bias=None, initial_state=None, *, impl="torch"):
    """y_t = bias + Σ_i weight[:, i] · xx_{t+i}, xx = cat(initial_state, x) along time.

    x [B,T,C], weight [C,W], bias [C], initial_state [B,W-1,C] (zeros if None).
    Returns (y [B,T,C], final_state [B,W-1,C] = the last W-1 columns of cat(initial_state, x)).
    impl: "torch" (F.conv1d), "causal_conv1d" (CUDA kernel) or "auto".
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
    bias = None if bias is None else bias.to(x.dtype)
    y = F.conv1d(xx.transpose(1, 2), weight.to(x.dtype)[:, None, :], bias, groups=C)  # [B,C,T]
    return y.transpose(1, 2), final_state
