# The two commands of the README: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU machine must get the CPU wheel: an unpinned `torch` pulls gigabytes of CUDA packages.
# 2.13.0 is the CPU build provided on our machines; override TORCH_SPEC elsewhere.
TORCH_SPEC ?= torch==2.13.0
TINY_MODEL ?= tiny-model
PYTEST_ARGS ?=

.PHONY: setup serve test test-gpu bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	touch $@

$(TINY_MODEL)/config.json: | setup
	$(VENV)/bin/moelink make-tiny-model $(TINY_MODEL) --arch qwen3_moe

serve: setup $(TINY_MODEL)/config.json
	$(VENV)/bin/moelink generate $(TINY_MODEL) --prompt "The quick brown fox" --prompt "Once upon a time" --max-tokens 32

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

bench: setup
	$(PY) -m moelink.benchmarks.engine_throughput

clean:
	rm -rf $(VENV) $(TINY_MODEL) .pytest_cache
