#!/usr/bin/env bash
# GroundThink's GPU check (`make gpu-check`): what to run, in one go, the first minutes a CUDA machine is available.
#
#   1. install: the kernels extra (or, with --wheels, what the interpreter lacks from a folder; see below).
#   2. baseline: a short bf16 training run of each preset with model.impl=chunked (GroundThink's own torch ops on
#      the GPU, no Triton): checks CUDA, bf16 and the training loop, and gives the numbers the kernels must beat.
#   3. parity: tests/test_ops_gpu.py and the GPU tests of tests/test_gla.py — GroundThink's chunked ops against
#      fla's chunk_rwkv6 / chunk_gla, mamba_ssm's mamba_chunk_scan_combined and causal_conv1d: outputs, final states
#      and every input gradient, one line per test with its time. A kernel package that is not installed is
#      reported as skipped (pytest's reason), never as passed. fp32 dots run in IEEE fp32 there
#      (TRITON_F32_DEFAULT=ieee, for every gpu test: tests/conftest.py): TF32's rounding alone is of the order
#      of the tolerance. The tests that need no background build (below) run while it builds; the rest wait for
#      it. With pytest-xdist installed the tests run in parallel workers (one per core, up to 12), so the kernels
#      compile side by side.
#   4. throughput: the same runs with model.impl=auto (the kernels where they import), then one table of tokens/s
#      and MFU (6 x non-embedding parameters x tokens/s over the GPU's bf16 peak) after the first 20 steps, seconds
#      to the first step (compilation), the impl each op ran as, and auto's speed over chunked.
#
# Each autotuned Triton kernel runs at its first working configuration, in the parity tests and in the training
# runs (benchmarks/triton_first_config.py), rather than compiling and timing all of them: parity holds for every
# configuration, and the compilations are the slow part. The auto rows are then the speed of untuned kernels, a
# lower bound; --autotune tunes in full (give it the time below) and caches each choice for a rerun.
#
# It stops at the first failure, naming the step. Without a CUDA device it says so and exits 0: nothing to check.
# Time on a fresh machine is mostly compilation, not training (one H200, 16 cores; two sessions, 2026-12-04):
# building mamba-ssm for sm_90 alone takes 151-225 s (causal-conv1d took 394 s beside it). At the first working
# configuration, fla's six parity tests (wkv6, GLA) took 65-104 s, nearly all of it each kernel's first compilation;
# mamba_ssm's first test passed and its second was still running 130 s after they started (Triton specialises
# integer arguments, strides among them, on divisibility by 16, so a new sequence length can compile its kernels
# again; fla's second and third lengths reused the first's and took 0.02 s). With full autotuning (up to 27
# configurations per kernel) no parity test had finished after 310 s, and 8m's first bf16 step with fla took about
# 300 s. The torch-only runs need none of this: 8m's and 125m's first bf16 steps came 43 and 51 s after the command.
# With --autotune give a first run 20 minutes or more; a rerun on the same machine reuses Triton's cache
# (~/.triton/cache) and the autotuning results (TRITON_CACHE_AUTOTUNING=1 is set then).
#
#   benchmarks/gpu_check.sh [--python PATH] [--wheels DIR] [--build LIST] [--steps N] [--presets "8m 125m"]
#                           [--impls "chunked auto"] [--batch B] [--seq-len T] [--tests EXPR] [--out DIR]
#                           [--skip-install] [--skip-parity] [--skip-train] [--autotune] [--cpu-rehearsal]
#
#   --python   the interpreter with a CUDA build of torch (default: .venv/bin/python if it exists, else python3)
#   --wheels   install what that interpreter lacks from this folder only (pip --no-index), e.g. on a machine with
#              no registry: `make gpu-wheels` fills ./gpu-wheels here, carry it there. mamba-ssm and causal-conv1d
#              come as source archives there (PyPI has no wheels of them) and are built, at low CPU priority, for
#              this GPU's architecture alone (benchmarks/kernel_sdist.py), in the background while the torch-only
#              runs train; the parity tests wait for them
#   --build    which of those source archives to build (default "mamba_ssm causal_conv1d"; "mamba_ssm" leaves out
#              causal-conv1d's build, the longer one, and its three parity tests)
#   --skip-install  use the interpreter as it is (the kernels installed already, or a run of --wheels before)
#   --steps    training steps per run (default 200; the first ~20 are warm-up and fall outside the window)
#   --impls    the model.impl of the training runs, in order (default "chunked auto"; "auto" alone skips the baseline)
#   --tests    only the parity tests whose names match this pytest -k expression (e.g. "fla" or "not causal")
#   --autotune the parity tests and training runs autotune every Triton kernel in full (far slower on a fresh
#              machine; the tuned speed)
#   --out      where the training runs go (default: a new temporary folder, kept and printed)
#   --cpu-rehearsal  run the steps on the CPU (fp32, no install; the parity tests run and skip, as they do without
#              CUDA, which checks their command line): tests the script
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu_check: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; }

