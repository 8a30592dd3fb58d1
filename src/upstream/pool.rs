//! Per-worker HTTP connection pools, one per (cluster, host): HTTP/1.1 keep-alive connections lent to one request at
//! a time and given back when its response body has been read to the end, and one multiplexed HTTP/2 connection per
//! host. A worker's pools are only touched by that worker's tasks, so the lock around them is never contended.
//!
//! A connection with no request for the cluster's `common_http_protocol_options.idle_timeout` (Envoy's default 1 h)
//! is closed by its own connection task and counted in `upstream_cx_idle_timeout`: an HTTP/1.1 connection idle in
//! the pool, an HTTP/2 connection with no stream open.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use super::cluster::{Cluster, ConnectError, Host};
use crate::network::http::body::ProxyBody;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("handshake with {0} failed: {1}")]
    Handshake(SocketAddr, hyper::Error),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(SocketAddr, std::io::Error),
    /// The request was written (or may have been) and the connection failed before the response headers.
    #[error("upstream reset: {0}")]
    Reset(hyper::Error),
    /// `max_pending_requests` reached: too many requests already wait for a connection.
    #[error("too many requests waiting for a connection")]
    PendingOverflow,
    /// The HTTP/2 connection this request waited for could not be opened (by the request that was opening it).
    #[error("connection to {0} failed: {1}")]
    Shared(SocketAddr, String),
}

impl PoolError {
    pub fn is_connect_failure(&self) -> bool {
        matches!(self, PoolError::Connect(_) | PoolError::Handshake(..) | PoolError::Tls(..) | PoolError::Shared(..))
    }
}

#[derive(Debug)]
struct Http1Conn {
    sender: http1::SendRequest<ProxyBody>,
    /// Requests sent on this connection so far.
    uses: u32,
    /// When it was opened, for `max_connection_duration`.
    born: Instant,
    idle_since: Instant,
    /// Tells the connection's task which pooled entry is its own.
    id: u64,
}

#[derive(Debug)]
struct Http2Conn {
    sender: http2::SendRequest<ProxyBody>,
    uses: u32,
    streams: Arc<Streams>,
}

/// The streams open on an HTTP/2 connection, and since when it has had none, for its idle timeout.
#[derive(Debug)]
struct Streams {
    open: AtomicU32,
    born: Instant,
    /// Milliseconds after `born` when the last stream ended.
    idle_since_ms: AtomicU64,
}

impl Streams {
    fn new() -> Arc<Self> {
        Arc::new(Streams { open: AtomicU32::new(0), born: Instant::now(), idle_since_ms: AtomicU64::new(0) })
    }

    fn open(self: &Arc<Self>) -> StreamCount {
        self.open.fetch_add(1, Ordering::Relaxed);
        StreamCount(self.clone())
    }

    /// When the connection fell idle, None while a stream is open.
    fn idle_since(&self) -> Option<Instant> {
        (self.open.load(Ordering::Relaxed) == 0)
            .then(|| self.born + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed)))
    }
}

/// One stream open on an HTTP/2 connection while it lives.
#[derive(Debug)]
pub struct StreamCount(Arc<Streams>);

impl Drop for StreamCount {
    fn drop(&mut self) {
        // Stored before the count drops, so that an idle connection always shows when it fell idle.
        self.0.idle_since_ms.store(self.0.born.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct HostPool {
    /// Idle HTTP/1.1 connections, most recently used last (reused first: its socket is warm).
    http1: Vec<Http1Conn>,
    /// The host's HTTP/2 connections: one, unless the cluster caps streams per connection
    /// (`max_concurrent_streams`) and the load needs more.
    http2: Vec<Http2Conn>,
    /// The HTTP/2 connection being opened, which requests finding no room wait for.
    h2_connecting: Option<Arc<Connecting>>,
}

/// An HTTP/2 connection being opened: requests that find no room wait for it instead of each opening their own, as
/// Envoy's pool attaches pending streams to a connecting client; if it fails, they fail with it.
#[derive(Debug)]
struct Connecting {
    /// None while connecting; then Ok, or the failure its waiters fail with.
    outcome: tokio::sync::watch::Sender<Option<Result<(), String>>>,
}

impl Connecting {
    fn new() -> Self {
        Connecting { outcome: tokio::sync::watch::Sender::new(None) }
    }
}

/// Ends a [`Connecting`] however its request ends: with the connection, with its failure, or, dropped (the request
/// went away), as a failure, so that its waiters never wait for good.
struct Opening<'a> {
    pools: &'a HttpPools,
    cluster: &'a Arc<Cluster>,
    key: &'a PoolKey,
    connecting: Arc<Connecting>,
    over: bool,
}

impl Opening<'_> {
    fn finish(&mut self, conn: Option<Http2Conn>, failed: Option<String>) {
        self.over = true;
        {
            let mut clusters = self.pools.clusters.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pool) = host_pool(&mut clusters, self.cluster, self.key) {
                if pool.h2_connecting.as_ref().is_some_and(|c| Arc::ptr_eq(c, &self.connecting)) {
                    pool.h2_connecting = None;
                }
                if let Some(conn) = conn {
                    pool.http2.push(conn);
                }
            }
        }
        self.connecting.outcome.send_replace(Some(failed.map_or(Ok(()), Err)));
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if !self.over {
            self.finish(None, Some("the request opening it went away".into()));
        }
    }
}

