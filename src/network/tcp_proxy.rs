//! `envoy.filters.network.tcp_proxy`: connect to a host of the configured cluster (or weighted clusters) and copy
//! bytes both ways with half-close, reset propagation, the idle timeout, and the drain's forced close.
//!
//! Bytes move with splice(2) through a pipe borrowed from the worker's pool (see [`super::splice`]): no user-space
//! copy, no buffer held by an idle connection. At most `per_connection_buffer_limit_bytes` (capped at
//! [`MAX_CHUNK`], one pipe's capacity) are in flight per direction: a direction reads again only after the previous
//! chunk is fully written, which is the back-pressure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::splice;
use tokio_util::either::Either;

use crate::access_log::{self, Entry, Flag};
use crate::config::listener::TcpProxyConfig;
use crate::drain::DrainWatch;
use crate::listener::filters::Detected;
use crate::listener::worker::WorkerContext;
use crate::stats::{Counter, Store};
use crate::upstream::cluster::ConnectError;
use crate::upstream::lb::Weights;
use crate::upstream::outlier::Outcome as HostOutcome;

/// Largest chunk per splice: the default pipe capacity, so a chunk always fits the pipe.
pub const MAX_CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct TcpProxyStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_no_route: Counter,
    pub downstream_cx_rx_bytes_total: Counter,
    pub downstream_cx_tx_bytes_total: Counter,
    pub idle_timeout: Counter,
    pub max_downstream_connection_duration: Counter,
    pub upstream_connect_failed: Counter,
}

#[derive(Debug)]
pub struct TcpProxy {
    pub config: TcpProxyConfig,
    weights: Weights,
    stats: TcpProxyStats,
}

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both directions saw EOF and passed it on.
    Closed,
    /// A side failed or reset: reset the other so the failure is visible end to end.
    Reset,
    IdleTimeout,
    /// `max_downstream_connection_duration` ran out.
    MaxDuration,
    Drained,
}

impl TcpProxy {
    pub fn new(config: TcpProxyConfig, store: &Store) -> Self {
        let c = |s: &str| store.counter(&format!("tcp.{}.{s}", config.stat_prefix));
        // Envoy's flush stats count connections that keep writing buffered bytes upstream after the downstream
        // closed. A direction here writes everything it read before it reads again, so nothing is left to flush
        // when the downstream's EOF or close is seen: both stay 0.
        c("upstream_flush_total");
        store.gauge(&format!("tcp.{}.upstream_flush_active", config.stat_prefix));
        let stats = TcpProxyStats {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_no_route: c("downstream_cx_no_route"),
            downstream_cx_rx_bytes_total: c("downstream_cx_rx_bytes_total"),
            downstream_cx_tx_bytes_total: c("downstream_cx_tx_bytes_total"),
            idle_timeout: c("idle_timeout"),
            max_downstream_connection_duration: c("max_downstream_connection_duration"),
            upstream_connect_failed: c("upstream_cx_connect_attempts_exceeded"),
        };
        let weights = Weights::new(config.clusters.iter().map(|(_, w)| *w));
        TcpProxy { config, weights, stats }
    }

    fn pick_cluster(&self) -> &str {
        let idx = if self.config.clusters.len() == 1 { Some(0) } else { self.weights.pick(rand::random()) };
        idx.and_then(|i| self.config.clusters.get(i)).map_or("", |(name, _)| name.as_str())
    }

    /// Proxies one connection, then writes its access log lines (if any are configured).
    pub async fn serve(
        &self,
        downstream: Downstream,
        info: &Detected,
        drain: DrainWatch,
        ctx: &WorkerContext,
        buffer_limit: u32,
        chain_name: &str,
    ) {
        let start = std::time::SystemTime::now();
        let began = Instant::now();
        let mut log = Outcome::default();
        self.proxy(downstream, info, drain, ctx, buffer_limit, &mut log).await;
        if self.config.access_log.is_empty() {
            return;
        }
        let entry = Entry {
            start: Some(start),
            duration: began.elapsed(),
            downstream_remote: Some(info.peer),
            downstream_local: Some(info.local),
            downstream_direct_remote: Some(info.direct_peer),
            requested_server_name: info.server_name.clone(),
            filter_chain_name: Some(chain_name.to_string()),
            upstream_host: log.upstream_host,
            upstream_cluster: log.cluster,
            upstream_local: log.upstream_local,
            bytes_received: log.received.load(Ordering::Relaxed),
            bytes_sent: log.sent.load(Ordering::Relaxed),
            flags: log.flags,
            ..Entry::default()
        };
        access_log::log_all(&self.config.access_log, &entry);
    }

