"""The throughput table of `gpu_check.sh`: one row per training run it made, read from the run's own files.

    python -m benchmarks.gpu_report OUT --presets 8m 125m --impls chunked auto

For each preset and impl, the newest run under OUT/gpu_check_<preset>_<impl>/: parameters, tokens/s over the whole
run (summary.json), MFU of the last logged window (metrics.csv: 6 x non-embedding parameters x tokens/s over the
device's peak), the final validation loss, the impl each op resolved to (the checkpoint's metadata), and the speed
relative to the first impl listed (e.g. the kernels over the torch-only run). A run that is missing or did not
complete is a row that says so, not an omission.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from groundthink.training.metrics_file import read_metrics_csv


def read_run(out: Path, preset: str, impl: str) -> dict | None:
    runs = sorted((out / f"gpu_check_{preset}_{impl}").glob("*/summary.json"))
    if not runs:
        return None
    run = runs[-1].parent
    summary = json.loads((run / "summary.json").read_text())
    mfu = read_metrics_csv(run / "metrics.csv").get("perf/mfu", []) if (run / "metrics.csv").exists() else []
    last = run / "checkpoints" / "last.json"  # the checkpoint's metadata names the impl each op resolved to
    return {
        "status": summary.get("status"),
        "params": summary.get("num_params"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "mfu": mfu[-1][1] if mfu else None,
        "val_loss": summary.get("final", {}).get("val/loss"),
        "ops": json.loads(last.read_text()).get("impl", {}) if last.exists() else {},
    }


def table(out: Path, presets: list[str], impls: list[str]) -> list[str]:
    lines = [f"{'preset':>8} {'impl':>9} {'params':>12} {'tokens/s':>11} {'MFU':>7} {'val loss':>9} "
             f"{'vs ' + impls[0]:>11}  ops ran as"]
    for preset in presets:
        base = None
        for impl in impls:
            run = read_run(out, preset, impl)
            if run is None:
                lines.append(f"{preset:>8} {impl:>9}  no run under {out}")
                continue
            if run["status"] != "completed":
                lines.append(f"{preset:>8} {impl:>9}  run {run['status']}, not completed")
                continue
            rate = run["tokens_per_s"]
            if impl == impls[0]:
                base = rate
            ratio = f"{rate / base:.2f}x" if base else "n/a"
            mfu = f"{run['mfu']:.1%}" if run["mfu"] is not None else "n/a"
            val = "n/a" if run["val_loss"] is None else f"{run['val_loss']:.4f}"
            ops = ", ".join(f"{op}={name}" for op, name in run["ops"].items())
            lines.append(f"{preset:>8} {impl:>9} {run['params']:>12,} {rate:>11,.0f} {mfu:>7} {val:>9} {ratio:>11}"
                         f"  {ops}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder gpu_check.sh trained into (--out)")
    parser.add_argument("--presets", nargs="+", required=True)
    parser.add_argument("--impls", nargs="+", required=True)
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out} is not a folder")
    print("\n".join(table(args.out, args.presets, args.impls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
