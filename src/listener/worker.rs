//! Workers: one OS thread each with its own current-thread tokio runtime (pinned to a CPU of its own with Envoy's
//! `enable_worker_cpu_affinity`). A worker watches the published [`ListenerSet`], runs one accept loop per bound
//! listener on that listener's socket for this worker, and serves each accepted connection in its own task on this
//! worker.
//!
//! The connection path reads config only from immutable snapshots: the listener (`Arc`) its accept loop holds, and
//! the cluster set loaded from an `ArcSwap`. It never takes a lock the control path can hold.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info_span, warn};

use super::filter_chain::{FilterChain, NetworkFilter};
use super::filters::{self, Detected, FilterStats};
use super::{Listener, ListenerCore};
use crate::network::direct_response;
use crate::network::http::ChainContext;
use crate::network::tcp_proxy::Downstream;
use crate::stats::{GaugeGuard, Store};
use crate::upstream::ClusterSet;
use crate::upstream::pool::HttpPools;

/// Every listener version that is currently serving, as published by the manager.
#[derive(Debug, Default)]
pub struct ListenerSet {
    pub listeners: Vec<Arc<Listener>>,
    /// Every listener, bound or not, by address: the original-destination hand-off looks targets up here.
    by_address: HashMap<SocketAddr, Arc<ListenerCore>>,
}

impl ListenerSet {
    pub fn new(listeners: Vec<Arc<Listener>>) -> Self {
        let by_address = listeners.iter().map(|l| (l.local_address, l.core.clone())).collect();
        ListenerSet { listeners, by_address }
    }

    /// The listener a `use_original_dst` connection to `dst` is handed to (see [`super::handoff_lookup`]).
    pub fn handoff_target(&self, dst: SocketAddr) -> Option<&Arc<ListenerCore>> {
        super::handoff_lookup(dst, |a| self.by_address.get(a), |l| l.config.socket.ipv4_compat)
    }
}

/// See [`timer_heartbeat`].
const HEARTBEAT: Duration = Duration::from_millis(200);

/// What every connection task on a worker can reach.
#[derive(Debug)]
pub struct WorkerContext {
    pub index: usize,
    pub clusters: Arc<ArcSwap<ClusterSet>>,
    /// The published listener set, for the hand-off by original destination.
    pub listeners: Arc<ArcSwap<ListenerSet>>,
    pub filter_stats: FilterStats,
    /// This worker's HTTP connection pools.
    pub http_pools: HttpPools,
    /// /healthcheck/fail is in force: HTTP connections on `drain_type: DEFAULT` listeners drain-close.
    pub health_check_failed: Arc<std::sync::atomic::AtomicBool>,
    /// The node's cluster (`node.cluster` / `--service-cluster`), which the health check filter names in its answers.
    pub local_cluster: Arc<str>,
}

/// What workers know of the proxy itself.
#[derive(Debug, Clone, Default)]
pub struct LocalInfo {
    pub health_check_failed: Arc<std::sync::atomic::AtomicBool>,
    pub cluster: Arc<str>,
}

/// The worker threads and the channel the manager publishes listener sets through.
#[derive(Debug)]
pub struct Workers {
    set: Arc<ArcSwap<ListenerSet>>,
    version: watch::Sender<u64>,
    shutdown: CancellationToken,
    threads: Vec<JoinHandle<()>>,
    /// Workers that have started their runtime; `listener_manager.workers_started` turns 1 at `threads.len()`.
    started: watch::Receiver<usize>,
    /// The CPU each worker is pinned to (`enable_worker_cpu_affinity`), by worker index; None unless all are.
    cpus: Option<Arc<[usize]>>,
}

