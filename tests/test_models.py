"""HybridLM, Block, ModelConfig, LMState and presets: carried-state invariance over every layer pattern and
switch, h0 gradients, lane resets, weight-decay isolation, errors, streaming generation, the layering rule."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch

from groundthink.models import HybridLM, LMState, ModelConfig
from groundthink.models.presets import PRESETS, count_params, param_matched, preset
from tests._numerics import rel_err
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parent.parent
PATTERNS = ["H", "R", "M", "HHA", "RMA"]


def tiny(**changes) -> ModelConfig:
    return tiny_config(**changes)


def perturbed(cfg: ModelConfig, seed: int = 0) -> HybridLM:
    """A model whose parameters (zero-init projections and h0 included) are all nonzero, as after training."""
    torch.manual_seed(seed)
    model = HybridLM(cfg, device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def tokens(B: int, T: int, seed: int = 3, vocab: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


SWITCHES = list(itertools.product(PATTERNS, ["official", "identity"], [False, True], [False, True]))


@pytest.mark.parametrize(
    "pattern,init,state_norm,learn_h0",
    SWITCHES,
    ids=[f"{p}-{i}-sn{int(s)}-h0{int(h)}" for p, i, s, h in SWITCHES],
)
def test_carried_state_equals_one_pass(pattern, init, state_norm, learn_h0):
    cfg = tiny(
        pattern=pattern,
        init=init,
        state_norm=state_norm,
        learn_h0=learn_h0,
        branch_norm=state_norm,
        learn_alpha=learn_h0,
        gamma_init=0.5,
    )
    model = perturbed(cfg)
    ids = tokens(2, 23)
    full, s_full = model(ids)
    first, s = model(ids[:, :9])
    second, s = model(ids[:, 9:], s)
    assert s.position == 23 == s_full.position
    assert rel_err(torch.cat([first, second], dim=1), full) <= 1e-4
    flat, flat_full = s.to_flat(), s_full.to_flat()
    assert flat.keys() == flat_full.keys()
    for key in flat:
        assert rel_err(flat[key].float(), flat_full[key].float()) <= 1e-4, key


def test_state_checkpoint_roundtrip_continues_exactly():
    model = perturbed(tiny(pattern="HA", ffn="swiglu", learn_h0=True))
    ids = tokens(2, 20)
    _, state = model(ids[:, :11])
    restored = LMState.from_flat(state.to_flat(), state.position)
    out_a, _ = model(ids[:, 11:], state)
    out_b, _ = model(ids[:, 11:], restored)
    assert torch.equal(out_a, out_b)


def test_gradient_flows_to_h0():
    model = perturbed(tiny(pattern="HMR", learn_h0=True))
    logits, state = model(tokens(2, 12))
    logits.square().mean().backward()
    h0s = {n: p for n, p in model.named_parameters() if n.endswith("h0.h0")}
    assert len(h0s) == 4  # rwkv + mamba in the H block, mamba, rwkv
    for name, param in h0s.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert getattr(param, "_no_weight_decay", False), name


def test_init_state_uses_grounding_strength_times_h0():
    model = perturbed(tiny(pattern="H", learn_h0=True, grounding_strength=0.5))
    state = model.init_state(3)
    h0 = model.blocks[0].rwkv.h0.h0
    assert torch.allclose(state.layers[0]["rwkv"]["wkv"], 0.5 * h0.expand(3, *h0.shape))
    no_h0 = HybridLM(tiny(pattern="H"), device="cpu").init_state(2)
    assert all(t.abs().sum() == 0 for t in no_h0.tensors())


def test_reset_lanes_replaces_only_masked_lanes():
    model = perturbed(tiny(pattern="HA", learn_h0=True))
    ids = tokens(2, 16)
    _, carried = model(ids[:, :8])
    fresh = model.init_state(2)
    mixed = carried.reset_lanes(torch.tensor([True, False]), fresh)
    assert mixed.position == carried.position
    out, _ = model(ids[:, 8:], mixed)
    out_carried, _ = model(ids[:, 8:], carried)
    out_fresh, _ = model(ids[:, 8:], LMState(fresh.layers, carried.position))
    assert torch.allclose(out[1], out_carried[1])
    assert torch.allclose(out[0], out_fresh[0])
    assert not torch.allclose(out[0], out_carried[0])
    with pytest.raises(ValueError, match="bool"):
        carried.reset_lanes(torch.tensor([1, 0]), fresh)


@pytest.mark.parametrize("lora_weight_decay", [False, True])
def test_param_groups_isolate_weight_decay(lora_weight_decay):
    model = HybridLM(tiny(pattern="HA", learn_h0=True, learn_alpha=True, branch_norm=True), device="cpu")
    groups = model.param_groups(0.1, lora_weight_decay=lora_weight_decay)
    decay_ids = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    all_params = list(model.parameters())
    assert sum(len(g["params"]) for g in groups) == len(all_params)
    names = {n: id(p) for n, p in model.named_parameters()}
    no_decay_suffixes = (
        "time_decay",
        "time_faaaa",
        "time_maa_x",
        "time_maa_w",
        "A_log",
        "dt_bias",
        "mamba.D",
        "norm_weight",
        "conv_bias",
        "h0.h0",
        "gamma",
        "alpha",
        "ln_x.weight",
        "ln_x.bias",
        "norm1.weight",
        "norm1.bias",
        "norm_f.weight",
        "branch_norms.rwkv.weight",
    )
    # RWKV-LM's optimizer groups leave the token-shift and decay LoRAs undecayed; the switch decays them.
    lora_suffixes = ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2")
    if not lora_weight_decay:
        no_decay_suffixes += lora_suffixes
    decay_suffixes = (
        "rwkv.receptance.weight",
        "in_proj.weight",
        "conv_weight",
        "out_proj.weight",
        "qkv.weight",
        "ffn.key.weight",
        "embed.weight",
        "head.weight",
    ) + (lora_suffixes if lora_weight_decay else ())
    for suffix in no_decay_suffixes:
        matches = [n for n in names if n.endswith(suffix)]
        assert matches, suffix
        assert all(names[n] not in decay_ids for n in matches), suffix
    for suffix in decay_suffixes:
        matches = [n for n in names if n.endswith(suffix)]
        assert matches, suffix
        assert all(names[n] in decay_ids for n in matches), suffix
    torch.optim.AdamW(groups, lr=1e-3)


@pytest.mark.parametrize(
    "changes,words",
    [
        (dict(d_model=30, mixers={"rwkv6": {"n_heads": 4}}), ["mixers.rwkv6.n_heads", "4", "d_model=30"]),
        (dict(pattern="HX"), ["pattern", "'HX'", "X", "H"]),
        (dict(alpha=1.5), ["alpha", "1.5", "[0, 1]"]),
        (dict(attn_layers=[7]), ["attn_layers", "[7]", "n_layers=3"]),
        (dict(impl="cuda"), ["impl", "'cuda'", "chunked"]),
        (dict(init="xavier"), ["init", "'xavier'", "identity"]),
        (dict(ffn="mlp"), ["ffn", "'mlp'", "swiglu"]),
        (dict(mixers={"rwkv6": {"min_retention": 1.0}}), ["mixers.rwkv6.min_retention", "1.0", "[0, 1)"]),
        (dict(state_norm=True, state_norm_groups=3), ["state_norm_groups", "3", "head size"]),
        (dict(mixers={"mamba2": {"head_dim": 24}}), ["mixers.mamba2.head_dim", "24", "64"]),
        (dict(mixers={"mamba2": {"chunk_size": 12}}), ["mixers.mamba2.chunk_size", "12", "power of two"]),
        (dict(mixers={"gru": {}}), ["mixers", "gru", "registered"]),
        (dict(mixers={"rwkv6": {"n_head": 2}}), ["mixers.rwkv6", "n_head", "n_heads"]),
        (dict(hybrid=["rwkv6", "rwkv6"]), ["hybrid", "two different"]),
        (dict(n_layers=0), ["n_layers", "0", "positive"]),
    ],
)
def test_bad_config_errors_name_field_value_and_allowed(changes, words):
    with pytest.raises(ValueError) as info:
        tiny(**changes)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_layer_pattern_and_attn_layers():
    cfg = tiny(n_layers=6, pattern="RM", attn_layers=[2])
    assert cfg.layer_letters() == ["R", "M", "A", "M", "R", "M"]
    model = HybridLM(cfg, device="cpu")
    assert [b.letter for b in model.blocks] == cfg.layer_letters()
    assert hasattr(model.blocks[2], "attention") and not hasattr(model.blocks[2], "rwkv")


def test_generate_memory_is_constant():
    model = perturbed(tiny(pattern="HA"))
    prompt = tokens(2, 5)
    out10, state10 = model.generate(
        prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0)
    )
    out100, state100 = model.generate(prompt, 100, temperature=0.0)
    assert out10.shape == (2, 10) and out100.shape == (2, 100)
    assert state10.num_floats() == state100.num_floats() == model.state_size()
    assert [t.shape for t in state10.tensors()] == [t.shape for t in state100.tensors()]
    assert state100.position == 105
    # streaming continues the stream exactly: greedy tokens equal the argmax of one pass over the same text
    logits, _ = model(torch.cat([prompt, out100[:, :-1]], dim=1))
    assert torch.equal(logits[:, 4:].argmax(-1), out100)


def test_bf16_autocast_forward_is_finite():
    model = perturbed(tiny(pattern="HA"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(tokens(2, 12))
        logits2, _ = model(tokens(2, 5), state)
    assert torch.isfinite(logits.float()).all() and torch.isfinite(logits2.float()).all()


def test_component_of():
    model = HybridLM(tiny(pattern="HA", branch_norm=True, learn_h0=True), device="cpu")
    expected = {
        "embed.weight": "embed_head",
        "head.weight": "embed_head",
        "norm_f.weight": "norm_other",
        "blocks.0.rwkv.key.weight": "rwkv",
        "blocks.0.rwkv.ln_x.weight": "rwkv",
        "blocks.0.mamba.A_log": "mamba",
        "blocks.1.attention.qkv.weight": "attention",
        "blocks.0.ffn.key.weight": "ffn",
        "blocks.0.gamma": "norm_other",
        "blocks.0.norm1.weight": "norm_other",
        "blocks.0.branch_norms.rwkv.weight": "norm_other",
        "model.blocks.0.mamba.in_proj.weight": "mamba",
    }
    for name, component in expected.items():
        assert model.component_of(name) == component, name
    assert {model.component_of(n) for n, _ in model.named_parameters()} == {
        "rwkv",
        "mamba",
        "attention",
        "ffn",
        "embed_head",
        "norm_other",
    }


def test_tied_embeddings_share_one_matrix():
    tied = HybridLM(tiny(tie_embeddings=True), device="cpu")
    untied = HybridLM(tiny(), device="cpu")
    assert tied.head.weight is tied.embed.weight
    assert untied.num_params() - tied.num_params() == 40 * 32


def test_presets_instantiate_and_count():
    assert set(PRESETS) >= {"tiny", "5m_deep", "8m_wide", "8m", "30m", "125m"}
    model = HybridLM(preset("tiny"), device="cpu")
    logits, _ = model(tokens(1, 8, vocab=model.cfg.vocab_size))
    assert logits.shape == (1, 8, model.cfg.vocab_size)
    assert count_params(model.cfg) == model.num_params()
    counts = {name: count_params(preset(name)) for name in PRESETS}
    assert counts["tiny"] < counts["5m_deep"] < counts["8m"] < counts["30m"] < counts["125m"]
    assert preset("125m").vocab_size == 24000
    assert counts["8m"] == 16_965_932  # the research plan's 8m shape (12 x 256), as recorded since the first version


def test_legacy_flat_model_configs_load():
    """Runs saved before mixers had their own settings stored flat fields; from_dict moves them."""
    legacy = {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_state": 16, "mamba_head_dim": 32, "attn_heads": 2,
              "attn_window": 64, "max_seq_len": 512, "wkv_chunk_size": None, "min_retention": 0.01}
    assert ModelConfig.from_dict(legacy) == preset("tiny")
    with pytest.raises(ValueError, match="d_modle.*did you mean d_model"):
        ModelConfig.from_dict({"d_modle": 64})


def test_identity_bias_init_starts_every_decay_at_0_9999():
    model = HybridLM(tiny(init="identity_bias", pattern="H"), device="cpu")
    block = model.blocks[0]
    w = torch.exp(-torch.exp(block.rwkv.time_decay.double()))
    assert torch.allclose(w, torch.full_like(w, 0.9999), atol=1e-9)
    dt = torch.nn.functional.softplus(block.mamba.dt_bias.double())
    a = torch.exp(dt * -torch.exp(block.mamba.A_log.double()))
    assert torch.allclose(a, torch.full_like(a, 0.9999), atol=1e-7)


def test_param_matched_keeps_count_within_5_percent():
    base = preset("5m_deep")
    target = count_params(base)
    for changes in (dict(pattern="R"), dict(pattern="M"), dict(pattern="HHA"), dict(n_layers=12)):
        cfg = param_matched(base, **changes)
        assert abs(count_params(cfg) - target) <= 0.05 * target, changes
        assert cfg.pattern == changes.get("pattern", base.pattern)
    with pytest.raises(ValueError, match="d_model"):
        param_matched(base, d_model=128)


def test_no_hydra_or_lightning_below_the_entry_points():
    forbidden = {"hydra", "omegaconf", "lightning", "pytorch_lightning"}
    for package in ("ops", "mixers", "models"):
        for path in (REPO / "groundthink" / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    roots = {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    roots = {node.module.split(".")[0]}
                else:
                    continue
                assert not roots & forbidden, f"{path.relative_to(REPO)} imports {roots & forbidden}"
