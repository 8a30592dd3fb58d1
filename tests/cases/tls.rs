//! Downstream TLS termination on filter chains (DownstreamTlsContext) with certificates generated here (rcgen):
//! TLS to tcp_proxy and to the HTTP connection manager (h2 by ALPN), mutual TLS with SPIFFE SAN matching, plaintext
//! and TLS clients on one port reaching their own chains (Istio's permissive mode), and config errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

pub(crate) struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

pub(crate) struct Leaf {
    pub(crate) cert: String,
    pub(crate) key: String,
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    pub(crate) fn leaf(&self, dns: &[&str], uris: &[&str]) -> Leaf {
        self.leaf_with_serial(dns, uris, None)
    }

    /// A leaf with a chosen serial number, to tell two certificates for the same names apart.
    pub(crate) fn leaf_with_serial(&self, dns: &[&str], uris: &[&str], serial: Option<u64>) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.serial_number = serial.map(rcgen::SerialNumber::from);
        for u in uris {
            params.subject_alt_names.push(SanType::URI((*u).try_into().unwrap()));
        }
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }

    pub(crate) fn ca_pem(&self) -> String {
        self.ca.pem()
    }
}

/// A YAML/JSON string literal.
pub(crate) fn lit(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn tls_socket(server: &Leaf, alpn: &[&str], mtls: Option<(&str, &str)>) -> String {
    let validation = match mtls {
        Some((ca, san)) => format!(
            r#", validation_context: {{ trusted_ca: {{ inline_string: {} }}, match_typed_subject_alt_names: [ {{ san_type: URI, matcher: {{ exact: "{san}" }} }} ] }} }}, require_client_certificate: true"#,
            lit(ca)
        ),
        None => " }".to_string(),
    };
    format!(
        r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, common_tls_context: {{ alpn_protocols: {alpn:?}, tls_certificates: [ {{ certificate_chain: {{ inline_string: {} }}, private_key: {{ inline_string: {} }} }} ]{validation} }}"#,
        lit(&server.cert),
        lit(&server.key),
    )
}

pub(crate) fn client_config(pki: &Pki, alpn: &[&str], cert: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match cert {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Arc::new(config)
}

pub(crate) async fn tls_connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

/// Reads one echo of `msg` (or fails if the proxy closed the connection).
pub(crate) async fn echoes(s: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin), msg: &[u8]) -> bool {
    if s.write_all(msg).await.is_err() {
        return false;
    }
    let mut got = vec![0u8; msg.len()];
    matches!(tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await, Ok(Ok(_))) && got == msg
}

fn listener_with_chains(chains: &str) -> String {
    format!(
        r#"
  - name: l
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
    filter_chains:{chains}"#
    )
}

fn tcp_chain(name: &str, matcher: &str, socket: &str, cluster: &str) -> String {
    format!(
        r#"
    - name: {name}
      filter_chain_match: {matcher}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {name}, cluster: {cluster} }}{socket}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_plaintext_clients_on_one_port_reach_their_own_chains() {
    let pki = Pki::new();
    let server = pki.leaf(&["svc.local"], &[]);
    let tls_up = tagged_server(b"T").await;
    let plain_up = tagged_server(b"P").await;
    let chains = format!(
        "{}{}",
        tcp_chain("tls", "{ transport_protocol: tls }", &tls_socket(&server, &[], None), "tls-up"),
        tcp_chain("plain", "{ transport_protocol: raw_buffer }", "", "plain-up"),
    );
    let yaml = format!(
        "static_resources:\n  listeners:{}\n  clusters:{}{}\n",
        listener_with_chains(&chains),
        static_cluster("tls-up", &[tls_up]),
        static_cluster("plain-up", &[plain_up])
    );
    let proxy = start(&yaml, Duration::from_secs(1)).await;
    let addr = listener_addr(&proxy, "l");

    let mut tls = tls_connect(addr, client_config(&pki, &[], None), "svc.local").await.unwrap();
    let mut tag = [0u8; 1];
    tls.read_exact(&mut tag).await.unwrap();
    assert_eq!(&tag, b"T", "the TLS client reached the TLS chain, decrypted");
    assert!(echoes(&mut tls, b"through TLS").await);

    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"hello").await.unwrap();
    plain.read_exact(&mut tag).await.unwrap();
    assert_eq!(&tag, b"P");
    assert_eq!(counter(&proxy, "listener.127.0.0.1_0.ssl.handshake"), 1);

    // A client that does not trust the proxy's CA fails its handshake; the proxy counts it and keeps serving.
    let other = Pki::new();
    assert!(tls_connect(addr, client_config(&other, &[], None), "svc.local").await.is_err());
    eventually("handshake error counted", Duration::from_secs(5), async || {
        counter(&proxy, "listener.127.0.0.1_0.ssl.connection_error") == 1
    })
    .await;
    let mut again = tls_connect(addr, client_config(&pki, &[], None), "svc.local").await.unwrap();
    again.read_exact(&mut tag).await.unwrap();
    assert_eq!(&tag, b"T");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_checks_the_clients_spiffe_id() {
    let pki = Pki::new();
    let server = pki.leaf(&["svc.local"], &["spiffe://cluster.local/ns/default/sa/server"]);
    let good = pki.leaf(&[], &["spiffe://cluster.local/ns/default/sa/client"]);
    let wrong = pki.leaf(&[], &["spiffe://cluster.local/ns/default/sa/intruder"]);
    let up = echo_server().await;
    let socket = tls_socket(
        &server,
        &["istio-peer-exchange", "istio"],
        Some((&pki.ca_pem(), "spiffe://cluster.local/ns/default/sa/client")),
    );
    let yaml = yaml(
        &listener_with_chains(&tcp_chain("mtls", "{ transport_protocol: tls }", &socket, "up")),
        &static_cluster("up", &[up]),
    );
    let proxy = start(&yaml, Duration::from_secs(1)).await;
    let addr = listener_addr(&proxy, "l");

    let mut ok = tls_connect(addr, client_config(&pki, &["istio"], Some(&good)), "svc.local").await.unwrap();
    assert_eq!(ok.get_ref().1.alpn_protocol(), Some(&b"istio"[..]));
    assert!(echoes(&mut ok, b"mutual").await);

    // A certificate from the right CA with the wrong SPIFFE ID: the handshake completes, then the proxy closes.
    if let Ok(mut s) = tls_connect(addr, client_config(&pki, &["istio"], Some(&wrong)), "svc.local").await {
        assert!(!echoes(&mut s, b"x").await, "a peer with the wrong SAN must not be proxied");
    }
    eventually("SAN failure counted", Duration::from_secs(5), async || {
        counter(&proxy, "listener.127.0.0.1_0.ssl.fail_verify_san") == 1
    })
    .await;
    // No client certificate at all: refused, because require_client_certificate is set.
    if let Ok(mut s) = tls_connect(addr, client_config(&pki, &["istio"], None), "svc.local").await {
        assert!(!echoes(&mut s, b"x").await, "a client without a certificate must not be proxied");
    }
    eventually("the missing certificate counted", Duration::from_secs(5), async || {
        counter(&proxy, "listener.127.0.0.1_0.ssl.fail_verify_no_cert") == 1
    })
    .await;
    // A certificate with the right SPIFFE ID from another CA: the chain does not verify.
    let other = Pki::new().leaf(&[], &["spiffe://cluster.local/ns/default/sa/client"]);
    if let Ok(mut s) = tls_connect(addr, client_config(&pki, &["istio"], Some(&other)), "svc.local").await {
        assert!(!echoes(&mut s, b"x").await, "a client certificate from an unknown CA must not be proxied");
    }
    eventually("the unverified certificate counted", Duration::from_secs(5), async || {
        counter(&proxy, "listener.127.0.0.1_0.ssl.fail_verify_error") == 1
            && counter(&proxy, "listener.127.0.0.1_0.ssl.connection_error") >= 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_over_tls_speaks_h2_by_alpn() {
    use http_body_util::BodyExt;
    let pki = Pki::new();
    let server = pki.leaf(&["web.local"], &[]);
    let up = http_upstream("U").await;
    let listener = format!(
        r#"
  - name: h
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: h
          http_filters: [ {{ name: envoy.filters.http.router, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }} }} ]
          route_config: {{ name: r, virtual_hosts: [ {{ name: all, domains: ['*'], routes: [ {{ match: {{ prefix: / }}, route: {{ cluster: u }} }} ] }} ] }}{}"#,
        tls_socket(&server, &["h2", "http/1.1"], None)
    );
    let yaml = format!("static_resources:\n  listeners:{listener}\n  clusters:{}\n", static_cluster("u", &[up]));
    let proxy = start(&yaml, Duration::from_secs(1)).await;
    let tls = tls_connect(listener_addr(&proxy, "h"), client_config(&pki, &["h2"], None), "web.local").await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            hyper::Request::builder()
                .uri("https://web.local/secure")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(body.starts_with("U\nGET /secure\nhost=web.local\n"), "{body}");
    assert!(body.contains("x-forwarded-proto=https\n"), "a TLS chain forwards https: {body}");
    assert_eq!(counter(&proxy, "http.h.downstream_cx_http2_total"), 1);
}

#[test]
fn tls_config_errors_name_the_field() {
    let pki = Pki::new();
    let server = pki.leaf(&["svc.local"], &[]);
    let case = |socket: String| {
        let yaml = yaml(
            &listener_with_chains(&tcp_chain("c", "{ transport_protocol: tls }", &socket, "up")),
            &static_cluster("up", &[([127, 0, 0, 1], 1).into()]),
        );
        let (status, err, _) = run_proxy("tls.yaml", &yaml, &["--mode", "validate"]);
        assert!(!status.success());
        err
    };
    let bad_key = tls_socket(&Leaf { cert: server.cert.clone(), key: "not a key".into() }, &[], None);
    let err = case(bad_key);
    assert!(err.contains("tls_certificates[0].private_key"), "{err}");
    let both = tls_socket(&server, &[], None).replace(
        "tls_certificates: [",
        r#"tls_certificate_sds_secret_configs: [ { name: default, sds_config: { ads: {} } } ], tls_certificates: ["#,
    );
    let err = case(both);
    assert!(
        err.contains("common_tls_context.tls_certificate_sds_secret_configs")
            && err.contains("tls_certificates and tls_certificate_sds_secret_configs cannot both be set"),
        "{err}"
    );
    let file_sds = sds_socket(r#"{ name: default, sds_config: { path_config_source: { path: /x.yaml } } }"#, "");
    let err = case(file_sds);
    assert!(err.contains("tls_certificate_sds_secret_configs[0].sds_config: file-based SDS is not supported"), "{err}");
    // A reference without sds_config names a static secret, which must exist (Envoy's wording).
    let err = case(sds_socket("{ name: nope }", ""));
    assert!(err.contains("Unknown static secret: nope"), "{err}");
    let old = tls_socket(&server, &[], None)
        .replace("alpn_protocols: []", "alpn_protocols: [], tls_params: { tls_minimum_protocol_version: TLSv1_0 }");
    let err = case(old);
    assert!(err.contains("tls_params.tls_minimum_protocol_version") && err.contains("TLSv1_0"), "{err}");
}

/// A TLS acceptor for a test upstream presenting `leaf`.
fn tls_acceptor(leaf: &Leaf) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()],
            rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
        )
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TLS server that greets each connection with the SNI it was asked for, then echoes.
pub(crate) async fn tls_echo_upstream(server: &Leaf) -> std::net::SocketAddr {
    let acceptor = tls_acceptor(server);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else { return };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
                if tls.write_all(format!("{sni}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn tls_cluster(name: &str, up: std::net::SocketAddr, ca: &str, sni: &str, san: &str) -> String {
    format!(
        r#"{}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: "{sni}", common_tls_context: {{ validation_context: {{ trusted_ca: {{ inline_string: {} }}, match_typed_subject_alt_names: [ {{ san_type: URI, matcher: {{ exact: "{san}" }} }} ] }} }} }}"#,
        static_cluster(name, &[up]),
        lit(ca)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_originate_tls_with_sni_and_check_the_upstreams_spiffe_id() {
    let pki = Pki::new();
    let backend = pki.leaf(&[], &["spiffe://cluster.local/ns/default/sa/backend"]);
    let up = tls_echo_upstream(&backend).await;
    let ca = pki.ca_pem();
    // Istio's SNI names the service port; the certificate carries the SPIFFE ID, not that name.
    let sni = "outbound_.8080_._.backend.default.svc.cluster.local";
    let clusters = format!(
        "{}{}",
        tls_cluster("good", up, &ca, sni, "spiffe://cluster.local/ns/default/sa/backend"),
        tls_cluster("wrong-san", up, &ca, sni, "spiffe://cluster.local/ns/default/sa/someone-else")
    );
    let yaml = format!(
        "static_resources:\n  listeners:{}{}\n  clusters:{clusters}\n",
        tcp_listener("good", 0, "good"),
        tcp_listener("bad", 0, "wrong-san")
    );
    let proxy = start(&yaml, Duration::from_secs(1)).await;

    let mut s = TcpStream::connect(listener_addr(&proxy, "good")).await.unwrap();
    let mut greeting = vec![0u8; sni.len() + 1];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting, format!("{sni}\n").as_bytes(), "the upstream saw the configured SNI");
    assert!(echoes(&mut s, b"plain in, TLS out").await);

    let mut s = TcpStream::connect(listener_addr(&proxy, "bad")).await.unwrap();
    assert_eq!(read_to_end(&mut s).await, b"", "an upstream with the wrong SAN is not connected to");
    assert_eq!(counter(&proxy, "tcp.bad.upstream_cx_connect_attempts_exceeded"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_go_upstream_over_tls() {
    let pki = Pki::new();
    let backend = pki.leaf(&["backend.local"], &["spiffe://cluster.local/ns/default/sa/backend"]);
    // An HTTPS upstream: TLS, then the usual test HTTP service.
    let plain = http_upstream("TLS-UP").await;
    let acceptor = tls_acceptor(&backend);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Terminate TLS and hand the bytes to the plain HTTP service.
                let Ok(tls) = acceptor.accept(s).await else { return };
                let Ok(plain) = TcpStream::connect(plain).await else { return };
                let (mut a, mut b) = (tls, plain);
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            });
        }
    });
    let routes = r#"          route_config: { name: r, virtual_hosts: [ { name: all, domains: ['*'], routes: [ { match: { prefix: / }, route: { cluster: secure } } ] } ] }"#;
    let yaml = yaml(
        &http_listener("h", 0, routes, ""),
        &tls_cluster("secure", up, &pki.ca_pem(), "backend.local", "spiffe://cluster.local/ns/default/sa/backend"),
    );
    let proxy = start(&yaml, Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&proxy, "h")).await;
    for _ in 0..2 {
        let (status, _, body) = http1_request(&mut c, "GET", "/over-tls", "svc", &[]).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("TLS-UP\nGET /over-tls\n"), "{body}");
    }
    assert_eq!(counter(&proxy, "cluster.secure.upstream_cx_total"), 1, "the TLS connection is pooled and reused");
}

