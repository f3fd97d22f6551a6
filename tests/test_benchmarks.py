"""benchmarks/bench_train.py at its smallest settings (tiny preset, B=1, T=32, one repeat, one thread): the report's
structure and the sanity of its numbers (positive throughputs, fractions of peak in (0, 1.5), split shares summing
to 100 %, the transformers comparison present when transformers is installed), the op capture (every recurrence
call of the model seen, counted per layer, and the wrapped functions put back), and the parameter counts. Speeds
are not asserted."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks import bench_train
from tests.conftest import tiny_config

TINY = dict(presets=("tiny",), threads=1, batch_size=1, seq_len=32, repeats=1, gemm_shapes=((256, 256, 256),),
            gemm_repeats=3, hf_preset="tiny", profile_repeats=1)
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def check_preset(result: dict, peaks: dict) -> None:
    assert 0 < result["n_non_embedding"] < result["n_params"]
    for precision in ("fp32", "bf16"):
        assert peaks[precision]["peak"] == max(peaks[precision]["shapes"].values()) > 0
        step = result[precision]
        assert step["tokens_per_s"] > 0
        assert 0 < step["fraction_of_peak"] < 1.5
        split = step["split"]
        assert split["step_ms"] > 0 and split["recurrence_ms"] > 0 and split["model_matmul_ms"] > 0
        assert sum(split[f"{k}_pct"] for k in ("matmul", "recurrence", "other")) == pytest.approx(100.0)
        assert split["ops"] and all(op["count"] >= 1 and op["ms"] > 0 for op in split["ops"].values())


def test_report_of_the_hybrid_preset(one_thread, capsys):
    from groundthink import ops
    from groundthink.mixers import mamba2, rwkv6

    results = bench_train.main(**TINY)
    out = capsys.readouterr().out
    assert results["threads"] == 1 and set(results["presets"]) == {"tiny"}
    check_preset(results["presets"]["tiny"], results["gemm"])
    ops_seen = results["presets"]["tiny"]["fp32"]["split"]["ops"]
    n_layers = bench_train.preset_model("tiny").cfg.n_layers
    assert sorted(label.split()[0] for label in ops_seen) == ["conv", "ssd", "wkv6"]
    assert all(op["count"] == n_layers for op in ops_seen.values())  # every H layer calls each op once
    # the capture put the real functions back
    assert rwkv6.wkv6 is ops.wkv6 and mamba2.ssd is ops.ssd and mamba2.causal_conv1d is ops.causal_conv1d
    assert "GEMM" in out and "step-time split" in out
    if not HAS_TRANSFORMERS:
        assert results["hf"] is None and "skipped" in out
        return
    hf = results["hf"]
    assert hf["mixer"]["path"]["path"] == "pure PyTorch"  # no CUDA kernels on CPU
    for part in ("mixer", "model"):
        assert hf[part]["ratio"] > 0
        assert hf[part]["groundthink"]["tokens_per_s"] > 0 and hf[part]["hf"]["tokens_per_s"] > 0
    assert hf["mixer"]["groundthink"]["params"] > 0 and hf["mixer"]["hf"]["params"] > 0
    assert hf["model"]["groundthink"]["params"] > hf["model"]["hf"]["params"]  # GroundThink's blocks carry an FFN
    assert "Hugging Face transformers" in out and "pure PyTorch" in out


def test_mamba_pattern_and_missing_transformers(one_thread, capsys, monkeypatch):
    monkeypatch.setattr(bench_train, "hf_mamba2_modules", lambda: None)
    results = bench_train.main(**TINY, pattern="M")
    result = results["presets"]["tiny"]
    assert result["pattern"] == "M"
    check_preset(result, results["gemm"])
    assert sorted(label.split()[0] for label in result["fp32"]["split"]["ops"]) == ["conv", "ssd"]
    assert "hf_tokens_per_s" not in result["fp32"]
    assert results["hf"] is None
    assert "skipped (transformers is not importable)" in capsys.readouterr().out


def test_non_embedding_params_counts_a_tied_head_once():
    from groundthink.models import HybridLM

    untied = HybridLM(tiny_config(), device="cpu")
    tied = HybridLM(tiny_config(tie_embeddings=True), device="cpu")
    embed = untied.embed.weight.numel()
    assert bench_train.hybrid_lm_non_embedding(untied) == untied.num_params() - 2 * embed
    assert bench_train.hybrid_lm_non_embedding(tied) == tied.num_params() - embed
    assert bench_train.hybrid_lm_non_embedding(tied) == bench_train.hybrid_lm_non_embedding(untied)


def test_matmul_events():
    assert all(bench_train.is_matmul_event(n) for n in ("aten::mm", "aten::bmm", "aten::addmm", "aten::linear",
                                                         "aten::mkldnn_linear", "mkldnn::matmul"))
    assert not any(bench_train.is_matmul_event(n) for n in ("aten::add", "aten::mul", "aten::copy_",
                                                             "MmBackward0"))


def test_a_profile_drops_kinetos_notices_and_passes_everything_else_written_to_stderr(capfd):
    import os
    import sys

    def step():
        torch.ones(8) @ torch.ones(8)
        os.write(2, b"an error from C++\n")
        os.write(2, b"USDT:2026-12-04 13:50:07 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        print("a Python warning", file=sys.stderr)

    wall_ms, _ = bench_train.profile_once(step)
    err = capfd.readouterr().err
    assert wall_ms > 0
    assert sorted(err.splitlines()) == ["a Python warning", "an error from C++"]  # (Python's own stream: any order)
    # and stderr is back where it was
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_taking_turns_alternates_which_side_goes_first_after_a_warm_up_of_each():
    from benchmarks.bench_models import paired_speedup, taking_turns

    calls = []
    pairs = taking_turns(lambda: calls.append("a"), lambda: calls.append("b"), 4)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(pairs) == 4 and all(a >= 0 and b >= 0 for a, b in pairs)
    summary = paired_speedup([(1.0, 2.0), (2.0, 2.0), (1.0, 3.0)])  # ratios b/a: 2, 1, 3
    assert summary == {"a_s": 1.0, "b_s": 2.0, "ratio": 2.0, "pairs": 3}