impl Workers {
    /// Starts `count` workers; with `pin`, worker i runs on the i-th CPU of the process's affinity mask (Envoy's
    /// `enable_worker_cpu_affinity`), unless there are more workers than CPUs in the mask, when none is pinned.
    pub fn start(
        count: usize,
        clusters: Arc<ArcSwap<ClusterSet>>,
        store: &Store,
        local: LocalInfo,
        pin: bool,
    ) -> io::Result<Workers> {
        let cpus: Option<Arc<[usize]>> = match pin.then(allowed_cpus) {
            None => None,
            Some(Ok(allowed)) if count <= allowed.len() => Some(allowed[..count].into()),
            Some(Ok(allowed)) => {
                warn!(
                    workers = count,
                    cpus = allowed.len(),
                    "enable_worker_cpu_affinity: more workers than CPUs, none pinned"
                );
                None
            }
            Some(Err(e)) => {
                warn!("enable_worker_cpu_affinity: cannot read the process's CPUs ({e}), none pinned");
                None
            }
        };
        // Each worker reports its pinning before start returns, so listeners are steered only to pinned workers.
        let (pinned_tx, pinned_rx) = std::sync::mpsc::channel::<bool>();
        let set = Arc::new(ArcSwap::from_pointee(ListenerSet::default()));
        let (version, _) = watch::channel(0u64);
        let (started_tx, started) = watch::channel(0usize);
        let started_tx = Arc::new(started_tx);
        let shutdown = CancellationToken::new();
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let ctx = Arc::new(WorkerContext {
                index,
                clusters: clusters.clone(),
                listeners: set.clone(),
                filter_stats: FilterStats::new(store),
                http_pools: HttpPools::default(),
                health_check_failed: local.health_check_failed.clone(),
                local_cluster: local.cluster.clone(),
            });
            let set = set.clone();
            let rx = version.subscribe();
            let stop = shutdown.clone();
            let started_tx = started_tx.clone();
            let cpu = cpus.as_ref().map(|c| c[index]);
            let pinned_tx = pinned_tx.clone();
            let handle = std::thread::Builder::new().name(format!("worker_{index}")).spawn(move || {
                if let Some(cpu) = cpu {
                    let pinned = pin_current_thread(cpu);
                    if let Err(e) = &pinned {
                        warn!(worker = index, cpu, "cannot pin the worker to its CPU: {e}");
                    }
                    let _ = pinned_tx.send(pinned.is_ok());
                }
                // Gone before the runtime starts, so start's wait ends even if a worker dies early.
                drop(pinned_tx);
                // Each worker counts into its own stats shard (no cache line shared with another worker).
                crate::stats::set_thread_shard(index + 1);
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        error!(worker = index, "cannot start worker runtime: {e}");
                        return;
                    }
                };
                started_tx.send_modify(|n| *n += 1);
                rt.block_on(run(ctx, set, rx, stop));
            })?;
            threads.push(handle);
        }
        drop(pinned_tx);
        // A worker that could not be pinned (or died first) leaves its CPU to others: no steering then.
        let cpus = cpus.filter(|c| pinned_rx.iter().take(c.len()).filter(|ok| *ok).count() == c.len());
        Ok(Workers { set, version, shutdown, threads, started, cpus })
    }

    pub fn count(&self) -> usize {
        self.threads.len()
    }

    /// The CPU each worker is pinned to, by worker index; None unless every worker is pinned.
    pub fn cpus(&self) -> Option<&[usize]> {
        self.cpus.as_deref()
    }

    /// Waits until every worker thread runs its runtime.
    pub async fn wait_started(&self) -> bool {
        let n = self.threads.len();
        let mut rx = self.started.clone();
        rx.wait_for(|s| *s >= n).await.is_ok()
    }

    /// Makes `set` what every worker serves. Workers start accept loops for new listener versions before they stop
    /// the loops of versions that are gone.
    pub fn publish(&self, set: ListenerSet) {
        self.set.store(Arc::new(set));
        self.version.send_modify(|v| *v += 1);
    }
    /// Stops the workers. Connections still open are dropped with their runtimes, so drain first.
    pub fn stop(&mut self) {
        self.shutdown.cancel();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Keeps the worker's timer wheel from ever being empty or far off. tokio wakes its driver through an eventfd
/// whenever a new timer is due before the driver's next planned wake-up, even from the driver's own thread; with a
/// wake-up always planned within [`HEARTBEAT`], the per-connection timers (connect timeouts, idle and route
/// timeouts, all longer) register without that syscall and the spurious wake-up after it.
async fn timer_heartbeat(stop: CancellationToken) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
    }
}

