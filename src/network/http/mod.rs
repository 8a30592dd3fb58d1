//! `envoy.filters.network.http_connection_manager`: serves one downstream connection with hyper (HTTP/1.1 or h2c,
//! per `codec_type`), hands every request to the router, and closes gracefully when the chain drains
//! (`Connection: close` on HTTP/1, GOAWAY on HTTP/2).

pub mod body;
pub mod cors;
pub mod fault;
pub mod rds;
pub mod route;
mod router;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use self::body::{ProxyBody, StreamHold};
use self::rds::{RdsSlot, RouteRegistry};
use self::route::RouteTable;
use crate::access_log;
use crate::config::http::{Codec, HcmConfig, RouteSource};
use crate::config::listener::DrainType;
use crate::drain::{DrainWatch, Phase};
use crate::listener::filters::Detected;
use crate::listener::worker::WorkerContext;
use crate::stats::{Counter, Gauge, GaugeGuard, Store};

/// What the HCM needs to know about the chain and listener a connection arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ChainContext<'a> {
    pub name: &'a str,
    pub drain_type: DrainType,
    /// The chain terminated TLS.
    pub secure: bool,
    /// The listener's `per_connection_buffer_limit_bytes`: how much of a request body is kept for retries.
    pub buffer_limit: u32,
}

/// Where an HCM finds its routes on each request.
#[derive(Debug)]
enum Routes {
    Inline(Arc<RouteTable>),
    Rds(Arc<RdsSlot>),
}

#[derive(Debug, Clone)]
pub struct HttpStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_cx_http1_total: Counter,
    pub downstream_cx_http2_total: Counter,
    pub downstream_cx_drain_close: Counter,
    pub downstream_cx_idle_timeout: Counter,
    pub downstream_cx_max_requests_reached: Counter,
    /// Streams ended by their max_stream_duration.
    pub downstream_rq_max_duration_reached: Counter,
    /// Connections drained by their max_connection_duration.
    pub downstream_cx_max_duration_reached: Counter,
    pub downstream_rq_total: Counter,
    pub downstream_rq_active: Gauge,
    pub downstream_rq_http1_total: Counter,
    pub downstream_rq_http2_total: Counter,
    /// `downstream_rq_1xx` … `downstream_rq_5xx`.
    pub downstream_rq_class: [Counter; 5],
    pub downstream_rq_ws_on_non_ws_route: Counter,
    pub downstream_rq_idle_timeout: Counter,
    /// Streams that ended without a complete response because the downstream went away (closed or reset).
    pub downstream_rq_rx_reset: Counter,
    /// Streams we reset mid-response: the upstream failed or a timeout fired after the headers went out.
    pub downstream_rq_tx_reset: Counter,
    pub downstream_rq_timeout: Counter,
    pub no_route: Counter,
    pub no_cluster: Counter,
    pub rq_direct_response: Counter,
    pub rq_redirect: Counter,
    pub passthrough_internal_redirect: Counter,
}

impl HttpStats {
    fn new(store: &Store, prefix: &str) -> Self {
        let c = |s: &str| store.counter(&format!("http.{prefix}.{s}"));
        let g = |s: &str| store.gauge(&format!("http.{prefix}.{s}"));
        HttpStats {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_active: g("downstream_cx_active"),
            downstream_cx_http1_total: c("downstream_cx_http1_total"),
            downstream_cx_http2_total: c("downstream_cx_http2_total"),
            downstream_cx_drain_close: c("downstream_cx_drain_close"),
            downstream_cx_idle_timeout: c("downstream_cx_idle_timeout"),
            downstream_cx_max_requests_reached: c("downstream_cx_max_requests_reached"),
            downstream_rq_max_duration_reached: c("downstream_rq_max_duration_reached"),
            downstream_cx_max_duration_reached: c("downstream_cx_max_duration_reached"),
            downstream_rq_total: c("downstream_rq_total"),
            downstream_rq_active: g("downstream_rq_active"),
            downstream_rq_http1_total: c("downstream_rq_http1_total"),
            downstream_rq_http2_total: c("downstream_rq_http2_total"),
            downstream_rq_class: [1, 2, 3, 4, 5].map(|n| c(&format!("downstream_rq_{n}xx"))),
            downstream_rq_ws_on_non_ws_route: c("downstream_rq_ws_on_non_ws_route"),
            downstream_rq_idle_timeout: c("downstream_rq_idle_timeout"),
            downstream_rq_rx_reset: c("downstream_rq_rx_reset"),
            downstream_rq_tx_reset: c("downstream_rq_tx_reset"),
            downstream_rq_timeout: c("downstream_rq_timeout"),
            no_route: c("no_route"),
            no_cluster: c("no_cluster"),
            rq_direct_response: c("rq_direct_response"),
            rq_redirect: c("rq_redirect"),
            passthrough_internal_redirect: c("passthrough_internal_redirect"),
        }
    }
}

