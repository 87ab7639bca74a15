# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# checkov pins boto3/botocore far below what the project needs, so it lives in its own venv (infra tests only).
CHECKOV_VENV ?= .venv-checkov
# The lowest admitted versions (uv --resolution lowest-direct: every declared floor, the newest of the rest) in a
# venv of their own; LOWEST_TESTS runs there: the core, the CLI, the locks and the Keras callback.
LOWEST_VENV ?= .venv-lowest
LOWEST_STAMP := $(LOWEST_VENV)/.installed
LOWEST_UV := $(LOWEST_VENV)/bin/uv pip install -q --python $(LOWEST_VENV)/bin/python
LOWEST_TESTS ?= tests/test_store.py tests/test_cli.py tests/test_locks.py tests/test_versions.py \
  tests/test_keras_callback.py::test_best_value_survives_a_restart \
  tests/test_keras_callback.py::test_mode_max_is_recorded_as_max_and_best_is_the_highest

.PHONY: install demo lint test test-main test-lowest test-torch-floors bench clean tools

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[s3,gcs,azure,keras-cpu,test,test-backends]'
	touch $(STAMP)

$(CHECKOV_VENV)/bin/checkov:
	python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q checkov==3.3.30

# Azurite (Azure's Blob emulator, npm) for the Azure tests, pinned; without node/npm those tests skip.
AZURITE_VERSION ?= 3.37.0
AZURITE := .tools/azurite/node_modules/.bin/azurite-blob

$(AZURITE):
	@if command -v npm >/dev/null 2>&1; then \
	  npm install --prefix .tools/azurite --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VERSION); \
	else echo "make: npm not found; the Azure (Azurite) tests will skip"; fi

# shellcheck (Debian package) for the infra script tests; installed when we can (root, apt), else those tests skip.
tools: $(CHECKOV_VENV)/bin/checkov $(AZURITE)
	@command -v shellcheck >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null; } ; } || \
	  echo "make: shellcheck not installed; the shellcheck tests will skip"

install: $(STAMP) $(AZURITE)

demo: $(STAMP)
	$(PY) examples/demo.py

# The main suite on the newest versions, then the lowest-versions run (both are what CI runs: .ci/run).
test: test-main test-lowest test-torch-floors

# ruff over the whole tree, mypy (settings in pyproject.toml) over the package.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy cloudckpt

# TEST_WORKERS=3: three pytest-xdist workers (each starts its own S3/GCS/Azure servers, a test file's tests on one).
# The suite is CPU-bound (training and torchrun processes) but waits too (retry backoffs, budgets, servers): on the
# 2-core machine 3 workers took 914 s where 2 took 1,036 s (same tree, 2026-12-07). TEST_WORKERS=0 runs everything
# in one process (pytest's own).
TEST_WORKERS ?= 3
test-main: $(STAMP) tools lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The floors' own venv: the project at its lowest admitted versions, then the test tools constrained to them.
$(LOWEST_STAMP): pyproject.toml Makefile
	test -x $(LOWEST_VENV)/bin/uv || { python3 -m venv $(LOWEST_VENV) && $(LOWEST_VENV)/bin/pip install -q uv; }
	$(LOWEST_UV) --resolution lowest-direct -e '.[s3,gcs,azure,keras-cpu]'
	$(LOWEST_VENV)/bin/uv pip freeze --python $(LOWEST_VENV)/bin/python --exclude-editable > $(LOWEST_VENV)/floors.txt
	$(LOWEST_UV) -c $(LOWEST_VENV)/floors.txt -e '.[test]'
	touch $(LOWEST_STAMP)

test-lowest: $(LOWEST_STAMP)
	$(LOWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(LOWEST_TESTS)

# The PyTorch adapters at their declared floors (torch, lightning, transformers, accelerate, read from pyproject by
# tests/support/floors.py; pip, so that torch is the machine's CPU build) in a venv of their own, without
# TensorFlow: transformers 4.50 tries to import its TF side beside Keras 3 and fails.
TORCH_FLOORS_VENV ?= .venv-torch-floors
TORCH_FLOORS_STAMP := $(TORCH_FLOORS_VENV)/.installed
TORCH_FLOORS_TESTS ?= tests/test_torch_manager.py tests/test_lightning_io.py tests/test_hf_callback.py

$(TORCH_FLOORS_STAMP): pyproject.toml Makefile
	test -x $(TORCH_FLOORS_VENV)/bin/python || python3 -m venv $(TORCH_FLOORS_VENV)
	$(TORCH_FLOORS_VENV)/bin/python -m pip install -q --upgrade pip
	$(TORCH_FLOORS_VENV)/bin/python -m pip install -q -e '.[test]'
	$(TORCH_FLOORS_VENV)/bin/python -m pip install -q $$($(TORCH_FLOORS_VENV)/bin/python tests/support/floors.py torch lightning hf)
	touch $(TORCH_FLOORS_STAMP)

test-torch-floors: $(TORCH_FLOORS_STAMP)
	$(TORCH_FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider $(TORCH_FLOORS_TESTS)

bench: $(STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(LOWEST_VENV) $(TORCH_FLOORS_VENV) .tools .pytest_cache build *.egg-info