PY="" WHEELS="" TO_BUILD="mamba_ssm causal_conv1d" STEPS=200 PRESETS="8m 125m" IMPLS="chunked auto" BATCH=16
SEQ=512 TESTS="" OUT="" INSTALL=1 PARITY=1 TRAIN=1 REHEARSAL=0 FIRST_CONFIG=1
BUILDS=()  # the background builds still to wait for, each "module:pid:result file"
while [ $# -gt 0 ]; do
  case "$1" in
    --python) [ $# -ge 2 ] || die "--python needs a path"; PY="$2"; shift 2 ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS="$2"; shift 2 ;;
    --build) [ $# -ge 2 ] || die "--build needs a list, e.g. \"mamba_ssm\" or \"\""; TO_BUILD="$2"; shift 2 ;;
    --steps) [ $# -ge 2 ] || die "--steps needs a number"; STEPS="$2"; shift 2 ;;
    --presets) [ $# -ge 2 ] || die "--presets needs a list, e.g. \"8m 125m\""; PRESETS="$2"; shift 2 ;;
    --impls) [ $# -ge 2 ] || die "--impls needs a list, e.g. \"chunked auto\""; IMPLS="$2"; shift 2 ;;
    --batch) [ $# -ge 2 ] || die "--batch needs a number"; BATCH="$2"; shift 2 ;;
    --seq-len) [ $# -ge 2 ] || die "--seq-len needs a number"; SEQ="$2"; shift 2 ;;
    --tests) [ $# -ge 2 ] || die "--tests needs a pytest -k expression, e.g. fla"; TESTS="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
    --skip-install) INSTALL=0; shift ;;
    --skip-parity) PARITY=0; shift ;;
    --skip-train) TRAIN=0; shift ;;
    --autotune) FIRST_CONFIG=0; shift ;;
    --cpu-rehearsal) REHEARSAL=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for pair in "steps:$STEPS" "batch:$BATCH" "seq-len:$SEQ"; do
  value="${pair#*:}"
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || die "--${pair%%:*} must be a positive whole number, got '$value'"
done
[ -n "${IMPLS// /}" ] || die "--impls needs at least one impl, e.g. \"chunked auto\""
for module in $TO_BUILD; do
  [[ " mamba_ssm causal_conv1d " == *" $module "* ]] || die "--build: unknown package '$module' (mamba_ssm, causal_conv1d)"
done
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || die "python '$PY' not found (pass --python PATH)"
"$PY" -c "import torch" 2>/dev/null || die "'$PY' cannot import torch: install a CUDA build of torch there first"
# The values model.impl takes, from the op registry (groundthink.ops.model_impls), not a copy of it.
allowed=$("$PY" -c "from groundthink.ops import model_impls; print(' '.join(model_impls()))") \
  || die "'$PY' cannot import groundthink.ops (output above)"
