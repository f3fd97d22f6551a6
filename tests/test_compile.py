"""trainer.compile: regional torch.compile of the blocks, through the real CLI.

The compiled run must train the same model as the eager one (inductor reorders fp32 arithmetic, so the losses agree
to round-off, not bit for bit), recompile only where it has to (once for validation's no-grad mode, not for the
carried state's layout, nor for each new stream position), and write checkpoints an eager model loads
(block.compile() keeps the parameter names)."""

from __future__ import annotations

import pytest

from tests.conftest import read_column, run_dirs, run_train


@pytest.fixture(autouse=True)
def _ops_back_to_plain_calls():
    """compile_blocks switches the whole process to calling the ops between graphs (ops.dispatch, one switch per
    process, as a training run compiles once); put it back so later tests in this worker call the ops as before."""
    from groundthink.ops import dispatch

    before = dict(dispatch._OUTSIDE)
    yield
    dispatch._OUTSIDE.update(before)


@pytest.mark.slow
def test_compiled_run_trains_the_same_model_as_the_eager_run(tmp_path):
    from safetensors import safe_open

    run_train(tmp_path / "eager", "trainer.log_every_n_steps=1")
    compiled = run_train(tmp_path / "compiled", "trainer.log_every_n_steps=1", "trainer.compile=true")
    eager_dir, compiled_dir = run_dirs(tmp_path / "eager")[0], run_dirs(tmp_path / "compiled")[0]

    eager_loss, compiled_loss = read_column(eager_dir), read_column(compiled_dir)
    assert sorted(compiled_loss) == sorted(eager_loss) and len(eager_loss) == 20
    for step, loss in eager_loss.items():
        assert compiled_loss[step] == pytest.approx(loss, rel=2e-4), f"step {step}"
    eager_val, compiled_val = read_column(eager_dir, "val/loss"), read_column(compiled_dir, "val/loss")
    assert eager_val and compiled_val.keys() == eager_val.keys()
    for step, loss in eager_val.items():
        assert compiled_val[step] == pytest.approx(loss, rel=2e-4), f"val step {step}"

    # No recompiles beyond the training graph and validation's no-grad graph (dynamo warns when it hits its limit).
    assert "recompile_limit" not in compiled.stderr and "cache_size_limit" not in compiled.stderr

    def tensor_names(run_dir):
        with safe_open(str(run_dir / "checkpoints" / "last.safetensors"), "pt") as f:
            return set(f.keys())

    assert tensor_names(compiled_dir) == tensor_names(eager_dir)


def _compiled_tiny(backend="eager", trace_ops=False, **changes):
    """A tiny model compiled as trainer.compile does (dynamo's eager backend: the tracing is what is counted, not
    inductor's code) and an uncompiled copy with the same weights."""
    import torch

    from groundthink.models import HybridLM
    from groundthink.models.presets import preset
    from groundthink.training.assembly import compile_blocks

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=32, impl="chunked", **changes)
    model, reference = HybridLM(cfg), HybridLM(cfg)
    reference.load_state_dict(model.state_dict())
    compile_blocks(model, trace_ops=trace_ops, backend=backend)
    return model, reference


@pytest.mark.parametrize(
    "state_norm, trace_ops",
    [(False, False), (True, False), (False, True), pytest.param(True, True, marks=pytest.mark.slow)],
)
def test_a_compiled_block_compiles_once_per_state_norm_phase_not_once_per_step(state_norm, trace_ops, caplog):
    """A block compiled with static shapes (as trainer.compile does) must not trace anew for each stream position,
    where it would hit dynamo's recompile limit and fall back to eager. The blocks get the position reduced to its
    StateNorm phase (HybridLM.position_period), so they trace once per phase; with the ops between the graphs the
    StateNorm scan runs outside them too (mixers/_common.scan_with_state_norm), so its cut points (ints) do not
    multiply the graphs of its inner frames. Both in training and in validation's no-grad mode."""
    import torch
    from torch._dynamo.utils import counters

    model, reference = _compiled_tiny(trace_ops=trace_ops, state_norm=state_norm, state_norm_interval=16)
    assert model.position_period == (16 if state_norm else 1)
    tokens = torch.randint(0, 32, (2, 8 * 12))
    counters.clear()
    for grad in (True, False):
        graphs = []  # graphs traced so far, after each segment
        state = ref_state = None
        with torch.set_grad_enabled(grad):
            for segment in tokens.split(12, dim=1):  # positions 0, 12, 24, ...: 4 phases, twice
                logits, state = model(segment, state)  # carried detached, as in training (truncated BPTT)
                ref_logits, ref_state = reference(segment, ref_state)
                state, ref_state = state.map(torch.Tensor.detach), ref_state.map(torch.Tensor.detach)
                torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
                graphs.append(counters["stats"]["unique_graphs"])
        if state_norm:  # phases 0, 12, 8, 4, then the same four again: nothing new in the second cycle
            assert graphs[0] < graphs[3] == graphs[-1], graphs
        else:  # one set of graphs for every position
            assert graphs[0] == graphs[-1] > 0, graphs
    assert "recompile_limit" not in caplog.text
    torch._dynamo.reset()


