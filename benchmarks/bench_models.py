"""Throughput of the mixers (fwd+bwd, reference vs chunked impl) and of a full `8m` training step.

Mixers are built from a ModelConfig with head dim 64 everywhere (d_model 256: RWKV-6 4 heads of 64, Mamba-2 8
heads of P = 64 with N = 64, attention 4 heads of 64 with window 512), their parameters perturbed so no
zero-initialised projection short-cuts the work. The training step is forward + cross-entropy + backward +
AdamW step of the `8m` preset (vocab 264, impl chunked) in fp32 and under bf16 autocast. Timings are the best
of a few repeats after one warm-up. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from groundthink.mixers import MIXERS
from groundthink.models import HybridLM, ModelConfig
from groundthink.models.presets import preset as preset_config

MIXER_CFG = dict(
    d_model=256, n_heads=4, d_state=64, mamba_head_dim=64, attn_heads=4, attn_window=512, n_layers=2
)


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def timed(fn) -> float:
    """Wall seconds of one call of fn."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def taking_turns(fn_a, fn_b, pairs: int) -> list[tuple[float, float]]:
    """Wall seconds (a, b) of `pairs` rounds in which `fn_a` and `fn_b` take turns (which goes first alternates),
    after one warm-up call of each. On a shared machine whose speed drifts by more than the difference being
    measured, two separate best-of runs can each land in a different phase; in a pair both see the same machine."""
    fn_a(), fn_b()
    out = []
    for i in range(pairs):
        if i % 2 == 0:
            a = timed(fn_a)
            out.append((a, timed(fn_b)))
        else:
            b = timed(fn_b)
            out.append((timed(fn_a), b))
    return out


def paired_speedup(pairs: list[tuple[float, float]]) -> dict:
    """Median seconds of each side and the median of the per-pair ratios b / a (how many times faster a is)."""
    a_s, b_s = (statistics.median(col) for col in zip(*pairs))
    return {"a_s": a_s, "b_s": b_s, "ratio": statistics.median(b / a for a, b in pairs), "pairs": len(pairs)}


def perturb_parameters(module: torch.nn.Module, scale: float = 0.02) -> None:
    """Add N(0, scale²) noise to every parameter, so no zero-initialised projection short-cuts the work."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn_like(param))


def mixer_tokens_per_s(name: str, impl: str, B: int, T: int, repeats: int) -> float:
    torch.manual_seed(0)
    mixer = MIXERS[name].from_config(ModelConfig.from_dict({**MIXER_CFG, "impl": impl}), layer_id=1, device="cpu")
    perturb_parameters(mixer)
    x = torch.randn(B, T, MIXER_CFG["d_model"], requires_grad=True)

    def step():
        y, state = mixer(x)
        loss = y.square().mean() + sum(t.float().sum() for t in state.values() if t.is_floating_point())
        loss.backward()
        mixer.zero_grad(set_to_none=True)
        x.grad = None

    return B * T / best_time(step, repeats)


def _impl_matters(name: str) -> bool:
    build = MIXERS[name].from_config
    impls = {
        build(ModelConfig.from_dict({**MIXER_CFG, "impl": i}), layer_id=0, device="cpu").impl
        for i in ("reference", "chunked")
    }
    return len(impls) > 1


def make_train_step(logits_of, optimizer: torch.optim.Optimizer, ids: torch.Tensor, precision: str):
    """One training step as a closure: logits_of(inputs) under bf16 autocast when precision is "bf16", fp32
    cross-entropy against the next tokens, backward, optimizer step, zero_grad. ids [B, T+1]."""

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = logits_of(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def preset_model(preset: str, **changes) -> HybridLM:
    """HybridLM of a preset with the benchmarks' vocab (264) and impl (chunked); `changes` as for preset()."""
    torch.manual_seed(0)
    return HybridLM(preset_config(preset, **{"vocab_size": 264, "impl": "chunked", **changes}), device="cpu")


def hybrid_lm_train_step(model: HybridLM, B: int, T: int, precision: str):
    """(step closure, ids) of a HybridLM training step: forward + cross-entropy + backward + AdamW step."""
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)
    ids = torch.randint(0, model.cfg.vocab_size, (B, T + 1))
    return make_train_step(lambda inputs: model(inputs)[0], optimizer, ids, precision), ids


def train_step_tokens_per_s(
    preset: str, B: int, T: int, precision: str, repeats: int, **changes
) -> tuple[float, int]:
    model = preset_model(preset, **changes)
    step, _ = hybrid_lm_train_step(model, B, T, precision)
    return B * T / best_time(step, repeats), model.num_params()


def main(quick: bool = False) -> dict:
    torch.set_num_threads(2)
    shapes = [(2, 64), (1, 256)] if quick else [(8, 256), (4, 1024)]
    repeats = 1 if quick else 2
    results: dict = {"mixers": {}, "train_step": {}}
    print(f"mixers fwd+bwd, fp32, d_model 256, head dim 64, {torch.get_num_threads()} threads (ktok/s)")
    print(f"{'mixer':<10} {'B':>3} {'T':>5} {'reference':>10} {'chunked':>9} {'speed-up':>9}")
    for name in MIXERS:
        for B, T in shapes:
            chunked = mixer_tokens_per_s(name, "chunked", B, T, repeats)
            # a mixer whose impl ignores the choice (attention is always SDPA) is timed once
            ref = mixer_tokens_per_s(name, "reference", B, T, repeats) if _impl_matters(name) else chunked
            results["mixers"][(name, B, T)] = {"reference": ref, "chunked": chunked}
            print(f"{name:<10} {B:>3} {T:>5} {ref / 1e3:>10.2f} {chunked / 1e3:>9.2f} {chunked / ref:>8.1f}x")
    B, T = (2, 64) if quick else (8, 256)
    print(f"\ntraining step (fwd + loss + bwd + AdamW) of preset 8m, B={B} T={T}, vocab 264, impl chunked")
    for precision in ("fp32", "bf16"):
        tps, n_params = train_step_tokens_per_s("8m", B, T, precision, repeats)
        results["train_step"][precision] = tps
        print(f"  {precision:<5} {tps / 1e3:8.2f} ktok/s   ({n_params / 1e6:.1f}M parameters)")
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a fast look")
    main(quick=parser.parse_args().quick)