/// `http.<stat_prefix>.health_check.*`, Envoy's names, when the health check filter is configured.
#[derive(Debug, Clone)]
pub struct HealthCheckStats {
    pub request_total: Counter,
    pub ok: Counter,
    pub failed: Counter,
    pub cached_response: Counter,
    pub failed_cluster_not_found: Counter,
    pub failed_cluster_empty: Counter,
    pub failed_cluster_unhealthy: Counter,
}

impl HealthCheckStats {
    fn new(store: &Store, prefix: &str) -> Self {
        let c = |n: &str| store.counter(&format!("http.{prefix}.health_check.{n}"));
        HealthCheckStats {
            request_total: c("request_total"),
            ok: c("ok"),
            failed: c("failed"),
            cached_response: c("cached_response"),
            failed_cluster_not_found: c("failed_cluster_not_found"),
            failed_cluster_empty: c("failed_cluster_empty"),
            failed_cluster_unhealthy: c("failed_cluster_unhealthy"),
        }
    }
}

#[derive(Debug)]
pub struct HttpConnectionManager {
    pub config: Arc<HcmConfig>,
    routes: Routes,
    pub stats: HttpStats,
    pub health_check_stats: Option<HealthCheckStats>,
    pub fault_stats: Option<fault::FaultStats>,
    pub cors_stats: Option<cors::CorsStats>,
    /// The health check filter's `cache_time`: the last upstream answer to a health check and when it came.
    pub health_check_cache: std::sync::Mutex<Option<(http::StatusCode, Instant)>>,
}

impl HttpConnectionManager {
    pub fn new(config: HcmConfig, store: &Store, registry: &RouteRegistry) -> Self {
        let routes = match &config.routes {
            RouteSource::Inline(t) => Routes::Inline(t.clone()),
            RouteSource::Rds { name, .. } => Routes::Rds(registry.slot(name)),
        };
        let stats = HttpStats::new(store, &config.stat_prefix);
        let health_check_stats =
            config.health_check.as_ref().map(|_| HealthCheckStats::new(store, &config.stat_prefix));
        let fault_stats = config.fault.as_ref().map(|_| fault::FaultStats::new(store, &config.stat_prefix));
        let cors_stats = config.cors.as_ref().map(|_| cors::CorsStats::new(store, &config.stat_prefix));
        HttpConnectionManager {
            config: Arc::new(config),
            routes,
            stats,
            health_check_stats,
            fault_stats,
            cors_stats,
            health_check_cache: std::sync::Mutex::new(None),
        }
    }

    /// The route table requests see now; None while an RDS configuration has not arrived.
    pub fn route_table(&self) -> Option<Arc<RouteTable>> {
        match &self.routes {
            Routes::Inline(t) => Some(t.clone()),
            Routes::Rds(slot) => slot.table(),
        }
    }

