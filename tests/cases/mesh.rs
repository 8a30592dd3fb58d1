//! Two sidecars as Istio wires them: client → proxy A (outbound; originates mutual TLS to endpoints labelled
//! `tlsMode: istio`) → proxy B (an inbound listener whose TLS chain, chosen by tls_inspector on the `istio-peer-exchange`
//! / `istio` ALPN, terminates it) → app. Each proxy has its own xds-mock, and every certificate arrives by SDS over
//! ADS; both workload certificates are rotated mid-traffic with no failed connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::google::protobuf::Any;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xds_proxy::xds::{CLUSTER, LISTENER, SECRET};

use super::ads::{WAIT, acked, any, bootstrap, mock};
use super::tls::{Leaf, Pki, client_config, combined_validation, lit, pem_der, tls_connect};
use crate::common::*;

const A_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const B_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const SECRET_MSG: &str = "envoy.extensions.transport_sockets.tls.v3.Secret";
const ADS: &str = ", sds_config: { ads: {}, resource_api_version: V3 }";
const ISTIO_ALPN: &str = "[ istio-peer-exchange, istio ]";

pub(crate) fn secrets(workload: &Leaf, pki: &Pki) -> Vec<Any> {
    let cert = format!(
        "name: default\ntls_certificate: {{ certificate_chain: {{ inline_string: {} }}, private_key: {{ inline_string: {} }} }}",
        lit(&workload.cert),
        lit(&workload.key)
    );
    let ca = format!("name: ROOTCA\nvalidation_context: {{ trusted_ca: {{ inline_string: {} }} }}", lit(&pki.ca_pem()));
    vec![any(&cert, SECRET_MSG, SECRET), any(&ca, SECRET_MSG, SECRET)]
}

/// Proxy B's inbound listener: Istio's permissive mode, mutual TLS for peers that speak Istio's ALPN (the client's
/// SPIFFE ID checked), plaintext for the rest; both to the app.
fn inbound_listener(port: u16) -> Any {
    let yaml = format!(
        r#"
name: virtualInbound
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
listener_filters:
- name: envoy.filters.listener.tls_inspector
  typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
filter_chains:
- name: mtls
  filter_chain_match: {{ transport_protocol: tls, application_protocols: {ISTIO_ALPN} }}
  transport_socket:
    name: envoy.transport_sockets.tls
    typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, require_client_certificate: true, common_tls_context: {{ alpn_protocols: {ISTIO_ALPN}, tls_certificate_sds_secret_configs: [ {{ name: default{ADS} }} ]{} }} }}
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: inbound_mtls, cluster: app }}
- name: plaintext
  filter_chain_match: {{ transport_protocol: raw_buffer }}
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: inbound_plain, cluster: app }}
"#,
        combined_validation(A_ID, ADS)
    );
    any(&yaml, "envoy.config.listener.v3.Listener", LISTENER)
}

/// Proxy A's outbound cluster to B, as Istio sends it: mutual TLS for the endpoint labelled `tlsMode: istio`
/// (expecting `san` in B's certificate), plaintext otherwise.
fn outbound_cluster(name: &str, b: SocketAddr, san: &str) -> Any {
    let yaml = format!(
        r#"
name: {name}
type: STATIC
connect_timeout: 1s
transport_socket_matches:
- name: tlsMode-istio
  match: {{ tlsMode: istio }}
  transport_socket:
    name: envoy.transport_sockets.tls
    typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: "outbound_.8080_._.server.default.svc.cluster.local", common_tls_context: {{ alpn_protocols: {ISTIO_ALPN}, tls_certificate_sds_secret_configs: [ {{ name: default{ADS} }} ]{} }} }}
- name: tlsMode-disabled
  match: {{}}
  transport_socket: {{ name: envoy.transport_sockets.raw_buffer, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer }} }}
load_assignment:
  cluster_name: {name}
  endpoints:
  - lb_endpoints:
    - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
      metadata: {{ filter_metadata: {{ envoy.transport_socket_match: {{ tlsMode: istio }} }} }}
"#,
        combined_validation(san, ADS),
        b.port()
    );
    any(&yaml, "envoy.config.cluster.v3.Cluster", CLUSTER)
}

fn outbound_listener(name: &str, port: u16, cluster: &str) -> Any {
    let yaml = format!(
        r#"
name: {name}
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {name}, cluster: {cluster} }}
"#
    );
    any(&yaml, "envoy.config.listener.v3.Listener", LISTENER)
}

