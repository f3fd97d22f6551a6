"""Thin wrappers around the CUDA kernels, imported lazily (only reached through `impl` on CUDA).

- fla (fla-org/flash-linear-attention >= 0.5): `fla.ops.rwkv6.chunk_rwkv6`, layout [B,T,H,K] (no head_first),
  `scale=1.0` because RWKV-6 has no 1/sqrt(K) scale; state [B,H,K,V] fp32, gradients reach initial_state.
  `fla.ops.gla.chunk_gla` for GLA, same layouts, with GLA's own scale.
- mamba_ssm (state-spaces/mamba >= 2.2): `mamba_chunk_scan_combined`, layout x [B,T,H,P], B/C [B,T,G,N],
  state [B,H,P,N]; D, z and dt_bias stay in the mixer.
- causal-conv1d (Dao-AILab/causal-conv1d >= 1.4): `causal_conv1d_fn` with `initial_states`, which the kernel
  only accepts in channel-last memory: x is passed as a transposed view of a contiguous [B,T,C] tensor.

Every wrapper runs outside torch.compile's graphs (torch.compiler.disable): the kernels are Triton/CUDA code with
their own autograd, which dynamo should call, not trace, whatever trainer.compile_ops says.
"""

from __future__ import annotations

import torch

MAMBA_GPU_CHUNK = 256  # mamba_ssm's own default chunk on GPU
CONV_KERNEL_WIDTHS = (2, 3, 4)  # widths causal_conv1d_fn implements


@torch.compiler.disable
def fla_wkv6(r, k, v, log_w, u, initial_state=None, chunk_size=None):
    from fla.ops.rwkv6 import chunk_rwkv6

    if initial_state is not None:
        initial_state = initial_state.float()
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    o, final_state = chunk_rwkv6(
        r, k, v, log_w, u, scale=1.0, initial_state=initial_state, output_final_state=True, **kwargs
    )
    return o.to(v.dtype), final_state.float()


@torch.compiler.disable
def fla_gla(q, k, v, log_g, initial_state=None, scale=None, chunk_size=None):
    from fla.ops.gla import chunk_gla

    state = None if initial_state is None else initial_state.float()
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    o, final_state = chunk_gla(q, k, v, log_g, scale=scale, initial_state=state, output_final_state=True, **kwargs)
    return o.to(v.dtype), final_state.float()


@torch.compiler.disable
def mamba_ssd(x, dt, A, B, C, initial_state=None, chunk_size=None):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    y, final_state = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size or MAMBA_GPU_CHUNK, initial_states=initial_state, return_final_states=True
    )
    return y.to(x.dtype), final_state.float()


@torch.compiler.disable
def causal_conv1d_kernel(x, weight, bias, initial_state):
    """x [B,T,C], initial_state [B,W-1,C] (already filled) -> y [B,T,C]."""
    from causal_conv1d import causal_conv1d_fn

    width = weight.shape[1]
    if width not in CONV_KERNEL_WIDTHS:
        raise ValueError(
            f"impl='causal_conv1d' supports conv widths {CONV_KERNEL_WIDTHS}, got weight width {width}; "
            "use impl='torch'"
        )
    x_cl = x.contiguous().transpose(1, 2)  # [B,C,T] view with stride(1) == 1 (channel-last)
    init_cl = initial_state.to(x.dtype).contiguous().transpose(1, 2)  # [B,C,W-1], channel-last as well
    y = causal_conv1d_fn(
        x_cl, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), initial_states=init_cl
    )
    return y.transpose(1, 2)
