#!/usr/bin/env python3
"""Benchmarks xds-proxy against direct connections, haproxy and nginx on loopback.

Two suites, chosen by the first argument:

  tcp (default)  tcp_proxy: iperf3 throughput and wrk new connections/s through each system, haproxy in mode tcp and
                 nginx's stream module (`make bench`).
  http           http_connection_manager: wrk (HTTP/1.1, keep-alive) and h2load (h2c, prior knowledge) through each
                 system to a small-response nginx origin; requests/s, p50/p99 latency, the proxy's CPU per 1,000
                 requests/s and its RSS (`make bench-http`). `--loads tls-hs,https` runs the TLS-terminating loads
                 instead: new TLS connections/s (one request per handshake) and HTTPS requests/s over keep-alive,
                 every proxy presenting the same ECDSA P-256 certificate (`make bench-tls`).

Every system proxies the same upstreams, runs with 2 workers and no logging, and the systems are interleaved within
each round, in an order that rotates from round to round, so drift on the machine hits them alike. Prints medians
and ratios as a markdown table. The Makefile targets install the tools and build the release binary.
"""
import argparse
import json
import math
import os
import re
import resource
import shlex
import shutil
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
    # Envoy's opt-in CPU locality: workers pinned (enable_worker_cpu_affinity), connections steered to the worker on
    # the receiving CPU (cpu_locality_balance).
    "xds-proxy-cpu": (19501, 19502),
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


def proxy_bootstrap(system="xds-proxy"):
    listeners, clusters = "", ""
    cpu = system == "xds-proxy-cpu"
    balance = "\n    connection_balance_config: { cpu_locality_balance: {} }" if cpu else ""
    iperf_port, http_port = PORTS[system]
    for name, (lport, uport) in (("iperf", (iperf_port, IPERF_PORT)), ("http", (http_port, HTTP_PORT))):
        listeners += f"""
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {lport} }} }}
    tcp_backlog_size: 4096{balance}
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
    pin = "enable_worker_cpu_affinity: true\n" if cpu else ""
    return f"{pin}static_resources:\n  listeners:{listeners}\n  clusters:{clusters}\n"


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


def run_tcp(args):
    systems = args.systems.split(",")
    d = tempfile.mkdtemp(prefix="xds-bench-")
    procs = []
    try:
        procs.append(start(["iperf3", "-s", "-p", str(IPERF_PORT)]))
        procs.append(start(["nginx", "-c", write(f"{d}/http.conf", nginx_http_cfg(d)), "-g", "daemon off;"]))
        proxy = start([args.proxy, "--config-path", write(f"{d}/bootstrap.yaml", proxy_bootstrap()),
                       "--concurrency", "2", "--log-level", "error"])
        procs.append(proxy)
        if "xds-proxy-cpu" in systems:
            cpu_bootstrap = write(f"{d}/bootstrap-cpu.yaml", proxy_bootstrap("xds-proxy-cpu"))
            procs.append(start([args.proxy, "--config-path", cpu_bootstrap, "--concurrency", "2", "--log-level",
                                "error"]))
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
            # The order rotates each round, so no system always runs right after the same one.
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for name, fn in tests:
                for s in order:
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
        ours = [s for s in ("xds-proxy", "xds-proxy-cpu") if s in systems]
        header = f"| {'test':24} | " + " | ".join(f"{s:>10}" for s in systems)
        header += "".join(f" | {s} / best peer" for s in ours) + " | xds-proxy / direct |"
        print(header)
        print("|" + "---|" * (len(systems) + len(ours) + 2))
        for name, _ in tests:
            med = {s: statistics.median(results[(name, s)]) for s in systems}
            best = max((med[s] for s in peers), default=None)
            row = f"| {name:24} | " + " | ".join(f"{med[s]:>10.2f}" for s in systems)
            for s in ours:
                ratio = f"{med[s] / best:.2f}" if best else "-"
                row += f" | {ratio:>{len(s) + 12}}"
            direct = f"{med['xds-proxy'] / med['direct']:.2f}" if "direct" in med and "xds-proxy" in med else "-"
            print(row + f" | {direct:>18} |")
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

# ---------------------------------------------------------------------------------------------------------------------
# http suite
#
# Origin: nginx answering every request with a fixed small body, on one HTTP/1.1 port (what the proxies forward to,
# over keep-alive connections) and one h2c port (for the direct h2c run). Every proxy listens on one HTTP/1.1 port and
# one h2c port (xds-proxy's HCM codec AUTO serves both on one listener).

HTTP_ORIGIN = (18180, 18181)  # (http/1.1, h2c)
HTTP_PORTS = {  # system -> (http/1.1 port, h2c port)
    "direct": HTTP_ORIGIN,
    "xds-proxy": (19011, 19011),
    "haproxy": (19111, 19112),
    "nginx": (19211, 19212),
}
# TLS-terminating listeners (the tls-hs and https loads); the origin has none, so "direct" sits these loads out.
TLS_PORTS = {"xds-proxy": 19013, "haproxy": 19113, "nginx": 19213}
HTTP_LOADS = ("h1", "h2c", "tls-hs", "https")
ORIGIN_BODY = "ok\n"
ISTIO_VCPU_PER_1K, ISTIO_MB = 0.20, 60  # Istio 1.24 sidecar, per 1,000 requests/s (from the issue)
TOOLS = {"wrk": "wrk", "h2load": "nghttp2-client", "nginx": "nginx", "haproxy": "haproxy"}


def start_logged(cmd, log_path):
    """Like start(), keeping stderr in log_path so a system that fails to come up can say why."""
    with open(log_path, "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def wait_up(name, proc, port, log_path):
    end = time.time() + 20
    while time.time() < end:
        if proc.poll() is not None:
            with open(log_path) as f:
                raise SystemExit(f"{name} exited ({proc.returncode}) before accepting on port {port}:\n"
                                 f"{f.read()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{name}: port {port} never accepted")


def origin_cfg(d):
    h1, h2 = HTTP_ORIGIN
    # keepalive_requests: nginx closes a keep-alive connection after 1,000 requests by default, which would make
    # every proxy reconnect upstream all the time.
    return f"""worker_processes 2;
