"""Contract tests for every registered sequence mixer and FFN (new registry entries are picked up)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from groundthink.mixers import FFNS, MIXERS
from groundthink.mixers._common import state_norm
from groundthink.models import ModelConfig
from tests._numerics import rel_err
from tests.conftest import tiny_config

REGISTRY = {**{f"mixer:{k}": v for k, v in MIXERS.items()}, **{f"ffn:{k}": v for k, v in FFNS.items()}}
VARIANTS = ("plain", "state_norm_h0")
CASES = [(name, variant) for name in REGISTRY for variant in VARIANTS] + [("mixer:attention", "rope_key_shift")]
SPLITS = [(7, 9), (1, 15), (13, 50)]
D_MODEL = 32


def tiny_cfg(variant: str = "plain", **changes) -> ModelConfig:
    """conftest's tiny config at D_MODEL, 2 layers, an attention window of 8; flat legacy fields accepted."""
    base = tiny_config(vocab_size=50, d_model=D_MODEL, n_layers=2, mixers={"attention": {"window": 8}})
    if variant == "state_norm_h0":
        base = base.replace(state_norm=True, learn_h0=True, grounding_strength=0.7)
    if variant == "rope_key_shift":  # the attention mixer's options (the other mixers have no such settings)
        base = base.replace(mixers={**base.mixers, "attention": dataclasses.replace(
            base.mixers["attention"], rope_base=100.0, key_shift=True)})
    return ModelConfig.from_dict({**base.to_dict(), **changes})


def build(name: str, variant: str = "plain", seed: int = 0, **changes) -> torch.nn.Module:
    """A registry entry with every parameter perturbed, so zero-init projections and h0 hide nothing."""
    torch.manual_seed(seed)
    module = REGISTRY[name].from_config(tiny_cfg(variant, **changes), layer_id=1, device="cpu")
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return module


