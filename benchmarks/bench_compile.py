"""What `trainer.compile=true` costs and gains: eager vs regionally compiled training steps of a preset.

    python -m benchmarks.bench_compile                       # 8m, fp32, B=8, T=256, a cold and a warm compile cache
    python -m benchmarks.bench_compile --preset small --precision bf16 --steps 12
    python -m benchmarks.bench_compile --compile-ops         # trainer.compile_ops: the ops traced into the graphs

trainer.compile compiles each block in place (`groundthink.training.assembly.compile_blocks`: every block of a
preset has the same code, so inductor builds one set of forward and backward graphs for all of them, and more
forward graphs for validation's no-grad mode; the recurrence ops run between the graphs unless --compile-ops). The
step timed is `benchmarks.bench_train`'s (forward + cross-entropy + backward + AdamW), in a fresh process per cache
state:
- "cold" points TORCHINDUCTOR_CACHE_DIR at an empty folder (the first run of a model shape on a machine); "warm"
  reuses the folder the cold run filled (every later run of that shape: inductor's FX-graph cache skips code
  generation and the C++ compile). The first compiled step includes tracing, code generation and the C++ compile.
- after it, an eager copy of the model (same weights) and the compiled one take turns, step by step, so that both
  see the same machine: on a shared VM the speed drifts by more than the gain being measured. The speed-up is the
  median of the per-pair ratios eager / compiled.
Not a test: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _child(preset: str, precision: str, B: int, T: int, steps: int, threads: int, compile_ops: bool) -> dict:
    import torch

    from benchmarks.bench_models import hybrid_lm_train_step, preset_model, taking_turns, timed
    from groundthink.training.assembly import compile_blocks
    from groundthink.training.host_memory import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()  # as a training run does (trainer.keep_freed_memory)
    model, eager = preset_model(preset), preset_model(preset)
    eager.load_state_dict(model.state_dict())
    step, _ = hybrid_lm_train_step(model, B, T, precision)
    eager_step, _ = hybrid_lm_train_step(eager, B, T, precision)
    compile_blocks(model, trace_ops=compile_ops)

    first, eager_first = timed(step), timed(eager_step)
    pairs = taking_turns(step, eager_step, steps - 1)  # (compiled, eager) seconds
    return {"first": first, "eager_first": eager_first, "pairs": pairs, "params": model.num_params()}


def run_child(args, *, cache_dir: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    cmd = [sys.executable, "-m", "benchmarks.bench_compile", "--child", "--preset", args.preset, "--precision",
           args.precision, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps",
           str(args.steps), "--threads", str(args.threads)] + (["--compile-ops"] if args.compile_ops else [])
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench_compile: the compiled run failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8m")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10,
                        help="steps per run and side: the first, one more each, then steps-1 pairs (default 10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile-ops", action="store_true",
                        help="trace the recurrence ops into the compiled graphs (trainer.compile_ops=true)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (a first step and some to time)")
    if args.child:
        print(json.dumps(_child(args.preset, args.precision, args.batch_size, args.seq_len, args.steps, args.threads,
                                args.compile_ops)))
        return {}

    from benchmarks.bench_models import paired_speedup

    tokens = args.batch_size * args.seq_len
    print(f"trainer.compile: preset {args.preset}, {args.precision}, B={args.batch_size} T={args.seq_len}, "
          f"{args.threads} threads, {args.steps} steps per run, "
          f"{'ops traced into the graphs' if args.compile_ops else 'ops between the graphs'}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="gt-inductor-") as cache:
        for name in ("cold", "warm"):
            results[name] = r = run_child(args, cache_dir=cache)
            paired = paired_speedup(r["pairs"])
            compiled_s, eager_s, r["speedup"] = paired["a_s"], paired["b_s"], paired["ratio"]
            print(f"  [{name} cache] first compiled step {r['first']:5.1f} s (process {r['process_s']:5.1f} s)   "
                  f"then, taking turns: eager {eager_s:.3f} s ({tokens / eager_s:5.0f} tokens/s), compiled "
                  f"{compiled_s:.3f} s ({tokens / compiled_s:5.0f} tokens/s); speed-up x{r['speedup']:.2f} "
                  "(median of the per-pair ratios)")
    return results


if __name__ == "__main__":
    main()
