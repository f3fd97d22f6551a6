"""Training-step throughput against the machine's GEMM peak, where the step's time goes, and Mamba-2 against
Hugging Face transformers. Everything is measured in one run, on CPU, with one thread count.

    python -m benchmarks.bench_train                        # presets small, 8m, 30m; B=8, T=256
    python -m benchmarks.bench_train --quick                # preset small, B=2, T=64, one repeat
    python -m benchmarks.bench_train --presets 8m --pattern M --threads 2

What is measured, and how:

1. GEMM peak. Best-of-N `torch.matmul` GFLOP/s (2·M·K·N flops per product) at square and model-like shapes
   ([M x K] @ [K x N]: 1024³, 2048³ and [2048 x 256] @ [256 x 1024]) in fp32 and in bf16 (bf16 tensors, not
   autocast); the peak of a dtype is its best shape. The thread count is the one the steps run with
   (`--threads`; default: torch's current count).
2. Training-step tokens/s: forward + cross-entropy + backward + AdamW step of a HybridLM preset (vocab 264, impl
   chunked, `--pattern` replacing the preset's pattern), in fp32 and under bf16 autocast
   (benchmarks.bench_models.make_train_step), best of a few repeats after one warm-up.
3. Fraction of peak = 6 · N_non_embedding · tokens/s ÷ peak FLOP/s of the step's dtype (fp32 step vs the fp32
   peak, bf16 step vs the bf16 peak). N_non_embedding = all parameters minus the token embedding and the LM head
   (counted once when they are tied). 6·N per token counts the dense matmuls of forward and backward only, not
   the recurrences, so this is the usual "model FLOPs utilisation" convention, not a count of every flop.
4. Split of one step into matmul / recurrence ops / other, from torch.profiler (CPU activity). The step is
   profiled on its own after the timing runs (max(repeats, 3) profiled runs, the fastest kept); the profiled
   step time is its wall time under the profiler. Then:
   - model matmul = the self CPU time (an event's time minus its children's) of the step's matmul-family events:
     aten::mm, bmm, addmm, baddbmm, addbmm, mv, addmv, dot, matmul, linear, and any mkldnn matmul/linear event
     (MATMUL_EVENTS, is_matmul_event).
   - recurrence = the recurrence ops (groundthink.ops: wkv6, ssd, causal_conv1d, and gla where a layer uses it)
     timed in isolation. One forward of the model, under the step's autocast setting, is run with those functions
     wrapped wherever a groundthink module holds them, capturing what each layer passes: the exact tensors
     (detached copies, so shapes, dtypes, requires_grad and value ranges are the model's own), the keyword
     arguments (impl, chunk size), and how many layers make an identical call. Each distinct call is then
     replayed, forward under the same autocast setting + backward of its output against a random cotangent (the
     final state is not part of a training step's loss, so it gets no gradient there either): one warm-up, then
     profiled like the step (fastest of max(repeats, 3)), and its profiled wall time is multiplied by the
     number of layers making it.
   - matmul = model matmul − the replayed ops' own matmul self time (from their profiles, times the layer
     counts), so that matmul done inside the recurrences is counted once, under recurrence.
   - other = profiled step time − matmul − recurrence: elementwise work, norms, copies, the embedding, the loss,
     AdamW, autograd bookkeeping and the profiler's per-event cost.
   Both the step and the ops run under the profiler, so its overhead inflates both alike; the percentages are of
   the profiled step time, printed next to the unprofiled best step time. The three parts sum to the step by
   construction; on a busy machine a part can come out negative (the step and the replays are separate samples).
5. Mamba-2 against transformers' Mamba2 (skipped with a one-line message when transformers is missing). Without
   mamba_ssm / causal_conv1d / hub kernels, transformers' kernel entry points resolve to their pure-PyTorch
   functions; which path ran is checked (hf_mamba2_path) and printed.
   a. Mixer, fwd + bwd of y.square().mean() (output only, as neither carries its state into a training loss):
      GroundThink's Mamba2 (chunked SSD) vs transformers' Mamba2Mixer at d_model 256, expand 2, head_dim 64
      (8 heads), N 64, 1 group, conv 4, each with its default chunk size, fp32, parameters perturbed by N(0,
      0.02²) so nothing short-cuts.
   b. Whole model, training step (fwd + CE + bwd + AdamW): GroundThink HybridLM with pattern "M" at a preset
      (default 8m) vs Mamba2ForCausalLM with the same d_model, depth, vocab, expand, head_dim and state size.
      GroundThink's blocks carry an FFN (and a second norm) and transformers' do not, so both
      parameter counts are printed.
   With `--pattern M` each preset's step is also compared with Mamba2ForCausalLM of the same shape, in both
   precisions.
   Each comparison times the two steps taking turns, after a warm-up of each (2·repeats + 1 pairs for the
   models, 6·repeats + 1 for the mixers; bench_models.taking_turns): tokens/s from each side's median time, the
   ratio GroundThink / HF as the median of the per-pair ratios. Timed one after the other, the two could each
   land in a different phase of a shared machine's drifting speed (ratios measured that way moved from 1.9x to
   2.6x between runs an hour apart).

Not a test: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_models import (
    best_time,
    hybrid_lm_train_step,
    make_train_step,
    paired_speedup,
    perturb_parameters,
    preset_model,
    taking_turns,
)
from groundthink.mixers import MIXERS
from groundthink.mixers.base import SequenceMixer
from groundthink.models import HybridLM, ModelConfig
from groundthink.training.host_memory import keep_freed_memory

PRESETS = ("small", "8m", "30m")
QUICK_PRESETS = ("small",)
PRECISIONS = ("fp32", "bf16")
GEMM_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (2048, 256, 1024))  # (M, K, N): [M x K] @ [K x N]
QUICK_GEMM_SHAPES = ((512, 512, 512), (1024, 1024, 1024), (2048, 256, 1024))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROFILE_REPEATS = 3  # default of the profiled runs of the step and of each op replay (the fastest kept)
MATMUL_EVENTS = frozenset({
    "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::mv", "aten::addmv",
    "aten::dot", "aten::matmul", "aten::linear", "aten::_addmm_activation",
})
# The recurrences of groundthink.ops, by the names the mixers list in their `ops`: (module, function name).
RECURRENCE_OPS = {
    "wkv6": ("groundthink.ops", "wkv6"),
    "ssd": ("groundthink.ops", "ssd"),
    "conv": ("groundthink.ops", "causal_conv1d"),
    "gla": ("groundthink.ops.gla", "gla"),
}
# The mixer comparison's shape (5a).
MIXER_SHAPE = dict(d_model=256, expand=2, head_dim=64, d_state=64, n_groups=1, d_conv=4)
# transformers' kernel entry points in modeling_mamba2, each resolved at import to a kernel or its torch function.
HF_KERNEL_HOOKS = ("causal_conv1d_fn", "mamba2_split_conv1d_scan_combined", "mamba2_chunk_scan")


# ----- 1. GEMM peak ---------------------------------------------------------------------------------------------
def matmul_gflops(M: int, K: int, N: int, dtype: torch.dtype, repeats: int) -> float:
    """Best-of-`repeats` GFLOP/s of torch.matmul([M x K], [K x N]) after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(K, N, generator=g).to(dtype)
    return 2 * M * K * N / best_time(lambda: torch.matmul(a, b), repeats) / 1e9