    async fn proxy(
        &self,
        downstream: Downstream,
        info: &Detected,
        mut drain: DrainWatch,
        ctx: &WorkerContext,
        buffer_limit: u32,
        log: &mut Outcome,
    ) {
        self.stats.downstream_cx_total.inc();
        // Envoy's max_downstream_connection_duration counts from the connection's start, connecting included.
        let deadline = self.config.max_downstream_connection_duration.map(|d| Instant::now() + d);
        let lifetime = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(lifetime);
        let name = self.pick_cluster();
        let Some(cluster) = ctx.clusters.load().get(name).cloned() else {
            self.stats.downstream_cx_no_route.inc();
            log.flags.push(Flag::NoClusterFound);
            debug!(cluster = name, "closing: no such cluster");
            return;
        };
        log.cluster = Some(cluster.name().to_string());

        let connect = async {
            let mut last = None;
            for _ in 0..self.config.max_connect_attempts {
                // Envoy's source_ip hash policy: the same client address goes to the same host of a RING_HASH
                // cluster.
                let hash = self
                    .config
                    .hash_source_ip
                    .then(|| crate::upstream::lb::hash_value(info.peer.ip().to_string().as_bytes()));
                let Some(host) = cluster.choose_hashed(info.local_restored.then_some(info.local), hash) else {
                    cluster.stats.upstream_cx_none_healthy.inc();
                    last = Some(ConnectError::NoHealthyUpstream(cluster.name().to_string()));
                    continue;
                };
                match cluster.connect_to(host.clone()).await {
                    Ok(up) => {
                        // Envoy's tcp_proxy reports a connect as the whole outcome it can judge (a 200 unless
                        // local-origin errors are split), a refused connect as a connect failure (503) and a
                        // timed-out one as a timeout (504).
                        cluster.report(&host, HostOutcome::Connected);
                        return Ok(up);
                    }
                    Err(e) => {
                        debug!("upstream connect failed: {e}");
                        match e {
                            ConnectError::Io(..) => cluster.report(&host, HostOutcome::ConnectFailed),
                            ConnectError::Timeout(_) => cluster.report(&host, HostOutcome::Timeout),
                            ConnectError::NoHealthyUpstream(_) | ConnectError::Overflow(_) => {}
                        }
                        last = Some(e);
                    }
                }
            }
            Err(last)
        };
        let upstream = tokio::select! {
            r = connect => match r {
                Ok(up) => up,
                Err(last) => {
                    self.stats.upstream_connect_failed.inc();
                    log.flags.push(match last {
                        Some(ConnectError::NoHealthyUpstream(_)) => Flag::NoHealthyUpstream,
                        Some(ConnectError::Overflow(_)) => Flag::UpstreamOverflow,
                        _ => Flag::UpstreamConnectionFailure,
                    });
                    if self.config.max_connect_attempts > 1 {
                        log.flags.push(Flag::UpstreamRetryLimitExceeded);
                    }
                    return;
                }
            },
            _ = drain.closed() => return,
            () = &mut lifetime => {
                self.count_end(End::MaxDuration);
                return;
            }
        };
        debug!(upstream.addr = %upstream.host.address, "upstream connected");
        log.upstream_host = Some(upstream.host.address);
        // A getsockname per connection, so only when a log can print it.
        if !self.config.access_log.is_empty() {
            log.upstream_local = upstream.stream.local_addr().ok();
        }
        let (up_stream, host, _slot) = upstream.into_parts();
        let upstream = match cluster.config.tls_for(host.labels.as_deref()) {
            None => Either::Left(up_stream),
            Some(tls) => {
                let handshake =
                    tokio::time::timeout(cluster.config.connect_timeout, tls.connect(up_stream, host.address, None));
                match handshake.await {
                    Ok(Ok(s)) => Either::Right(Box::new(s)),
                    Ok(Err(e)) => {
                        debug!(upstream.addr = %host.address, "upstream TLS handshake failed: {e}");
                        self.stats.upstream_connect_failed.inc();
                        log.flags.push(Flag::UpstreamConnectionFailure);
                        return;
                    }
                    Err(_) => {
                        debug!(upstream.addr = %host.address, "upstream TLS handshake timed out");
                        self.stats.upstream_connect_failed.inc();
                        log.flags.push(Flag::UpstreamConnectionFailure);
                        return;
                    }
                }
            }
        };

        // Envoy bounds each side by its own limit: the listener's downstream, the cluster's upstream.
        let limit = buffer_limit.min(cluster.config.per_connection_buffer_limit_bytes);
        let chunk = (limit as usize).clamp(1024, MAX_CHUNK);
        let activity = Activity::new();
        let (rx, tx) = (&self.stats.downstream_cx_rx_bytes_total, &self.stats.downstream_cx_tx_bytes_total);
        let (received, sent) = (&log.received, &log.sent);
        // Counted as bytes move, as Envoy does, so long-lived connections show in the stats while they live.
        let count = |counter: &Counter, mine: &AtomicU64, n: usize| {
            activity.touch();
            counter.add(n as u64);
            mine.fetch_add(n as u64, Ordering::Relaxed);
        };
        let end = match (downstream, upstream) {
            (Downstream::Plain(downstream), Either::Left(upstream)) => {
                let end = {
                    let (down, up) = (&downstream, &upstream);
                    let one_done = AtomicBool::new(false);
                    let both = async {
                        tokio::try_join!(
                            splice::forward(down, up, chunk, &one_done, |n| count(rx, received, n)),
                            splice::forward(up, down, chunk, &one_done, |n| count(tx, sent, n)),
                        )
                    };
                    tokio::select! {
                        r = both => if r.is_ok() { End::Closed } else { End::Reset },
                        _ = activity.idle(self.config.idle_timeout) => End::IdleTimeout,
                        () = &mut lifetime => End::MaxDuration,
                        _ = drain.closed() => End::Drained,
                    }
                };
                if end == End::Reset {
                    reset(&downstream);
                    reset(&upstream);
                }
                // Counted before the sockets close, so that whoever sees the close sees the count.
                self.count_end(end)
            }
            // TLS on either side: decrypted bytes cannot be spliced, so they are copied through user space, a chunk
            // at a time.
            (downstream, upstream) => {
                let down = match downstream {
                    Downstream::Plain(s) => Either::Left(s),
                    Downstream::Tls(s) => Either::Right(s),
                };
                let (mut down_r, mut down_w) = tokio::io::split(down);
                let (mut up_r, mut up_w) = tokio::io::split(upstream);
                let both = async {
                    tokio::try_join!(
                        copy(&mut down_r, &mut up_w, chunk, |n| count(rx, received, n)),
                        copy(&mut up_r, &mut down_w, chunk, |n| count(tx, sent, n)),
                    )
                };
                let end = tokio::select! {
                    r = both => if r.is_ok() { End::Closed } else { End::Reset },
                    _ = activity.idle(self.config.idle_timeout) => End::IdleTimeout,
                    () = &mut lifetime => End::MaxDuration,
                    _ = drain.closed() => End::Drained,
                };
                self.count_end(end)
            }
        };
        debug!(?end, "proxied connection ended");
    }
}

