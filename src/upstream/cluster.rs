//! A cluster at runtime: its current hosts (swapped whole on DNS/EDS updates), its load balancer, its circuit
//! breakers, its outlier detection and its stats; and connecting to one of its hosts.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;

use super::lb::{HashTable, Maglev, Ring, Weights, least_of_two};
use super::outlier::{self, HostOutlier, Outcome, OutlierStats};
use crate::config::cluster::{ClusterConfig, ClusterKind, EndpointConfig, LbPolicy, SlowStart};
use crate::stats::{Counter, Gauge, GaugeGuard, Histogram, Store};

#[derive(Debug)]
pub struct Host {
    pub address: SocketAddr,
    pub weight: u32,
    pub hostname: String,
    /// The endpoint's transport socket labels (see [`ClusterConfig::tls_for`]); read at connect time so a cluster
    /// update that keeps its hosts still applies its new transport socket matches.
    pub labels: Option<Arc<[(String, String)]>>,
    /// Connections (for tcp_proxy) or requests in flight: least request's measure.
    active: AtomicU32,
    pub(super) outlier: HostOutlier,
    /// When the host's address joined the cluster ([`epoch_ms`]), for slow start; kept across host set updates.
    added_ms: AtomicU64,
    /// Its endpoint's priority (0 for hosts not from endpoints), for retries that avoid priorities already tried.
    pub priority: u32,
}

impl Host {
    pub fn new(address: SocketAddr, weight: u32, hostname: String) -> Self {
        Host {
            address,
            weight,
            hostname,
            labels: None,
            active: AtomicU32::new(0),
            outlier: HostOutlier::default(),
            added_ms: AtomicU64::new(epoch_ms()),
            priority: 0,
        }
    }

    /// A host of an endpoint, carrying the endpoint's transport socket labels and its load-balancing weight.
    pub fn of(address: SocketAddr, ep: &EndpointConfig, hostname: String, locality_weighted: bool) -> Self {
        Host {
            labels: ep.socket_labels.clone(),
            priority: ep.priority,
            ..Host::new(address, ep.lb_weight(locality_weighted), hostname)
        }
    }

    /// Taken out of load balancing by outlier detection.
    pub fn is_ejected(&self) -> bool {
        self.outlier.is_ejected()
    }

    /// Outlier detection's last judged success rates, (external, local origin); -1 for none.
    pub fn success_rates(&self) -> (f64, f64) {
        self.outlier.success_rates()
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

/// The hosts traffic may go to: every healthy host (EDS may mark some otherwise), ordered by priority, with one
/// [`Level`] per priority that has any. As in Envoy, each request first picks a priority by the levels' health
/// (with the overprovisioning factor 1.4, so the best priority keeps all traffic until fewer than 1/1.4 of its hosts are
/// in service), then a host inside it.
#[derive(Debug, Default, Clone)]
pub struct HostSet {
    pub hosts: Vec<Arc<Host>>,
    /// Every host of every priority, for `membership_total`.
    pub total: usize,
    /// The RING_HASH or MAGLEV policy the levels' hashing tables were built for; None: no tables.
    hashed_for: Option<LbPolicy>,
    /// One per priority with a host that has a weight (healthy or not), best first. With one, the whole set is that
    /// level.
    levels: Vec<Level>,
}

/// One priority's share of a [`HostSet`].
#[derive(Debug, Clone)]
struct Level {
    priority: u32,
    /// Its healthy hosts: `hosts[start..end]` (none when EDS marks them all unhealthy).
    start: usize,
    end: usize,
    /// Every host of this priority, EDS-unhealthy ones included: a level's health is healthy / all, as in Envoy.
    total: usize,
    weights: Weights,
    table: Option<Arc<HashTable>>,
    /// When EDS marks some of its hosts unhealthy: all of them, which Envoy's panic mode balances over.
    panic: Option<PanicHosts>,
}

/// A priority's hosts in panic mode: the healthy and the unhealthy ones (a host without weight never takes traffic).
#[derive(Debug, Clone)]
struct PanicHosts {
    hosts: Vec<Arc<Host>>,
    weights: Weights,
    table: Option<Arc<HashTable>>,
}

/// Envoy's default overprovisioning factor (140%): a priority with at least 1/1.4 of its hosts healthy counts as
/// fully healthy.
const OVERPROVISIONING: usize = 140;

/// The clock host join times and ejection deadlines are kept on (milliseconds, so they fit an atomic).
pub(crate) fn epoch_ms() -> u64 {
    static EPOCH: std::sync::LazyLock<std::time::Instant> = std::sync::LazyLock::new(std::time::Instant::now);
    EPOCH.elapsed().as_millis() as u64
}

fn hash_table(hosts: &[Arc<Host>], policy: LbPolicy) -> Option<HashTable> {
    let addresses: Vec<String> = hosts.iter().map(|h| h.address.to_string()).collect();
    let pairs = || addresses.iter().map(String::as_str).zip(hosts.iter().map(|h| h.weight));
    match policy {
        LbPolicy::RingHash { min, max } => Some(HashTable::Ring(Ring::build(pairs(), min, max))),
        LbPolicy::Maglev { table_size } => Some(HashTable::Maglev(Maglev::build(pairs(), table_size))),
        LbPolicy::RoundRobin | LbPolicy::LeastRequest | LbPolicy::Random | LbPolicy::ClusterProvided => None,
    }
}

/// The policy a host set's hashing tables are built for: RING_HASH and MAGLEV have tables, other policies none.
fn hashed(policy: LbPolicy) -> Option<LbPolicy> {
    matches!(policy, LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. }).then_some(policy)
}

impl HostSet {
    /// The set with the hashing tables its cluster's policy needs (built once per host set, on the control thread).
    fn for_policy(mut self, policy: LbPolicy) -> HostSet {
        if self.table_matches(policy) {
            return self;
        }
        for level in &mut self.levels {
            level.table = hash_table(&self.hosts[level.start..level.end], policy).map(Arc::new);
            if let Some(p) = &mut level.panic {
                p.table = hash_table(&p.hosts, policy).map(Arc::new);
            }
        }
        self.hashed_for = hashed(policy);
        self
    }

    fn table_matches(&self, policy: LbPolicy) -> bool {
        self.hashed_for == hashed(policy)
    }

