# GroundThink: the README's commands and CI call these targets.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (a local wheel on the build machines). On a CUDA machine: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` / `make test-fast` (tests sharing a module fixture stay on one worker).
PYTEST_WORKERS ?= 2

.PHONY: setup train test test-fast bench lint gpu-check gpu-wheels kernel-interpret

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

## The default experiment: a small hybrid on the embedded corpus (a few minutes on 2 CPU cores).
train: setup
	$(BIN)/groundthink-train $(ARGS)

## The test suite. pytest's exit code 5 (no tests collected) counts as a failure.
test: setup
	@$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

test-fast: setup
	$(MAKE) test PYTEST_ARGS="-m 'not slow' $(PYTEST_ARGS)"

bench: setup
	$(BIN)/python -m benchmarks.run $(ARGS)

lint: setup
	$(BIN)/ruff check groundthink tests benchmarks sweeps

## On a CUDA machine: GPU parity tests, then bf16 throughput of 8m and 125m (benchmarks/gpu_check.sh --help).
gpu-check:
	bash benchmarks/gpu_check.sh $(ARGS)

## Without a GPU: fla's and mamba_ssm's Triton kernels run by Triton's interpreter on the CPU against the torch ops
## (benchmarks/kernel_interpret.py); the first run installs triton, fla-core and mamba-ssm's Python part into build/.
KERNEL_INTERPRET := build/kernel-interpret
$(KERNEL_INTERPRET)/.installed: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps --target $(KERNEL_INTERPRET) triton==3.6.0 fla-core==0.6.0 einops
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(BIN)/pip install --quiet --no-deps --no-build-isolation --target $(KERNEL_INTERPRET) \
		mamba-ssm==2.3.2.post1
	touch $@

kernel-interpret: $(KERNEL_INTERPRET)/.installed
	PYTHONPATH=$(KERNEL_INTERPRET) $(BIN)/python -m benchmarks.kernel_interpret $(ARGS)

## Wheels (and the kernels' source archives) of what a bare CUDA image lacks (Python 3.12, x86_64), for `gpu_check.sh --wheels gpu-wheels` offline.
gpu-wheels: setup
	rm -rf gpu-wheels && mkdir gpu-wheels
	$(BIN)/pip wheel --quiet --no-deps -w gpu-wheels antlr4-python3-runtime==4.9.3 \
		"hydra-core==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("hydra-core"))')" \
		"omegaconf==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("omegaconf"))')"
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
		--platform any -d gpu-wheels datasets dill multiprocess flash-linear-attention fla-core
	# Source archives only on PyPI: gpu_check.sh builds them there for the GPU it finds (benchmarks/kernel_sdist.py).
	MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE $(BIN)/pip download --quiet --no-deps \
		--no-binary=:all: --no-build-isolation -d gpu-wheels mamba-ssm causal-conv1d
