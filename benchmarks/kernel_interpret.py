"""The GPU kernels' parity, without a GPU: fla's and mamba_ssm's Triton kernels run by Triton's interpreter on the CPU.

    make kernel-interpret                      # installs triton, fla-core and mamba_ssm's Python part, then runs this
    python -m benchmarks.kernel_interpret [--seq-lens 15 100 257] [--model tiny --model-seq-len 100] [--no-bf16]

`TRITON_INTERPRET=1` makes Triton execute a kernel's Python body with numpy instead of compiling it, so the real
`fla.ops.rwkv6.chunk_rwkv6`, `fla.ops.gla.chunk_gla` and `mamba_ssm`'s `mamba_chunk_scan_combined` (forward and
backward kernels) run on CPU tensors. This checks what the GPU parity tests (tests/test_ops_gpu.py, test_gla.py)
check — GroundThink's wrappers (layouts, scale, log-decay, state layout, initial-state gradients) against its
chunked ops, outputs, final states and every input gradient, on the same shapes and tolerances — then the same with
bf16 activations (as autocast hands them to the ops under `trainer=gpu`), and then one training step (loss and
every parameter gradient) of a model whose ops resolve to the kernels against the same model on the torch ops, in
fp32 and under bf16 autocast (there the kernels' step must be as near the fp32 step as the torch ops' bf16 step
is). It does not check the GPU's own arithmetic (TF32, its bf16 units, atomics) or speed: that is `make gpu-check`
on a CUDA machine. causal-conv1d is CUDA C++ and cannot be interpreted; the model keeps the torch conv.

Five shims let the interpreter run these kernels on a CPU-only torch; each is confined to this process:
  1. every autotuned kernel keeps its first configuration (the interpreter cannot benchmark; on a GPU the
     configurations differ in speed, not in results);
  2. a `for` loop's induction variable becomes a Triton tensor, as in compiled code (fla calls `.to()` on it; the
     interpreter leaves it a Python int);
  3. a one-element block converts to a Python int with numpy 2 (`int(array)` of a 1-d array is an error there);
  4. `torch.cuda.device(...)` is a no-op and `torch.cuda.get_device_properties` answers a multiprocessor count
     (mamba_ssm calls both around its launches), and `selective_scan_cuda` (mamba_ssm's compiled selective scan,
     imported by its package `__init__` but not used by the SSD kernels) is an empty module;
  5. bf16: `tl.dot` of bf16 blocks widens them to fp32 first (Triton 3.6's interpreter multiplies bf16's raw 16-bit
     patterns as numbers: a 16x16 product came out wrong by 3e10), and bf16 constants exist (the interpreter's
     builder has fp16, fp32 and fp64 ones only).
The dispatcher is told that the kernels may take CPU tensors (it refuses them otherwise, rightly, outside this tool).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import os
import sys
import time
import types
import warnings

TOLERANCE = 2e-3  # the GPU parity tests' tolerance (fp32)
BF16_TOLERANCE = 2e-2  # about five roundings of bf16's 8-bit significand, against fp32 on the same rounded inputs
# The interpreter computes bf16 elementwise arithmetic on the raw 16-bit patterns (a bf16 product came out wrong by
# 5e32), so only kernels that widen bf16 before their arithmetic can be checked in bf16 here: fla's RWKV-6 and
# mamba_ssm's SSD do; fla's GLA backward does not (its gradients come out inf/nan), so GLA is checked in fp32 only.
BF16_OPS = ("wkv6", "ssd")
KERNEL_OF = {"wkv6": "fla", "gla": "fla", "ssd": "mamba_ssm"}  # conv's kernel is CUDA C++: it stays torch
NEEDS = {"triton": "triton", "fla": "flash-linear-attention (fla-core)", "mamba_ssm": "mamba-ssm", "einops": "einops"}


def missing_packages() -> list[str]:
    # mamba_ssm is looked up without importing it (its __init__ needs the compiled selective scan).
    return [pip for module, pip in NEEDS.items() if importlib.util.find_spec(module) is None]


def install_shims() -> None:
    """The five shims of the module docstring, then the dispatcher's CPU allowance. Call before importing fla."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from triton.runtime import autotuner, interpreter

    first_config_init = autotuner.Autotuner.__init__

    def init_with_first_config(self, fn, arg_names, configs, *args, **kwargs):
        first_config_init(self, fn, arg_names, configs[:1], *args, **kwargs)

    autotuner.Autotuner.__init__ = init_with_first_config

    def visit_for(self, node):
        self.generic_visit(node)
        if isinstance(node.target, ast.Name):
            name = node.target.id
            node.body.insert(0, ast.parse(f"{name} = interpreter_semantic.to_tensor({name}, False)").body[0])
        return node

    interpreter.ASTTransformer.visit_For = visit_for

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_numpy2(tensor, scope):
        patch_tensor(tensor, scope)
        tensor.__index__ = lambda self: int(self.handle.data.item())

    interpreter._patch_lang_tensor = patch_tensor_numpy2

    import numpy as np
    import triton.language as tl

    dot = interpreter.InterpreterBuilder.create_dot

    def widen(handle):  # bf16 is stored as uint16, the top half of the fp32 pattern
        if handle.dtype != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def dot_bf16_as_fp32(self, a, b, d, *args, **kwargs):
        return dot(self, widen(a), widen(b), d, *args, **kwargs)

    interpreter.InterpreterBuilder.create_dot = dot_bf16_as_fp32

    def bf16_constant(self, value):  # the builder has fp16/fp32/fp64 constants but no bf16 (fla's GLA backward)
        bits = torch.tensor([value], dtype=torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return interpreter.TensorHandle(bits, tl.bfloat16)

    interpreter.InterpreterBuilder.get_bf16 = bf16_constant

    torch.cuda.device = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda *args, **kwargs: types.SimpleNamespace(multi_processor_count=132)
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))

    import groundthink.mixers._common as mixers_common
    import groundthink.ops.conv  # noqa: F401  (the op modules, each holding its own resolve_impl name)
    import groundthink.ops.dispatch as dispatch
    import groundthink.ops.gla  # noqa: F401
    import groundthink.ops.ssd  # noqa: F401
    import groundthink.ops.wkv6  # noqa: F401

    resolve = dispatch.resolve_impl

    def resolve_on_cpu(op, impl, device):
        if impl == "auto" and op in KERNEL_OF:
            return KERNEL_OF[op]
        return impl if impl in ("fla", "mamba_ssm") else resolve(op, impl, device)

    for name in ("dispatch", "conv", "gla", "ssd", "wkv6"):
        sys.modules[f"groundthink.ops.{name}"].resolve_impl = resolve_on_cpu
    mixers_common.resolve_impl = resolve_on_cpu


