# Two commands do all set-up: `make demo` and `make test`.
# On a machine without an NVIDIA driver the CPU build of torch is installed (no multi-GB CUDA download);
# with `nvidia-smi` on the PATH the normal (CUDA) torch is used. Override with TORCH_SPEC=... if needed.
# The CPU wheel index is probed once (5 s timeout); when it cannot be reached, torch comes from the default index
# (one line says so) instead of pip retrying the unreachable index for every package.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: demo test test-slow bench clean-venv torch-index

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $$($(MAKE) --no-print-directory -s torch-index)
	$(BIN)/python -m pip install --quiet -e ".[test,trl]"
	touch $@

# The pip option that selects the CPU wheel index, or nothing (GPU machine, or the index is unreachable).
torch-index:
	@if [ -z "$(HAS_GPU)" ]; then \
	  if $(PYTHON) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
	      "$(TORCH_CPU_INDEX)/torch/" >/dev/null 2>&1; then \
	    echo "--extra-index-url $(TORCH_CPU_INDEX)"; \
	  else \
	    echo "set-up: $(TORCH_CPU_INDEX) is unreachable; installing $(TORCH_SPEC) from the default index (on Linux PyPI serves its CUDA build, a larger download, unless a mirror serves a CPU one)" >&2; \
	  fi; \
	fi

demo: $(BIN)/.installed
	$(BIN)/trb demo

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks examples studies
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_core.py

clean-venv:
	rm -rf $(VENV)
