//! The listener manager: owns every listener on the main thread, applies added/changed/removed listener configs,
//! binds their sockets before anything is published, publishes a new [`ListenerSet`] to the workers, and drains
//! what an update leaves behind.
//!
//! Envoy's rules, copied (source/common/listener_manager/listener_manager_impl.cc):
//! - an update whose socket spec is unchanged reuses (shares) the old sockets: never rebinds, so nothing waiting in
//!   an accept queue is lost;
//! - an update that only changes filter chains is in place: unchanged chains keep their connections;
//! - a state-of-the-world update applies removals first, so an address can move between listeners;
//! - each listener's outcome is its own: one bad listener never blocks the others.

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::filter_chain::{ChainSet, FilterChain, NetworkFilter};
use super::socket::SocketFactory;
use super::worker::{ListenerSet, Workers};
use super::{Listener, ListenerCore, ListenerStats};
use crate::config::http::RouteSource;
use crate::config::listener::{ListenerConfig, SocketSpec};
use crate::drain::{DrainStrategy, Until};
use crate::network::http::rds::RouteRegistry;
use crate::secret::SecretRegistry;
use crate::stats::{Counter, Gauge, Store};
use crate::upstream::ClusterSet;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ListenerError {
    #[error("duplicate listener {0} found")]
    DuplicateName(String),
    #[error("error adding listener '{name}': has duplicate address '{address}' as existing listener '{existing}'")]
    DuplicateAddress { name: String, address: SocketAddr, existing: String },
    #[error("cannot bind '{address}': {reason}")]
    Bind { address: SocketAddr, reason: String },
    #[error("listener '{0}': reuse port cannot be changed during an update")]
    ReusePortChanged(String),
    #[error(
        "listener '{0}': socket options cannot be changed on an update of the same address unless enable_reuse_port \
         is true"
    )]
    SocketOptionsChanged(String),
    #[error("listener '{0}' is static (from the bootstrap) and cannot be changed or removed")]
    Static(String),
    #[error("listener '{0}': the server is shutting down")]
    ShuttingDown(String),
    #[error("{0}")]
    Secret(#[from] crate::secret::SecretError),
    #[error(
        "cluster '{0}' reaches a Unix socket (pipe address), which only gRPC config sources (SDS) use; tcp_proxy and \
         HTTP routes cannot"
    )]
    PipeCluster(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Bound and built, waiting for the clusters its tcp_proxy names; the version it replaces keeps serving.
    Warming,
    Added,
    Updated,
    /// Only filter chains changed; the listener kept its sockets and unchanged chains kept their connections.
    InPlaceUpdated,
    Unchanged,
}

/// What /listeners and tests see of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    pub name: String,
    pub address: SocketAddr,
    pub bind_to_port: bool,
}

#[derive(Debug, Clone)]
struct ManagerStats {
    listener_added: Counter,
    listener_modified: Counter,
    listener_removed: Counter,
    listener_create_failure: Counter,
    listener_in_place_updated: Counter,
    listener_stopped: Counter,
    total_listeners_active: Gauge,
    total_listeners_draining: Gauge,
    total_listeners_warming: Gauge,
}

impl ManagerStats {
    fn new(store: &Store) -> Self {
        let c = |s: &str| store.counter(&format!("listener_manager.{s}"));
        let g = |s: &str| store.gauge(&format!("listener_manager.{s}"));
        ManagerStats {
            listener_added: c("listener_added"),
            listener_modified: c("listener_modified"),
            listener_removed: c("listener_removed"),
            listener_create_failure: c("listener_create_failure"),
            listener_in_place_updated: c("listener_in_place_updated"),
            listener_stopped: c("listener_stopped"),
            total_listeners_active: g("total_listeners_active"),
            total_listeners_draining: g("total_listeners_draining"),
            total_listeners_warming: g("total_listeners_warming"),
        }
    }
}

/// How long a listener may warm before it is activated anyway (Envoy's default `initial_fetch_timeout`).
pub const WARMING_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug)]
struct Warming {
    listener: Arc<Listener>,
    in_place: bool,
    since: std::time::Instant,
}

