"""The throughput table of `gpu_check.sh`: one row per training run it made, read from the run's own files.

    python -m benchmarks.gpu_report OUT --presets 8m 125m --impls chunked auto [--warmup 20]

For each preset and impl, the newest run under OUT/gpu_check_<preset>_<impl>/: parameters, seconds from the command
to the end of the first step (summary.json's startup_s: on a GPU that is mostly Triton compiling the kernels),
tokens/s of the steps after the warm-up (the perf/tokens_per_s windows of metrics.csv that end after step
`--warmup`, combined as total tokens over total time; the run's summary figure leaves out only its first step, and
Triton compiles again for each new shape, e.g. validation's), MFU at that rate (6 x non-embedding parameters x
tokens/s over the device's bf16 peak, as the run logged it), the final validation loss, the impl each op resolved
to (the checkpoint's metadata), and the speed relative to the first impl listed (e.g. the kernels over the
torch-only run). A run with no window after the warm-up falls back to its summary figure, marked `*`. A run that is
missing or did not complete is a row that says so, not an omission.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from groundthink.training.metrics_file import read_metrics_csv


def steady_rate(windows: list[tuple[int, float]], mfus: list[tuple[int, float]], warmup: int):
    """(tokens/s, MFU) over the windows ending after step `warmup`, or (None, None) if there are none. Windows
    hold equal token counts (every_n_steps steps of one batch shape), so the rate over all of them is the harmonic
    mean of their rates; MFU is proportional to the rate, with the factor the run logged."""
    after = [(step, rate) for step, rate in windows if step > warmup and rate > 0]
    if not after:
        return None, None
    rate = len(after) / sum(1.0 / r for _, r in after)
    last_step, last_rate = after[-1]
    last_mfu = dict(mfus).get(last_step)
    return rate, (rate * last_mfu / last_rate if last_mfu is not None else None)


def read_run(out: Path, preset: str, impl: str, warmup: int = 20) -> dict | None:
    runs = sorted((out / f"gpu_check_{preset}_{impl}").glob("*/summary.json"))
    if not runs:
        return None
    run = runs[-1].parent
    summary = json.loads((run / "summary.json").read_text())
    series = read_metrics_csv(run / "metrics.csv") if (run / "metrics.csv").exists() else {}
    rate, mfu = steady_rate(series.get("perf/tokens_per_s", []), series.get("perf/mfu", []), warmup)
    last = run / "checkpoints" / "last.json"  # the checkpoint's metadata names the impl each op resolved to
    return {
        "status": summary.get("status"),
        "params": summary.get("num_params"),
        "first_step_s": summary.get("startup_s"),
        "tokens_per_s": rate if rate is not None else summary.get("tokens_per_s"),
        "from_summary": rate is None,
        "mfu": mfu,
        "val_loss": summary.get("final", {}).get("val/loss"),
        "ops": json.loads(last.read_text()).get("impl", {}) if last.exists() else {},
    }


def table(out: Path, presets: list[str], impls: list[str], warmup: int = 20) -> list[str]:
    lines = [f"{'preset':>8} {'impl':>9} {'params':>12} {'1st step':>9} {'tokens/s':>12} {'MFU':>7} "
             f"{'val loss':>9} {'vs ' + impls[0]:>11}  ops ran as"]
    for preset in presets:
        base = None
        for impl in impls:
            run = read_run(out, preset, impl, warmup)
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
            first = "n/a" if run["first_step_s"] is None else f"{run['first_step_s']:.1f}s"
            shown = f"{rate:,.0f}" + ("*" if run["from_summary"] else "")
            ops = ", ".join(f"{op}={name}" for op, name in run["ops"].items())
            lines.append(f"{preset:>8} {impl:>9} {run['params']:>12,} {first:>9} {shown:>12} {mfu:>7} {val:>9} "
                         f"{ratio:>11}  {ops}")
    lines.append(f"tokens/s and MFU: the steps after step {warmup} (*: the run's summary figure, no step after it); "
                 "1st step: command to the end of the first step")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder gpu_check.sh trained into (--out)")
    parser.add_argument("--presets", nargs="+", required=True)
    parser.add_argument("--impls", nargs="+", required=True)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of tokens/s and MFU (default 20)")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out} is not a folder")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    print("\n".join(table(args.out, args.presets, args.impls, args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
