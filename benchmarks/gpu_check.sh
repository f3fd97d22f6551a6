#!/usr/bin/env bash
# GroundThink's GPU check (`make gpu-check`): what to run, in one go, the first minutes a CUDA machine is available.
#
#   1. parity: tests/test_ops_gpu.py and the GPU tests of tests/test_gla.py — GroundThink's chunked ops against
#      fla's chunk_rwkv6 / chunk_gla, mamba_ssm's mamba_chunk_scan_combined and causal_conv1d: outputs, final states
#      and every input gradient. A kernel package that is not installed is reported as skipped (pytest's reason),
#      never as passed.
#   2. throughput: a short bf16 training run of each preset (default 8m and 125m) with model.impl=auto on the GPU;
#      prints tokens/s and MFU (6 x non-embedding parameters x tokens/s over the GPU's bf16 peak) from each run's
#      summary.json and metrics.csv.
#
# It stops at the first failure, naming the step. Without a CUDA device it says so and exits 0: nothing to check.
# Meant to finish in under 5 minutes on one H100/H200 (the default step counts are sized for that).
#
#   benchmarks/gpu_check.sh [--python PATH] [--wheels DIR] [--steps N] [--presets "8m 125m"] [--batch B]
#                           [--seq-len T] [--out DIR] [--skip-parity] [--skip-train] [--cpu-rehearsal]
#
#   --python   the interpreter with a CUDA build of torch (default: .venv/bin/python if it exists, else python3)
#   --wheels   install what that interpreter lacks from this folder only (pip --no-index), e.g. on a machine with
#              no registry: `make gpu-wheels` fills ./gpu-wheels here, carry it there
#   --steps    training steps per preset (default 200; the first ~20 are warm-up and fall outside the window)
#   --out      where the training runs go (default: a new temporary folder, kept and printed)
#   --cpu-rehearsal  run the training and report steps on the CPU (fp32, no install, no parity): tests the script
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu_check: $*" >&2; exit 2; }
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }

PY="" WHEELS="" STEPS=200 PRESETS="8m 125m" BATCH=16 SEQ=512 OUT="" PARITY=1 TRAIN=1 REHEARSAL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) [ $# -ge 2 ] || die "--python needs a path"; PY="$2"; shift 2 ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS="$2"; shift 2 ;;
    --steps) [ $# -ge 2 ] || die "--steps needs a number"; STEPS="$2"; shift 2 ;;
    --presets) [ $# -ge 2 ] || die "--presets needs a list, e.g. \"8m 125m\""; PRESETS="$2"; shift 2 ;;
    --batch) [ $# -ge 2 ] || die "--batch needs a number"; BATCH="$2"; shift 2 ;;
    --seq-len) [ $# -ge 2 ] || die "--seq-len needs a number"; SEQ="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
    --skip-parity) PARITY=0; shift ;;
    --skip-train) TRAIN=0; shift ;;
    --cpu-rehearsal) REHEARSAL=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for pair in "steps:$STEPS" "batch:$BATCH" "seq-len:$SEQ"; do
  value="${pair#*:}"
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || die "--${pair%%:*} must be a positive whole number, got '$value'"
done
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || die "python '$PY' not found (pass --python PATH)"
"$PY" -c "import torch" 2>/dev/null || die "'$PY' cannot import torch: install a CUDA build of torch there first"

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
TRAINER="trainer=gpu"
if [ "$REHEARSAL" = 1 ]; then
  echo "gpu_check: CPU rehearsal (fp32 on the CPU; no install, no parity tests)"
  device="" PARITY=0 TRAINER="trainer=default"
elif [ -z "$device" ]; then
  echo "gpu_check: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)'))," \
       "so there is nothing to check here. Run it on a GPU machine."
  exit 0
fi
step() { echo; echo "=== gpu_check: $* ==="; }
fail() { echo "gpu_check: FAILED at: $*" >&2; exit 1; }

if [ "$REHEARSAL" = 1 ]; then
  :
elif [ -n "$WHEELS" ]; then
  echo "gpu_check: $device, torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
  step "install from $WHEELS"
  [ -d "$WHEELS" ] || die "--wheels $WHEELS is not a folder"
  # Each dependency the interpreter lacks, from the folder (torch and the CUDA stack are never replaced; W&B is not
  # needed: the runs log to CSV). GroundThink itself runs from this checkout (python -m from the repository root).
  for req in $("$PY" -c "
import importlib.metadata as m, re, tomllib
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
for d in deps:
    name = re.split(r'[<>=!~ ;\[]', d, maxsplit=1)[0]
    if name == 'wandb':
        continue
    try:
        m.version(name)
    except m.PackageNotFoundError:
        print(name)
" ) flash-linear-attention; do
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$req" \
      || echo "gpu_check: $req is not in $WHEELS and not installed (its checks will be skipped or fail below)"
  done
else
  echo "gpu_check: $device, torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
  step "install"
  "$PY" -m pip install --quiet -e ".[kernels]" || fail "pip install -e .[kernels] (no registry? use --wheels DIR)"
fi

if [ "$PARITY" = 1 ]; then
  step "parity: chunked ops vs the CUDA kernels"
  "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_ops_gpu.py tests/test_gla.py \
    || fail "GPU parity tests (output above)"
fi

if [ "$TRAIN" = 1 ]; then
  OUT="${OUT:-$(mktemp -d -t groundthink-gpu-check-XXXX)}"
  for preset in $PRESETS; do
    step "train: $preset, $TRAINER, impl=auto, $STEPS steps of $BATCH x $SEQ tokens"
    GROUNDTHINK_OUTPUT_ROOT="$OUT" WANDB_MODE=offline "$PY" -m groundthink.train "$TRAINER" "model=$preset" \
      model.impl=auto "trainer.max_steps=$STEPS" "data.batch_size=$BATCH" "data.seq_len=$SEQ" logger=csv \
      "trainer.val_every_n_steps=$STEPS" "callbacks.checkpoint.every_n_steps=$STEPS" "name=gpu_check_$preset" \
      callbacks.progress_bar=false diagnostics.enabled=false || fail "training $preset"
  done
  step "throughput (runs under $OUT)"
  "$PY" - "$OUT" $PRESETS <<'EOF'
import json, sys
from pathlib import Path
from groundthink.training.metrics_file import read_metrics_csv

out, presets = Path(sys.argv[1]), sys.argv[2:]
print(f"{'preset':>8} {'params':>12} {'tokens/s':>12} {'MFU (last window)':>18} {'val loss':>9}")
for preset in presets:
    (run,) = sorted((out / f"gpu_check_{preset}").iterdir())[-1:]
    summary = json.loads((run / "summary.json").read_text())
    mfu = read_metrics_csv(run / "metrics.csv").get("perf/mfu", [])
    last_mfu = f"{mfu[-1][1]:.1%}" if mfu else "n/a"
    val = summary.get("final", {}).get("val/loss")
    print(f"{preset:>8} {summary['num_params']:>12,} {summary['tokens_per_s']:>12,.0f} {last_mfu:>18} "
          f"{val if val is None else round(val, 4)!s:>9}")
EOF
fi
echo; echo "gpu_check: done"
