//! Access logs end to end: file loggers on tcp_proxy, on the HTTP connection manager and on the listener (no chain
//! matched), with Envoy's default format, custom operators and json_format, checked against known values.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::net::TcpStream;

use crate::common::*;

async fn lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let mut found = Vec::new();
    eventually(&format!("{n} access log lines in {}", path.display()), Duration::from_secs(5), async || {
        found = std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect();
        found.len() >= n
    })
    .await;
    found
}

#[tokio::test]
async fn tcp_proxy_logs_each_connection_with_chain_bytes_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tcp.log");
    let up = echo_server().await;
    let dead = free_port();
    let format = r#", log_format: { text_format: "%FILTER_CHAIN_NAME% %UPSTREAM_CLUSTER% %UPSTREAM_HOST% %BYTES_RECEIVED% %BYTES_SENT% %RESPONSE_FLAGS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%\n" }"#;
    let listeners = format!(
        r#"
  - name: l
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - name: to-echo
      filter_chain_match: {{ destination_port: 1 }}
      filters:
      - name: t
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: dead
          cluster: dead
          access_log: {log}
    default_filter_chain:
      name: default-chain
      filters:
      - name: t
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: echo
          cluster: echo
          access_log: {log}"#,
        log = file_log(&path, format)
    );
    let clusters =
        format!("{}{}", static_cluster("echo", &[up]), static_cluster("dead", &[([127, 0, 0, 1], dead).into()]));
    let server =
        start(&format!("static_resources:\n  listeners:{listeners}\n  clusters:{clusters}\n"), Duration::from_secs(1))
            .await;
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    assert!(echo_ok(&mut s, b"0123456789").await);
    drop(s);
    let got = lines(&path, 1).await;
    assert_eq!(got[0], format!("default-chain echo {up} 10 10 - 127.0.0.1"));
}

#[tokio::test]
async fn http_requests_are_logged_in_envoys_default_format_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("http.log");
    let json = dir.path().join("http.json");
    let up = http_upstream("U").await;
    let json_format = r#", log_format: { json_format: { code: "%RESPONSE_CODE%", flags: "%RESPONSE_FLAGS%", route: "%ROUTE_NAME%", method: "%REQ(:METHOD)%", up: "%UPSTREAM_HOST%", received: "%BYTES_RECEIVED%" } }"#;
    let logs = format!(
        "[ {}, {} ]",
        file_log(&text, "").trim_start_matches("[ ").trim_end_matches(" ]"),
        file_log(&json, json_format).trim_start_matches("[ ").trim_end_matches(" ]")
    );
    let routes = r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - name: to-u
                match: { prefix: "/" }
                route: { cluster: u }"#;
    let extra = format!("\n          access_log: {logs}");
    let server =
        start(&yaml(&http_listener("h", 0, routes, &extra), &static_cluster("u", &[up])), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    let (status, _, body) = http1_request(
        &mut c,
        "GET",
        "/hello?x=1",
        "example.com",
        &[("user-agent", "test-agent"), ("x-request-id", "rid-1")],
    )
    .await;
    assert_eq!(status, 200);
    let got = lines(&text, 1).await;
    let line = &got[0];
    // [START_TIME] "GET /hello?x=1 HTTP/1.1" 200 - 0 <bytes> <ms> <ms> "-" "test-agent" "rid-1" "example.com" "<up>"
    assert!(line.starts_with('[') && line.contains("Z] \"GET /hello?x=1 HTTP/1.1\" 200 - 0 "), "{line}");
    assert!(line.contains(&format!(" {} ", body.len())), "bytes sent {}: {line}", body.len());
    assert!(line.ends_with(&format!("\"-\" \"test-agent\" \"rid-1\" \"example.com\" \"{up}\"")), "{line}");

    let got = lines(&json, 1).await;
    let v: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(v["code"], 200);
    assert!(v["flags"].is_null(), "{v}");
    assert_eq!(v["route"], "to-u");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["up"], up.to_string());
    assert_eq!(v["received"], 0);

    // The log sees the request as it was proxied: a request without an id shows the one the proxy generated.
    let (status, _, body) = http1_request(&mut c, "GET", "/second", "example.com", &[]).await;
    assert_eq!(status, 200);
    let generated = body.lines().find_map(|l| l.strip_prefix("x-request-id=")).unwrap().to_string();
    assert_eq!(generated.len(), 36, "{body}");
    let got = lines(&text, 2).await;
    assert!(got[1].contains(&format!("\"{generated}\"")), "{}", got[1]);
}

