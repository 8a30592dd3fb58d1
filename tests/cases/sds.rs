//! SDS over ADS, driven by xds-mock: listeners and clusters warm until their secrets arrive, a certificate rotated
//! mid-traffic reaches new handshakes while open connections and the listener stay as they are, a bad secret is
//! NACKed by name and the previous one keeps serving, and private keys never show in /config_dump or CSDS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::io::AsyncReadExt;
use xds_proxy::xds::{CLUSTER, LISTENER, SECRET};

use super::ads::{NODE, WAIT, acked, any, bootstrap, mock};
use super::tls::{Leaf, Pki, client_config, combined_validation, echoes, lit, pem_der, tls_connect, tls_echo_upstream};
use crate::common::*;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SECRET_MSG: &str = "envoy.extensions.transport_sockets.tls.v3.Secret";

fn cert_secret(name: &str, leaf: &Leaf) -> Any {
    let yaml = format!(
        "name: {name}\ntls_certificate: {{ certificate_chain: {{ inline_string: {} }}, private_key: {{ inline_string: {} }} }}",
        lit(&leaf.cert),
        lit(&leaf.key)
    );
    any(&yaml, SECRET_MSG, SECRET)
}

fn ca_secret(name: &str, ca: &str) -> Any {
    any(
        &format!("name: {name}\nvalidation_context: {{ trusted_ca: {{ inline_string: {} }} }}", lit(ca)),
        SECRET_MSG,
        SECRET,
    )
}

/// `sds_config` for ADS.
const ADS: &str = "{ ads: {}, resource_api_version: V3 }";
/// `sds_config` as Istio's sidecars have it: pilot-agent's SDS server through the `sds-grpc` cluster, waiting for ever.
const SDS_GRPC: &str = "{ api_config_source: { api_type: GRPC, grpc_services: [ { envoy_grpc: { cluster_name: sds-grpc } } ], set_node_on_first_message_only: true, transport_api_version: V3 }, initial_fetch_timeout: 0s, resource_api_version: V3 }";

/// A listener terminating mutual TLS with Istio's secret names: the certificate `default` and the CA `ROOTCA`, both
/// over ADS, and the client's SPIFFE ID checked; then tcp_proxy to `cluster`.
/// Has xds-mock serve cluster `up` (the echo server at `up`) and then `listener`, each ACKed.
async fn serve_through(mock: &xds_mock::server::MockHandle, up: std::net::SocketAddr, listener: Any) {
    let v = mock.set(CLUSTER, vec![cluster_any(&static_cluster("up", &[up]))]).unwrap();
    acked(mock, CLUSTER, &v).await;
    let v = mock.set(LISTENER, vec![listener]).unwrap();
    acked(mock, LISTENER, &v).await;
}

fn mtls_listener(name: &str, port: u16, cluster: &str) -> Any {
    mtls_listener_from(name, port, cluster, ADS)
}

/// [`mtls_listener`] with its secrets from `sds_config`.
fn mtls_listener_from(name: &str, port: u16, cluster: &str, sds_config: &str) -> Any {
    let yaml = format!(
        r#"
name: {name}
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
filter_chains:
- name: mtls
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {name}, cluster: {cluster} }}
  transport_socket:
    name: envoy.transport_sockets.tls
    typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, require_client_certificate: true, common_tls_context: {{ tls_certificate_sds_secret_configs: [ {{ name: default, sds_config: {sds_config} }} ]{} }} }}
"#,
        combined_validation(CLIENT_ID, &format!(", sds_config: {sds_config}"))
    );
    any(&yaml, "envoy.config.listener.v3.Listener", LISTENER)
}

/// Istio's `sds-grpc` bootstrap cluster: a STATIC cluster whose endpoint is the agent's socket, spoken to over HTTP/2.
pub(crate) fn sds_grpc_cluster(uds: &std::path::Path) -> String {
    format!(
        r#"  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ pipe: {{ path: "{}" }} }} }} }} ] }} ]
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
"#,
        uds.display()
    )
}

fn cluster_any(list_item: &str) -> Any {
    any(&unlisted(list_item), "envoy.config.cluster.v3.Cluster", CLUSTER)
}

