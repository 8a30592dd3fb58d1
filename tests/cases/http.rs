//! http_connection_manager end to end: real hyper clients and upstreams through the proxy's HCM and router.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::common::*;

/// Two virtual hosts, routed by Host header, with a path-prefix route to a second cluster.
fn inline_routes() -> &'static str {
    r#"          route_config:
            name: local
            virtual_hosts:
            - name: a
              domains: ["a.example.com", "a.example.com:*"]
              routes:
              - match: { prefix: "/b/" }
                route: { cluster: b }
              - match: { prefix: "/" }
                route: { cluster: a }
            - name: fallback
              domains: ["*"]
              routes:
              - match: { prefix: "/nothing-here" }
                direct_response: { status: 418, body: { inline_string: "teapot" } }
              - match: { prefix: "/" }
                route: { cluster: b }"#
}

#[tokio::test]
async fn routes_by_host_and_path_with_envoys_headers() {
    let a = http_upstream("A").await;
    let b = http_upstream("B").await;
    let clusters = format!("{}{}", static_cluster("a", &[a]), static_cluster("b", &[b]));
    let server = start(&yaml(&http_listener("h", 0, inline_routes(), ""), &clusters), Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "h");
    let mut c = http1_client(addr).await;

    let (status, headers, body) = http1_request(&mut c, "GET", "/x", "a.example.com", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("A\nGET /x\nhost=a.example.com\n"), "{body}");
    assert_eq!(headers["server"], "envoy");
    assert!(headers.contains_key("x-envoy-upstream-service-time"));
    assert!(body.contains("x-forwarded-proto=http"), "{body}");
    let rid = body.lines().find_map(|l| l.strip_prefix("x-request-id=")).unwrap();
    assert_eq!(rid.len(), 36, "a generated UUID: {rid}");

    // Same keep-alive connection: other vhost by Host, other route by path; an incoming x-request-id is kept.
    let (_, _, body) = http1_request(&mut c, "GET", "/b/1", "A.EXAMPLE.COM:8080", &[("x-request-id", "abc")]).await;
    assert!(body.starts_with("B\nGET /b/1\n"), "{body}");
    assert!(body.contains("x-request-id=abc\n"), "{body}");
    let (_, _, body) = http1_request(&mut c, "POST", "/y?q=1", "other", &[]).await;
    assert!(body.starts_with("B\nPOST /y?q=1\nhost=other\n"), "{body}");
    let (status, _, body) = http1_request(&mut c, "GET", "/nothing-here", "other", &[]).await;
    assert_eq!((status, body.as_str()), (418, "teapot"));

    assert_eq!(counter(&server, "http.h.downstream_rq_total"), 4);
    assert_eq!(counter(&server, "http.h.downstream_rq_2xx"), 3);
    assert_eq!(counter(&server, "http.h.downstream_rq_4xx"), 1);
    assert_eq!(counter(&server, "http.h.downstream_cx_http1_total"), 1);
    assert_eq!(counter(&server, "cluster.b.upstream_rq_200"), 2);
    assert_eq!(counter(&server, "cluster.a.upstream_cx_total"), 1);
}

/// A proxy whose HCM listener `h` (with `extra` on the connection manager) routes everything to cluster `u` = `up`.
async fn proxy_to(up: std::net::SocketAddr, extra: &str) -> xds_proxy::server::Server {
    proxy_to_with_route(up, "", extra).await
}

/// A response's `grpc-status` and `grpc-message`, as text.
fn grpc_status(h: &hyper::HeaderMap) -> (Option<String>, Option<String>) {
    let text = |name: &str| h.get(name).map(|v| v.to_str().unwrap().to_string());
    (text("grpc-status"), text("grpc-message"))
}

fn routes_to(cluster: &str, route_extra: &str) -> String {
    format!(
        r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {cluster}{route_extra} }}"#
    )
}

async fn h2c_client(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_multiplexes_100_concurrent_streams_on_one_connection() {
    use http_body_util::BodyExt;
    let up = http_upstream("U").await;
    let server = proxy_to(up, "").await;
    let send = h2c_client(listener_addr(&server, "h")).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut send = send.clone();
        tasks.push(tokio::spawn(async move {
            let req = hyper::Request::builder()
                .uri(format!("http://svc.local/sleep/50?i={i}"))
                .body(http_body_util::Empty::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8(body.to_vec()).unwrap();
            assert!(text.contains(&format!("GET /sleep/50?i={i}\nhost=svc.local\n")), "{text}");
        }));
    }
    let started = std::time::Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    // 100 requests of 50 ms each finish together only if they really were concurrent.
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(counter(&server, "http.h.downstream_cx_http2_total"), 1);
    assert_eq!(counter(&server, "http.h.downstream_rq_http2_total"), 100);
    assert_eq!(counter(&server, "http.h.downstream_rq_2xx"), 100);
}

#[tokio::test]
async fn local_replies_use_envoys_codes_and_bodies() {
    let dead = free_port();
    let clusters = format!(
        "{}{}{}",
        static_cluster("dead", &[([127, 0, 0, 1], dead).into()]),
        static_cluster("empty", &[]),
        static_cluster("slow", &[http_upstream("S").await])
    );
    let routes = r#"          route_config:
            name: local
            virtual_hosts:
            - name: known
              domains: ["known"]
              routes:
              - match: { prefix: "/dead" }
                route: { cluster: dead }
              - match: { prefix: "/empty" }
                route: { cluster: empty }
              - match: { prefix: "/sleep" }
                route: { cluster: slow, timeout: 0.2s }
              - match: { prefix: "/header" }
                route: { cluster_header: x-cluster }"#;
    let server = start(&yaml(&http_listener("h", 0, routes, ""), &clusters), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, _, body) = http1_request(&mut c, "GET", "/", "unknown-host", &[]).await;
    assert_eq!((status, body.as_str()), (404, ""), "no virtual host: NR");
    let (status, _, body) = http1_request(&mut c, "GET", "/nothing", "known", &[]).await;
    assert_eq!((status, body.as_str()), (404, ""), "no route: NR");
    let (status, _, body) = http1_request(&mut c, "GET", "/empty", "known", &[]).await;
    assert_eq!((status, body.as_str()), (503, "no healthy upstream"));
    let (status, _, body) = http1_request(&mut c, "GET", "/dead", "known", &[]).await;
    assert_eq!(status, 503);
    assert!(body.starts_with("upstream connect error or disconnect/reset before headers"), "{body}");
    let (status, _, body) = http1_request(&mut c, "GET", "/sleep/2000", "known", &[]).await;
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
    let (status, _, body) = http1_request(&mut c, "GET", "/header", "known", &[("x-cluster", "slow")]).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = http1_request(&mut c, "GET", "/header", "known", &[("x-cluster", "nope")]).await;
    assert_eq!(status, 503, "cluster_header naming an unknown cluster");
    assert_eq!(counter(&server, "cluster.slow.upstream_rq_timeout"), 1);
    assert_eq!(counter(&server, "cluster.dead.upstream_cx_connect_fail"), 1);
    assert_eq!(counter(&server, "http.h.no_route"), 2);
    assert_eq!(counter(&server, "http.h.downstream_rq_5xx"), 4);
}

/// An upstream that answers 503 to its first `failures` requests, then 200.
async fn flaky_upstream(failures: usize) -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let status = if n < failures { 503 } else { 200 };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(bytes::Bytes::from(format!("attempt {n}"))))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn retries_on_5xx_until_the_flaky_upstream_answers() {
    let up = flaky_upstream(2).await;
    let retry = ", retry_policy: { retry_on: 5xx, num_retries: 3, retry_back_off: { base_interval: 0.01s } }";
    let server = start(
        &yaml(&http_listener("h", 0, &routes_to("f", retry), ""), &static_cluster("f", &[up])),
        Duration::from_secs(1),
    )
    .await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert_eq!((status, body.as_str()), (200, "attempt 2"));
    assert_eq!(counter(&server, "cluster.f.upstream_rq_retry"), 2);
    assert_eq!(counter(&server, "cluster.f.upstream_rq_503"), 2);
    assert_eq!(counter(&server, "cluster.f.upstream_rq_200"), 1);

    // Without a retry policy the 503 goes straight to the client.
    let up = flaky_upstream(1).await;
    let server = start(
        &yaml(&http_listener("h", 0, &routes_to("f", ""), ""), &static_cluster("f", &[up])),
        Duration::from_secs(1),
    )
    .await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, _, _) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert_eq!(status, 503);
}

/// A WebSocket-ish upstream: answers the upgrade with 101, then echoes raw bytes.
async fn upgrade_echo_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_lowercase();
                assert!(text.contains("upgrade: websocket"), "{text}");
                s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
                    .await
                    .unwrap();
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn websocket_upgrade_passes_through_when_configured() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upgrade_echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ws.log");
    let format = r#", log_format: { text_format: "%RESPONSE_CODE% %BYTES_RECEIVED% %BYTES_SENT% %RESPONSE_FLAGS%\n" }"#;
    let extra = format!(
        "\n          upgrade_configs: [ {{ upgrade_type: websocket }} ]\n          access_log: {}",
        file_log(&log, format)
    );
    let extra = extra.as_str();
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    let server = start(
        &yaml(&http_listener("h", 0, &routes_to("ws", ""), extra), &static_cluster("ws", &[up])),
        Duration::from_secs(1),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(listener_addr(&server, "h")).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "{}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"frame one"[..], b"frame two"] {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
    }
    assert_eq!(logged(), "", "Envoy logs an upgraded stream when its tunnel closes, not at the 101");
    // The stream lives as long as its tunnel: active, and in the cluster's request circuit breaker.
    assert_eq!(gauge(&server, "http.h.downstream_rq_active"), 1);
    assert_eq!(gauge(&server, "cluster.ws.upstream_rq_active"), 1);
    drop(s);
    eventually("the tunnel's log line", Duration::from_secs(3), async || !logged().is_empty()).await;
    assert_eq!(logged(), "101 18 18 -\n", "the tunnel's bytes each way");
    eventually("the stream ended with its tunnel", Duration::from_secs(3), async || {
        gauge(&server, "http.h.downstream_rq_active") == 0 && gauge(&server, "cluster.ws.upstream_rq_active") == 0
    })
    .await;

    // A route's max_stream_duration bounds the tunnel too, as Envoy caps WebSocket lifetimes with it.
    let server = start(
        &yaml(
            &http_listener("h", 0, &routes_to("ws", ", max_stream_duration: { max_stream_duration: 0.5s }"), extra),
            &static_cluster("ws", &[up]),
        ),
        Duration::from_secs(1),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(listener_addr(&server, "h")).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n").await.unwrap();
    let began = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&rest).to_lowercase().starts_with("http/1.1 101"));
    assert!(began.elapsed() >= Duration::from_millis(400), "closed at the deadline: {:?}", began.elapsed());
    assert_eq!(counter(&server, "http.h.downstream_rq_max_duration_reached"), 1);
    eventually("the cut tunnel's log line", Duration::from_secs(3), async || logged().lines().count() == 2).await;
    assert_eq!(logged().lines().nth(1), Some("101 0 0 DT"), "closed by the stream's max_stream_duration");
    assert_eq!(counter(&server, "http.h.downstream_rq_tx_reset"), 1, "a stream we ended");
    assert_eq!(gauge(&server, "http.h.downstream_rq_active"), 0);

    // Without upgrade_configs the same request is refused, as Envoy does (403).
    let server = start(
        &yaml(&http_listener("h", 0, &routes_to("ws", ""), ""), &static_cluster("ws", &[up])),
        Duration::from_secs(1),
    )
    .await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, _, _) =
        http1_request(&mut c, "GET", "/chat", "x", &[("connection", "upgrade"), ("upgrade", "websocket")]).await;
    assert_eq!(status, 403);
    assert_eq!(counter(&server, "http.h.downstream_rq_ws_on_non_ws_route"), 1);
}

/// A tunnel cannot be closed gracefully: like a tcp_proxy connection, it is closed at its chain's drain deadline.
#[tokio::test]
async fn an_upgraded_connection_closes_at_the_drain_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upgrade_echo_upstream().await;
    let server =
        start(&format!("static_resources:\n  clusters:{}\n", static_cluster("ws", &[up])), Duration::from_secs(1))
            .await;
    let extra = "\n          upgrade_configs: [ { upgrade_type: websocket } ]";
    let config = listener(&unlisted(&http_listener("h", 0, &routes_to("ws", ""), extra)));
    server.listener_manager().add_or_update(config, false).unwrap();
    let mut s = tokio::net::TcpStream::connect(listener_addr(&server, "h")).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "{}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    assert!(String::from_utf8_lossy(&head).to_lowercase().starts_with("http/1.1 101"));
    server.listener_manager().remove("h").unwrap();
    let began = std::time::Instant::now();
    // Still a working tunnel while the drain runs.
    s.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap();
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(800), "closed before the drain deadline: {took:?}");
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_closes_http1_with_connection_close_and_http2_with_goaway() {
    use http_body_util::BodyExt;
    let up = http_upstream("U").await;
    let server =
        start(&format!("static_resources:\n  clusters:{}\n", static_cluster("u", &[up])), Duration::from_secs(5)).await;
    let config = listener(&unlisted(&http_listener("h", 0, &routes_to("u", ""), "")));
    server.listener_manager().add_or_update(config, false).unwrap();
    let addr = listener_addr(&server, "h");
    let mut h1 = http1_client(addr).await;
    let (status, headers, _) = http1_request(&mut h1, "GET", "/", "x", &[]).await;
    assert_eq!(status, 200);
    assert!(headers.get("connection").is_none());
    let mut h2 = h2c_client(addr).await;
    let slow_h2 = {
        let mut h2 = h2.clone();
        tokio::spawn(async move {
            let req = hyper::Request::builder().uri("http://x/sleep/500").body(http_body_util::Empty::new()).unwrap();
            let resp = h2.send_request(req).await.unwrap();
            resp.into_body().collect().await.unwrap().to_bytes()
        })
    };
    let slow_h1 = tokio::spawn(async move {
        let r = http1_request(&mut h1, "GET", "/sleep/500", "x", &[]).await;
        (r, h1)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Removing the listener drains its chains (immediate strategy in tests): requests in flight finish, HTTP/1
    // answers with `Connection: close`, HTTP/2 sends GOAWAY; then both connections close.
    server.listener_manager().remove("h").unwrap();
    let ((status, headers, body), h1) = slow_h1.await.unwrap();
    assert_eq!(status, 200, "the request in flight is served: {body}");
    assert_eq!(headers["connection"], "close");
    eventually("h1 connection closed", Duration::from_secs(5), async || h1.is_closed()).await;
    let body = slow_h2.await.unwrap();
    assert!(body.starts_with(b"U\n"));
    eventually("h2 connection closed by GOAWAY", Duration::from_secs(5), async || {
        h2.ready().await.is_err() || h2.is_closed()
    })
    .await;
    assert!(counter(&server, "http.h.downstream_cx_drain_close") >= 2);
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// 256 MiB each way through the proxy binary: bodies stream frame by frame, so the proxy's peak memory stays far
/// below the transfer size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_uploads_and_downloads_stream_with_bounded_memory() {
    use http_body_util::BodyExt;
    const TOTAL: u64 = 256 * 1024 * 1024;
    let up = http_upstream("U").await;
    let port = free_port();
    let proxy = Proxy::spawn(
        &yaml(&http_listener("h", port, &routes_to("u", ", timeout: 0s"), ""), &static_cluster("u", &[up])),
        &["--concurrency", "2"],
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    wait_accepting(addr, Duration::from_secs(10)).await;
    let baseline = vm_hwm_kib(proxy.child.id());

    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>,
    >(hyper_util::rt::TokioIo::new(s))
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(format!("/bytes/{TOTAL}"))
        .header("host", "x")
        .body(http_body_util::Empty::new().boxed())
        .unwrap();
    let mut body = send.send_request(req).await.unwrap().into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            received += d.len() as u64;
        }
    }
    assert_eq!(received, TOTAL);

    let chunk = bytes::Bytes::from(vec![7u8; 256 * 1024]);
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            (sent < TOTAL)
                .then(|| (Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk)), sent + 256 * 1024))
        }
    });
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "x")
        .body(http_body_util::StreamBody::new(stream).boxed())
        .unwrap();
    // A client connection takes its next request only once it has seen the previous exchange end.
    send.ready().await.unwrap();
    let resp = send.send_request(req).await.unwrap();
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains(&format!("received={TOTAL}\n")), "{text}");

    let peak = vm_hwm_kib(proxy.child.id());
    assert!(peak < baseline + 32 * 1024, "proxy peak RSS grew from {baseline} KiB to {peak} KiB moving 2 × 256 MiB");
}

