"""Named model shapes, and parameter-matched variants for sweep cells.

PRESETS maps a name to ModelConfig fields (everything else keeps its default; the training entry point
replaces vocab_size with the tokenizer's). `python -m groundthink.models.presets` prints every preset's
parameter count with the char vocabulary (264) and the 24k BPE vocabulary, counted on the meta device (no
memory is allocated).
"""

from __future__ import annotations

import math

import torch

from groundthink.models.config import ModelConfig

PRESETS: dict[str, dict] = {
    "tiny": {
        "d_model": 64,
        "n_layers": 2,
        "mixers": {
            "rwkv6": {"n_heads": 2},
            "mamba2": {"d_state": 16, "head_dim": 32},
            "attention": {"n_heads": 2, "window": 64},
        },
    },
    # The default run (`groundthink-train` with no overrides): trains on 2 CPU cores in a few minutes.
    "small": {
        "d_model": 128,
        "n_layers": 4,
        "mixers": {
            "rwkv6": {"n_heads": 2},
            "mamba2": {"d_state": 32, "head_dim": 32},
            "attention": {"n_heads": 2, "window": 256},
        },
    },
    # The previous version's shapes: 5M "deep" (its best so far) and 8M "wide" (worse).
    "5m_deep": {"d_model": 256, "n_layers": 6, "mixers": {"rwkv6": {"n_heads": 4}}},
    "8m_wide": {"d_model": 384, "n_layers": 4, "mixers": {"rwkv6": {"n_heads": 6}}},
    "8m": {"d_model": 256, "n_layers": 12, "mixers": {"rwkv6": {"n_heads": 4}}},
    "30m": {"d_model": 384, "n_layers": 10, "mixers": {"rwkv6": {"n_heads": 6}}},
    "125m": {
        "d_model": 768,
        "n_layers": 16,
        "vocab_size": 24000,
        "mixers": {"rwkv6": {"n_heads": 12}, "mamba2": {"d_state": 32}, "attention": {"n_heads": 12}},
    },
}

MATCH_TOLERANCE = 0.05


_COUNTS: dict[str, int] = {}


def count_params(cfg: ModelConfig) -> int:
    """Parameter count of HybridLM(cfg), built on the meta device (no memory allocated, no init cost); remembered
    per config (its repr names every field), since param_matched's searches ask for the same sizes many times."""
    from groundthink.models.lm import HybridLM

    key = repr(cfg)
    if key not in _COUNTS:
        with torch.device("meta"):
            _COUNTS[key] = HybridLM(cfg, device="meta").num_params()
    return _COUNTS[key]


def preset(name: str, **changes) -> ModelConfig:
    """The named preset as a ModelConfig, with `changes` applied (see ModelConfig.replace)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name]).replace(**changes)


def param_matched(base_cfg: ModelConfig | dict, **changes) -> ModelConfig:
    """base_cfg with `changes` applied and d_model re-chosen so the parameter count stays within ±5% of base.

    d_model moves in steps of the head granularity (`ModelConfig.d_model_multiple`: a multiple of 8 and of what
    every used mixer's head split needs); the closest count wins.
    When those steps are too coarse to land within ±5%, ffn_mult is tuned as well (at the nearest d_models),
    moving it as little as possible. Raises ValueError when nothing gets within the tolerance.
    """
    base = base_cfg if isinstance(base_cfg, ModelConfig) else ModelConfig.from_dict(base_cfg)
    if "d_model" in changes:
        raise ValueError("param_matched chooses d_model itself; do not pass d_model in changes")
    target = count_params(base)
    changed = base.replace(**changes)
    g = changed.d_model_multiple()

    def count_at(k: int) -> int | None:
        try:
            return count_params(changed.replace(d_model=k * g))
        except ValueError:
            return None

    lo, hi = 1, max(2, 4 * math.ceil(base.d_model / g))
    while (count_at(hi) or 0) < target:
        hi *= 2
    while hi - lo > 1:  # smallest k whose count reaches the target (counts grow with d_model)
        mid = (lo + hi) // 2
        c = count_at(mid)
        if c is not None and c >= target:
            hi = mid
        else:
            lo = mid
    candidates = [(k, count_at(k)) for k in (hi - 1, hi) if k >= 1]
    candidates = [(k, c) for k, c in candidates if c is not None]
    if not candidates:
        raise ValueError(f"param_matched: no valid d_model near {hi * g} for {changes}")
    k, c = min(candidates, key=lambda kc: abs(kc[1] - target))
    if abs(c - target) <= MATCH_TOLERANCE * target:
        return changed.replace(d_model=k * g)
    # d_model steps too coarse here (e.g. Mamba's head split): keep the nearest d_model on each side and tune
    # the FFN width, the one continuous knob, choosing the match whose ffn_mult moves least.
    options = []
    for k, _ in candidates:
        cfg = _match_ffn_mult(changed.replace(d_model=k * g), target)
        if cfg is not None:
            options.append(cfg)
    if not options:
        raise ValueError(
            f"param_matched: cannot keep {target:,} parameters within ±{MATCH_TOLERANCE:.0%} "
            f"after {changes}: "
            f"closest d_model={k * g} has {c:,}"
        )
    return min(options, key=lambda cfg: abs(math.log(cfg.ffn_mult / changed.ffn_mult)))


def _match_ffn_mult(cfg: ModelConfig, target: int) -> ModelConfig | None:
    lo, hi = 0.25 * cfg.ffn_mult, 4.0 * cfg.ffn_mult
    for _ in range(12):
        mid = (lo + hi) / 2
        if count_params(cfg.replace(ffn_mult=mid)) < target:
            lo = mid
        else:
            hi = mid
    best = min(
        (cfg.replace(ffn_mult=round(m, 4)) for m in (lo, hi)), key=lambda c: abs(count_params(c) - target)
    )
    return best if abs(count_params(best) - target) <= MATCH_TOLERANCE * target else None


def main() -> None:
    print(f"{'preset':<10} {'shape':<22} {'params (vocab 264)':>20} {'params (vocab 24000)':>22}")
    for name in PRESETS:
        cfg = preset(name)
        shape = f"{cfg.n_layers}x{cfg.d_model} {cfg.pattern}"
        char = count_params(cfg.replace(vocab_size=264))
        bpe = count_params(cfg.replace(vocab_size=24000))
        print(f"{name:<10} {shape:<22} {char:>20,} {bpe:>22,}")


if __name__ == "__main__":
    main()