def inputs(T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,variant", CASES)
def test_shapes_and_state_size(name, variant):
    module = build(name, variant)
    x = inputs(11, B=3)
    y, state = module(x)
    assert y.shape == x.shape
    fresh = module.init_state(3, x.device)
    assert sorted(state) == sorted(fresh)
    for key, tensor in state.items():
        assert tensor.shape == fresh[key].shape, key
    assert module.state_size() == sum(t[0].numel() for t in fresh.values())


@pytest.mark.parametrize("name,variant", CASES)
def test_causality(name, variant):
    module = build(name, variant)
    x = inputs(23)
    y, _ = module(x)
    for t0 in (0, 9, 22):
        x2 = x.clone()
        x2[:, t0] += 3.0
        y2, _ = module(x2)
        if t0 > 0:
            assert rel_err(y2[:, :t0], y[:, :t0]) < 1e-6, f"output before t={t0} changed"
        assert rel_err(y2[:, t0:], y[:, t0:]) > 1e-4, "perturbing a token must change its own output"


@pytest.mark.parametrize("name,variant", CASES)
def test_determinism(name, variant):
    module = build(name, variant)
    x = inputs(19)
    y1, s1 = module(x)
    y2, s2 = module(x)
    assert torch.equal(y1, y2)
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key


@pytest.mark.parametrize("name,variant", CASES)
def test_finite_gradients(name, variant):
    module = build(name, variant)
    x = inputs(17).requires_grad_(True)
    y, state = module(x)
    loss = y.square().mean() + sum(t.float().square().mean() for t in state.values() if t.is_floating_point())
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, param in module.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{pname} has a non-finite gradient"
    for pname, param in module.named_parameters():
        if pname.endswith("h0.h0"):
            assert param.grad.abs().sum() > 0, "the trainable h0 must receive a gradient"


@pytest.mark.parametrize("split", SPLITS, ids=[f"{a}+{b}" for a, b in SPLITS])
@pytest.mark.parametrize("name,variant", CASES)
def test_carried_state_equals_one_pass(name, variant, split):
    module = build(name, variant)
    a, b = split
    x = inputs(a + b)
    y_full, s_full = module(x, position=0)
    y1, s1 = module(x[:, :a], position=0)
    y2, s2 = module(x[:, a:], s1, position=a)
    assert rel_err(torch.cat([y1, y2], dim=1), y_full) <= 1e-5
    for key in s_full:
        if s_full[key].is_floating_point():
            assert rel_err(s2[key], s_full[key]) <= 1e-5, key
        else:
            assert torch.equal(s2[key], s_full[key]), key


@pytest.mark.parametrize("name", list(REGISTRY))
def test_reference_and_chunked_impls_agree(name):
    chunked = build(name, impl="chunked")
    reference = build(name, impl="reference")
    reference.load_state_dict(chunked.state_dict())
    x = inputs(21)
    y_c, s_c = chunked(x)
    y_r, s_r = reference(x)
    assert rel_err(y_c, y_r) <= 1e-5
    for key in s_c:
        assert rel_err(s_c[key].float(), s_r[key].float()) <= 1e-5, key


RECURRENT = [name for name, cls in REGISTRY.items() if hasattr(build(name), "state_norm")]


@pytest.mark.parametrize("name", RECURRENT)
def test_state_norm_normalises_at_absolute_positions(name):
    module = build(name, "state_norm_h0")
    interval, groups = module.state_norm_interval, module.state_norm_groups
    key = type(module).recurrent_state[0]  # the state the mixer declares (StateNorm normalises it)
    _, state = module(inputs(2 * interval), position=0)  # ends on a multiple of the interval
    grouped = state[key].reshape(*state[key].shape[:2], groups, -1)
    assert torch.allclose(grouped.pow(2).mean(-1), torch.ones(()), atol=1e-3)
    _, state_off = module(inputs(2 * interval), position=1)  # ends off the grid: not normalised last
    grouped = state_off[key].reshape(*state_off[key].shape[:2], groups, -1)
    assert not torch.allclose(grouped.pow(2).mean(-1), torch.ones(()), atol=1e-2)
    plain = build(name, "plain")
    plain.load_state_dict(module.state_dict(), strict=False)
    x = inputs(3 * interval)
    h0 = module.init_state(2, "cpu")
    assert rel_err(module(x, h0)[0], plain(x, h0)[0]) > 1e-4, "StateNorm must change the output"


def test_state_norm_function_is_grouped_rms():
    s = torch.randn(2, 3, 8, 5) * 7
    out = state_norm(s, groups=4)
    grouped = out.reshape(2, 3, 4, 10)
    assert torch.allclose(grouped.pow(2).mean(-1), torch.ones(2, 3, 4), atol=1e-5)
    ratio = out.reshape(2, 3, 4, 10) / s.reshape(2, 3, 4, 10)
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-5), "one scale per group"


def test_rwkv_decay_floor_and_identity_init():
    rwkv = MIXERS["rwkv6"].from_config(tiny_cfg(init="identity"), layer_id=0, device="cpu")
    w = torch.exp(-torch.exp(rwkv.time_decay))
    assert math.isclose(w.min().item(), 1 - math.exp(-4), rel_tol=1e-5)
    assert math.isclose(w.max().item(), 1 - math.exp(-9), rel_tol=1e-5)
    with torch.no_grad():
        rwkv.time_decay.fill_(30.0)  # exp(30) would be a decay of exactly 0 without the floor
    log_w = rwkv.log_decay(inputs(4))
    assert torch.allclose(log_w, torch.full_like(log_w, math.log(0.01)), rtol=1e-5)
    unfloored = MIXERS["rwkv6"].from_config(tiny_cfg(min_retention=0.0), layer_id=0, device="cpu")
    with torch.no_grad():
        unfloored.time_decay.fill_(3.0)
    assert (unfloored.log_decay(inputs(4)) < math.log(0.01)).all()