#[tokio::test]
async fn listener_logs_connections_no_chain_matched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("listener.log");
    let up = echo_server().await;
    let format = r#", log_format: { text_format: "%RESPONSE_FLAGS% %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%\n" }"#;
    let listeners = format!(
        r#"
  - name: l
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    access_log: {}
    filter_chains:
    - filter_chain_match: {{ destination_port: 1 }}
      filters:
      - name: t
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: echo
          cluster: echo"#,
        file_log(&path, format)
    );
    let server = start(
        &format!("static_resources:\n  listeners:{listeners}\n  clusters:{}\n", static_cluster("echo", &[up])),
        Duration::from_secs(1),
    )
    .await;
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    assert_eq!(read_to_end(&mut s).await, b"");
    assert_eq!(lines(&path, 1).await, ["NR 127.0.0.1"]);
}

#[test]
fn bad_access_log_configs_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad_format = format!(
        "static_resources:\n  listeners:{}\n",
        tcp_listener("l", 0, "c").replace(
            "cluster: c",
            &format!(
                "cluster: c\n          access_log: {}",
                file_log(&dir.path().join("x.log"), r#", log_format: { text_format: "%NOPE%" }"#)
            )
        )
    );
    let (status, err, _) = run_proxy("bad.yaml", &bad_format, &["--mode", "validate"]);
    assert!(!status.success());
    assert!(err.contains("access_log[0].typed_config") && err.contains("%NOPE%"), "{err}");
}

/// An upstream that reads a request head and never answers; it reports `received` once the head arrived and
/// `closed` when the proxy closes the connection (the request was cancelled).
async fn silent_upstream() -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<&'static str>) {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            let _ = tx.send("closed");
                            return;
                        }
                        Ok(n) => {
                            head.extend_from_slice(&buf[..n]);
                            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                                let _ = tx.send("received");
                                head.clear();
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Envoy logs a request whose downstream went away before the response began with response code 0 and `DC`, and
/// resets its upstream request: over HTTP/1 by closing the connection, over HTTP/2 by resetting the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_are_logged_with_dc_and_cancel_the_upstream_request() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("http.log");
    let (up, mut events) = silent_upstream().await;
    let format = r#", log_format: { text_format: "%RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_HOST% %REQ(:PATH)% %PROTOCOL%\n" }"#;
    let routes = r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: u }"#;
    let extra = format!("\n          access_log: {}", file_log(&path, format));
    let server =
        start(&yaml(&http_listener("h", 0, routes, &extra), &static_cluster("u", &[up])), Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "h");
    let next = async |events: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>| {
        tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap()
    };

    // HTTP/1.1: the client closes its connection while the upstream has not answered.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /slow-h1 HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    assert_eq!(next(&mut events).await, "received");
    drop(s);
    assert_eq!(next(&mut events).await, "closed", "the upstream request is cancelled");
    assert_eq!(lines(&path, 1).await, [format!("0 DC {up} /slow-h1 HTTP/1.1")]);

    // HTTP/2: the client resets the stream; the connection itself stays.
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req =
        hyper::Request::builder().uri("http://x/slow-h2").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    let pending = tokio::spawn(h2.send_request(req));
    assert_eq!(next(&mut events).await, "received");
    pending.abort();
    assert_eq!(next(&mut events).await, "closed", "the upstream request is cancelled");
    assert_eq!(lines(&path, 2).await[1], format!("0 DC {up} /slow-h2 HTTP/2"));
    assert!(!h2.is_closed(), "a reset stream leaves its connection open");
}

