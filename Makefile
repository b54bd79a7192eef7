# The two commands of the README: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU machine must get the CPU wheel: an unpinned `torch` pulls gigabytes of CUDA packages.
# 2.13.0 is the CPU build provided on our machines; override TORCH_SPEC elsewhere.
TORCH_SPEC ?= torch==2.13.0
# What `make serve` serves: the committed built-in model (a tiny MoE trained on the stdlib's docstrings by
# `moelink train-builtin-model builtin-model`; see builtin-model/README.md), or any checkpoint directory.
TINY_MODEL ?= builtin-model
PYTEST_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 50051
HTTP_PORT ?= 8000
SERVE_ARGS ?=

# The tested dependency set (docs/dependencies.md): every package pinned, installed as pip constraints (PIP_CONSTRAINT
# reaches pip's build environment too). `make setup LOCK=` installs the newest releases pyproject.toml allows instead;
# `make setup LOCK=requirements/lock-gpu.txt TORCH_SPEC=torch==2.13.0 EXTRAS=test,gpu` is the GPU set.
LOCK ?= requirements/lock-cpu.txt
EXTRAS ?= test
# The installer (requirements/install.py): uv at this pin, pip when it cannot (UV_SPEC= : pip alone). Same packages.
UV_SPEC ?= uv==0.13.9

.PHONY: setup serve test test-quick typecheck coverage test-gpu bench clean lock

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py Makefile requirements/install.py $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) requirements/install.py --python $(PY) --lock "$(LOCK)" --torch-spec "$(TORCH_SPEC)" --extras "$(EXTRAS)" --uv-spec "$(UV_SPEC)"
	touch $@

# Re-resolve the lock to the newest releases pyproject.toml allows (a fresh .lock-venv/), then run `make test` on it
# before committing requirements/.
lock:
	$(PYTHON) requirements/lock.py --torch-spec "$(TORCH_SPEC)"

# The random-weight model of the tests and benchmarks (`make tiny-model`), for `make serve TINY_MODEL=tiny-model`.
tiny-model/config.json: | setup
	$(VENV)/bin/moelink make-tiny-model tiny-model --arch qwen3_moe

tiny-model: tiny-model/config.json

# The built-in model behind one command: gRPC on $(PORT) and the OpenAI API on $(HTTP_PORT) through the smg
# gateway that `moelink serve` starts, restarts and stops itself (Ctrl-C drains and stops both).
# How to call it is printed first.
serve: setup
	@echo "moelink on $(TINY_MODEL): OpenAI API on http://$(HOST):$(HTTP_PORT)/v1, gRPC on $(HOST):$(PORT) (moelink.v1.Generation + vllm.grpc.engine.VllmEngine)."
	@echo "Call it from another shell (model name: $(notdir $(TINY_MODEL))):"
	@echo "  curl http://$(HOST):$(HTTP_PORT)/v1/chat/completions -H 'content-type: application/json' -d '{\"model\": \"$(notdir $(TINY_MODEL))\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 32}'"
	@echo "  $(PY) -c 'from openai import OpenAI; c = OpenAI(base_url=\"http://$(HOST):$(HTTP_PORT)/v1\", api_key=\"none\"); print(c.chat.completions.create(model=\"$(notdir $(TINY_MODEL))\", messages=[{\"role\": \"user\", \"content\": \"Hello\"}], max_tokens=32).choices[0].message.content)'"
	@echo "  $(PY) -m moelink.engine.server.client --target $(HOST):$(PORT) 'The quick brown fox' --max-tokens 32"
	@echo "Load benchmark against it: $(VENV)/bin/moelink bench-serve --target $(HOST):$(PORT)"
	$(VENV)/bin/moelink serve $(TINY_MODEL) --host $(HOST) --port $(PORT) --http-port $(HTTP_PORT) $(SERVE_ARGS)

# mypy over the whole package, GPU-only code included (docs/testing.md#the-type-check; [tool.mypy] in pyproject.toml).
# `make test` runs it as its first test (tests/test_typecheck.py) on one pytest worker while the others run tests:
# seconds on its cache (.mypy_cache/), about 40 s of CPU cold.
typecheck: setup
	$(PY) -m tests.helpers.typecheck

