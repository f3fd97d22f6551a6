"""Ternary QAT recovery: full-precision, naive post-training ternarisation (PTQ) and STE fine-tuned held-out loss.

    python -m benchmarks.bench_ste --parent outputs/parent/<run> --model small --steps 300
    python -m benchmarks.bench_ste --parent <run> --model small --variant "" --variant "ste.scale=channel" --control

Each variant is one real `groundthink-train stage=ste init_from=<parent>` run (its extra overrides given as one
space-separated string); the three numbers come from that run alone: `ste/fp_val_loss` and `ste/ptq_val_loss`
(logged at step 0 on the run's held-out batches, which are the parent's: same data settings and seed) and its final
`val/loss`. Recovery = (ptq - ste) / (ptq - fp). `--control` also fine-tunes the parent in full precision with the
same steps and optimiser settings (stage=pretrain, the lr schedule of conf/stage/ste.yaml): the loss a
full-precision model reaches with the same extra training, so `recovery vs control` separates what ternary QAT
recovers from what more training of an under-trained parent gives. Prints a Markdown table; the packed size comes
from the run's export/sizes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def train(args: argparse.Namespace, name: str, overrides: list[str]) -> Path:
    root = Path(args.out_root).resolve()
    before = set((root / name).glob("*")) if (root / name).is_dir() else set()
    command = [sys.executable, "-m", "groundthink.train", f"init_from={Path(args.parent).resolve()}",
               f"model={args.model}", f"trainer.max_steps={args.steps}", f"trainer.num_threads={args.threads}",
               "logger=csv", "callbacks.progress_bar=false", f"name={name}", f"paths.output_root={root}",
               f"seed={args.seed}", *overrides]
    print("$ " + " ".join(command[1:]), file=sys.stderr, flush=True)
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    (run,) = sorted(set((root / name).glob("*")) - before)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", required=True, help="the pretrained run folder (or checkpoint)")
    parser.add_argument("--model", required=True, help="the parent's model preset (model=...)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--variant", action="append", default=None,
                        help='extra overrides of one STE run, e.g. "ste.scale=channel optim.lr=3e-3" (repeatable)')
    parser.add_argument("--control", action="store_true", help="also fine-tune the parent in full precision")
    parser.add_argument("--out-root", default="outputs", help="where the runs go (<out-root>/ste_bench/...)")
    args = parser.parse_args()
    variants = args.variant if args.variant is not None else [""]

    control = None
    if args.control:
        stage = yaml.safe_load((Path(__file__).resolve().parent.parent / "conf" / "stage" / "ste.yaml").read_text())
        optim = [f"optim.{k}={v}" for k, v in stage["optim"].items()]
        run = train(args, "ste_bench_fp_control", optim)
        control = json.loads((run / "summary.json").read_text())["final"]["val/loss"]
        print(f"full-precision control ({' '.join(optim)}): val/loss {control:.4f}  {run}", file=sys.stderr)

    header = "| STE overrides | fp | PTQ | STE | recovery |"
    rule = "|---|---|---|---|---|"
    if control is not None:
        header += " fp fine-tuned (control) | recovery vs control |"
        rule += "---|---|"
    rows = []
    for variant in variants:
        run = train(args, "ste_bench", ["stage=ste", *variant.split()])
        final = json.loads((run / "summary.json").read_text())["final"]
        fp, ptq, ste = final["ste/fp_val_loss"], final["ste/ptq_val_loss"], final["val/loss"]
        sizes = json.loads((run / "export" / "sizes.json").read_text())
        row = (f"| `{variant or '(defaults)'}` | {fp:.4f} | {ptq:.4f} | {ste:.4f} | {(ptq - ste) / (ptq - fp):.3f} |")
        if control is not None:
            row += f" {control:.4f} | {(ptq - ste) / (ptq - control):.3f} |"
        rows.append(row)
        print(f"{variant or '(defaults)'}: fp {fp:.4f} PTQ {ptq:.4f} STE {ste:.4f}; packed "
              f"{sizes['quantised_fp32_bytes']} B fp32 -> {sizes['quantised_packed_bytes']} B "
              f"({sizes['quantised_ratio']:.1f}x), file {sizes['file_bytes']} B  {run}", file=sys.stderr, flush=True)
    print("\n".join([header, rule, *rows]))


if __name__ == "__main__":
    main()