#[tokio::test]
async fn rewrites_redirects_and_envoy_request_headers() {
    let up = http_upstream("U").await;
    let h2_cluster = format!(
        r#"{}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}"#,
        static_cluster("h2", &[up])
    );
    let clusters = format!("{}{h2_cluster}", static_cluster("u", &[up]));
    let routes = r#"          route_config:
            name: local
            request_headers_to_add: [ { header: { key: x-level, value: config } } ]
            response_headers_to_add: [ { header: { key: x-answered-by, value: proxy } } ]
            virtual_hosts:
            - name: all
              domains: ["*"]
              include_request_attempt_count: true
              routes:
              - match: { prefix: "/old/" }
                route: { cluster: u, prefix_rewrite: "/new/", host_rewrite_literal: rewritten.example }
              - match: { prefix: "/h2" }
                route: { cluster: h2 }
              - match: { path: "/moved" }
                redirect: { host_redirect: elsewhere.example, path_redirect: "/here", response_code: FOUND }
              - match: { prefix: "/" }
                route: { cluster: u }
                request_headers_to_remove: [ x-secret ]"#;
    let extra = "\n          use_remote_address: true\n          via: proxy-1";
    let server = start(&yaml(&http_listener("h", 0, routes, extra), &clusters), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;

    let (status, headers, body) = http1_request(&mut c, "GET", "/old/page?x=1", "orig", &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("GET /new/page?x=1\nhost=rewritten.example\n"), "{body}");
    assert!(body.contains("x-level=config\n") && body.contains("x-envoy-attempt-count=1\n"), "{body}");
    assert!(body.contains("x-forwarded-for=127.0.0.1\n"), "use_remote_address appends the peer: {body}");
    assert_eq!(headers["x-answered-by"], "proxy");
    assert_eq!(headers["via"], "proxy-1");

    let (_, _, body) =
        http1_request(&mut c, "GET", "/plain", "orig", &[("x-secret", "s"), ("x-forwarded-for", "1.2.3.4")]).await;
    assert!(!body.contains("x-secret"), "{body}");
    assert!(body.contains("x-forwarded-for=1.2.3.4,127.0.0.1\n"), "{body}");
    let (_, _, body) = http1_request(
        &mut c,
        "GET",
        "/plain",
        "orig",
        &[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "5.6.7.8")],
    )
    .await;
    assert!(body.contains("x-forwarded-for=1.2.3.4,5.6.7.8,127.0.0.1\n"), "several headers are one list: {body}");
    assert!(body.contains("version=HTTP/1.1"), "{body}");

    let (_, _, body) = http1_request(&mut c, "GET", "/h2/x", "orig", &[]).await;
    assert!(body.contains("host=orig\n") && body.contains("version=HTTP/2.0"), "HTTP/2 upstream: {body}");

    let (status, headers, _) = http1_request(&mut c, "GET", "/moved?q=1", "orig", &[]).await;
    assert_eq!(status, 302);
    assert_eq!(headers["location"], "http://elsewhere.example/here?q=1");
}

#[tokio::test]
async fn oversized_headers_get_431_and_request_limits_close_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = http_upstream("U").await;
    let extra = "\n          max_request_headers_kb: 8\n          common_http_protocol_options: { max_requests_per_connection: 2 }";
    let server = proxy_to(up, extra).await;
    let addr = listener_addr(&server, "h");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let big = "a".repeat(16 * 1024);
    s.write_all(format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");

    // A malformed request line gets 400 and only that connection closes; the listener keeps serving.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"\x01\x02 garbage\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"), "{:?}", String::from_utf8_lossy(&out));

    // max_requests_per_connection: 2 → the second response says close.
    let mut c = http1_client(addr).await;
    let (_, headers, _) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert!(headers.get("connection").is_none());
    let (_, headers, _) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert_eq!(headers["connection"], "close");
    assert_eq!(counter(&server, "http.h.downstream_cx_max_requests_reached"), 1);
}

#[tokio::test]
async fn expect_100_continue_and_http2_only_codec() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = http_upstream("U").await;
    let server = proxy_to(up, "").await;
    // Envoy answers the Expect itself and removes it; with proxy_100_continue (Istio 1.23+) it goes upstream.
    let proxied = proxy_to(up, "\n          proxy_100_continue: true").await;
    for (server, upstream_sees) in [(&server, false), (&proxied, true)] {
        let mut s = tokio::net::TcpStream::connect(listener_addr(server, "h")).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 25];
        s.read_exact(&mut buf).await.unwrap();
        assert!(buf.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"), "{:?}", String::from_utf8_lossy(&buf));
        s.write_all(b"hello").await.unwrap();
        let mut out = vec![0u8; 4096];
        let n = s.read(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("received=5"), "{text}");
        assert_eq!(text.contains("expect=100-continue"), upstream_sees, "{text}");
    }

    // codec_type HTTP2: h2c prior knowledge works, HTTP/1 does not.
    let server = start(
        &yaml(
            &http_listener("h", 0, &routes_to("u", ""), "\n          codec_type: HTTP2"),
            &static_cluster("u", &[up]),
        ),
        Duration::from_secs(1),
    )
    .await;
    let addr = listener_addr(&server, "h");
    let mut h2 = h2c_client(addr).await;
    let resp = h2
        .send_request(hyper::Request::builder().uri("http://x/").body(http_body_util::Empty::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("HTTP/1.1 200"),
        "HTTP/1 on an HTTP2-only listener: {:?}",
        String::from_utf8_lossy(&out)
    );
}

#[tokio::test]
async fn request_timeout_answers_408_when_the_body_is_late() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = http_upstream("U").await;
    let extra = "\n          request_timeout: 0.3s";
    let server = proxy_to(up, extra).await;
    let addr = listener_addr(&server, "h");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nhalf!").await.unwrap();
    let started = std::time::Instant::now();
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.ends_with("request timeout"), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    assert_eq!(counter(&server, "http.h.downstream_rq_timeout"), 1);

    // A complete request is not cut short by the same timeout while the upstream takes its time.
    let mut c = http1_client(addr).await;
    let (status, _, _) = http1_request(&mut c, "GET", "/sleep/500", "x", &[]).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breakers_answer_503_overflow() {
    let up = http_upstream("U").await;
    let cluster = format!(
        "{}\n    circuit_breakers: {{ thresholds: [ {{ max_requests: 1, max_pending_requests: 5 }} ] }}",
        static_cluster("u", &[up])
    );
    let server = start(&yaml(&http_listener("h", 0, &routes_to("u", ""), ""), &cluster), Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "h");
    let slow = tokio::spawn(async move {
        let mut a = http1_client(addr).await;
        http1_request(&mut a, "GET", "/sleep/700", "x", &[]).await.0
    });
    eventually("first request in flight", Duration::from_secs(5), async || {
        gauge(&server, "cluster.u.upstream_rq_active") == 1
    })
    .await;
    let mut b = http1_client(addr).await;
    let (status, headers, body) = http1_request(&mut b, "GET", "/", "x", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["x-envoy-overloaded"], "true");
    assert!(body.ends_with("reset reason: overflow"), "{body}");
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(counter(&server, "cluster.u.upstream_rq_pending_overflow"), 1);
}

/// A request's stream lives until its response body is complete, as in Envoy: a slow body keeps
/// `downstream_rq_active` and the `max_requests` slot taken (Envoy counts that overflow as
/// `upstream_rq_pending_overflow`, its "max streams overflow"), and both are released when the body ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_response_holds_its_request_slot_until_the_body_ends() {
    use http_body_util::BodyExt;
    let up = http_upstream("U").await;
    let cluster =
        format!("{}\n    circuit_breakers: {{ thresholds: [ {{ max_requests: 1 }} ] }}", static_cluster("u", &[up]));
    let server = start(&yaml(&http_listener("h", 0, &routes_to("u", ""), ""), &cluster), Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "h");
    let mut a = http1_client(addr).await;
    let resp = get_response(&mut a, "/drip/1000").await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"a");
    // Headers and a first chunk are out; the stream is not over.
    assert_eq!(gauge(&server, "http.h.downstream_rq_active"), 1);
    assert_eq!(gauge(&server, "cluster.u.upstream_rq_active"), 1);

    let mut b = http1_client(addr).await;
    let (status, headers, text) = http1_request(&mut b, "GET", "/", "x", &[]).await;
    assert_eq!(status, 503, "{text}");
    assert_eq!(headers["x-envoy-overloaded"], "true");
    assert_eq!(counter(&server, "cluster.u.upstream_rq_pending_overflow"), 1);

    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"b");
    eventually("the stream ended", Duration::from_secs(5), async || {
        gauge(&server, "http.h.downstream_rq_active") == 0 && gauge(&server, "cluster.u.upstream_rq_active") == 0
    })
    .await;
    let (status, _, _) = http1_request(&mut b, "GET", "/", "x", &[]).await;
    assert_eq!(status, 200, "the slot is free again");
}

/// A downstream connection streaming a response has an active stream, so the HCM's idle timeout (no active streams
/// for that long, in Envoy) does not count it idle; once the response ended it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_streaming_a_response_is_not_idle() {
    use http_body_util::BodyExt;
    let up = http_upstream("U").await;
    let extra = "\n          common_http_protocol_options: { idle_timeout: 0.3s }";
    let server = proxy_to(up, extra).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let resp = get_response(&mut c, "/drip/900").await;
    assert!(resp.headers().get("connection").is_none());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ab");
    assert_eq!(counter(&server, "http.h.downstream_cx_idle_timeout"), 0, "900 ms of streaming is not idle");
    eventually("idle once the response ended", Duration::from_secs(5), async || c.is_closed()).await;
    assert_eq!(counter(&server, "http.h.downstream_cx_idle_timeout"), 1);
}

/// Envoy records `upstream_rq_time` when the upstream response is complete, not when its headers arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_rq_time_is_recorded_when_the_response_is_complete() {
    use http_body_util::BodyExt;
    let up = http_upstream("U").await;
    let server = proxy_to(up, "").await;
    let rq_time = |server: &xds_proxy::server::Server| match server.stats.get("cluster.u.upstream_rq_time") {
        Some(xds_proxy::stats::Value::Histogram(h)) => (h.count, h.sum),
        other => panic!("upstream_rq_time: {other:?}"),
    };
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let mut body = get_response(&mut c, "/drip/600").await.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"a");
    assert_eq!(rq_time(&server).0, 0, "headers and a first chunk are not a complete response");
    let _ = body.collect().await.unwrap();
    eventually("upstream_rq_time recorded", Duration::from_secs(5), async || rq_time(&server).0 == 1).await;
    // The upstream held the last chunk back for 600 ms: the recorded time covers it.
    assert!(rq_time(&server).1 >= 600.0, "{:?}", rq_time(&server));
}