for impl in $IMPLS; do
  [[ " $allowed " == *" $impl "* ]] || die "--impls: unknown impl '$impl' (one or more of: $allowed)"
done

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
TRAINER="trainer=gpu"
if [ "$REHEARSAL" = 1 ]; then
  echo "gpu_check: CPU rehearsal (fp32 on the CPU; no install; the parity tests skip without CUDA)"
  device="" INSTALL=0 TRAINER="trainer=default"
elif [ -z "$device" ]; then
  echo "gpu_check: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)'))," \
       "so there is nothing to check here. Run it on a GPU machine."
  exit 0
fi
# Autotuning: print each choice with the seconds it took (where the time goes); keep tuned choices for a rerun,
# and never a first-configuration one (it is not the tuned choice).
export TRITON_PRINT_AUTOTUNING=1 WANDB_MODE=offline
RUN=("$PY" -m)
if [ "$FIRST_CONFIG" = 1 ]; then
  export TRITON_CACHE_AUTOTUNING=0 FLA_CACHE_RESULTS=0
  RUN=("$PY" -m benchmarks.triton_first_config)
else
  export TRITON_CACHE_AUTOTUNING=1
fi
START=$SECONDS
step() { echo; echo "=== gpu_check [$((SECONDS - START)) s]: $* ==="; }
fail() {
  echo "gpu_check: FAILED at: $* ($((SECONDS - START)) s in)" >&2
  for build in "${BUILDS[@]}"; do
    IFS=: read -r module pid result <<<"$build"
    if kill -0 "$pid" 2>/dev/null; then echo "gpu_check: still building in the background: $module (pid $pid)" >&2
    else echo "gpu_check: the background build of $module had ended: $(tail -n 1 "$result")" >&2; fi
  done
  exit 1
}
[ -n "$device" ] && echo "gpu_check: $device, torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"

if [ "$INSTALL" = 0 ]; then
  :
elif [ -n "$WHEELS" ]; then
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
  # The two CUDA-extension packages: a wheel in the folder if there is one, else its source archive built for this
  # GPU alone (pip would compile it for nine architectures); what is missing or fails to build is reported, and
  # the parity tests that need it are then skipped with the import error as their reason.
  arch=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability(0))")
  for module in causal_conv1d mamba_ssm; do
    if "$PY" -c "import $module" 2>/dev/null; then
      echo "gpu_check: $module is installed"
    elif wheel=$(ls "$WHEELS"/"$module"-*.whl 2>/dev/null | head -n 1) && [ -n "$wheel" ]; then
      "$PY" -m pip install --quiet --no-index --no-deps "$wheel" || echo "gpu_check: installing $wheel failed"
    elif [[ " $TO_BUILD " != *" $module "* ]]; then
      echo "gpu_check: not building $module (--build \"$TO_BUILD\"; its parity tests will be skipped)"
    elif sdist=$(ls "$WHEELS"/"$module"-*.tar.gz 2>/dev/null | head -n 1) && [ -n "$sdist" ]; then
      log="${TMPDIR:-/tmp}/build-$module.log"
      echo "gpu_check: building $module from $(basename "$sdist") for sm_$arch in the background (log: $log)"
      nice -n 10 "$PY" -m benchmarks.kernel_sdist "$sdist" --arch "$arch" --python "$PY" --log "$log" \
        >"$log.result" 2>&1 &
      BUILDS+=("$module:$!:$log.result")
    else
      echo "gpu_check: no $module wheel or source archive in $WHEELS (its parity tests will be skipped)"
    fi
  done
else
  step "install"
  "$PY" -m pip install --quiet -e ".[kernels]" || fail "pip install -e .[kernels] (no registry? use --wheels DIR)"
fi