def test_the_recurrence_ops_run_between_the_compiled_graphs_unless_compile_ops():
    """trainer.compile calls the ops (groundthink.ops.dispatch.compiler_boundary) outside its graphs, so their chunk
    loops are not unrolled into the compile; trainer.compile_ops traces them into one graph per block. Both give
    the eager model's outputs and gradients."""
    import torch
    from torch._dynamo.utils import counters

    tokens = torch.randint(0, 32, (2, 24))
    for trace_ops in (False, True):
        model, reference = _compiled_tiny(trace_ops=trace_ops)
        counters.clear()
        model(tokens)[0].square().mean().backward()
        reference(tokens)[0].square().mean().backward()
        breaks = sum(n for reason, n in counters["graph_break"].items() if "compiler.disable" in reason)
        if trace_ops:  # the tiny preset's block (RWKV-6 and Mamba-2 in parallel) in one graph
            assert counters["stats"]["unique_graphs"] == 1 and breaks == 0
        else:  # broken at WKV-6, the causal conv and SSD
            assert counters["stats"]["unique_graphs"] > 1 and breaks >= 3
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "wrapper, module, function",
    [("fla_wkv6", "fla.ops.rwkv6", "chunk_rwkv6"), ("fla_gla", "fla.ops.gla", "chunk_gla"),
     ("mamba_ssd", "mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
     ("causal_conv1d_kernel", "causal_conv1d", "causal_conv1d_fn")],
)
def test_the_kernels_run_outside_the_compiled_graphs_even_with_compile_ops(monkeypatch, wrapper, module, function):
    """The CUDA kernels (Triton/CUDA code with their own autograd) are called by dynamo, never traced. A stand-in
    kernel module records whether it ran inside dynamo's tracing."""
    import sys
    import types

    import torch

    from groundthink.ops import kernels
    from groundthink.ops.dispatch import trace_ops_when_compiling

    seen = []

    def kernel(x, *args, **kwargs):
        seen.append(torch.compiler.is_compiling())
        return x if function == "causal_conv1d_fn" else (x, x.new_zeros(1))

    fake = types.ModuleType(module)
    setattr(fake, function, kernel)
    monkeypatch.setitem(sys.modules, module, fake)
    x = torch.ones(1, 4, 1, 2)
    args = {"causal_conv1d_kernel": (x[0], torch.ones(2, 3), None, torch.zeros(1, 2, 2))}.get(wrapper, (x,) * 5)
    torch._dynamo.reset()
    trace_ops_when_compiling(True)  # the fixture puts the switch back
    try:
        torch.compile(lambda *a: getattr(kernels, wrapper)(*a), backend="eager")(*args)
    finally:
        torch._dynamo.reset()
    assert seen == [False]


def test_compile_refuses_rope_attention_which_reads_the_exact_position():
    from groundthink.models import HybridLM
    from groundthink.models.presets import preset
    from groundthink.training.assembly import compile_blocks

    cfg = preset("tiny", vocab_size=32, impl="chunked", pattern="A", mixers={"attention": {"rope_base": 10000.0}})
    model = HybridLM(cfg)
    assert model.position_period is None
    with pytest.raises(ValueError, match=r"trainer.compile=true does not work with RoPE.*rope_base=null"):
        compile_blocks(model)
