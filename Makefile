# captchatask developer entry points. `make demo` and `make test` are the two a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The tools the project builds itself (control plane, helm, promtool, prometheus, wrk), cached by
# version; nothing needs root.
export TESTBIN_DIR ?= $(CURDIR)/.testbin
PYTEST_ARGS ?=

.PHONY: help venv testbin testtools node-binaries node-packages images cluster cluster-down test-node e2e fresh-check lint typecheck unit docs test manifests check-manifests chaos bench demo clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## create the virtualenv with pinned dependencies

$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "== creating $(VENV) (pinned by constraints.txt)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

testbin: ## build (or reuse) the control plane: etcd, kube-apiserver, kubectl
	@hack/build-binaries.sh >/dev/null

testtools: ## testbin plus what only tests and benchmarks use: helm, promtool, prometheus, wrk, zsh
	@hack/build-binaries.sh --test >/dev/null
	@hack/system-packages.sh test

node-binaries: testbin ## also build kubelet, controller-manager, scheduler, kube-proxy, CoreDNS, pause
	@hack/build-binaries.sh --node >/dev/null

node-packages: ## containerd, runc, CNI plugins, iptables, conntrack, buildah, podman (Debian, as root)
	@hack/system-packages.sh node images

cluster: venv node-binaries node-packages ## a one-node cluster (root): eval "$$(make -s cluster)"
	@$(BIN)/captchatask testbed up --node

cluster-down: venv ## stop the cluster and remove everything it made
	@$(BIN)/captchatask testbed down

test-node: venv testtools node-binaries node-packages ## only the node tests (a real kubelet runs pods)
	$(BIN)/pytest -m node $(PYTEST_ARGS)

e2e: venv testtools node-binaries node-packages ## the chart on a real node (or $$KUBECONFIG's cluster); nothing lost
	$(BIN)/python -m bench.e2e $(E2E_ARGS)

lint: venv ## ruff check + format check + import contracts (layers, purity, no cycles)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: venv ## mypy --strict
	$(BIN)/mypy

unit: venv ## only the tests that need no control plane
	$(BIN)/pytest -m "not controlplane" $(PYTEST_ARGS)

docs: venv ## the documentation site, strict (warnings and broken links fail), into docs/_build/html
	$(BIN)/sphinx-build -W --keep-going -n -q -b dirhtml docs docs/_build/html

test: venv testtools node-binaries node-packages lint typecheck docs ## lint, types, docs, every test (control plane, node, e2e)
	$(BIN)/pytest $(PYTEST_ARGS)

images: venv ## build the operator, sidecar and emulator images as OCI archives (no Docker needed)
	hack/build-images.sh

manifests: venv testtools ## render deploy/ from the chart
	hack/render-manifests.sh

chaos: venv testtools ## the full chaos run (1,000 tasks, all faults), CaptchaAI then 2captcha dialect
	$(BIN)/python -m bench.chaos --profile full
	$(BIN)/python -m bench.chaos --profile full --dialect 2captcha

bench: venv testtools ## the benchmarks, side by side with the baselines
	$(BIN)/python -m bench.run

demo: venv testbin ## the whole system locally, with faults, in one command
	$(BIN)/captchatask demo

fresh-check: ## a newcomer's run: `make demo` and `make test` in a clean clone, own tools hidden
	hack/fresh-check.sh

clean: ## remove caches (keeps the binary cache)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis docs/_build docs/_generated
