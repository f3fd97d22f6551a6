"""Choosing an implementation for an op: `resolve_impl(op, impl, device)`, and the registry of ops.

Each op module registers itself with `register_op` (its pure-torch fallback, its CUDA kernel's impl name and the
module that provides the kernel). "auto" picks the CUDA kernel when the tensors are on CUDA and the kernel
package imports, and the pure-torch path otherwise. Asking for a kernel by name where it cannot run is an error,
never a silent fallback.

Under torch.compile (trainer.compile) every op is a boundary of the compiled graphs: `compiler_boundary` runs it
eagerly between them, so the compiler fuses the elementwise work around the recurrences without unrolling their
chunk loops (on 2 CPU cores that halves the first step's compile time; benchmarks/bench_compile.py).
`trace_ops_when_compiling(True)` (trainer.compile_ops) lets torch.compile trace the pure-torch paths instead.
The CUDA kernels always run outside the graph (groundthink/ops/kernels.py).
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


_OUTSIDE = {"on": False}  # read while dynamo traces, so it is guarded: changing it recompiles
_BOUNDARIES: list[tuple] = []  # (op, holder, wrapper) per decorated op; holder[0]: op behind torch.compiler.disable


def trace_ops_when_compiling(enabled: bool) -> None:
    """Whether torch.compile traces the ops' pure-torch paths into its graphs (True) or calls them between graphs.
    Until this is first called, the ops are plain calls (and a bare torch.compile traces them); torch._dynamo is
    imported only here, not with the ops (it costs over a second)."""
    _OUTSIDE["on"] = not enabled
    if enabled:
        return
    from torch._dynamo.eval_frame import skip_code

    for op, holder, wrapper in _BOUNDARIES:
        if not holder:
            holder.append(torch.compiler.disable(op))
        # The wrapper is never compiled as a frame of its own: after the graph break at its call, dynamo would
        # otherwise compile it once per op and input shape (empty graphs that count towards its recompile limit).
        skip_code(wrapper.__code__)


def compiler_boundary(op=None, *, only_if: str | None = None):
    """Decorate an op's public function (or a mixer's scan over one: mixers/_common.scan_with_state_norm). Under
    trainer.compile (`trace_ops_when_compiling(False)`) it runs outside the compiled graphs, a graph break at its
    call; otherwise dynamo inlines it. `only_if`: the name of a keyword argument that must be true for the call to
    leave the graph. Eager calls compute the same either way."""
    if op is None:
        return functools.partial(compiler_boundary, only_if=only_if)
    holder: list = []

    @functools.wraps(op)
    def run(*args, **kwargs):
        if _OUTSIDE["on"] and (only_if is None or kwargs[only_if]):
            return holder[0](*args, **kwargs)
        return op(*args, **kwargs)

    _BOUNDARIES.append((op, holder, run))
    return run


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