fn with_admin(bootstrap: String) -> String {
    bootstrap + "admin: { address: { socket_address: { address: 127.0.0.1, port_value: 0 } } }\n"
}

/// The certificate the proxy presents to a new mutual-TLS handshake, after checking the connection carries data.
async fn presented(addr: std::net::SocketAddr, pki: &Pki, client: &Leaf) -> Vec<u8> {
    let mut s = tls_connect(addr, client_config(pki, &[], Some(client)), "svc.local").await.unwrap();
    assert!(echoes(&mut s, b"hello").await, "a handshake that succeeds carries data");
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

async fn admin_get(server: &xds_proxy::server::Server, path: &str) -> String {
    let mut c = http1_client(server.admin_address().unwrap()).await;
    let (status, _, body) = http1_request(&mut c, "GET", path, "admin", &[]).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

async fn listener_warms_until_its_secrets_arrive_and_rotation_reaches_only_new_handshakes(api: &str) {
    let pki = Pki::new();
    let cert1 = pki.leaf_with_serial(&["svc.local"], &[], Some(1001));
    let cert2 = pki.leaf_with_serial(&["svc.local"], &[], Some(2002));
    let client = pki.leaf(&[], &[CLIENT_ID]);
    let up = echo_server().await;
    let mock = mock().await;
    let server = start(&with_admin(bootstrap(mock.addr(), api)), Duration::from_millis(300)).await;
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();

    serve_through(&mock, up, mtls_listener("sds", port, "up")).await;
    // Envoy: a listener whose certificate comes from SDS is not active before the secret is fetched.
    assert_eq!(server.listener_manager().warming_names(), ["sds"]);
    let dump = admin_get(&server, "/config_dump?resource=dynamic_warming_secrets").await;
    assert!(dump.contains("\"name\": \"default\"") && dump.contains("\"name\": \"ROOTCA\""), "{dump}");

    let v = mock.set(SECRET, vec![cert_secret("default", &cert1), ca_secret("ROOTCA", &pki.ca_pem())]).unwrap();
    acked(&mock, SECRET, &v).await;
    eventually("listener active", WAIT, async || server.listener_manager().warming_names().is_empty()).await;
    assert_eq!(presented(addr, &pki, &client).await, pem_der(&cert1.cert));
    // /certs shows the certificate in force (serial 1001 = 0x03e9) and the CA it checks clients with.
    let certs = admin_get(&server, "/certs").await;
    assert!(certs.contains("\"serial_number\": \"03e9\"") && certs.contains("\"ca_cert\""), "{certs}");
    assert!(certs.contains("\"path\": \"<inline>\"") && certs.contains("\"dns\": \"svc.local\""), "{certs}");

    // Traffic through the rotation: new handshakes in a loop, and one connection opened before it.
    let mut old = tls_connect(addr, client_config(&pki, &[], Some(&client)), "svc.local").await.unwrap();
    assert!(echoes(&mut old, b"before").await);
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        let config = client_config(&pki, &[], Some(&client));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = match tls_connect(addr, config.clone(), "svc.local").await {
                    Ok(mut s) => echoes(&mut s, b"during").await,
                    Err(_) => false,
                };
                let counter = if ok { &done } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    eventually("traffic flowing", WAIT, async || done.load(Ordering::Relaxed) >= 5).await;

    let v = mock.set(SECRET, vec![cert_secret("default", &cert2), ca_secret("ROOTCA", &pki.ca_pem())]).unwrap();
    acked(&mock, SECRET, &v).await;
    // Applied before the ACK: the very next handshake presents the certificate with the new serial.
    assert_eq!(presented(addr, &pki, &client).await, pem_der(&cert2.cert));
    let certs = admin_get(&server, "/certs").await;
    assert!(certs.contains("\"serial_number\": \"07d2\"") && !certs.contains("03e9"), "{certs}");
    let after = done.load(Ordering::Relaxed);
    eventually("traffic after the rotation", WAIT, async || done.load(Ordering::Relaxed) >= after + 5).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no handshake or request failed across the rotation");
    assert!(echoes(&mut old, b"after").await, "the connection opened before the rotation still works");
    assert_eq!(old.get_ref().1.peer_certificates().unwrap()[0].as_ref(), pem_der(&cert1.cert));

    // Nothing but the secret changed: the listener was neither modified nor rebuilt.
    assert_eq!(counter(&server, "listener_manager.listener_added"), 1);
    assert_eq!(counter(&server, "listener_manager.listener_modified"), 0);
    assert_eq!(counter(&server, "sds.default.update_success"), 2);
    assert_eq!(counter(&server, "sds.ROOTCA.update_success"), 1, "an unchanged secret is not installed again");

    // Private keys are redacted wherever the proxy shows secrets (Envoy writes "[redacted]").
    let dump = admin_get(&server, "/config_dump").await;
    assert!(!dump.contains("PRIVATE KEY"), "a private key leaked into /config_dump");
    let active = admin_get(&server, "/config_dump?resource=dynamic_active_secrets").await;
    assert!(active.contains("\"inline_string\": \"[redacted]\""), "{active}");
    assert!(active.contains("\"name\": \"default\"") && active.contains("\"name\": \"ROOTCA\""), "{active}");
    use envoy_types::pb::envoy::service::status::v3::ClientStatusRequest;
    use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
    let mut csds = ClientStatusDiscoveryServiceClient::connect(format!("http://{}", server.admin_address().unwrap()))
        .await
        .unwrap();
    let resp = csds.fetch_client_status(ClientStatusRequest::default()).await.unwrap().into_inner();
    let secrets: Vec<_> =
        resp.config[0].generic_xds_configs.iter().filter(|c| c.type_url == SECRET).map(|c| c.name.clone()).collect();
    assert_eq!(secrets, ["ROOTCA", "default"]);
    let bytes = resp.encode_to_vec();
    assert!(!bytes.windows(11).any(|w| w == b"PRIVATE KEY"), "a private key leaked into CSDS");
}

async fn a_bad_secret_is_nacked_by_name_and_the_previous_one_keeps_serving(api: &str) {
    let pki = Pki::new();
    let good = pki.leaf(&["svc.local"], &[]);
    let client = pki.leaf(&[], &[CLIENT_ID]);
    let up = echo_server().await;
    let mock = mock().await;
    let server = start(&bootstrap(mock.addr(), api), Duration::from_millis(300)).await;
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    serve_through(&mock, up, mtls_listener("sds", port, "up")).await;
    let ca = ca_secret("ROOTCA", &pki.ca_pem());
    let v = mock.set(SECRET, vec![cert_secret("default", &good), ca.clone()]).unwrap();
    acked(&mock, SECRET, &v).await;
    eventually("listener active", WAIT, async || server.listener_manager().warming_names().is_empty()).await;

    let other = pki.leaf(&["svc.local"], &[]);
    for (bad, field) in [
        (Leaf { cert: "not a PEM".into(), key: good.key.clone() }, "tls_certificate.certificate_chain"),
        (Leaf { cert: good.cert.clone(), key: other.key.clone() }, "tls_certificate.private_key"),
    ] {
        let v = mock.set(SECRET, vec![cert_secret("default", &bad), ca.clone()]).unwrap();
        let nack = match mock.wait_for(NODE, SECRET, &v, WAIT).await {
            Err(xds_mock::clients::WaitError::Nack(n)) => n,
            other => panic!("expected a NACK, got {other:?}"),
        };
        assert!(nack.message.starts_with(&format!("default: {field}: ")), "{}", nack.message);
        assert_eq!(presented(addr, &pki, &client).await, pem_der(&good.cert), "the previous secret keeps serving");
    }
    assert_eq!(counter(&server, "sds.default.update_rejected"), 2);
    assert_eq!(counter(&server, "sds.default.update_success"), 1);
}

async fn a_cluster_warms_until_its_secret_arrives(api: &str) {
    let pki = Pki::new();
    let backend = pki.leaf(&[], &["spiffe://cluster.local/ns/default/sa/backend"]);
    let up = tls_echo_upstream(&backend).await;
    let mock = mock().await;
    let server = start(&bootstrap(mock.addr(), api), Duration::from_millis(300)).await;
    let port = free_port();
    let cluster = format!(
        r#"{}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: backend.local, common_tls_context: {{ validation_context_sds_secret_config: {{ name: ROOTCA, sds_config: {{ ads: {{}} }} }} }} }}"#,
        static_cluster("tls-up", &[up])
    );
    let v = mock.set(CLUSTER, vec![cluster_any(&cluster)]).unwrap();
    acked(&mock, CLUSTER, &v).await;
    let listener =
        any(&unlisted(&tcp_listener("plain", port, "tls-up")), "envoy.config.listener.v3.Listener", LISTENER);
    let v = mock.set(LISTENER, vec![listener]).unwrap();
    acked(&mock, LISTENER, &v).await;
    assert!(server.cluster_manager().get("tls-up").is_none(), "the cluster warms for its secret");
    assert_eq!(server.listener_manager().warming_names(), ["plain"], "and the listener for the cluster");

    let v = mock.set(SECRET, vec![ca_secret("ROOTCA", &pki.ca_pem())]).unwrap();
    acked(&mock, SECRET, &v).await;
    eventually("listener active", WAIT, async || server.listener_manager().warming_names().is_empty()).await;
    let mut s = tokio::net::TcpStream::connect(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap();
    let mut greeting = vec![0u8; "backend.local\n".len()];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"backend.local\n", "the upstream handshake verified the backend with the SDS CA");
}

both_protocols!(
    listener_warms_until_its_secrets_arrive_and_rotation_reaches_only_new_handshakes,
    a_bad_secret_is_nacked_by_name_and_the_previous_one_keeps_serving,
    a_cluster_warms_until_its_secret_arrives
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_come_from_an_sds_server_on_a_unix_socket_as_from_istios_pilot_agent() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("sds.sock");
    let mock = xds_mock::server::MockServer::start_with_uds("127.0.0.1:0".parse().unwrap(), &uds, Default::default())
        .await
        .unwrap();
    let sds_cluster = sds_grpc_cluster(&uds);
    let server = start(&with_admin(bootstrap(mock.addr(), "GRPC") + &sds_cluster), Duration::from_millis(300)).await;
    let pki = Pki::new();
    let cert1 = pki.leaf_with_serial(&["svc.local"], &[], Some(1));
    let cert2 = pki.leaf_with_serial(&["svc.local"], &[], Some(2));
    let client = pki.leaf(&[], &[CLIENT_ID]);
    let up = echo_server().await;
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();

    serve_through(&mock, up, mtls_listener_from("inbound", port, "up", SDS_GRPC)).await;
    assert_eq!(server.listener_manager().warming_names(), ["inbound"], "initial_fetch_timeout 0s: waits for ever");

    let v = mock.set(SECRET, vec![cert_secret("default", &cert1), ca_secret("ROOTCA", &pki.ca_pem())]).unwrap();
    // Nothing refers to a secret over ADS: this ACK can only come on the SDS stream over the Unix socket.
    acked(&mock, SECRET, &v).await;
    eventually("listener active", WAIT, async || server.listener_manager().warming_names().is_empty()).await;
    assert_eq!(presented(addr, &pki, &client).await, pem_der(&cert1.cert));

    let v = mock.set(SECRET, vec![cert_secret("default", &cert2), ca_secret("ROOTCA", &pki.ca_pem())]).unwrap();
    acked(&mock, SECRET, &v).await;
    assert_eq!(presented(addr, &pki, &client).await, pem_der(&cert2.cert), "rotation over the agent's stream");

    let bad = Leaf { cert: "garbage".into(), key: cert2.key.clone() };
    let v = mock.set(SECRET, vec![cert_secret("default", &bad), ca_secret("ROOTCA", &pki.ca_pem())]).unwrap();
    match mock.wait_for(NODE, SECRET, &v, WAIT).await {
        Err(xds_mock::clients::WaitError::Nack(n)) => {
            assert!(n.message.starts_with("default: tls_certificate.certificate_chain: "), "{}", n.message)
        }
        other => panic!("expected a NACK, got {other:?}"),
    }
    assert_eq!(presented(addr, &pki, &client).await, pem_der(&cert2.cert));
    let active = admin_get(&server, "/config_dump?resource=dynamic_active_secrets").await;
    assert!(active.contains("\"name\": \"default\"") && active.contains("\"name\": \"ROOTCA\""), "{active}");

    // Once the listener is gone (and drained), nothing asks the agent for secrets: its stream closes.
    let streams = || mock.clients().into_iter().find(|c| c.node_id == NODE).map(|c| c.active_streams);
    assert_eq!(streams(), Some(2), "ADS and SDS");
    let v = mock.set(LISTENER, vec![]).unwrap();
    acked(&mock, LISTENER, &v).await;
    eventually("the SDS stream closed", WAIT, async || streams() == Some(1)).await;
    let dump = admin_get(&server, "/config_dump?resource=dynamic_active_secrets").await;
    assert!(!dump.contains("ROOTCA"), "secrets nobody uses are forgotten: {dump}");
}

#[test]
fn pipe_endpoints_are_only_for_a_static_config_source_cluster() {
    let cluster = |kind: &str, extra: &str| {
        format!(
            "static_resources:\n  clusters:\n  - name: c\n    type: {kind}\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: c\n      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ pipe: {{ path: /tmp/x.sock }} }} }} }}{extra} ] }} ]\n"
        )
    };
    let (status, err, _) = run_proxy("pipe.yaml", &cluster("STATIC", ""), &["--mode", "validate"]);
    assert!(status.success(), "{err}");
    // It serves gRPC config sources only: tcp_proxy (and routes) naming it are refused.
    let with_listener = cluster("STATIC", "")
        .replace("  clusters:\n", &format!("  listeners:{}\n  clusters:\n", tcp_listener("l", 0, "c")));
    let (status, err, _) = run_proxy("pipe.yaml", &with_listener, &["--mode", "validate"]);
    assert!(!status.success());
    assert!(err.contains("filter_chains[0].filters[0].typed_config: cluster 'c' reaches a Unix socket (pipe address), which only gRPC config sources (SDS) use"), "{err}");
    let second = ", { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 1 } } } }";
    for yaml in [cluster("STATIC", second), cluster("STRICT_DNS", "")] {
        let (status, err, _) = run_proxy("pipe.yaml", &yaml, &["--mode", "validate"]);
        assert!(!status.success());
        assert!(
            err.contains("load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe: a pipe address is only supported as the one endpoint of a STATIC cluster"),
            "{err}"
        );
    }
}

/// Envoy's SDS docs: when the secret does not come in time, the listener goes active anyway and its TLS connections
/// are reset until it does; the secret arriving later needs no listener update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_initial_fetch_timeout_the_listener_serves_and_fails_handshakes_until_the_secret_comes() {
    let pki = Pki::new();
    let cert = pki.leaf(&["svc.local"], &[]);
    let client = pki.leaf(&[], &[CLIENT_ID]);
    let up = echo_server().await;
    let mock = mock().await;
    let server = start(&bootstrap(mock.addr(), "GRPC"), Duration::from_millis(300)).await;
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let quick = "{ ads: {}, initial_fetch_timeout: 0.2s }";
    serve_through(&mock, up, mtls_listener_from("sds", port, "up", quick)).await;
    eventually("listener active without its secrets", WAIT, async || {
        server.listener_manager().warming_names().is_empty()
    })
    .await;
    if let Ok(mut s) = tls_connect(addr, client_config(&pki, &[], Some(&client)), "svc.local").await {
        assert!(!echoes(&mut s, b"x").await, "no certificate, no TLS");
    }
    let stat = format!("listener.127.0.0.1_{port}.ssl.connection_error");
    eventually("the failed handshake counted", WAIT, async || counter(&server, &stat) >= 1).await;

    let v = mock.set(SECRET, vec![cert_secret("default", &cert), ca_secret("ROOTCA", &pki.ca_pem())]).unwrap();
    acked(&mock, SECRET, &v).await;
    assert_eq!(presented(addr, &pki, &client).await, pem_der(&cert.cert));
    assert_eq!(counter(&server, "listener_manager.listener_modified"), 0);
}

/// A bootstrap listener whose certificate comes over SDS does not open before it arrives either, and holds the
/// server in INITIALIZING meanwhile (Envoy's init manager waits for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_listener_warms_for_its_sds_secret() {
    let pki = Pki::new();
    let cert = pki.leaf(&["svc.local"], &[]);
    let client = pki.leaf(&[], &[CLIENT_ID]);
    let up = echo_server().await;
    let mock = mock().await;
    let port = free_port();
    // The listener as LDS would send it, as JSON (valid YAML) under static_resources.listeners.
    let doc = {
        let any = mtls_listener("static-sds", port, "up");
        let l = envoy_types::pb::envoy::config::listener::v3::Listener::decode(any.value.as_slice()).unwrap();
        xds_proxy::config::proto::to_json_value(&l, "envoy.config.listener.v3.Listener").unwrap().to_string()
    };
    let yaml = bootstrap(mock.addr(), "GRPC")
        .replace("static_resources:\n", &format!("static_resources:\n  listeners: [ {doc} ]\n"))
        + &static_cluster("up", &[up])
        + "\n";
    let server = start(&yaml, Duration::from_millis(300)).await;
    assert_eq!(server.listener_manager().warming_names(), ["static-sds"]);
    for type_url in [CLUSTER, LISTENER] {
        let v = mock.set(type_url, vec![]).unwrap();
        acked(&mock, type_url, &v).await;
    }
    assert_eq!(gauge(&server, "server.state"), 3, "INITIALIZING while a listener waits for its certificate");

    let v = mock.set(SECRET, vec![cert_secret("default", &cert), ca_secret("ROOTCA", &pki.ca_pem())]).unwrap();
    acked(&mock, SECRET, &v).await;
    eventually("listener active", WAIT, async || server.listener_manager().warming_names().is_empty()).await;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    assert_eq!(presented(addr, &pki, &client).await, pem_der(&cert.cert));
    eventually("server LIVE", WAIT, async || gauge(&server, "server.state") == 0).await;
}

