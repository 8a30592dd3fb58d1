//! tcp_proxy end to end: bytes both ways, large transfers, half-close, resets, connect failures, idle timeout,
//! load balancing and the circuit breaker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

#[tokio::test]
async fn bytes_flow_both_ways() {
    let up = echo_server().await;
    let server =
        start(&yaml(&tcp_listener("l", 0, "echo"), &static_cluster("echo", &[up])), Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    assert!(echo_ok(&mut s, b"hello through the proxy").await);
    assert!(echo_ok(&mut s, b"and again").await);
    drop(s);
    eventually("connection counted", Duration::from_secs(5), async || {
        counter(&server, "listener.127.0.0.1_0.downstream_cx_destroy") == 1
    })
    .await;
    assert_eq!(counter(&server, "tcp.l.downstream_cx_total"), 1);
    assert_eq!(counter(&server, "cluster.echo.upstream_cx_total"), 1);
}

/// A deterministic byte stream without short periods, so reordered, lost or duplicated chunks are caught.
fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (offset + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        *b = (x >> 56) as u8;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_is_byte_exact_both_ways() {
    const TOTAL: u64 = 256 * 1024 * 1024;
    let up = echo_server().await;
    let server =
        start(&yaml(&tcp_listener("l", 0, "echo"), &static_cluster("echo", &[up])), Duration::from_secs(1)).await;
    let s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut off = 0u64;
        while off < TOTAL {
            pattern(off, &mut buf);
            w.write_all(&buf).await.unwrap();
            off += buf.len() as u64;
        }
        w.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut expect = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        pattern(off, &mut expect[..n]);
        assert!(buf[..n] == expect[..n], "mismatch in the {n} bytes at offset {off}");
        off += n as u64;
    }
    writer.await.unwrap();
    assert_eq!(off, TOTAL, "echoed byte count");
}

#[tokio::test]
async fn half_close_from_downstream_keeps_the_upstream_direction_open() {
    // The upstream reads until EOF, then answers with the byte count and closes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        s.write_all(format!("got {}", all.len()).as_bytes()).await.unwrap();
    });
    let server = start(&yaml(&tcp_listener("l", 0, "up"), &static_cluster("up", &[up])), Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    s.write_all(&[7u8; 1000]).await.unwrap();
    s.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), read_to_end(&mut s)).await.unwrap();
    assert_eq!(got, b"got 1000");
}

#[tokio::test]
async fn half_close_from_upstream_keeps_the_downstream_direction_open() {
    // The upstream says hello, half-closes, then still reads what the client sends.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.shutdown().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        let _ = tx.send(all);
    });
    let server = start(&yaml(&tcp_listener("l", 0, "up"), &static_cluster("up", &[up])), Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), read_to_end(&mut s)).await.unwrap();
    assert_eq!(got, b"hello", "greeting, then EOF");
    s.write_all(b"after your FIN").await.unwrap();
    s.shutdown().await.unwrap();
    let received = tokio::time::timeout(Duration::from_secs(5), rx).await.unwrap().unwrap();
    assert_eq!(received, b"after your FIN");
}

/// (segments received, segments sent and not yet acknowledged) from the socket's TCP_INFO.
fn segments(s: &TcpStream) -> (u32, u32) {
    use std::os::fd::AsRawFd;
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes that outlives the call.
    let rc = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    // struct tcp_info: tcpi_unacked at byte 24, tcpi_segs_in (Linux 4.2+) at byte 140.
    assert!(len >= 144, "TCP_INFO of {len} bytes has no tcpi_segs_in");
    let at = |i: usize| u32::from_ne_bytes(info[i..i + 4].try_into().unwrap());
    (at(140), at(24))
}

/// An upstream that sends `reply` and its FIN in one segment (MSG_MORE, then the half-close) once told to, after
/// reading to EOF when `read_first`.
async fn replying_upstream(reply: &'static [u8], read_first: bool) -> (std::net::SocketAddr, Channels) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        if read_first {
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
        }
        let _ = ready_tx.send(());
        go_rx.await.unwrap();
        let sent = socket2::SockRef::from(&s).send_with_flags(reply, libc::MSG_MORE).unwrap();
        assert_eq!(sent, reply.len());
        s.shutdown().await.unwrap();
        // Kept open until the proxy closes its side, so the proxy sees a FIN, not a reset.
        let _ = s.read(&mut [0u8; 16]).await;
    });
    (up, Channels { ready: ready_rx, go: go_tx })
}