#[derive(Debug, Clone, Copy)]
pub struct DrainSettings {
    pub drain_time: Duration,
    pub strategy: DrainStrategy,
}

#[derive(Debug)]
pub struct ListenerManager {
    workers: Workers,
    sockets: Box<dyn SocketFactory>,
    active: BTreeMap<String, Arc<Listener>>,
    /// Listeners from xDS waiting for their clusters (Envoy's warming), by name.
    warming: BTreeMap<String, Warming>,
    /// The published clusters, to tell whether a warming listener's dependencies exist.
    clusters: Arc<arc_swap::ArcSwap<ClusterSet>>,
    /// Which active listener holds each address, for the duplicate-address check without a scan.
    addresses: std::collections::HashMap<SocketAddr, String>,
    static_names: HashSet<String>,
    /// Sockets of listeners removed earlier in the same state-of-the-world update, for a listener that takes over
    /// the same address with the same spec in that update.
    released: Vec<(SocketSpec, Arc<Vec<TcpListener>>)>,
    drain: DrainSettings,
    store: Store,
    stats: ManagerStats,
    next_id: u64,
    runtime: tokio::runtime::Handle,
    /// Set by `shutdown`: no listener is added or changed afterwards.
    stopped: bool,
    /// Route configurations by name, shared with the ADS client that fills them (RDS).
    routes: RouteRegistry,
    /// TLS secrets by name, shared with the cluster manager and the SDS clients that fill them.
    secrets: SecretRegistry,
    /// How long a listener waits for its clusters: `cds_config.initial_fetch_timeout` (None: for ever).
    cluster_wait: Option<Duration>,
    /// Replaced (not in place) or removed listener versions whose connections are draining, by version id, for
    /// /config_dump's `draining_state`.
    draining: Arc<std::sync::Mutex<BTreeMap<u64, Arc<ListenerConfig>>>>,
    /// Set by /drain_listeners: which listeners are stopped. Stopped listeners accept nothing, their sockets are
    /// closed, and LDS can no longer add or change listeners of that direction (Envoy's `stopListeners`).
    stop_scope: Option<StopScope>,
}

/// Which listeners /drain_listeners stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopScope {
    All,
    /// Listeners whose `traffic_direction` is INBOUND.
    InboundOnly,
}

impl StopScope {
    pub fn covers(self, config: &ListenerConfig) -> bool {
        use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
        self == StopScope::All || config.proto.traffic_direction == TrafficDirection::Inbound as i32
    }
}

impl ListenerManager {
    /// Must be called inside the main tokio runtime: drains run there.
    pub fn new(
        workers: Workers,
        sockets: Box<dyn SocketFactory>,
        drain: DrainSettings,
        store: Store,
        clusters: Arc<arc_swap::ArcSwap<ClusterSet>>,
    ) -> Self {
        let stats = ManagerStats::new(&store);
        store.gauge("listener_manager.workers_started").set(0);
        ListenerManager {
            workers,
            sockets,
            active: BTreeMap::new(),
            warming: BTreeMap::new(),
            clusters,
            addresses: Default::default(),
            static_names: HashSet::new(),
            released: Vec::new(),
            drain,
            store,
            stats,
            next_id: 1,
            runtime: tokio::runtime::Handle::current(),
            stopped: false,
            routes: RouteRegistry::default(),
            secrets: SecretRegistry::default(),
            draining: Arc::default(),
            stop_scope: None,
            cluster_wait: Some(WARMING_TIMEOUT),
        }
    }

    /// Sets how long listeners wait for the clusters they name (the CDS config source's `initial_fetch_timeout`).
    pub fn set_cluster_wait(&mut self, wait: Option<Duration>) {
        self.cluster_wait = wait;
    }

    /// The route configuration slots HTTP listeners read; RDS fills them.
    pub fn routes(&self) -> RouteRegistry {
        self.routes.clone()
    }

    /// Uses `secrets` (the bootstrap's static secrets, shared with the cluster manager) for the TLS contexts of the
    /// listeners applied from now on.
    pub fn set_secrets(&mut self, secrets: SecretRegistry) {
        self.secrets = secrets;
    }