impl TcpProxy {
    fn count_end(&self, end: End) -> End {
        match end {
            End::IdleTimeout => self.stats.idle_timeout.inc(),
            End::MaxDuration => self.stats.max_downstream_connection_duration.inc(),
            End::Closed | End::Reset | End::Drained => {}
        }
        end
    }
}

/// The downstream side of a proxied connection: a plain socket (spliced) or a terminated TLS stream.
pub enum Downstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Copies one direction until EOF, then half-closes the writer, as the splice path does.
async fn copy<R, W>(r: &mut R, w: &mut W, chunk: usize, mut counted: impl FnMut(usize)) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; chunk];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        // A TLS writer may keep encrypted bytes buffered after a would-block; the read that follows never pushes
        // them out, so each chunk is flushed before waiting for more.
        w.flush().await?;
        counted(n);
    }
}

/// What the access log says about a proxied connection.
#[derive(Debug, Default)]
struct Outcome {
    flags: Vec<Flag>,
    cluster: Option<String>,
    upstream_host: Option<std::net::SocketAddr>,
    upstream_local: Option<std::net::SocketAddr>,
    received: AtomicU64,
    sent: AtomicU64,
}

/// Closing with SO_LINGER 0 sends RST instead of FIN.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Last time either direction moved bytes, for the idle timeout, cheap enough to touch on every read.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `timeout`; never when disabled.
    async fn idle(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else { return std::future::pending().await };
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}