struct Channels {
    ready: tokio::sync::oneshot::Receiver<()>,
    go: tokio::sync::oneshot::Sender<()>,
}

/// The client's segments for `reply`: the proxy's last bytes and its FIN should arrive together, as haproxy sends
/// them, instead of as data, then a bare FIN (which also costs the client a separate ACK).
async fn reply_segments(client_closes_first: bool) -> (Vec<u8>, u32) {
    const REPLY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
    let (up, channels) = replying_upstream(REPLY, client_closes_first).await;
    let server = start(&yaml(&tcp_listener("l", 0, "up"), &static_cluster("up", &[up])), Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    if client_closes_first {
        s.shutdown().await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(5), channels.ready).await.unwrap().unwrap();
    // Everything the client sent is acknowledged, so what arrives from here on is the reply alone.
    eventually("client's segments acknowledged", Duration::from_secs(5), async || segments(&s).1 == 0).await;
    let before = segments(&s).0;
    channels.go.send(()).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), read_to_end(&mut s)).await.unwrap();
    (got, segments(&s).0 - before)
}

#[tokio::test]
async fn last_bytes_and_fin_leave_in_one_segment_when_the_upstream_closes_first() {
    let (got, segments) = reply_segments(false).await;
    assert_eq!(got, b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n");
    assert_eq!(segments, 1, "reply and FIN in one segment");
}

#[tokio::test]
async fn last_bytes_and_fin_leave_in_one_segment_when_the_client_closed_first() {
    // The upstream direction finishes second here, so the proxy closes instead of half-closing: the close must
    // still send the held-back bytes.
    let (got, segments) = reply_segments(true).await;
    assert_eq!(got, b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n");
    assert_eq!(segments, 1, "reply and FIN in one segment");
}

#[tokio::test]
async fn upstream_reset_reaches_the_client_as_a_reset() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
    });
    let server = start(&yaml(&tcp_listener("l", 0, "up"), &static_cluster("up", &[up])), Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap();
    assert_eq!(r.map_err(|e| e.kind()).err(), Some(std::io::ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn upstream_refused_closes_the_downstream_promptly() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let server =
        start(&yaml(&tcp_listener("l", 0, "dead"), &static_cluster("dead", &[dead])), Duration::from_secs(1)).await;
    let start_at = Instant::now();
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), read_to_end(&mut s)).await.unwrap();
    assert!(got.is_empty());
    assert!(start_at.elapsed() < Duration::from_secs(2), "closed after {:?}", start_at.elapsed());
    assert_eq!(counter(&server, "cluster.dead.upstream_cx_connect_fail"), 1);
}

#[tokio::test]
async fn upstream_connect_timeout_closes_the_downstream_and_counts_it() {
    // A listener whose accept queue is full drops further SYNs, so a connect to it neither completes nor fails.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    full.listen(0).unwrap();
    let up = full.local_addr().unwrap().as_socket().unwrap();
    // A backlog of 0 still queues one connection, where the kernel lets it in: through a SYN cookie before Linux
    // 6.13, not at all there without syncookies. Either way the proxy's SYN is dropped after it.
    let queued = std::net::TcpStream::connect_timeout(&up, Duration::from_secs(1)).ok();
    let cluster = static_cluster("full", &[up]).replace("connect_timeout: 1s", "connect_timeout: 0.3s");
    let server = start(&yaml(&tcp_listener("l", 0, "full"), &cluster), Duration::from_secs(1)).await;
    let start_at = Instant::now();
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), read_to_end(&mut s)).await.unwrap();
    assert!(got.is_empty());
    let took = start_at.elapsed();
    assert!(took >= Duration::from_millis(250), "closed after {took:?}, before the connect timeout");
    assert_eq!(counter(&server, "cluster.full.upstream_cx_connect_timeout"), 1);
    assert_eq!(counter(&server, "cluster.full.upstream_cx_connect_fail"), 1);
    assert_eq!(counter(&server, "tcp.l.upstream_cx_connect_attempts_exceeded"), 1);
    drop(queued);
}

