//! Per-worker HTTP connection pools, one per (cluster, host): HTTP/1.1 keep-alive connections reused one request at
//! a time, and one multiplexed HTTP/2 connection per host. A worker's pools are only touched by that worker's tasks,
//! so the lock around them is never contended.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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
    /// The request was written (or may have been) and the connection failed before the response headers.
    #[error("upstream reset: {0}")]
    Reset(hyper::Error),
}

impl PoolError {
    pub fn is_connect_failure(&self) -> bool {
        matches!(self, PoolError::Connect(_) | PoolError::Handshake(..))
    }
}

#[derive(Debug)]
enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

#[derive(Debug)]
struct Pooled {
    sender: Sender,
    /// Requests sent on this connection so far.
    uses: u32,
    last_used: Instant,
}

impl Pooled {
    fn usable(&self, now: Instant, idle: Option<Duration>) -> bool {
        let closed = match &self.sender {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        };
        !closed && idle.is_none_or(|idle| now.duration_since(self.last_used) < idle)
    }

    fn ready(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }
}

#[derive(Debug, Default)]
struct HostPool {
    http1: Vec<Pooled>,
    http2: Option<Pooled>,
}

#[derive(Debug)]
struct ClusterPools {
    /// The cluster version these pools belong to: a replaced cluster starts afresh.
    cluster: Weak<Cluster>,
    hosts: HashMap<(SocketAddr, Protocol), HostPool>,
}

/// One worker's pools for every cluster it has sent HTTP requests to.
#[derive(Debug, Default)]
pub struct HttpPools {
    clusters: Mutex<HashMap<String, ClusterPools>>,
}

impl HttpPools {
    /// Sends a request to `host` over a pooled connection, or over a new one.
    pub async fn send(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        protocol: Protocol,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, PoolError> {
        let settings = &cluster.config.http;
        let limit = settings.max_requests_per_connection;
        // A pooled connection may turn out to be gone when the request is tried on it; the request comes back
        // unsent and goes to the next candidate, ending with a fresh connection.
        loop {
            let pooled = self.take(cluster, host.address, protocol);
            let fresh = pooled.is_none();
            let mut conn = match pooled {
                Some(c) => c,
                None => self.connect(cluster, host, protocol).await?,
            };
            conn.uses += 1;
            conn.last_used = Instant::now();
            let last_use = limit.is_some_and(|l| conn.uses >= l);
            match &mut conn.sender {
                Sender::H1(s) => {
                    let sent = s.try_send_request(req);
                    if !last_use {
                        // Back in the pool at once: it reports ready again when this exchange has finished.
                        self.put(cluster, host.address, protocol, conn);
                    }
                    match sent.await {
                        Ok(resp) => return Ok(resp),
                        Err(mut e) => match e.take_message() {
                            Some(r) if !fresh => req = r,
                            _ => return Err(PoolError::Reset(e.into_error())),
                        },
                    }
                }
                Sender::H2(s) => {
                    let sent = s.try_send_request(req);
                    if !last_use {
                        self.put(cluster, host.address, protocol, conn);
                    }
                    match sent.await {
                        Ok(resp) => return Ok(resp),
                        Err(mut e) => match e.take_message() {
                            Some(r) if !fresh => req = r,
                            _ => return Err(PoolError::Reset(e.into_error())),
                        },
                    }
                }
            }
        }
    }

    fn take(&self, cluster: &Arc<Cluster>, addr: SocketAddr, protocol: Protocol) -> Option<Pooled> {
        let mut clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let pools = clusters.get_mut(cluster.name())?;
        if !std::ptr::eq(pools.cluster.as_ptr(), Arc::as_ptr(cluster)) {
            return None;
        }
        let pool = pools.hosts.get_mut(&(addr, protocol))?;
        let now = Instant::now();
        let idle = cluster.config.http.idle_timeout;
        match protocol {
            Protocol::Http2 => {
                let conn = pool.http2.take()?;
                conn.usable(now, idle).then_some(conn)
            }
            Protocol::Http1 => {
                pool.http1.retain(|c| c.usable(now, idle));
                let i = pool.http1.iter().position(Pooled::ready)?;
                Some(pool.http1.swap_remove(i))
            }
        }
    }

    fn put(&self, cluster: &Arc<Cluster>, addr: SocketAddr, protocol: Protocol, conn: Pooled) {
        let mut clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let pools = clusters
            .entry(cluster.name().to_string())
            .or_insert_with(|| ClusterPools { cluster: Arc::downgrade(cluster), hosts: HashMap::new() });
        if !std::ptr::eq(pools.cluster.as_ptr(), Arc::as_ptr(cluster)) {
            // The cluster was replaced by CDS: connections to the old version's hosts are let go.
            *pools = ClusterPools { cluster: Arc::downgrade(cluster), hosts: HashMap::new() };
        }
        let pool = pools.hosts.entry((addr, protocol)).or_default();
        match conn.sender {
            Sender::H1(_) => pool.http1.push(conn),
            Sender::H2(_) => pool.http2 = Some(conn),
        }
    }

    async fn connect(&self, cluster: &Arc<Cluster>, host: &Arc<Host>, protocol: Protocol) -> Result<Pooled, PoolError> {
        let upstream = cluster.connect_to(host.clone()).await?;
        let (stream, host, slot) = upstream.into_parts();
        let addr = host.address;
        let io = TokioIo::new(stream);
        let sender = match protocol {
            Protocol::Http1 => {
                let (sender, conn) = http1::Builder::new()
                    .handshake::<_, ProxyBody>(io)
                    .await
                    .map_err(|e| PoolError::Handshake(addr, e))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(upstream = %addr, "upstream connection ended: {e}");
                    }
                    drop(slot);
                });
                Sender::H1(sender)
            }
            Protocol::Http2 => {
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake::<_, ProxyBody>(io)
                    .await
                    .map_err(|e| PoolError::Handshake(addr, e))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(upstream = %addr, "upstream connection ended: {e}");
                    }
                    drop(slot);
                });
                Sender::H2(sender)
            }
        };
        Ok(Pooled { sender, uses: 0, last_used: Instant::now() })
    }
}