/// A plaintext server that greets each connection with "plain".
async fn plain_greeter() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"plain\n").await;
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_socket_matches_choose_tls_by_endpoint_labels_as_istio_does() {
    let pki = Pki::new();
    let backend = pki.leaf(&[], &["spiffe://cluster.local/ns/default/sa/backend"]);
    let (mtls_host, plain_host) = (tls_echo_upstream(&backend).await, plain_greeter().await);
    // Istio's shape: the mTLS-capable endpoint is labelled tlsMode: istio; a catch-all match keeps the rest
    // plaintext. The cluster has no transport_socket of its own.
    let cluster = format!(
        r#"
  - name: mixed
    connect_timeout: 1s
    transport_socket_matches:
    - name: tlsMode-istio
      match: {{ tlsMode: istio }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: "mesh", common_tls_context: {{ validation_context: {{ trusted_ca: {{ inline_string: {} }} }} }} }}
    - name: tlsMode-disabled
      match: {{}}
      transport_socket: {{ name: envoy.transport_sockets.raw_buffer, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer }} }}
    load_assignment:
      cluster_name: mixed
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
          metadata: {{ filter_metadata: {{ envoy.transport_socket_match: {{ tlsMode: istio }} }} }}
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}"#,
        lit(&pki.ca_pem()),
        mtls_host.port(),
        plain_host.port()
    );
    let yaml = format!("static_resources:\n  listeners:{}\n  clusters:{cluster}\n", tcp_listener("l", 0, "mixed"));
    let proxy = start(&yaml, Duration::from_secs(1)).await;
    let mut greetings = Vec::new();
    for _ in 0..2 {
        // Round robin: one connection per host.
        let mut s = TcpStream::connect(listener_addr(&proxy, "l")).await.unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).await.unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        greetings.push(String::from_utf8(line).unwrap());
    }
    greetings.sort();
    assert_eq!(greetings, ["mesh", "plain"], "the labelled host got TLS with the match's SNI, the other plaintext");
}

