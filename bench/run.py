#!/usr/bin/env python3
"""Benchmarks xds-proxy's tcp_proxy against direct connections, haproxy and nginx (stream) on loopback.

Every system proxies the same upstreams (an iperf3 server and an HTTP nginx), runs with 2 workers and no logging, and
the systems are interleaved within each round so drift on the machine hits them alike. Prints medians and ratios.
Run through `make bench`, which installs the tools and builds the release binary.
"""
import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY = os.path.join(ROOT, "target", "release", "xds-proxy")
IPERF_PORT, HTTP_PORT = 15201, 18080
PORTS = {  # system -> (iperf port, http port)
    "direct": (IPERF_PORT, HTTP_PORT),
    "xds-proxy": (19001, 19002),
    "haproxy": (19101, 19102),
    "nginx": (19201, 19202),
}


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never accepted")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def start(cmd, **kw):
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kw)


def proxy_bootstrap():
    listeners, clusters = "", ""
    for name, (lport, uport) in (("iperf", (19001, IPERF_PORT)), ("http", (19002, HTTP_PORT))):
        listeners += f"""
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {lport} }} }}
    tcp_backlog_size: 4096
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {name}"""
        clusters += f"""
  - name: {name}
    connect_timeout: 5s
    circuit_breakers: {{ thresholds: [ {{ max_connections: 1000000 }} ] }}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {uport} }} }} }}"""
    return f"static_resources:\n  listeners:{listeners}\n  clusters:{clusters}\n"


def haproxy_cfg():
    return f"""global
  nbthread 2
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend iperf
  bind 127.0.0.1:19101
  default_backend iperf
backend iperf
  server s 127.0.0.1:{IPERF_PORT}
frontend http
  bind 127.0.0.1:19102
  default_backend http
backend http
  server s 127.0.0.1:{HTTP_PORT}
"""


def nginx_modules():
    conf = "/etc/nginx/modules-enabled"
    if os.path.isdir(conf) and any("stream" in f for f in os.listdir(conf)):
        return f"include {conf}/*.conf;"
    return "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"


def nginx_stream_cfg(d):
    return f"""{nginx_modules()}
worker_processes 2;
worker_rlimit_nofile 20000;
pid {d}/nginx-stream.pid;
error_log /dev/null crit;
events {{ worker_connections 9000; }}
stream {{
  server {{ listen 127.0.0.1:19201 reuseport backlog=4096; proxy_pass 127.0.0.1:{IPERF_PORT}; }}
  server {{ listen 127.0.0.1:19202 reuseport backlog=4096; proxy_pass 127.0.0.1:{HTTP_PORT}; }}
}}
"""


def nginx_http_cfg(d):
    return f"""worker_processes 1;
worker_rlimit_nofile 20000;
pid {d}/nginx-http.pid;
error_log /dev/null crit;
events {{ worker_connections 9000; }}
http {{
  access_log off;
  keepalive_timeout 300s;
  client_header_timeout 300s;
  server {{ listen 127.0.0.1:{HTTP_PORT} backlog=4096; location / {{ return 200 "ok\\n"; }} }}
}}
"""


def iperf(port, streams, seconds):
    out = subprocess.run(
        ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"],
        capture_output=True, text=True, timeout=seconds + 30)
    data = json.loads(out.stdout)
    if "error" in data:
        raise RuntimeError(data["error"])
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def conn_rate(port, seconds):
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", "32", "-d", f"{seconds}s", "-H", "Connection: close", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=seconds + 30)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    errors = re.search(r"Socket errors: (.*)", out.stdout)
    if not m:
        raise RuntimeError(out.stdout + out.stderr)
    return float(m.group(1)), (errors.group(1) if errors else "")


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def hold_connections(port, n):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        socks.append(s)
    # One request each so every connection is fully established upstream too.
    for s in socks:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    for s in socks:
        s.recv(4096)
    return socks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--systems", default="direct,xds-proxy,haproxy,nginx")
    args = ap.parse_args()
    systems = args.systems.split(",")
    d = tempfile.mkdtemp(prefix="xds-bench-")
    procs = []
    try:
        procs.append(start(["iperf3", "-s", "-p", str(IPERF_PORT)]))
        procs.append(start(["nginx", "-c", write(f"{d}/http.conf", nginx_http_cfg(d)), "-g", "daemon off;"]))
        proxy = start([PROXY, "--config-path", write(f"{d}/bootstrap.yaml", proxy_bootstrap()), "--concurrency", "2",
                       "--log-level", "error"])
        procs.append(proxy)
        if "haproxy" in systems:
            procs.append(start(["haproxy", "-f", write(f"{d}/haproxy.cfg", haproxy_cfg()), "-db"]))
        if "nginx" in systems:
            procs.append(start(["nginx", "-c", write(f"{d}/stream.conf", nginx_stream_cfg(d)), "-g", "daemon off;"]))
        for s in systems:
            for p in PORTS[s]:
                wait_port(p)
        time.sleep(0.5)

        idle_rss = rss_kib(proxy.pid)
        results = {}  # (test, system) -> [values]
        tests = [("tcp 1 stream (Gbit/s)", lambda p: iperf(p[0], 1, args.seconds)),
                 ("tcp 4 streams (Gbit/s)", lambda p: iperf(p[0], 4, args.seconds)),
                 ("new connections/s", lambda p: conn_rate(p[1], args.seconds)[0])]
        for r in range(args.rounds):
            for name, fn in tests:
                for s in systems:
                    v = fn(PORTS[s])
                    results.setdefault((name, s), []).append(v)
                    print(f"round {r + 1} {name:24} {s:10} {v:12.2f}", file=sys.stderr, flush=True)
                    time.sleep(0.5)

        held = hold_connections(PORTS["xds-proxy"][1], 1000)
        time.sleep(1)
        rss_1000 = rss_kib(proxy.pid)
        peak = rss_kib(proxy.pid, "VmHWM")
        for s in held:
            s.close()

        cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True, text=True)
        print(f"\nmachine: {os.cpu_count()} CPUs, {cpu.stdout.strip()}; {args.rounds} rounds of {args.seconds}s, "
              f"medians")
        peers = [s for s in ("haproxy", "nginx") if s in systems]
        header = f"| {'test':24} | " + " | ".join(f"{s:>10}" for s in systems)
        header += " | xds-proxy / best peer | xds-proxy / direct |"
        print(header)
        print("|" + "---|" * (len(systems) + 3))
        for name, _ in tests:
            med = {s: statistics.median(results[(name, s)]) for s in systems}
            best = max((med[s] for s in peers), default=None)
            row = f"| {name:24} | " + " | ".join(f"{med[s]:>10.2f}" for s in systems)
            ratio = f"{med['xds-proxy'] / best:.2f}" if best and "xds-proxy" in med else "-"
            direct = f"{med['xds-proxy'] / med['direct']:.2f}" if "direct" in med and "xds-proxy" in med else "-"
            print(row + f" | {ratio:>21} | {direct:>18} |")
        print(f"\nxds-proxy RSS: idle {idle_rss / 1024:.1f} MiB; with 1000 open connections {rss_1000 / 1024:.1f} MiB "
              f"(peak {peak / 1024:.1f} MiB)")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