async fn run(
    ctx: Arc<WorkerContext>,
    set: Arc<ArcSwap<ListenerSet>>,
    mut version: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    let mut running: HashMap<u64, CancellationToken> = HashMap::new();
    tokio::spawn(timer_heartbeat(stop.clone()));
    loop {
        reconcile(&ctx, &set.load_full(), &mut running);
        tokio::select! {
            changed = version.changed() => if changed.is_err() { break },
            _ = stop.cancelled() => break,
        }
    }
    for token in running.values() {
        token.cancel();
    }
}

fn reconcile(ctx: &Arc<WorkerContext>, set: &ListenerSet, running: &mut HashMap<u64, CancellationToken>) {
    for l in &set.listeners {
        if running.contains_key(&l.id) {
            continue;
        }
        let Some(sock) = l.socket_for_worker(ctx.index) else { continue };
        // A dup of the listening socket: the kernel socket (and its accept queue) lives while any copy is open.
        let sock = match sock.try_clone().and_then(tokio::net::TcpListener::from_std) {
            Ok(s) => s,
            Err(e) => {
                error!(listener = %l.name(), worker = ctx.index, "cannot use listen socket: {e}");
                continue;
            }
        };
        let token = CancellationToken::new();
        running.insert(l.id, token.clone());
        let span = info_span!("listener", listener = %l.name(), worker = ctx.index);
        tokio::spawn(accept_loop(l.clone(), sock, token, ctx.clone()).instrument(span));
    }
    let ids: std::collections::HashSet<u64> = set.listeners.iter().map(|l| l.id).collect();
    running.retain(|id, token| {
        let keep = ids.contains(id);
        if !keep {
            token.cancel();
        }
        keep
    });
}

async fn accept_loop(
    listener: Arc<Listener>,
    sock: tokio::net::TcpListener,
    stop: CancellationToken,
    ctx: Arc<WorkerContext>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = sock.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                // Spawned at once: nothing a client does (or does not do) can hold up accepting.
                let span = info_span!("conn", downstream.addr = %peer, filter_chain = tracing::field::Empty);
                // A listener bound to one IP and port knows every connection's local address: no getsockname.
                let local = (!listener.local_address.ip().is_unspecified()).then_some(listener.local_address);
                tokio::spawn(serve(listener.core.clone(), stream, peer, local, ctx.clone()).instrument(span));
            }
            Err(e) => match accept_error_kind(&e) {
                AcceptError::Connection => debug!("accept: {e}"),
                AcceptError::Resources => {
                    warn!("accept: {e}; backing off {backoff:?}");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                AcceptError::Fatal => {
                    error!("accept failed, listener stops accepting on this worker: {e}");
                    return;
                }
            },
        }
    }
}

/// The CPUs this process may run on, ascending.
pub(crate) fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed, which the kernel fills.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: every index is below CPU_SETSIZE, inside `set`.
    Ok((0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect())
}

pub(crate) fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("CPU {cpu} is past CPU_SETSIZE")));
    }
    // SAFETY: `cpu` is below CPU_SETSIZE, inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

enum AcceptError {
    /// The connection died in the queue; the next accept is fine.
    Connection,
    /// Out of descriptors or memory: back off and retry.
    Resources,
    Fatal,
}

fn accept_error_kind(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Resources,
        Some(
            libc::ECONNABORTED
            | libc::ECONNRESET
            | libc::EPROTO
            | libc::EPERM
            | libc::EINTR
            | libc::EAGAIN
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH,
        ) => AcceptError::Connection,
        _ => AcceptError::Fatal,
    }
}