/// A DownstreamTlsContext whose certificate is the secret `cert_ref` (an SdsSecretConfig) and whose validation is
/// `validation` (a `, <field>: ...` fragment of common_tls_context, or empty).
pub(crate) fn sds_socket(cert_ref: &str, validation: &str) -> String {
    format!(
        r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, common_tls_context: {{ tls_certificate_sds_secret_configs: [ {cert_ref} ]{validation} }} }}"#
    )
}

/// Envoy's combined validation context: the SANs here, the CA from the secret `ROOTCA` (from `source`, e.g.
/// `, sds_config: { ads: {} }`, or empty for a static secret).
pub(crate) fn combined_validation(san: &str, source: &str) -> String {
    format!(
        r#", combined_validation_context: {{ default_validation_context: {{ match_typed_subject_alt_names: [ {{ san_type: URI, matcher: {{ exact: "{san}" }} }} ] }}, validation_context_sds_secret_config: {{ name: ROOTCA{source} }} }}"#
    )
}

/// `static_resources.secrets` entries (or SDS resources): a certificate and a CA.
fn cert_secret_yaml(name: &str, leaf: &Leaf) -> String {
    format!(
        "\n  - name: {name}\n    tls_certificate: {{ certificate_chain: {{ inline_string: {} }}, private_key: {{ inline_string: {} }} }}",
        lit(&leaf.cert),
        lit(&leaf.key)
    )
}