#[derive(Debug)]
struct ClusterPools {
    /// The cluster version these pools belong to: a replaced cluster starts afresh.
    cluster: Weak<Cluster>,
    hosts: HashMap<PoolKey, HostPool>,
}

/// Which connections an exchange may share: the host's, and with `auto_sni` those made with the same SNI (Envoy
/// keys its pools by the SNI then, so a connection made for one name never carries a request for another).
type PoolKey = (SocketAddr, Option<Arc<str>>);

type Shared = Arc<Mutex<HashMap<String, ClusterPools>>>;

/// One worker's pools for every cluster it has sent HTTP requests to.
#[derive(Debug, Default)]
pub struct HttpPools {
    clusters: Shared,
}

/// What an exchange holds of its connection until its response has been read to the end ([`Lease::give_back`]).
#[derive(Debug)]
pub enum Lease {
    Http1(Http1Lease),
    /// A stream on a shared HTTP/2 connection, counted as open for the connection's idle timeout.
    Http2(StreamCount),
}

impl Lease {
    /// Notes the request body whose end must have been sent before the connection can serve another exchange.
    pub fn with_request(self, progress: Option<Arc<crate::network::http::body::Progress>>) -> Self {
        match self {
            Lease::Http1(l) => Lease::Http1(l.with_request(progress)),
            h2 => h2,
        }
    }

    pub fn give_back(self) {
        match self {
            Lease::Http1(l) => l.give_back(),
            Lease::Http2(stream) => drop(stream),
        }
    }
}

/// An HTTP/1.1 connection lent to one exchange; [`Http1Lease::give_back`] returns it to its pool once the response
/// has been read to the end. Dropped unreturned (an abandoned response), the connection closes.
#[derive(Debug)]
pub struct Http1Lease {
    pools: Shared,
    cluster: Arc<Cluster>,
    key: PoolKey,
    conn: Http1Conn,
    /// The request body's progress: a connection whose request was not sent to its end is not reusable.
    request: Option<Arc<crate::network::http::body::Progress>>,
}

impl Http1Lease {
    /// Notes the request body whose end must have been sent before the connection can serve another exchange.
    pub fn with_request(mut self, progress: Option<Arc<crate::network::http::body::Progress>>) -> Self {
        self.request = progress;
        self
    }

    pub fn give_back(mut self) {
        if self.request.as_ref().is_some_and(|p| !p.done.load(std::sync::atomic::Ordering::Relaxed)) {
            // The response ended while the request was still uploading (an early 4xx): Envoy does not reuse such a
            // connection, and hyper would not take a new request on it until the upload ends.
            return;
        }
        if self.cluster.connection_expired(self.conn.born) {
            // Its max_connection_duration passed while it was lent: it closes now that its exchange is over.
            return;
        }
        self.conn.idle_since = Instant::now();
        let mut clusters = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pools) = clusters.get_mut(self.cluster.name()) else { return };
        // A lease from a cluster version CDS has since replaced goes away with it.
        if !std::ptr::eq(pools.cluster.as_ptr(), Arc::as_ptr(&self.cluster)) {
            return;
        }
        pools.hosts.entry(self.key).or_default().http1.push(self.conn);
    }
}

/// The host's pool of this very cluster version, if it has one (pools of a replaced cluster are not used).
fn host_pool<'a>(
    clusters: &'a mut HashMap<String, ClusterPools>,
    cluster: &Arc<Cluster>,
    key: &PoolKey,
) -> Option<&'a mut HostPool> {
    let pools = clusters.get_mut(cluster.name())?;
    if !std::ptr::eq(pools.cluster.as_ptr(), Arc::as_ptr(cluster)) {
        return None;
    }
    pools.hosts.get_mut(key)
}

