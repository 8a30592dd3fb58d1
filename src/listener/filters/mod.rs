//! Listener filters at runtime: they run inside the connection's task, on bytes peeked from the socket (nothing is
//! consumed except a PROXY protocol header, which the filter owns), and fill in what filter chain matching needs:
//! the (restored) destination, transport protocol, SNI and ALPN.
//!
//! Envoy's semantics (source/server/active_tcp_socket.cc and each filter's source): filters run in order; a filter
//! whose `filter_disabled` predicate matches is skipped; the whole phase is bounded by `listener_filters_timeout`,
//! after which the connection is closed, or continues with what was found when
//! `continue_on_listener_filters_timeout` is set; a connection nobody detected a transport for is `raw_buffer`.

pub mod http_inspector;
pub mod proxy_protocol;
pub mod tls_inspector;

/// Deterministic pseudo-random input for the parsers' robustness tests, shared so each parser's tests use the same
/// generator without a dependency.
#[cfg(test)]
pub(crate) mod test_rng {
    /// xorshift64*.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }
}

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::io::{AsyncReadExt, Interest};
use tokio::net::TcpStream;

use crate::config::listener::{ListenerConfig, ListenerFilterKind};
use crate::stats::{Counter, Store};

/// The largest PROXY protocol header: v2's 16-byte preamble plus its 16-bit length.
const MAX_PROXY_HEADER: usize = 16 + 65_535;

/// The transport protocol a connection is matched with.
pub const RAW_BUFFER: &str = "raw_buffer";
pub const TLS: &str = "tls";

/// What listener filters learned about a connection.
#[derive(Debug, Clone)]
pub struct Detected {
    /// Local address; the original destination once restored.
    pub local: SocketAddr,
    /// Remote address; the PROXY protocol source when one was given.
    pub peer: SocketAddr,
    /// The address the TCP connection really comes from (`direct_source_prefix_ranges`).
    pub direct_peer: SocketAddr,
    /// Set by original_dst (or PROXY protocol): only then may `use_original_dst` hand the connection off.
    pub local_restored: bool,
    pub transport: &'static str,
    pub server_name: Option<String>,
    pub alpn: Vec<String>,
}

impl Detected {
    pub fn new(local: SocketAddr, peer: SocketAddr) -> Self {
        Detected {
            local,
            peer,
            direct_peer: peer,
            local_restored: false,
            transport: RAW_BUFFER,
            server_name: None,
            alpn: Vec::new(),
        }
    }
}

/// Why listener filters closed a connection.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("the peer closed the connection during listener filters")]
    PeerClosed,
    #[error("PROXY protocol: {0}")]
    ProxyProtocol(&'static str),
    #[error("TLS ClientHello larger than {0} bytes")]
    ClientHelloTooLarge(usize),
    #[error("no HTTP request line within the inspect limit")]
    RequestLineTooLong,
    #[error("malformed TLS ClientHello")]
    ClientHelloMalformed,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Envoy's listener filter stats (global scope, as Envoy's filters register them).
#[derive(Debug, Clone)]
pub struct FilterStats {
    tls_found: Counter,
    tls_not_found: Counter,
    sni_found: Counter,
    sni_not_found: Counter,
    alpn_found: Counter,
    alpn_not_found: Counter,
    client_hello_too_large: Counter,
    http10_found: Counter,
    http11_found: Counter,
    http2_found: Counter,
    http_not_found: Counter,
    proxy_proto_found: Counter,
    proxy_proto_not_found: Counter,
    proxy_proto_error: Counter,
}

impl FilterStats {
    pub fn new(store: &Store) -> Self {
        let c = |s: &str| store.counter(s);
        FilterStats {
            tls_found: c("tls_inspector.tls_found"),
            tls_not_found: c("tls_inspector.tls_not_found"),
            sni_found: c("tls_inspector.sni_found"),
            sni_not_found: c("tls_inspector.sni_not_found"),
            alpn_found: c("tls_inspector.alpn_found"),
            alpn_not_found: c("tls_inspector.alpn_not_found"),
            client_hello_too_large: c("tls_inspector.client_hello_too_large"),
            http10_found: c("http_inspector.http10_found"),
            http11_found: c("http_inspector.http11_found"),
            http2_found: c("http_inspector.http2_found"),
            http_not_found: c("http_inspector.http_not_found"),
            proxy_proto_found: c("proxy_proto.found"),
            proxy_proto_not_found: c("proxy_proto.not_found"),
            proxy_proto_error: c("downstream_cx_proxy_proto_error"),
        }
    }
}