/// Upstream connections that carry no request for the cluster's `common_http_protocol_options.idle_timeout` close
/// on their own timer (`upstream_cx_idle_timeout`), HTTP/1.1 and HTTP/2 alike, and never while a request uses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_close_on_the_clusters_idle_timeout() {
    let up = http_upstream("U").await;
    let options = |name: &str, protocol: &str| {
        format!(
            r#"{}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {{ idle_timeout: 0.4s }}
        explicit_http_config: {{ {protocol}: {{}} }}"#,
            static_cluster(name, &[up])
        )
    };
    let routes = r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/h2/" }
                route: { cluster: h2, prefix_rewrite: "/" }
              - match: { prefix: "/" }
                route: { cluster: h1 }"#;
    let clusters = format!("{}{}", options("h1", "http_protocol_options"), options("h2", "http2_protocol_options"));
    let server = start(&yaml(&http_listener("h", 0, routes, ""), &clusters), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    // Requests longer than the idle timeout keep their connections.
    for (cluster, path) in [("h1", "/sleep/900"), ("h2", "/h2/sleep/900")] {
        let (status, _, body) = http1_request(&mut c, "GET", path, "x", &[]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(counter(&server, &format!("cluster.{cluster}.upstream_cx_idle_timeout")), 0);
        assert_eq!(gauge(&server, &format!("cluster.{cluster}.upstream_cx_active")), 1);
        assert_eq!(counter(&server, &format!("cluster.{cluster}.upstream_cx_total")), 1);
    }
    // Then, with nothing to do, they close without another request coming.
    eventually("idle upstream connections closed", Duration::from_secs(5), async || {
        ["h1", "h2"].iter().all(|c| {
            counter(&server, &format!("cluster.{c}.upstream_cx_idle_timeout")) == 1
                && gauge(&server, &format!("cluster.{c}.upstream_cx_active")) == 0
        })
    })
    .await;
    let (status, _, _) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert_eq!(status, 200, "a new connection serves the next request");
    assert_eq!(counter(&server, "cluster.h1.upstream_cx_total"), 2);
}

/// With Envoy's default gradual drain over a long drain time, a keep-alive connection with nothing in flight still
/// closes when its chain drains instead of holding the drain (and a shutdown) to the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_close_when_a_gradual_drain_starts() {
    let up = http_upstream("U").await;
    let mut options = options(Duration::from_secs(600));
    options.drain_strategy = xds_proxy::drain::DrainStrategy::Gradual;
    let yaml = format!("static_resources:\n  clusters:{}\n", static_cluster("u", &[up]));
    let server = xds_proxy::server::Server::start(bootstrap(&yaml), &options).await.unwrap();
    let config = listener(&unlisted(&http_listener("h", 0, &routes_to("u", ""), "")));
    server.listener_manager().add_or_update(config, false).unwrap();
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, _, _) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert_eq!(status, 200);
    server.listener_manager().remove("h").unwrap();
    eventually("idle connection closed by the drain", Duration::from_secs(3), async || c.is_closed()).await;
    let started = std::time::Instant::now();
    server.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(5), "shutdown took {:?}", started.elapsed());
}

/// Envoy's route timeout counts from the end of the request: an upload longer than the timeout still gets its
/// answer, and a response that takes longer than the timeout after the upload gets 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_timeout_starts_when_the_request_is_complete() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = http_upstream("U").await;
    let server = start(
        &yaml(&http_listener("h", 0, &routes_to("u", ", timeout: 0.5s"), ""), &static_cluster("u", &[up])),
        Duration::from_secs(1),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(listener_addr(&server, "h")).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\n").await.unwrap();
    for byte in [b"a", b"b", b"c", b"d"] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(byte).await.unwrap();
    }
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "a 1.2 s upload under a 0.5 s route timeout: {text}");
    assert!(text.contains("received=4"), "{text}");

    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, _, body) = http1_request(&mut c, "GET", "/sleep/1500", "x", &[]).await;
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
}

/// Envoy's max_stream_duration as Istio sends it on every route (`max_stream_duration: 0s`,
/// `grpc_timeout_header_max: 0s`, `timeout: 0s`): a gRPC request's `grpc-timeout` bounds its stream (a trailers-only
/// DEADLINE_EXCEEDED when no response began), other requests have no limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_headers_bound_the_stream_on_istio_routes() {
    let up = http_upstream("U").await;
    let route = ", timeout: 0s, max_stream_duration: { max_stream_duration: 0s, grpc_timeout_header_max: 0s }";
    let server = proxy_to_with_route(up, route, "").await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let grpc = [("content-type", "application/grpc"), ("grpc-timeout", "200m")];
    let began = std::time::Instant::now();
    let (status, headers, body) = http1_request(&mut c, "POST", "/sleep/3000", "x", &grpc).await;
    assert!(began.elapsed() < Duration::from_secs(2), "ended at the 200 ms deadline: {:?}", began.elapsed());
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(grpc_status(&headers), (Some("4".into()), Some("downstream duration timeout".into())));
    assert_eq!(counter(&server, "http.h.downstream_rq_max_duration_reached"), 1);

    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, _, body) = http1_request(&mut c, "GET", "/sleep/500", "x", &[("grpc-timeout", "100m")]).await;
    assert_eq!(status, 200, "not gRPC: the header means nothing and the route has no limit: {body}");
    assert_eq!(counter(&server, "http.h.downstream_rq_max_duration_reached"), 1);
}

/// A route's max_stream_duration (or else the HCM's common_http_protocol_options.max_stream_duration) ends the stream:
/// 504 "downstream duration timeout" before the response began, a reset body after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_stream_duration_ends_streams_before_and_after_the_response_begins() {
    let up = http_upstream("U").await;
    let route = ", timeout: 0s, max_stream_duration: { max_stream_duration: 0.3s }";
    let server = proxy_to_with_route(up, route, "").await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, _, body) = http1_request(&mut c, "GET", "/sleep/3000", "x", &[]).await;
    assert_eq!((status, body.as_str()), (504, "downstream duration timeout"));

    let hcm = "\n          common_http_protocol_options: { max_stream_duration: 0.3s }";
    let server = proxy_to_with_route(up, ", timeout: 0s", hcm).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let resp = get_response(&mut c, "/drip/2000").await;
    assert_eq!(resp.status(), 200, "the response began before the deadline");
    let body = tokio::time::timeout(Duration::from_secs(5), http_body_util::BodyExt::collect(resp.into_body())).await;
    assert!(body.unwrap().is_err(), "the body is cut at the deadline, not completed after 2 s");
    assert_eq!(counter(&server, "http.h.downstream_rq_max_duration_reached"), 1);
    // A route's own 0 turns the HCM's limit off.
    let server = proxy_to_with_route(up, ", timeout: 0s, max_stream_duration: { max_stream_duration: 0s }", hcm).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    assert_eq!(http1_request(&mut c, "GET", "/sleep/600", "x", &[]).await.0, 200);
}

/// Envoy's upstream max_stream_duration (the cluster's `common_http_protocol_options`, or an internal request's
/// `x-envoy-upstream-stream-duration-ms`) bounds each attempt: 504 "upstream max stream duration reached" before the
/// response began (408 while the request is still arriving; retried under a `reset` policy), a cut body after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_max_stream_duration_bounds_each_attempt() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = http_upstream("U").await;
    let cluster = http1_cluster_with("u", &[up], "max_stream_duration: 0.5s");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("int.log");
    let format = r#", log_format: { text_format: "%RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(:PATH)%\n" }"#;
    let internal = format!(
        "\n          use_remote_address: true\n          internal_address_config: \
         {{ cidr_ranges: [ {{ address_prefix: 127.0.0.0, prefix_len: 8 }} ] }}\n          access_log: {}",
        file_log(&log, format)
    );
    let retry = ", timeout: 0s, retry_policy: { retry_on: reset, num_retries: 1 }";
    let listeners = format!(
        "{}{}{}",
        http_listener("int", 0, &routes_to("u", ", timeout: 0s"), &internal),
        http_listener("ext", 0, &routes_to("u", ", timeout: 0s"), "\n          use_remote_address: true"),
        http_listener("retry", 0, &routes_to("u", retry), ""),
    );
    let server = start(&yaml(&listeners, &cluster), Duration::from_secs(1)).await;
    let reached = || counter(&server, "cluster.u.upstream_rq_max_duration_reached");

    let mut c = http1_client(listener_addr(&server, "int")).await;
    let began = std::time::Instant::now();
    let (status, _, body) = http1_request(&mut c, "GET", "/sleep/3000", "x", &[]).await;
    assert_eq!((status, body.as_str()), (504, "upstream max stream duration reached"));
    assert!(began.elapsed() < Duration::from_secs(2), "cut at 0.5 s: {:?}", began.elapsed());
    assert_eq!(reached(), 1);
    assert_eq!(counter(&server, "cluster.u.upstream_rq_tx_reset"), 1, "the proxy reset the upstream request");

    let mut c = http1_client(listener_addr(&server, "int")).await;
    let resp = get_response(&mut c, "/drip/2000").await;
    assert_eq!(resp.status(), 200, "the response began in time");
    let body = tokio::time::timeout(Duration::from_secs(5), http_body_util::BodyExt::collect(resp.into_body())).await;
    assert!(body.unwrap().is_err(), "the body is cut at 0.5 s, not completed after 2 s");
    assert_eq!(reached(), 2);
    // Flagged UMSDR either way, as Envoy does; a cut body is the proxy's reset, not the client's going away (DC).
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("both requests logged", Duration::from_secs(3), async || logged().lines().count() >= 2).await;
    let lines: Vec<String> = logged().lines().map(str::to_string).collect();
    assert_eq!(lines[..2], ["504 UMSDR /sleep/3000", "200 UMSDR /drip/2000"], "{lines:?}");

    // An internal request's header replaces the cluster's limit (0: none) and goes no further.
    let mut c = http1_client(listener_addr(&server, "int")).await;
    for ms in ["0", "2000"] {
        let (status, _, body) =
            http1_request(&mut c, "GET", "/sleep/800", "x", &[("x-envoy-upstream-stream-duration-ms", ms)]).await;
        assert_eq!(status, 200, "header {ms}: {body}");
        assert!(!body.contains("x-envoy-upstream-stream-duration-ms"), "{body}");
    }
    let (status, ..) =
        http1_request(&mut c, "GET", "/sleep/1500", "x", &[("x-envoy-upstream-stream-duration-ms", "100")]).await;
    assert_eq!(status, 504, "only the header's 0.1 s cuts it before the cluster's 0.5 s");
    assert_eq!(reached(), 3);
    // An external request's header is dropped (as recent Envoy drops it): the cluster's 0.5 s stands.
    let mut c = http1_client(listener_addr(&server, "ext")).await;
    let (status, ..) =
        http1_request(&mut c, "GET", "/sleep/2000", "x", &[("x-envoy-upstream-stream-duration-ms", "5000")]).await;
    assert_eq!(status, 504);
    assert_eq!(reached(), 4);

    // The request is still arriving when the limit passes: 408.
    let mut s = tokio::net::TcpStream::connect(listener_addr(&server, "int")).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nab").await.unwrap();
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("upstream max stream duration reached"), "{text}");
    assert_eq!(reached(), 5);

    // A local reset, so a `reset` retry policy retries it; each attempt has its own limit.
    let mut c = http1_client(listener_addr(&server, "retry")).await;
    let (status, ..) = http1_request(&mut c, "GET", "/sleep/3000", "x", &[]).await;
    assert_eq!(status, 504);
    assert_eq!(reached(), 7);
    assert_eq!(counter(&server, "cluster.u.upstream_rq_retry"), 1);
}

/// The deprecated max_grpc_timeout (without max_stream_duration): a gRPC request's grpc-timeout becomes its route
/// timeout, capped by max_grpc_timeout unless that is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_max_grpc_timeout_turns_grpc_timeout_into_the_route_timeout() {
    let up = http_upstream("U").await;
    let server = proxy_to_with_route(up, ", timeout: 0s, max_grpc_timeout: 0.3s", "").await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    // The route timeout's 504 reaches a gRPC client as UNAVAILABLE, as Envoy maps it.
    let grpc = [("content-type", "application/grpc"), ("grpc-timeout", "10S")];
    let began = std::time::Instant::now();
    let (code, headers, _) = http1_request(&mut c, "POST", "/sleep/3000", "x", &grpc).await;
    assert!(began.elapsed() < Duration::from_secs(2), "capped at 0.3 s: {:?}", began.elapsed());
    assert_eq!(code, 200);
    assert_eq!(grpc_status(&headers), (Some("14".into()), Some("upstream request timeout".into())));
    let grpc = [("content-type", "application/grpc"), ("grpc-timeout", "100m")];
    let (_, headers, _) = http1_request(&mut c, "POST", "/sleep/3000", "x", &grpc).await;
    assert_eq!(grpc_status(&headers).0.as_deref(), Some("14"));
    assert_eq!(counter(&server, "cluster.u.upstream_rq_timeout"), 2);
    // The upstream's grpc-timeout is the time the router will wait (Envoy's setTimeoutHeaders).
    let grpc = [("content-type", "application/grpc"), ("grpc-timeout", "10S")];
    let (_, _, body) = http1_request(&mut c, "POST", "/", "x", &grpc).await;
    assert!(body.contains("grpc-timeout=300m\n") && body.contains("x-envoy-expected-rq-timeout-ms=300\n"), "{body}");
    let grpc = [("content-type", "application/grpc"), ("grpc-timeout", "100m")];
    let (_, _, body) = http1_request(&mut c, "POST", "/", "x", &grpc).await;
    assert!(body.contains("grpc-timeout=100m\n"), "{body}");
}

/// Envoy's max_connection_duration: downstream (the HCM's), a connection that old is drained (its response in flight
/// still arrives) and closed; upstream (the cluster's), a pooled connection that old is retired and the next request
/// opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_duration_retires_downstream_and_upstream_connections() {
    let up = http_upstream("U").await;
    let hcm = "\n          common_http_protocol_options: { max_connection_duration: 0.4s }";
    let server = proxy_to(up, hcm).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    assert_eq!(http1_request(&mut c, "GET", "/", "x", &[]).await.0, 200);
    let (status, ..) = http1_request(&mut c, "GET", "/sleep/700", "x", &[]).await;
    assert_eq!(status, 200, "the response in flight at the deadline is delivered");
    eventually("the proxy closed the connection", Duration::from_secs(3), async || c.is_closed()).await;
    assert_eq!(counter(&server, "http.h.downstream_cx_max_duration_reached"), 1);

    let cluster = http1_cluster_with("u", &[up], "max_connection_duration: 1s");
    let server = start(&yaml(&http_listener("h", 0, &routes_to("u", ""), ""), &cluster), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    assert_eq!(http1_request(&mut c, "GET", "/", "x", &[]).await.0, 200);
    assert_eq!(http1_request(&mut c, "GET", "/", "x", &[]).await.0, 200);
    assert_eq!(counter(&server, "cluster.u.upstream_cx_total"), 1, "reused while young");
    eventually("the pooled connection was retired", Duration::from_secs(3), async || {
        counter(&server, "cluster.u.upstream_cx_max_duration_reached") == 1
    })
    .await;
    assert_eq!(http1_request(&mut c, "GET", "/", "x", &[]).await.0, 200);
    assert_eq!(counter(&server, "cluster.u.upstream_cx_total"), 2);
}

