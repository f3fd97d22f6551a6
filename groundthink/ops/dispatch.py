"""Choosing an implementation for an op: `resolve_impl(op, impl, device)`.

"auto" picks the CUDA kernel when the tensors are on CUDA and the kernel package imports, and the pure-torch
path otherwise. Asking for a kernel by name where it cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib

import torch

# op -> (torch fallback for "auto", kernel impl name, module the kernel lives in, all allowed names)
_OPS = {
    "wkv6": ("chunked", "fla", "fla.ops.rwkv6", ("auto", "reference", "chunked", "fla")),
    "ssd": (
        "chunked",
        "mamba_ssm",
        "mamba_ssm.ops.triton.ssd_combined",
        ("auto", "reference", "chunked", "mamba_ssm"),
    ),
    "conv": ("torch", "causal_conv1d", "causal_conv1d", ("auto", "torch", "causal_conv1d")),
}


@functools.cache
def kernel_import_error(module: str) -> str | None:
    """None when `module` imports, else the reason it does not (cached: imports are slow)."""
    try:
        importlib.import_module(module)
    except Exception as err:  # a broken CUDA extension raises more than ImportError
        return f"{type(err).__name__}: {err}"
    return None


def resolve_impl(op: str, impl: str, device) -> str:
    """Map `impl` ("auto" or an explicit name) to the implementation that will run for `op` on `device`."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; allowed ops: {sorted(_OPS)}")
    fallback, kernel, module, allowed = _OPS[op]
    if impl not in allowed:
        raise ValueError(f"unknown impl {impl!r} for op {op!r}; allowed: {list(allowed)}")
    on_cuda = torch.device(device).type == "cuda"
    if impl == "auto":
        return kernel if on_cuda and kernel_import_error(module) is None else fallback
    if impl == kernel:
        if not on_cuda:
            raise RuntimeError(
                f"impl={kernel!r} for op {op!r} needs CUDA tensors, but the device is "
                f"{torch.device(device)}; use impl='{fallback}' (or 'auto') on this device"
            )
        reason = kernel_import_error(module)
        if reason is not None:
            raise RuntimeError(
                f"impl={kernel!r} for op {op!r} needs the package providing {module!r}, which does not "
                f"import ({reason}); install it with `pip install groundthink[kernels]` or use "
                f"impl='{fallback}'"
            )
    return impl
