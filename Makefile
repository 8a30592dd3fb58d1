# The single entry point for building, running and testing xds-proxy (CI calls `make test` through .ci/run).
CARGO ?= cargo
ARGS ?=

.PHONY: all build run run-static test lint fmt fmt-check bench bench-http bench-tls presubmit deps

all: build

build:
	$(CARGO) build --release --workspace

## run: xds-mock serving examples/xds-mock-resources.yaml and the proxy bootstrapped to it; Ctrl-C stops both.
run: build
	./examples/run.sh $(ARGS)

## run-static: the proxy alone with a static bootstrap (CONFIG=...).
run-static: build
	./target/release/xds-proxy --config-path $(or $(CONFIG),examples/bootstrap-static.yaml) --concurrency 2 $(ARGS)

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
	$(CARGO) bench --bench chain_match --bench handoff --bench xds_scale

## bench-http: http_connection_manager vs direct, nginx and haproxy as HTTP reverse proxies, wrk (HTTP/1.1) and h2load
## (h2c) on loopback; req/s, p50/p99, CPU per 1,000 req/s and RSS (BENCH_ARGS="--seconds 10 --rounds 3").
bench-http: build
	@./.ci/deps.sh bench
	@command -v h2load >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client; }
	python3 bench/run.py http $(BENCH_ARGS)

## bench-tls: TLS termination vs nginx and haproxy with the same ECDSA P-256 certificate: new TLS connections/s (one
## request per handshake) and HTTPS req/s over keep-alive (wrk), then on to the origin as in bench-http.
bench-tls: build
	@./.ci/deps.sh bench
	python3 bench/run.py http --loads tls-hs,https --systems xds-proxy,haproxy,nginx $(BENCH_ARGS)

presubmit: fmt-check lint test