wait_for_builds() {  # each background build's own last line; one that failed is reported, not fatal
  [ ${#BUILDS[@]} -gt 0 ] || return 0
  step "waiting for the kernel builds"
  for build in "${BUILDS[@]}"; do
    IFS=: read -r module pid result <<<"$build"
    if wait "$pid"; then tail -n 1 "$result"; else
      cat "$result"; echo "gpu_check: $module was not built (the parity tests that need it will be skipped)"
    fi
  done
  BUILDS=()
}

train() {  # $1 = model.impl: one run of each preset
  for preset in $PRESETS; do
    step "train: $preset, $TRAINER, impl=$1, $STEPS steps of $BATCH x $SEQ tokens"
    GROUNDTHINK_OUTPUT_ROOT="$OUT" "${RUN[@]}" groundthink.train "$TRAINER" "model=$preset" "model.impl=$1" \
      "trainer.max_steps=$STEPS" "data.batch_size=$BATCH" "data.seq_len=$SEQ" logger=csv \
      "trainer.val_every_n_steps=$STEPS" "callbacks.checkpoint.every_n_steps=$STEPS" "name=gpu_check_${preset}_$1" \
      callbacks.progress_bar=false diagnostics.enabled=false || fail "training $preset with impl=$1"
  done
}
OUT="${OUT:-$(mktemp -d -t groundthink-gpu-check-XXXX)}"
# The torch-only runs first: they need no kernel and no Triton compilation, so they report even when those fail.
BASELINE="" REST=""
for impl in $IMPLS; do
  if [ "$impl" = chunked ] || [ "$impl" = reference ]; then BASELINE="$BASELINE $impl"; else REST="$REST $impl"; fi
done
if [ "$TRAIN" = 1 ]; then
  for impl in $BASELINE; do train "$impl"; done
fi

parity() {  # $1 = a pytest -k expression ("" for all), $2 = what runs
  step "parity: chunked ops vs $2"
  local plugin=() select="$1" rc=0
  [ "$FIRST_CONFIG" = 1 ] && plugin=(-p benchmarks.triton_first_config)
  # A pytest-xdist worker per test (up to 12, one per core): the tests compile their kernels side by side. Compiling
  # is single-threaded, and a new sequence length can need new compilations (see above), so the wall time is
  # that of the slowest test rather than the sum; two workers may compile the same kernel, at no cost in time.
  local workers
  workers=$(nproc 2>/dev/null || echo 4); [ "$workers" -gt 12 ] && workers=12
  "$PY" -c "import xdist" 2>/dev/null && [ "$workers" -gt 1 ] && plugin+=(-n "$workers" --dist load)
  [ -n "$TESTS" ] && select="${select:+($select) and }($TESTS)"
  "$PY" -m pytest -v -rs --durations=5 -p no:cacheprovider "${plugin[@]}" -m gpu ${select:+-k "$select"} \
    tests/test_ops_gpu.py tests/test_gla.py || rc=$?
  [ "$rc" = 5 ] && { echo "gpu_check: no parity test matches -k '$select' here"; return 0; }  # none selected
  [ "$rc" = 0 ] || fail "GPU parity tests (output above)"
}
if [ "$PARITY" = 1 ]; then
  building=""  # the tests of the packages still building wait for them; the others run now, beside the builds
  for build in "${BUILDS[@]}"; do building="${building:+$building or }${build%%:*}"; done
  if [ -n "$building" ]; then
    parity "not ($building)" "the installed kernels (while $building build)"
    wait_for_builds
    parity "$building" "$building"
  else
    parity "" "the CUDA kernels"
  fi
fi
wait_for_builds

if [ "$TRAIN" = 1 ]; then
  for impl in $REST; do train "$impl"; done
  step "throughput (runs under $OUT)"
  [ "$FIRST_CONFIG" = 1 ] && [ -n "$REST" ] && echo "Triton kernels at their first working configuration," \
    "not autotuned (--autotune tunes them): the kernel rows are a lower bound of tuned speed"
  "$PY" -m benchmarks.gpu_report "$OUT" --presets $PRESETS --impls $IMPLS || fail "the throughput table"
fi
echo; echo "gpu_check: done in $((SECONDS - START)) s"