#[tokio::test]
async fn idle_timeout_closes_a_quiet_connection() {
    let up = echo_server().await;
    let listeners =
        tcp_listener("l", 0, "echo").replace("cluster: echo", "cluster: echo\n          idle_timeout: 0.3s");
    let server = start(&yaml(&listeners, &static_cluster("echo", &[up])), Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    assert!(echo_ok(&mut s, b"x").await);
    let t = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(5), read_to_end(&mut s)).await.unwrap();
    assert!(got.is_empty());
    assert!(t.elapsed() >= Duration::from_millis(250), "closed too early: {:?}", t.elapsed());
    assert_eq!(counter(&server, "tcp.l.idle_timeout"), 1);
}

/// Envoy's max_downstream_connection_duration (Istio's connectionPool.tcp.maxConnectionDuration): a busy connection
/// is closed anyway once it is that old.
#[tokio::test]
async fn max_downstream_connection_duration_closes_a_busy_connection() {
    let up = echo_server().await;
    let listeners = tcp_listener("l", 0, "echo")
        .replace("cluster: echo", "cluster: echo\n          max_downstream_connection_duration: 0.6s");
    let server = start(&yaml(&listeners, &static_cluster("echo", &[up])), Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    let t = Instant::now();
    // Never idle: an echo every 100 ms, until the proxy closes the connection.
    let mut echoed = 0;
    while t.elapsed() < Duration::from_secs(5) && echo_ok(&mut s, b"x").await {
        echoed += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t.elapsed() >= Duration::from_millis(500), "closed too early: {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(3), "not closed: {:?}", t.elapsed());
    assert!(echoed >= 3, "{echoed}");
    assert_eq!(counter(&server, "tcp.l.max_downstream_connection_duration"), 1);
    assert_eq!(counter(&server, "tcp.l.idle_timeout"), 0);
}

#[tokio::test]
async fn round_robin_alternates_between_hosts() {
    let a = tagged_server(b"A").await;
    let b = tagged_server(b"B").await;
    let server =
        start(&yaml(&tcp_listener("l", 0, "ab"), &static_cluster("ab", &[a, b])), Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "l");
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).await.unwrap();
        seen.push(tag[0]);
    }
    assert_eq!(seen, b"ABAB");
}

/// Envoy's tcp_proxy reports a refused connect to outlier detection as a 503 (non-split mode): a host that refuses
/// `consecutive_5xx` connects in a row is ejected, and every later connection goes to the host that answers.
#[tokio::test]
async fn refused_connects_eject_the_host_by_consecutive_5xx() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let live = tagged_server(b"L").await;
    let cluster = format!(
        "{}\n    outlier_detection: {{ consecutive_5xx: 2, interval: 10s, base_ejection_time: 30s, max_ejection_percent: 50 }}",
        static_cluster("c", &[dead, live])
    );
    let server = start(&yaml(&tcp_listener("l", 0, "c"), &cluster), Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "l");
    let mut refused = 0;
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut first = [0u8; 1];
        // The dead host's connection is closed with nothing sent; the live one sends its tag.
        if tokio::time::timeout(Duration::from_secs(3), s.read(&mut first)).await.unwrap().unwrap() == 0 {
            refused += 1;
        }
    }
    assert_eq!(refused, 2, "round robin sends every other connection to the dead host until it is ejected");
    assert_eq!(counter(&server, "cluster.c.outlier_detection.ejections_enforced_consecutive_5xx"), 1);
    assert_eq!(gauge(&server, "cluster.c.outlier_detection.ejections_active"), 1);
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).await.unwrap();
        assert_eq!(&tag, b"L");
    }
    assert_eq!(counter(&server, "cluster.c.upstream_cx_connect_fail"), 2);
}

/// Envoy's tcp_proxy `hash_policy: source_ip` over a RING_HASH cluster: every connection from one client address
/// goes to the same host, where the cluster without the policy spreads them.
#[tokio::test]
async fn source_ip_hashing_keeps_a_client_on_one_host() {
    let hosts = [tagged_server(b"A").await, tagged_server(b"B").await, tagged_server(b"C").await];
    let cluster = format!("{}\n    lb_policy: RING_HASH", static_cluster("c", &hosts));
    let hashed =
        tcp_listener("h", 0, "c").replace("cluster: c", "cluster: c\n          hash_policy: [ { source_ip: {} } ]");
    let listeners = format!("{hashed}{}", tcp_listener("r", 0, "c"));
    let server = start(&yaml(&listeners, &cluster), Duration::from_secs(1)).await;
    let tags = async |listener: &str| {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..24 {
            let mut s = TcpStream::connect(listener_addr(&server, listener)).await.unwrap();
            let mut tag = [0u8; 1];
            s.read_exact(&mut tag).await.unwrap();
            seen.insert(tag[0]);
        }
        seen
    };
    assert_eq!(tags("h").await.len(), 1, "one client address, one host");
    assert!(tags("r").await.len() >= 2, "without a hash policy the ring picks at random");
}