/// Runs the listener's filters on `stream`, updating `det`. Bounded by the caller (listener_filters_timeout).
pub async fn run(
    stream: &mut TcpStream,
    listener: &ListenerConfig,
    det: &mut Detected,
    stats: &FilterStats,
) -> Result<(), Rejected> {
    let mut peek = Peeker::default();
    for f in &listener.listener_filters {
        if f.disabled.as_ref().is_some_and(|p| p.matches(det.local.port())) {
            continue;
        }
        match &f.kind {
            ListenerFilterKind::OriginalDst => {
                if listener.socket.transparent {
                    // TPROXY: the socket's local address already is the original destination.
                    det.local_restored = true;
                } else if let Some(dst) = original_dst(stream, det.local) {
                    det.local = dst;
                    det.local_restored = true;
                }
            }
            ListenerFilterKind::TlsInspector { max_client_hello, close_on_parse_error } => {
                tls(stream, &mut peek, det, stats, *max_client_hello, *close_on_parse_error).await?;
            }
            ListenerFilterKind::HttpInspector => http(stream, &mut peek, det, stats).await?,
            ListenerFilterKind::ProxyProtocol { allow_without, allow_v1, allow_v2 } => {
                let versions = (*allow_v1, *allow_v2);
                proxy(stream, &mut peek, det, stats, *allow_without, versions).await?;
            }
        }
    }
    Ok(())
}

async fn tls(
    stream: &TcpStream,
    peek: &mut Peeker,
    det: &mut Detected,
    stats: &FilterStats,
    max: usize,
    close_on_parse_error: bool,
) -> Result<(), Rejected> {
    use tls_inspector::TlsInspect;
    loop {
        match tls_inspector::inspect(peek.bytes()) {
            TlsInspect::NeedMore => {
                if peek.bytes().len() >= max {
                    stats.client_hello_too_large.inc();
                    return Err(Rejected::ClientHelloTooLarge(max));
                }
                peek.more(stream, max).await?;
            }
            TlsInspect::TooLarge => {
                stats.client_hello_too_large.inc();
                return Err(Rejected::ClientHelloTooLarge(max));
            }
            TlsInspect::NotTls => {
                stats.tls_not_found.inc();
                if close_on_parse_error && peek.bytes().first() == Some(&0x16) {
                    return Err(Rejected::ClientHelloMalformed);
                }
                return Ok(());
            }
            TlsInspect::Tls(hello) => {
                stats.tls_found.inc();
                det.transport = TLS;
                if hello.server_name.is_some() {
                    stats.sni_found.inc()
                } else {
                    stats.sni_not_found.inc()
                }
                if hello.alpn.is_empty() {
                    stats.alpn_not_found.inc()
                } else {
                    stats.alpn_found.inc()
                }
                det.server_name = hello.server_name;
                det.alpn = hello.alpn;
                return Ok(());
            }
        }
    }
}

async fn http(stream: &TcpStream, peek: &mut Peeker, det: &mut Detected, stats: &FilterStats) -> Result<(), Rejected> {
    use http_inspector::HttpInspect;
    // Envoy's http_inspector only looks at connections no other filter claimed a transport for.
    if det.transport != RAW_BUFFER {
        return Ok(());
    }
    loop {
        let found = match http_inspector::inspect(peek.bytes()) {
            HttpInspect::NeedMore if peek.bytes().len() < http_inspector::MAX_INSPECT => {
                match peek.more(stream, http_inspector::MAX_INSPECT).await {
                    Ok(()) => continue,
                    // Envoy gives up quietly on a connection that ends before the request line does.
                    Err(Rejected::PeerClosed) => None,
                    Err(e) => return Err(e),
                }
            }
            // Envoy closes a connection whose first line does not end within its inspect limit.
            HttpInspect::NotHttp if peek.bytes().len() >= http_inspector::MAX_INSPECT => {
                stats.http_not_found.inc();
                return Err(Rejected::RequestLineTooLong);
            }
            HttpInspect::NeedMore | HttpInspect::NotHttp => None,
            HttpInspect::Http10 => Some(("http/1.0", &stats.http10_found)),
            HttpInspect::Http11 => Some(("http/1.1", &stats.http11_found)),
            HttpInspect::H2c => Some(("h2c", &stats.http2_found)),
        };
        match found {
            Some((alpn, counter)) => {
                counter.inc();
                det.alpn = vec![alpn.to_string()];
            }
            None => stats.http_not_found.inc(),
        }
        return Ok(());
    }
}