/// Envoy answers a gRPC request's local replies in gRPC terms: 200, trailers-only, `grpc-status` mapped from the
/// HTTP status (503 → UNAVAILABLE, 404 → UNIMPLEMENTED) and the reply's text as `grpc-message`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_to_grpc_requests_are_grpc_statuses() {
    let server = start(
        &yaml(&http_listener("h", 0, &routes_to("u", ""), ""), &static_cluster("u", &[])),
        Duration::from_secs(1),
    )
    .await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let grpc = [("content-type", "application/grpc")];
    let (status, headers, body) = http1_request(&mut c, "POST", "/pkg.Svc/Call", "x", &grpc).await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(grpc_status(&headers), (Some("14".into()), Some("no healthy upstream".into())));
    assert_eq!(headers.get("content-type").map(|v| v.to_str().unwrap()), Some("application/grpc"));
    let (status, headers, _) = http1_request(&mut c, "POST", "/pkg.Svc/Call", "x", &[]).await;
    assert_eq!((status, grpc_status(&headers).0), (503, None), "not gRPC: plain HTTP");
    assert_eq!(counter(&server, "http.h.downstream_rq_5xx"), 1, "counted as what the client got");
}

/// The router's own config: `suppress_envoy_headers` drops the router's x-envoy headers (the upstream otherwise hears
/// `x-envoy-expected-rq-timeout-ms`, and the client `x-envoy-upstream-service-time`); a field we do not honour
/// (`upstream_log`) is refused with its path instead of being ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_config_suppresses_envoy_headers_and_refuses_the_rest() {
    let up = http_upstream("U").await;
    let listener = |router: &str| {
        http_listener("h", 0, &routes_to("u", ""), "")
            .replace("router.v3.Router }", &format!("router.v3.Router, {router} }}"))
    };
    let server =
        start(&yaml(&listener("suppress_envoy_headers: false"), &static_cluster("u", &[up])), Duration::from_secs(1))
            .await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (_, headers, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert!(headers.contains_key("x-envoy-upstream-service-time"));
    assert!(body.contains("x-envoy-expected-rq-timeout-ms=15000\n"), "the route's default 15 s told upstream: {body}");
    let server =
        start(&yaml(&listener("suppress_envoy_headers: true"), &static_cluster("u", &[up])), Duration::from_secs(1))
            .await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, headers, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert_eq!(status, 200);
    assert!(!headers.contains_key("x-envoy-upstream-service-time"), "{headers:?}");
    assert!(!body.contains("x-envoy-expected-rq-timeout-ms"), "{body}");

    let bad = listener("upstream_log: [ { name: envoy.access_loggers.stdout } ]");
    let err = listener_error(&unlisted(&bad));
    assert!(err.contains("http_filters[0].typed_config.upstream_log: not supported"), "{err}");
}

/// A proxy whose HCM listener `h` (`hcm_extra` on the connection manager) routes everything to `up` with
/// `route_extra` on the route action.
async fn proxy_to_with_route(
    up: std::net::SocketAddr,
    route_extra: &str,
    hcm_extra: &str,
) -> xds_proxy::server::Server {
    start(
        &yaml(&http_listener("h", 0, &routes_to("u", route_extra), hcm_extra), &static_cluster("u", &[up])),
        Duration::from_secs(1),
    )
    .await
}

/// An upstream that reads the attempt number Envoy sends (`x-envoy-attempt-count`) and the path `/<fails>/<ms>`:
/// attempts up to `fails` get 503 at once, later ones 200 after `ms`. Request bodies are read and counted; `events`
/// hears `(attempt, "data")` when an attempt's first body bytes arrive.
async fn attempts_upstream() -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<(u32, &'static str)>) {
    use http_body_util::BodyExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let attempt: u32 = req
                            .headers()
                            .get("x-envoy-attempt-count")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let mut parts = req.uri().path().trim_start_matches('/').split('/');
                        let fails: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                        let ms: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                        let mut body = req.into_body();
                        let mut received = 0usize;
                        while let Some(frame) = body.frame().await {
                            if let Ok(d) = frame.unwrap().into_data() {
                                if received == 0 && !d.is_empty() {
                                    let _ = tx.send((attempt, "data"));
                                }
                                received += d.len();
                            }
                        }
                        let status = if attempt <= fails {
                            503
                        } else {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            200
                        };
                        let text = format!("attempt={attempt} received={received}");
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(bytes::Bytes::from(text)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

fn retrying_routes(num_retries: u32) -> String {
    format!(
        r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              include_request_attempt_count: true
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: u
                  retry_policy: {{ retry_on: 5xx, num_retries: {num_retries}, retry_back_off: {{ base_interval: 0.01s }} }}"#
    )
}

/// Envoy's `max_retries` circuit breaker limits the retries outstanding across the whole cluster at once (not the
/// retries of one request): a retry over it is not made, the answer passes on and `upstream_rq_retry_overflow`
/// counts it; once the outstanding retry is done, a request may retry again, as often as its policy says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retries_limits_concurrent_retries_across_the_cluster() {
    let (up, _events) = attempts_upstream().await;
    let cluster =
        format!("{}\n    circuit_breakers: {{ thresholds: [ {{ max_retries: 1 }} ] }}", static_cluster("u", &[up]));
    let server = start(&yaml(&http_listener("h", 0, &retrying_routes(2), ""), &cluster), Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "h");
    let first = tokio::spawn(async move {
        let mut a = http1_client(addr).await;
        http1_request(&mut a, "GET", "/1/1000", "x", &[]).await
    });
    eventually("the first request's retry is outstanding", Duration::from_secs(5), async || {
        counter(&server, "cluster.u.upstream_rq_retry") == 1
    })
    .await;

    let mut b = http1_client(addr).await;
    let (status, _, body) = http1_request(&mut b, "GET", "/1/0", "x", &[]).await;
    assert_eq!((status, body.as_str()), (503, "attempt=1 received=0"), "not retried while the other retry is out");
    assert_eq!(counter(&server, "cluster.u.upstream_rq_retry_overflow"), 1);

    let (status, _, body) = first.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "attempt=2 received=0"));
    assert_eq!(counter(&server, "cluster.u.upstream_rq_retry_success"), 1);

    // Two retries one after the other under max_retries 1: the limit is on retries at once, not per request.
    let (status, _, body) = http1_request(&mut b, "GET", "/2/0", "x", &[]).await;
    assert_eq!((status, body.as_str()), (200, "attempt=3 received=0"));
    assert_eq!(counter(&server, "cluster.u.upstream_rq_retry"), 3);
    assert_eq!(counter(&server, "cluster.u.upstream_rq_retry_overflow"), 1);
}

/// Sends a POST whose body is two 10 KiB chunks; the second goes only once the upstream has seen the first, which
/// proves the first attempt streams (the proxy does not collect the body before sending it).
async fn post_in_two_chunks(
    addr: std::net::SocketAddr,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<(u32, &'static str)>,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::StreamBody<
            futures_util::stream::BoxStream<
                'static,
                Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
            >,
        >,
    >(hyper_util::rt::TokioIo::new(s))
    .await
    .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(hyper::body::Frame::data(b)), rx))
    });
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/1/0")
        .header("host", "x")
        .body(http_body_util::StreamBody::new(futures_util::StreamExt::boxed(stream)))
        .unwrap();
    let resp = tokio::spawn(send.send_request(req));
    tx.send(bytes::Bytes::from(vec![b'x'; 10 * 1024])).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert_eq!(seen.unwrap(), Some((1, "data")), "the first attempt gets the body while it streams");
    tx.send(bytes::Bytes::from(vec![b'y'; 10 * 1024])).await.unwrap();
    drop(tx);
    let resp = resp.await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Envoy keeps a request body for retries, up to the listener's per_connection_buffer_limit_bytes, while it streams to
/// the first attempt; a retry replays it. A bigger body is not retried (`retry_or_shadow_abandoned`): the first
/// attempt's answer passes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_bodies_are_retried_within_the_buffer_limit() {
    let (up, mut events) = attempts_upstream().await;
    let server = start(
        &yaml(&http_listener("h", 0, &retrying_routes(1), ""), &static_cluster("u", &[up])),
        Duration::from_secs(1),
    )
    .await;
    let (status, body) = post_in_two_chunks(listener_addr(&server, "h"), &mut events).await;
    assert_eq!((status, body.as_str()), (200, "attempt=2 received=20480"), "the retry got the whole body");
    assert_eq!(counter(&server, "cluster.u.upstream_rq_retry"), 1);
    assert_eq!(counter(&server, "http.h.downstream_rq_2xx"), 1);
    assert_eq!(events.recv().await, Some((2, "data")));
    // A body framed by content-length is replayed with the same framing.
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let resp = send_request(&mut c, "POST", "/1/0", b"0123456789").await;
    assert_eq!(resp.status(), 200);
    let text = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    assert_eq!(&text[..], b"attempt=2 received=10");
    while events.try_recv().is_ok() {}

    let small_buffer = http_listener("h", 0, &retrying_routes(1), "").replacen(
        "    filter_chains:",
        "    per_connection_buffer_limit_bytes: 16384\n    filter_chains:",
        1,
    );
    let server = start(&yaml(&small_buffer, &static_cluster("u", &[up])), Duration::from_secs(1)).await;
    let (status, body) = post_in_two_chunks(listener_addr(&server, "h"), &mut events).await;
    assert_eq!((status, body.as_str()), (503, "attempt=1 received=20480"), "20 KiB over a 16 KiB buffer");
    assert_eq!(counter(&server, "cluster.u.retry_or_shadow_abandoned"), 1);
    assert_eq!(counter(&server, "cluster.u.upstream_rq_retry"), 0);
}

/// A POST to the admin port, for `/healthcheck/fail` and `/healthcheck/ok`.
async fn admin_post(admin: std::net::SocketAddr, path: &str) {
    let mut c = http1_client(admin).await;
    let (status, _, body) = http1_request(&mut c, "POST", path, "admin", &[]).await;
    assert_eq!(status, 200, "{path}: {body}");
}

/// Envoy's health_check HTTP filter without pass-through mode: requests its `headers` select are answered by the
/// proxy, 200 while healthy and 503 after /healthcheck/fail; every other request goes to the router, and
/// while failed its response says `x-envoy-immediate-health-check-fail: true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_filter_answers_for_the_proxy_and_follows_healthcheck_fail() {
    let up = http_upstream("U").await;
    let hcm = http_listener("h", 0, &routes_to("u", ""), "").replace(
        "          http_filters:\n",
        r#"          http_filters:
          - name: envoy.filters.http.health_check
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
              pass_through_mode: false
              headers: [ { name: ":path", string_match: { exact: /healthz } } ]
"#,
    );
    let bootstrap = format!(
        "{}admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }} }}\n\
         node: {{ id: n1, cluster: svc-a }}\n",
        yaml(&hcm, &static_cluster("u", &[up]))
    );
    let server = start(&bootstrap, Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "h");
    let admin = server.admin_address().unwrap();
    // A fresh connection each time: /healthcheck/fail also closes connections after their next response.
    let get = async |path: &str| http1_request(&mut http1_client(addr).await, "GET", path, "x", &[]).await;

    let (status, headers, body) = get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(headers["x-envoy-upstream-healthchecked-cluster"], "svc-a", "Envoy names the node's cluster");
    assert_eq!(counter(&server, "cluster.u.upstream_rq_total"), 0, "answered by the proxy");
    let (status, headers, body) = get("/other").await;
    assert_eq!(status, 200);
    assert!(body.starts_with("U\nGET /other\n"), "{body}");
    assert!(!headers.contains_key("x-envoy-immediate-health-check-fail"));

    admin_post(admin, "/healthcheck/fail").await;
    let (status, headers, body) = get("/healthz").await;
    assert_eq!((status, body.as_str()), (503, ""));
    assert_eq!(headers["x-envoy-immediate-health-check-fail"], "true");
    assert_eq!(headers["x-envoy-upstream-healthchecked-cluster"], "svc-a");
    let (status, headers, _) = get("/other").await;
    assert_eq!(status, 200, "other requests still pass through");
    assert_eq!(headers["x-envoy-immediate-health-check-fail"], "true");

    admin_post(admin, "/healthcheck/ok").await;
    let (status, _, _) = get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(counter(&server, "cluster.u.upstream_rq_total"), 2);
}

#[test]
fn health_check_filter_config_errors_name_the_field() {
    let with = |config: &str| {
        let yaml = unlisted(&http_listener("h", 0, &routes_to("u", ""), "").replace(
            "          http_filters:\n",
            &format!(
                "          http_filters:\n          - name: hc\n            typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck, {config} }}\n"
            ),
        ));
        listener_error(&yaml)
    };
    let err = with("headers: [ { name: x-hc, present_match: true } ]");
    assert!(err.contains("http_filters[0].typed_config.pass_through_mode: pass_through_mode is required"), "{err}");
    let err = with("pass_through_mode: false, cluster_min_healthy_percentages: { u: { value: 150 } }");
    assert!(err.contains("typed_config.cluster_min_healthy_percentages.u: must be between 0 and 100"), "{err}");
    assert_eq!(with("pass_through_mode: true, cache_time: 1s"), "");
    assert_eq!(with("pass_through_mode: false, cluster_min_healthy_percentages: { u: { value: 50 } }"), "");
}

/// The listener with `envoy.filters.http.<name>` (typed config `envoy.extensions.filters.http.<type>`, empty)
/// first in its HTTP filters, as Istio sends fault and CORS.
fn with_empty_http_filter(listener: String, name: &str, type_name: &str) -> String {
    listener.replace(
        "          http_filters:\n",
        &format!(
            "          http_filters:\n          - name: envoy.filters.http.{name}\n            typed_config: {{ \"@type\": \
             type.googleapis.com/envoy.extensions.filters.http.{type_name} }}\n"
        ),
    )
}

/// An HCM listener whose health check filter has this config (the inside of its typed_config).
fn health_checked_listener(name: &str, cluster: &str, config: &str) -> String {
    http_listener(name, 0, &routes_to(cluster, ""), "").replace(
        "          http_filters:\n",
        &format!(
            "          http_filters:\n          - name: envoy.filters.http.health_check\n            typed_config:\n              \
             \"@type\": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck\n              \
             {config}\n"
        ),
    )
}