    /// The secret slots TLS contexts read; SDS fills them.
    pub fn secrets(&self) -> SecretRegistry {
        self.secrets.clone()
    }
    /// Marks workers started in the stats (Istio's readiness probe reads `listener_manager.workers_started`).
    pub async fn start_workers(&self) {
        if self.workers.wait_started().await {
            self.store.gauge("listener_manager.workers_started").set(1);
        }
    }

    /// Adds the bootstrap's listeners; they cannot be changed or removed through LDS afterwards.
    pub fn add_static(&mut self, config: ListenerConfig) -> Result<Outcome, ListenerError> {
        let name = config.name.clone();
        let outcome = self.add_or_update(config, true)?;
        self.static_names.insert(name);
        Ok(outcome)
    }

    /// Adds a listener or updates the one with its name.
    pub fn add_or_update(&mut self, config: ListenerConfig, allow_static: bool) -> Result<Outcome, ListenerError> {
        let result = self.apply_one(config, allow_static);
        self.released.clear();
        if matches!(result, Ok(Outcome::Added | Outcome::Updated | Outcome::InPlaceUpdated)) {
            self.publish();
        }
        result
    }

    /// Removes a listener: it stops accepting at once and its connections drain.
    pub fn remove(&mut self, name: &str) -> Result<bool, ListenerError> {
        let removed = self.remove_one(name)?;
        self.released.clear();
        if removed {
            self.publish();
        }
        Ok(removed)
    }

    /// A state-of-the-world update (LDS): listeners not named in `configs` and not in `keep` (names present in the
    /// response but rejected before reaching here) are removed first, then each config is added or updated on its
    /// own. Static listeners are left alone. One outcome per entry of `configs`, in order; a repeated name is an error
    /// for the repeats and the first one applies.
    pub fn apply_sotw(
        &mut self,
        configs: Vec<ListenerConfig>,
        keep: &HashSet<String>,
    ) -> Vec<(String, Result<Outcome, ListenerError>)> {
        let mut seen = HashSet::new();
        let duplicate: Vec<bool> = configs.iter().map(|c| !seen.insert(c.name.clone())).collect();
        let stale: Vec<String> = self
            .active
            .keys()
            .chain(self.warming.keys())
            .filter(|n| !seen.contains(*n) && !keep.contains(*n) && !self.static_names.contains(*n))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for name in stale {
            let _ = self.remove_one(&name);
        }
        let mut results = Vec::with_capacity(configs.len());
        for (c, dup) in configs.into_iter().zip(duplicate) {
            let name = c.name.clone();
            let result = if dup {
                self.stats.listener_create_failure.inc();
                Err(ListenerError::DuplicateName(name.clone()))
            } else {
                self.apply_one(c, false)
            };
            results.push((name, result));
        }
        self.released.clear();
        self.publish();
        results
    }

    /// An incremental update (delta LDS): `removed` go first, then each config is added or updated; workers see the
    /// result once, at the end. One outcome per removed name that failed and per config.
    pub fn apply_delta(
        &mut self,
        configs: Vec<ListenerConfig>,
        removed: &[String],
    ) -> Vec<(String, Result<Outcome, ListenerError>)> {
        let mut results = Vec::new();
        for name in removed {
            if let Err(e) = self.remove_one(name) {
                results.push((name.clone(), Err(e)));
            }
        }
        for c in configs {
            let name = c.name.clone();
            results.push((name, self.apply_one(c, false)));
        }
        self.released.clear();
        self.publish();
        results
    }