    /// Whether the hosts span several priorities.
    pub fn has_priorities(&self) -> bool {
        self.levels.len() > 1
    }
}

impl HostSet {
    /// Every host of the cluster, with whether EDS counts it healthy. Only hosts with a weight take traffic: the
    /// healthy ones, and in panic mode the unhealthy ones of their priority too.
    pub fn new(all: Vec<(Arc<Host>, bool)>) -> Self {
        let total = all.len();
        let mut all = all;
        // Stable: hosts keep their configured order inside a priority.
        all.sort_by_key(|(h, _)| h.priority);
        let mut levels = Vec::new();
        let mut hosts: Vec<Arc<Host>> = Vec::new();
        let mut i = 0;
        while i < all.len() {
            let priority = all[i].0.priority;
            let same = all[i..].iter().take_while(|(h, _)| h.priority == priority).count();
            let level = &all[i..i + same];
            i += same;
            let start = hosts.len();
            hosts.extend(level.iter().filter(|(h, healthy)| *healthy && h.weight > 0).map(|(h, _)| h.clone()));
            let has_unhealthy = level.iter().any(|(h, healthy)| !*healthy && h.weight > 0);
            if hosts.len() == start && !has_unhealthy {
                continue;
            }
            // Only a priority with unhealthy hosts needs a second list: healthy ones first, as Envoy's panic set.
            let panic = has_unhealthy.then(|| {
                let unhealthy = level.iter().filter(|(h, healthy)| !*healthy && h.weight > 0).map(|(h, _)| h.clone());
                let all: Vec<Arc<Host>> = hosts[start..].iter().cloned().chain(unhealthy).collect();
                PanicHosts { weights: Weights::new(all.iter().map(|h| h.weight)), hosts: all, table: None }
            });
            let weights = Weights::new(hosts[start..].iter().map(|h| h.weight));
            levels.push(Level { priority, start, end: hosts.len(), total: same, weights, table: None, panic });
        }
        HostSet { hosts, total, hashed_for: None, levels }
    }

