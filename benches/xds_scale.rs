//! How fast listener updates apply at scale: the time from the control plane's push to the proxy's ACK (applied and
//! published to workers) for 1 to 10,000 listeners, state of the world and delta; a one-listener change inside a
//! 10,000-listener set; and the proxy's RSS per listener. The proxy runs as its own process (release build), so
//! its RSS is its own; xds-mock runs in this process. Prints a table; run with `cargo bench --bench xds_scale`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use xds_mock::server::MockServer;
use xds_proxy::config::proto::{self, Format};
use xds_proxy::xds::LISTENER;

const NODE: &str = "bench-node";

fn listener(i: usize, bound: bool, version: &str) -> Any {
    // Istio-like per-port listeners: 1 chain, tcp_proxy. Unbound ones own no socket (hand-off targets).
    let (ip, port) = (format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255), 8000 + (i % 1000));
    let address = if bound { "127.0.0.1, port_value: 0".to_string() } else { format!("{ip}, port_value: {port}") };
    let yaml = format!(
        r#"name: l{i}
address: {{ socket_address: {{ address: {address} }} }}
bind_to_port: {bound}
enable_reuse_port: false
filter_chains: [ {{ filters: [ {{ name: t, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: "s{version}", cluster: c }} }} ] }} ]"#
    );
    let msg = proto::parse_dynamic(&yaml, Format::Yaml, "envoy.config.listener.v3.Listener").unwrap();
    let l: Listener = proto::decode(&msg).unwrap();
    Any { type_url: LISTENER.to_string(), value: l.encode_to_vec() }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Row {
    protocol: &'static str,
    listeners: usize,
    bound: bool,
    apply: Duration,
    one_change: Option<Duration>,
    rss_per_listener_kib: f64,
}

async fn run(protocol: &'static str, n: usize, bound: bool) -> Row {
    let mock = MockServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("b.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"node: {{ id: {NODE} }}
dynamic_resources:
  ads_config: {{ api_type: {protocol}, grpc_services: [ {{ envoy_grpc: {{ cluster_name: xds }} }} ] }}
  lds_config: {{ ads: {{}} }}
  cds_config: {{ ads: {{}} }}
static_resources:
  clusters:
  - {{ name: c, load_assignment: {{ cluster_name: c, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 9 }} }} }} }} ] }} ] }} }}
  - {{ name: xds, load_assignment: {{ cluster_name: xds, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }} ] }} ] }} }}
"#,
            mock.addr().port()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xds-proxy"))
        .arg("-c")
        .arg(&cfg)
        .args(["--concurrency", "2", "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wait = Duration::from_secs(120);
    // Connected and idle first: an empty set, ACKed.
    let v = mock.set(LISTENER, vec![]).unwrap();
    mock.wait_for(NODE, LISTENER, &v, wait).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(child.id());

    let all: Vec<Any> = (0..n).map(|i| listener(i, bound, "1")).collect();
    let t = Instant::now();
    let v = mock.set(LISTENER, all.clone()).unwrap();
    mock.wait_for(NODE, LISTENER, &v, wait).await.unwrap();
    let apply = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(child.id());

    let one_change = if n >= 1000 {
        let mut changed = all;
        changed[n / 2] = listener(n / 2, bound, "2");
        let t = Instant::now();
        let v = mock.set(LISTENER, changed).unwrap();
        mock.wait_for(NODE, LISTENER, &v, wait).await.unwrap();
        Some(t.elapsed())
    } else {
        None
    };
    let _ = child.kill();
    let _ = child.wait();
    Row {
        protocol,
        listeners: n,
        bound,
        apply,
        one_change,
        rss_per_listener_kib: (rss_after.saturating_sub(rss_before)) as f64 / n as f64,
    }
}

fn main() {
    // `cargo test --benches` runs bench targets once with --bench absent: keep that quick.
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if full { &[1, 100, 1000, 10_000] } else { &[10] };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut rows = Vec::new();
    for protocol in ["GRPC", "DELTA_GRPC"] {
        for &n in sizes {
            rows.push(rt.block_on(run(protocol, n, false)));
        }
        let bound = if full { 1000 } else { 10 };
        rows.push(rt.block_on(run(protocol, bound, true)));
    }
    println!("| protocol | listeners | bound sockets | push → ACK | one-listener change → ACK | RSS per listener |");
    println!("|---|---:|---|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} ms | {} | {:.1} KiB |",
            if r.protocol == "GRPC" { "SotW" } else { "delta" },
            r.listeners,
            if r.bound { "yes (2 workers)" } else { "no (hand-off targets)" },
            r.apply.as_secs_f64() * 1000.0,
            r.one_change.map_or("-".to_string(), |d| format!("{:.1} ms", d.as_secs_f64() * 1000.0)),
            r.rss_per_listener_kib
        );
    }
}
