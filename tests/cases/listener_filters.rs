//! Listener filters and filter chain matching over loopback: timeouts, PROXY protocol, SNI and the hand-off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

const TLS_INSPECTOR: &str = r#"{ name: envoy.filters.listener.tls_inspector, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector } }"#;
const PROXY_PROTOCOL: &str = r#"{ name: envoy.filters.listener.proxy_protocol, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol } }"#;

fn direct(body: &str) -> String {
    format!(
        r#"[ {{ name: envoy.filters.network.direct_response, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config, response: {{ inline_string: "{body}" }} }} }} ]"#
    )
}

fn listener_yaml(name: &str, port: u16, extra: &str, chains: &[(&str, &str)], default: Option<&str>) -> String {
    let mut y = format!(
        "  - name: {name}\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}\n{extra}    filter_chains:\n"
    );
    for (m, body) in chains {
        y.push_str(&format!("    - {{ name: {body}, filter_chain_match: {m}, filters: {} }}\n", direct(body)));
    }
    if let Some(body) = default {
        y.push_str(&format!("    default_filter_chain: {{ name: {body}, filters: {} }}\n", direct(body)));
    }
    y
}

async fn start_with(listeners: &str) -> xds_proxy::server::Server {
    start(&format!("static_resources:\n  listeners:\n{listeners}"), Duration::from_secs(1)).await
}

async fn send_and_read(addr: std::net::SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(payload).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), read_to_end(&mut s)).await.unwrap()
}

#[tokio::test]
async fn listener_filters_timeout_closes_a_silent_client_and_counts_it() {
    let port = free_port();
    let extra = format!("    listener_filters: [ {TLS_INSPECTOR} ]\n    listener_filters_timeout: 0.2s\n");
    let server = start_with(&listener_yaml("l", port, &extra, &[], Some("default"))).await;
    let t = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), read_to_end(&mut silent)).await.unwrap();
    assert!(got.is_empty(), "closed without serving");
    assert!(t.elapsed() >= Duration::from_millis(150), "closed after {:?}", t.elapsed());
    assert_eq!(counter(&server, &format!("listener.127.0.0.1_{port}.downstream_pre_cx_timeout")), 1);
    assert_eq!(counter(&server, &format!("listener.127.0.0.1_{port}.downstream_cx_total")), 0);
}

#[tokio::test]
async fn continue_on_listener_filters_timeout_goes_on_to_the_chains() {
    let port = free_port();
    let extra = format!(
        "    listener_filters: [ {TLS_INSPECTOR} ]\n    listener_filters_timeout: 0.2s\n    continue_on_listener_filters_timeout: true\n"
    );
    let chains = [("{ transport_protocol: tls }", "tls"), ("{ transport_protocol: raw_buffer }", "raw")];
    let server = start_with(&listener_yaml("l", port, &extra, &chains, None)).await;
    // Server-speaks-first clients send nothing: after the timeout they reach the raw_buffer chain.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), read_to_end(&mut silent)).await.unwrap();
    assert_eq!(got, b"raw");
    assert_eq!(counter(&server, &format!("listener.127.0.0.1_{port}.downstream_pre_cx_timeout")), 1);
}

#[tokio::test]
async fn silent_clients_do_not_hold_up_the_workers() {
    let port = free_port();
    let extra = format!("    listener_filters: [ {TLS_INSPECTOR} ]\n    listener_filters_timeout: 0s\n");
    let chains = [("{ transport_protocol: raw_buffer }", "served")];
    let _server = start_with(&listener_yaml("l", port, &extra, &chains, None)).await;
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    assert_eq!(send_and_read(([127, 0, 0, 1], port).into(), b"hello\r\n").await, b"served");
}

/// Istio turns listener_filters_timeout off. A client that never sends still does not outlive its listener, even
/// across an in-place update: once the removed listener's drain is over, it is closed, as Envoy closes a removed
/// listener's pending sockets.
#[tokio::test]
async fn a_silent_client_is_closed_when_its_removed_listener_has_drained() {
    let port = free_port();
    let extra = format!("    listener_filters: [ {TLS_INSPECTOR} ]\n    listener_filters_timeout: 0s\n");
    let server = start("static_resources: {}\n", Duration::from_secs(1)).await;
    let config = listener(&unlisted(&listener_yaml("l", port, &extra, &[], Some("default"))));
    server.listener_manager().add_or_update(config, false).unwrap();
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    eventually("the client accepted", Duration::from_secs(5), async || {
        gauge(&server, &format!("listener.127.0.0.1_{port}.downstream_pre_cx_active")) == 1
    })
    .await;
    // An update in place keeps the listener, and with it the client still in its filters.
    let updated = listener(&unlisted(&listener_yaml("l", port, &extra, &[], Some("updated"))));
    server.listener_manager().add_or_update(updated, false).unwrap();
    server.listener_manager().remove("l").unwrap();
    let t = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(5), read_to_end(&mut silent)).await.unwrap();
    assert!(got.is_empty(), "closed without serving");
    assert!(t.elapsed() >= Duration::from_millis(800), "closed at the drain deadline, not before: {:?}", t.elapsed());
}

