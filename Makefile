# make demo: build the demo cache (SmolLM2-135M-Instruct on the bundled conversations).
# make test: run the whole test suite (what CI runs); lists the 25 slowest tests at the end.
# make test-fast: the fast tier, for every edit: every test that starts no Snakemake and no cluster.
# make lint: ruff's lint and format checks (the first step of .ci/run).
# make gpu-check: on a CUDA machine, the GPU-ready check (tools/gpu_check.py; GPU_CHECK_OUT=DIR for its summary).
#
# Each sets up .venv first. Each setup step leaves a stamp named after the content of the
# requirement files it installed (and of pyproject.toml, for the package itself), so it runs
# again only when those files change.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
content_hash = $(shell cat $(1) | sha256sum | cut -c1-16)

RUNTIME_REQUIREMENTS := envs/requirements.txt envs/requirements-nodeps-demo.txt
TEST_REQUIREMENTS := envs/requirements-test.txt envs/requirements-nodeps-oracle.txt
RUNTIME_STAMP := $(VENV)/.runtime-$(call content_hash,$(RUNTIME_REQUIREMENTS) pyproject.toml)
TEST_STAMP := $(VENV)/.test-$(call content_hash,$(RUNTIME_REQUIREMENTS) pyproject.toml $(TEST_REQUIREMENTS))

# GPUs on this machine; Snakemake runs at most this many GPU-jobs' worth at once.
GPUS ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
GPU_LIMIT = $(if $(filter-out 0,$(GPUS)),--resources gpu=$(GPUS))

.PHONY: demo test test-fast lint gpu-check

demo: $(RUNTIME_STAMP)
	$(BIN)/snakemake --profile profiles/local $(GPU_LIMIT)
	@echo
	@echo "Cache:             results/demo/shards/"
	@echo "Validation report: results/demo/validation_report.html"

# On the cores (pytest-xdist), at most 4 workers: each imports torch and transformers, and the tests that
# share a finished run, a cluster or the converted demo model stay on one worker (tests/conftest.py), so
# that each is built once. PYTEST_WORKERS=1 runs the suite serially.
PYTEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
PYTEST_PARALLEL = -n $(PYTEST_WORKERS) --dist loadgroup

test: $(TEST_STAMP)
	$(BIN)/pytest $(PYTEST_PARALLEL) --durations=25

test-fast: $(TEST_STAMP)
	$(BIN)/pytest $(PYTEST_PARALLEL) -m "not slow and not slurm"

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

GPU_CHECK_OUT ?= benchmarks/gpu-check

gpu-check: $(RUNTIME_STAMP)
	$(BIN)/python -m tools.gpu_check --out $(GPU_CHECK_OUT)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): | $(BIN)/python
	$(BIN)/pip install -r envs/requirements.txt
	$(BIN)/pip install --no-deps -r envs/requirements-nodeps-demo.txt
	$(BIN)/pip install --no-deps -e .
	rm -f $(VENV)/.runtime-*
	touch $@

$(TEST_STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install -r envs/requirements-test.txt
	$(BIN)/pip install --no-deps -r envs/requirements-nodeps-oracle.txt
	rm -f $(VENV)/.test-*
	touch $@
