"""trainer.compile: regional torch.compile of the blocks, through the real CLI.

The compiled run must train the same model as the eager one (inductor reorders fp32 arithmetic, so the losses agree
to round-off, not bit for bit), recompile only where it has to (once for validation's no-grad mode, not for the
carried state's layout), and write checkpoints an eager model loads (block.compile() keeps the parameter names)."""

from __future__ import annotations

import pytest

from tests.conftest import read_column, run_dirs, run_train

pytestmark = pytest.mark.slow


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