#[tokio::test]
async fn weighted_clusters_follow_weights() {
    let a = tagged_server(b"A").await;
    let b = tagged_server(b"B").await;
    let listeners = r#"
  - name: l
    address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: w
          weighted_clusters:
            clusters:
            - { name: a, weight: 0 }
            - { name: b, weight: 5 }"#;
    let clusters = format!("{}{}", static_cluster("a", &[a]), static_cluster("b", &[b]));
    let server = start(&yaml(listeners, &clusters), Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "l");
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).await.unwrap();
        assert_eq!(&tag, b"B");
    }
}

/// A STRICT_DNS cluster `dns` resolving localhost to `port`, IPv4 only, with `extra` fields.
fn localhost_dns_cluster(port: u16, extra: &str) -> String {
    format!(
        r#"
  - name: dns
    type: STRICT_DNS
    dns_lookup_family: V4_ONLY{extra}
    load_assignment:
      cluster_name: dns
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: localhost, port_value: {port} }} }} }}"#
    )
}

#[tokio::test]
async fn strict_dns_cluster_resolves_localhost() {
    let up = echo_server().await;
    let clusters = localhost_dns_cluster(up.port(), "");
    let server = start(&yaml(&tcp_listener("l", 0, "dns"), &clusters), Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    assert!(echo_ok(&mut s, b"resolved").await);
}

/// What istiod 1.25+ puts on its DNS clusters: a c-ares resolver config with only udp_max_queries (accepted with a
/// warning: names go to the system resolver) and dns_jitter (honoured); anything else of c-ares is refused.
#[tokio::test]
async fn istios_dns_cluster_settings_load() {
    let up = echo_server().await;
    let cluster = |cares: &str| {
        localhost_dns_cluster(
            up.port(),
            &format!(
                "\n    dns_refresh_rate: 0.2s\n    dns_jitter: 0.1s\n    respect_dns_ttl: true\n    \
                 typed_dns_resolver_config:\n      name: envoy.network.dns_resolver.cares\n      typed_config: {{ \
                 \"@type\": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig, \
                 {cares} }}"
            ),
        )
    };
    let server =
        start(&yaml(&tcp_listener("l", 0, "dns"), &cluster("udp_max_queries: 100")), Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    assert!(echo_ok(&mut s, b"resolved").await);
    let bad = format!(
        "static_resources:\n  clusters:{}\n",
        cluster("resolvers: [ { socket_address: { address: 10.0.0.53, port_value: 53 } } ]")
    );
    let (status, err, _) = run_proxy("dns.yaml", &bad, &["--mode", "validate"]);
    assert!(!status.success());
    assert!(err.contains("typed_dns_resolver_config.typed_config") && err.contains("only udp_max_queries"), "{err}");
}

#[tokio::test]
async fn circuit_breaker_max_connections_refuses_the_excess() {
    let up = echo_server().await;
    let clusters = static_cluster("echo", &[up]) + "\n    circuit_breakers: { thresholds: [ { max_connections: 1 } ] }";
    let server = start(&yaml(&tcp_listener("l", 0, "echo"), &clusters), Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "l");
    let mut first = TcpStream::connect(addr).await.unwrap();
    assert!(echo_ok(&mut first, b"1").await);
    let mut second = TcpStream::connect(addr).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), read_to_end(&mut second)).await.unwrap();
    assert!(got.is_empty());
    assert_eq!(counter(&server, "cluster.echo.upstream_cx_overflow"), 1);
    assert!(echo_ok(&mut first, b"still fine").await);
}

