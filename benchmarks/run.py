"""Run the benchmarks and print their tables: `python -m benchmarks.run [--quick]`.

In order: the ops (benchmarks.bench_ops), the mixers and the 8m training step (benchmarks.bench_models), then the
training report (benchmarks.bench_train: GEMM peak, step tokens/s and fraction of peak per preset, the profiled
matmul / recurrence / other split, Mamba-2 against transformers). The options after --quick are bench_train's.
"""

from __future__ import annotations

import argparse

from benchmarks import bench_ops


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        from benchmarks import bench_models, bench_train
    except ImportError:
        parser.add_argument("--quick", action="store_true", help="smaller shapes, for a fast look")
        args = parser.parse_args()
        return {"ops": bench_ops.main(quick=args.quick)}
    bench_train.add_arguments(parser)
    args = parser.parse_args()
    if not args.malloc_default:  # before any table, as in a training run (trainer.keep_freed_memory)
        from groundthink.training.host_memory import keep_freed_memory

        keep_freed_memory()
    results = {"ops": bench_ops.main(quick=args.quick)}
    print()
    results["models"] = bench_models.main(quick=args.quick)
    print()
    results["train"] = bench_train.main_from_args(args)
    return results


if __name__ == "__main__":
    main()