def _grads(fn, inputs, seed=0):
    import torch

    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out, state = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    loss = (out.float() * torch.randn(out.shape, generator=g)).sum()
    loss = loss + (state.float() * torch.randn(state.shape, generator=g)).sum()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)  # an input a wrapper drops: a zero gradient
    return [out, state, *(torch.zeros_like(x) if d is None else d for x, d in zip(inputs, grads))]


def op_cases(T: int):
    """(label, op, kernel kwargs, torch kwargs, inputs, names): the GPU parity tests' own cases, on the CPU."""
    import torch

    from groundthink.ops import ssd, wkv6
    from groundthink.ops.gla import gla
    from tests.test_gla import NAMES as GLA_NAMES
    from tests.test_gla import _inputs as gla_inputs
    from tests.test_ops_gpu import SSD_NAMES, WKV6_NAMES, ssd_inputs, wkv6_inputs

    yield ("wkv6 vs fla chunk_rwkv6", wkv6, {"impl": "fla"}, {"impl": "chunked"}, wkv6_inputs(T, "cpu"), WKV6_NAMES)
    yield ("ssd vs mamba_ssm SSD", ssd, {"impl": "mamba_ssm", "chunk_size": 64}, {"impl": "chunked"},
           ssd_inputs(T, "cpu"), SSD_NAMES)
    yield ("gla vs fla chunk_gla", gla, {"impl": "fla"}, {"impl": "chunked"},
           gla_inputs(2, T, 4, 64, 64, torch.float32), GLA_NAMES)


def check_ops(seq_lens: list[int], bf16: bool) -> bool:
    from tests._numerics import rel_err

    ok = True
    for T in seq_lens:
        for label, op, kernel, torch_path, inputs, names in op_cases(T):
            start = time.perf_counter()
            actual = _grads(lambda *a, op=op, kw=kernel: op(*a, **kw), inputs)
            expected = _grads(lambda *a, op=op, kw=torch_path: op(*a, **kw), inputs)
            errs = [rel_err(a, e) for a, e in zip(actual, expected)]
            worst = max(errs)
            ok &= worst <= TOLERANCE
            print(f"  {label:30s} T={T:<4d} worst rel err {worst:.1e} ({names[errs.index(worst)]:>14s})  "
                  f"{'ok' if worst <= TOLERANCE else 'FAILED'}  ({time.perf_counter() - start:.0f} s)", flush=True)
            if bf16 and label.split()[0] in BF16_OPS:
                ok &= check_op_bf16(label, op, kernel, torch_path, inputs, names, T)
    return ok