/// Envoy's pass-through mode: health checks go to the upstream, whose answer is cached for `cache_time` and served
/// from the cache meanwhile; while the proxy is failed (/healthcheck/fail) it answers 503 itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_pass_through_caches_the_upstreams_answer() {
    let up = http_upstream("U").await;
    let hc = "pass_through_mode: true\n              cache_time: 2s\n              \
              headers: [ { name: x-hc, present_match: true } ]";
    let bootstrap = format!(
        "{}admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }} }}\n\
         node: {{ id: n1, cluster: svc-b }}\n",
        yaml(&health_checked_listener("h", "u", hc), &static_cluster("u", &[up]))
    );
    let server = start(&bootstrap, Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "h");
    let get = async |path: &str| http1_request(&mut http1_client(addr).await, "GET", path, "x", &[("x-hc", "1")]).await;

    let (status, headers, body) = get("/status/503").await;
    assert_eq!(status, 503, "passed through: {body}");
    assert_eq!(headers["x-envoy-upstream-healthchecked-cluster"], "svc-b");
    assert_eq!(counter(&server, "cluster.u.upstream_rq_total"), 1);
    let (status, _, _) = get("/status/200").await;
    assert_eq!(status, 503, "the cached answer");
    assert_eq!(counter(&server, "cluster.u.upstream_rq_total"), 1);
    assert_eq!(counter(&server, "http.h.health_check.cached_response"), 1);

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _, _) = get("/status/200").await;
    assert_eq!(status, 200, "the cache expired: passed through again");
    assert_eq!(counter(&server, "cluster.u.upstream_rq_total"), 2);

    admin_post(server.admin_address().unwrap(), "/healthcheck/fail").await;
    let (status, headers, _) = get("/status/200").await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-envoy-immediate-health-check-fail"], "true");
    assert_eq!(counter(&server, "cluster.u.upstream_rq_total"), 2, "a failed proxy answers itself");
    assert_eq!(counter(&server, "http.h.health_check.request_total"), 4);
    assert_eq!(counter(&server, "http.h.health_check.failed"), 2, "the cached 503 and the failed proxy's");
}

/// Envoy's `cluster_min_healthy_percentages`: the proxy answers 503 while a listed cluster has fewer hosts in service
/// than its minimum (an outlier-ejected host is out of service), or does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_follows_cluster_min_healthy_percentages() {
    let cluster =
        flaky_and_good_cluster("consecutive_5xx: 2, interval: 10s, base_ejection_time: 30s, max_ejection_percent: 50")
            .await;
    let hc = |min: &str| {
        format!(
            "pass_through_mode: false\n              cluster_min_healthy_percentages: {min}\n              \
             headers: [ {{ name: \":path\", string_match: {{ exact: /healthz }} }} ]"
        )
    };
    let listeners = format!(
        "{}{}",
        health_checked_listener("h", "u", &hc("{ u: { value: 60 } }")),
        health_checked_listener("m", "u", &hc("{ missing: { value: 10 } }"))
    );
    let server = start(&yaml(&listeners, &cluster), Duration::from_secs(1)).await;
    let h = listener_addr(&server, "h");
    let m = listener_addr(&server, "m");
    let get = async |addr, path: &str| http1_request(&mut http1_client(addr).await, "GET", path, "x", &[]).await.0;

    assert_eq!(get(h, "/healthz").await, 200, "2 of 2 hosts in service");
    assert_eq!(get(m, "/healthz").await, 503);
    assert_eq!(counter(&server, "http.m.health_check.failed_cluster_not_found"), 1);

    assert_eq!(requests_until_503s(&mut http1_client(h).await, 2, 6).await, 2);
    assert_eq!(gauge(&server, "cluster.u.outlier_detection.ejections_active"), 1);
    assert_eq!(get(h, "/healthz").await, 503, "1 of 2 hosts in service is under 60%");
    assert_eq!(counter(&server, "http.h.health_check.failed_cluster_unhealthy"), 1);
    assert_eq!(counter(&server, "http.h.health_check.ok"), 1);
}

/// Sends `GET path` (host `x`) and returns the response as soon as its head arrives, its body still to read.
async fn get_response(
    c: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    path: &str,
) -> hyper::Response<hyper::body::Incoming> {
    send_request(c, "GET", path, b"").await
}

/// Sends `method path` (host `x`) with `body`, and returns the response as soon as its head arrives.
async fn send_request(
    c: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    method: &str,
    path: &str,
    body: &'static [u8],
) -> hyper::Response<hyper::body::Incoming> {
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "x")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(body)))
        .unwrap();
    c.send_request(req).await.unwrap()
}

/// Cluster `u`: a host that always answers 503 and one that answers 200, with this `outlier_detection`.
async fn flaky_and_good_cluster(outlier: &str) -> String {
    let bad = flaky_upstream(usize::MAX).await;
    let good = http_upstream("G").await;
    format!("{}\n    outlier_detection: {{ {outlier} }}", static_cluster("u", &[bad, good]))
}

/// Sends at most `tries` requests, stopping once `wanted` of them were answered 503; returns how many were.
async fn requests_until_503s(
    c: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    wanted: usize,
    tries: usize,
) -> usize {
    let mut failures = 0;
    for _ in 0..tries {
        if http1_request(c, "GET", "/", "x", &[]).await.0 == 503 {
            failures += 1;
        }
        if failures == wanted {
            break;
        }
    }
    failures
}

