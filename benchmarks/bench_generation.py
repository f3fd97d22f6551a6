"""Streaming generation with the engine: tokens/s and resident memory along an 8k-token stream.

    python -m benchmarks.bench_generation                          # small preset, patterns H and HHHA, 8192 tokens
    python -m benchmarks.bench_generation --tokens 2048 --patterns R,M

Random weights (speed and memory do not depend on training); char vocabulary; one token fed at a time with the
carried state, the way groundthink-generate and groundthink-serve decode. Resident memory (VmRSS) is sampled at
1k, 2k, 4k and 8k tokens; for recurrent-only patterns it must stay flat, attention layers keep only their window.
"""

from __future__ import annotations

import argparse
import time

from groundthink.evaluation.tasks.generation import rss_mb as rss_mib


def run(pattern: str, tokens: int, threads: int) -> dict:
    import torch

    from groundthink.data import build_tokenizer
    from groundthink.generation import GenerationEngine, SamplingParams
    from groundthink.models import HybridLM
    from groundthink.models.presets import preset

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = build_tokenizer("char")
    model = HybridLM(preset("small", vocab_size=tok.vocab_size, pattern=pattern), device="cpu").eval()
    engine = GenerationEngine.for_model(model, tok)
    stream = engine.stream("Once upon a time", SamplingParams(max_tokens=tokens, temperature=1.0, seed=0,
                                                              ignore_eos=True))
    marks = {1024, 2048, 4096, 8192, tokens}
    samples = {}
    started = time.perf_counter()
    for i, _ in enumerate(stream, start=1):
        if i in marks:
            samples[i] = (rss_mib(), i / (time.perf_counter() - started))
    first = samples[min(samples)][0]
    return {"pattern": pattern, "params": model.num_params(), "state_floats": model.state_size(),
            "samples": samples, "growth_pct": 100 * (samples[max(samples)][0] / first - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--patterns", default="H,HHHA")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print("| pattern | params | state floats | tokens | RSS MiB | tokens/s (cumulative) |")
    print("|---|---|---|---|---|---|")
    for pattern in args.patterns.split(","):
        result = run(pattern, args.tokens, args.threads)
        for n, (rss, rate) in sorted(result["samples"].items()):
            print(f"| {pattern} | {result['params']:,} | {result['state_floats']:,} | {n} | {rss:.1f} | {rate:.1f} |")
        print(f"| {pattern} | | | growth {min(result['samples'])}->{max(result['samples'])} | "
              f"{result['growth_pct']:+.2f}% | |")


if __name__ == "__main__":
    main()
