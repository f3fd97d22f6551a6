"""Run the benchmarks and print their tables: `python -m benchmarks.run [--quick]`."""

from __future__ import annotations

import argparse

from benchmarks import bench_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a fast look")
    args = parser.parse_args()
    bench_ops.main(quick=args.quick)
    try:
        from benchmarks import bench_models
    except ImportError:
        return
    print()
    bench_models.main()


if __name__ == "__main__":
    main()