    /// Serves one downstream connection until the peer closes it, it idles out, or its chain's drain closes it.
    pub async fn serve<S>(
        self: Arc<Self>,
        stream: S,
        det: &Detected,
        drain: DrainWatch,
        ctx: Arc<WorkerContext>,
        chain: ChainContext<'_>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let stats = &self.stats;
        stats.downstream_cx_total.inc();
        let _active = GaugeGuard::new(&stats.downstream_cx_active);
        let conn = Arc::new(Connection {
            hcm: self.clone(),
            ctx,
            peer: det.peer,
            local: det.local,
            direct_peer: det.direct_peer,
            server_name: det.server_name.clone(),
            chain_name: chain.name.to_string(),
            closes_on_health_check_failure: chain.drain_type == DrainType::Default,
            secure: chain.secure,
            buffer_limit: chain.buffer_limit,
            original_dst: det.local_restored.then_some(det.local),
            drain: drain.clone(),
            close: Notify::new(),
            counted: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            born: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });
        let svc_conn = conn.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let c = svc_conn.clone();
            async move { Ok::<_, Infallible>(c.handle(req).await) }
        });
        let max_headers = self.config.max_request_headers_kb as usize * 1024;
        let io = TokioIo::new(stream);
        // hyper's auto-detecting connection ignores "only" settings once upgrades are on, so the fixed codecs use
        // their own connection types.
        match self.config.codec {
            Codec::Auto => {
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder.http1().timer(TokioTimer::new()).header_read_timeout(None).max_buf_size(max_headers.max(8192));
                builder.http2().timer(TokioTimer::new()).max_header_list_size(max_headers as u32);
                let served = builder.serve_connection_with_upgrades(io, svc);
                drive(std::pin::pin!(served), |c| c.graceful_shutdown(), &self, &conn, drain).await;
            }
            Codec::Http1 => {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.timer(TokioTimer::new()).header_read_timeout(None).max_buf_size(max_headers.max(8192));
                let served = builder.serve_connection(io, svc).with_upgrades();
                drive(std::pin::pin!(served), |c| c.graceful_shutdown(), &self, &conn, drain).await;
            }
            Codec::Http2 => {
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder.timer(TokioTimer::new()).max_header_list_size(max_headers as u32);
                let served = builder.serve_connection(io, svc);
                drive(std::pin::pin!(served), |c| c.graceful_shutdown(), &self, &conn, drain).await;
            }
        }
    }
}

/// Runs a connection until it ends, shutting it down gracefully on drain, on the router's request, or when idle,
/// and dropping it at the drain deadline.
async fn drive<C, E>(
    mut served: Pin<&mut C>,
    shut_down: impl Fn(Pin<&mut C>),
    hcm: &HttpConnectionManager,
    conn: &Connection,
    mut drain: DrainWatch,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let stats = &hcm.stats;
    let idle = hcm.config.connection_idle_timeout;
    let mut shutting_down = false;
    let mut forced = drain.clone();
    let mut idle_check = Box::pin(tokio::time::sleep(idle.unwrap_or(Duration::from_secs(86_400 * 365))));
    let max_age = hcm.config.max_connection_duration;
    let mut age_check = max_age.map(|d| Box::pin(tokio::time::sleep_until(conn.born + d)));
    // Envoy's drain after max_connection_duration: a connection still busy is closed drain_timeout later.
    let mut forced_close: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    debug!(peer = %conn.peer, "HTTP connection ended: {e}");
                }
                break;
            }
            // Drained immediately, or the router decided this connection's turn has come (gradual drain).
            _ = wait_drain_close(&mut drain, conn), if !shutting_down => {
                shutting_down = true;
                stats.downstream_cx_drain_close.inc();
                shut_down(served.as_mut());
            }
            _ = conn.close.notified(), if !shutting_down => {
                shutting_down = true;
                stats.downstream_cx_drain_close.inc();
                shut_down(served.as_mut());
            }
            _ = forced.closed() => {
                debug!(peer = %conn.peer, "HTTP connection closed by the drain deadline");
                break;
            }
            _ = async { if let Some(a) = age_check.as_mut() { a.await } }, if age_check.is_some() && !shutting_down => {
                stats.downstream_cx_max_duration_reached.inc();
                shutting_down = true;
                shut_down(served.as_mut());
                forced_close = Some(Box::pin(tokio::time::sleep(hcm.config.drain_timeout)));
            }
            _ = async { if let Some(f) = forced_close.as_mut() { f.await } }, if forced_close.is_some() => {
                debug!(peer = %conn.peer, "HTTP connection closed drain_timeout after its max_connection_duration");
                break;
            }
            _ = &mut idle_check, if idle.is_some() && !shutting_down => {
                let Some(limit) = idle else { continue };
                let last = conn.born + Duration::from_millis(conn.last_active_ms.load(Ordering::Relaxed));
                if conn.active.load(Ordering::Relaxed) == 0 && last.elapsed() >= limit {
                    stats.downstream_cx_idle_timeout.inc();
                    shutting_down = true;
                    shut_down(served.as_mut());
                } else {
                    idle_check.as_mut().reset(last.max(Instant::now()) + limit);
                }
            }
        }
    }
}