def gemm_peak(shapes, repeats: int) -> dict:
    """{"fp32": {"shapes": {"MxKxN": GFLOP/s}, "peak": max}, "bf16": {...}}."""
    out = {}
    for precision, dtype in DTYPES.items():
        per_shape = {f"{M}x{K}x{N}": matmul_gflops(M, K, N, dtype, repeats) for M, K, N in shapes}
        out[precision] = {"shapes": per_shape, "peak": max(per_shape.values())}
    return out


# ----- 2./3. step throughput and parameter counts ---------------------------------------------------------------
def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied weight once


def non_embedding_params(model: torch.nn.Module, embedding: torch.Tensor, head: torch.Tensor) -> int:
    """Parameters outside the token embedding and the LM head (the head once more only when it is not tied)."""
    n = count_params(model) - embedding.numel()
    return n if head is embedding else n - head.numel()


def hybrid_lm_non_embedding(model: HybridLM) -> int:
    return non_embedding_params(model, model.embed.weight, model.head.weight)


def fraction_of_peak(n_non_embedding: int, tokens_per_s: float, peak_gflops: float) -> float:
    return 6 * n_non_embedding * tokens_per_s / (peak_gflops * 1e9)


# ----- 4. where the step's time goes ----------------------------------------------------------------------------
@dataclass
class OpCall:
    """One distinct recurrence-op call of a forward: the op, its captured inputs, and how many layers make it."""

    name: str
    fn: Callable
    args: tuple
    kwargs: dict
    count: int = 1

    def label(self) -> str:
        shape = next((tuple(a.shape) for a in self.args if isinstance(a, torch.Tensor)), ())
        dtype = next((a.dtype for a in self.args if isinstance(a, torch.Tensor)), None)
        return f"{self.name} {list(shape)} {str(dtype).removeprefix('torch.')}"


