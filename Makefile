# tuneserve developer entry points. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/tuneserve/v1/*.proto)

.PHONY: setup demo test test-fast lint-imports protos bench bench-quick lock clean

setup: $(STAMP)

# torch is installed first and pinned: on our machines that spec is a local CPU build,
# while a bare `torch` requirement can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tuneserve demo

# The package's layers (pyproject.toml [tool.importlinter]) are checked before the tests.
lint-imports: setup
	$(VENV)/bin/lint-imports --no-cache

test: setup lint-imports
	$(VENV)/bin/pytest -q --durations=30

test-fast: setup lint-imports
	$(VENV)/bin/pytest -q -m "not slow"

# Regenerates the gRPC code and type stubs checked in under services/protocol.
# tests/unit/test_protos.py fails when they are stale.
protos: setup
	$(PY) -m services.protogen

# The image's hash-locked dependencies (Dockerfile): pyproject.toml's runtime ones and the
# demo's model, resolved for the image's platform with torch from the PyTorch index of
# TORCH_VARIANT (requirements.lock for cpu, requirements-<variant>.lock otherwise).
# LOCK_SOURCES replaces that index (e.g. LOCK_SOURCES='--find-links /opt/wheels').
TORCH_VERSION := 2.13.0
TORCH_VARIANT ?= cpu
LOCK_FILE := $(if $(filter cpu,$(TORCH_VARIANT)),requirements.lock,requirements-$(TORCH_VARIANT).lock)
LOCK_SOURCES ?= --extra-index-url https://download.pytorch.org/whl/$(TORCH_VARIANT) --index-strategy unsafe-best-match
lock: setup
	$(PIP) install -q uv
	echo "torch==$(TORCH_VERSION)+$(TORCH_VARIANT)" > $(VENV)/lock-constraints.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra demo --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--constraint $(VENV)/lock-constraints.txt $(LOCK_SOURCES) \
		--custom-compile-command 'make lock' --output-file $(LOCK_FILE)

bench: setup
	$(PY) bench/serve.py
	$(PY) bench/train.py
	$(PY) bench/hotload.py
	$(PY) bench/generate.py

# A regression guard: Classify at 1 and 32 clients and generation streams, each against
# the model in-process, measured in the same run; prints the ratio tables.
bench-quick: setup
	$(PY) bench/serve.py --quick
	$(PY) bench/generate.py --quick

clean:
	rm -rf $(VENV) .tuneserve .pytest_cache
