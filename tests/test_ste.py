"""stage=ste (issue 16, part 2): the ternary and activation quantisers by hand, 2-bit packing, the straight-through
estimator's gradient, layer selection, the packed export reproducing the ternary model's logits exactly, and the
stage through the real CLI (PTQ/FP losses at step 0, export, groundthink.load and groundthink-eval, exact resume,
bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from groundthink.quant import (
    PackedTernaryLinear,
    SteSettings,
    TernaryLinear,
    export_packed,
    load_packed,
    pack_ternary,
    quantise_activations,
    quantise_model,
    ternary_codes,
    unpack_ternary,
)
from groundthink.quant.stage import check_settings, full_precision
from tests._trained_run import trained_tiny_run
from tests.conftest import eval_metrics, read_column, run_cli, run_dirs, run_train, tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- quantisers by hand -------------------------------------------------------------------------------------------
def test_absmean_ternary_codes_per_tensor_and_per_channel_by_hand():
    w = torch.tensor([[0.5, -0.1], [2.0, -1.0]])
    codes, s = ternary_codes(w, "tensor")  # mean |w| = 0.9: w / s = 0.56, -0.11, 2.22, -1.11
    assert s.tolist() == pytest.approx([0.9]) and codes.tolist() == [[1.0, 0.0], [1.0, -1.0]]
    codes, s = ternary_codes(w, "channel")  # row means 0.3, 1.5: w / s = 1.67, -0.33 | 1.33, -0.67
    assert s.flatten().tolist() == pytest.approx([0.3, 1.5]) and codes.tolist() == [[1.0, 0.0], [1.0, -1.0]]
    codes, _ = ternary_codes(torch.tensor([[-0.01, 1.0, -1.0]]))
    assert str(codes[0, 0].item()) == "0.0"  # no -0.0: the codes are what int8 codes unpack to
    zeros, s = ternary_codes(torch.zeros(2, 3))
    assert s.item() == pytest.approx(1e-5) and not zeros.any()  # the scale is clamped: no division by zero


def test_absmax_per_token_activation_quantiser_by_hand():
    x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.02, -0.04]])
    q = quantise_activations(x, 8)
    # token 0: s = 127 / 1 -> 127, -63.5 -> -64 (round half to even), 31.75 -> 32; token 1: s = 127 / 0.04
    assert torch.equal(q[0], torch.tensor([127.0, -64.0, 32.0]) / 127)
    assert q[1].tolist() == pytest.approx([0.0, round(0.02 * 127 / 0.04) * 0.04 / 127, -0.04], rel=1e-6)
    k = quantise_activations(x, 4) * (7 / x.abs().amax(-1, keepdim=True))  # 4 bits: integers in [-7, 7]
    assert torch.allclose(k, k.round(), atol=1e-5) and k.abs().max() <= 7 + 1e-5


def test_pack_unpack_round_trip_bytes_and_corruption():
    codes = torch.tensor([-1, 0, 1, 1, 0, -1], dtype=torch.int8)
    packed = pack_ternary(codes)
    # code + 1 in 2 bits, element j of a group of 4 at bits 2j: (0, 1, 2, 2) and (1, 0, padding 1, 1)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0 | 1 << 2 | 2 << 4 | 2 << 6, 1 | 0 << 2 | 1 << 4 | 1 << 6]
    g = torch.Generator().manual_seed(0)
    for shape in [(7, 5), (64, 33), (1, 1)]:
        c = torch.randint(-1, 2, shape, generator=g).to(torch.int8)
        p = pack_ternary(c)
        assert p.numel() == -(-c.numel() // 4) and torch.equal(unpack_ternary(p, shape), c)
    with pytest.raises(ValueError, match="codes must be in"):
        pack_ternary(torch.tensor([2]))
    with pytest.raises(ValueError, match="corrupt"):
        unpack_ternary(torch.tensor([3], dtype=torch.uint8), (1, 4))
    with pytest.raises(ValueError, match=r"expected 3 uint8 bytes for shape \(3, 4\), got 2"):
        unpack_ternary(packed, (3, 4))


@pytest.mark.parametrize("scale,bits", [("tensor", 8), ("channel", 0)])
def test_ste_forward_uses_only_ternary_values_and_backward_passes_the_gradient_unchanged(monkeypatch, scale, bits):
    torch.manual_seed(0)
    layer = TernaryLinear(nn.Linear(16, 8, bias=True), scale=scale, activation_bits=bits)
    x = torch.randn(3, 5, 16, requires_grad=True)
    seen = []
    original = F.linear

    def spy(inp, weight, bias=None):
        seen.append((inp.detach().clone(), weight.detach().clone()))
        return original(inp, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    y = layer(x)
    monkeypatch.setattr(F, "linear", original)
    (x_used, w_used), = seen
    codes, s = ternary_codes(layer.weight, scale)
    assert torch.equal(w_used, codes * s) and set((w_used / s).unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(x_used, quantise_activations(x, bits) if bits else x.detach())
    # The reference: the same product with the quantised tensors as leaves. STE = their gradients, unchanged.
    upstream = torch.randn_like(y)
    y.backward(upstream)
    w_leaf, x_leaf = w_used.clone().requires_grad_(), x_used.clone().requires_grad_()
    original(x_leaf, w_leaf, layer.bias.detach()).backward(upstream)
    assert torch.equal(layer.weight.grad, w_leaf.grad) and torch.equal(x.grad, x_leaf.grad)
    assert layer.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


# ----- layer selection, settings ------------------------------------------------------------------------------------
def test_layer_selection_keeps_parameter_names_and_full_precision_is_the_parent():
    from groundthink.models import HybridLM

    torch.manual_seed(0)
    model = HybridLM(tiny_config(pattern="HA", n_layers=2)).eval()
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        fp_logits, _ = model(ids)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = quantise_model(model, SteSettings())
    assert set(model.state_dict()) == set(keys)  # a checkpoint holds the latent weights under their usual names
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    assert not any(n.startswith(("head", "embed")) for n in chosen)
    assert {model.component_of(n) for n in chosen} == {"rwkv", "mamba", "attention", "ffn"}
    assert type(model.head) is nn.Linear and isinstance(model.blocks[1].attention.qkv, TernaryLinear)
    with torch.no_grad():
        ptq_logits, _ = model(ids)
        with full_precision(model):
            assert torch.equal(model(ids)[0], fp_logits)
    assert not torch.equal(ptq_logits, fp_logits)
    assert quantise_model(model, SteSettings()) == []  # already quantised: nothing left to swap
    only = HybridLM(tiny_config(pattern="HA", n_layers=2))
    names = quantise_model(only, SteSettings(layers=["attention", "head"]))
    assert names == ["blocks.1.attention.qkv", "blocks.1.attention.out_proj", "head"]


def test_bad_ste_settings_are_refused_with_one_clear_line():
    with pytest.raises(ValueError, match=r"ste.layers: unknown layer selection \['bogus'\]; use any of"):
        check_settings(SteSettings(layers=["mixers", "bogus"]))
    with pytest.raises(ValueError, match="embeddings are not linear layers"):
        check_settings(SteSettings(layers=["embed"]))
    with pytest.raises(ValueError, match="ste.scale='row'"):
        check_settings(SteSettings(scale="row"))
    with pytest.raises(ValueError, match="ste.activation_bits=1"):
        check_settings(SteSettings(activation_bits=1))
    from groundthink.models import HybridLM

    with pytest.raises(ValueError, match="selects no linear layer of this model"):
        quantise_model(HybridLM(tiny_config(pattern="R", n_layers=1)), SteSettings(layers=["attention"]))


# ----- packed export (in process: a checkpoint written as groundthink-train writes it) -----------------------------
def _ste_checkpoint(tmp_path: Path, s: SteSettings) -> Path:
    from dataclasses import asdict

    from groundthink.models import HybridLM
    from groundthink.training.checkpoint import save_checkpoint

    torch.manual_seed(1)
    cfg = tiny_config(pattern="HA", n_layers=2, vocab_size=264)
    model = HybridLM(cfg)
    config = {"stage": "ste", "ste": asdict(s), "model": cfg.to_dict(), "tokenizer": {"kind": "char"}}
    tensors = {f"state_dict.model.{k}": v for k, v in model.state_dict().items()}
    return save_checkpoint(tmp_path / "checkpoints", "last", tensors, {"config": config, "step": 3})


@pytest.mark.parametrize("s", [SteSettings(), SteSettings(scale="channel", activation_bits=0, layers=["all"])],
                         ids=["tensor-a8", "channel-a0-all"])
def test_packed_export_reproduces_the_ternary_models_logits_exactly_and_is_16x_smaller(tmp_path, s):
    import groundthink

    checkpoint = _ste_checkpoint(tmp_path, s)
    loaded = groundthink.load(checkpoint)
    assert any(isinstance(m, TernaryLinear) for m in loaded.model.modules())  # load rebuilds the ternary model
    report = export_packed(checkpoint, tmp_path / "export")
    packed = load_packed(tmp_path / "export")
    assert any(isinstance(m, PackedTernaryLinear) for m in packed.modules())
    assert not any(isinstance(m, TernaryLinear) for m in packed.modules())
    ids = torch.randint(0, 264, (3, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, state_a = loaded.model(ids)
        b, state_b = packed(ids)
        assert torch.equal(a, b)
        assert torch.equal(loaded.model(ids[:, :4], state_a)[0], packed(ids[:, :4], state_b)[0])
    again = groundthink.load(tmp_path / "export" / "ternary.safetensors")  # what groundthink-eval loads
    assert again.step == 3 and again.tokenizer is not None
    with torch.no_grad():
        assert torch.equal(again.model(ids)[0], a)
    assert report["quantised_ratio"] >= 8 and report["quantised_packed_bytes"] * 8 <= report["quantised_fp32_bytes"]
    assert report["file_bytes"] < report["model_fp32_bytes"]
    print(f"packed export ({s.scale}, layers {s.layers}): {report['quantised_fp32_bytes']} B fp32 -> "
          f"{report['quantised_packed_bytes']} B ({report['quantised_ratio']:.1f}x)")


def test_load_packed_refuses_a_training_checkpoint_and_a_missing_file(tmp_path):
    from groundthink.loading import LoadError

    checkpoint = _ste_checkpoint(tmp_path, SteSettings())
    with pytest.raises(LoadError, match="not a packed ternary export"):
        load_packed(checkpoint)
    with pytest.raises(LoadError, match="does not exist"):
        load_packed(tmp_path / "nowhere.safetensors")


# ----- real CLI ----------------------------------------------------------------------------------------------------
STE = ["stage=ste", "name=ste", "callbacks.progress_bar=false", "trainer.log_every_n_steps=1",
       "trainer.max_steps=8", "trainer.val_every_n_steps=4", "callbacks.checkpoint.every_n_steps=100",
       "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return trained_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def ste_run(parent, tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("ste_full")
    args = [*STE, f"init_from={parent}"]
    run_train(root, *args)
    (run,) = run_dirs(root, "ste")
    return run, args


@pytest.mark.slow
def test_ste_cli_logs_fp_ptq_and_ste_losses_exports_and_loads_exactly(parent, ste_run, tmp_path):
    import groundthink

    run, _ = ste_run
    summary = json.loads((run / "summary.json").read_text())
    final = summary["final"]
    assert summary["status"] == "completed" and summary["parent"]["run_id"] == parent.name.rsplit("_", 1)[1]
    fp, ptq, ste = final["ste/fp_val_loss"], final["ste/ptq_val_loss"], final["val/loss"]
    assert read_column(run, "ste/ptq_val_loss") == {0: ptq} and ptq != fp
    parent_val = json.loads((parent / "summary.json").read_text())["final"]["val/loss"]
    assert fp == pytest.approx(parent_val, abs=1e-5)  # the parent, in full precision, on the same held-out batches
    assert ste < ptq
    assert list((run / "wandb").glob("offline-run-*")), "the run logs to W&B (offline) like pretraining"
    log = (run / "train.log").read_text()
    assert f"PTQ {ptq:.4f}, STE {ste:.4f}" in log and "export" in log
    print(f"tiny parent: fp {fp:.4f}, PTQ {ptq:.4f}, STE {ste:.4f}")

    loaded = groundthink.load(run)
    assert any(isinstance(m, TernaryLinear) for m in loaded.model.modules())
    packed = load_packed(run / "export" / "ternary.safetensors")
    ids = torch.randint(0, loaded.model.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids)[0], packed(ids)[0])
    sizes = json.loads((run / "export" / "sizes.json").read_text())
    assert sizes["quantised_fp32_bytes"] >= 8 * sizes["quantised_packed_bytes"]
    assert (run / "export" / "tokenizer").is_dir()

    # groundthink-eval measures the ternary model: its held-out loss is the run's logged final val/loss
    proc = run_cli(tmp_path, "groundthink.evaluate", f"run={run}", "eval=lm", "eval.tasks.lm.max_tokens=64",
                   "eval.tasks.lm.max_documents=2", "threads=1", "progress=false", "wandb.mode=disabled")
    metrics = eval_metrics(run, "lm")
    assert metrics["eval/lm/val_loss_abs_diff"] <= 1e-5, (metrics, proc.stderr[-2000:])


@pytest.mark.slow
def test_ste_resume_after_sigterm_is_exact(ste_run, tmp_path):
    full, args = ste_run
    args = [*args, "logger=csv"]  # the full run logged to W&B too; the numbers do not depend on it
    run_train(tmp_path, *args, "faults.sigterm_at_step=4", expect_rc=None)
    (part,) = run_dirs(tmp_path, "ste")
    assert json.loads((part / "summary.json").read_text())["status"] == "interrupted"
    run_train(tmp_path, *args, f"resume={part}")
    a, b = read_column(full, "train/loss"), read_column(part, "train/loss")
    assert sorted(b) == list(range(1, 9)) and a == b  # identical losses
    assert read_column(part, "val/loss")[8] == read_column(full, "val/loss")[8]  # not validated when interrupted
    assert read_column(part, "ste/ptq_val_loss") == read_column(full, "ste/ptq_val_loss")  # once, at step 0


@pytest.mark.slow
def test_ste_bad_input_fails_before_training_with_one_line(parent, tmp_path):
    proc = run_train(tmp_path, "stage=ste", "name=ste", expect_rc=1)
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "stage=ste starts from a trained run: give init_from=" in error[0], proc.stderr[-2000:]
    proc = run_train(tmp_path, "stage=ste", "name=ste", f"init_from={parent}", "ste.layers=[ffn,mlp]", expect_rc=1)
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "ste.layers: unknown layer selection ['mlp']" in error[0], proc.stderr[-2000:]
    assert run_dirs(tmp_path, "ste") == [] and "Epoch" not in proc.stderr