/// Sends `msg` and reads the echo back; false on any failure.
async fn round_trip(addr: SocketAddr, msg: &[u8]) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await else { return false };
    if s.write_all(msg).await.is_err() {
        return false;
    }
    let mut got = vec![0u8; msg.len()];
    matches!(tokio::time::timeout(WAIT, s.read_exact(&mut got)).await, Ok(Ok(_))) && got == msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_speak_istio_mtls_through_sds_rotation_and_keep_permissive_plaintext() {
    let pki = Pki::new();
    let (a1, a2) = (pki.leaf_with_serial(&[], &[A_ID], Some(11)), pki.leaf_with_serial(&[], &[A_ID], Some(12)));
    let (b1, b2) =
        (pki.leaf_with_serial(&["server"], &[B_ID], Some(21)), pki.leaf_with_serial(&["server"], &[B_ID], Some(22)));
    let app = echo_server().await;

    // Proxy B: the inbound side.
    let mock_b = mock().await;
    let proxy_b = start(&bootstrap(mock_b.addr(), "GRPC"), Duration::from_millis(300)).await;
    let b_port = free_port();
    let b_addr: SocketAddr = ([127, 0, 0, 1], b_port).into();
    // Secrets are subscribed to once something refers to them; the listener warms until they come.
    let v = mock_b.set(CLUSTER, vec![super::ads::static_cluster_any("app", app)]).unwrap();
    acked(&mock_b, CLUSTER, &v).await;
    let v = mock_b.set(LISTENER, vec![inbound_listener(b_port)]).unwrap();
    acked(&mock_b, LISTENER, &v).await;
    let v = mock_b.set(SECRET, secrets(&b1, &pki)).unwrap();
    acked(&mock_b, SECRET, &v).await;
    eventually("B's listener active", WAIT, async || proxy_b.listener_manager().warming_names().is_empty()).await;

    // Proxy A: the outbound side, plus a cluster that expects another identity from B.
    let mock_a = mock().await;
    let proxy_a = start(&bootstrap(mock_a.addr(), "GRPC"), Duration::from_millis(300)).await;
    let (a_port, wrong_port) = (free_port(), free_port());
    let a_addr: SocketAddr = ([127, 0, 0, 1], a_port).into();
    let clusters = vec![
        outbound_cluster("outbound|8080||server", b_addr, B_ID),
        outbound_cluster("outbound|8080||impostor", b_addr, "spiffe://cluster.local/ns/default/sa/someone-else"),
    ];
    let v = mock_a.set(CLUSTER, clusters).unwrap();
    acked(&mock_a, CLUSTER, &v).await;
    let listeners = vec![
        outbound_listener("outbound", a_port, "outbound|8080||server"),
        outbound_listener("wrong", wrong_port, "outbound|8080||impostor"),
    ];
    let v = mock_a.set(LISTENER, listeners).unwrap();
    acked(&mock_a, LISTENER, &v).await;
    let v = mock_a.set(SECRET, secrets(&a1, &pki)).unwrap();
    acked(&mock_a, SECRET, &v).await;
    eventually("A's listeners active", WAIT, async || proxy_a.listener_manager().warming_names().is_empty()).await;

    // Plaintext in at A, mutual TLS between the proxies, plaintext out of B.
    assert!(round_trip(a_addr, b"through the mesh").await);
    assert_eq!(counter(&proxy_b, "tcp.inbound_mtls.downstream_cx_total"), 1, "B terminated it on its TLS chain");
    // Permissive: a plaintext client straight to B reaches the app through the plaintext chain.
    assert!(round_trip(b_addr, b"plaintext peer").await);
    assert_eq!(counter(&proxy_b, "tcp.inbound_plain.downstream_cx_total"), 1);
    // A TLS client with Istio's ALPN but no certificate is refused by the mTLS chain.
    let no_cert = tls_connect(b_addr, client_config(&pki, &["istio"], None), "server").await;
    let refused = match no_cert {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(b"x").await;
            let mut b = [0u8; 1];
            !matches!(s.read(&mut b).await, Ok(1))
        }
    };
    assert!(refused, "mutual TLS requires the client's certificate");
    // A's cluster that expects another SPIFFE ID from B never delivers a byte.
    let wrong: SocketAddr = ([127, 0, 0, 1], wrong_port).into();
    assert!(!round_trip(wrong, b"to an impostor").await, "SAN mismatch refused");

    // Rotation of both workload certificates while connections keep being made through the mesh.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let counter = if round_trip(a_addr, b"during rotation").await { &done } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    eventually("traffic flowing", WAIT, async || done.load(Ordering::Relaxed) >= 5).await;
    let v = mock_b.set(SECRET, secrets(&b2, &pki)).unwrap();
    acked(&mock_b, SECRET, &v).await;
    let v = mock_a.set(SECRET, secrets(&a2, &pki)).unwrap();
    acked(&mock_a, SECRET, &v).await;
    let after = done.load(Ordering::Relaxed);
    eventually("traffic after the rotation", WAIT, async || done.load(Ordering::Relaxed) >= after + 5).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no connection failed across the rotation");

    // New handshakes see the new certificates: B presents its new one to a peer with A's new identity.
    let mut s = tls_connect(b_addr, client_config(&pki, &["istio"], Some(&a2)), "server").await.unwrap();
    assert_eq!(s.get_ref().1.peer_certificates().unwrap()[0].as_ref(), pem_der(&b2.cert));
    s.write_all(b"new").await.unwrap();
    let mut got = [0u8; 3];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"new");
    // Only secrets changed: neither proxy rebuilt a listener.
    assert_eq!(counter(&proxy_b, "listener_manager.listener_modified"), 0);
    assert_eq!(counter(&proxy_a, "listener_manager.listener_modified"), 0);
    assert_eq!(counter(&proxy_a, "sds.default.update_success"), 2);
}