worker_rlimit_nofile 20000;
pid {d}/origin.pid;
error_log /dev/null crit;
events {{ worker_connections 9000; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  default_type text/plain;
  server {{
    listen 127.0.0.1:{h1} reuseport backlog=4096;
    listen 127.0.0.1:{h2} http2 reuseport backlog=4096;
    location / {{ return 200 {json.dumps(ORIGIN_BODY)}; }}
  }}
}}
"""


def port_for(system, load):
    if load in ("tls-hs", "https"):
        return TLS_PORTS[system]
    return HTTP_PORTS[system][0 if load == "h1" else 1]


def make_cert(d):
    """A self-signed ECDSA P-256 certificate for every TLS-terminating proxy (haproxy wants cert and key in one file)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", f"{d}/key.pem", "-out", f"{d}/cert.pem", "-days", "2", "-subj", "/CN=bench.local",
                    "-addext", "subjectAltName=DNS:bench.local"], check=True, capture_output=True)
    with open(f"{d}/bundle.pem", "w") as out:
        for part in ("cert.pem", "key.pem"):
            with open(f"{d}/{part}") as f:
                out.write(f.read())


def http_bootstrap(d=None):
    port = HTTP_PORTS["xds-proxy"][0]
    tls = "" if d is None else f"""
  - name: https
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {TLS_PORTS["xds-proxy"]} }} }}
    tcp_backlog_size: 4096
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates:
            - certificate_chain: {{ filename: {d}/cert.pem }}
              private_key: {{ filename: {d}/key.pem }}
      filters:{HCM}"""
    return f"""static_resources:
  listeners:
  - name: http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    tcp_backlog_size: 4096
    filter_chains:
    - filters:{HCM}{tls}
  clusters:{ORIGIN_CLUSTER}"""


# The HTTP connection manager every xds-proxy listener of the suite runs (plain and TLS alike).
HCM = """
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
          route_config:
            name: bench
            virtual_hosts:
            - name: origin
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: origin }"""

ORIGIN_CLUSTER = f"""
  - name: origin
    type: STATIC
    connect_timeout: 5s
    circuit_breakers:
      thresholds: [ {{ max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000 }} ]
    load_assignment:
      cluster_name: origin
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {HTTP_ORIGIN[0]} }} }} }}
"""


def haproxy_http_cfg(d=None):
    h1, h2 = HTTP_PORTS["haproxy"]
    tls = "" if d is None else f"\n  bind 127.0.0.1:{TLS_PORTS['haproxy']} ssl crt {d}/bundle.pem alpn h2,http/1.1"
    # http-reuse always: idle upstream connections are shared between client connections, as Envoy's pools do.
    return f"""global
  nbthread 2
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
  http-reuse always
frontend bench
  bind 127.0.0.1:{h1}
  bind 127.0.0.1:{h2} proto h2{tls}
  default_backend origin
backend origin
  server origin 127.0.0.1:{HTTP_ORIGIN[0]}
"""


def nginx_proxy_cfg(d, tls=False):
    h1, h2 = HTTP_PORTS["nginx"]
    # nginx 1.22 leaves TLS 1.3 out unless told; every system then negotiates TLS 1.3 with wrk.
    tls = "" if not tls else f"""    listen 127.0.0.1:{TLS_PORTS["nginx"]} ssl http2 reuseport backlog=4096;
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
"""
    # `listen ... http2` without ssl is h2c with prior knowledge only in nginx 1.22.
    return f"""worker_processes 2;
worker_rlimit_nofile 20000;
pid {d}/nginx-proxy.pid;
error_log /dev/null crit;
events {{ worker_connections 9000; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  upstream origin {{
    server 127.0.0.1:{HTTP_ORIGIN[0]};
    keepalive 1024;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
  }}
  server {{
    listen 127.0.0.1:{h1} reuseport backlog=4096;
    listen 127.0.0.1:{h2} http2 reuseport backlog=4096;
{tls}    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


def descendants(root):
    """root and every process below it (nginx's workers; haproxy and xds-proxy are one process with threads)."""
    children = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(e))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    """utime + stime of the live processes (all their threads), in seconds."""
    ticks = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # stat fields 14 and 15
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_sum_kib(pids):
    total = 0
    for p in pids:
        try:
            total += rss_kib(p)
        except OSError:
            pass
    return total


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def load_cmd(load, port, seconds, args, log_file=None):
    url = f"http://127.0.0.1:{port}/"
    if load == "h1":
        return ["wrk", "-t", "2", "-c", str(args.connections), "-d", f"{seconds}s", "--latency", url]
    if load == "https":
        return ["wrk", "-t", "2", "-c", str(args.connections), "-d", f"{seconds}s", "--latency",
                f"https://127.0.0.1:{port}/"]
    if load == "tls-hs":
        # One request per connection, so every request costs a full handshake (wrk never resumes sessions).
        return ["wrk", "-t", "2", "-c", "32", "-d", f"{seconds}s", "--latency", "-H", "Connection: close",
                f"https://127.0.0.1:{port}/"]
    cmd = ["h2load", "-t", "2", "-c", str(args.connections), "-m", str(args.streams), "-D", str(seconds)]
    return cmd + (["--log-file", log_file] if log_file else []) + [url]


def wrk_duration_ms(value, unit):
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse_wrk(out):
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    requests = re.search(r"(\d+) requests in", out)
    pct = dict(re.findall(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+(?:us|ms|s|m))\s*$", out, re.M))
    if not (rps and requests and "50" in pct and "99" in pct):
        raise RuntimeError("unexpected wrk output:\n" + out)
    lat = {k: wrk_duration_ms(*re.match(r"([\d.]+)(us|ms|s|m)", v).groups()) for k, v in pct.items()}
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors += sum(int(x) for x in sock.groups()) if sock else 0
    return float(rps.group(1)), int(requests.group(1)), lat["50"], lat["99"], errors


def percentile(sorted_values, q):
    """Nearest-rank percentile."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def parse_h2load(out, log_file):
    rps = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not (rps and req and codes):
        raise RuntimeError("unexpected h2load output:\n" + out)
    times = []
    with open(log_file) as f:  # start (µs since epoch) \t status \t µs until the end of the response
        for line in f:
            cols = line.split("\t")
            if len(cols) >= 3 and cols[1] != "-1":
                times.append(int(cols[2]))
    times.sort()
    errors = int(req.group(5)) + int(req.group(6)) + int(req.group(7)) + sum(int(codes.group(i)) for i in (2, 3, 4))
    done = int(req.group(3))
    return float(rps.group(1)), done, percentile(times, 50) / 1e3, percentile(times, 99) / 1e3, errors


def http_check(load, port):
    """One request through the path must answer 200 with the origin's body (h2c: one h2load request)."""
    if load in ("tls-hs", "https"):
        import ssl
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        ok = data.startswith(b"HTTP/1.1 200") and data.endswith(ORIGIN_BODY.encode())
        head = data.split(b"\r\n", 1)[0].decode(errors="replace")
    elif load == "h1":
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            data = b""
            while not data.endswith(ORIGIN_BODY.encode()) and len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        ok = data.startswith(b"HTTP/1.1 200") and data.endswith(ORIGIN_BODY.encode())
        head = data.split(b"\r\n", 1)[0].decode(errors="replace")
    else:
        out = subprocess.run(["h2load", "-n", "4", "-c", "1", f"http://127.0.0.1:{port}/"],
                             capture_output=True, text=True, timeout=30).stdout
        ok = "4 succeeded" in out and re.search(r"status codes: 4 2xx", out) is not None
        head = next((l for l in out.splitlines() if l.startswith(("requests:", "status codes:"))), out[-300:])
    if not ok:
        raise SystemExit(f"{load} check on port {port} failed: {head}")


def measure(load, system, server, origin, args, d):
    """One measured run of `load` against `system` after a warm-up run; `server` is the process under test (None for
    direct). CPU is sampled from /proc just before and after the load generator runs."""
    port = port_for(system, load)
    if args.warmup > 0:
        subprocess.run(load_cmd(load, port, args.warmup, args), capture_output=True, timeout=args.warmup + 60)
    log_file = f"{d}/h2load.log"
    if os.path.exists(log_file):
        os.remove(log_file)
    pids = descendants(server.pid) if server else []
    origin_pids = descendants(origin.pid)
    cpu0, ocpu0, ccpu0, t0 = cpu_seconds(pids), cpu_seconds(origin_pids), children_cpu(), time.time()
    p = subprocess.Popen(load_cmd(load, port, args.seconds, args, log_file if load == "h2c" else None),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = 0
    while p.poll() is None:  # keep the last sample taken while the load was still running
        sample = rss_sum_kib(pids)
        time.sleep(0.25)
        if p.poll() is None:
            rss = sample
    out = p.stdout.read()
    p.stdout.close()
    wall = time.time() - t0
    cpu, ocpu, ccpu = cpu_seconds(pids) - cpu0, cpu_seconds(origin_pids) - ocpu0, children_cpu() - ccpu0
    if server and server.poll() is not None:
        with open(f"{d}/{system}.err") as f:
            raise SystemExit(f"{system} exited ({server.returncode}) during the {load} run:\n{f.read()[-2000:]}\n"
                             f"load generator output:\n{out}")
    rps, requests, p50, p99, errors = parse_h2load(out, log_file) if load == "h2c" else parse_wrk(out)
    if requests == 0:
        raise SystemExit(f"no request completed through {system} ({load}):\n{out}")
    return {"rps": rps, "p50": p50, "p99": p99, "errors": errors, "rss": rss / 1024, "vcpu": cpu / wall,
            "vcpu_per_1k": cpu / requests * 1000, "origin_vcpu": ocpu / wall, "client_vcpu": ccpu / wall}


def report(args, systems, loads, results):
    """The markdown table for BENCHMARKS.md, then xds-proxy against the issue's targets."""
    med = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in results.items()}
    errs = {k: sum(x["errors"] for x in v) for k, v in results.items()}
    names = {"h1": f"wrk HTTP/1.1, {args.connections} conns",
             "h2c": f"h2load h2c, {args.connections} conns × {args.streams} streams",
             "tls-hs": "wrk HTTPS, 32 conns, one request per TLS handshake",
             "https": f"wrk HTTPS keep-alive, {args.connections} conns"}
    model = subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True, text=True)
    warm = f" (each after a {args.warmup}s warm-up run)" if args.warmup else ""
    print(f"\ncommand: {shlex.join(['python3'] + sys.argv)}")
    for load in loads:
        print(f"load {load}: {shlex.join(load_cmd(load, 'PORT', args.seconds, args, 'LOG'))}{warm}")
    print(f"machine: {os.cpu_count()} CPUs, {model.stdout.strip()}; {args.rounds} rounds of {args.seconds}s per system "
          f"and load, systems interleaved, medians. The load generator (2 threads), the origin (nginx, 2 workers) and "
          f"the proxy (2 workers) share these CPUs.")
    print(f"proxy vCPU: utime+stime of all the proxy's processes over the measured run; RSS: summed over its "
          f"processes, last sample under load. Origin: nginx `return 200` ({len(ORIGIN_BODY)}-byte body), reached "
          f"over HTTP/1.1 keep-alive by every proxy.\n")
    peers = [p for p in ("nginx", "haproxy") if p in systems]
    cols = ["load", "system", "req/s", "p50 (ms)", "p99 (ms)", "errors", "proxy vCPU", "vCPU per 1,000 req/s",
            "RSS (MiB)"] + [f"req/s / {p}" for p in peers]
    print("| " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * (len(cols) - 2))
    for load in loads:
        for s in systems:
            if (load, s) not in med:
                continue
            m = med[(load, s)]
            row = [names[load], "**xds-proxy**" if s == "xds-proxy" else s, f"{m['rps']:.0f}", f"{m['p50']:.2f}",
                   f"{m['p99']:.2f}", str(errs[(load, s)])]
            row += [f"{m['vcpu']:.2f}", f"{m['vcpu_per_1k']:.4f}", f"{m['rss']:.1f}"] if s != "direct" else ["-"] * 3
            row += [f"{m['rps'] / med[(load, p)]['rps']:.2f}" for p in peers]
            print("| " + " | ".join(row) + " |")
    if "xds-proxy" not in systems:
        return
    print()
    for load in loads:
        x = med[(load, "xds-proxy")]
        verdicts = []
        if load in ("tls-hs", "https"):
            # Issue 7's target: at least the better of the two on both TLS loads.
            best = max((med[(load, p)]["rps"] for p in peers), default=0)
            if best:
                ratio = x["rps"] / best
                verdicts.append(f"{ratio:.2f}× the better peer (target ≥ 1: {'met' if ratio >= 1 else 'NOT met'})")
            verdicts.append(f"{x['vcpu_per_1k']:.4f} vCPU per 1,000 req/s; RSS {x['rss']:.1f} MiB")
            print(f"- {names[load]}: " + "; ".join(verdicts))
            continue
        for p, want in (("nginx", 1.2), ("haproxy", 1.0)):
            if p in peers:
                ratio = x["rps"] / med[(load, p)]["rps"]
                verdicts.append(f"req/s {ratio:.2f}× {p} (target ≥ {want}: {'met' if ratio >= want else 'NOT met'})")
        if peers:
            best_p99 = min(med[(load, p)]["p99"] for p in peers)
            verdicts.append(f"p99 {x['p99']:.2f} ms vs " + ", ".join(f"{p} {med[(load, p)]['p99']:.2f}" for p in peers)
                            + f" (target ≤ both: {'met' if x['p99'] <= best_p99 else 'NOT met'})")
        verdicts.append(f"{x['vcpu_per_1k']:.4f} vCPU per 1,000 req/s = {x['vcpu_per_1k'] / ISTIO_VCPU_PER_1K:.1%} of "
                        f"Istio 1.24's sidecar ({ISTIO_VCPU_PER_1K:.2f}); RSS {x['rss']:.1f} MiB (Istio's sidecar: "
                        f"{ISTIO_MB} MB per 1,000 req/s)")
        print(f"- {names[load]}: " + "; ".join(verdicts))


def applies(load, system):
    """The origin terminates no TLS: "direct" has no TLS loads."""
    return not (system == "direct" and load in ("tls-hs", "https"))


def run_http(args):
    systems, loads = args.systems.split(","), args.loads.split(",")
    unknown = [x for x in systems if x not in HTTP_PORTS] + [x for x in loads if x not in HTTP_LOADS]
    if unknown:
        raise SystemExit(f"unknown systems or loads: {', '.join(unknown)}")
    missing = [f"{t} ({pkg})" for t, pkg in TOOLS.items() if not shutil.which(t)]
    if missing:
        raise SystemExit("missing tools: " + ", ".join(missing) + " (make bench-http installs them)")
    if "xds-proxy" in systems and not os.path.exists(args.proxy):
        raise SystemExit(f"{args.proxy} is missing: cargo build --release")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # h2load's per-request log stays off the disk
    d = tempfile.mkdtemp(prefix="xds-bench-http-", dir=shm)
    procs, servers = [], {}  # servers: system -> the process under test
    try:
        tls = any(load in ("tls-hs", "https") for load in loads)
        if tls:
            make_cert(d)
        td = d if tls else None
        cmds = {
            "xds-proxy": [args.proxy, "--config-path", write(f"{d}/bootstrap.yaml", http_bootstrap(td)),
                          "--concurrency", "2", "--log-level", "error"],
            "haproxy": ["haproxy", "-f", write(f"{d}/haproxy.cfg", haproxy_http_cfg(td)), "-db"],
            "nginx": ["nginx", "-c", write(f"{d}/nginx.conf", nginx_proxy_cfg(d, tls)), "-g", "daemon off;"],
        }
        origin = start_logged(["nginx", "-c", write(f"{d}/origin.conf", origin_cfg(d)), "-g", "daemon off;"],
                              f"{d}/direct.err")
        procs.append(origin)
        for s in systems:
            if s != "direct":
                servers[s] = start_logged(cmds[s], f"{d}/{s}.err")
                procs.append(servers[s])
        for s in ["direct"] + [s for s in systems if s != "direct"]:
            for port in sorted(set(port_for(s, load) for load in loads if applies(load, s))):
                wait_up(s if s != "direct" else "origin nginx", servers.get(s, origin), port, f"{d}/{s}.err")
        time.sleep(0.5)
        for s in systems:
            for load in loads:
                if applies(load, s):
                    http_check(load, port_for(s, load))

        results = {}  # (load, system) -> [measure()]
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for load in loads:
                for s in order:
                    if not applies(load, s):
                        continue
                    v = measure(load, s, servers.get(s), origin, args, d)
                    results.setdefault((load, s), []).append(v)
                    print(f"round {r + 1} {load:4} {s:10} {v['rps']:8.0f} req/s  p50 {v['p50']:6.2f} ms  "
                          f"p99 {v['p99']:7.2f} ms  errors {v['errors']}  proxy {v['vcpu']:.2f} vCPU "
                          f"{v['rss']:.1f} MiB  origin {v['origin_vcpu']:.2f} vCPU  client {v['client_vcpu']:.2f} vCPU",
                          file=sys.stderr, flush=True)
                    time.sleep(0.5)
        report(args, systems, loads, results)
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
        shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", nargs="?", choices=("tcp", "http"), default="tcp")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, help="length of each measured run (default: tcp 5, http 10)")
    ap.add_argument("--systems", help="tcp: of direct, xds-proxy, xds-proxy-cpu, haproxy, nginx (default all); "
                    "http: of direct, xds-proxy, haproxy, nginx (default all)")
    ap.add_argument("--proxy", default=PROXY, help="the xds-proxy binary (default: the release build)")
    ap.add_argument("--warmup", type=int, default=2, help="http: seconds of unmeasured load before each run")
    ap.add_argument("--connections", type=int, default=64, help="http: client connections (wrk and h2load)")
    ap.add_argument("--streams", type=int, default=10, help="http: concurrent streams per h2c connection (h2load -m)")
    ap.add_argument("--loads", default="h1,h2c", help="http: h1 (wrk), h2c (h2load) or both")
    args = ap.parse_args()
    if args.seconds is None:
        args.seconds = 10 if args.suite == "http" else 5
    if args.systems is None:
        args.systems = "direct,xds-proxy,haproxy,nginx" if args.suite == "http" else \
            "direct,xds-proxy,xds-proxy-cpu,haproxy,nginx"
    run_http(args) if args.suite == "http" else run_tcp(args)


if __name__ == "__main__":
    main()
