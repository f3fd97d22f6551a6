"""Wall time of one sweep, Hydra's basic launcher vs `hydra/launcher=local`: `python -m benchmarks.bench_launchers`.

The same 4-job sweep (model=tiny, `--steps` steps of 4 x 32 tokens, CSV logging, 1 torch thread per job:
model.gamma_init=0.01,1.0 x seed=1,2) runs through `groundthink-train -m` with the basic launcher (jobs one after
another in one process) and with the local launcher (`--parallel` jobs at a time, each its own process), alternately
`--repeats` times so that load from other processes hits both alike. Prints each wall time, the CPU time of the
whole process tree (user + system of every process it started, which other load does not inflate much) and the
medians. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = ["model=tiny", "debug=fast", "logger=csv", "trainer.num_threads=1", "model.gamma_init=0.01,1.0", "seed=1,2"]


def run_sweep(launcher: list[str], steps: int, root: Path) -> tuple[float, float]:
    env = dict(os.environ, WANDB_MODE="disabled", HF_DATASETS_OFFLINE="1", GROUNDTHINK_OUTPUT_ROOT=str(root))
    args = [sys.executable, "-m", "groundthink.train", "-m", *launcher, *SWEEP, f"trainer.max_steps={steps}",
            f"trainer.val_every_n_steps={steps}", f"callbacks.checkpoint.every_n_steps={steps}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(launcher) or 'basic'} sweep failed:\n{proc.stderr[-3000:]}")
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    variants = {"basic": [], f"local x{args.parallel}": ["hydra/launcher=local",
                                                          f"hydra.launcher.max_parallel={args.parallel}"]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory(prefix="gt-bench-launchers-") as tmp:
        for r in range(args.repeats):
            for name, launcher in variants.items():
                wall, cpu = run_sweep(launcher, args.steps, Path(tmp) / f"{name.split()[0]}_{r}")
                times[name].append(wall)
                cpus[name].append(cpu)
                print(f"repeat {r + 1}: {name:9s} wall {wall:6.1f} s  cpu {cpu:6.1f} s", flush=True)
    print()
    for name, values in times.items():
        print(f"{name:9s} wall median {statistics.median(values):6.1f} s (all: {', '.join(f'{v:.1f}' for v in values)})"
              f"   cpu median {statistics.median(cpus[name]):6.1f} s")


if __name__ == "__main__":
    main()
