# Two commands do all set-up: `make demo` and `make test`.
# On a machine without an NVIDIA driver the CPU build of torch is installed (no multi-GB CUDA download);
# with `nvidia-smi` on the PATH the normal (CUDA) torch is used. Override with TORCH_SPEC=... if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
TORCH_INDEX ?= $(if $(HAS_GPU),,--extra-index-url https://download.pytorch.org/whl/cpu)
PYTEST_ARGS ?=

.PHONY: demo test test-slow bench clean-venv

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/trb demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_core.py

clean-venv:
	rm -rf $(VENV)