/// Envoy's consecutive_5xx outlier detection: a host that answers 5xx that many times in a row leaves load balancing
/// for base_ejection_time (one host of two is 50% of the cluster, so max_ejection_percent must allow it), and returns
/// on the detector's interval timer once that time is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_ejects_the_host_until_its_ejection_time_is_over() {
    let cluster =
        flaky_and_good_cluster("consecutive_5xx: 3, interval: 0.2s, base_ejection_time: 1s, max_ejection_percent: 50")
            .await;
    let server = start(&yaml(&http_listener("h", 0, &routes_to("u", ""), ""), &cluster), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    assert_eq!(requests_until_503s(&mut c, 3, 10).await, 3);
    assert_eq!(counter(&server, "cluster.u.outlier_detection.ejections_enforced_consecutive_5xx"), 1);
    assert_eq!(counter(&server, "cluster.u.outlier_detection.ejections_detected_consecutive_5xx"), 1);
    assert_eq!(counter(&server, "cluster.u.outlier_detection.ejections_enforced_total"), 1);
    assert_eq!(gauge(&server, "cluster.u.outlier_detection.ejections_active"), 1);
    for _ in 0..4 {
        let (status, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
        assert_eq!(status, 200, "the ejected host gets no request: {body}");
    }

    eventually("the host returned to service", Duration::from_secs(5), async || {
        gauge(&server, "cluster.u.outlier_detection.ejections_active") == 0
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(http1_request(&mut c, "GET", "/", "x", &[]).await.0);
    }
    assert!(statuses.contains(&503), "back in the rotation: {statuses:?}");
}

/// Envoy's panic mode over hosts the control plane marks unhealthy: with 1 of 3 hosts healthy (under the default
/// 50%), requests reach all three; with `healthy_panic_threshold` 0 only the healthy one; when none is healthy,
/// none at all ("no healthy upstream").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_sends_traffic_to_unhealthy_endpoints_below_the_threshold() {
    let ups = [http_upstream("A").await, http_upstream("B").await, http_upstream("C").await];
    let cluster = |name: &str, statuses: [&str; 3], threshold: &str| {
        let mut eps = String::new();
        for (up, status) in ups.iter().zip(statuses) {
            eps.push_str(&format!(
                "\n        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}\n          \
                 health_status: {status}",
                up.ip(),
                up.port()
            ));
        }
        format!(
            "\n  - name: {name}\n    type: STATIC\n    connect_timeout: 1s{threshold}\n    load_assignment:\n      \
             cluster_name: {name}\n      endpoints:\n      - lb_endpoints:{eps}"
        )
    };
    let off = "\n    common_lb_config: { healthy_panic_threshold: { value: 0 } }";
    let clusters = [
        cluster("panic", ["HEALTHY", "UNHEALTHY", "UNHEALTHY"], ""),
        cluster("strict", ["HEALTHY", "UNHEALTHY", "UNHEALTHY"], off),
        cluster("none", ["UNHEALTHY", "DRAINING", "TIMEOUT"], off),
    ]
    .concat();
    let listeners = format!(
        "{}{}{}",
        http_listener("panic", 0, &routes_to("panic", ""), ""),
        http_listener("strict", 0, &routes_to("strict", ""), ""),
        http_listener("none", 0, &routes_to("none", ""), ""),
    );
    let server = start(&yaml(&listeners, &clusters), Duration::from_secs(1)).await;
    let served = async |listener: &str| {
        let mut c = http1_client(listener_addr(&server, listener)).await;
        let mut tags = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let (status, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
            tags.insert(if status == 200 { body.lines().next().unwrap_or("").to_string() } else { body });
        }
        tags
    };
    assert_eq!(served("panic").await, ["A", "B", "C"].map(String::from).into());
    assert_eq!(served("strict").await, ["A"].map(String::from).into());
    assert_eq!(served("none").await, ["no healthy upstream"].map(String::from).into());
    assert_eq!(gauge(&server, "cluster.panic.membership_healthy"), 1, "panic mode does not make hosts healthy");
}

/// What Istio sends for a DestinationRule with `consecutiveGatewayErrors: 2` and `minHealthPercent` unset: gateway
/// errors eject, and with `healthy_panic_threshold` 0 a cluster whose every host is ejected has no host at all
/// (Envoy's 503 "no healthy upstream") instead of panicking back onto the failing hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_gateway_errors_eject_and_panic_threshold_zero_leaves_no_host() {
    let bad = flaky_upstream(usize::MAX).await;
    let cluster = format!(
        "{}\n    outlier_detection: {{ consecutive_gateway_failure: 2, enforcing_consecutive_gateway_failure: 100, \
         enforcing_consecutive_5xx: 0, enforcing_success_rate: 0, interval: 10s, base_ejection_time: 30s, \
         max_ejection_percent: 100 }}\n    common_lb_config: {{ healthy_panic_threshold: {{}} }}",
        static_cluster("u", &[bad])
    );
    let server = start(&yaml(&http_listener("h", 0, &routes_to("u", ""), ""), &cluster), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    for _ in 0..2 {
        let (status, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
        assert_eq!((status, body.starts_with("attempt")), (503, true), "the host's own 503: {body}");
    }
    assert_eq!(counter(&server, "cluster.u.outlier_detection.ejections_enforced_consecutive_gateway_failure"), 1);
    assert_eq!(counter(&server, "cluster.u.outlier_detection.ejections_detected_consecutive_5xx"), 0);
    let (status, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert_eq!((status, body.as_str()), (503, "no healthy upstream"));
    assert_eq!(counter(&server, "cluster.u.upstream_rq_total"), 2, "the ejected host got nothing more");
}

/// A STATIC cluster `u` with `p0` at priority 0 and `p1` at priority 1 (Istio's locality failover shape), with
/// `extra` cluster fields.
fn two_priority_cluster(p0: std::net::SocketAddr, p1: std::net::SocketAddr, extra: &str) -> String {
    let ep = |a: std::net::SocketAddr| {
        format!(
            "{{ endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }} }}",
            a.ip(),
            a.port()
        )
    };
    format!(
        r#"
  - name: u
    type: STATIC
    connect_timeout: 1s{extra}
    load_assignment:
      cluster_name: u
      endpoints:
      - {{ priority: 0, lb_endpoints: [ {} ] }}
      - {{ priority: 1, lb_endpoints: [ {} ] }}"#,
        ep(p0),
        ep(p1)
    )
}

/// Istio's locality failover: endpoints by priority (same zone first) with outlier detection and panic threshold
/// 0. Once the only P0 host is ejected, Envoy's priority load sends everything to P1 instead of answering "no
/// healthy upstream".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejecting_the_local_priority_fails_over_to_the_next() {
    let bad = flaky_upstream(usize::MAX).await;
    let good = http_upstream("G").await;
    let cluster = two_priority_cluster(
        bad,
        good,
        "\n    outlier_detection: { consecutive_gateway_failure: 2, enforcing_consecutive_gateway_failure: 100, \
         interval: 10s, base_ejection_time: 30s, max_ejection_percent: 100 }\n    common_lb_config: { \
         healthy_panic_threshold: {} }",
    );
    let server = start(&yaml(&http_listener("h", 0, &routes_to("u", ""), ""), &cluster), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    for _ in 0..2 {
        let (status, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
        assert_eq!((status, body.starts_with("attempt")), (503, true), "P0 takes everything while healthy: {body}");
    }
    assert_eq!(counter(&server, "cluster.u.outlier_detection.ejections_enforced_consecutive_gateway_failure"), 1);
    for _ in 0..5 {
        let (status, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
        assert_eq!(status, 200, "P1 serves once P0 is ejected: {body}");
        assert!(body.starts_with("G\n"), "{body}");
    }
}

/// Envoy's failure-percentage detector works on the interval sweep: a host whose share of 5xx over the last interval
/// reaches the threshold is ejected, though its failures never came consecutive_5xx in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_percentage_ejects_at_the_interval_sweep() {
    let cluster = flaky_and_good_cluster(
        "consecutive_5xx: 1000, enforcing_failure_percentage: 100, failure_percentage_threshold: 90, \
         failure_percentage_minimum_hosts: 2, failure_percentage_request_volume: 5, interval: 0.5s, \
         base_ejection_time: 30s, max_ejection_percent: 50",
    )
    .await;
    let server = start(&yaml(&http_listener("h", 0, &routes_to("u", ""), ""), &cluster), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let mut failures = 0;
    for _ in 0..40 {
        failures += usize::from(http1_request(&mut c, "GET", "/", "x", &[]).await.0 == 503);
    }
    assert!(failures >= 10, "round robin reached the failing host: {failures} of 40");
    eventually("the sweep ejected the failing host", Duration::from_secs(5), async || {
        gauge(&server, "cluster.u.outlier_detection.ejections_active") == 1
    })
    .await;
    assert_eq!(counter(&server, "cluster.u.outlier_detection.ejections_enforced_failure_percentage"), 1);
    assert_eq!(counter(&server, "cluster.u.outlier_detection.ejections_enforced_consecutive_5xx"), 0);
    for _ in 0..4 {
        assert_eq!(http1_request(&mut c, "GET", "/", "x", &[]).await.0, 200);
    }
}

/// For a request with a body, Envoy's per-try timeout ends one attempt (retried) and the route timeout, counted once
/// from the end of the request, ends them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeouts_retry_a_request_with_a_body_until_the_route_timeout() {
    let (up, _events) = attempts_upstream().await;
    let routes = r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              include_request_attempt_count: true
              routes:
              - match: { prefix: "/" }
                route:
                  cluster: u
                  timeout: 1s
                  retry_policy: { retry_on: 5xx, num_retries: 10, per_try_timeout: 0.3s, retry_back_off: { base_interval: 0.01s } }"#;
    let server =
        start(&yaml(&http_listener("h", 0, routes, ""), &static_cluster("u", &[up])), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let resp = send_request(&mut c, "POST", "/0/5000", b"payload").await;
    assert_eq!(resp.status(), 504);
    assert_eq!(counter(&server, "cluster.u.upstream_rq_timeout"), 1);
    let per_try = counter(&server, "cluster.u.upstream_rq_per_try_timeout");
    assert!((2..=4).contains(&per_try), "attempts cut by the per-try timeout, then the route's: {per_try}");
    assert_eq!(counter(&server, "cluster.u.upstream_rq_retry"), per_try);
}

/// Envoy's reset counters: a downstream that goes away before its response is complete is a stream reset received
/// (`downstream_rq_rx_reset`) and the upstream request still in flight is reset by us (`upstream_rq_tx_reset`),
/// whether the response had not begun or was streaming; a route timeout resets only the upstream request, and a
/// completed exchange counts neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_are_counted_by_side_with_envoys_names() {
    use http_body_util::BodyExt;
    let up = http_upstream("U").await;
    let routes = routes_to("u", "").replace("cluster: u", "cluster: u, timeout: 0.2s");
    let server =
        start(&yaml(&http_listener("h", 0, &routes, ""), &static_cluster("u", &[up])), Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "h");
    let resets = || {
        (
            counter(&server, "http.h.downstream_rq_rx_reset"),
            counter(&server, "http.h.downstream_rq_tx_reset"),
            counter(&server, "cluster.u.upstream_rq_tx_reset"),
        )
    };

    let mut c = http1_client(addr).await;
    assert_eq!(http1_request(&mut c, "GET", "/", "x", &[]).await.0, 200);
    assert_eq!(resets(), (0, 0, 0), "a completed exchange is no reset");

    // Route timeout (0.2 s) against a 2 s answer: 504, the upstream request reset by us.
    assert_eq!(http1_request(&mut c, "GET", "/sleep/2000", "x", &[]).await.0, 504);
    assert_eq!(resets(), (0, 0, 1));

    // Gone before the response began: the raw client writes a request and closes.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"GET /sleep/3000 HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    eventually("the request reached the upstream", Duration::from_secs(5), async || {
        counter(&server, "cluster.u.upstream_rq_total") == 3
    })
    .await;
    drop(raw);
    eventually("the abandoned request counted", Duration::from_secs(5), async || resets() == (1, 0, 2)).await;

    // Gone while the response streams: headers and a first chunk arrive, then the client closes.
    let mut d = http1_client(addr).await;
    let resp = get_response(&mut d, "/drip/2000").await;
    let mut body = resp.into_body();
    assert_eq!(&body.frame().await.unwrap().unwrap().into_data().unwrap()[..], b"a");
    drop(body);
    drop(d);
    eventually("the abandoned response counted", Duration::from_secs(5), async || resets() == (2, 0, 3)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(resets(), (2, 0, 3), "counted once each");
}

/// Istio's fault injection: the HCM carries an empty `envoy.filters.http.fault` and each route that injects faults
/// carries its own `HTTPFault` in `typed_per_filter_config`, which replaces the filter's: an abort answers with its
/// status and Envoy's body without reaching the upstream (a gRPC abort as a trailers-only gRPC answer), a delay
/// holds the request, and a route with none passes untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_from_route_configs_as_istio_sends_it() {
    let up = http_upstream("U").await;
    let fault = |config: &str| {
        format!(
            "\n                typed_per_filter_config:\n                  envoy.filters.http.fault:\n                    \
             \"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault\n                    {config}"
        )
    };
    let routes = format!(
        r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/abort" }}
                route: {{ cluster: u }}{}
              - match: {{ prefix: "/grpc" }}
                route: {{ cluster: u }}{}
              - match: {{ prefix: "/delay" }}
                route: {{ cluster: u }}{}
              - match: {{ prefix: "/bytes" }}
                route: {{ cluster: u }}{}
              - match: {{ prefix: "/" }}
                route: {{ cluster: u }}"#,
        fault("abort: { http_status: 418, percentage: { numerator: 100 } }"),
        fault("abort: { grpc_status: 14, percentage: { numerator: 100 } }"),
        fault("delay: { fixed_delay: 1s, percentage: { numerator: 100 } }"),
        fault("response_rate_limit: { header_limit: {}, percentage: { numerator: 100 } }"),
    );
    let listener = with_empty_http_filter(http_listener("h", 0, &routes, ""), "fault", "fault.v3.HTTPFault");
    let server = start(&yaml(&listener, &static_cluster("u", &[up])), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;

    let (status, _, body) = http1_request(&mut c, "GET", "/abort", "x", &[]).await;
    assert_eq!((status, body.as_str()), (418, "fault filter abort"));
    let (status, headers, _) = http1_request(&mut c, "GET", "/grpc", "x", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "14");
    assert_eq!(headers["content-type"], "application/grpc");
    assert_eq!(counter(&server, "cluster.u.upstream_rq_total"), 0, "aborted before the router");

    // response_rate_limit from x-envoy-fault-throttle-response (KiB/s): Envoy's token bucket sends 1/16 of the limit
    // at once and 1/16 more every 62.5 ms, so 32 KiB at 16 KiB/s takes 31 refills (1.94 s).
    let t = std::time::Instant::now();
    let throttled = [("x-envoy-fault-throttle-response", "16")];
    let (status, _, body) = http1_request(&mut c, "GET", "/bytes/32768", "x", &throttled).await;
    assert_eq!((status, body.len()), (200, 32768));
    assert!(t.elapsed() >= Duration::from_millis(1800), "throttled to 16 KiB/s: {:?}", t.elapsed());
    assert_eq!(counter(&server, "http.h.fault.response_rl_injected"), 1);
    let t = std::time::Instant::now();
    let (_, _, body) = http1_request(&mut c, "GET", "/bytes/32768", "x", &[]).await;
    assert_eq!(body.len(), 32768);
    assert!(t.elapsed() < Duration::from_millis(1500), "no header, no limit: {:?}", t.elapsed());
    assert_eq!(counter(&server, "http.h.fault.response_rl_injected"), 1);

    let t = std::time::Instant::now();
    let (status, _, body) = http1_request(&mut c, "GET", "/delay", "x", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(t.elapsed() >= Duration::from_millis(990), "delayed {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let (status, _, body) = http1_request(&mut c, "GET", "/plain", "x", &[]).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("U\nGET /plain\n"), "{body}");
    assert!(t.elapsed() < Duration::from_millis(990), "no fault on this route");

    assert_eq!(counter(&server, "http.h.fault.aborts_injected"), 2);
    assert_eq!(counter(&server, "http.h.fault.delays_injected"), 1);
    assert_eq!(gauge(&server, "http.h.fault.active_faults"), 0);
    assert_eq!(counter(&server, "cluster.u.upstream_rq_total"), 4);
}

/// A per-route config for a filter that reads none is refused with its path, as is one of the fault filter's fields
/// we do not implement.
#[test]
fn per_route_filter_configs_other_than_fault_and_cors_are_refused() {
    let rc = |per_filter: &str| {
        format!(
            "name: r\nvirtual_hosts:\n- name: v\n  domains: ['*']\n  routes:\n  - match: {{ prefix: / }}\n    \
             route: {{ cluster: u }}\n    typed_per_filter_config:\n{per_filter}"
        )
    };
    let build = |yaml: &str| {
        let msg = xds_proxy::config::proto::parse_dynamic(
            yaml,
            xds_proxy::config::proto::Format::Yaml,
            "envoy.config.route.v3.RouteConfiguration",
        )
        .unwrap();
        let rc: envoy_types::pb::envoy::config::route::v3::RouteConfiguration =
            xds_proxy::config::proto::decode(&msg).unwrap();
        xds_proxy::network::http::route::RouteTable::new(&rc).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let err = build(&rc(
        "      envoy.filters.http.router:\n        \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n",
    ));
    assert!(
        err.contains(
            "virtual_hosts[0].routes[0].typed_per_filter_config[\"envoy.filters.http.router\"]: per-route config for \
             envoy.extensions.filters.http.router.v3.Router is not supported"
        ),
        "{err}"
    );
    let err = build(&rc(
        "      envoy.filters.http.fault:\n        \"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault\n        filter_metadata: {}\n",
    ));
    assert!(
        err.contains(
            "typed_per_filter_config[\"envoy.filters.http.fault\"].filter_metadata: filter_metadata is not supported"
        ),
        "{err}"
    );
    let ok = build(&rc(
        "      envoy.filters.http.fault:\n        \"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig\n        disabled: true\n",
    ));
    assert_eq!(ok, "");
    let cors = build(&rc("      envoy.filters.http.cors:\n        \"@type\": \
                          type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy\n        \
                          allow_origin_string_match: [ { exact: '*' } ]\n"));
    assert_eq!(cors, "", "a CORS policy per route is read");
}

/// Istio 1.14's CORS: the HCM carries an empty `envoy.filters.http.cors` and a VirtualService's corsPolicy arrives as
/// the route's `cors`. A preflight from an allowed origin is answered by the proxy with the policy's headers; a
/// request from an allowed origin goes upstream and its response says which origin may read it; another origin's
/// requests, preflights included, pass untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_policies_answer_preflights_and_mark_allowed_origins() {
    let up = http_upstream("U").await;
    let routes = routes_to(
        "u",
        ", cors: { allow_origin_string_match: [ { exact: 'https://app.example' } ], allow_methods: 'GET,PUT', \
         allow_headers: x-token, expose_headers: x-trace, max_age: '300', allow_credentials: true }",
    );
    let listener = with_empty_http_filter(http_listener("h", 0, &routes, ""), "cors", "cors.v3.Cors");
    let server = start(&yaml(&listener, &static_cluster("u", &[up])), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;

    let preflight = [("origin", "https://app.example"), ("access-control-request-method", "PUT")];
    let (status, headers, body) = http1_request(&mut c, "OPTIONS", "/doc", "x", &preflight).await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(headers["access-control-allow-origin"], "https://app.example");
    assert_eq!(headers["access-control-allow-methods"], "GET,PUT");
    assert_eq!(headers["access-control-allow-headers"], "x-token");
    assert_eq!(headers["access-control-max-age"], "300");
    assert_eq!(headers["access-control-allow-credentials"], "true");
    assert_eq!(counter(&server, "cluster.u.upstream_rq_total"), 0, "answered by the proxy");

    let (status, headers, body) = http1_request(&mut c, "GET", "/doc", "x", &[("origin", "https://app.example")]).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("U\nGET /doc\n"), "{body}");
    assert_eq!(headers["access-control-allow-origin"], "https://app.example");
    assert_eq!(headers["access-control-expose-headers"], "x-trace");

    let (status, headers, _) = http1_request(&mut c, "GET", "/doc", "x", &[("origin", "https://evil.example")]).await;
    assert_eq!(status, 200);
    assert!(!headers.contains_key("access-control-allow-origin"));
    let evil_preflight = [("origin", "https://evil.example"), ("access-control-request-method", "PUT")];
    let (status, headers, body) = http1_request(&mut c, "OPTIONS", "/doc", "x", &evil_preflight).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("U\nOPTIONS /doc\n"), "a preflight from another origin goes upstream: {body}");
    assert!(!headers.contains_key("access-control-allow-origin"));
    assert_eq!(counter(&server, "http.h.cors.origin_valid"), 2);
    assert_eq!(counter(&server, "http.h.cors.origin_invalid"), 2);
}

/// Envoy's consistent hashing, as Istio's DestinationRule `consistentHash` sets it up: a RING_HASH (or MAGLEV) cluster
/// and the route's `hash_policy`. Every request of a user goes to the same host, users spread over the hosts, and a
/// request without the header is balanced at random.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_and_maglev_send_each_user_to_one_host() {
    let hosts = [http_upstream("A").await, http_upstream("B").await, http_upstream("C").await];
    for policy in ["RING_HASH", "MAGLEV"] {
        let cluster = format!("{}\n    lb_policy: {policy}", static_cluster("u", &hosts));
        let routes = routes_to("u", ", hash_policy: [ { header: { header_name: x-user } } ]");
        let server = start(&yaml(&http_listener("h", 0, &routes, ""), &cluster), Duration::from_secs(1)).await;
        let mut c = http1_client(listener_addr(&server, "h")).await;
        let mut seen = std::collections::BTreeSet::new();
        for user in 0..24 {
            let user = format!("user-{user}");
            let mut tags = std::collections::BTreeSet::new();
            for _ in 0..3 {
                let (status, _, body) = http1_request(&mut c, "GET", "/", "x", &[("x-user", user.as_str())]).await;
                assert_eq!(status, 200);
                tags.insert(body.lines().next().unwrap_or_default().to_string());
            }
            assert_eq!(tags.len(), 1, "{policy}: {user} went to {tags:?}");
            seen.extend(tags);
        }
        assert!(seen.len() >= 2, "{policy}: 24 users all went to {seen:?}");
        let mut anonymous = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let (_, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
            anonymous.insert(body.lines().next().unwrap_or_default().to_string());
        }
        assert!(anonymous.len() >= 2, "{policy}: no hash means random hosts, got {anonymous:?}");
    }
}

/// Routes shared by the header-sanitizing tests: `/echo` and `/sleep/<ms>` to the echoing upstream (the latter with a
/// 5 s route timeout), `/nt/<ms>` to its `/sleep/<ms>` under Envoy's "new timeouts" (a route max_stream_duration, so
/// the route's own 0.2 s timeout is not read), everything else to `attempts_upstream`.
fn sanitizing_routes() -> &'static str {
    r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              include_request_attempt_count: true
              routes:
              - match: { prefix: "/echo" }
                route: { cluster: echo }
              - match: { prefix: "/sleep/" }
                route: { cluster: echo, timeout: 5s }
              - match: { prefix: "/nt/" }
                route:
                  cluster: echo
                  prefix_rewrite: "/sleep/"
                  timeout: 0.2s
                  max_stream_duration: { max_stream_duration: 0s }
              - match: { prefix: "/" }
                route: { cluster: tries }"#
}

/// Envoy's header sanitizing (`mutateRequestHeaders`) and the router's request headers. Listener `int` trusts
/// loopback clients (internal_address_config), `ext` trusts nobody (the default since Envoy 1.33), `xff` takes the
/// client from x-forwarded-for (use_remote_address false).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_envoy_request_headers_are_honoured_from_internal_clients_only() {
    let echo = http_upstream("E").await;
    let (tries, _events) = attempts_upstream().await;
    let internal =
        "\n          internal_address_config: { cidr_ranges: [ { address_prefix: 127.0.0.0, prefix_len: 8 } ] }";
    let listeners = format!(
        "{}{}{}",
        http_listener("int", 0, sanitizing_routes(), &format!("\n          use_remote_address: true{internal}")),
        http_listener("ext", 0, sanitizing_routes(), "\n          use_remote_address: true"),
        http_listener(
            "xff",
            0,
            sanitizing_routes(),
            "\n          internal_address_config: { cidr_ranges: [ { address_prefix: 10.0.0.0, prefix_len: 8 } ] }"
        ),
    );
    let clusters = format!("{}{}", static_cluster("echo", &[echo]), static_cluster("tries", &[tries]));
    let server = start(&yaml(&listeners, &clusters), Duration::from_secs(1)).await;
    let claims = [
        ("x-envoy-internal", "false"),
        ("x-envoy-retry-on", "5xx"),
        ("x-envoy-upstream-rq-timeout-ms", "4000"),
        ("x-envoy-decorator-operation", "op"),
        ("x-request-id", "abc"),
    ];

    // Internal: the proxy says so, keeps what only internal requests may carry, and consumes its own headers.
    let mut c = http1_client(listener_addr(&server, "int")).await;
    let (status, _, body) = http1_request(&mut c, "GET", "/echo", "x", &claims).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("x-envoy-internal=true\n"), "{body}");
    assert!(body.contains("x-envoy-decorator-operation=op\n") && body.contains("x-request-id=abc\n"), "{body}");
    assert!(body.contains("x-envoy-expected-rq-timeout-ms=4000\n"), "the header's timeout is the route's: {body}");
    assert!(!body.contains("x-envoy-retry-on") && !body.contains("x-envoy-upstream-rq-timeout-ms"), "{body}");
    assert!(!body.contains("x-envoy-external-address"), "{body}");

    let began = std::time::Instant::now();
    let (status, _, body) =
        http1_request(&mut c, "GET", "/sleep/2000", "x", &[("x-envoy-upstream-rq-timeout-ms", "200")]).await;
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
    assert!(began.elapsed() < Duration::from_millis(1500), "{:?}", began.elapsed());
    let alt = [("x-envoy-upstream-rq-timeout-ms", "200"), ("x-envoy-upstream-rq-timeout-alt-response", "")];
    let (status, _, body) = http1_request(&mut c, "GET", "/sleep/2000", "x", &alt).await;
    assert_eq!((status, body.as_str()), (204, ""), "the alternative timeout answer");

    // The route has no retry policy; the headers switch one on and say how many retries.
    let (status, _, body) = http1_request(&mut c, "GET", "/1/0", "x", &[]).await;
    assert_eq!((status, body.as_str()), (503, "attempt=1 received=0"));
    let retry = [("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "2")];
    let (status, _, body) = http1_request(&mut c, "GET", "/2/0", "x", &retry).await;
    assert_eq!((status, body.as_str()), (200, "attempt=3 received=0"));
    let codes = [("x-envoy-retry-on", "retriable-status-codes"), ("x-envoy-retriable-status-codes", "418, 503")];
    let (status, _, body) = http1_request(&mut c, "GET", "/1/0", "x", &codes).await;
    assert_eq!((status, body.as_str()), (200, "attempt=2 received=0"), "one retry by default");
    // Each try gets 200 ms; one retry, then the last try's timeout is the answer.
    let per_try = [("x-envoy-retry-on", "5xx"), ("x-envoy-upstream-rq-per-try-timeout-ms", "200")];
    let (status, _, _) = http1_request(&mut c, "GET", "/0/1000", "x", &per_try).await;
    assert_eq!(status, 504);
    assert_eq!(counter(&server, "cluster.tries.upstream_rq_per_try_timeout"), 2);

    // Under a route max_stream_duration Envoy reads no route timeout: the 0.2 s one does not cut a 0.5 s answer.
    let (status, _, body) = http1_request(&mut c, "GET", "/nt/500", "x", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("x-envoy-expected-rq-timeout-ms"), "no timeout to announce: {body}");

    // External, at the edge: nothing it claims is taken, its request id is replaced, its address is recorded.
    let mut c = http1_client(listener_addr(&server, "ext")).await;
    let (status, _, body) = http1_request(&mut c, "GET", "/echo", "x", &claims).await;
    assert_eq!(status, 200, "{body}");
    for gone in
        ["x-envoy-internal", "x-envoy-retry-on", "x-envoy-upstream-rq-timeout-ms", "x-envoy-decorator-operation"]
    {
        assert!(!body.contains(gone), "{gone} is stripped: {body}");
    }
    assert!(!body.contains("x-request-id=abc\n"), "{body}");
    assert!(body.contains("x-envoy-external-address=127.0.0.1\n"), "{body}");
    let (status, _, _) =
        http1_request(&mut c, "GET", "/sleep/600", "x", &[("x-envoy-upstream-rq-timeout-ms", "100")]).await;
    assert_eq!(status, 200, "an external request sets no timeout");
    let (status, _, _) = http1_request(&mut c, "GET", "/1/0", "x", &retry).await;
    assert_eq!(status, 503, "nor retries");

    // use_remote_address false: the client is the one address x-forwarded-for names, when there is exactly one.
    let mut c = http1_client(listener_addr(&server, "xff")).await;
    let (_, _, body) = http1_request(&mut c, "GET", "/echo", "x", &[("x-forwarded-for", "10.1.2.3")]).await;
    assert!(body.contains("x-envoy-internal=true\n"), "{body}");
    let (status, _, _) =
        http1_request(&mut c, "GET", "/2/0", "x", &[("x-forwarded-for", "10.1.2.3"), retry[0], retry[1]]).await;
    assert_eq!(status, 200);
    let chain = [("x-forwarded-for", "192.0.2.1, 10.1.2.3"), retry[0], retry[1]];
    let (status, _, _) = http1_request(&mut c, "GET", "/2/0", "x", &chain).await;
    assert_eq!(status, 503, "two addresses: external");
    let (_, _, body) = http1_request(&mut c, "GET", "/echo", "x", &[("x-envoy-retry-on", "5xx")]).await;
    assert!(!body.contains("x-envoy-internal") && !body.contains("x-envoy-retry-on"), "no XFF: external: {body}");
    assert!(!body.contains("x-envoy-external-address"), "not an edge proxy: {body}");
}

/// xff_num_trusted_hops with use_remote_address: the client is the address the trusted proxies recorded, and their
/// x-forwarded-proto stands.
#[tokio::test]
async fn xff_num_trusted_hops_names_the_client_behind_trusted_proxies() {
    let up = http_upstream("U").await;
    let server = proxy_to(up, "\n          use_remote_address: true\n          xff_num_trusted_hops: 1").await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let headers = [("x-forwarded-for", "192.0.2.7, 198.51.100.1"), ("x-forwarded-proto", "https")];
    let (_, _, body) = http1_request(&mut c, "GET", "/", "x", &headers).await;
    assert!(body.contains("x-envoy-external-address=198.51.100.1\n"), "{body}");
    assert!(body.contains("x-forwarded-for=192.0.2.7, 198.51.100.1,127.0.0.1\n"), "{body}");
    assert!(body.contains("x-forwarded-proto=https\n"), "{body}");
    let (_, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert!(body.contains("x-envoy-external-address=127.0.0.1\n"), "no XFF: the peer: {body}");
    assert!(body.contains("x-forwarded-proto=http\n"), "{body}");
}

#[test]
fn internal_address_config_errors_name_the_field() {
    let with = |config: &str| {
        let yaml = unlisted(&http_listener(
            "h",
            0,
            &routes_to("u", ""),
            &format!("\n          internal_address_config: {config}"),
        ));
        listener_error(&yaml)
    };
    assert_eq!(
        with(
            "{ cidr_ranges: [ { address_prefix: 10.0.0.0, prefix_len: 8 }, { address_prefix: \"fd00::\", prefix_len: 8 } ] }"
        ),
        ""
    );
    let err = with("{ cidr_ranges: [ { address_prefix: ten, prefix_len: 8 } ] }");
    assert!(err.contains("internal_address_config.cidr_ranges[0].address_prefix: malformed IP address"), "{err}");
    let err = with("{ unix_sockets: true }");
    assert!(err.contains("internal_address_config.unix_sockets"), "{err}");
}

/// Istio's `consistentHash.httpCookie` (a cookie hash policy with a ttl): a client without the cookie gets one made
/// up from its connection, in a Set-Cookie on the upstream's answer, and with it keeps going to the same host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_hash_policy_with_a_ttl_makes_clients_sticky() {
    let hosts = [http_upstream("A").await, http_upstream("B").await, http_upstream("C").await];
    let cluster = format!("{}\n    lb_policy: RING_HASH", static_cluster("u", &hosts));
    let routes = routes_to("u", ", hash_policy: [ { cookie: { name: sticky, ttl: 60s, path: / } } ]");
    let server = start(&yaml(&http_listener("h", 0, &routes, ""), &cluster), Duration::from_secs(1)).await;
    let mut hosts_seen = std::collections::BTreeSet::new();
    let mut cookies = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let mut c = http1_client(listener_addr(&server, "h")).await;
        let (status, headers, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
        assert_eq!(status, 200);
        let first = body.lines().next().unwrap_or_default().to_string();
        let set = headers["set-cookie"].to_str().unwrap().to_string();
        let value = set.strip_prefix("sticky=\"").and_then(|v| v.split_once('"')).map(|(v, _)| v.to_string());
        let value = value.unwrap_or_else(|| panic!("{set}"));
        assert!(set.ends_with("\"; Max-Age=60; Path=/; HttpOnly"), "{set}");
        assert_eq!(value.len(), 16, "{set}");
        let jar = format!("sticky=\"{value}\"");
        for _ in 0..3 {
            let mut other = http1_client(listener_addr(&server, "h")).await;
            let (_, headers, body) = http1_request(&mut other, "GET", "/", "x", &[("cookie", jar.as_str())]).await;
            assert_eq!(body.lines().next().unwrap_or_default(), first, "the cookie keeps its host");
            assert!(!headers.contains_key("set-cookie"), "a client with the cookie gets no new one");
        }
        hosts_seen.insert(first);
        cookies.insert(value);
    }
    assert_eq!(cookies.len(), 12, "each connection gets its own cookie");
    assert!(hosts_seen.len() >= 2, "12 clients all went to {hosts_seen:?}");
}

/// An upstream that reports each request it gets as "METHOD path host body" and answers 200 after `delay`.
async fn recording_upstream(delay: Duration) -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use http_body_util::BodyExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let line = format!(
                            "{} {} {}",
                            req.method(),
                            req.uri().path(),
                            req.headers().get("host").map(|h| h.to_str().unwrap().to_string()).unwrap_or_default()
                        );
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let _ = tx.send(format!("{line} {}", String::from_utf8_lossy(&body)));
                        tokio::time::sleep(delay).await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"shadowed"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// Istio's `mirror` (Envoy's request_mirror_policies): the shadow cluster gets a copy of each request, body included,
/// with `-shadow` on its host, once the request is complete; the client gets the primary's answer without waiting
/// for the shadow's; runtime_fraction picks the share mirrored; a policy's cluster_header naming no cluster sends
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_mirror_policies_send_a_copy_to_the_shadow_cluster() {
    let up = http_upstream("U").await;
    let (shadow, mut seen) = recording_upstream(Duration::from_secs(2)).await;
    let routes = r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              request_mirror_policies: [ { cluster: shadow, disable_shadow_host_suffix_append: true } ]
              routes:
              - match: { prefix: "/none" }
                route:
                  cluster: u
                  request_mirror_policies:
                  - { cluster: shadow, runtime_fraction: { default_value: { numerator: 0 } } }
                  - { cluster_header: x-mirror-to }
              - match: { prefix: "/vhost" }
                route: { cluster: u }
              - match: { prefix: "/" }
                route:
                  cluster: u
                  request_mirror_policies: [ { cluster: shadow, runtime_fraction: { default_value: { numerator: 100 } } } ]"#;
    let clusters = format!("{}{}", static_cluster("u", &[up]), static_cluster("shadow", &[shadow]));
    let server = start(&yaml(&http_listener("h", 0, routes, ""), &clusters), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let next = |seen: &mut tokio::sync::mpsc::UnboundedReceiver<String>| {
        let got = seen.try_recv();
        got.ok()
    };

    let began = std::time::Instant::now();
    let (status, _, body) = http1_request(&mut c, "GET", "/a", "app.example:8080", &[]).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("U\nGET /a\nhost=app.example:8080\n"), "the primary's answer: {body}");
    assert!(began.elapsed() < Duration::from_secs(1), "not held by the 2 s shadow: {:?}", began.elapsed());
    let got = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap().unwrap();
    assert_eq!(got, "GET /a app.example-shadow:8080 ");

    let mut post = http1_client(listener_addr(&server, "h")).await;
    let req = hyper::Request::post("/upload")
        .header("host", "app")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"the body")))
        .unwrap();
    let resp = post.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap().unwrap();
    assert_eq!(got, "POST /upload app-shadow the body");

    // A body of several chunks (each its own data frame, small ones copied, large ones shared) reaches the shadow
    // whole. (To /upload, which reads the whole body: a primary that answers first ends the request's body.)
    use tokio::io::AsyncWriteExt;
    let large = "x".repeat(1500);
    let mut raw = tokio::net::TcpStream::connect(listener_addr(&server, "h")).await.unwrap();
    let request = format!(
        "POST /upload HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n{:x}\r\n{large}\r\n3\r\ntwo\r\n0\r\n\r\n",
        large.len()
    );
    raw.write_all(request.as_bytes()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap().unwrap();
    assert_eq!(got, format!("POST /upload app-shadow one{large}two"));

    // The virtual host's policy, for a route without its own.
    let (status, _, _) = http1_request(&mut c, "GET", "/vhost", "app", &[]).await;
    assert_eq!(status, 200);
    let got = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap().unwrap();
    assert_eq!(got, "GET /vhost app ", "suffix disabled");

    // 0% and a header naming no cluster: nothing goes out.
    for _ in 0..5 {
        let (status, _, _) = http1_request(&mut c, "GET", "/none", "app", &[("x-mirror-to", "nowhere")]).await;
        assert_eq!(status, 200);
    }
    let (status, _, _) = http1_request(&mut c, "GET", "/none", "app", &[("x-mirror-to", "shadow")]).await;
    assert_eq!(status, 200);
    let got = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap().unwrap();
    assert_eq!(got, "GET /none app-shadow ", "the header's cluster");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(next(&mut seen), None, "nothing else was mirrored");
    assert_eq!(counter(&server, "cluster.u.upstream_rq_total"), 10);
    // Counted in the shadow cluster's own stats, once each answer arrived.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(counter(&server, "cluster.shadow.upstream_rq_200"), 5);
}