/// Terminates TLS for a chain with a DownstreamTlsContext; None (counted, connection closed) on failure. There is no
/// handshake timeout by default, as in Envoy (its `transport_socket_connect_timeout` is unset), but a drain's
/// deadline ends a stuck handshake like any connection.
async fn handshake(
    stream: TcpStream,
    tls: &crate::tls::DownstreamTls,
    ssl: &crate::tls::SslStats,
    mut drain: crate::drain::DrainWatch,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let side = match tls.server() {
        Ok(side) => side,
        Err(e) => {
            ssl.connection_error.inc();
            debug!("closing: TLS context not ready: {e}");
            return None;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(side.config.clone());
    let done = tokio::select! {
        r = acceptor.accept(stream) => r,
        _ = drain.closed() => return None,
    };
    match done {
        Ok(s) => {
            if side.check_peer(s.get_ref().1).is_err() {
                ssl.fail_verify_san.inc();
                ssl.connection_error.inc();
                debug!("closing: the peer certificate matches no subject alt name");
                return None;
            }
            if s.get_ref().1.peer_certificates().is_none() {
                ssl.no_certificate.inc();
            }
            ssl.handshake.inc();
            Some(s)
        }
        Err(e) => {
            // Envoy tells a peer certificate that fails verification from one that was required and missing.
            match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::InvalidCertificate(_)) => ssl.fail_verify_error.inc(),
                Some(rustls::Error::NoCertificatesPresented) => ssl.fail_verify_no_cert.inc(),
                _ => {}
            }
            ssl.connection_error.inc();
            debug!("closing: TLS handshake failed: {e}");
            None
        }
    }
}

/// Hands a connection (plain or decrypted) to its chain's terminal filter.
async fn dispatch(
    down: Downstream,
    chain: &FilterChain,
    listener: &ListenerCore,
    det: &Detected,
    drain: crate::drain::DrainWatch,
    ctx: &Arc<WorkerContext>,
) {
    let limit = listener.config.per_connection_buffer_limit_bytes;
    match (&chain.filter, down) {
        (NetworkFilter::TcpProxy(tp), down) => tp.serve(down, det, drain, ctx, limit, chain.name()).await,
        (NetworkFilter::Http(hcm), Downstream::Plain(s)) => {
            let chain = ChainContext {
                name: chain.name(),
                drain_type: listener.config.drain_type,
                secure: false,
                buffer_limit: limit,
            };
            Box::pin(hcm.clone().serve(s, det, drain, ctx.clone(), chain)).await
        }
        (NetworkFilter::Http(hcm), Downstream::Tls(s)) => {
            let chain = ChainContext {
                name: chain.name(),
                drain_type: listener.config.drain_type,
                secure: true,
                buffer_limit: limit,
            };
            Box::pin(hcm.clone().serve(*s, det, drain, ctx.clone(), chain)).await
        }
        (NetworkFilter::DirectResponse(body), Downstream::Plain(s)) => direct_response::serve(s, body, drain).await,
        (NetworkFilter::DirectResponse(body), Downstream::Tls(s)) => {
            Box::pin(direct_response::serve(*s, body, drain)).await
        }
    }
}

/// Serves one accepted connection: listener filters, the hand-off by original destination, chain selection, the
/// chain's terminal filter.
async fn serve(
    accepting: Arc<ListenerCore>,
    mut stream: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    ctx: Arc<WorkerContext>,
) {
    // TCP_NODELAY, which Envoy sets on accepted connections, came with the connection from its listening socket
    // (socket::bind_one).
    let local = match local.map_or_else(|| stream.local_addr(), Ok) {
        Ok(a) => a,
        Err(e) => {
            debug!("connection gone before it was served: {e}");
            return;
        }
    };
    let mut det = Detected::new(local, peer);
    let pre = GaugeGuard::new(&accepting.stats.downstream_pre_cx_active);
    if !listener_filters(&mut stream, &accepting, &mut det, &ctx).await {
        return;
    }
    let mut listener = accepting;
    if listener.config.use_original_dst && det.local_restored {
        let target = ctx.listeners.load().handoff_target(det.local).filter(|t| !Arc::ptr_eq(t, &listener)).cloned();
        // Handed off once: the target's own filters run, but its use_original_dst is not consulted again.
        if let Some(target) = target {
            debug!(listener = %target.config.name, original_dst = %det.local, "handing off by original destination");
            listener = target;
            if !listener_filters(&mut stream, &listener, &mut det, &ctx).await {
                return;
            }
        }
    }
    drop(pre);
    serve_on(&listener, stream, &det, &ctx).await;
}

