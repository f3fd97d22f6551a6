"""Training diagnostics: the state/entropy measures on known inputs, the callbacks' schedule and alerts, and a
short in-process training run (the harness, `train_in_process`, lives in conftest.py)."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml

from groundthink.evaluation.state_metrics import (
    DecaySaturation,
    predictive_entropy,
    saturated,
    singular_values,
    spectral_entropy,
    state_cosine,
    top_k_energy,
)
from groundthink.models import HybridLM, LMState
from groundthink.models.presets import preset
from groundthink.training.diagnostics import (
    DiagnosticsSettings,
    DiagnosticWarning,
    GradientNormDiagnostics,
    OutputEntropyDiagnostics,
    StateHealthDiagnostics,
    build_diagnostics,
    component_grad_norms,
)
from groundthink.training.metrics_file import read_metrics_csv
from groundthink.training.module import NonFiniteLossError
from tests.conftest import EVERY_5, REPO, train_in_process


def freeze_states(model: HybridLM) -> HybridLM:
    """Deliberately broken: every recurrent mixer hands back the state it was given (a frozen memory)."""
    for block in model.blocks:
        for branch in ("rwkv", "mamba"):
            mixer = getattr(block, branch, None)
            if mixer is None:
                continue
            forward = mixer.forward

            def frozen(x, state=None, *, position=0, _forward=forward, _mixer=mixer):
                state = state if state is not None else _mixer.init_state(x.shape[0], x.device)
                out, _ = _forward(x, state, position=position)
                return out, state

            mixer.forward = frozen
    return model


# ----- measures on known inputs --------------------------------------------------------------------------------
def test_state_cosine_is_one_for_a_frozen_state_and_handles_zeros():
    a = torch.randn(2, 3, 4, 5)
    assert torch.allclose(state_cosine(a, a), torch.ones(2, 3, dtype=torch.float64))
    assert torch.allclose(state_cosine(a, -a), -torch.ones(2, 3, dtype=torch.float64))
    assert torch.allclose(state_cosine(a, 7 * a), torch.ones(2, 3, dtype=torch.float64))  # scale-free
    zeros = torch.zeros_like(a)
    assert torch.equal(state_cosine(zeros, zeros), torch.ones(2, 3, dtype=torch.float64))
    assert torch.equal(state_cosine(a, zeros), torch.zeros(2, 3, dtype=torch.float64))
    e1, e2 = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    e1[..., 0, 0], e2[..., 1, 1] = 1.0, 1.0
    assert float(state_cosine(e1, e2)) == 0.0


def test_top_k_energy_and_spectral_entropy_on_known_spectra():
    n = 8
    rank1 = torch.outer(torch.randn(n), torch.randn(n))[None, None]
    flat = torch.eye(n)[None, None]
    s = singular_values(rank1)
    assert float(top_k_energy(s, 5)) == pytest.approx(1.0)
    assert float(spectral_entropy(s)) == pytest.approx(0.0, abs=1e-5)
    s = singular_values(flat)
    assert float(top_k_energy(s, 5)) == pytest.approx(5 / n)
    assert float(spectral_entropy(s)) == pytest.approx(math.log(n))
    s = singular_values(torch.diag(torch.tensor([3.0, 4.0]))[None, None])
    assert float(top_k_energy(s, 1)) == pytest.approx(16 / 25)
    p = torch.tensor([4 / 7, 3 / 7])
    assert float(spectral_entropy(s)) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
    zero = singular_values(torch.zeros(1, 1, 4, 4))
    assert math.isnan(float(top_k_energy(zero, 5))) and math.isnan(float(spectral_entropy(zero)))


def test_predictive_entropy_of_uniform_logits_is_log_vocab_and_of_one_hot_is_zero():
    vocab = 264
    assert predictive_entropy(torch.zeros(2, 7, vocab)) == pytest.approx(math.log(vocab), rel=1e-6)
    peaked = torch.full((2, 7, vocab), -1e4)
    peaked[..., 3] = 0.0
    assert predictive_entropy(peaked) == pytest.approx(0.0, abs=1e-6)
    mixed = torch.cat([torch.zeros(1, 4, vocab), peaked[:1, :4]], dim=1)  # 4 uniform then 4 one-hot positions
    mask = torch.tensor([[True] * 4 + [False] * 4])
    assert predictive_entropy(mixed, mask) == pytest.approx(math.log(vocab), rel=1e-6)
    logits = torch.randn(3, 11, 50)
    assert predictive_entropy(logits, chunk=4) == pytest.approx(predictive_entropy(logits, chunk=1000), rel=1e-6)
    assert predictive_entropy(mixed, max_positions=4) == pytest.approx(math.log(vocab), rel=1e-6)


def test_decay_saturation_counts_the_decays_of_both_mixers_and_leaves_nothing_installed():
    torch.manual_seed(0)
    model = HybridLM(preset("tiny", init="identity"))
    eps = 1e-3
    with torch.no_grad():  # dt independent of the input: dt = softplus(dt_bias)
        for block in model.blocks:
            block.mamba.in_proj.weight[-block.mamba.n_heads:].zero_()
    tokens = torch.randint(0, 264, (2, 9))
    reference, _ = model(tokens)
    with DecaySaturation(model, eps) as sat:
        logits, _ = model(tokens)
    assert torch.equal(logits, reference)
    fractions = sat.fractions()
    for i, block in enumerate(model.blocks):
        # At init the decay LoRA's first matrix is zero, so log w = -exp(time_decay) at every token.
        expected_rwkv = float(saturated(-torch.exp(block.rwkv.time_decay.detach()), eps).float().mean())
        mixer = block.mamba
        log_a = torch.nn.functional.softplus(mixer.dt_bias.detach()) * -torch.exp(mixer.A_log.detach())
        expected_mamba = float(saturated(log_a, eps).float().mean())
        assert fractions[(i, "rwkv")] == pytest.approx(expected_rwkv)
        assert fractions[(i, "mamba")] == pytest.approx(expected_mamba)
    assert fractions[(0, "rwkv")] > 0.3  # identity init: decays up to 0.99988, many above 1 - 1e-3
    for block in model.blocks:
        assert block.rwkv.decay_observer is None and block.mamba.decay_observer is None
    official = HybridLM(preset("tiny"))
    with DecaySaturation(official, eps) as sat:
        official(tokens)
    assert max(sat.fractions().values()) < 0.05


def test_component_grad_norms_group_parameters_by_component():
    model = HybridLM(preset("tiny"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    norms = component_grad_norms(model.named_parameters(), model.component_of)
    counts = model.component_param_counts()
    for component, count in counts.items():
        assert norms[component] ** 2 == pytest.approx(count)
    assert norms["total"] ** 2 == pytest.approx(sum(counts.values()))


# ----- callback logic with stand-ins for the trainer -------------------------------------------------------------
class _Logger:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def _stub_trainer(step: int, logger: _Logger) -> SimpleNamespace:
    """A trainer during (1-based) step `step`: global_step counts the completed ones."""
    return SimpleNamespace(global_step=step - 1, loggers=[logger])


def _set_branch_grads(model: HybridLM, rwkv: float, mamba: float) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    rwkv_param = model.blocks[0].rwkv.receptance.weight
    mamba_param = model.blocks[0].mamba.in_proj.weight
    rwkv_param.grad.view(-1)[0] = rwkv
    mamba_param.grad.view(-1)[0] = mamba


def test_ratio_warning_fires_once_per_excursion_and_values_are_logged():
    model = HybridLM(preset("tiny"))
    module = SimpleNamespace(model=model)
    callback = GradientNormDiagnostics(2, ratio_band=(0.1, 10.0), total_band=(0.5, 1.5))
    logger = _Logger()
    sequence = [(1.0, 0.001), (1.0, 0.002), (0.6, 0.6), (1.0, 0.001)]  # out, still out, back in, out again
    fired = []
    for k, (rwkv, mamba) in enumerate(sequence):
        _set_branch_grads(model, rwkv, mamba)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callback.on_before_optimizer_step(_stub_trainer(2 * k + 2, logger), module, None)
        fired.append([str(w.message) for w in caught if issubclass(w.category, DiagnosticWarning)])
    assert [len(f) for f in fired] == [1, 0, 0, 1]
    assert "rwkv/mamba gradient-norm ratio 1e+03" in fired[0][0] and "step 2" in fired[0][0]
    steps = [s for s, _ in logger.rows]
    assert steps == [2, 4, 6, 8]
    first = logger.rows[0][1]
    assert first["diag/grad_ratio_rwkv_mamba"] == pytest.approx(1000.0)
    assert first["diag/grad_norm/total"] == pytest.approx(math.hypot(1.0, 0.001))
    assert first["diag/grad_norm/in_band"] == 1.0
    callback.on_before_optimizer_step(_stub_trainer(3, logger), module, None)  # 3 % 2 != 0: not due
    assert len(logger.rows) == 4


def test_total_norm_band_is_checked_and_a_nan_gradient_stops_naming_the_component():
    model = HybridLM(preset("tiny"))
    module = SimpleNamespace(model=model)
    callback = GradientNormDiagnostics(1)
    logger = _Logger()
    _set_branch_grads(model, 3.0, 3.0)
    with pytest.warns(DiagnosticWarning, match="total gradient norm 4.24 left the band"):
        callback.on_before_optimizer_step(_stub_trainer(1, logger), module, None)
    assert logger.rows[0][1]["diag/grad_norm/in_band"] == 0.0
    model.blocks[1].mamba.A_log.grad = torch.full_like(model.blocks[1].mamba.A_log, float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"'blocks\.1\.mamba\.A_log' \(mamba\)"):
        callback.on_before_optimizer_step(_stub_trainer(2, logger), module, None)


def test_entropy_callback_measures_only_due_steps_and_alerts_on_collapse():
    callback = OutputEntropyDiagnostics(3, collapse_below=0.3)
    logger = _Logger()
    module = SimpleNamespace(capture_outputs=False, last_outputs=None)
    for step in range(1, 7):
        trainer = _stub_trainer(step, logger)
        callback.on_train_batch_start(trainer, module, None, 0)
        assert module.capture_outputs == (step in (3, 6))
        if module.capture_outputs:  # what training_step leaves when asked: uniform, then one-hot logits
            logits = torch.zeros(1, 4, 10)
            if step == 6:
                logits.fill_(-50.0)[..., 1] = 50.0
            module.last_outputs = {"logits": logits, "labels": torch.tensor([[1, 2, -100, 3]])}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callback.on_train_batch_end(trainer, module, None, None, 0)
        alerts = [w for w in caught if issubclass(w.category, DiagnosticWarning)]
        assert len(alerts) == (1 if step == 6 else 0)
        assert module.capture_outputs is False and module.last_outputs is None
    assert [s for s, _ in logger.rows] == [3, 6]
    assert logger.rows[0][1]["diag/output_entropy"] == pytest.approx(math.log(10))
    assert logger.rows[1][1]["diag/output_entropy"] == pytest.approx(0.0, abs=1e-6)


def test_state_health_of_a_frozen_state_reports_cosine_one_and_alerts():
    model = HybridLM(preset("tiny"))
    _, state = model(torch.randint(0, 264, (3, 16)))
    callback = StateHealthDiagnostics(1)
    with pytest.warns(DiagnosticWarning, match="frozen"):
        metrics = callback.measure(state, state, None, {}, step=0)
    for i in range(2):
        for branch in ("rwkv", "mamba"):
            assert metrics[f"diag/state/L{i}/{branch}/cos"] == pytest.approx(1.0)
            assert 0 < metrics[f"diag/state/L{i}/{branch}/svd_top5"] <= 1
            assert metrics[f"diag/state/L{i}/{branch}/norm"] > 0
    _, later = model(torch.randint(0, 264, (3, 16)), state)
    keep = torch.tensor([True, False, True])
    metrics = StateHealthDiagnostics(1).measure(later.detach(), state, keep, {}, step=1)
    expected = state_cosine(state.layers[0]["rwkv"]["wkv"], later.layers[0]["rwkv"]["wkv"])[keep].mean()
    assert metrics["diag/state/L0/rwkv/cos"] == pytest.approx(float(expected))
    assert metrics["diag/state/L0/rwkv/cos"] < 0.99
    nan_state = LMState([{k: {n: t.clone() for n, t in v.items()} for k, v in layer.items()}
                         for layer in state.layers], state.position)
    nan_state.layers[1]["mamba"]["ssm"].fill_(float("nan"))
    with pytest.warns(DiagnosticWarning, match="layer 1 holds NaN"):
        StateHealthDiagnostics(1).measure(nan_state, None, None, {}, step=2)


def test_state_explosion_alert_fires_at_max_norm_and_is_off_with_state_norm():
    model = HybridLM(preset("tiny"))
    _, state = model(torch.randint(0, 264, (2, 16)))
    big = state.map(lambda t: t * 1e4 if t.is_floating_point() else t)
    callback = StateHealthDiagnostics(1, max_norm=10.0)
    with pytest.warns(DiagnosticWarning, match="state explosion"):
        metrics = callback.measure(big, None, None, {}, step=1)
    assert max(v for k, v in metrics.items() if k.endswith("/norm")) >= 10.0
    quiet = StateHealthDiagnostics(1, max_norm=10.0)
    quiet.on_fit_start(None, SimpleNamespace(model=HybridLM(preset("tiny", state_norm=True))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.measure(big, None, None, {}, step=1)
    assert not [w for w in caught if "explosion" in str(w.message)]


# ----- config --------------------------------------------------------------------------------------------------
def test_disabled_or_zero_period_diagnostics_build_no_callback():
    assert build_diagnostics({"enabled": False, "grad_norms": {"every_n_steps": 5}}) == []
    off = {"enabled": True, **{s: {"every_n_steps": 0} for s in ("grad_norms", "state", "entropy")}}
    assert build_diagnostics(off) == []
    attention_only = HybridLM(preset("tiny", pattern="A"))
    kinds = [type(c) for c in build_diagnostics(EVERY_5, attention_only)]
    assert StateHealthDiagnostics not in kinds and GradientNormDiagnostics in kinds


def test_unknown_diagnostics_keys_are_errors_that_name_them():
    with pytest.raises(ValueError, match="every_n_step'"):
        DiagnosticsSettings.from_dict({"enabled": True, "state": {"every_n_step": 5}})
    with pytest.raises(ValueError, match="gradnorms"):
        DiagnosticsSettings.from_dict({"enabled": True, "gradnorms": {}})


@pytest.mark.parametrize("name", ["default", "full"])
def test_diagnostics_configs_use_only_known_keys(name):
    cfg = yaml.safe_load((REPO / "conf" / "diagnostics" / f"{name}.yaml").read_text()) or {}
    settings = DiagnosticsSettings.from_dict(cfg)
    assert all(getattr(settings, s).every_n_steps > 0 for s in ("grad_norms", "state", "entropy"))


# ----- in a real training loop ---------------------------------------------------------------------------------
class _Probe(L.Callback):
    """Records, mid-step, whether anything of the diagnostics is installed on the model."""

    def __init__(self) -> None:
        self.installed: dict[int, bool] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        model = pl_module.model
        hooked = any(b.rwkv.decay_observer is not None or b.mamba.decay_observer is not None for b in model.blocks)
        self.installed[trainer.global_step + 1] = hooked or pl_module.capture_outputs


@pytest.mark.filterwarnings("ignore::groundthink.training.diagnostics.DiagnosticWarning")
def test_diagnostics_log_on_their_steps_into_metrics_csv_and_cost_nothing_between(tmp_path):
    probe = _Probe()
    run = train_in_process(tmp_path / "run", steps=20, callbacks=[probe])
    assert run.summary["status"] == "completed"
    series = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    for key in ["diag/grad_norm/rwkv", "diag/grad_norm/mamba", "diag/grad_norm/ffn", "diag/grad_norm/embed_head",
                "diag/grad_norm/total", "diag/grad_ratio_rwkv_mamba", "diag/output_entropy",
                "diag/state/L1/mamba/cos", "diag/state/L0/rwkv/svd_top5", "diag/state/L0/rwkv/saturation",
                "diag/state/L1/rwkv/norm", "diag/state/L0/mamba/entropy"]:
        assert [s for s, _ in series[key]] == [5, 10, 15, 20], key
    # The loss is logged at the same rows (log_every_n_steps=5), so every diag value sits beside a train/loss.
    assert {s for s, _ in series["train/loss"]} >= {5, 10, 15, 20}
    entropy = [v for _, v in series["diag/output_entropy"]]
    assert all(0 < v <= math.log(264) for v in entropy)
    assert {s for s, on in probe.installed.items() if on} == {5, 10, 15, 20}
    assert run.module.capture_outputs is False and run.module.last_outputs is None
    for block in run.model.blocks:
        assert block.rwkv.decay_observer is None and block.mamba.decay_observer is None
