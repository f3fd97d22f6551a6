"""What `trainer.compile=true` costs and gains: eager vs regionally compiled training steps of a preset.

    python -m benchmarks.bench_compile                       # 8m, fp32, B=8, T=256, a cold and a warm compile cache
    python -m benchmarks.bench_compile --preset small --precision bf16 --steps 12

trainer.compile compiles each block in place (`groundthink.training.assembly.compile_blocks`: every block of a
preset has the same code, so inductor builds one forward graph and one backward graph, and one more forward graph
for validation's no-grad mode). Here the same step as `benchmarks.bench_train` (forward + cross-entropy + backward
+ AdamW) is timed:
- eager: the best of a few steps after a warm-up;
- compiled, in a fresh process per cache state: the first step (tracing, inductor code generation and the C++
  compile of its kernels), each later step, and the best of them. "cold" points TORCHINDUCTOR_CACHE_DIR at an empty
  folder (the first run of a model shape on a machine); "warm" reuses the folder the cold run filled (every later
  run of that shape: inductor's FX-graph cache skips code generation and the C++ compile).
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


def _child(preset: str, precision: str, B: int, T: int, steps: int, threads: int, compiled: bool) -> dict:
    import torch

    from benchmarks.bench_models import hybrid_lm_train_step, preset_model
    from groundthink.training.assembly import compile_blocks

    torch.set_num_threads(threads)
    model = preset_model(preset)
    step, _ = hybrid_lm_train_step(model, B, T, precision)
    if compiled:
        compile_blocks(model)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"times": times, "params": model.num_params()}


def run_child(args, *, compiled: bool, cache_dir: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    cmd = [sys.executable, "-m", "benchmarks.bench_compile", "--child", "--preset", args.preset, "--precision",
           args.precision, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps",
           str(args.steps), "--threads", str(args.threads)] + (["--compiled"] if compiled else [])
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench_compile: the {'compiled' if compiled else 'eager'} run failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8m")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="steps per run, the first included (default 10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (a first step and some to time)")
    if args.child:
        print(json.dumps(_child(args.preset, args.precision, args.batch_size, args.seq_len, args.steps, args.threads,
                                args.compiled)))
        return {}

    tokens = args.batch_size * args.seq_len
    print(f"trainer.compile: preset {args.preset}, {args.precision}, B={args.batch_size} T={args.seq_len}, "
          f"{args.threads} threads, {args.steps} steps per run")
    results = {}
    with tempfile.TemporaryDirectory(prefix="gt-inductor-") as cache:
        results["eager"] = run_child(args, compiled=False, cache_dir=cache)
        results["cold"] = run_child(args, compiled=True, cache_dir=cache)
        results["warm"] = run_child(args, compiled=True, cache_dir=cache)
    eager_best = min(results["eager"]["times"][1:])
    print(f"  eager     first step {results['eager']['times'][0]:6.1f} s   best step {eager_best:6.3f} s "
          f"({tokens / eager_best:7.0f} tokens/s)")
    for name in ("cold", "warm"):
        times = results[name]["times"]
        best = min(times[1:])
        print(f"  compiled  first step {times[0]:6.1f} s   best step {best:6.3f} s ({tokens / best:7.0f} tokens/s)  "
              f"x{eager_best / best:.2f} vs eager   [{name} cache]")
        print(f"            every step (s): {' '.join(f'{t:.2f}' for t in times)}")
        results[name]["speedup"] = eager_best / best
    return results


if __name__ == "__main__":
    main()