#[tokio::test]
async fn ipv6_and_ipv4_compat_listeners() {
    let up = echo_server().await;
    let listeners = r#"
  - name: v6
    address: { socket_address: { address: "::1", port_value: 0 } }
    filter_chains: [ { filters: [ { name: t, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: v6, cluster: echo } } ] } ]
  - name: dual
    address: { socket_address: { address: "::", port_value: 0, ipv4_compat: true } }
    filter_chains: [ { filters: [ { name: t, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: dual, cluster: echo } } ] } ]"#;
    let server = start(&yaml(listeners, &static_cluster("echo", &[up])), Duration::from_secs(1)).await;
    let v6 = listener_addr(&server, "v6");
    assert!(v6.is_ipv6() && v6.port() != 0);
    let mut s = TcpStream::connect(v6).await.unwrap();
    assert!(echo_ok(&mut s, b"over ipv6").await);
    // ipv4_compat: the [::] listener also takes IPv4 connections (IPV6_V6ONLY off).
    let port = listener_addr(&server, "dual").port();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert!(echo_ok(&mut s, b"ipv4 into a v6 socket").await);
}

#[tokio::test]
async fn eds_cluster_serves_once_endpoints_arrive_and_cluster_updates_apply_to_new_connections() {
    let a = tagged_server(b"A").await;
    let b = tagged_server(b"B").await;
    let clusters = "\n  - name: eds\n    type: EDS\n    eds_cluster_config: { eds_config: { ads: {} } }";
    let bootstrap = format!(
        "static_resources:\n  listeners:{}\n  clusters:{clusters}\ndynamic_resources: {{ cds_config: {{ ads: {{}} }} }}\n",
        tcp_listener("l", 0, "eds")
    );
    let server = start(&bootstrap, Duration::from_secs(1)).await;
    let addr = listener_addr(&server, "l");

    // No endpoints yet: closed at once, counted as no healthy upstream.
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(3), read_to_end(&mut s)).await.unwrap().is_empty());
    assert_eq!(counter(&server, "cluster.eds.upstream_cx_none_healthy"), 1);

    let la = |port: u16| {
        let yaml = format!(
            "cluster_name: eds\nendpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }} ] }} ]"
        );
        let msg = xds_proxy::config::proto::parse_dynamic(
            &yaml,
            xds_proxy::config::proto::Format::Yaml,
            "envoy.config.endpoint.v3.ClusterLoadAssignment",
        )
        .unwrap();
        xds_proxy::config::proto::decode::<envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment>(&msg)
            .unwrap()
    };
    assert_eq!(server.cluster_manager().set_load_assignment(&la(a.port())), Ok(1));
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag).await.unwrap();
    assert_eq!(&tag, b"A");

    // New endpoints: new connections go there; the open one stays with its host.
    assert_eq!(server.cluster_manager().set_load_assignment(&la(b.port())), Ok(1));
    let mut s2 = TcpStream::connect(addr).await.unwrap();
    s2.read_exact(&mut tag).await.unwrap();
    assert_eq!(&tag, b"B");
    assert!(echo_ok(&mut s, b"old connection still on A").await);

    // A cluster replaced by a STATIC one pointing at A: published to workers for new connections.
    let cfg = xds_proxy::config::cluster::ClusterConfig::try_from({
        let yaml = format!(
            "name: eds\nload_assignment: {{ cluster_name: eds, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }} ] }} ] }}",
            a.port()
        );
        let msg = xds_proxy::config::proto::parse_dynamic(
            &yaml,
            xds_proxy::config::proto::Format::Yaml,
            "envoy.config.cluster.v3.Cluster",
        )
        .unwrap();
        xds_proxy::config::proto::decode::<envoy_types::pb::envoy::config::cluster::v3::Cluster>(&msg).unwrap()
    })
    .unwrap();
    assert!(server.cluster_manager().add_or_update(cfg));
    let mut s3 = TcpStream::connect(addr).await.unwrap();
    s3.read_exact(&mut tag).await.unwrap();
    assert_eq!(&tag, b"A");
}

#[tokio::test]
async fn logical_dns_cluster_connects_to_the_first_answer() {
    let up = echo_server().await;
    let clusters = format!(
        r#"
  - name: logical
    type: LOGICAL_DNS
    dns_lookup_family: V4_ONLY
    load_assignment:
      cluster_name: logical
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: localhost, port_value: {} }} }} }}"#,
        up.port()
    );
    let server = start(&yaml(&tcp_listener("l", 0, "logical"), &clusters), Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    assert!(echo_ok(&mut s, b"logical dns").await);
    assert_eq!(gauge(&server, "cluster.logical.membership_total"), 1);
}