/// Istio's outbound clusters carry their mTLS in a transport socket match (`tlsMode: istio`) with SDS secrets: the
/// cluster warms for them like for its own transport socket's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_socket_match_takes_its_ca_from_sds() {
    let pki = Pki::new();
    let backend = pki.leaf(&[], &["spiffe://cluster.local/ns/default/sa/backend"]);
    let up = tls_echo_upstream(&backend).await;
    let mock = mock().await;
    let server = start(&bootstrap(mock.addr(), "GRPC"), Duration::from_millis(300)).await;
    let port = free_port();
    let cluster = format!(
        r#"
  - name: mesh
    connect_timeout: 1s
    transport_socket_matches:
    - name: tlsMode-istio
      match: {{ tlsMode: istio }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: "mesh", common_tls_context: {{ validation_context_sds_secret_config: {{ name: ROOTCA, sds_config: {{ ads: {{}} }} }} }} }}
    load_assignment:
      cluster_name: mesh
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
          metadata: {{ filter_metadata: {{ envoy.transport_socket_match: {{ tlsMode: istio }} }} }}"#,
        up.port()
    );
    let v = mock.set(CLUSTER, vec![cluster_any(&cluster)]).unwrap();
    acked(&mock, CLUSTER, &v).await;
    let listener = any(&unlisted(&tcp_listener("out", port, "mesh")), "envoy.config.listener.v3.Listener", LISTENER);
    let v = mock.set(LISTENER, vec![listener]).unwrap();
    acked(&mock, LISTENER, &v).await;
    assert!(server.cluster_manager().get("mesh").is_none(), "the cluster warms for its match's secret");

    let v = mock.set(SECRET, vec![ca_secret("ROOTCA", &pki.ca_pem())]).unwrap();
    acked(&mock, SECRET, &v).await;
    eventually("listener active", WAIT, async || server.listener_manager().warming_names().is_empty()).await;
    let mut s = tokio::net::TcpStream::connect(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap();
    let mut greeting = vec![0u8; "mesh\n".len()];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"mesh\n", "the labelled host got TLS verified with the SDS CA");
}