/// Resolves when an immediate drain starts: every connection of the chain closes as soon as it can. A gradual
/// drain closes connections one response at a time instead (see [`Connection::finish`]), as Envoy's HCM does.
///
/// A connection with no request in flight goes as soon as the drain starts (or as soon as it falls idle during a
/// gradual drain): it has no response to carry the decision, and a keep-alive connection held idle to the drain
/// deadline would hold up a shutdown for the whole drain time.
async fn wait_drain_close(drain: &mut DrainWatch, conn: &Connection) {
    drain.draining().await;
    loop {
        if drain.should_close(Instant::now(), 1.0) || conn.active.load(Ordering::Relaxed) == 0 {
            return;
        }
        tokio::time::sleep(IDLE_POLL).await;
    }
}

/// How often a draining connection checks whether it fell idle.
const IDLE_POLL: Duration = Duration::from_millis(250);

/// Resolves when `limit` has passed and the request body has still not been forwarded to its end; never once it has.
async fn request_deadline(limit: Duration, progress: Option<&body::Progress>) {
    tokio::time::sleep(limit).await;
    if progress.is_some_and(|p| p.done.load(Ordering::Relaxed)) {
        std::future::pending::<()>().await;
    }
}

/// The access log entry of a request whose response has not begun. Dropped with its entry still in it, the request
/// was abandoned: hyper drops a request's future when the downstream closes the connection (HTTP/1) or resets the
/// stream (HTTP/2), which also drops, and so cancels, its upstream request. Envoy logs such a request with response
/// code 0 and the `DC` flag (downstream connection termination).
struct Unanswered<'a> {
    entry: Option<access_log::Entry>,
    trace: router::Trace,
    began: Instant,
    logs: &'a Arc<[access_log::AccessLog]>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let Some(mut entry) = self.entry.take() else { return };
        self.trace.fill(&mut entry);
        entry.response_code = None;
        entry.flags.push(access_log::Flag::DownstreamConnectionTermination);
        entry.duration = self.began.elapsed();
        access_log::log_all(self.logs, &entry);
    }
}

/// A request in flight on a connection, for the idle and drain checks: it lives as long as its stream, so a
/// connection streaming a long response is not idle.
#[derive(Debug)]
struct ActiveRequest(Arc<Connection>);

