# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# checkov pins boto3/botocore far below what the project needs, so it lives in its own venv (infra tests only).
CHECKOV_VENV ?= .venv-checkov

.PHONY: install demo test bench clean tools

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[s3,gcs,keras-cpu,test]'
	touch $(STAMP)

$(CHECKOV_VENV)/bin/checkov:
	python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q checkov==3.3.30

# shellcheck (Debian package) for the infra script tests; installed when we can (root, apt), else those tests skip.
tools: $(CHECKOV_VENV)/bin/checkov
	@command -v shellcheck >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null; } ; } || \
	  echo "make: shellcheck not installed; the shellcheck tests will skip"

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP) tools
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache build *.egg-info