/// Istio 1.24's default inbound route retries `reset-before-request` twice: a request whose connection could not
/// be made is tried again (here on the other host), one that reached its upstream is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_before_request_retries_what_never_left_the_proxy() {
    let up = http_upstream("U").await;
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let route = ", retry_policy: { retry_on: reset-before-request, num_retries: 2 }";
    let server = start(
        &yaml(&http_listener("h", 0, &routes_to("u", route), ""), &static_cluster("u", &[dead, up])),
        Duration::from_secs(1),
    )
    .await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    for _ in 0..6 {
        let (status, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(counter(&server, "cluster.u.upstream_rq_retry") >= 1);
    // An answer, even a 503, reached the proxy: not retried.
    let (status, _, _) = http1_request(&mut c, "GET", "/status/503", "x", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(counter(&server, "cluster.u.upstream_rq_503"), 1);
}

/// Istio's native telemetry filters (istiod after it stopped using Wasm for them): `istio.stats`
/// (`stats.PluginConfig`) on TCP and HTTP chains, metadata exchange in a TypedStruct on listeners and clusters, and
/// the `io.istio.http.peer_metadata.Config` HTTP filter. They only count and exchange peer metadata, so they are
/// skipped (and counted) and the chains carry traffic.
#[tokio::test]
async fn istios_native_telemetry_filters_are_skipped() {
    let up = http_upstream("U").await;
    let stats = "\"@type\": type.googleapis.com/stats.PluginConfig, disable_host_header_fallback: true, \
                 tcp_reporting_duration: 15s, metrics: [ { dimensions: { a: b }, name: requests_total } ]";
    let mx = "\"@type\": type.googleapis.com/udpa.type.v1.TypedStruct, type_url: \
              type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange, value: { protocol: \
              istio-peer-exchange, enable_discovery: true }";
    let peer = "\"@type\": type.googleapis.com/udpa.type.v1.TypedStruct, type_url: \
                type.googleapis.com/io.istio.http.peer_metadata.Config, value: { upstream_discovery: [ { \
                istio_headers: {} }, { workload_discovery: {} } ], upstream_propagation: [ { istio_headers: {} } ] }";
    let http = http_listener("h", 0, &routes_to("u", ""), "").replace(
        "          http_filters:\n",
        &format!(
            "          http_filters:\n          - name: istio.metadata_exchange\n            typed_config: {{ {peer} }}\n          \
             - name: istio.stats\n            typed_config: {{ {stats} }}\n"
        ),
    );
    let tcp = tcp_listener("t", 0, "u").replace(
        "    - filters:\n",
        &format!(
            "    - filters:\n      - name: istio.metadata_exchange\n        typed_config: {{ {mx} }}\n      - name: \
             istio.stats\n        typed_config: {{ {stats} }}\n"
        ),
    );
    let cluster = format!(
        "{}\n    filters: [ {{ name: istio.metadata_exchange, typed_config: {{ {mx} }} }} ]",
        static_cluster("u", &[up])
    );
    let server = start(&yaml(&format!("{http}{tcp}"), &cluster), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert_eq!(status, 200, "{body}");
    let mut c = http1_client(listener_addr(&server, "t")).await;
    let (status, _, _) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert_eq!(status, 200);
    // The cluster (with its skipped upstream filter) carried both; the listeners' skipped filters are counted.
    assert_eq!(counter(&server, "listener_manager.filters_skipped"), 4, "two HTTP and two TCP filters");
}

/// A virtual host's require_tls (what Istio makes of a Gateway's `httpsRedirect`): a request that did not come over
/// TLS gets Envoy's 301 to the same host and path over https; EXTERNAL_ONLY lets internal requests through; an
/// `x-forwarded-proto: https` the connection manager trusts counts as TLS.
#[tokio::test]
async fn require_tls_redirects_plaintext_requests_to_https() {
    let up = http_upstream("U").await;
    let routes = r#"          route_config:
            name: local
            virtual_hosts:
            - name: secure
              domains: ["secure.example", "secure.example:*"]
              require_tls: ALL
              routes: [ { match: { prefix: "/" }, route: { cluster: u } } ]
            - name: ext
              domains: ["ext.example"]
              require_tls: EXTERNAL_ONLY
              routes: [ { match: { prefix: "/" }, route: { cluster: u } } ]
            - name: plain
              domains: ["*"]
              routes: [ { match: { prefix: "/" }, route: { cluster: u } } ]"#;
    let internal = "\n          use_remote_address: true\n          internal_address_config: { cidr_ranges: [ { \
                    address_prefix: 127.0.0.1, prefix_len: 32 } ] }";
    let listeners = format!("{}{}", http_listener("h", 0, routes, ""), http_listener("int", 0, routes, internal));
    let server = start(&yaml(&listeners, &static_cluster("u", &[up])), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, headers, body) = http1_request(&mut c, "GET", "/p?q=1", "secure.example:8080", &[]).await;
    assert_eq!((status, body.as_str()), (301, ""));
    assert_eq!(headers["location"], "https://secure.example:8080/p?q=1");
    let (status, _, _) = http1_request(&mut c, "GET", "/nothing/routes/here", "secure.example", &[]).await;
    assert_eq!(status, 301, "redirected before any route is matched");
    let (status, _, _) = http1_request(&mut c, "GET", "/p", "secure.example", &[("x-forwarded-proto", "https")]).await;
    assert_eq!(status, 200, "TLS ended before this hop");
    let (status, _, _) = http1_request(&mut c, "GET", "/p", "ext.example", &[]).await;
    assert_eq!(status, 301, "external");
    let (status, _, _) = http1_request(&mut c, "GET", "/p", "other", &[]).await;
    assert_eq!(status, 200);
    let mut c = http1_client(listener_addr(&server, "int")).await;
    let (status, _, _) = http1_request(&mut c, "GET", "/p", "ext.example", &[]).await;
    assert_eq!(status, 200, "internal requests pass EXTERNAL_ONLY");
    let (status, _, _) = http1_request(&mut c, "GET", "/p", "secure.example", &[]).await;
    assert_eq!(status, 301);
}

/// Envoy refuses HTTP/1.0 with 426 unless `http_protocol_options.accept_http_10` (what Istio's HTTP10 node metadata
/// turns on); `default_host_for_http_10` fills in a missing Host.
#[tokio::test]
async fn http_1_0_needs_accept_http_10() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = http_upstream("U").await;
    let refusing = proxy_to(up, "").await;
    let accepting = proxy_to(
        up,
        "\n          http_protocol_options: { accept_http_10: true, default_host_for_http_10: dflt.example }",
    )
    .await;
    let ask = |server: &xds_proxy::server::Server| {
        let addr = listener_addr(server, "h");
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /x HTTP/1.0\r\n\r\n").await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
            String::from_utf8_lossy(&out).to_string()
        }
    };
    let text = ask(&refusing).await;
    assert!(text.contains(" 426 Upgrade Required\r\n") && text.contains("connection: close"), "{text}");
    assert_eq!(counter(&refusing, "http.h.downstream_rq_4xx"), 1);
    let text = ask(&accepting).await;
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n") || text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("GET /x\nhost=dflt.example\n"), "{text}");
}

/// Istio's per-destination `headers` and host rewrites on a weighted route: each weighted cluster entry's own
/// mutations and host_rewrite_literal apply when that entry is picked, before the route's own.
#[tokio::test]
async fn weighted_clusters_apply_their_own_headers_and_host() {
    let a = http_upstream("A").await;
    let b = http_upstream("B").await;
    let routes = r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                request_headers_to_add: [ { header: { key: x-route, value: r } } ]
                route:
                  weighted_clusters:
                    clusters:
                    - name: a
                      weight: 50
                      host_rewrite_literal: a.internal
                      request_headers_to_add: [ { header: { key: x-dest, value: a } } ]
                      response_headers_to_add: [ { header: { key: x-served, value: a } } ]
                    - name: b
                      weight: 50
                      request_headers_to_add: [ { header: { key: x-dest, value: b } } ]
                      request_headers_to_remove: [ x-drop ]"#;
    let clusters = format!("{}{}", static_cluster("a", &[a]), static_cluster("b", &[b]));
    let server = start(&yaml(&http_listener("h", 0, routes, ""), &clusters), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (status, headers, body) = http1_request(&mut c, "GET", "/", "orig", &[("x-drop", "1")]).await;
        assert_eq!(status, 200);
        assert!(body.contains("x-route=r\n"), "{body}");
        if body.starts_with("A\n") {
            assert!(body.contains("host=a.internal\n") && body.contains("x-dest=a\n"), "{body}");
            assert!(body.contains("x-drop=1\n"), "{body}");
            assert_eq!(headers["x-served"], "a");
        } else {
            assert!(body.starts_with("B\n"), "{body}");
            assert!(body.contains("host=orig\n") && body.contains("x-dest=b\n"), "{body}");
            assert!(!body.contains("x-drop"), "{body}");
            assert!(!headers.contains_key("x-served"));
        }
        seen.insert(body[..1].to_string());
    }
    assert_eq!(seen.len(), 2, "both clusters picked in 40 requests");
}

/// Istio's `http.maxConcurrentStreams` (HTTP/2 max_concurrent_streams on the cluster): no upstream connection
/// carries more streams than that at once; the pool opens more connections as the load needs, and reuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_streams_caps_streams_per_upstream_connection() {
    use http_body_util::BodyExt;
    let up = http_upstream("U").await;
    let cluster = format!(
        r#"{}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{ max_concurrent_streams: 2 }} }}"#,
        static_cluster("u", &[up])
    );
    let server = start(&yaml(&http_listener("h", 0, &routes_to("u", ""), ""), &cluster), Duration::from_secs(1)).await;
    // One downstream HTTP/2 connection, so one worker and its one pool; streams start 150 ms apart and last 1.5 s,
    // so each finds the earlier ones still open.
    let send = h2c_client(listener_addr(&server, "h")).await;
    for round in 0..2 {
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let mut send = send.clone();
            tasks.push(tokio::spawn(async move {
                let req =
                    hyper::Request::builder().uri("http://x/sleep/1500").body(http_body_util::Empty::new()).unwrap();
                let resp = send.send_request(req).await.unwrap();
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&body).to_string())
            }));
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        for t in tasks {
            let (status, body) = t.await.unwrap();
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("version=HTTP/2.0"), "{body}");
        }
        assert_eq!(counter(&server, "cluster.u.upstream_cx_total"), 3, "round {round}: 6 streams, 2 per connection");
    }
}