impl ActiveRequest {
    fn new(conn: Arc<Connection>) -> Self {
        conn.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(conn)
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.last_active_ms.store(self.0.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// One downstream connection's state, shared by its requests.
#[derive(Debug)]
struct Connection {
    hcm: Arc<HttpConnectionManager>,
    ctx: Arc<WorkerContext>,
    peer: SocketAddr,
    local: SocketAddr,
    direct_peer: SocketAddr,
    server_name: Option<String>,
    chain_name: String,
    /// `drain_type: DEFAULT`: /healthcheck/fail closes this connection after its next response, as in Envoy.
    closes_on_health_check_failure: bool,
    /// The connection is TLS: `x-forwarded-proto: https`, as Envoy sets it.
    secure: bool,
    /// Envoy's connection buffer limit: a request body kept for retries stops being kept (and retried) past it.
    buffer_limit: u32,
    original_dst: Option<SocketAddr>,
    drain: DrainWatch,
    close: Notify,
    counted: AtomicBool,
    active: AtomicUsize,
    born: Instant,
    last_active_ms: AtomicU64,
    requests: AtomicU64,
}

impl Connection {
    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let stats = &self.hcm.stats;
        let h2 = req.version() == http::Version::HTTP_2;
        if !self.counted.swap(true, Ordering::Relaxed) {
            if h2 { &stats.downstream_cx_http2_total } else { &stats.downstream_cx_http1_total }.inc();
        }
        stats.downstream_rq_total.inc();
        if h2 { &stats.downstream_rq_http2_total } else { &stats.downstream_rq_http1_total }.inc();
        if req.version() < http::Version::HTTP_11 {
            // Envoy's HTTP/1 codec refuses HTTP/1.0 unless http_protocol_options.accept_http_10: 426 Upgrade
            // Required, and the connection closes.
            if !self.hcm.config.accept_http_10 {
                let mut resp = Response::new(ProxyBody::Empty);
                *resp.status_mut() = http::StatusCode::UPGRADE_REQUIRED;
                resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                return self.finish(resp, false, false);
            }
            if let Some(host) = &self.hcm.config.default_host_for_http_10
                && !req.headers().contains_key(http::header::HOST)
            {
                req.headers_mut().insert(http::header::HOST, host.clone());
            }
        }
        // Envoy's stream lifetime: active until the response body is complete (or the stream is reset), so the guard
        // moves into the response body.
        // Made before routing so that a request hyper drops (the downstream went away) still counts as Envoy's
        // stream reset; it moves into the response body, as the stream lives until that is complete.
        let hold = StreamHold {
            active: Some(GaugeGuard::new(&stats.downstream_rq_active)),
            // Counted down however the request ends, including when hyper drops it (an HTTP/2 reset).
            request: Some(ActiveRequest::new(self.clone())),
            downstream_rx_reset: Some(body::CountOnDrop::new(&stats.downstream_rq_rx_reset)),
            downstream_tx_reset: Some(stats.downstream_rq_tx_reset.clone()),
            ..Default::default()
        };
        let grpc = route::is_grpc(req.headers());
        let remote = router::prepare(&self, &mut req);
        let logs = &self.hcm.config.access_log;
        let request_timeout = self.hcm.config.request_timeout.filter(|_| !http_body::Body::is_end_stream(req.body()));
        let mut resp = if logs.is_empty() && request_timeout.is_none() {
            let mut trace = router::Trace { grpc, remote, ..Default::default() };
            // Boxed once: hyper moves the service future around (HTTP/2 spawns it as a task), and the router's state
            // is kilobytes; moving a pointer is cheaper than copying that several times per request.
            let resp = Box::pin(router::route(&self, req, &mut trace)).await;
            self.finish(resp, h2, grpc)
        } else {
            // Boxed: the observed path's state would otherwise make every request's future larger.
            Box::pin(self.handle_observed(req, h2, grpc, remote, request_timeout)).await
        };
        match resp.extensions().get::<router::TunnelHolds>() {
            Some(tunnel) => tunnel.give(hold),
            None => resp.body_mut().hold(hold),
        }
        resp
    }

    /// A request with access logs or a request timeout to watch.
    async fn handle_observed(
        &self,
        req: Request<Incoming>,
        h2: bool,
        grpc: bool,
        remote: Option<std::net::SocketAddr>,
        request_timeout: Option<Duration>,
    ) -> Response<ProxyBody> {
        let stats = &self.hcm.stats;
        let logs = &self.hcm.config.access_log;
        let began = Instant::now();
        let entry = if logs.is_empty() { None } else { Some(self.log_entry(&req, remote)) };
        let trace = router::Trace {
            logging: !logs.is_empty(),
            received: Some(Arc::default()),
            grpc,
            remote,
            ..Default::default()
        };
        // Declared before the routing future borrows its trace, so that it is dropped after it: if hyper drops this
        // request (the downstream went away before the response began), the guard still logs it.
        let mut pending = Unanswered { entry, trace, began, logs };
        let progress = pending.trace.received.clone();
        let resp = match request_timeout {
            None => router::route(self, req, &mut pending.trace).await,
            Some(limit) => {
                let routed = router::route(self, req, &mut pending.trace);
                tokio::pin!(routed);
                tokio::select! {
                    resp = &mut routed => resp,
                    () = request_deadline(limit, progress.as_deref()) => {
                        // Envoy's request_timeout: the whole request did not arrive in time and no response began.
                        stats.downstream_rq_timeout.inc();
                        router::request_timeout_reply(self)
                    }
                }
            }
        };
        let Some(mut entry) = pending.entry.take() else {
            return self.finish(resp, h2, grpc);
        };
        let mut resp = self.finish(resp, h2, grpc);
        entry.response_code = Some(resp.status().as_u16());
        entry.response_headers = Some(resp.headers().clone());
        pending.trace.fill(&mut entry);
        // An upgraded stream lasts as long as its tunnel: Envoy logs it when that closes, with the tunnel's bytes.
        let tunnel = resp.extensions_mut().remove::<router::TunnelLog>();
        if let Some(told) = tunnel.and_then(|t| t.0.lock().unwrap_or_else(|p| p.into_inner()).take()) {
            let logs = logs.clone();
            tokio::spawn(async move {
                let end = told.await.unwrap_or_default();
                entry.duration = began.elapsed();
                entry.bytes_received += end.received;
                entry.bytes_sent += end.sent;
                if let Some(cut) = end.cut {
                    entry.flags.push(cut.flag());
                }
                access_log::log_all(&logs, &entry);
            });
            return resp;
        }
        let body = std::mem::replace(resp.body_mut(), ProxyBody::Empty);
        *resp.body_mut() = body::Logged::wrap(body, entry, began, logs.clone());
        resp
    }

    /// The request half of an access log entry.
    fn log_entry(&self, req: &Request<Incoming>, remote: Option<std::net::SocketAddr>) -> access_log::Entry {
        access_log::Entry {
            start: Some(std::time::SystemTime::now()),
            // Envoy's downstream remote address is the trusted client address x-forwarded-for named, if any.
            downstream_remote: Some(remote.unwrap_or(self.peer)),
            downstream_local: Some(self.local),
            downstream_direct_remote: Some(self.direct_peer),
            requested_server_name: self.server_name.clone(),
            filter_chain_name: Some(self.chain_name.clone()),
            protocol: Some(match req.version() {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            }),
            method: Some(req.method().to_string()),
            path: req.uri().path_and_query().map(|p| p.as_str().to_string()),
            authority: req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)),
            request_headers: Some(req.headers().clone()),
            ..Default::default()
        }
    }

    fn finish(&self, mut resp: Response<ProxyBody>, h2: bool, grpc: bool) -> Response<ProxyBody> {
        if grpc {
            router::grpc_local_reply(&mut resp);
        }
        let status = resp.status().as_u16();
        if let Some(c) = self.hcm.stats.downstream_rq_class.get(usize::from(status / 100).wrapping_sub(1)) {
            c.inc();
        }
        let served = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let limit_reached = self.hcm.config.max_requests_per_connection.is_some_and(|max| served >= u64::from(max));
        if limit_reached {
            self.hcm.stats.downstream_cx_max_requests_reached.inc();
        }
        let health_check_failed =
            self.closes_on_health_check_failure && self.ctx.health_check_failed.load(Ordering::Relaxed);
        if limit_reached
            || health_check_failed
            || (self.drain.phase() != Phase::Serving && self.drain.should_close(Instant::now(), rand::random()))
        {
            if !h2 {
                resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            self.close.notify_one();
        }
        resp
    }
}