/// The cluster's pools, replaced when the cluster itself was (a CDS update): old connections are let go.
fn entry<'a>(clusters: &'a mut HashMap<String, ClusterPools>, cluster: &Arc<Cluster>) -> &'a mut ClusterPools {
    let pools = clusters
        .entry(cluster.name().to_string())
        .or_insert_with(|| ClusterPools { cluster: Arc::downgrade(cluster), hosts: HashMap::new() });
    if !std::ptr::eq(pools.cluster.as_ptr(), Arc::as_ptr(cluster)) {
        *pools = ClusterPools { cluster: Arc::downgrade(cluster), hosts: HashMap::new() };
    }
    pools
}

impl HttpPools {
    /// Sends a request to `host` over a pooled connection, or over a new one. For HTTP/1.1 the connection comes back
    /// as a [`Lease`] to return when the response body is done (unless it reached `max_requests_per_connection`).
    /// `ready` is told when the request has its connection and goes out (Envoy's onPoolReady).
    pub async fn send(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        protocol: Protocol,
        req: Request<ProxyBody>,
        ready: Option<&Notify>,
    ) -> Result<(Response<Incoming>, Option<Lease>), PoolError> {
        let sni = cluster.config.http.auto_sni.as_ref().and_then(|header| auto_sni(&req, header.as_ref()));
        let key = (host.address, sni);
        match protocol {
            Protocol::Http1 => self.send_http1(cluster, host, key, req, ready).await,
            Protocol::Http2 => {
                self.send_http2(cluster, host, key, req, ready).await.map(|(r, s)| (r, Some(Lease::Http2(s))))
            }
        }
    }

    async fn send_http1(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: PoolKey,
        mut req: Request<ProxyBody>,
        ready: Option<&Notify>,
    ) -> Result<(Response<Incoming>, Option<Lease>), PoolError> {
        let limit = cluster.config.http.max_requests_per_connection;
        // An idle connection may turn out to be gone when the request is tried on it; the request comes back unsent
        // and goes to the next one, ending with a fresh connection.
        loop {
            let (mut conn, fresh) = match self.take_http1(cluster, &key) {
                Some(c) => (c, false),
                None => {
                    let _pending = cluster.start_pending().ok_or(PoolError::PendingOverflow)?;
                    // Boxed: connecting is the rare path and its future is large; inline it would be copied with
                    // every request's future.
                    (Box::pin(self.connect_http1(cluster, host, &key)).await?, true)
                }
            };
            if !fresh && conn.sender.ready().await.is_err() {
                continue;
            }
            conn.uses += 1;
            if let Some(r) = ready {
                r.notify_one();
            }
            match conn.sender.try_send_request(req).await {
                Ok(resp) => {
                    let reusable = limit.is_none_or(|l| conn.uses < l);
                    // The cluster's pools exist from here on, so a returned lease finds them.
                    let _ = entry(&mut self.clusters.lock().unwrap_or_else(|p| p.into_inner()), cluster);
                    let lease = reusable.then(|| {
                        Lease::Http1(Http1Lease {
                            pools: self.clusters.clone(),
                            cluster: cluster.clone(),
                            key: key.clone(),
                            conn,
                            request: None,
                        })
                    });
                    return Ok((resp, lease));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => req = r,
                    _ => return Err(PoolError::Reset(e.into_error())),
                },
            }
        }
    }