/// Istio's `retryRemoteLocalities` (Envoy's previous_priorities retry priority): a retry leaves the priorities
/// already tried out of the priority load, so it goes to the next locality even though the local one is healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_priorities_send_retries_to_the_next_priority() {
    let bad = flaky_upstream(usize::MAX).await;
    let good = http_upstream("G").await;
    let cluster = two_priority_cluster(bad, good, "");
    let retry = |extra: &str| {
        format!(
            ", retry_policy: {{ retry_on: 5xx, num_retries: 1, retry_back_off: {{ base_interval: 0.001s }}{extra} }}"
        )
    };
    let priority = ", retry_priority: { name: envoy.retry_priorities.previous_priorities, typed_config: { \"@type\": \
                    type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig, \
                    update_frequency: 1 } }";
    let routes = format!(
        r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/elsewhere" }}
                route: {{ cluster: u{} }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: u{} }}"#,
        retry(priority),
        retry("")
    );
    let server = start(&yaml(&http_listener("h", 0, &routes, ""), &cluster), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert_eq!(status, 503, "without it the retry stays on the healthy local priority: {body}");
    for _ in 0..3 {
        let (status, _, body) = http1_request(&mut c, "GET", "/elsewhere", "x", &[]).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("G\n"), "{body}");
    }
}

/// Requests that find no HTTP/2 connection to their upstream wait for the one being opened, as Envoy's pool attaches
/// pending streams to a connecting client, instead of each opening their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_first_requests_shares_one_new_http2_connection() {
    use http_body_util::BodyExt;
    let up = http_upstream("U").await;
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let h2 = |name: &str, at: std::net::SocketAddr| {
        format!(
            r#"{}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}"#,
            static_cluster(name, &[at])
        )
    };
    let routes = r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/dead" }
                route: { cluster: dead }
              - match: { prefix: "/" }
                route: { cluster: u }"#;
    let clusters = format!("{}{}", h2("u", up), h2("dead", dead));
    let server = start(&yaml(&http_listener("h", 0, routes, ""), &clusters), Duration::from_secs(1)).await;
    // One downstream connection: one worker, one pool.
    let send = h2c_client(listener_addr(&server, "h")).await;
    let burst = |path: &'static str| {
        let send = send.clone();
        async move {
            let mut tasks = Vec::new();
            for _ in 0..20 {
                let mut send = send.clone();
                tasks.push(tokio::spawn(async move {
                    let req = hyper::Request::builder()
                        .uri(format!("http://x{path}"))
                        .body(http_body_util::Empty::new())
                        .unwrap();
                    let resp = send.send_request(req).await.unwrap();
                    let status = resp.status();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    (status, String::from_utf8_lossy(&body).to_string())
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    for (status, body) in burst("/sleep/300").await {
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(counter(&server, "cluster.u.upstream_cx_total"), 1, "20 streams, one connection");
    // A connection that cannot be made fails every request that waited for it.
    for (status, body) in burst("/dead").await {
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("connection failure"), "{body}");
    }
}