def _recurrence_functions() -> dict[str, Callable]:
    import importlib

    found = {}
    for name, (module, attr) in RECURRENCE_OPS.items():
        with contextlib.suppress(ImportError, AttributeError):
            found[name] = getattr(importlib.import_module(module), attr)
    return found


def _detached_copy(value):
    """A tensor's values in a fresh storage laid out as the original's (same strides and offset, so a strided view
    such as a slice of a projection stays one), as a leaf with the original's requires_grad; other values as is."""
    if not isinstance(value, torch.Tensor):
        return value
    storage = torch.empty(value.untyped_storage().nbytes() // value.element_size(), dtype=value.dtype)
    copy = storage.as_strided(value.shape, value.stride(), value.storage_offset())
    with torch.no_grad():
        copy.copy_(value)
    return copy.requires_grad_(value.requires_grad) if copy.is_floating_point() else copy


def _call_key(name: str, args: tuple, kwargs: dict) -> tuple:
    def describe(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, v.requires_grad)
        return ("value", repr(v))

    return (name, tuple(describe(a) for a in args), tuple((k, describe(v)) for k, v in sorted(kwargs.items())))


@contextlib.contextmanager
def recording_recurrence_calls(calls: dict[tuple, OpCall]):
    """Wrap the recurrence functions wherever a groundthink module holds them, recording each top-level call into
    `calls` (keyed by op, shapes, dtypes and arguments; identical calls of several layers are counted)."""
    functions = _recurrence_functions()
    depth = [0]

    def recorder(name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            if depth[0] == 0:
                key = _call_key(name, args, kwargs)
                if key in calls:
                    calls[key].count += 1
                else:
                    calls[key] = OpCall(name, fn, tuple(map(_detached_copy, args)),
                                        {k: _detached_copy(v) for k, v in kwargs.items()})
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapped

    originals = {id(fn): fn for fn in functions.values()}
    wrappers = {id(fn): recorder(name, fn) for name, fn in functions.items()}
    patched = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "groundthink" or module_name.startswith("groundthink.")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in originals and originals[id(value)] is value:  # (a module attribute may be None)
                setattr(module, attr, wrappers[id(value)])
                patched.append((module, attr, value))
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)


def capture_op_calls(model: HybridLM, inputs: torch.Tensor, precision: str) -> list[OpCall]:
    """The distinct recurrence-op calls of one forward of `model` (grad enabled, same autocast as the step)."""
    calls: dict[tuple, OpCall] = {}
    with recording_recurrence_calls(calls), torch.autocast("cpu", dtype=torch.bfloat16,
                                                           enabled=precision == "bf16"):
        model(inputs)
    used = {op for m in model.modules() if isinstance(m, SequenceMixer) for op in m.ops if op in RECURRENCE_OPS}
    missing = used - {c.name for c in calls.values()}
    if missing:
        raise RuntimeError(f"the model's mixers list the ops {sorted(missing)} but no call to them was seen; do the "
                           f"mixers still call the functions named in RECURRENCE_OPS?")
    return list(calls.values())


def op_replay(call: OpCall, precision: str) -> Callable[[], None]:
    """Forward + backward of one captured call, as a closure (fresh gradients each time)."""
    leaves = [v for v in (*call.args, *call.kwargs.values()) if isinstance(v, torch.Tensor) and v.requires_grad]
    cotangent: list[torch.Tensor] = []

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = call.fn(*call.args, **call.kwargs)
        y = out[0] if isinstance(out, (tuple, list)) else out
        if y.requires_grad:
            if not cotangent:
                cotangent.append(torch.randn_like(y))
            y.backward(cotangent[0])
        for t in leaves:
            t.grad = None

    return run


def is_matmul_event(name: str) -> bool:
    return name in MATMUL_EVENTS or ("mkldnn" in name and any(w in name for w in ("matmul", "linear", "mm")))


# What Kineto (the profiler's C++ side) writes to file descriptor 2 at every start and stop of a profile, at any
# KINETO_LOG_LEVEL: `USDT:<date> <time> <pid>:<tid> SyncActivityProfilerHandler.cpp:52] profiler_start` (and
# `STAGE:... Completed Stage: Warm Up` at lower levels). A report profiles dozens of times.
KINETO_NOTICE = re.compile(r"^(USDT|STAGE):\S+ \S+ \d+:\d+ \w+\.cpp:\d+\] ")


@contextlib.contextmanager
def kineto_notices_dropped():
    """Hold back Kineto's start/stop notices (KINETO_NOTICE) written to fd 2 inside the block; every other line
    written there (a warning, an error) is written back to fd 2 when the block ends, in order."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True)
                    if not KINETO_NOTICE.match(line.decode(errors="replace"))]
            if kept:
                os.write(2, b"".join(kept))


def profile_once(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall ms, matmul self-CPU ms) of one call of `fn` under torch.profiler (its start/stop notices dropped)."""
    with kineto_notices_dropped(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    matmul_us = sum(e.self_cpu_time_total for e in prof.key_averages() if is_matmul_event(e.key))
    return wall * 1e3, matmul_us / 1e3


def profile_best(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """profile_once of the fastest of `repeats` profiled calls (each profiled on its own)."""
    return min((profile_once(fn) for _ in range(max(1, repeats))), key=lambda wall_matmul: wall_matmul[0])


def step_split(step: Callable[[], None], calls: list[OpCall], precision: str, repeats: int = 1) -> dict:
    """Profiled step time split into matmul (outside the recurrences) / recurrence ops / other (module docstring).
    `step` is already warm; each op replay is warmed up once; each profile is the fastest of `repeats`."""
    step_ms, model_matmul_ms = profile_best(step, repeats)
    ops, recurrence_ms, ops_matmul_ms = {}, 0.0, 0.0
    for call in calls:
        run = op_replay(call, precision)
        run()  # warm-up
        ms, matmul_ms = profile_best(run, repeats)
        ops[call.label()] = {"count": call.count, "ms": ms, "matmul_ms": matmul_ms}
        recurrence_ms += call.count * ms
        ops_matmul_ms += call.count * matmul_ms
    matmul = model_matmul_ms - ops_matmul_ms
    other = step_ms - matmul - recurrence_ms
    parts = {"matmul": matmul, "recurrence": recurrence_ms, "other": other}
    return {
        "step_ms": step_ms, "model_matmul_ms": model_matmul_ms, "ops_matmul_ms": ops_matmul_ms,
        **{f"{k}_ms": v for k, v in parts.items()},
        **{f"{k}_pct": 100 * v / step_ms for k, v in parts.items()},
        "ops": ops,
    }


# ----- 5. transformers' Mamba2 ----------------------------------------------------------------------------------
def hf_mamba2_modules():
    """(transformers, modeling_mamba2) or None when transformers (or its Mamba2) cannot be imported."""
    try:
        import transformers
        from transformers.models.mamba2 import modeling_mamba2
    except ImportError:
        return None
    return transformers, modeling_mamba2


@contextlib.contextmanager
def quiet_transformers():
    """transformers' log at error level (its once-per-function "falling back to PyTorch" warnings are replaced by
    hf_mamba2_path's line)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _closure_cells(fn) -> dict:
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    return {} if code is None or closure is None else dict(zip(code.co_freevars, closure))


def _resolved_to_kernel(fn) -> bool | None:
    """Whether a use_kernel_func_from_hub_with_fallback wrapper resolved to a kernel (None: cannot tell)."""
    if getattr(fn, "__code__", None) is None:  # transformers >= 5.25: a `kernels` Func module around the wrapper
        func = _closure_cells(getattr(type(fn), "forward", None)).get("func")
        fn = None if func is None else func.cell_contents
    cell = _closure_cells(fn).get("is_new_implementation")
    return None if cell is None else bool(cell.cell_contents)


def hf_mamba2_path(modeling, mixer: torch.nn.Module, x: torch.Tensor) -> dict:
    """Which code path transformers' Mamba2Mixer takes here: a static check of how its kernel entry points
    resolved (or, in transformers < 5, `is_fast_path_available`), and one forward of `mixer` counting calls of the
    un-fused chunk scan, which runs only when the fused kernel did not."""
    if hasattr(modeling, "is_fast_path_available"):
        fast = bool(modeling.is_fast_path_available) and x.device.type == "cuda"
        return {"path": "cuda_kernels_forward" if fast else "torch_forward",
                "detail": f"is_fast_path_available={modeling.is_fast_path_available}, device {x.device.type}"}
    resolved = {name: _resolved_to_kernel(getattr(modeling, name, None)) for name in HF_KERNEL_HOOKS}
    chunk_scan = modeling.mamba2_chunk_scan
    calls = [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return chunk_scan(*args, **kwargs)

    modeling.mamba2_chunk_scan = counting
    try:
        with torch.no_grad():
            mixer(x)
    finally:
        modeling.mamba2_chunk_scan = chunk_scan
    torch_only = all(v is False for v in resolved.values()) and calls[0] > 0
    unknown = [n for n, v in resolved.items() if v is None]
    kernels = [n for n, v in resolved.items() if v]
    if torch_only:
        path = "pure PyTorch"
        detail = (f"{', '.join(HF_KERNEL_HOOKS)} resolved to their torch functions; the un-fused chunk scan ran "
                  f"({calls[0]} call in one mixer forward)")
    else:
        path = "kernel" if kernels else "unknown"
        detail = f"kernels: {kernels or 'none'}; undetermined: {unknown or 'none'}; chunk-scan calls: {calls[0]}"
    return {"path": path, "detail": detail, "resolved": resolved, "chunk_scan_calls": calls[0]}


def ssd_default_chunk_size() -> int | None:
    """The chunked SSD's default chunk length (what a Mamba2 with chunk_size None uses)."""
    import importlib

    return getattr(importlib.import_module("groundthink.ops.ssd"), "DEFAULT_CHUNK_SIZE", None)


def hf_mamba2_config(*, d_model: int, n_layers: int, vocab_size: int, expand: int, head_dim: int, d_state: int,
                     n_groups: int, d_conv: int, tie_embeddings: bool = False):
    from transformers import Mamba2Config

    return Mamba2Config(hidden_size=d_model, num_hidden_layers=n_layers, vocab_size=vocab_size, expand=expand,
                        head_dim=head_dim, num_heads=expand * d_model // head_dim, state_size=d_state,
                        n_groups=n_groups, conv_kernel=d_conv, tie_word_embeddings=tie_embeddings, use_cache=False)


def hf_config_like(cfg: ModelConfig):
    """transformers' Mamba2Config with a GroundThink config's width, depth, vocab and Mamba-2 settings."""
    m = cfg.mixers["mamba2"]
    return hf_mamba2_config(d_model=cfg.d_model, n_layers=cfg.n_layers, vocab_size=cfg.vocab_size,
                            expand=m.expand, head_dim=m.head_dim, d_state=m.d_state, n_groups=m.n_groups,
                            d_conv=m.d_conv, tie_embeddings=cfg.tie_embeddings)


def mixer_fwd_bwd(mixer: torch.nn.Module, B: int, T: int, d_model: int) -> Callable[[], None]:
    x = torch.randn(B, T, d_model, requires_grad=True)

    def step():
        out = mixer(x)
        y = out[0] if isinstance(out, tuple) else out
        y.square().mean().backward()
        mixer.zero_grad(set_to_none=True)
        x.grad = None

    return step


def side_by_side(ours: Callable[[], None], theirs: Callable[[], None], tokens: int, pairs: int) -> dict:
    """Our step and the peer's taking turns for `pairs` pairs: tokens/s of each from its median time, and the
    ratio ours/theirs as the median of the per-pair ratios."""
    paired = paired_speedup(taking_turns(ours, theirs, pairs))
    return {"ours_tps": tokens / paired["a_s"], "theirs_tps": tokens / paired["b_s"], "ratio": paired["ratio"],
            "pairs": paired["pairs"]}


def compare_mixers(modeling, B: int, T: int, repeats: int) -> dict:
    """5a: GroundThink's Mamba2 vs transformers' Mamba2Mixer, fwd + bwd, fp32, MIXER_SHAPE."""
    s = MIXER_SHAPE
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({
        "d_model": s["d_model"], "n_layers": 2, "impl": "chunked", "pattern": "M",
        "mixers": {"mamba2": {k: s[k] for k in ("expand", "head_dim", "d_state", "n_groups", "d_conv")}},
    })
    ours = MIXERS["mamba2"].from_config(cfg, layer_id=1, device="cpu")
    perturb_parameters(ours)
    torch.manual_seed(0)
    hf_cfg = hf_mamba2_config(n_layers=1, vocab_size=264, **s)
    theirs = modeling.Mamba2Mixer(hf_cfg, layer_idx=0)
    perturb_parameters(theirs)
    path = hf_mamba2_path(modeling, theirs, torch.randn(1, min(T, 16), s["d_model"]))
    # A mixer step is short (0.1-0.3 s at B=8, T=256): three times the pairs of the model comparison.
    paired = side_by_side(mixer_fwd_bwd(ours, B, T, s["d_model"]), mixer_fwd_bwd(theirs, B, T, s["d_model"]),
                          B * T, 6 * repeats + 1)
    return {
        "groundthink": {"tokens_per_s": paired["ours_tps"], "params": count_params(ours),
                        "chunk_size": ours.chunk_size or ssd_default_chunk_size()},
        "hf": {"tokens_per_s": paired["theirs_tps"], "params": count_params(theirs), "chunk_size": hf_cfg.chunk_size},
        "ratio": paired["ratio"], "pairs": paired["pairs"], "path": path, "B": B, "T": T, "shape": dict(s),
    }


def hf_lm_train_step(hf_model: torch.nn.Module, B: int, T: int, precision: str) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-3, weight_decay=0.1)
    ids = torch.randint(0, hf_model.config.vocab_size, (B, T + 1))
    return make_train_step(lambda inputs: hf_model(input_ids=inputs, use_cache=False).logits, optimizer, ids,
                           precision)


def build_hf_lm(modeling, cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return modeling.Mamba2ForCausalLM(hf_config_like(cfg)).train()


def compare_models(modeling, preset: str, B: int, T: int, repeats: int, precision: str = "fp32") -> dict:
    """5b: GroundThink HybridLM with pattern M vs Mamba2ForCausalLM of the same shape, one training step."""
    ours = preset_model(preset, pattern="M")
    theirs = build_hf_lm(modeling, ours.cfg)
    step, _ = hybrid_lm_train_step(ours, B, T, precision)
    paired = side_by_side(step, hf_lm_train_step(theirs, B, T, precision), B * T, 2 * repeats + 1)
    cfg = ours.cfg
    return {
        "preset": preset, "precision": precision, "B": B, "T": T,
        "shape": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size},
        "groundthink": {"tokens_per_s": paired["ours_tps"], "params": count_params(ours),
                        "non_embedding": hybrid_lm_non_embedding(ours)},
        "hf": {"tokens_per_s": paired["theirs_tps"], "params": count_params(theirs),
               "non_embedding": non_embedding_params(theirs, theirs.backbone.embeddings.weight,
                                                     theirs.lm_head.weight)},
        "ratio": paired["ratio"], "pairs": paired["pairs"],
    }


# ----- the report -----------------------------------------------------------------------------------------------
def bench_preset(preset: str, pattern: str | None, B: int, T: int, repeats: int, peaks: dict, hf_modeling,
                 profile_repeats: int = PROFILE_REPEATS) -> dict:
    """Steps of one preset in both precisions: tokens/s, fraction of peak, the profiled split, and (pattern M with
    transformers available) the same step of Mamba2ForCausalLM."""
    changes = {"pattern": pattern} if pattern else {}
    model = preset_model(preset, **changes)
    out = {"n_params": model.num_params(), "n_non_embedding": hybrid_lm_non_embedding(model),
           "pattern": model.cfg.pattern}
    hf_model = build_hf_lm(hf_modeling, model.cfg) if hf_modeling is not None and pattern == "M" else None
    for precision in PRECISIONS:
        step, ids = hybrid_lm_train_step(model, B, T, precision)
        tps = B * T / best_time(step, repeats)
        res = {"tokens_per_s": tps,
               "fraction_of_peak": fraction_of_peak(out["n_non_embedding"], tps, peaks[precision]["peak"])}
        calls = capture_op_calls(model, ids[:, :-1], precision)
        res["split"] = step_split(step, calls, precision, max(repeats, profile_repeats))
        if hf_model is not None:
            paired = side_by_side(step, hf_lm_train_step(hf_model, B, T, precision), B * T, 2 * repeats + 1)
            res["hf_tokens_per_s"], res["ratio_vs_hf"] = paired["theirs_tps"], paired["ratio"]
        out[precision] = res
    return out


def _print_gemm(gemm: dict, repeats: int) -> None:
    print(f"GEMM, torch.matmul [M x K] @ [K x N], {torch.get_num_threads()} threads, best of {repeats} (GFLOP/s)")
    print(f"  {'M x K x N':<18} {'fp32':>9} {'bf16':>9}")
    for shape in gemm["fp32"]["shapes"]:
        print(f"  {shape:<18} {gemm['fp32']['shapes'][shape]:>9.1f} {gemm['bf16']['shapes'][shape]:>9.1f}")
    print(f"  {'peak':<18} {gemm['fp32']['peak']:>9.1f} {gemm['bf16']['peak']:>9.1f}")


def _print_presets(presets: dict, B: int, T: int, pattern: str | None, kept: bool) -> None:
    with_hf = any("hf_tokens_per_s" in r[p] for r in presets.values() for p in PRECISIONS)
    print(f"\ntraining step (fwd + CE + bwd + AdamW), B={B} T={T}, vocab 264, impl chunked, "
          f"pattern {pattern or 'of the preset'}, {torch.get_num_threads()} threads, "
          f"freed memory {'kept' if kept else 'given back (malloc defaults)'}")
    print("  fraction = 6 · N_non_embedding · tokens/s / GEMM peak of the step's dtype")
    head = f"  {'preset':<7} {'pattern':<7} {'N':>11} {'N_non_emb':>11} {'prec':<5} {'ktok/s':>8} {'of peak':>8}"
    print(head + (f" {'HF ktok/s':>10} {'GT/HF':>6}" if with_hf else ""))
    for name, r in presets.items():
        for precision in PRECISIONS:
            p = r[precision]
            line = (f"  {name:<7} {r['pattern']:<7} {r['n_params']:>11,} {r['n_non_embedding']:>11,} "
                    f"{precision:<5} {p['tokens_per_s'] / 1e3:>8.2f} {p['fraction_of_peak']:>8.1%}")
            if "hf_tokens_per_s" in p:
                line += f" {p['hf_tokens_per_s'] / 1e3:>10.2f} {p['ratio_vs_hf']:>5.2f}x"
            print(line)
    print("\nstep-time split (torch.profiler, one step; recurrence = the layers' op calls replayed alone, fwd+bwd;"
          "\n  matmul = the step's matmul kernels minus those inside the replayed ops; other = the rest)")
    print(f"  {'preset':<7} {'prec':<5} {'step ms':>8} {'(unprof.)':>9} {'matmul':>16} {'recurrence':>16} "
          f"{'other':>16}")
    for name, r in presets.items():
        for precision in PRECISIONS:
            s = r[precision]["split"]
            cells = [f"{s[k + '_ms']:8.1f} {s[k + '_pct']:5.1f}%" for k in ("matmul", "recurrence", "other")]
            unprofiled = B * T / r[precision]["tokens_per_s"] * 1e3
            print(f"  {name:<7} {precision:<5} {s['step_ms']:>8.1f} {unprofiled:>9.1f} "
                  + " ".join(f"{c:>16}" for c in cells))
    print("  replayed op calls (layers x profiled ms each, of which matmul):")
    for name, r in presets.items():
        for precision in PRECISIONS:
            calls = [f"{label} {op['count']} x {op['ms']:.2f} ms ({op['matmul_ms']:.2f})"
                     for label, op in r[precision]["split"]["ops"].items()]
            print(f"  {name:<7} {precision:<5} " + "; ".join(calls))


def _print_hf(hf: dict) -> None:
    mixer, model = hf["mixer"], hf["model"]
    print(f"\nMamba-2 vs Hugging Face transformers {hf['version']}: path {mixer['path']['path']} "
          f"({mixer['path']['detail']})")
    s = mixer["shape"]
    print(f"  mixer fwd+bwd, fp32, d_model {s['d_model']}, expand {s['expand']}, head_dim {s['head_dim']} "
          f"({s['expand'] * s['d_model'] // s['head_dim']} heads), N {s['d_state']}, groups {s['n_groups']}, "
          f"conv {s['d_conv']}, B={mixer['B']} T={mixer['T']}")
    for who, label in (("groundthink", "GroundThink Mamba2"), ("hf", "HF Mamba2Mixer")):
        r = mixer[who]
        print(f"    {label:<22} {r['params']:>11,} params {r['tokens_per_s'] / 1e3:>9.2f} ktok/s   "
              f"(chunk size {r['chunk_size']})")
    print(f"    GroundThink / HF: {mixer['ratio']:.2f}x (median of {mixer['pairs']} pairs of steps taking turns)")
    sh = model["shape"]
    print(f"  training step (fwd + CE + bwd + AdamW), {model['precision']}, preset {model['preset']} pattern M "
          f"({sh['n_layers']} x {sh['d_model']}, vocab {sh['vocab_size']}), B={model['B']} T={model['T']}")
    for who, label in (("groundthink", "GroundThink HybridLM"), ("hf", "HF Mamba2ForCausalLM")):
        r = model[who]
        print(f"    {label:<22} {r['params']:>11,} params ({r['non_embedding']:,} non-embedding) "
              f"{r['tokens_per_s'] / 1e3:>9.2f} ktok/s")
    print(f"    GroundThink / HF: {model['ratio']:.2f}x (median of {model['pairs']} pairs)   "
          "(GroundThink's blocks also carry an FFN; HF's do not)")


def main(quick: bool = False, presets=None, pattern: str | None = None, threads: int | None = None,
         batch_size: int | None = None, seq_len: int | None = None, repeats: int | None = None,
         hf_preset: str | None = None, gemm_shapes=None, gemm_repeats: int | None = None, hf: bool = True,
         profile_repeats: int = PROFILE_REPEATS, keep_memory: bool = True) -> dict:
    """Print the report and return its numbers (see the module docstring; `quick`: small shapes, one preset, one
    repeat; each keyword overrides what `quick` chose; `keep_memory`: glibc's malloc keeps freed memory, as in a
    training run with trainer.keep_freed_memory, its default)."""
    if threads:
        torch.set_num_threads(threads)
    kept = keep_memory and keep_freed_memory()
    presets = tuple(presets or (QUICK_PRESETS if quick else PRESETS))
    B = batch_size or (2 if quick else 8)
    T = seq_len or (64 if quick else 256)
    repeats = repeats or (1 if quick else 3)
    gemm_shapes = tuple(gemm_shapes or (QUICK_GEMM_SHAPES if quick else GEMM_SHAPES))
    gemm_repeats = gemm_repeats or (2 if quick else 5)
    hf_preset = hf_preset or ("small" if quick else "8m")
    results: dict = {"threads": torch.get_num_threads(), "B": B, "T": T, "pattern": pattern, "repeats": repeats,
                     "keep_freed_memory": kept}

    results["gemm"] = gemm_peak(gemm_shapes, gemm_repeats)
    _print_gemm(results["gemm"], gemm_repeats)

    modules = hf_mamba2_modules() if hf else None
    hf_modeling = modules[1] if modules else None
    with quiet_transformers() if hf_modeling is not None else contextlib.nullcontext():
        results["presets"] = {name: bench_preset(name, pattern, B, T, repeats, results["gemm"], hf_modeling,
                                                 profile_repeats) for name in presets}
        _print_presets(results["presets"], B, T, pattern, kept)
        if hf_modeling is None:
            results["hf"] = None
            reason = "turned off" if not hf else "transformers is not importable"
            print(f"\nMamba-2 vs Hugging Face transformers: skipped ({reason})")
        else:
            results["hf"] = {"version": modules[0].__version__,
                             "mixer": compare_mixers(hf_modeling, B, T, repeats),
                             "model": compare_models(hf_modeling, hf_preset, B, T, repeats)}
            _print_hf(results["hf"])
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes, preset small, one repeat")
    parser.add_argument("--presets", type=lambda s: [p for p in s.split(",") if p],
                        help=f"comma-separated presets (default {','.join(PRESETS)}; quick: {QUICK_PRESETS[0]})")
    parser.add_argument("--pattern", help="layer pattern replacing the presets' own (M = Mamba-2 only: also times "
                                          "transformers' Mamba2ForCausalLM at each preset)")
    parser.add_argument("--threads", type=int, help="torch threads for the GEMMs and the steps (default: current)")
    parser.add_argument("--batch-size", type=int, help="B (default 8; quick 2)")
    parser.add_argument("--seq-len", type=int, help="T (default 256; quick 64)")
    parser.add_argument("--repeats", type=int, help="timed repeats after the warm-up (default 3; quick 1)")
    parser.add_argument("--hf-preset", help="preset of the whole-model transformers comparison (default 8m; quick "
                                            "small)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's malloc at its defaults (training runs keep freed memory for reuse: "
                             "trainer.keep_freed_memory)")


def main_from_args(args: argparse.Namespace) -> dict:
    return main(quick=args.quick, presets=args.presets, pattern=args.pattern, threads=args.threads,
                batch_size=args.batch_size, seq_len=args.seq_len, repeats=args.repeats, hf_preset=args.hf_preset,
                hf=not args.no_hf, keep_memory=not args.malloc_default)


if __name__ == "__main__":
    main_from_args(parse_args())
