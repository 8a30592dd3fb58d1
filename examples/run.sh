#!/usr/bin/env bash
# `make run`: xds-mock serving examples/xds-mock-resources.yaml (watched) and the proxy bootstrapped to it.
# Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
MOCK_CONFIG=${MOCK_CONFIG:-examples/xds-mock-resources.yaml}
PROXY_CONFIG=${PROXY_CONFIG:-examples/bootstrap-ads.yaml}
./target/release/xds-mock --listen 127.0.0.1:18000 --config "$MOCK_CONFIG" --watch &
mock=$!
./target/release/xds-proxy --config-path "$PROXY_CONFIG" --concurrency 2 "$@" &
proxy=$!
stop() { kill -TERM "$proxy" "$mock" 2>/dev/null || true; wait "$proxy" "$mock" 2>/dev/null || true; }
trap stop INT TERM EXIT
echo "xds-mock on 127.0.0.1:18000 (grpcurl -plaintext 127.0.0.1:18000 list); proxy listeners from $MOCK_CONFIG" >&2
wait -n "$proxy" "$mock"