/// Runs a listener's filters under its `listener_filters_timeout`; false means the connection is closed.
async fn listener_filters(
    stream: &mut TcpStream,
    listener: &ListenerCore,
    det: &mut Detected,
    ctx: &WorkerContext,
) -> bool {
    if listener.config.listener_filters.is_empty() {
        return true;
    }
    let mut version = listener.pending.watch();
    let run = filters::run(stream, &listener.config, det, &ctx.filter_stats);
    let limited = async {
        match listener.config.listener_filters_timeout {
            Some(limit) => tokio::time::timeout(limit, run).await.map_err(|_| ()),
            None => Ok(run.await),
        }
    };
    let outcome = tokio::select! {
        r = limited => r,
        // Istio turns listener_filters_timeout off: without this, a silent client would outlive its listener.
        _ = version.closed() => {
            debug!("closing during listener filters: the listener's drain is over");
            return false;
        }
    };
    let result = match outcome {
        Ok(r) => r,
        Err(()) => {
            listener.stats.downstream_pre_cx_timeout.inc();
            if listener.config.continue_on_listener_filters_timeout {
                // Envoy goes on to chain matching with whatever the filters found so far.
                return true;
            }
            debug!("closing: listener filters timed out");
            return false;
        }
    };
    match result {
        Ok(()) => true,
        Err(e) => {
            debug!("closing during listener filters: {e}");
            false
        }
    }
}

/// The connection's life on its final listener, whose stats it counts in.
async fn serve_on(listener: &ListenerCore, stream: TcpStream, det: &Detected, ctx: &Arc<WorkerContext>) {
    let stats = &listener.stats;
    stats.downstream_cx_total.inc();
    let _active = GaugeGuard::new(&stats.downstream_cx_active);
    let _on_worker = stats.per_worker.get(ctx.index).map(|(total, active)| {
        total.inc();
        GaugeGuard::new(active)
    });
    let Some(chain) = listener.chains.select(det).cloned() else {
        stats.no_filter_chain_match.inc();
        if !listener.config.access_log.is_empty() {
            let entry = crate::access_log::Entry {
                start: Some(std::time::SystemTime::now()),
                downstream_remote: Some(det.peer),
                downstream_local: Some(det.local),
                downstream_direct_remote: Some(det.direct_peer),
                requested_server_name: det.server_name.clone(),
                flags: vec![crate::access_log::Flag::NoRoute],
                ..Default::default()
            };
            crate::access_log::log_all(&listener.config.access_log, &entry);
        }
        stats.downstream_cx_destroy.inc();
        debug!("closing: no filter chain match");
        return;
    };
    let drain = chain.drain.watch();
    let opened = std::time::Instant::now();
    tracing::Span::current().record("filter_chain", chain.name());
    debug!(filter_chain = %chain.name(), transport = det.transport, "connection open");
    match (&chain.config.tls, &chain.ssl) {
        (Some(tls), Some(ssl)) => {
            // Boxed, as are the HTTP paths in `dispatch`: the task of every connection is as large as its largest
            // path, and a plain tcp_proxy connection should not allocate and copy the TLS and HTTP states (kilobytes).
            Box::pin(async {
                if let Some(stream) = handshake(stream, tls, ssl, drain.clone()).await {
                    dispatch(Downstream::Tls(Box::new(stream)), &chain, listener, det, drain, ctx).await;
                }
            })
            .await;
        }
        _ => dispatch(Downstream::Plain(stream), &chain, listener, det, drain, ctx).await,
    }
    stats.downstream_cx_destroy.inc();
    stats.downstream_cx_length_ms.record(opened.elapsed().as_secs_f64() * 1000.0);
    debug!(filter_chain = %chain.name(), "connection closed");
}
