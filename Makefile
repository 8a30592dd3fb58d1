# The single entry point for building, running and testing xds-proxy (CI calls `make test` through .ci/run).
CARGO ?= cargo
CONFIG ?= examples/bootstrap-static.yaml
ARGS ?=

.PHONY: all build run test lint fmt fmt-check bench presubmit deps

all: build

build:
	$(CARGO) build --release

## run: the proxy with the example bootstrap (see README).
run: build
	./target/release/xds-proxy --config-path $(CONFIG) --concurrency 2 $(ARGS)

## deps: system packages the tests need (installed when missing).
deps:
	@./.ci/deps.sh

## test: the whole test suite (unit + integration, real sockets and processes).
test: deps
	$(CARGO) test --workspace --all-targets --no-fail-fast

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

## bench: tcp_proxy vs direct, haproxy and nginx on loopback (not part of `make test`; results in BENCHMARKS.md).
bench: build
	@./.ci/deps.sh bench
	python3 bench/run.py $(BENCH_ARGS)

presubmit: fmt-check lint test
