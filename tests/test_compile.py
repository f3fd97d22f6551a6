"""trainer.compile: regional torch.compile of the blocks, through the real CLI.

The compiled run must train the same model as the eager one (inductor reorders fp32 arithmetic, so the losses agree
to round-off, not bit for bit), recompile only where it has to (once for validation's no-grad mode, not for the
carried state's layout, nor for each new stream position), and write checkpoints an eager model loads
(block.compile() keeps the parameter names)."""

from __future__ import annotations

import pytest

from tests.conftest import read_column, run_dirs, run_train


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


@pytest.mark.parametrize("state_norm", [False, True])
def test_a_compiled_block_compiles_once_per_state_norm_phase_not_once_per_step(state_norm):
    """The blocks get the stream position reduced to what they read (HybridLM.position_period): nothing without
    StateNorm, its phase (position mod interval) with it. A block compiled with static shapes (as trainer.compile
    does) then traces once per phase instead of once per step, where it would hit dynamo's recompile limit and
    fall back to eager. Dynamo's eager backend: the tracing is what is counted, not inductor's code."""
    import torch
    from torch._dynamo.utils import counters

    from groundthink.models import HybridLM
    from groundthink.models.presets import preset

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=32, impl="chunked", state_norm=state_norm, state_norm_interval=16)
    model, reference = HybridLM(cfg), HybridLM(cfg)
    reference.load_state_dict(model.state_dict())
    assert model.position_period == (16 if state_norm else 1)
    for block in model.blocks:
        block.compile(backend="eager", dynamic=False)
    tokens = torch.randint(0, 32, (2, 8 * 12))
    counters.clear()
    state = ref_state = None
    for segment in tokens.split(12, dim=1):  # 12-token segments: positions 0, 12, 24, ... cycle through 4 phases
        logits, state = model(segment, state)  # carried detached, as in training (truncated BPTT)
        ref_logits, ref_state = reference(segment, ref_state)
        state, ref_state = state.map(torch.Tensor.detach), ref_state.map(torch.Tensor.detach)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    # Both blocks share their code, so each phase is one frame compile: 4 phases (0, 12, 8, 4) with StateNorm.
    assert counters["stats"]["unique_graphs"] == (4 if state_norm else 1)
    torch._dynamo.reset()


def test_compile_refuses_rope_attention_which_reads_the_exact_position():
    from groundthink.models import HybridLM
    from groundthink.models.presets import preset
    from groundthink.training.assembly import compile_blocks

    cfg = preset("tiny", vocab_size=32, impl="chunked", pattern="A", mixers={"attention": {"rope_base": 10000.0}})
    model = HybridLM(cfg)
    assert model.position_period is None
    with pytest.raises(ValueError, match=r"trainer.compile=true does not work with RoPE.*rope_base=null"):
        compile_blocks(model)