    pub fn listeners(&self) -> Vec<ListenerInfo> {
        self.active
            .values()
            .map(|l| ListenerInfo {
                name: l.name().to_string(),
                address: l.local_address,
                bind_to_port: l.config().bind_to_port,
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Listener>> {
        self.active.get(name).cloned()
    }

    /// Stops every listener and drains every connection (process shutdown). Resolves when all connections are
    /// gone, or shortly after the drain deadline forced them closed.
    pub fn shutdown(&mut self) -> impl Future<Output = ()> + use<> {
        self.stopped = true;
        let listeners: Vec<Arc<Listener>> = std::mem::take(&mut self.active).into_values().collect();
        self.warming.clear();
        self.addresses.clear();
        self.static_names.clear();
        self.publish();
        // Nothing will serve a connection still in its listener filters any more.
        for l in &listeners {
            l.core.pending.close();
        }
        let chains: Vec<Arc<FilterChain>> = listeners.iter().flat_map(|l| l.chains().all().cloned()).collect();
        drain_chains(chains, self.drain, Until::Empty)
    }

    fn apply_one(&mut self, config: ListenerConfig, allow_static: bool) -> Result<Outcome, ListenerError> {
        let result = self.try_apply(config, allow_static);
        if result.is_err() {
            self.stats.listener_create_failure.inc();
        }
        result
    }

    fn try_apply(&mut self, config: ListenerConfig, allow_static: bool) -> Result<Outcome, ListenerError> {
        let name = config.name.clone();
        if self.stopped {
            return Err(ListenerError::ShuttingDown(name));
        }
        if self.stop_scope.is_some_and(|scope| scope.covers(&config)) {
            // Envoy's rule after /drain_listeners: no error, the update just does not happen.
            info!(listener = %name, "listener not added or updated: listeners of its direction are stopped");
            return Ok(Outcome::Unchanged);
        }
        if self.warming.get(&name).is_some_and(|w| w.listener.config().proto == config.proto) {
            return Ok(Outcome::Warming);
        }
        let old = self.active.get(&name).cloned();
        if let Some(old) = &old {
            if old.config().proto == config.proto {
                // The serving version wins over a newer one that was still warming.
                self.drop_warming(&name);
                return Ok(Outcome::Unchanged);
            }
            if !allow_static && self.static_names.contains(&name) {
                return Err(ListenerError::Static(name));
            }
            if old.config().socket.reuse_port != config.socket.reuse_port {
                return Err(ListenerError::ReusePortChanged(name));
            }
        }
        let address = config.socket.address;
        if address.port() != 0
            && let Some(other) = self.addresses.get(&address).filter(|other| **other != name)
        {
            return Err(ListenerError::DuplicateAddress { name, address, existing: other.clone() });
        }

        let clusters = self.clusters.load();
        for chain in config.filter_chains.iter().chain(config.default_filter_chain.iter()) {
            if let Some(tls) = &chain.tls {
                tls.bind(&self.secrets)?;
            }
            if let Some(crate::config::listener::NetworkFilterConfig::TcpProxy(tp)) = chain.filters.last()
                && let Some((name, _)) =
                    tp.clusters.iter().find(|(n, _)| clusters.get(n).is_some_and(|c| c.config.pipe.is_some()))
            {
                return Err(ListenerError::PipeCluster(name.clone()));
            }
        }
        drop(clusters);
        let in_place = old.as_ref().is_some_and(|o| o.config().only_filter_chains_differ(&config));
        let warming = self.warming.get(&name).map(|w| w.listener.clone());
        let (sockets, local_address) = self.sockets_for(&config, old.as_deref(), warming.as_deref())?;
        let chains = ChainSet::build(
            &config.filter_chains,
            config.default_filter_chain.as_ref(),
            config.chain_index.clone(),
            if in_place { old.as_ref().map(|o| o.chains()) } else { None },
            &self.store,
            &self.routes,
            &config.stat_prefix,
        );
        let pending = match &old {
            Some(old) if in_place => old.core.pending.clone(),
            _ => Arc::default(),
        };
        let listener = Arc::new(Listener {
            id: self.next_id,
            local_address,
            sockets,
            core: Arc::new(ListenerCore {
                stats: ListenerStats::new(&self.store, &config.stat_prefix, self.workers.count()),
                config: Arc::new(config),
                chains,
                pending,
            }),
        });
        self.next_id += 1;
        // Bootstrap listeners wait for their SDS secrets too (Envoy: such a listener's port does not open before the
        // certificates are fetched), but not for clusters, which the bootstrap checked or CDS brings later.
        let missing = if allow_static {
            missing_secrets(&listener)
        } else {
            missing_dependencies(&listener, &self.clusters.load())
        };
        if !missing.is_empty() {
            info!(listener = %name, missing = ?missing, "listener warming: waiting for its dependencies");
            self.drop_warming(&name);
            self.addresses.insert(listener.config().socket.address, name.clone());
            self.warming.insert(name, Warming { listener, in_place, since: std::time::Instant::now() });
            self.stats.total_listeners_warming.set(self.warming.len() as i64);
            return Ok(Outcome::Warming);
        }
        self.drop_warming(&name);
        Ok(self.activate(name, listener, old, in_place))
    }

    /// Makes `listener` the serving version of `name`; the previous version's dropped chains drain. Published by
    /// the caller: once per single change, once per whole state-of-the-world update (so workers see it atomically
    /// and a 10,000-listener update does not build 10,000 listener sets).
    fn activate(
        &mut self,
        name: String,
        listener: Arc<Listener>,
        old: Option<Arc<Listener>>,
        in_place: bool,
    ) -> Outcome {
        let local_address = listener.local_address;
        if let Some(old) = &old {
            self.addresses.remove(&old.config().socket.address);
        }
        self.addresses.insert(listener.config().socket.address, name.clone());
        self.active.insert(name.clone(), listener.clone());
        // Only now: until this version serves, its sockets may still be the previous version's.
        let steered_before =
            old.as_ref().is_some_and(|o| o.config().cpu_locality && Arc::ptr_eq(&o.sockets, &listener.sockets));
        self.steer(listener.config(), &listener.sockets, steered_before);

        let outcome = match old {
            None => {
                self.stats.listener_added.inc();
                info!(listener = %name, address = %local_address, "listener added");
                Outcome::Added
            }
            Some(old) => {
                let dropped: Vec<Arc<FilterChain>> = old.chains().dropped_by(listener.chains()).cloned().collect();
                self.start_drain(&name, dropped, (!in_place).then_some(&old));
                self.stats.listener_modified.inc();
                if in_place {
                    self.stats.listener_in_place_updated.inc();
                    info!(listener = %name, "listener updated in place (filter chains only)");
                    Outcome::InPlaceUpdated
                } else {
                    info!(listener = %name, address = %local_address, "listener updated");
                    Outcome::Updated
                }
            }
        };
        self.stats.total_listeners_active.set(self.active.len() as i64);
        outcome
    }

    /// Activates warming listeners whose clusters now exist, or that waited [`WARMING_TIMEOUT`]; call after cluster
    /// updates and periodically. Returns how many became active.
    pub fn promote_warming(&mut self) -> usize {
        let clusters = self.clusters.load_full();
        let ready: Vec<String> = self
            .warming
            .iter()
            .filter(|(name, w)| {
                let ready = if self.static_names.contains(*name) {
                    missing_secrets(&w.listener).is_empty()
                } else {
                    missing_dependencies(&w.listener, &clusters).is_empty()
                };
                ready || warming_limit(&w.listener, self.cluster_wait).is_some_and(|limit| w.since.elapsed() >= limit)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in &ready {
            if let Some(w) = self.warming.remove(name) {
                let old = self.active.get(name).cloned();
                // A version warming on top of an in-place-eligible one keeps the old chains it shares.
                let in_place = w.in_place && old.is_some();
                self.activate(name.clone(), w.listener, old, in_place);
            }
        }
        self.stats.total_listeners_warming.set(self.warming.len() as i64);
        if !ready.is_empty() {
            self.publish();
        }
        ready.len()
    }

    /// Names of listeners still warming.
    pub fn warming_names(&self) -> Vec<String> {
        self.warming.keys().cloned().collect()
    }

    fn drop_warming(&mut self, name: &str) {
        if let Some(w) = self.warming.remove(name) {
            let address = w.listener.config().socket.address;
            let active_address = self.active.get(name).map(|a| a.config().socket.address);
            if active_address != Some(address) && self.addresses.get(&address).is_some_and(|n| n == name) {
                self.addresses.remove(&address);
            }
            self.stats.total_listeners_warming.set(self.warming.len() as i64);
        }
    }

    /// Envoy's cpu_locality_balance on a serving version's sockets, or off again when they were the steered sockets
    /// of the version before (left alone otherwise: a listener's own `socket_options` may set SO_INCOMING_CPU). As in
    /// Envoy, a listener whose steering cannot work serves without it, with a warning.
    fn steer(&self, config: &ListenerConfig, sockets: &[TcpListener], steered_before: bool) {
        if sockets.is_empty() || !(config.cpu_locality || steered_before) {
            return;
        }
        let cpus = match (config.cpu_locality, self.workers.cpus()) {
            (false, _) => None,
            (true, Some(cpus)) if config.socket.reuse_port => Some(cpus),
            (true, pinned) => {
                let why = if pinned.is_none() {
                    "the workers are not pinned (bootstrap enable_worker_cpu_affinity)"
                } else {
                    "enable_reuse_port is off"
                };
                warn!(listener = %config.name, "cpu_locality_balance: {why}; serving without CPU locality");
                None
            }
        };
        if let Err(e) = super::socket::steer_by_cpu(sockets, cpus) {
            if cpus.is_some() {
                warn!(listener = %config.name, "cpu_locality_balance: {e}; serving without CPU locality");
            } else {
                debug!(listener = %config.name, "clearing CPU steering: {e}");
            }
        }
    }

    /// The sockets for a new listener version: the old version's when the spec is unchanged, sockets released in
    /// this update with the same spec, or freshly bound ones.
    fn sockets_for(
        &mut self,
        config: &ListenerConfig,
        old: Option<&Listener>,
        warming: Option<&Listener>,
    ) -> Result<(Arc<Vec<TcpListener>>, SocketAddr), ListenerError> {
        if !config.bind_to_port {
            return Ok((Arc::new(Vec::new()), config.socket.address));
        }
        // A version still warming already holds sockets for this spec: a newer version takes them over.
        if let Some(w) = warming
            && w.config().bind_to_port
            && w.config().socket == config.socket
            && !w.sockets.is_empty()
        {
            return Ok((w.sockets.clone(), w.local_address));
        }
        if let Some(old) = old {
            let old_config = old.config();
            if old_config.bind_to_port && old_config.socket == config.socket && !old.sockets.is_empty() {
                return Ok((old.sockets.clone(), old.local_address));
            }
            if old_config.bind_to_port
                && old_config.socket.address == config.socket.address
                && !config.socket.reuse_port
            {
                return Err(ListenerError::SocketOptionsChanged(config.name.clone()));
            }
        }
        if let Some(i) = self.released.iter().position(|(spec, _)| *spec == config.socket) {
            let (_, sockets) = self.released.swap_remove(i);
            let local = sockets.first().and_then(|s| s.local_addr().ok()).unwrap_or(config.socket.address);
            return Ok((sockets, local));
        }
        let bound = self.sockets.bind(&config.socket, self.workers.count()).map_err(|e| {
            warn!(listener = %config.name, "cannot bind {}: {e}", config.socket.address);
            ListenerError::Bind { address: config.socket.address, reason: e.to_string() }
        })?;
        let local = bound.first().and_then(|s| s.local_addr().ok()).unwrap_or(config.socket.address);
        Ok((Arc::new(bound), local))
    }

    fn remove_one(&mut self, name: &str) -> Result<bool, ListenerError> {
        if self.static_names.contains(name) {
            return Err(ListenerError::Static(name.to_string()));
        }
        let was_warming = self.warming.contains_key(name);
        self.drop_warming(name);
        let Some(old) = self.active.remove(name) else { return Ok(was_warming) };
        self.addresses.remove(&old.config().socket.address);
        if old.config().bind_to_port && !old.sockets.is_empty() {
            // Released sockets may serve a listener without the balancer next.
            if old.config().cpu_locality
                && let Err(e) = super::socket::steer_by_cpu(&old.sockets, None)
            {
                debug!(listener = %name, "clearing CPU steering: {e}");
            }
            self.released.push((old.config().socket.clone(), old.sockets.clone()));
        }
        self.start_drain(name, old.chains().all().cloned().collect(), Some(&old));
        self.stats.listener_removed.inc();
        self.stats.total_listeners_active.set(self.active.len() as i64);
        info!(listener = %name, "listener removed");
        Ok(true)
    }

    /// Drains `chains`; `whole` is the listener version they belong to when all of it goes (removal or a full
    /// update), which /config_dump then shows as draining.
    fn start_drain(&self, name: &str, chains: Vec<Arc<FilterChain>>, whole: Option<&Arc<Listener>>) {
        if chains.is_empty() && whole.is_none() {
            return;
        }
        let draining = self.stats.total_listeners_draining.clone();
        draining.inc();
        let name = name.to_string();
        let versions = self.draining.clone();
        let id = whole.map(|l| {
            versions.lock().unwrap_or_else(|p| p.into_inner()).insert(l.id, l.core.config.clone());
            l.id
        });
        let done = drain_chains(chains, self.drain, Until::Deadline);
        let pending = whole.map(|l| l.core.clone());
        let settings = self.drain;
        self.runtime.spawn(async move {
            let pending = async {
                if let Some(core) = pending {
                    core.pending.drain(settings.drain_time, settings.strategy, FORCE_GRACE, Until::Deadline).await;
                }
            };
            tokio::join!(done, pending);
            draining.dec();
            if let Some(id) = id {
                versions.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            }
            info!(listener = %name, "listener drained");
        });
    }

    fn publish(&self) {
        let serving = self.active.values().filter(|l| !self.stop_scope.is_some_and(|s| s.covers(l.config())));
        self.workers.publish(ListenerSet::new(serving.cloned().collect()));
    }
}

/// How long forced-closed connections get to actually go away before a drain stops waiting for them.
const FORCE_GRACE: Duration = Duration::from_secs(5);

async fn drain_chains(chains: Vec<Arc<FilterChain>>, settings: DrainSettings, until: Until) {
    let mut tasks = tokio::task::JoinSet::new();
    for chain in chains {
        tasks.spawn(async move {
            chain.drain.drain(settings.drain_time, settings.strategy, FORCE_GRACE, until).await;
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Read-only views for the admin endpoints, and /drain_listeners.
impl ListenerManager {
    /// The newest version of a listener: the warming one if any, else the serving one.
    pub fn newest(&self, name: &str) -> Option<Arc<Listener>> {
        self.warming.get(name).map(|w| w.listener.clone()).or_else(|| self.active.get(name).cloned())
    }

    /// Whether the listener came from the bootstrap.
    pub fn is_static(&self, name: &str) -> bool {
        self.static_names.contains(name)
    }

    /// Serving listeners (static and dynamic), by name.
    pub fn active_listeners(&self) -> Vec<Arc<Listener>> {
        self.active.values().cloned().collect()
    }

    /// Listeners waiting for their dependencies, by name.
    pub fn warming_listeners(&self) -> Vec<Arc<Listener>> {
        self.warming.values().map(|w| w.listener.clone()).collect()
    }

    /// Listener versions whose connections are draining after a removal or a full update.
    pub fn draining_listeners(&self) -> Vec<Arc<ListenerConfig>> {
        self.draining.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    pub fn drain_settings(&self) -> DrainSettings {
        self.drain
    }

    /// Tells the connections of the listeners in `scope` to drain (protocol-aware filters close as soon as they can;
    /// nothing is forced), as Envoy's drain sequence does for /drain_listeners.
    pub fn drain_connections(&self, scope: StopScope) {
        for l in self.active.values().filter(|l| scope.covers(l.config())) {
            for chain in l.chains().all() {
                chain.drain.start(self.drain.drain_time, self.drain.strategy);
            }
        }
    }

    /// Envoy's `stopListeners`: the listeners in `scope` stop accepting and close their sockets (clients are refused
    /// instead of waiting in an accept queue); their connections stay; warming ones are dropped; LDS no longer
    /// changes listeners in the scope. They still show in /listeners and /config_dump, as in Envoy.
    pub fn stop_listeners(&mut self, scope: StopScope) {
        let before = self.stop_scope;
        let scope = match before {
            Some(StopScope::All) => StopScope::All,
            _ => scope,
        };
        self.stop_scope = Some(scope);
        let warming: Vec<String> =
            self.warming.iter().filter(|(_, w)| scope.covers(w.listener.config())).map(|(n, _)| n.clone()).collect();
        for name in warming {
            self.drop_warming(&name);
        }
        for l in self.active.values_mut() {
            if !scope.covers(l.config()) || before.is_some_and(|b| b.covers(l.config())) {
                continue;
            }
            // A socketless version in the map; the socketed one closes once no worker accepts on it.
            *l = Arc::new(Listener {
                id: self.next_id,
                local_address: l.local_address,
                sockets: Arc::new(Vec::new()),
                core: l.core.clone(),
            });
            self.next_id += 1;
            self.stats.listener_stopped.inc();
            info!(listener = %l.name(), "listener stopped");
        }
        self.publish();
    }
}

impl ListenerManager {
    /// Stops the worker threads; call after [`ListenerManager::shutdown`] has drained.
    pub fn stop_workers(&mut self) {
        self.workers.stop();
    }
}

/// What a listener waits for before it serves: clusters its tcp_proxy filters name and route configurations its
/// HTTP connection managers subscribe to through RDS (Envoy's listener warming).
fn missing_dependencies(listener: &Listener, clusters: &ClusterSet) -> Vec<String> {
    let mut missing = Vec::new();
    for chain in listener.chains().all() {
        match &chain.filter {
            NetworkFilter::TcpProxy(tp) => {
                for (name, _) in &tp.config.clusters {
                    let what = format!("cluster {name}");
                    if clusters.get(name).is_none() && !missing.contains(&what) {
                        missing.push(what);
                    }
                }
            }
            NetworkFilter::Http(hcm) => {
                if let Some(name) = hcm.config.rds_name()
                    && hcm.route_table().is_none()
                {
                    let what = format!("route config {name}");
                    if !missing.contains(&what) {
                        missing.push(what);
                    }
                }
            }
            NetworkFilter::DirectResponse(_) => {}
        }
    }
    for what in missing_secrets(listener) {
        if !missing.contains(&what) {
            missing.push(what);
        }
    }
    missing
}

/// The SDS secrets a listener's TLS chains wait for.
fn missing_secrets(listener: &Listener) -> Vec<String> {
    let mut missing = Vec::new();
    for chain in listener.chains().all() {
        for secret in chain.config.tls.iter().flat_map(|t| t.secrets()) {
            let what = format!("secret {}", secret.reference.name);
            if secret.current().is_none() && !missing.contains(&what) {
                missing.push(what);
            }
        }
    }
    missing
}

/// How long a listener may warm: RDS and SDS subscriptions use their `initial_fetch_timeout` (0 s, as Istio sends,
/// waits for ever), clusters the CDS source's (default [`WARMING_TIMEOUT`]). Past it the listener serves anyway and a
/// TLS chain whose secret never came fails its handshakes (Envoy: "the connection to the port will be reset").
fn warming_limit(listener: &Listener, cluster_wait: Option<Duration>) -> Option<Duration> {
    let mut limit = cluster_wait;
    for chain in listener.chains().all() {
        // Static secrets are there from the start: they never hold a listener back.
        let fetched = chain.config.tls.iter().flat_map(|t| t.secrets());
        for secret in fetched.filter(|b| b.reference.source != crate::secret::SecretSource::Static) {
            limit = match (limit, secret.reference.initial_fetch_timeout) {
                (Some(a), Some(b)) => Some(a.min(b)),
                _ => None,
            };
        }
        if let NetworkFilter::Http(hcm) = &chain.filter
            && let RouteSource::Rds { initial_fetch_timeout, .. } = &hcm.config.routes
        {
            limit = match (limit, initial_fetch_timeout) {
                (Some(a), Some(b)) => Some(a.min(*b)),
                _ => None,
            };
        }
    }
    limit
}
