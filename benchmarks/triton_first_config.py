"""Each autotuned Triton kernel runs the first of its configurations that works, instead of compiling and timing
every one: a pytest plugin for the parity stage of `gpu_check.sh`, and a runner for its training runs.

    python -m pytest -p benchmarks.triton_first_config -m gpu tests/test_ops_gpu.py ...
    python -m benchmarks.triton_first_config groundthink.train trainer=gpu model=8m ...

fla and mamba_ssm autotune their kernels over up to 27 configurations (block sizes, warps, pipeline stages) on the
first call for each shape and dtype; each configuration is a separate compilation, and on a fresh machine that is
where a GPU check's minutes go (gpu_check.sh's header has the H200 numbers). Every configuration computes the same
function (they differ in speed and in summation order), so parity needs one: the configurations are tried in their
listed order and the first that compiles and runs (finite time) is used; one that fails with out-of-resources or a
compile-time assertion is skipped, as the autotuner itself skips it. A training run in this mode measures real
speed of an untuned choice, a lower bound of what tuning gives (`gpu_check.sh --autotune` tunes in full). Since the
choice made here is not the tuned one, it must not go into Triton's or fla's autotuning caches: gpu_check.sh sets
TRITON_CACHE_AUTOTUNING=0 and FLA_CACHE_RESULTS=0 in this mode.

Without triton (a CPU machine) nothing is patched; the runner says so and runs the module as it is.
"""

from __future__ import annotations

import importlib.util
import math
import runpy
import sys
from collections.abc import Iterable, Iterator


class FirstWorking:
    """`configs` in order, ended after the first one whose timing (`owner.last_timing`, set by the timing call
    between two steps of the iteration) is finite. Re-iterable: each iteration starts again from the first."""

    def __init__(self, configs: Iterable, owner) -> None:
        self.configs = list(configs)
        self.owner = owner

    def __iter__(self) -> Iterator:
        for config in self.configs:
            self.owner.last_timing = None
            yield config
            timing = self.owner.last_timing
            if timing is not None and math.isfinite(timing[0]):
                return

    def __len__(self) -> int:
        return len(self.configs)


def install() -> bool:
    """Patch triton's Autotuner (class-wide, this process); False when triton is not installed."""
    try:
        from triton.runtime import autotuner
    except ImportError:
        return False
    prune, bench = autotuner.Autotuner.prune_configs, autotuner.Autotuner._bench

    def prune_configs(self, kwargs):
        return FirstWorking(prune(self, kwargs), self)

    def timed(self, *args, config, **meta):
        self.last_timing = bench(self, *args, config=config, **meta)
        return self.last_timing

    autotuner.Autotuner.prune_configs = prune_configs
    autotuner.Autotuner._bench = timed
    return True


_installed = False
PATCHED = "triton autotuning: the first working configuration of each kernel (benchmarks.triton_first_config)"


def pytest_configure(config) -> None:
    global _installed
    _installed = install()


def pytest_report_header(config) -> str | None:
    return PATCHED if _installed else None


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.triton_first_config MODULE [ARG ...]`: patch, then run MODULE as `python -m` would."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print("usage: python -m benchmarks.triton_first_config MODULE [ARG ...]  (e.g. groundthink.train model=8m)",
              file=sys.stderr)
        return 2
    try:
        found = importlib.util.find_spec(argv[0]) is not None
    except (ImportError, ValueError):  # a parent package that does not exist, or an empty name part
        found = False
    if not found:
        print(f"triton_first_config: no module named {argv[0]!r} (give a module as for python -m, e.g. "
              "groundthink.train)", file=sys.stderr)
        return 2
    if install():
        print(PATCHED, file=sys.stderr)
    else:
        print("triton_first_config: triton is not installed, nothing to patch", file=sys.stderr)
    sys.argv = list(argv)  # as python -m sees them; run_module puts the module's path in argv[0]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
