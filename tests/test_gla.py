"""GLA (layer letter G): the op's chunked path against its step loop (outputs, final state, every input gradient,
odd lengths, a nonzero initial state, a decay regime where a naive factorisation overflows), carried-state
continuation at the model level, and the rest of GroundThink seeing the new mixer with no edit of its own: its
gradient-norm component and state-health metrics in a real training loop, gate G3.5 judging its state, and GLA as
one of the two mixers of a hybrid block. The mixer contract tests (tests/test_mixers.py) pick it up from the
registry; the chunked ↔ fla parity runs on a GPU (marker gpu)."""

from __future__ import annotations

import pytest
import torch

from groundthink.gates.cli import gate_config
from groundthink.gates.runner import evaluate_gate
from groundthink.models import HybridLM
from groundthink.models.presets import preset
from groundthink.ops.gla import gla, gla_reference
from groundthink.training.metrics_file import read_metrics_csv
from tests._numerics import rel_err
from tests.conftest import tiny_config, train_in_process

TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
NAMES = ["o", "final_state", "dq", "dk", "dv", "dlog_g", "dinitial_state"]


def _inputs(B, T, H, K, V, dtype, mean_abs_log_g=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    log_g = -2 * mean_abs_log_g * torch.rand(B, T, H, K, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    return [q, k, v, log_g, s0]


def _grads(fn, inputs, seed=0):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out, state = fn(*inputs)
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU, then moved: the same weights on every device
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=g, dtype=state.dtype).to(state.device)).sum()
    return [out, state, *torch.autograd.grad(loss, inputs)]


def _assert_parity(actual, expected, tol):
    for name, a, e in zip(NAMES, actual, expected):
        assert torch.isfinite(a).all(), f"{name} is not finite"
        assert rel_err(a, e) <= tol, f"{name}: rel err {rel_err(a, e):.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 15, 63, 100])
def test_gla_chunked_matches_reference(T, dtype):
    inputs = _inputs(2, T, 2, 8, 6, dtype)
    expected = _grads(gla_reference, inputs)
    actual = _grads(lambda *a: gla(*a, impl="chunked", chunk_size=16), inputs)
    _assert_parity(actual, expected, TOL[dtype])


@pytest.mark.parametrize("chunk_size", [None, 4, 64])
def test_gla_chunk_sizes_and_a_decay_where_naive_factorisation_overflows(chunk_size):
    # Mean |log g| = 6 over chunks of 32: a factorisation relative to the chunk start would need exp(+190).
    inputs = _inputs(1, 100, 2, 8, 8, torch.float64, mean_abs_log_g=6.0, seed=1)
    expected = _grads(gla_reference, inputs)
    actual = _grads(lambda *a: gla(*a, chunk_size=chunk_size), inputs)
    _assert_parity(actual, expected, TOL[torch.float64])
    o32, s32 = gla(*(t.float() for t in inputs), chunk_size=chunk_size)
    assert torch.isfinite(o32).all() and torch.isfinite(s32).all()


def test_gla_reads_the_state_after_its_own_step_and_carries_it_exactly():
    q, k, v, log_g, s0 = _inputs(2, 50, 2, 4, 4, torch.float64)
    o, s = gla(q[:, :1], k[:, :1], v[:, :1], log_g[:, :1], s0, scale=1.0)
    after = torch.exp(log_g[:, 0])[..., None] * s0 + k[:, 0, :, :, None] * v[:, 0, :, None, :]
    assert torch.allclose(s, after) and torch.allclose(o[:, 0], torch.einsum("bhk,bhkv->bhv", q[:, 0], after))
    o_full, s_full = gla(q, k, v, log_g, s0)
    o1, s1 = gla(q[:, :17], k[:, :17], v[:, :17], log_g[:, :17], s0)
    o2, s2 = gla(q[:, 17:], k[:, 17:], v[:, 17:], log_g[:, 17:], s1)
    assert rel_err(torch.cat([o1, o2], 1), o_full) <= 1e-12 and rel_err(s2, s_full) <= 1e-12


@pytest.mark.parametrize("pattern", ["G", "GHA"])
def test_models_with_gla_layers_continue_exactly_from_the_carried_state(pattern):
    torch.manual_seed(0)
    model = HybridLM(tiny_config(pattern=pattern, state_norm=True, learn_h0=True), device="cpu").double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tokens = torch.randint(0, 40, (2, 37))
    full, _ = model(tokens)
    first, state = model(tokens[:, :13])
    second, _ = model(tokens[:, 13:], state)
    assert rel_err(torch.cat([first, second], 1), full) <= 1e-6  # the norms compute in fp32


def test_gla_can_be_a_hybrid_branch_and_the_inits_set_its_decays():
    model = HybridLM(tiny_config(pattern="H", hybrid=["gla", "mamba2"], init="identity_bias"), device="cpu")
    assert model.hybrid_branches() == ("gla", "mamba")
    gla_mixer = model.blocks[0].gla
    log_g = torch.nn.functional.logsigmoid(gla_mixer.gk_up.bias.double()) / gla_mixer.gate_logit_normalizer
    assert torch.allclose(log_g.exp(), torch.full_like(log_g, 0.9999), atol=1e-9)


@pytest.mark.filterwarnings("ignore::groundthink.training.diagnostics.DiagnosticWarning")
def test_diagnostics_and_gates_see_gla_without_edits(tmp_path):
    model = HybridLM(preset("tiny", pattern="HG", hybrid=["gla", "mamba2"]))
    run = train_in_process(tmp_path / "run", steps=20, model=model)
    assert run.summary["status"] == "completed"
    series = read_metrics_csv(run.run_dir / "metrics.csv")
    assert [s for s, _ in series["diag/grad_norm/gla"]] == [5, 10, 15, 20]
    assert series["diag/grad_ratio_gla_mamba"]  # the hybrid pair's ratio, named by its branches
    for layer in (0, 1):  # H (gla + mamba) and G (gla alone)
        for metric in ("cos", "svd_top5", "saturation", "norm"):
            assert series[f"diag/state/L{layer}/gla/{metric}"], (layer, metric)
    report = evaluate_gate(gate_config("g3_5"), run.run_dir)
    cos = next(c for c in report.criteria if c.name == "state_cosine")
    assert "gla" in cos.evidence or "mamba" in cos.evidence


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (for fla.ops.gla)")
@pytest.mark.parametrize("T", [15, 100, 257])
def test_fla_matches_chunked(T):
    pytest.importorskip("fla.ops.gla")
    inputs = [t.cuda().float() for t in _inputs(2, T, 4, 64, 64, torch.float32)]
    expected = _grads(lambda *a: gla(*a, impl="chunked"), inputs)
    actual = _grads(lambda *a: gla(*a, impl="fla"), inputs)
    for name, a, e in zip(NAMES, actual, expected):
        assert rel_err(a, e) <= 2e-3, name
