//! The proxy as a process: bootstrap errors at start-up, `--mode validate`, refused flags, SIGTERM draining.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::common::*;

const GOOD: &str = r#"
static_resources:
  listeners:
  - name: l
    address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: l
          cluster: c
  clusters:
  - name: c
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 9 } } }
"#;

/// Exit code 1 and exactly one stderr line that names the file and contains `expect`.
fn assert_rejected(content: &str, expect: &str) {
    let (status, stderr, path) = run_proxy("bootstrap.yaml", content, &["--mode", "validate"]);
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    assert!(lines[0].contains(&path.display().to_string()), "file not named: {}", lines[0]);
    assert!(lines[0].contains(expect), "expected '{expect}' in: {}", lines[0]);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_good_bootstrap_validates() {
    let (status, stderr, _) = run_proxy("bootstrap.yaml", GOOD, &["--mode", "validate"]);
    assert!(status.success(), "{stderr}");
}

#[test]
fn unknown_field_names_its_path() {
    assert_rejected(
        &GOOD.replace("port_value: 0", "port_valu: 0"),
        "static_resources.listeners[0].address.socket_address.port_valu",
    );
}

#[test]
fn wrong_type_names_its_path() {
    assert_rejected(
        &GOOD.replace("port_value: 0", "port_value: zero"),
        "static_resources.listeners[0].address.socket_address.port_value",
    );
}

#[test]
fn missing_cluster_names_the_reference() {
    assert_rejected(
        &GOOD.replace("cluster: c", "cluster: nope"),
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.cluster: unknown cluster 'nope'",
    );
}

#[test]
fn invalid_address_names_its_path() {
    assert_rejected(
        &GOOD.replace("address: 127.0.0.1, port_value: 0", "address: 127.0.0.300, port_value: 0"),
        "static_resources.listeners[0].address.socket_address.address: malformed IP address: 127.0.0.300",
    );
}

#[test]
fn unsupported_field_is_refused_not_ignored() {
    assert_rejected(
        &GOOD.replace("    filter_chains:", "    listener_filters: [ { name: x } ]\n    filter_chains:"),
        "static_resources.listeners[0].listener_filters",
    );
}

#[test]
fn unreadable_file_is_one_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xds-proxy"))
        .args(["--config-path", "/nonexistent/bootstrap.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/bootstrap.yaml"), "{stderr}");
}

#[test]
fn base_id_is_refused_with_a_reason() {
    let (status, stderr, _) = run_proxy("bootstrap.yaml", GOOD, &["--base-id", "1"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("--base-id: hot restart is not supported"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_connections_then_exits_0() {
    let up = echo_server().await;
    let port = free_port();
    let bootstrap = GOOD
        .replace("port_value: 0", &format!("port_value: {port}"))
        .replace("port_value: 9", &format!("port_value: {}", up.port()));
    // The drain time leaves room for a loaded machine: the checks below must run before its deadline.
    let mut proxy = Proxy::spawn(&bootstrap, &["--drain-time-s", "5", "--concurrency", "2"]);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_accepting(addr, Duration::from_secs(20)).await;
    let mut open = TcpStream::connect(addr).await.unwrap();
    assert!(echo_ok(&mut open, b"before").await);

    let t = Instant::now();
    proxy.signal(libc::SIGTERM);
    eventually("listener closed after SIGTERM", Duration::from_secs(3), async || {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    if !echo_ok(&mut open, b"still draining").await {
        proxy.signal(libc::SIGKILL);
        let (_, err) = proxy.wait_exit(Duration::from_secs(5));
        panic!("an open connection is served during the drain: {err}");
    }
    let rest = tokio::time::timeout(Duration::from_secs(10), read_to_end(&mut open)).await.unwrap();
    assert!(rest.is_empty());
    let (status, stderr) = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(10))).await.unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(4500) && took < Duration::from_secs(12), "exit after {took:?}");
}

#[test]
fn explain_names_the_hand_off_and_the_chain() {
    let bootstrap = r#"
static_resources:
  listeners:
  - name: virtualOutbound
    address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }
    use_original_dst: true
    filter_chains:
    - { name: catchall, filters: [ { name: d, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config } } ] }
  - name: 0.0.0.0_8080
    address: { socket_address: { address: 0.0.0.0, port_value: 8080 } }
    bind_to_port: false
    filter_chains:
    - { name: http, filter_chain_match: { application_protocols: [http/1.1, h2c] }, filters: [ { name: d, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config } } ] }
"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.yaml");
    std::fs::write(&path, bootstrap).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xds-proxy"))
        .args(["explain", "-c"])
        .arg(&path)
        .args(["--listener", "virtualOutbound", "--destination", "10.0.0.9:8080", "--alpn", "h2c"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hand-off: use_original_dst → listener '0.0.0.0_8080'"), "{text}");
    assert!(text.contains("application_protocols: exact h2c"), "{text}");
    assert!(text.contains("result: filter_chains[0] 'http' (direct_response)"), "{text}");
}

#[test]
fn every_shipped_example_bootstrap_validates() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("bootstrap") {
            continue;
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_xds-proxy"))
            .args(["--mode", "validate", "--config-path"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        checked += 1;
    }
    assert!(checked >= 2, "examples found: {checked}");
}
