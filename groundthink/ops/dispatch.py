"""Choosing an implementation for an op: `resolve_impl(op, impl, device)`, and the registry of ops.

Each op module registers itself with `register_op` (its pure-torch fallback, its CUDA kernel's impl name and the
module that provides the kernel). "auto" picks the CUDA kernel when the tensors are on CUDA and the kernel
package imports, and the pure-torch path otherwise. Asking for a kernel by name where it cannot run is an error,
never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OpSpec:
    fallback: str  # what "auto" runs without the kernel: "chunked" (or "torch" for the conv)
    kernel: str  # the kernel's impl name: "fla", "mamba_ssm", "causal_conv1d"
    module: str  # the module the kernel lives in (imported lazily, only to check it is usable)
    impls: tuple[str, ...]  # every allowed impl name, "auto" included


OPS: dict[str, OpSpec] = {}


def register_op(name: str, *, fallback: str, kernel: str, module: str, impls: tuple[str, ...]) -> None:
    OPS[name] = OpSpec(fallback, kernel, module, ("auto", *impls))


def kernel_of(op: str) -> str:
    return _spec(op).kernel


def model_impls() -> tuple[str, ...]:
    """The values a model-wide `impl` may take: auto, the pure-torch paths and every registered kernel."""
    kernels = sorted({spec.kernel for spec in OPS.values() if spec.fallback == "chunked"})
    return ("auto", "reference", "chunked", *kernels)


def _spec(op: str) -> OpSpec:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; allowed ops: {sorted(OPS)}")
    return OPS[op]


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
    spec = _spec(op)
    if impl not in spec.impls:
        raise ValueError(f"unknown impl {impl!r} for op {op!r}; allowed: {list(spec.impls)}")
    on_cuda = torch.device(device).type == "cuda"
    if impl == "auto":
        return spec.kernel if on_cuda and kernel_import_error(spec.module) is None else spec.fallback
    if impl == spec.kernel:
        if not on_cuda:
            raise RuntimeError(
                f"impl={spec.kernel!r} for op {op!r} needs CUDA tensors, but the device is "
                f"{torch.device(device)}; use impl='{spec.fallback}' (or 'auto') on this device"
            )
        reason = kernel_import_error(spec.module)
        if reason is not None:
            raise RuntimeError(
                f"impl={spec.kernel!r} for op {op!r} needs the package providing {spec.module!r}, which does not "
                f"import ({reason}); install it with `pip install groundthink[kernels]` or use "
                f"impl='{spec.fallback}'"
            )
    return impl


def op_impl(model_impl: str, op: str) -> str:
    """One op's impl from a model-wide impl ("auto" | "reference" | "chunked" | a kernel name).

    "reference"/"chunked" mean the pure-torch path ("torch" for an op whose only torch path has that name); a
    kernel name applies to the ops that kernel implements and leaves the other ops on "auto".
    """
    spec = _spec(op)
    if model_impl in ("reference", "chunked"):
        return model_impl if model_impl in spec.impls else spec.fallback
    if model_impl not in ("auto", spec.kernel):
        return "auto"
    return model_impl