/// Envoy's access log filters, as Istio sends them (`response_flag_filter` NR on the listener's log once
/// `accessLogFile` is set) and as users write them: status code and duration comparisons, response flags, request
/// headers, and/or.
#[tokio::test]
async fn access_log_filters_pick_the_entries_written() {
    let dir = tempfile::tempdir().unwrap();
    let (errors, tagged, slow) =
        (dir.path().join("errors.log"), dir.path().join("tagged.log"), dir.path().join("slow.log"));
    let up = http_upstream("U").await;
    let format = r#", log_format: { text_format: "%RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(:PATH)%\n" }"#;
    let with_filter = |path: &std::path::Path, filter: &str| {
        file_log(path, format).replace("typed_config:", &format!("filter: {filter}, typed_config:"))
    };
    let errors_log = with_filter(
        &errors,
        "{ or_filter: { filters: [ { status_code_filter: { comparison: { op: GE, value: { default_value: 500, \
         runtime_key: access_log.errors } } } }, { response_flag_filter: { flags: [ NR ] } } ] } }",
    );
    let tagged_log = with_filter(&tagged, "{ header_filter: { header: { name: x-log, present_match: true } } }");
    let slow_log = with_filter(
        &slow,
        "{ and_filter: { filters: [ { duration_filter: { comparison: { op: GE, value: { default_value: 300 } } } }, \
         { status_code_filter: { comparison: { op: EQ, value: { default_value: 200 } } } } ] } }",
    );
    let routes = r#"          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/s" }
                route: { cluster: u }"#;
    let hcm = format!(
        "\n          access_log: [ {}, {}, {} ]",
        &errors_log[2..errors_log.len() - 2],
        &tagged_log[2..tagged_log.len() - 2],
        &slow_log[2..slow_log.len() - 2]
    );
    let server =
        start(&yaml(&http_listener("h", 0, routes, &hcm), &static_cluster("u", &[up])), Duration::from_secs(1)).await;
    let mut c = http1_client(listener_addr(&server, "h")).await;
    for (path, headers) in [
        ("/status/200", &[][..]),
        ("/status/503", &[][..]),
        ("/elsewhere", &[][..]),
        ("/sleep/400", &[][..]),
        ("/status/201", &[("x-log", "1")][..]),
    ] {
        http1_request(&mut c, "GET", path, "x", headers).await;
    }
    assert_eq!(lines(&errors, 2).await, ["503 - /status/503", "404 NR /elsewhere"]);
    assert_eq!(lines(&tagged, 1).await, ["201 - /status/201"]);
    assert_eq!(lines(&slow, 1).await, ["200 - /sleep/400"]);
    // Nothing else was written (the lines above were awaited first, so later writes would have landed by now).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(std::fs::read_to_string(&errors).unwrap().lines().count(), 2);
    assert_eq!(std::fs::read_to_string(&tagged).unwrap().lines().count(), 1);
    assert_eq!(std::fs::read_to_string(&slow).unwrap().lines().count(), 1);
}

#[test]
fn access_log_filter_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let with = |filter: &str| {
        let log = file_log(&dir.path().join("x.log"), "")
            .replace("typed_config:", &format!("filter: {filter}, typed_config:"));
        let yaml = format!(
            "static_resources:\n  listeners:{}\n",
            tcp_listener("l", 0, "c").replace("cluster: c", &format!("cluster: c\n          access_log: {log}"))
        );
        let (status, err, _) = run_proxy("bad.yaml", &yaml, &["--mode", "validate"]);
        assert!(!status.success());
        err
    };
    let err = with("{ response_flag_filter: { flags: [ NR, XX ] } }");
    assert!(err.contains("access_log[0].filter.response_flag_filter.flags[1]: unknown response flag \"XX\""), "{err}");
    let err = with("{ runtime_filter: { runtime_key: k } }");
    assert!(err.contains("access_log[0].filter.runtime_filter: this access log filter is not supported"), "{err}");
}