fn ca_secret_yaml(name: &str, ca: &str) -> String {
    format!("\n  - name: {name}\n    validation_context: {{ trusted_ca: {{ inline_string: {} }} }}", lit(ca))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_secrets_terminate_and_originate_mutual_tls() {
    let pki = Pki::new();
    let server = pki.leaf(&["svc.local"], &["spiffe://cluster.local/ns/default/sa/server"]);
    let client = pki.leaf(&[], &["spiffe://cluster.local/ns/default/sa/client"]);
    let backend = pki.leaf(&[], &["spiffe://cluster.local/ns/default/sa/backend"]);
    let up = tls_echo_upstream(&backend).await;
    let socket =
        sds_socket("{ name: default }", &combined_validation("spiffe://cluster.local/ns/default/sa/client", ""))
            .replace("common_tls_context:", "require_client_certificate: true, common_tls_context:");
    let cluster = format!(
        r#"{}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: backend.local, common_tls_context: {{ tls_certificate_sds_secret_configs: [ {{ name: default }} ]{} }} }}"#,
        static_cluster("up", &[up]),
        combined_validation("spiffe://cluster.local/ns/default/sa/backend", "")
    );
    let yaml = format!(
        "admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }} }}\nstatic_resources:\n  listeners:{}\n  clusters:{cluster}\n  secrets:{}{}\n",
        listener_with_chains(&tcp_chain("mtls", "{ transport_protocol: tls }", &socket, "up")),
        cert_secret_yaml("default", &server),
        ca_secret_yaml("ROOTCA", &pki.ca_pem())
    );
    let proxy = start(&yaml, Duration::from_secs(1)).await;
    let addr = listener_addr(&proxy, "l");

    let mut s = tls_connect(addr, client_config(&pki, &[], Some(&client)), "svc.local").await.unwrap();
    let presented = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(presented.as_ref(), pem_der(&server.cert), "the proxy presents the static secret's certificate");
    let mut greeting = vec![0u8; "backend.local\n".len()];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"backend.local\n", "the upstream handshake used the secrets' CA and SAN");
    assert!(echoes(&mut s, b"secrets both ways").await);

    // The SAN of the combined context still applies: a client of the right CA with another identity is refused.
    let intruder = pki.leaf(&[], &["spiffe://cluster.local/ns/default/sa/intruder"]);
    if let Ok(mut s) = tls_connect(addr, client_config(&pki, &[], Some(&intruder)), "svc.local").await {
        assert!(!echoes(&mut s, b"x").await, "a peer with the wrong SAN must not be proxied");
    }
    eventually("SAN failure counted", Duration::from_secs(5), async || {
        counter(&proxy, "listener.127.0.0.1_0.ssl.fail_verify_san") == 1
    })
    .await;

    // /config_dump lists the static secrets with the private key redacted, as Envoy does.
    let mut c = http1_client(proxy.admin_address().unwrap()).await;
    let (status, _, dump) = http1_request(&mut c, "GET", "/config_dump?resource=static_secrets", "admin", &[]).await;
    assert_eq!(status, 200, "{dump}");
    assert!(dump.contains("\"name\": \"default\"") && dump.contains("\"name\": \"ROOTCA\""), "{dump}");
    assert!(dump.contains("\"inline_string\": \"[redacted]\"") && !dump.contains("PRIVATE KEY"), "{dump}");
}