    async fn send_http2(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: PoolKey,
        mut req: Request<ProxyBody>,
        ready: Option<&Notify>,
    ) -> Result<(Response<Incoming>, StreamCount), PoolError> {
        let limit = cluster.config.http.max_requests_per_connection;
        loop {
            let (mut sender, stream, fresh) = match self.take_http2(cluster, &key, limit) {
                Some((s, stream)) => (s, stream, false),
                None if limit == Some(1) => {
                    // A connection per request: nothing to share or wait for.
                    let _pending = cluster.start_pending().ok_or(PoolError::PendingOverflow)?;
                    let (sender, streams) = Box::pin(self.connect_http2(cluster, host, &key)).await?;
                    let stream = streams.open();
                    (sender, stream, true)
                }
                None => {
                    let _pending = cluster.start_pending().ok_or(PoolError::PendingOverflow)?;
                    let mine = Arc::new(Connecting::new());
                    let other = {
                        let mut clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
                        let pool = entry(&mut clusters, cluster).hosts.entry(key.clone()).or_default();
                        match &pool.h2_connecting {
                            Some(c) => Some(c.clone()),
                            None => {
                                pool.h2_connecting = Some(mine.clone());
                                None
                            }
                        }
                    };
                    if let Some(other) = other {
                        let mut outcome = other.outcome.subscribe();
                        // The sender lives in `other`, so the wait ends only with an outcome.
                        let failed = match outcome.wait_for(Option::is_some).await {
                            Ok(o) => o.as_ref().and_then(|r| r.as_ref().err().cloned()),
                            Err(_) => None,
                        };
                        if let Some(why) = failed {
                            return Err(PoolError::Shared(host.address, why));
                        }
                        continue;
                    }
                    let mut opening = Opening { pools: self, cluster, key: &key, connecting: mine, over: false };
                    match Box::pin(self.connect_http2(cluster, host, &key)).await {
                        Ok((sender, streams)) => {
                            let stream = streams.open();
                            opening.finish(Some(Http2Conn { sender: sender.clone(), uses: 1, streams }), None);
                            (sender, stream, true)
                        }
                        Err(e) => {
                            opening.finish(None, Some(e.to_string()));
                            return Err(e);
                        }
                    }
                }
            };
            if let Some(r) = ready {
                r.notify_one();
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, stream)),
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => req = r,
                    _ => return Err(PoolError::Reset(e.into_error())),
                },
            }
        }
    }

    fn take_http1(&self, cluster: &Arc<Cluster>, key: &PoolKey) -> Option<Http1Conn> {
        let mut clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let pool = host_pool(&mut clusters, cluster, key)?;
        let idle = cluster.config.http.idle_timeout;
        let now = Instant::now();
        while let Some(conn) = pool.http1.pop() {
            let expired = idle.is_some_and(|idle| now.duration_since(conn.idle_since) >= idle);
            if expired {
                // Its timer has not fired yet; the connection closes as it is dropped here.
                cluster.stats.upstream_cx_idle_timeout.inc();
            } else if cluster.connection_expired(conn.born) {
                // Likewise for its max_connection_duration.
            } else if !conn.sender.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    /// The host's HTTP/2 connection, counting this request against `max_requests_per_connection`: the request that
    /// reaches the limit takes the connection out of the pool (it closes once its streams finish).
    fn take_http2(
        &self,
        cluster: &Arc<Cluster>,
        key: &PoolKey,
        limit: Option<u32>,
    ) -> Option<(http2::SendRequest<ProxyBody>, StreamCount)> {
        let mut clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let pool = host_pool(&mut clusters, cluster, key)?;
        // An expired connection takes no new stream and closes once its streams end.
        pool.http2.retain(|c| !c.sender.is_closed() && !cluster.connection_expired(c.streams.born));
        // The first with room under the cluster's max_concurrent_streams, as Envoy's pool assigns streams; none
        // with room makes the caller open another connection.
        let cap = cluster.config.http.max_concurrent_streams;
        let i = pool.http2.iter().position(|c| cap.is_none_or(|cap| c.streams.open.load(Ordering::Relaxed) < cap))?;
        let conn = &mut pool.http2[i];
        conn.uses += 1;
        // Counted open before the lock goes, so the idle timer never closes a connection a request was given.
        let taken = (conn.sender.clone(), conn.streams.open());
        if limit.is_some_and(|l| conn.uses >= l) {
            pool.http2.remove(i);
        }
        Some(taken)
    }

    async fn connect_http1(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: &PoolKey,
    ) -> Result<Http1Conn, PoolError> {
        let (io, addr, slot) = connect_io(cluster, host, key.1.as_deref()).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake::<_, ProxyBody>(TokioIo::new(io))
            .await
            .map_err(|e| PoolError::Handshake(addr, e))?;
        static IDS: AtomicU64 = AtomicU64::new(0);
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        let idle = self.idle_timer(cluster, key, Pooled::Http1(id));
        let aged = self.age_timer(cluster, key, Pooled::Http1(id));
        let home = PoolRef::new(&self.clusters, cluster, key);
        tokio::spawn(async move {
            tokio::select! {
                r = conn.with_upgrades() => if let Err(e) = r {
                    debug!(upstream = %addr, "upstream connection ended: {e}");
                },
                () = idle => debug!(upstream = %addr, "upstream connection closed by its idle timeout"),
                () = aged => debug!(upstream = %addr, "upstream connection closed at its max_connection_duration"),
            }
            drop(slot);
            home.prune();
        });
        Ok(Http1Conn { sender, uses: 0, born: Instant::now(), idle_since: Instant::now(), id })
    }

    async fn connect_http2(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: &PoolKey,
    ) -> Result<(http2::SendRequest<ProxyBody>, Arc<Streams>), PoolError> {
        let (io, addr, slot) = connect_io(cluster, host, key.1.as_deref()).await?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        let (sender, conn) =
            builder.handshake::<_, ProxyBody>(TokioIo::new(io)).await.map_err(|e| PoolError::Handshake(addr, e))?;
        let streams = Streams::new();
        let idle = self.idle_timer(cluster, key, Pooled::Http2(streams.clone()));
        let aged = self.age_timer(cluster, key, Pooled::Http2(streams.clone()));
        let home = PoolRef::new(&self.clusters, cluster, key);
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    debug!(upstream = %addr, "upstream connection ended: {e}");
                },
                () = idle => debug!(upstream = %addr, "upstream connection closed by its idle timeout"),
                () = aged => debug!(upstream = %addr, "upstream connection closed at its max_connection_duration"),
            }
            drop(slot);
            home.prune();
        });
        Ok((sender, streams))
    }
}