def check_op_bf16(label, op, kernel, torch_path, inputs, names, T) -> bool:
    """The activations (inputs with a time axis) in bf16, as autocast hands them over; both paths against the torch
    op in fp32 on the same rounded inputs. The torch path's own bf16 error is printed beside, for scale."""
    from tests._numerics import rel_err

    start = time.perf_counter()
    rounded = [t.bfloat16() if t.dim() >= 2 and t.shape[1] == T else t for t in inputs]
    truth = _grads(lambda *a: op(*a, **torch_path), [t.float() for t in rounded])
    kernel_errs = [rel_err(a.float(), e) for a, e in zip(_grads(lambda *a: op(*a, **kernel), rounded), truth)]
    torch_errs = [rel_err(a.float(), e) for a, e in zip(_grads(lambda *a: op(*a, **torch_path), rounded), truth)]
    worst = max(kernel_errs)
    i = kernel_errs.index(worst)
    print(f"  {label + ', bf16':30s} T={T:<4d} worst rel err {worst:.1e} ({names[i]:>14s}; the torch op's "
          f"{torch_errs[i]:.1e})  {'ok' if worst <= BF16_TOLERANCE else 'FAILED'}  "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return worst <= BF16_TOLERANCE


def model_step(name: str, T: int, impl: str, bf16: bool):
    """Loss and parameter gradients of one step, off the init (the mixers' zero-initialised output projections
    would otherwise keep them out of the loss), on the same tokens whatever the impl."""
    import torch

    from groundthink.models import HybridLM
    from groundthink.models.presets import preset

    torch.manual_seed(0)
    model = HybridLM(preset(name, vocab_size=512, impl=impl))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    tokens = torch.randint(0, 512, (2, T + 1), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, model.impls(), time.perf_counter() - start


def _distance(step, reference) -> tuple[float, float, float, str]:
    """(|loss difference|, median and worst relative gradient error, the worst parameter's name)."""
    from tests._numerics import rel_err

    errs = sorted(((rel_err(step[1][n], g), n) for n, g in reference[1].items()), reverse=True)
    return abs(step[0] - reference[0]), errs[len(errs) // 2][0], errs[0][0], errs[0][1]


def check_model(name: str, T: int, bf16: bool) -> bool:
    torch_fp32 = model_step(name, T, "chunked", bf16=False)
    kernels_fp32 = model_step(name, T, "auto", bf16=False)
    loss_diff, median, worst, where = _distance(kernels_fp32, torch_fp32)
    ok = worst <= TOLERANCE and loss_diff <= TOLERANCE * abs(torch_fp32[0])
    print(f"  model {name}, one step of 2 x {T} tokens, ops {kernels_fp32[2]} ({kernels_fp32[3]:.0f} s)\n"
          f"    fp32 vs the torch ops: loss {kernels_fp32[0]:.7f} vs {torch_fp32[0]:.7f}; {len(torch_fp32[1])} "
          f"parameter gradients, worst rel err {worst:.1e} ({where}), median {median:.1e}  {'ok' if ok else 'FAILED'}",
          flush=True)
    if not bf16:
        return ok
    # bf16 rounds differently on the two paths; the kernels' bf16 step must be as near the fp32 step as the torch
    # ops' bf16 step is (within 2x by the median gradient error and the loss), not near the torch bf16 step.
    torch_bf16 = _distance(model_step(name, T, "chunked", bf16=True), torch_fp32)
    kernels_bf16 = _distance(model_step(name, T, "auto", bf16=True), torch_fp32)
    bf16_ok = (kernels_bf16[1] <= 2 * torch_bf16[1]
               and kernels_bf16[0] <= max(2 * torch_bf16[0], 1e-4 * abs(torch_fp32[0])))
    for label, (ld, med, wst, whr) in (("torch ops", torch_bf16), ("kernels", kernels_bf16)):
        print(f"    bf16 autocast, {label:9s} vs the fp32 step: loss diff {ld:.1e}, gradients median rel err "
              f"{med:.1e}, worst {wst:.1e} ({whr})", flush=True)
    print(f"    bf16: the kernels' step is {'as near' if bf16_ok else 'NOT as near'} the fp32 step as the torch ops' "
          f"(within 2x)  {'ok' if bf16_ok else 'FAILED'}", flush=True)
    return ok and bf16_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="*", default=[15, 100, 257],
                        help="sequence lengths of the op checks (the GPU tests': 15 100 257); none to skip them")
    parser.add_argument("--model", default="tiny", help="preset of the model step ('none' to skip it)")
    parser.add_argument("--model-seq-len", type=int, default=100)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 checks (ops and model step)")
    args = parser.parse_args(argv)
    if any(T < 1 for T in args.seq_lens) or args.model_seq_len < 1:
        parser.error("sequence lengths must be positive")
    missing = missing_packages()
    if missing:
        print(f"kernel_interpret: needs {', '.join(missing)} installed; `make kernel-interpret` installs them "
              "(triton, fla-core, einops and mamba-ssm's Python part) into build/kernel-interpret and runs this",
              file=sys.stderr)
        return 2
    install_shims()
    # fla says, rightly, that it is not on a GPU; here that is the point.
    warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
    print("Triton kernels interpreted on the CPU (first autotune configuration) vs GroundThink's torch ops; "
          f"tolerance {TOLERANCE:.0e} relative in fp32, {BF16_TOLERANCE:.0e} in bf16", flush=True)
    ok = check_ops(args.seq_lens, bf16=not args.no_bf16)
    if args.model != "none":
        ok &= check_model(args.model, args.model_seq_len, bf16=not args.no_bf16)
    print("kernel_interpret: " + ("all within tolerance" if ok else "FAILED (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