async fn proxy(
    stream: &mut TcpStream,
    peek: &mut Peeker,
    det: &mut Detected,
    stats: &FilterStats,
    allow_without: bool,
    (allow_v1, allow_v2): (bool, bool),
) -> Result<(), Rejected> {
    use proxy_protocol::ProxyParse;
    loop {
        match proxy_protocol::parse(peek.bytes()) {
            ProxyParse::NeedMore => peek.more(stream, MAX_PROXY_HEADER).await?,
            ProxyParse::NotProxy if allow_without => {
                stats.proxy_proto_not_found.inc();
                return Ok(());
            }
            ProxyParse::NotProxy => {
                stats.proxy_proto_error.inc();
                return Err(Rejected::ProxyProtocol("no PROXY protocol header"));
            }
            ProxyParse::Invalid(why) => {
                stats.proxy_proto_error.inc();
                return Err(Rejected::ProxyProtocol(why));
            }
            ProxyParse::Header(h) => {
                let v1 = peek.bytes().starts_with(b"PROXY ");
                if (v1 && !allow_v1) || (!v1 && !allow_v2) {
                    stats.proxy_proto_error.inc();
                    return Err(Rejected::ProxyProtocol("this PROXY protocol version is disallowed"));
                }
                // The header belongs to the filter: consume it so the chain sees the payload only.
                let mut header = vec![0u8; h.consumed];
                stream.read_exact(&mut header).await?;
                peek.reset();
                stats.proxy_proto_found.inc();
                if let Some((source, destination)) = h.addresses {
                    det.peer = source;
                    det.local = destination;
                    det.local_restored = true;
                }
                return Ok(());
            }
        }
    }
}

/// Bytes peeked (MSG_PEEK) from the socket, grown on demand up to a filter's limit.
#[derive(Debug, Default)]
struct Peeker {
    buf: Vec<u8>,
    len: usize,
}

impl Peeker {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn reset(&mut self) {
        self.len = 0;
    }

    /// Waits until more bytes than already seen are available (or `limit` is reached), then peeks them.
    async fn more(&mut self, stream: &TcpStream, limit: usize) -> Result<(), Rejected> {
        let want = (self.len * 2).max(1024).min(limit.max(1));
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let seen = self.len;
        loop {
            let ready = stream.ready(Interest::READABLE).await?;
            let peeked = stream.try_io(Interest::READABLE, || {
                let n = peek(stream, &mut self.buf)?;
                // The same bytes again mean nothing new arrived: report WouldBlock so tokio clears the readiness and
                // the next wait is for new data, not a busy loop over what is already buffered.
                if n <= seen && n != 0 { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(n) }
            });
            match peeked {
                Ok(0) => return Err(Rejected::PeerClosed),
                Ok(n) => {
                    self.len = n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if ready.is_read_closed() {
                        return Err(Rejected::PeerClosed);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn peek(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length; the fd is open for the call.
    let n = unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// The destination before an iptables REDIRECT/DNAT (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST); None when the
/// connection was not redirected by netfilter or the kernel has no record of it.
pub fn original_dst(stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let fd = stream.as_raw_fd();
    let v4 = match local {
        SocketAddr::V4(_) => true,
        // An IPv4 connection on a dual-stack socket: netfilter tracked it as IPv4.
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    if v4 {
        // SAFETY: sockaddr_in is plain old data; zeroed is a valid value.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `addr`, which outlives the call.
        let rc = unsafe {
            libc::getsockopt(fd, libc::SOL_IP, libc::SO_ORIGINAL_DST, std::ptr::from_mut(&mut addr).cast(), &mut len)
        };
        if rc != 0 || i32::from(addr.sin_family) != libc::AF_INET {
            return None;
        }
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(addr.sin_port))))
    } else {
        // SAFETY: as above, for sockaddr_in6.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `addr`, which outlives the call.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                libc::IP6T_SO_ORIGINAL_DST,
                std::ptr::from_mut(&mut addr).cast(),
                &mut len,
            )
        };
        if rc != 0 || i32::from(addr.sin6_family) != libc::AF_INET6 {
            return None;
        }
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(addr.sin6_port), 0, addr.sin6_scope_id)))
    }
}