    /// Hosts of endpoints that already carry IPs (STATIC and EDS clusters). A host whose weight is 0 (its
    /// locality has none under locality-weighted balancing) takes no traffic, not even in panic mode.
    pub fn from_endpoints(eps: &[EndpointConfig], locality_weighted: bool) -> Self {
        use crate::config::cluster::EndpointAddress;
        Self::new(
            eps.iter()
                .filter_map(|e| match &e.address {
                    EndpointAddress::Ip(a) => {
                        let host = Host::of(*a, e, e.hostname.clone(), locality_weighted);
                        Some((Arc::new(host), e.healthy))
                    }
                    EndpointAddress::Dns { .. } => None,
                })
                .collect(),
        )
    }
}

#[derive(Debug, Clone)]
pub struct ClusterStats {
    pub upstream_cx_total: Counter,
    pub upstream_cx_active: Gauge,
    pub upstream_cx_connect_fail: Counter,
    pub upstream_cx_connect_timeout: Counter,
    pub upstream_cx_overflow: Counter,
    pub upstream_cx_none_healthy: Counter,
    pub upstream_cx_idle_timeout: Counter,
    /// Upstream connections retired by the cluster's max_connection_duration.
    pub upstream_cx_max_duration_reached: Counter,
    /// Upstream requests cut by `max_stream_duration` (or `x-envoy-upstream-stream-duration-ms`).
    pub upstream_rq_max_duration_reached: Counter,
    pub membership_total: Gauge,
    pub membership_healthy: Gauge,
    pub upstream_rq_total: Counter,
    pub upstream_rq_active: Gauge,
    pub upstream_rq_completed: Counter,
    pub upstream_rq_timeout: Counter,
    pub upstream_rq_per_try_timeout: Counter,
    pub upstream_rq_retry: Counter,
    pub upstream_rq_retry_limit_exceeded: Counter,
    /// Retries not made because the cluster's `max_retries` were all outstanding.
    pub upstream_rq_retry_overflow: Counter,
    pub upstream_rq_retry_success: Counter,
    /// Requests whose body outgrew the retry buffer: they were not retried.
    pub retry_or_shadow_abandoned: Counter,
    pub upstream_rq_rx_reset: Counter,
    /// Upstream requests we reset: timed out, or abandoned because the downstream went away.
    pub upstream_rq_tx_reset: Counter,
    pub upstream_rq_pending_overflow: Counter,
    pub upstream_rq_pending_total: Counter,
    pub upstream_rq_pending_active: Gauge,
    /// Milliseconds from the end of the downstream request to the end of the upstream response (Envoy's measure).
    pub upstream_rq_time: Histogram,
    /// `upstream_rq_1xx` … `upstream_rq_5xx`.
    pub upstream_rq_class: [Counter; 5],
    pub outlier: OutlierStats,
    /// `upstream_rq_<code>` for codes 100–599, each registered on first use; the table itself only exists once the
    /// cluster has served HTTP. Lock-free on the request path.
    codes: Arc<std::sync::OnceLock<Box<[std::sync::OnceLock<Counter>]>>>,
    store: Store,
    prefix: String,
}

impl ClusterStats {
    pub fn new(store: &Store, stat_name: &str) -> Self {
        let c = |s: &str| store.counter(&format!("cluster.{stat_name}.{s}"));
        let g = |s: &str| store.gauge(&format!("cluster.{stat_name}.{s}"));
        ClusterStats {
            upstream_cx_total: c("upstream_cx_total"),
            upstream_cx_active: g("upstream_cx_active"),
            upstream_cx_connect_fail: c("upstream_cx_connect_fail"),
            upstream_cx_connect_timeout: c("upstream_cx_connect_timeout"),
            upstream_cx_overflow: c("upstream_cx_overflow"),
            upstream_cx_none_healthy: c("upstream_cx_none_healthy"),
            upstream_cx_idle_timeout: c("upstream_cx_idle_timeout"),
            upstream_cx_max_duration_reached: c("upstream_cx_max_duration_reached"),
            upstream_rq_max_duration_reached: c("upstream_rq_max_duration_reached"),
            membership_total: g("membership_total"),
            membership_healthy: g("membership_healthy"),
            upstream_rq_total: c("upstream_rq_total"),
            upstream_rq_active: g("upstream_rq_active"),
            upstream_rq_completed: c("upstream_rq_completed"),
            upstream_rq_timeout: c("upstream_rq_timeout"),
            upstream_rq_per_try_timeout: c("upstream_rq_per_try_timeout"),
            upstream_rq_retry: c("upstream_rq_retry"),
            upstream_rq_retry_limit_exceeded: c("upstream_rq_retry_limit_exceeded"),
            upstream_rq_retry_overflow: c("upstream_rq_retry_overflow"),
            upstream_rq_retry_success: c("upstream_rq_retry_success"),
            retry_or_shadow_abandoned: c("retry_or_shadow_abandoned"),
            upstream_rq_rx_reset: c("upstream_rq_rx_reset"),
            upstream_rq_tx_reset: c("upstream_rq_tx_reset"),
            upstream_rq_pending_overflow: c("upstream_rq_pending_overflow"),
            upstream_rq_pending_total: c("upstream_rq_pending_total"),
            upstream_rq_pending_active: g("upstream_rq_pending_active"),
            upstream_rq_time: store.histogram(&format!("cluster.{stat_name}.upstream_rq_time")),
            upstream_rq_class: [1, 2, 3, 4, 5].map(|n| c(&format!("upstream_rq_{n}xx"))),
            outlier: OutlierStats::new(store, &format!("cluster.{stat_name}")),
            codes: Arc::default(),
            store: store.clone(),
            prefix: format!("cluster.{stat_name}"),
        }
    }
}

impl ClusterStats {
    /// Counts a response: `upstream_rq_<code>`, its class and `upstream_rq_completed`.
    pub fn count_response(&self, status: u16) {
        self.upstream_rq_completed.inc();
        if let Some(c) = self.upstream_rq_class.get(usize::from(status / 100).wrapping_sub(1)) {
            c.inc();
        }
        let table = self.codes.get_or_init(|| (100..600).map(|_| std::sync::OnceLock::new()).collect());
        if let Some(slot) = table.get(usize::from(status).wrapping_sub(100)) {
            slot.get_or_init(|| self.store.counter(&format!("{}.upstream_rq_{status}", self.prefix))).inc();
        }
    }
}

/// A request counted against the cluster's `max_requests` circuit breaker while it lives.
#[derive(Debug)]
pub struct RequestSlot {
    requests: Arc<AtomicU32>,
    _active: GaugeGuard,
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry counted against the cluster's `max_retries` circuit breaker. As in Envoy, it is held from the decision
/// to retry, through the back-off, until the retried attempt's outcome is known: the breaker limits retries
/// outstanding across the cluster at once, not retries per request.
#[derive(Debug)]
pub struct RetrySlot {
    retries: Arc<AtomicU32>,
}

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cluster '{0}' has no healthy upstream")]
    NoHealthyUpstream(String),
    #[error("cluster '{0}': circuit breaker max_connections reached")]
    Overflow(String),
    #[error("upstream {0}: connect timed out")]
    Timeout(SocketAddr),
    #[error("upstream {0}: {1}")]
    Io(SocketAddr, io::Error),
}

#[derive(Debug)]
pub struct Cluster {
    pub config: Arc<ClusterConfig>,
    hosts: ArcSwap<HostSet>,
    rr: AtomicU64,
    /// Open upstream connections, for the circuit breaker.
    connections: Arc<AtomicU32>,
    /// HTTP requests in flight, for the `max_requests` circuit breaker.
    requests: Arc<AtomicU32>,
    /// HTTP requests waiting for a new connection, for `max_pending_requests`.
    pending: Arc<AtomicU32>,
    /// Retries outstanding, for `max_retries`.
    retries: Arc<AtomicU32>,
    /// Hosts ejected by outlier detection; while 0, choosing a host looks at no ejection.
    pub(super) ejected: AtomicU32,
    /// Held while an ejection is decided and counted, or ejections are recounted: workers may eject different hosts at
    /// the same moment, and max_ejection_percent must hold across them. Ejections are rare; results are counted
    /// without it.
    pub(super) ejecting: std::sync::Mutex<()>,
    /// With slow start: until when ([`epoch_ms`]) some host is still in its window; picks before then scale weights.
    slow_start_until_ms: AtomicU64,
    /// The success-rate ejection thresholds of the last outlier sweep, for `/clusters`.
    pub outlier_thresholds: outlier::Thresholds,
    pub stats: ClusterStats,
    breakers: BreakerGauges,
}

/// A TCP connection to `addr` with TCP_NODELAY (Envoy sets it on every upstream connection), from `source` when
/// the cluster binds one (`upstream_bind_config`).
///
/// tokio's own connect reads SO_ERROR once the socket turns writable, a syscall per connection whose answer the
/// readiness already gives: epoll reports a failed connect as an error or hang-up, a completed one as writable
/// only. The error is read only when there is one.
async fn connect_from(source: Option<SocketAddr>, addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let domain = Domain::for_address(source.unwrap_or(addr));
    let socket = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(source) = source {
        socket.bind(&source.into())?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(tokio::io::Interest::WRITABLE | tokio::io::Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}

/// Envoy's `cluster.<name>.circuit_breakers.default.*` gauges: whether each breaker is open and, with
/// `track_remaining`, how much room is left. They are derived from the breakers' counts when stats are read, so
/// the request path pays nothing for them.
#[derive(Debug)]
struct BreakerGauges {
    open: [Gauge; 4],
    remaining: Option<[Gauge; 4]>,
}

impl BreakerGauges {
    fn new(store: &Store, config: &ClusterConfig) -> Self {
        let g = |s: &str| store.gauge(&format!("cluster.{}.circuit_breakers.default.{s}", config.stat_name));
        BreakerGauges {
            open: [g("cx_open"), g("rq_pending_open"), g("rq_open"), g("rq_retry_open")],
            remaining: config
                .http
                .track_remaining
                .then(|| [g("remaining_cx"), g("remaining_pending"), g("remaining_rq"), g("remaining_retries")]),
        }
    }
}

/// An open upstream connection; dropping it releases the circuit-breaker slot and the host's active count.
#[derive(Debug)]
pub struct Upstream {
    pub stream: TcpStream,
    pub host: Arc<Host>,
    _slot: ConnectionSlot,
}

/// Holds a circuit-breaker slot and the host's active count while an upstream connection lives.
#[derive(Debug)]
pub struct ConnectionSlot {
    cluster_connections: Arc<AtomicU32>,
    host: Arc<Host>,
    _active: GaugeGuard,
}

impl Upstream {
    /// The stream and what must live as long as it (the breaker slot), for protocols that own the stream.
    pub fn into_parts(self) -> (TcpStream, Arc<Host>, ConnectionSlot) {
        (self.stream, self.host, self._slot)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.cluster_connections.fetch_sub(1, Ordering::Relaxed);
        self.host.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Cluster {
    pub fn new(config: Arc<ClusterConfig>, hosts: HostSet, store: &Store) -> Self {
        Self::with_hosts(config, Arc::new(hosts), store)
    }

    /// A cluster starting with an existing host set (an updated cluster keeps its predecessor's hosts).
    pub fn with_hosts(config: Arc<ClusterConfig>, hosts: Arc<HostSet>, store: &Store) -> Self {
        let stats = ClusterStats::new(store, &config.stat_name);
        let breakers = BreakerGauges::new(store, &config);
        let cluster = Cluster {
            config,
            hosts: ArcSwap::from_pointee(HostSet::default()),
            rr: AtomicU64::new(0),
            connections: Arc::new(AtomicU32::new(0)),
            requests: Arc::new(AtomicU32::new(0)),
            pending: Arc::new(AtomicU32::new(0)),
            retries: Arc::new(AtomicU32::new(0)),
            breakers,
            ejected: AtomicU32::new(0),
            ejecting: std::sync::Mutex::new(()),
            slow_start_until_ms: AtomicU64::new(0),
            outlier_thresholds: Default::default(),
            stats,
        };
        cluster.note_slow_start(&hosts);
        cluster.stats.membership_total.set(hosts.total as i64);
        cluster.stats.membership_healthy.set(hosts.hosts.len() as i64);
        // A predecessor's hosts are shared as they are unless this version balances differently.
        let hosts = if hosts.table_matches(cluster.config.lb_policy) {
            hosts
        } else {
            Arc::new((*hosts).clone().for_policy(cluster.config.lb_policy))
        };
        cluster.hosts.store(hosts);
        if cluster.config.outlier.is_some() {
            // A predecessor's hosts keep their ejections: count them, so balancing skips them from the start.
            outlier::recount(&cluster, &cluster.hosts.load().hosts);
        } else {
            // Without outlier detection nothing would ever return them: the ejections end with the version that made
            // them.
            for h in cluster.hosts.load().hosts.iter() {
                h.outlier.forget();
            }
        }
        cluster
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn hosts(&self) -> Arc<HostSet> {
        self.hosts.load_full()
    }

    /// Envoy's membership counts: every host, and those in service (healthy and not ejected by outlier detection).
    pub fn membership(&self) -> (usize, usize) {
        let set = self.hosts.load();
        let ejected = self.ejected.load(Ordering::Relaxed) as usize;
        (set.total, set.hosts.len().saturating_sub(ejected))
    }

    pub fn set_hosts(&self, hosts: HostSet) {
        self.stats.membership_total.set(hosts.total as i64);
        self.stats.membership_healthy.set(hosts.hosts.len() as i64);
        // An EDS update or DNS refresh builds new host objects: as in Envoy, a host that stays keeps its outlier
        // state (an ejected host stays ejected) and its time in the cluster (slow start does not begin again).
        let old = self.hosts.load();
        let by_address: std::collections::HashMap<SocketAddr, &Arc<Host>> =
            old.hosts.iter().map(|h| (h.address, h)).collect();
        for h in &hosts.hosts {
            if let Some(prior) = by_address.get(&h.address) {
                h.added_ms.store(prior.added_ms.load(Ordering::Relaxed), Ordering::Relaxed);
                if self.config.outlier.is_some() {
                    h.outlier.inherit(&prior.outlier);
                }
            }
        }
        drop(by_address);
        drop(old);
        self.note_slow_start(&hosts);
        self.hosts.store(Arc::new(hosts.for_policy(self.config.lb_policy)));
        if self.config.outlier.is_some() {
            // The ejection count follows the new set.
            outlier::recount(self, &self.hosts.load().hosts);
        }
    }

    /// Chooses a host. `original_dst` is the downstream connection's restored destination (None when no listener
    /// filter restored one): the host of an ORIGINAL_DST cluster, which, as in Envoy, has no host without it rather
    /// than connecting to the proxy's own listener.
    pub fn choose(&self, original_dst: Option<SocketAddr>) -> Option<Arc<Host>> {
        self.choose_hashed(original_dst, None)
    }

    /// As [`Cluster::choose`], with the request's hash for a RING_HASH cluster: the host that owns the hash on the
    /// ring, or the next one in service after it. Without a hash a RING_HASH cluster picks at random, as Envoy does.
    pub fn choose_hashed(&self, original_dst: Option<SocketAddr>, hash: Option<u64>) -> Option<Arc<Host>> {
        self.choose_avoiding(original_dst, hash, &[])
    }

    /// As [`Cluster::choose_hashed`], with these priorities left out of the priority load (a retry's
    /// `previous_priorities`); when that leaves no level any health, none is left out, as in Envoy.
    pub fn choose_avoiding(
        &self,
        original_dst: Option<SocketAddr>,
        hash: Option<u64>,
        avoid: &[u32],
    ) -> Option<Arc<Host>> {
        if self.config.kind == ClusterKind::OriginalDst {
            return original_dst.map(|dst| Arc::new(Host::new(dst, 1, String::new())));
        }
        let set = self.hosts.load();
        let ejected = self.ejected.load(Ordering::Relaxed) as usize;
        // The priority level to pick in, and whether it is in Envoy's panic mode: with fewer of its hosts in service
        // than healthy_panic_threshold percent it balances over all of them, unhealthy and ejected ones too; at 0,
        // never (so with every host ejected or unhealthy there is then no host).
        let (level, panic) = if set.levels.len() <= 1 {
            let total = set.levels.first().map_or(set.hosts.len(), |l| l.total);
            let in_service = set.hosts.len().saturating_sub(ejected);
            // Envoy: no panic while the (overprovisioned) availability still makes 100%.
            let short = OVERPROVISIONING * in_service < 100 * total;
            (
                set.levels.first(),
                short && (in_service as f64) * 100.0 < self.config.healthy_panic_threshold * total as f64,
            )
        } else {
            let (i, panic) = self.choose_level(&set, ejected > 0, hash, avoid);
            (set.levels.get(i), panic)
        };
        // No level: no host with a weight.
        let level = level?;
        let (hosts, weights, table, any) = match level.panic.as_ref().filter(|_| panic) {
            Some(p) => (&p.hosts[..], &p.weights, p.table.as_deref(), true),
            None => (&set.hosts[level.start..level.end], &level.weights, level.table.as_deref(), ejected == 0 || panic),
        };
        if let (Some(hash), Some(table)) = (hash, table)
            && !table.is_empty()
        {
            let idx = table.pick(hash, |i| any || hosts.get(i).is_some_and(|h| !h.is_ejected()))?;
            return hosts.get(idx).cloned();
        }
        let slow_start = self.slow_start_now();
        let scaled = slow_start.is_some() || (self.config.lb_policy == LbPolicy::LeastRequest && !weights.uniform());
        let pick = || match self.config.lb_policy {
            _ if scaled => self.pick_scaled(hosts, slow_start, any),
            LbPolicy::RoundRobin | LbPolicy::ClusterProvided => weights.pick(self.rr.fetch_add(1, Ordering::Relaxed)),
            LbPolicy::Random | LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. } => weights.pick(rand::random()),
            LbPolicy::LeastRequest => {
                // Envoy's choice of the least busy of choice_count draws, over equal weights.
                let first = weights.pick(rand::random())?;
                Some((1..self.config.balancing.choice_count).fold(first, |best, _| {
                    weights.pick(rand::random()).map_or(best, |other| least_of_two(best, other, |i| hosts[i].active()))
                }))
            }
        };
        let idx = pick()?;
        if any {
            return hosts.get(idx).cloned();
        }
        let in_service = |i: &usize| hosts.get(*i).is_some_and(|h| !h.is_ejected());
        let idx = std::iter::once(idx)
            .chain((0..hosts.len()).filter_map(|_| pick()))
            .find(in_service)
            .or_else(|| (0..hosts.len()).find(in_service))?;
        hosts.get(idx).cloned()
    }

    /// Envoy's priority load for a set of several priorities: each level's health is min(100, 1.4 × in service /
    /// all hosts) percent; levels take load best first, as much as their health (normalized to the total health, at
    /// most 100) allows, the rest going on down. A request draws its level by that load (a hashed request by its
    /// hash modulo 100, as Envoy's choosePriority does). A level is in panic with fewer of its hosts in service than
    /// the threshold; when every level is (or none has any health, with a threshold), load follows host counts
    /// instead. Without a threshold and without health: the first level, which then has no host in service.
    /// Returns the level and whether it is in panic.
    fn choose_level(&self, set: &HostSet, any_ejected: bool, hash: Option<u64>, avoid: &[u32]) -> (usize, bool) {
        const ON_STACK: usize = 16;
        let levels = &set.levels;
        let n = levels.len();
        let (mut stack_in, mut stack_load) = ([0usize; ON_STACK], [0usize; ON_STACK]);
        let (mut heap_in, mut heap_load): (Vec<usize>, Vec<usize>);
        let (in_service, loads): (&mut [usize], &mut [usize]) = if n <= ON_STACK {
            (&mut stack_in[..n], &mut stack_load[..n])
        } else {
            heap_in = vec![0; n];
            heap_load = vec![0; n];
            (&mut heap_in, &mut heap_load)
        };
        let threshold = self.config.healthy_panic_threshold;
        let panic = |i: usize, up: usize| (up as f64) * 100.0 < threshold * levels[i].total as f64;
        let mut sum = 0;
        let mut all_panic = true;
        for (i, l) in levels.iter().enumerate() {
            let hosts = &set.hosts[l.start..l.end];
            let up = if any_ejected { hosts.iter().filter(|h| !h.is_ejected()).count() } else { hosts.len() };
            in_service[i] = up;
            loads[i] = (OVERPROVISIONING * up / l.total.max(1)).min(100);
            sum += loads[i];
            all_panic &= panic(i, up);
        }
        // Of the levels' real health, before a retry leaves some out. Envoy's recalculatePerPriorityPanic: no level
        // is in panic (so none is in total panic) while the total availability makes 100%.
        let available = sum.min(100);
        let all_panic = all_panic && available < 100;
        // previous_priorities: the levels tried already have no health, unless that leaves none with any.
        if !avoid.is_empty() {
            let left: usize =
                levels.iter().zip(loads.iter()).filter(|(l, _)| !avoid.contains(&l.priority)).map(|(_, h)| *h).sum();
            if left > 0 {
                for (l, h) in levels.iter().zip(loads.iter_mut()) {
                    if avoid.contains(&l.priority) {
                        *h = 0;
                    }
                }
                sum = left;
            }
        }
        let normalized = sum.min(100);
        let draw = match hash {
            Some(h) => (h % 100) as usize,
            None => rand::random_range(0..100),
        };
        if normalized == 0 && threshold <= 0.0 {
            return (0, false);
        }
        if normalized == 0 || all_panic {
            // Envoy's total panic: load in proportion to each level's hosts, every level using all of them.
            let all: usize = levels.iter().map(|l| l.total).sum::<usize>().max(1);
            let mut x = draw * all / 100;
            let i = levels
                .iter()
                .position(|l| {
                    if x < l.total {
                        return true;
                    }
                    x -= l.total;
                    false
                })
                .unwrap_or(0);
            return (i, true);
        }
        // Health becomes load, best level first; rounding leaves a little, which goes to the first level with any
        // health, as in Envoy.
        let mut remaining = 100usize;
        for load in loads.iter_mut() {
            *load = (*load * 100 / normalized).min(remaining);
            remaining -= *load;
        }
        if let Some(first) = loads.iter().position(|l| *l > 0) {
            loads[first] += remaining;
        }
        let mut x = draw;
        let i = loads
            .iter()
            .position(|load| {
                if x < *load {
                    return true;
                }
                x -= load;
                false
            })
            .unwrap_or(0);
        (i, available < 100 && panic(i, in_service[i]))
    }

    /// Whether an upstream connection opened at `born` is past the cluster's max_connection_duration.
    pub fn connection_expired(&self, born: tokio::time::Instant) -> bool {
        self.config.http.max_connection_duration.is_some_and(|d| born.elapsed() >= d)
    }

    /// Records when the newest host of `hosts` leaves its slow start window.
    fn note_slow_start(&self, hosts: &HostSet) {
        if let Some(s) = &self.config.balancing.slow_start {
            let newest = hosts.hosts.iter().map(|h| h.added_ms.load(Ordering::Relaxed)).max().unwrap_or(0);
            self.slow_start_until_ms.store(newest + s.window.as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// The slow start config and the time now, while some host is in its window (ROUND_ROBIN and LEAST_REQUEST
    /// only, as in Envoy).
    fn slow_start_now(&self) -> Option<(&SlowStart, u64)> {
        let s = self.config.balancing.slow_start.as_ref()?;
        if !matches!(self.config.lb_policy, LbPolicy::RoundRobin | LbPolicy::LeastRequest) {
            return None;
        }
        let now = epoch_ms();
        (now < self.slow_start_until_ms.load(Ordering::Relaxed)).then_some((s, now))
    }

    /// A pick in proportion to weights that change per pick: Envoy's slow start scaling, and for LEAST_REQUEST
    /// over unequal weights, weight / (active + 1)^active_request_bias. Envoy runs its EDF scheduler over these
    /// weights; this draws at random in the same proportions. Each weight is computed once (so a busy count that
    /// moves meanwhile cannot skew the draw), ejected hosts weigh nothing unless `with_ejected` (panic mode), and
    /// weights that all come to nothing (an enormous bias) fall back to an even draw.
    fn pick_scaled(
        &self,
        hosts: &[Arc<Host>],
        slow_start: Option<(&SlowStart, u64)>,
        with_ejected: bool,
    ) -> Option<usize> {
        const ON_STACK: usize = 64;
        let bias = self.config.balancing.active_request_bias;
        let least_request = self.config.lb_policy == LbPolicy::LeastRequest;
        let usable = |h: &Host| h.weight > 0 && (with_ejected || !h.is_ejected());
        let weight = |h: &Host| {
            if !usable(h) {
                return 0.0;
            }
            let mut w = f64::from(h.weight);
            if let Some((s, now)) = slow_start {
                let in_cluster = now.saturating_sub(h.added_ms.load(Ordering::Relaxed));
                let window = s.window.as_millis() as u64;
                if in_cluster < window {
                    let factor = (in_cluster.max(1) as f64 / window as f64).powf(1.0 / s.aggression);
                    w *= factor.max(s.min_weight);
                }
            }
            if least_request && bias != 0.0 {
                let load = f64::from(h.active()) + 1.0;
                w /= if bias == 1.0 { load } else { load.powf(bias) };
            }
            if w.is_finite() { w } else { 0.0 }
        };
        let mut stack = [0f64; ON_STACK];
        let mut heap: Vec<f64>;
        let weights: &mut [f64] = match stack.get_mut(..hosts.len()) {
            Some(w) => w,
            None => {
                heap = vec![0.0; hosts.len()];
                &mut heap
            }
        };
        let mut total = 0.0;
        for (w, h) in weights.iter_mut().zip(hosts) {
            *w = weight(h);
            total += *w;
        }
        if total <= 0.0 || !total.is_finite() {
            let candidates = hosts.iter().filter(|h| usable(h)).count();
            let nth = rand::random_range(0..candidates.max(1));
            return hosts.iter().enumerate().filter(|(_, h)| usable(h)).nth(nth).map(|(i, _)| i);
        }
        let mut x = rand::random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            x -= w;
            if x < 0.0 {
                return Some(i);
            }
        }
        // Rounding left a sliver past the last host: it goes to the last host that has any weight.
        weights.iter().rposition(|w| *w > 0.0)
    }

    /// Notes how an exchange with `host` went, for outlier detection (nothing without it).
    pub fn report(&self, host: &Host, outcome: Outcome) {
        if let Some(o) = &self.config.outlier {
            outlier::report(self, o, host, outcome);
        }
    }

    /// Outlier detection's interval sweep (see [`outlier::sweep`]).
    pub fn outlier_sweep(&self) {
        if let Some(o) = &self.config.outlier {
            outlier::sweep(self, o);
        }
    }

    /// Picks a host and connects to it within `connect_timeout`, counting the outcome in the cluster's stats.
    pub async fn connect(&self, original_dst: Option<SocketAddr>) -> Result<Upstream, ConnectError> {
        let Some(host) = self.choose(original_dst) else {
            self.stats.upstream_cx_none_healthy.inc();
            return Err(ConnectError::NoHealthyUpstream(self.config.name.clone()));
        };
        self.connect_to(host).await
    }

    /// Sets the circuit-breaker gauges from the breakers' current counts (before stats are read).
    pub fn publish_breakers(&self) {
        let http = &self.config.http;
        let counts = [
            (&self.connections, self.config.max_connections),
            (&self.pending, http.max_pending_requests),
            (&self.requests, http.max_requests),
            (&self.retries, http.max_retries),
        ];
        for (i, (count, limit)) in counts.into_iter().enumerate() {
            let used = count.load(Ordering::Relaxed);
            self.breakers.open[i].set(i64::from(used >= limit));
            if let Some(remaining) = &self.breakers.remaining {
                remaining[i].set(i64::from(limit.saturating_sub(used)));
            }
        }
    }

    /// Admits one more HTTP request under `max_requests`, or counts the overflow (Envoy answers it with 503).
    pub fn start_request(&self) -> Option<RequestSlot> {
        let prior = self.requests.fetch_add(1, Ordering::Relaxed);
        let slot =
            RequestSlot { requests: self.requests.clone(), _active: GaugeGuard::new(&self.stats.upstream_rq_active) };
        if prior >= self.config.http.max_requests {
            self.stats.upstream_rq_pending_overflow.inc();
            return None;
        }
        Some(slot)
    }

    /// Admits one more request waiting for a connection under `max_pending_requests`, or counts the overflow.
    pub fn start_pending(&self) -> Option<RequestSlot> {
        let prior = self.pending.fetch_add(1, Ordering::Relaxed);
        let slot = RequestSlot {
            requests: self.pending.clone(),
            _active: GaugeGuard::new(&self.stats.upstream_rq_pending_active),
        };
        if prior >= self.config.http.max_pending_requests {
            self.stats.upstream_rq_pending_overflow.inc();
            return None;
        }
        self.stats.upstream_rq_pending_total.inc();
        Some(slot)
    }

    /// Admits one more retry under `max_retries`, or counts `upstream_rq_retry_overflow` (the retry is not made).
    pub fn start_retry(&self) -> Option<RetrySlot> {
        let prior = self.retries.fetch_add(1, Ordering::Relaxed);
        let slot = RetrySlot { retries: self.retries.clone() };
        if prior >= self.config.http.max_retries {
            self.stats.upstream_rq_retry_overflow.inc();
            return None;
        }
        Some(slot)
    }

    /// Counts a response from an upstream in the cluster's stats.
    pub fn count_response(&self, status: u16) {
        self.stats.count_response(status);
    }

    /// Connects to a host already chosen (HTTP pools choose per request, then reuse or open a connection).
    pub async fn connect_to(&self, host: Arc<Host>) -> Result<Upstream, ConnectError> {
        let prior = self.connections.fetch_add(1, Ordering::Relaxed);
        host.active.fetch_add(1, Ordering::Relaxed);
        let slot = ConnectionSlot {
            cluster_connections: self.connections.clone(),
            host: host.clone(),
            _active: GaugeGuard::new(&self.stats.upstream_cx_active),
        };
        if prior >= self.config.max_connections {
            self.stats.upstream_cx_overflow.inc();
            return Err(ConnectError::Overflow(self.config.name.clone()));
        }
        self.stats.upstream_cx_total.inc();
        let addr = host.address;
        match tokio::time::timeout(self.config.connect_timeout, connect_from(self.config.source_address, addr)).await {
            Ok(Ok(stream)) => {
                if let Some(keepalive) = &self.config.tcp_keepalive {
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(keepalive);
                }
                Ok(Upstream { stream, host, _slot: slot })
            }
            Ok(Err(e)) => {
                self.stats.upstream_cx_connect_fail.inc();
                Err(ConnectError::Io(addr, e))
            }
            Err(_) => {
                self.stats.upstream_cx_connect_fail.inc();
                self.stats.upstream_cx_connect_timeout.inc();
                Err(ConnectError::Timeout(addr))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::cluster::{DnsFamily, EndpointAddress};

    fn config(kind: ClusterKind, lb_policy: LbPolicy, endpoints: Vec<EndpointConfig>) -> Arc<ClusterConfig> {
        Arc::new(ClusterConfig {
            name: "c".into(),
            kind,
            connect_timeout: std::time::Duration::from_secs(1),
            lb_policy,
            endpoints,
            dns_refresh_rate: std::time::Duration::from_secs(5),
            dns_jitter: std::time::Duration::ZERO,
            dns_family: DnsFamily::Auto,
            max_connections: 10,
            per_connection_buffer_limit_bytes: 1024,
            stat_name: "c".into(),
            http: Default::default(),
            tls: None,
            outlier: None,
            healthy_panic_threshold: 50.0,
            balancing: Default::default(),
            transport_socket_matches: Vec::new(),
            pipe: None,
            tcp_keepalive: None,
            source_address: None,
            skipped_filters: Vec::new(),
            locality_weighted: false,
            proto: Arc::default(),
        })
    }

    fn ep(port: u16, priority: u32, healthy: bool) -> EndpointConfig {
        EndpointConfig {
            address: EndpointAddress::Ip(SocketAddr::from(([127, 0, 0, 1], port))),
            weight: 1,
            priority,
            healthy,
            hostname: String::new(),
            socket_labels: None,
            locality_weight: None,
            locality_total: 1,
        }
    }

    #[test]
    fn original_dst_connects_to_the_connections_destination() {
        let c = Cluster::new(
            config(ClusterKind::OriginalDst, LbPolicy::ClusterProvided, vec![]),
            HostSet::default(),
            &Store::default(),
        );
        let dst = SocketAddr::from(([10, 1, 2, 3], 8080));
        assert_eq!(c.choose(Some(dst)).map(|h| h.address), Some(dst));
        assert!(c.choose(None).is_none(), "no restored destination, no host");
    }

    #[test]
    fn traffic_goes_to_the_best_priority_with_healthy_hosts() {
        let eps = vec![ep(1, 0, false), ep(2, 1, true), ep(3, 1, true), ep(4, 2, true)];
        let hosts = HostSet::from_endpoints(&eps, false);
        assert_eq!(hosts.total, 4);
        let c = Cluster::new(config(ClusterKind::Static, LbPolicy::RoundRobin, eps), hosts, &Store::default());
        let ports: Vec<u16> = (0..4).filter_map(|_| c.choose(None)).map(|h| h.address.port()).collect();
        assert_eq!(ports, vec![2, 3, 2, 3]);
    }

    /// A static cluster over `eps` with this healthy_panic_threshold.
    fn with_threshold(eps: &[EndpointConfig], threshold: f64, policy: LbPolicy) -> Cluster {
        let mut cfg = (*config(ClusterKind::Static, policy, eps.to_vec())).clone();
        cfg.healthy_panic_threshold = threshold;
        Cluster::new(Arc::new(cfg), HostSet::from_endpoints(eps, false), &Store::default())
    }

    fn ports_picked(c: &Cluster, n: usize) -> std::collections::BTreeSet<u16> {
        (0..n).filter_map(|_| c.choose_hashed(None, None)).map(|h| h.address.port()).collect()
    }

    /// Envoy's panic mode: with fewer than healthy_panic_threshold percent of its hosts healthy, a priority balances
    /// over the hosts EDS marks unhealthy too; at 0 it never does, and a cluster with no healthy host has none.
    #[test]
    fn panic_mode_balances_over_unhealthy_hosts_too() {
        let one_of_three = [ep(1, 0, true), ep(2, 0, false), ep(3, 0, false)];
        for policy in [LbPolicy::RoundRobin, LbPolicy::Random, LbPolicy::RingHash { min: 1024, max: 8192 }] {
            let c = with_threshold(&one_of_three, 50.0, policy);
            assert_eq!(ports_picked(&c, 60), [1, 2, 3].into(), "{policy:?}: 33% healthy is under 50%");
            let c = with_threshold(&one_of_three, 0.0, policy);
            assert_eq!(ports_picked(&c, 60), [1].into(), "{policy:?}: panic mode off");
        }
        let hashed = with_threshold(&one_of_three, 50.0, LbPolicy::RingHash { min: 1024, max: 8192 });
        let spread: std::collections::BTreeSet<u16> = (0..60u64)
            .filter_map(|k| hashed.choose_hashed(None, Some(k * (u64::MAX / 60))))
            .map(|h| h.address.port())
            .collect();
        assert_eq!(spread, [1, 2, 3].into(), "the ring spans the unhealthy hosts in panic");

        let two_of_three = [ep(1, 0, true), ep(2, 0, true), ep(3, 0, false)];
        assert_eq!(ports_picked(&with_threshold(&two_of_three, 50.0, LbPolicy::RoundRobin), 60), [1, 2].into());

        let none = [ep(1, 0, false), ep(2, 0, false)];
        assert_eq!(ports_picked(&with_threshold(&none, 50.0, LbPolicy::RoundRobin), 60), [1, 2].into());
        assert!(with_threshold(&none, 0.0, LbPolicy::RoundRobin).choose(None).is_none(), "no healthy upstream");
        let mut weightless = ep(3, 0, false);
        weightless.weight = 0;
        let c = with_threshold(&[ep(1, 0, false), weightless], 50.0, LbPolicy::RoundRobin);
        assert_eq!(ports_picked(&c, 60), [1].into(), "a host without weight takes nothing, even in panic");
    }

    /// How many of `n` picks each host (by port) takes.
    fn picks_by_port(c: &Cluster, n: usize) -> std::collections::HashMap<u16, usize> {
        let mut by_port = std::collections::HashMap::new();
        for _ in 0..n {
            if let Some(h) = c.choose(None) {
                *by_port.entry(h.address.port()).or_default() += 1;
            }
        }
        by_port
    }

    /// A priority in panic spreads its share of the priority load over all of its hosts, as long as the levels'
    /// total availability is short of 100% (Envoy's recalculatePerPriorityPanic). P0 with 1 of 5 healthy is worth
    /// 1.4 × 20 = 28, P1 with 2 of 4 is worth 70 and is not in panic (50% is not under 50%): P0 takes 28/98 of the
    /// load over its five hosts, P1 the rest over its two healthy ones.
    #[test]
    fn a_priority_in_panic_spreads_its_load_over_its_unhealthy_hosts() {
        let mut eps = vec![ep(1, 0, true), ep(2, 0, false), ep(3, 0, false), ep(4, 0, false), ep(5, 0, false)];
        eps.extend([ep(6, 1, true), ep(7, 1, true), ep(8, 1, false), ep(9, 1, false)]);
        let by_port = picks_by_port(&with_threshold(&eps, 50.0, LbPolicy::Random), 8000);
        for port in 1..=5 {
            let n = by_port.get(&port).copied().unwrap_or(0);
            assert!((300..650).contains(&n), "each P0 host about 8000 × 28/98 / 5 = 457: {by_port:?}");
        }
        for port in [6, 7] {
            let n = by_port.get(&port).copied().unwrap_or(0);
            assert!((2550..3150).contains(&n), "each healthy P1 host about 2857: {by_port:?}");
        }
        assert!(!by_port.contains_key(&8) && !by_port.contains_key(&9), "P1 is not in panic: {by_port:?}");
    }

    /// With the levels' total availability at 100% no level is in panic, however few of its own hosts are healthy:
    /// P0 with 1 of 4 healthy (worth 35) beside a healthy P1 (worth 100) keeps its unhealthy hosts out.
    #[test]
    fn no_priority_is_in_panic_while_the_total_availability_makes_100() {
        let eps = [ep(1, 0, true), ep(2, 0, false), ep(3, 0, false), ep(4, 0, false), ep(5, 1, true), ep(6, 1, true)];
        let by_port = picks_by_port(&with_threshold(&eps, 50.0, LbPolicy::Random), 8000);
        let p0 = by_port.get(&1).copied().unwrap_or(0);
        assert!((2500..3100).contains(&p0), "P0's 35% on its one healthy host: {by_port:?}");
        assert!((2..=4).all(|p| !by_port.contains_key(&p)), "{by_port:?}");
        // One level: 3 of 4 healthy is worth 100 (1.4 × 75), so even an 80% threshold leaves no panic.
        let one = [ep(1, 0, true), ep(2, 0, true), ep(3, 0, true), ep(4, 0, false)];
        assert_eq!(ports_picked(&with_threshold(&one, 80.0, LbPolicy::RoundRobin), 60), [1, 2, 3].into());
    }

    /// How often each host (by port) is picked in `n` picks.
    fn shares(n: usize, mut pick: impl FnMut() -> Option<usize>, c: &Cluster) -> std::collections::HashMap<u16, usize> {
        let mut out = std::collections::HashMap::new();
        for _ in 0..n {
            if let Some(i) = pick() {
                *out.entry(c.hosts().hosts[i].address.port()).or_default() += 1;
            }
        }
        out
    }

    fn with_balancing(eps: Vec<EndpointConfig>, policy: LbPolicy, b: crate::config::cluster::Balancing) -> Cluster {
        let mut cfg = (*config(ClusterKind::Static, policy, eps.clone())).clone();
        cfg.balancing = b;
        Cluster::new(Arc::new(cfg), HostSet::from_endpoints(&eps, false), &Store::default())
    }

    /// Envoy's least_request_lb_config.choice_count: more draws per pick find the one idle host more often.
    #[test]
    fn choice_count_sets_how_many_hosts_least_request_compares() {
        let eps: Vec<_> = (1..=4).map(|p| ep(p, 0, true)).collect();
        let idle_share = |choice_count| {
            let b = crate::config::cluster::Balancing { choice_count, ..Default::default() };
            let c = with_balancing(eps.clone(), LbPolicy::LeastRequest, b);
            for h in &c.hosts().hosts[1..] {
                h.active.store(100, Ordering::Relaxed);
            }
            (0..1000).filter_map(|_| c.choose(None)).filter(|h| h.address.port() == 1).count()
        };
        // 1 − (3/4)^n: 44% with 2 draws, 94% with 10.
        let (two, ten) = (idle_share(2), idle_share(10));
        assert!((340..540).contains(&two), "{two}");
        assert!(ten > 880, "{ten}");
    }

    /// Envoy's least request over unequal weights: weight / (active + 1)^active_request_bias.
    #[test]
    fn least_request_over_unequal_weights_divides_by_active_requests() {
        let mut heavy = ep(2, 0, true);
        heavy.weight = 3;
        let eps = vec![ep(1, 0, true), heavy];
        for (bias, range) in [(1.0, 150..350), (0.0, 650..850)] {
            let b = crate::config::cluster::Balancing { active_request_bias: bias, ..Default::default() };
            let c = with_balancing(eps.clone(), LbPolicy::LeastRequest, b);
            c.hosts().hosts[1].active.store(8, Ordering::Relaxed);
            // bias 1: 3/9 against 1, a quarter of the picks; bias 0: the weights alone, three quarters.
            let heavy = (0..1000).filter_map(|_| c.choose(None)).filter(|h| h.address.port() == 2).count();
            assert!(range.contains(&heavy), "bias {bias}: {heavy}");
        }
    }

    /// Envoy's slow start: a host that joined 5 s into a 60 s window weighs max(10%, 5/60) of its weight; hosts that
    /// joined before the window are whole. A host that stays across an update keeps its join time.
    #[test]
    fn slow_start_scales_a_new_hosts_weight_by_its_time_in_the_cluster() {
        let slow =
            crate::config::cluster::SlowStart { window: Duration::from_secs(60), aggression: 1.0, min_weight: 0.1 };
        let b = crate::config::cluster::Balancing { slow_start: Some(slow.clone()), ..Default::default() };
        let eps: Vec<_> = (1..=3).map(|p| ep(p, 0, true)).collect();
        let c = with_balancing(eps.clone(), LbPolicy::RoundRobin, b);
        assert!(c.slow_start_now().is_some(), "every host just joined");
        let set = c.hosts();
        let base = 1_000_000;
        set.hosts[0].added_ms.store(0, Ordering::Relaxed);
        set.hosts[1].added_ms.store(0, Ordering::Relaxed);
        set.hosts[2].added_ms.store(base, Ordering::Relaxed);
        // 20 s in: 1/3 of its weight; 1 s in: the 10% floor (1/60 is below it).
        for (since, expect) in [(20_000, 1.0 / 7.0), (1_000, 0.1 / 2.1)] {
            let picks = shares(6000, || c.pick_scaled(&set.hosts, Some((&slow, base + since)), true), &c);
            let got = picks.get(&3).copied().unwrap_or(0) as f64 / 6000.0;
            assert!((got - expect).abs() < 0.03, "{since} ms in: share {got}, expected {expect}");
        }
        let picks = shares(3000, || c.pick_scaled(&set.hosts, Some((&slow, base + 60_000)), true), &c);
        assert!(picks.get(&3).copied().unwrap_or(0) > 800, "out of the window: a full third: {picks:?}");

        let joined = c.hosts().hosts[2].added_ms.load(Ordering::Relaxed);
        c.set_hosts(HostSet::from_endpoints(&eps, false));
        assert_eq!(c.hosts().hosts[2].added_ms.load(Ordering::Relaxed), joined);
    }

    #[test]
    fn least_request_avoids_the_busy_host() {
        let eps = vec![ep(1, 0, true), ep(2, 0, true)];
        let hosts = HostSet::from_endpoints(&eps, false);
        hosts.hosts[0].active.store(100, Ordering::Relaxed);
        let c = Cluster::new(config(ClusterKind::Static, LbPolicy::LeastRequest, eps), hosts, &Store::default());
        // Two random choices per pick: the busy host only wins when both choices land on it.
        let busy = (0..400).filter_map(|_| c.choose(None)).filter(|h| h.address.port() == 1).count();
        assert!(busy < 200, "busy host picked {busy} of 400 times");
    }
}