/// The DER of the first certificate of a PEM text.
pub(crate) fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

/// Istio's TLS origination without a DestinationRule `sni` (auto_sni and auto_san_validation since 1.21): each new
/// upstream connection's SNI is the request's host, its certificate must carry that name, and connections are
/// pooled per name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_sni_names_each_upstream_connection_after_the_request_host() {
    let pki = Pki::new();
    let backend = pki.leaf(&["a.example", "*.wild.example"], &[]);
    let plain = http_upstream("TLS-UP").await;
    let acceptor = tls_acceptor(&backend);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let names = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (acceptor, names) = (acceptor.clone(), names.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else { return };
                names.lock().unwrap().push(tls.get_ref().1.server_name().unwrap_or("-").to_string());
                let Ok(plain) = TcpStream::connect(plain).await else { return };
                let (mut a, mut b) = (tls, plain);
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            });
        }
    });
    let cluster = format!(
        r#"{}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        upstream_http_protocol_options: {{ auto_sni: true, auto_san_validation: true }}
        explicit_http_config: {{ http_protocol_options: {{}} }}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, common_tls_context: {{ validation_context: {{ trusted_ca: {{ inline_string: {} }} }} }} }}"#,
        static_cluster("egress", &[up]),
        lit(&pki.ca_pem())
    );
    let routes = r#"          route_config: { name: r, virtual_hosts: [ { name: all, domains: ['*'], routes: [ { match: { prefix: / }, route: { cluster: egress } } ] } ] }"#;
    let yaml = format!("static_resources:\n  listeners:{}\n  clusters:{cluster}\n", http_listener("h", 0, routes, ""));
    let proxy = start(&yaml, Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&proxy, "h")).await;
    for host in ["a.example", "x.wild.example:8443", "a.example"] {
        let (status, _, body) = http1_request(&mut c, "GET", "/", host, &[]).await;
        assert_eq!(status, 200, "{host}: {body}");
        assert!(body.starts_with("TLS-UP\n"), "{body}");
    }
    assert_eq!(*seen.lock().unwrap(), ["a.example", "x.wild.example"], "one connection per name, the port left out");
    assert_eq!(counter(&proxy, "cluster.egress.upstream_cx_total"), 2);
    // A name the certificate does not carry: the handshake is refused, nothing is sent.
    let (status, _, body) = http1_request(&mut c, "GET", "/", "other.example", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(seen.lock().unwrap().len(), 2, "the upstream saw no completed handshake for other.example");
}