/// Which connection an idle timer watches.
enum Pooled {
    Http1(u64),
    Http2(Arc<Streams>),
}

/// A connection task's way back to its pool: this very cluster version's pool for its host (a removed cluster's
/// pools are still found by name; a replaced cluster's are not its own any more).
struct PoolRef {
    pools: Shared,
    version: Weak<Cluster>,
    name: String,
    key: PoolKey,
}

impl PoolRef {
    fn new(pools: &Shared, cluster: &Arc<Cluster>, key: &PoolKey) -> Self {
        PoolRef {
            pools: pools.clone(),
            version: Arc::downgrade(cluster),
            name: cluster.name().to_string(),
            key: key.clone(),
        }
    }

    /// Forgets the pool once it holds no connection, so that pools keyed by names a client chose (auto_sni) do not
    /// pile up.
    fn prune(&self) {
        let mut clusters = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = clusters.get_mut(&self.name).filter(|p| Weak::ptr_eq(&p.cluster, &self.version))
            && p.hosts
                .get(&self.key)
                .is_some_and(|h| h.http1.is_empty() && h.http2.is_empty() && h.h2_connecting.is_none())
        {
            p.hosts.remove(&self.key);
        }
    }

    fn with<R>(&self, f: impl FnOnce(Option<&mut HostPool>) -> R) -> R {
        let mut clusters = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let pool = clusters
            .get_mut(&self.name)
            .filter(|p| Weak::ptr_eq(&p.cluster, &self.version))
            .and_then(|p| p.hosts.get_mut(&self.key));
        f(pool)
    }
}

impl Pooled {
    /// Takes this HTTP/2 connection out of `pool` if it is pooled, so no new stream goes to it.
    fn unpool_http2(streams: &Arc<Streams>, pool: Option<&mut HostPool>) {
        if let Some(pool) = pool {
            pool.http2.retain(|c| !Arc::ptr_eq(&c.streams, streams));
        }
    }
}

impl HttpPools {
    /// Resolves once the connection has had no request for the cluster's idle timeout, after taking it out of the
    /// pool and counting `upstream_cx_idle_timeout`; never while an exchange uses it, never without a timeout. It
    /// only sleeps and looks when the deadline comes, so a busy connection costs it nothing per request.
    fn idle_timer(&self, cluster: &Arc<Cluster>, key: &PoolKey, conn: Pooled) -> impl Future<Output = ()> + use<> {
        let home = PoolRef::new(&self.clusters, cluster, key);
        let timeout = cluster.config.http.idle_timeout;
        let counter = cluster.stats.upstream_cx_idle_timeout.clone();
        async move {
            let Some(timeout) = timeout else { return std::future::pending().await };
            let mut deadline = Instant::now() + timeout;
            loop {
                tokio::time::sleep_until(deadline).await;
                let now = Instant::now();
                let idle_since = home.with(|pool| match (&conn, pool) {
                    (Pooled::Http1(id), Some(pool)) => match pool.http1.iter().position(|c| c.id == *id) {
                        Some(i) if now.duration_since(pool.http1[i].idle_since) >= timeout => {
                            pool.http1.remove(i);
                            None
                        }
                        Some(i) => Some(pool.http1[i].idle_since),
                        // Lent to an exchange: looked at again a timeout from now.
                        None => Some(now),
                    },
                    // Out of every pool, an HTTP/1.1 connection closes with its last sender.
                    (Pooled::Http1(_), None) => Some(now),
                    (Pooled::Http2(streams), pool) => match streams.idle_since() {
                        Some(since) if now.duration_since(since) >= timeout => {
                            Pooled::unpool_http2(streams, pool);
                            None
                        }
                        Some(since) => Some(since),
                        None => Some(now),
                    },
                });
                match idle_since {
                    Some(since) => deadline = since + timeout,
                    None => {
                        counter.inc();
                        return;
                    }
                }
            }
        }
    }
}

