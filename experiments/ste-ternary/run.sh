#!/usr/bin/env bash
# Ternary QAT (stage=ste) on the small preset: the parent, then FP / PTQ / STE held-out losses and a full-precision
# fine-tuning control with the same steps and optimiser settings. Results: README.md in this folder.
#   experiments/ste-ternary/run.sh [OUT_ROOT]          (about 25 minutes on 2 busy CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/ste-ternary}
PY=${PYTHON:-.venv/bin/python}
export WANDB_MODE=${WANDB_MODE:-offline}
# 1. the parent: the small preset on the default embedded corpus, 300 steps
$PY -m groundthink.train model=small trainer.max_steps=300 trainer.num_threads=1 logger=csv name=parent \
    paths.output_root="$OUT" callbacks.progress_bar=false
PARENT=$(ls -d "$OUT"/parent/*/ | tail -1)
# 2. STE runs (defaults: per-tensor scale, 8-bit activations, mixers + FFN), per-channel scales, and the control
$PY -m benchmarks.bench_ste --parent "$PARENT" --model small --steps 300 --control \
    --variant "" --variant "ste.scale=channel" --out-root "$OUT"
