//! http_connection_manager end to end: real hyper clients and upstreams through the proxy's HCM and router.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::common::*;

fn yaml(listeners: &str, clusters: &str) -> String {
    format!("static_resources:\n  listeners:{listeners}\n  clusters:{clusters}\n")
}

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