impl HttpPools {
    /// Resolves when the connection should close for its max_connection_duration, counting
    /// `upstream_cx_max_duration_reached`: at once if it sits idle in the pool then, else once its exchanges are
    /// over (it takes no new one). Never without a limit.
    fn age_timer(&self, cluster: &Arc<Cluster>, key: &PoolKey, conn: Pooled) -> impl Future<Output = ()> + use<> {
        let home = PoolRef::new(&self.clusters, cluster, key);
        let limit = cluster.config.http.max_connection_duration;
        let counter = cluster.stats.upstream_cx_max_duration_reached.clone();
        let born = Instant::now();
        async move {
            let Some(limit) = limit else { return std::future::pending().await };
            tokio::time::sleep_until(born + limit).await;
            counter.inc();
            loop {
                let done = home.with(|pool| match (&conn, pool) {
                    (Pooled::Http1(id), Some(pool)) => match pool.http1.iter().position(|c| c.id == *id) {
                        Some(i) => {
                            pool.http1.remove(i);
                            true
                        }
                        None => false,
                    },
                    (Pooled::Http1(_), None) => false,
                    (Pooled::Http2(streams), pool) => {
                        Pooled::unpool_http2(streams, pool);
                        streams.open.load(Ordering::Relaxed) == 0
                    }
                });
                if done {
                    return;
                }
                // Lent to an exchange (HTTP/1.1, closed when it comes back) or streams still open (HTTP/2): the
                // connection's own end or this check, whichever comes first.
                tokio::time::sleep(AGED_POLL).await;
            }
        }
    }
}

/// How often a connection past its max_connection_duration looks whether its last exchange is over.
const AGED_POLL: Duration = Duration::from_millis(250);

type UpstreamIo = tokio_util::either::Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// A new connection to `host`, with TLS when the host's transport socket is an UpstreamTlsContext (the handshake
/// shares the connect timeout).
async fn connect_io(
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    sni: Option<&str>,
) -> Result<(UpstreamIo, SocketAddr, super::cluster::ConnectionSlot), PoolError> {
    use tokio_util::either::Either;
    let upstream = cluster.connect_to(host.clone()).await?;
    let (stream, host, slot) = upstream.into_parts();
    let addr = host.address;
    let io = match cluster.config.tls_for(host.labels.as_deref()) {
        None => Either::Left(stream),
        Some(tls) => match tokio::time::timeout(cluster.config.connect_timeout, tls.connect(stream, addr, sni)).await {
            Ok(Ok(s)) => Either::Right(Box::new(s)),
            Ok(Err(e)) => return Err(PoolError::Tls(addr, e)),
            Err(_) => {
                return Err(PoolError::Tls(
                    addr,
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
                ));
            }
        },
    };
    Ok((io, addr, slot))
}

/// The SNI `auto_sni` gives a new upstream connection: the request's host (or the `override_auto_sni_header`'s
/// value) without its port, as Envoy takes it after routing; none for an IP address, which SNI cannot carry.
fn auto_sni(req: &Request<ProxyBody>, header: Option<&http::HeaderName>) -> Option<Arc<str>> {
    let value = match header {
        Some(h) => req.headers().get(h)?.to_str().ok()?,
        None => match req.headers().get(http::header::HOST) {
            Some(v) => v.to_str().ok()?,
            None => req.uri().authority()?.as_str(),
        },
    };
    let host = &value[..crate::network::http::route::port_start(value.as_bytes()).unwrap_or(value.len())];
    // A bracketed IPv6 literal, like any IP address, cannot be an SNI.
    if host.is_empty() || host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    Some(Arc::from(host))
}