# Three pytest-xdist workers on the 2-core machines: about a fifth of the tests' time is spent waiting on the processes
# they start (servers, Ray, ranks), which a third worker fills (docs/testing.md#set-up-and-workers). Ray tests share
# one worker (tests/conftest.py).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3
# The checkout's own modules compiled once first: this machine sets PYTHONDONTWRITEBYTECODE=1, so without it every
# process the suite starts (EP ranks, servers, script smokes: hundreds) compiles moelink's sources again, ~0.2 s of
# CPU each (pip compiles site-packages at install; an editable checkout is not).
# CPU_ISA=avx2 runs the suite as an AVX2 machine without AVX-512 would (docs/testing.md#other-cpus): OpenBLAS's Haswell
# kernels (numpy, the Triton interpreter), MKL and oneDNN at AVX2 (torch), ATen's AVX2 kernels, numpy's AVX-512 loops
# off. Empty (the default): whatever this CPU picks.
CPU_ISA ?=
ISA_ENV_avx2 := OPENBLAS_CORETYPE=Haswell MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \
	NPY_DISABLE_CPU_FEATURES=X86_V4,AVX512_ICL,AVX512_SPR
ISA_ENV := $(if $(CPU_ISA),$(or $(ISA_ENV_$(CPU_ISA)),$(error CPU_ISA=$(CPU_ISA) is invalid: empty or avx2)))

test: setup
	$(PY) -m compileall -q -j 2 engine scheduler moe comm kernels planner benchmarks deploy tests > /dev/null
	$(ISA_ENV) MOELINK_LOCK="$(if $(LOCK),$(abspath $(LOCK)))" $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder) $(PYTEST_ARGS)

# The quick loop to run after each change (docs/testing.md#the-quick-loop): the type check (seconds on its cache) and
# every test not marked `slow` (no Ray, no server subprocess, nothing measured over 1 s), on the same workers.
test-quick: setup
	$(PY) -m tests.helpers.typecheck
	MOELINK_LOCK="$(if $(LOCK),$(abspath $(LOCK)))" $(PY) -m pytest -q -m "not slow" $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder) $(PYTEST_ARGS)

# The CPU suite as `make test` runs it, under coverage.py (docs/testing.md#coverage): every Python the tests start is
# measured too (pyproject's [tool.coverage.run] patch = subprocess; Ray's rank processes through the .pth hook
# `tests.helpers.coverage_map pth` writes into .venv, tests/helpers/coverage_ray.py). Writes build/coverage/:
# report.txt (lines never run, per module), coverage.json, and map.md / map.json (those lines grouped by module, the
# GPU-only blocks marked; docs/gpu-session-steps.md#gpu-only-code-where-it-runs). Exits with pytest's status.
COVERAGE_DIR ?= build/coverage
coverage: setup
	rm -rf $(COVERAGE_DIR) && mkdir -p $(COVERAGE_DIR)
	$(PY) -m tests.helpers.coverage_map pth
	$(PY) -m compileall -q -j 2 engine scheduler moe comm kernels planner benchmarks deploy tests > /dev/null
	MOELINK_LOCK="$(if $(LOCK),$(abspath $(LOCK)))" $(PY) -m coverage run --data-file=$(COVERAGE_DIR)/.coverage -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder) $(PYTEST_ARGS); \
	  rc=$$?; $(PY) -m tests.helpers.coverage_map report $(COVERAGE_DIR) || rc=1; exit $$rc

# GPU tests live where the code needs nothing beyond torch/triton/transformers (the GPU image has no
# smg-grpc-proto or Ray); benchmarks/gpu_session.sh runs these plus the GPU benchmarks.
test-gpu: setup
	$(PY) -m pytest -q -m gpu tests/kernels tests/engine tests/comm tests/moe $(PYTEST_ARGS)

bench: setup
	$(PY) -m moelink.benchmarks.engine_throughput

clean:
	rm -rf $(VENV) .lock-venv tiny-model .pytest_cache .mypy_cache  # never builtin-model/: it is committed
