# captchatask developer entry points. `make demo` and `make test` are the two a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Control-plane binaries (etcd, kube-apiserver, kubectl, helm), cached by version.
export TESTBIN_DIR ?= $(CURDIR)/.testbin
PYTEST_ARGS ?=

.PHONY: help venv testbin lint typecheck unit test manifests check-manifests chaos bench demo clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## create the virtualenv with pinned dependencies

$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "== creating $(VENV) (pinned by constraints.txt)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

testbin: ## build (or reuse) etcd, kube-apiserver, kubectl and helm
	@hack/build-binaries.sh >/dev/null

lint: venv ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv ## mypy --strict
	$(BIN)/mypy

unit: venv ## only the tests that need no control plane
	$(BIN)/pytest -m "not controlplane" $(PYTEST_ARGS)

test: venv testbin lint typecheck ## lint, types, and every test on a real control plane
	$(BIN)/pytest $(PYTEST_ARGS)

.PHONY: images
images: ## build the operator, sidecar and emulator images as OCI archives (no Docker needed)
	hack/build-images.sh

manifests: venv testbin ## render deploy/ from the chart
	hack/render-manifests.sh

chaos: venv testbin ## the full chaos run (1,000 tasks, all faults)
	$(BIN)/python -m bench.chaos --profile full

bench: venv testbin ## the benchmarks, side by side with the baselines
	$(BIN)/python -m bench.run

demo: venv testbin ## the whole system locally, with faults, in one command
	$(BIN)/captchatask demo

clean: ## remove caches (keeps the binary cache)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis
