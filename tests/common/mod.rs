//! Test helpers: upstream servers, config from YAML, an in-process server, and the proxy as a child process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use xds_proxy::config::bootstrap::{BootstrapConfig, NodeOverrides};
use xds_proxy::config::listener::ListenerConfig;
use xds_proxy::config::proto::{self, Format};
use xds_proxy::drain::DrainStrategy;
use xds_proxy::server::{Options, Server};

/// An echo server on loopback; returns its address.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A server that greets every connection with `tag` and then echoes.
pub async fn tagged_server(tag: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(tag).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A loopback port that was free a moment ago.
/// A port for a test to bind later. It comes from below the kernel's ephemeral range (32768 and up by default), so
/// no `connect()` or port-0 bind elsewhere in the suite can take it between this probe and the test's own bind; a
/// per-process counter keeps tests in one binary apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const BASE: u32 = 20000;
    const SPAN: u32 = 12000;
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let port = (BASE + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {BASE} and {}", BASE + SPAN)
}

pub fn bootstrap(yaml: &str) -> BootstrapConfig {
    let b = proto::load_bootstrap(None, Some(yaml)).unwrap_or_else(|e| panic!("bootstrap: {e}"));
    BootstrapConfig::from_proto(b, &NodeOverrides::default()).unwrap_or_else(|e| panic!("bootstrap: {e}"))
}

pub fn listener(yaml: &str) -> ListenerConfig {
    let msg = proto::parse_dynamic(yaml, Format::Yaml, "envoy.config.listener.v3.Listener")
        .unwrap_or_else(|e| panic!("listener: {e}"));
    let l: envoy_types::pb::envoy::config::listener::v3::Listener = proto::decode(&msg).unwrap();
    ListenerConfig::try_from(l).unwrap_or_else(|e| panic!("listener: {e}"))
}

/// A static cluster named `name` with the given endpoints.
pub fn static_cluster(name: &str, endpoints: &[SocketAddr]) -> String {
    let mut eps = String::new();
    for e in endpoints {
        eps.push_str(&format!(
            "\n        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}",
            e.ip(),
            e.port()
        ));
    }
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:{eps}"#
    )
}

/// A listener YAML (as a list item) with a tcp_proxy to `cluster`.
pub fn tcp_listener(name: &str, port: u16, cluster: &str) -> String {
    format!(
        r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}"#
    )
}

/// A single listener (not a list item) answering with `body` then closing.
pub fn direct_listener(name: &str, port: u16, body: &str, extra: &str) -> String {
    format!(
        r#"
name: {name}
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
{extra}
filter_chains:
- name: chain-{body}
  filters:
  - name: envoy.filters.network.direct_response
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config
      response: {{ inline_string: "{body}" }}"#
    )
}

pub fn options(drain: Duration) -> Options {
    Options { concurrency: 2, drain_time: drain, drain_strategy: DrainStrategy::Immediate, ..Default::default() }
}

pub async fn start(yaml: &str, drain: Duration) -> Server {
    Server::start(bootstrap(yaml), &options(drain)).await.unwrap_or_else(|e| panic!("start: {e}"))
}

pub fn listener_addr(server: &Server, name: &str) -> SocketAddr {
    server.listener_manager().listeners().into_iter().find(|l| l.name == name).unwrap().address
}

/// Reads until EOF (or error) and returns what arrived.
pub async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    out
}

/// Connects and reads a direct_response body.
pub async fn fetch(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

/// Echo round trip on an open connection; false once the connection is gone.
pub async fn echo_ok(s: &mut TcpStream, msg: &[u8]) -> bool {
    if s.write_all(msg).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    matches!(tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await, Ok(Ok(_))) && buf == msg
}

/// Waits until `cond` holds or panics after `timeout`, naming what it waited for.
pub async fn eventually(what: &str, timeout: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

pub fn counter(server: &Server, name: &str) -> u64 {
    match server.stats.get(name) {
        Some(xds_proxy::stats::Value::Counter(v)) => v,
        other => panic!("{name}: {other:?}"),
    }
}

pub fn gauge(server: &Server, name: &str) -> i64 {
    match server.stats.get(name) {
        Some(xds_proxy::stats::Value::Gauge(v)) => v,
        other => panic!("{name}: {other:?}"),
    }
}

/// The proxy binary as a child process.
pub struct Proxy {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl Proxy {
    pub fn spawn(bootstrap_yaml: &str, args: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bootstrap.yaml");
        std::fs::write(&path, bootstrap_yaml).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_xds-proxy"))
            .arg("--config-path")
            .arg(&path)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Proxy { child, dir }
    }

    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: sending a signal to our own child.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Waits for exit up to `timeout`; kills and panics past it.
    pub fn wait_exit(&mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                return (status, err);
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("proxy did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the proxy binary to completion with a bootstrap file of the given name and content.
pub fn run_proxy(file_name: &str, content: &str, args: &[&str]) -> (std::process::ExitStatus, String, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file_name);
    std::fs::write(&path, content).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_xds-proxy")).arg("--config-path").arg(&path).args(args).output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned(), path)
}

/// Waits until a TCP connect to `addr` succeeds.
pub async fn wait_accepting(addr: SocketAddr, timeout: Duration) {
    eventually(&format!("{addr} accepting"), timeout, async || TcpStream::connect(addr).await.is_ok()).await;
}

/// A real TLS ClientHello (rustls) offering `alpn` for `sni`.
pub fn client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// An HTTP/1.1 + h2c upstream. Every response says who answered and what arrived: `tag`, method, path, Host (or
/// :authority) and x-request-id, one per line. Paths steer it: `/status/<code>` answers with that code, `/sleep/<ms>`
/// waits first, `/bytes/<n>` streams n bytes, `/drip/<ms>` sends its headers and `a` at once and `b` after `<ms>`,
/// `/upload` counts the request body's bytes.
pub async fn http_upstream(tag: &'static str) -> SocketAddr {
    use http_body_util::BodyExt;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let host = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .or_else(|| req.headers().get("host").map(|h| h.to_str().unwrap().to_string()))
                        .unwrap_or_default();
                    let rid = req.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_string());
                    let mut text = format!(
                        "{tag}\n{} {}\nhost={host}\nx-request-id={}\n",
                        req.method(),
                        req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                        rid.unwrap_or_default()
                    );
                    for (k, v) in req.headers() {
                        if (k.as_str().starts_with("x-") || k == "grpc-timeout" || k == "expect") && k != "x-request-id"
                        {
                            text.push_str(&format!("{k}={}\n", v.to_str().unwrap_or("")));
                        }
                    }
                    text.push_str(&format!("version={:?}\n", req.version()));
                    let mut status = 200u16;
                    if let Some(code) = path.strip_prefix("/status/") {
                        status = code.parse().unwrap_or(500);
                    }
                    if let Some(ms) = path.strip_prefix("/sleep/") {
                        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
                    }
                    if path == "/upload" {
                        let mut body = req.into_body();
                        let mut n = 0u64;
                        while let Some(f) = body.frame().await {
                            if let Ok(d) = f.unwrap().into_data() {
                                n += d.len() as u64;
                            }
                        }
                        text.push_str(&format!("received={n}\n"));
                    }
                    let body: http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible> =
                        if let Some(ms) = path.strip_prefix("/drip/") {
                            let wait = Duration::from_millis(ms.parse().unwrap_or(0));
                            let stream = futures_util::stream::unfold(0u8, move |step| async move {
                                match step {
                                    0 => Some((Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"a"))), 1)),
                                    1 => {
                                        tokio::time::sleep(wait).await;
                                        Some((Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"b"))), 2))
                                    }
                                    _ => None,
                                }
                            });
                            http_body_util::StreamBody::new(stream).boxed()
                        } else if let Some(n) = path.strip_prefix("/bytes/") {
                            let n: u64 = n.parse().unwrap();
                            let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
                            let stream = futures_util::stream::unfold(0u64, move |sent| {
                                let chunk = chunk.clone();
                                async move {
                                    if sent >= n {
                                        return None;
                                    }
                                    let len = (n - sent).min(chunk.len() as u64) as usize;
                                    Some((Ok(hyper::body::Frame::data(chunk.slice(..len))), sent + len as u64))
                                }
                            });
                            http_body_util::StreamBody::new(stream).boxed()
                        } else {
                            http_body_util::Full::new(bytes::Bytes::from(text)).boxed()
                        };
                    let resp = hyper::Response::builder().status(status).header("x-upstream", tag).body(body).unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A listener (list item) with an http_connection_manager; `routes` is the HCM's `route_config:` or `rds:` block
/// indented for the HCM level.
pub fn http_listener(name: &str, port: u16, routes: &str, extra: &str) -> String {
    format!(
        r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}{extra}
{routes}"#
    )
}

/// A one-line-per-request HTTP/1.1 client over one connection: sends a request and reads one response.
pub async fn http1_request(
    s: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, String) {
    use http_body_util::BodyExt;
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    s.ready().await.unwrap();
    let resp = s.send_request(req.body(http_body_util::Full::new(bytes::Bytes::new())).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// An HTTP/1.1 client connection to `addr`.
pub async fn http1_client(
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    send
}

/// An `access_log` list with one file logger writing to `path`; `format` is the rest of its config (`, log_format:
/// ...`), or empty for Envoy's default format.
pub fn file_log(path: &std::path::Path, format: &str) -> String {
    format!(
        r#"[ {{ name: envoy.access_loggers.file, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: "{}"{format} }} }} ]"#,
        path.display()
    )
}

/// A static cluster named `name` over `endpoints`, speaking HTTP/1.1 upstream with these
/// `common_http_protocol_options` (YAML flow mapping contents).
pub fn http1_cluster_with(name: &str, endpoints: &[SocketAddr], common: &str) -> String {
    format!(
        "{}\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \
         \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        \
         common_http_protocol_options: {{ {common} }}\n        \
         explicit_http_config: {{ http_protocol_options: {{}} }}",
        static_cluster(name, endpoints)
    )
}

/// Why a listener document (YAML) is refused; empty when it converts.
pub fn listener_error(yaml: &str) -> String {
    let msg = proto::parse_dynamic(yaml, Format::Yaml, "envoy.config.listener.v3.Listener")
        .unwrap_or_else(|e| panic!("listener: {e}"));
    let l: envoy_types::pb::envoy::config::listener::v3::Listener = proto::decode(&msg).unwrap();
    ListenerConfig::try_from(l).err().map(|e| e.to_string()).unwrap_or_default()
}

/// A listener rendered as a list item (`  - name: ...`) turned into a document of its own.
pub fn unlisted(item: &str) -> String {
    let item = item.trim_start_matches('\n').replacen("  - ", "    ", 1);
    item.lines().map(|l| l.strip_prefix("    ").unwrap_or(l)).collect::<Vec<_>>().join("\n")
}

/// A bootstrap with these listeners and clusters (YAML list items) as its static resources.
pub fn yaml(listeners: &str, clusters: &str) -> String {
    format!("static_resources:\n  listeners:{listeners}\n  clusters:{clusters}\n")
}