def test_rwkv_official_init():
    rwkv = MIXERS["rwkv6"].from_config(tiny_cfg(n_layers=3), layer_id=1, device="cpu")
    d_att = rwkv.d_att
    n = torch.arange(d_att) / (d_att - 1)
    assert torch.allclose(rwkv.time_decay, -6 + 5 * n.pow(0.7 + 1.3 * 0.5))
    assert torch.equal(rwkv.output.weight, torch.zeros_like(rwkv.output.weight))
    assert rwkv.ln_x.eps == 64e-5
    assert getattr(rwkv.time_faaaa, "_no_weight_decay", False)


def test_mamba_inits():
    mamba = MIXERS["mamba2"].from_config(tiny_cfg(d_model=128, mamba_head_dim=8), layer_id=0, device="cpu")
    A = torch.exp(mamba.A_log)
    dt = torch.nn.functional.softplus(mamba.dt_bias)
    assert (A >= 1).all() and (A <= 16).all()
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert torch.equal(mamba.D, torch.ones_like(mamba.D))
    ident = MIXERS["mamba2"].from_config(tiny_cfg(init="identity"), layer_id=0, device="cpu")
    decay = torch.exp(-torch.exp(ident.A_log) * torch.nn.functional.softplus(ident.dt_bias))
    assert math.isclose(decay.min().item(), 1 - math.exp(-4), rel_tol=1e-4)
    assert math.isclose(decay.max().item(), 1 - math.exp(-9), rel_tol=1e-4)


def test_attention_window_limits_memory():
    attn = build("mixer:attention")
    W = attn.window
    x = inputs(3 * W)
    y, _ = attn(x)
    x2 = x.clone()
    x2[:, 0] += 5.0
    y2, _ = attn(x2)
    assert rel_err(y2[:, W + 1 :], y[:, W + 1 :]) < 1e-6, "tokens beyond the window must not see token 0"
    assert rel_err(y2[:, W], y[:, W]) > 1e-4, "token W still sees token 0 (window = itself + W previous)"


def test_mixers_resolve_impl_once_and_expose_it():
    for name in MIXERS:
        module = MIXERS[name].from_config(tiny_cfg(impl="auto"), layer_id=0, device="cpu")
        assert isinstance(module.impl, str) and module.impl != "auto"
    with pytest.raises(RuntimeError, match="fla"):
        MIXERS["rwkv6"].from_config(tiny_cfg(impl="fla"), layer_id=0, device="cpu")


def test_rope_attention_depends_on_relative_positions_only():
    rope, nope = build("mixer:attention", "rope_key_shift"), build("mixer:attention")
    x = inputs(12)
    y0, _ = rope(x, position=0)
    y1000, _ = rope(x, position=1000)  # the same tokens later in the stream: the same distances, the same output
    assert rel_err(y1000, y0) <= 1e-5
    assert rel_err(nope(x)[0], y0) > 1e-3  # the rotation changes the scores


def test_mamba2_folded_output_gain_matches_the_module_and_keeps_a_replaced_projection():
    """Mamba2 folds the gated RMSNorm's gain into out_proj's weight when out_proj is a plain nn.Linear; a replaced
    projection (ternary STE) must still run its own forward, on y ⊙ gain."""
    from groundthink.quant.ternary import TernaryLinear

    torch.manual_seed(0)
    mixer = MIXERS["mamba2"].from_config(tiny_config(pattern="M"), layer_id=0)
    with torch.no_grad():
        for param in mixer.parameters():
            param.add_(0.1 * torch.randn_like(param))
    x = torch.randn(2, 9, 32)
    folded, _ = mixer(x)
    mixer.out_proj = TernaryLinear(mixer.out_proj, activation_bits=8)
    mixer.out_proj.quantise = False  # the latent weight: the same map as the folded plain Linear
    unfolded, _ = mixer(x)
    assert rel_err(unfolded, folded) <= 1e-6
    mixer.out_proj.quantise = True
    calls = []
    mixer.out_proj.register_forward_hook(lambda module, args, out: calls.append(args[0]))
    quantised, _ = mixer(x)
    assert len(calls) == 1 and rel_err(quantised, folded) > 1e-3  # the ternary forward ran, on its own weight