#[tokio::test]
async fn sni_selects_exact_then_the_longest_wildcard_then_no_server_names() {
    let port = free_port();
    let extra = format!("    listener_filters: [ {TLS_INSPECTOR} ]\n");
    let chains = [
        ("{ server_names: [api.example.com] }", "exact"),
        ("{ server_names: ['*.example.com'] }", "wildcard"),
        ("{ server_names: ['*.a.example.com'] }", "longer-wildcard"),
        ("{ transport_protocol: tls }", "no-sni-match"),
    ];
    let server = start_with(&listener_yaml("l", port, &extra, &chains, Some("default"))).await;
    let addr = ([127, 0, 0, 1], port).into();
    assert_eq!(send_and_read(addr, &client_hello("API.example.com", &[])).await, b"exact");
    assert_eq!(send_and_read(addr, &client_hello("web.example.com", &[])).await, b"wildcard");
    assert_eq!(send_and_read(addr, &client_hello("x.a.example.com", &[])).await, b"longer-wildcard");
    assert_eq!(send_and_read(addr, &client_hello("other.org", &[])).await, b"no-sni-match");
    assert_eq!(send_and_read(addr, b"plain\r\n").await, b"default");
    assert_eq!(counter(&server, "tls_inspector.tls_found"), 4);
    assert_eq!(counter(&server, "tls_inspector.sni_found"), 4);
    assert_eq!(counter(&server, "tls_inspector.tls_not_found"), 1);
}

#[tokio::test]
async fn proxy_protocol_header_is_consumed_and_its_source_is_matched() {
    let up = echo_server().await;
    let port = free_port();
    let listeners = format!(
        r#"  - name: l
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    listener_filters: [ {PROXY_PROTOCOL} ]
    filter_chains:
    - {{ filter_chain_match: {{ source_prefix_ranges: [ {{ address_prefix: 192.0.2.0, prefix_len: 24 }} ] }}, filters: {} }}
    - filters: [ {{ name: t, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: echo, cluster: echo }} }} ]
"#,
        direct("from-192.0.2.x")
    );
    let yaml = format!("static_resources:\n  listeners:\n{listeners}  clusters:{}\n", static_cluster("echo", &[up]));
    let server = start(&yaml, Duration::from_secs(1)).await;
    let addr = ([127, 0, 0, 1], port).into();
    // v1 from 192.0.2.7: the source-matched chain.
    assert_eq!(send_and_read(addr, b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 80\r\n").await, b"from-192.0.2.x");
    // v1 from elsewhere: the echo chain, which must see the payload without the header.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PROXY TCP4 198.51.100.1 10.0.0.1 5555 80\r\npayload").await.unwrap();
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"payload");
    // No header at all: refused, as Envoy does without allow_requests_without_proxy_protocol.
    assert!(send_and_read(addr, b"GET / HTTP/1.1\r\n\r\n").await.is_empty());
    assert_eq!(counter(&server, "downstream_cx_proxy_proto_error"), 1);
}

#[tokio::test]
async fn use_original_dst_hands_off_to_the_listener_of_the_restored_destination() {
    // PROXY protocol restores the destination just as SO_ORIGINAL_DST does, so the hand-off is testable without
    // iptables (the netns test covers the REDIRECT path).
    let (virt, exact) = (free_port(), free_port());
    let listeners = format!(
        r#"  - name: virtual
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {virt} }} }}
    use_original_dst: true
    listener_filters: [ {PROXY_PROTOCOL} ]
    filter_chains: [ {{ filters: {stay} }} ]
  - name: 10.1.2.3_8080
    address: {{ socket_address: {{ address: 10.1.2.3, port_value: 8080 }} }}
    bind_to_port: false
    filter_chains: [ {{ filters: {exact_body} }} ]
  - name: 0.0.0.0_8080
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: 8080 }} }}
    bind_to_port: false
    filter_chains: [ {{ filters: {wildcard} }} ]
  - name: unused
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {exact} }} }}
    filter_chains: [ {{ filters: {stay} }} ]
"#,
        stay = direct("stayed"),
        exact_body = direct("exact-target"),
        wildcard = direct("wildcard-target"),
    );
    let server = start_with(&listeners).await;
    let addr = ([127, 0, 0, 1], virt).into();
    assert_eq!(send_and_read(addr, b"PROXY TCP4 10.9.9.9 10.1.2.3 5555 8080\r\n").await, b"exact-target");
    assert_eq!(send_and_read(addr, b"PROXY TCP4 10.9.9.9 10.7.7.7 5555 8080\r\n").await, b"wildcard-target");
    assert_eq!(send_and_read(addr, b"PROXY TCP4 10.9.9.9 10.7.7.7 5555 9999\r\n").await, b"stayed");
    // Stats follow the connection to its final listener.
    assert_eq!(counter(&server, "listener.10.1.2.3_8080.downstream_cx_total"), 1);
    assert_eq!(counter(&server, "listener.0.0.0.0_8080.downstream_cx_total"), 1);
    assert_eq!(counter(&server, &format!("listener.127.0.0.1_{virt}.downstream_cx_total")), 1);
}
