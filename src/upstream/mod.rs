//! Upstreams: the cluster manager (owned by the main thread) and the immutable cluster set it publishes to
//! workers through an `ArcSwap`, so the connection path finds a cluster without taking a lock.

pub mod cluster;
pub mod dns;
pub mod lb;
pub mod outlier;
pub mod pool;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ConfigError;
use crate::config::cluster::{ClusterConfig, ClusterKind};
use crate::stats::Store;
use cluster::{Cluster, HostSet};

/// What workers see: every cluster by name.
#[derive(Debug, Default)]
pub struct ClusterSet {
    clusters: HashMap<String, Arc<Cluster>>,
}

impl ClusterSet {
    pub fn get(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }
}

#[derive(Debug)]
struct Entry {
    cluster: Arc<Cluster>,
    /// Stops the DNS refresh loop and the outlier sweep of a replaced or removed cluster (a replaced version lives
    /// on for its connections, but it must not keep sweeping the hosts it shares with its successor).
    stop: CancellationToken,
    /// Becomes true once the first resolution finished (always true for non-DNS clusters).
    ready: watch::Receiver<bool>,
}

/// Owns clusters. Each change builds the set anew and publishes it; a cluster removed or replaced stays alive for
/// the connections that still hold it.
#[derive(Debug)]
pub struct ClusterManager {
    entries: HashMap<String, Entry>,
    /// Bootstrap clusters: CDS never removes or replaces them.
    static_names: std::collections::HashSet<String>,
    /// EDS service name → the clusters fed by it.
    eds_index: HashMap<String, Vec<String>>,
    published: Arc<ArcSwap<ClusterSet>>,
    stats: Store,
    /// TLS secrets by name, shared with the listener manager.
    secrets: crate::secret::SecretRegistry,
    /// Clusters from CDS waiting for their TLS secrets, by name.
    warming: HashMap<String, Warming>,
}

#[derive(Debug)]
struct Warming {
    config: ClusterConfig,
    since: std::time::Instant,
}

impl ClusterManager {
    pub fn new(stats: Store) -> Self {
        ClusterManager {
            entries: HashMap::new(),
            static_names: Default::default(),
            eds_index: HashMap::new(),
            published: Arc::new(ArcSwap::from_pointee(ClusterSet::default())),
            stats,
            secrets: Default::default(),
            warming: HashMap::new(),
        }
    }

    /// Uses `secrets` for the TLS contexts of the clusters added from now on.
    pub fn set_secrets(&mut self, secrets: crate::secret::SecretRegistry) {
        self.secrets = secrets;
    }

    /// The handle workers read clusters through.
    pub fn published(&self) -> Arc<ArcSwap<ClusterSet>> {
        self.published.clone()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Cluster>> {
        self.entries.get(name).map(|e| e.cluster.clone())
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }

    /// Adds or replaces a cluster; an identical config is a no-op (returns false). Must run inside a tokio
    /// runtime: DNS clusters start their refresh loop there.
    pub fn add_or_update(&mut self, config: ClusterConfig) -> bool {
        let changed = match self.upsert(config) {
            Ok(changed) => changed,
            Err((name, e)) => {
                warn!(cluster = %name, "cluster refused: {e}");
                false
            }
        };
        if changed {
            self.publish();
        }
        changed
    }

    /// `add_or_update` without publishing, for batches; Err((name, why)) when the cluster is refused.
    fn upsert(&mut self, config: ClusterConfig) -> Result<bool, (String, String)> {
        if let Some(old) = self.entries.get(&config.name)
            && old.cluster.config.proto == config.proto
        {
            // The serving version wins over a newer one that was still warming.
            self.warming.remove(&config.name);
            return Ok(false);
        }
        if self.warming.get(&config.name).is_some_and(|w| w.config.proto == config.proto) {
            return Ok(false);
        }
        for tls in config.tls_contexts() {
            tls.bind(&self.secrets).map_err(|e| (config.name.clone(), e.to_string()))?;
        }
        let missing: Vec<&str> = config
            .tls_contexts()
            .flat_map(|t| t.secrets())
            .filter(|b| b.current().is_none())
            .map(|b| b.reference.name.as_str())
            .collect();
        // Envoy's cluster warming on SDS: a cluster from CDS is not used until its secrets arrived (or their
        // initial_fetch_timeout passed); the version it replaces keeps serving meanwhile.
        if !missing.is_empty() && !self.static_names.contains(&config.name) {
            info!(cluster = %config.name, missing = ?missing, "cluster warming: waiting for its secrets");
            let name = config.name.clone();
            self.warming.insert(name, Warming { config, since: std::time::Instant::now() });
            return Ok(false);
        }
        self.warming.remove(&config.name);
        Ok(self.install(config))
    }

    /// Makes `config` the serving version of its cluster (not yet published).
    fn install(&mut self, config: ClusterConfig) -> bool {
        let name = config.name.clone();
        let config = Arc::new(config);
        let old = self.entries.remove(&name);
        // An updated cluster keeps serving its current hosts until its own discovery says otherwise (Envoy warms the
        // new cluster instead): EDS with the same service until the next assignment, DNS with the same names until
        // the next resolution.
        let inherited = old.as_ref().map(|o| &o.cluster).filter(|o| match (&config.kind, &o.config.kind) {
            (ClusterKind::Eds { service_name: a }, ClusterKind::Eds { service_name: b }) => a == b,
            (ClusterKind::StrictDns, ClusterKind::StrictDns) | (ClusterKind::LogicalDns, ClusterKind::LogicalDns) => {
                o.config.endpoints == config.endpoints
            }
            _ => false,
        });
        let hosts = match inherited {
            Some(o) => o.hosts(),
            None => Arc::new(HostSet::from_endpoints(&config.endpoints, config.locality_weighted)),
        };
        if let Some(old) = &old {
            old.stop.cancel();
        }
        let cluster = Arc::new(Cluster::with_hosts(config.clone(), hosts, &self.stats));
        let stop = CancellationToken::new();
        if let Some(outlier) = &config.outlier {
            tokio::spawn(outlier_interval(Arc::downgrade(&cluster), outlier.interval, stop.clone()));
        }
        let ready = match config.kind {
            ClusterKind::StrictDns | ClusterKind::LogicalDns => {
                let (tx, rx) = watch::channel(false);
                tokio::spawn(dns_refresh(Arc::downgrade(&cluster), stop.clone(), tx));
                rx
            }
            _ => watch::channel(true).1,
        };
        info!(cluster = %name, "cluster {}", if old.is_some() { "updated" } else { "added" });
        if let Some(path) = &config.pipe {
            info!(cluster = %name, path = %path.display(), "the cluster's endpoint is a Unix socket: it serves gRPC config sources (SDS) only; tcp_proxy and HTTP find no host in it");
        }
        self.entries.insert(name, Entry { cluster, stop, ready });
        true
    }

    /// Activates warming clusters whose secrets arrived, or that waited their secrets' `initial_fetch_timeout` (then
    /// their TLS handshakes fail until the secrets come, as in Envoy); call after secret updates and periodically.
    /// Returns how many became active.
    pub fn promote_warming(&mut self) -> usize {
        let ready: Vec<String> = self
            .warming
            .iter()
            .filter(|(_, w)| {
                // Static secrets are there from the start: only fetched ones count, each with its own timeout.
                let secrets = || {
                    let all = w.config.tls_contexts().flat_map(|t| t.secrets());
                    all.filter(|b| b.reference.source != crate::secret::SecretSource::Static)
                };
                let arrived = secrets().all(|b| b.current().is_some());
                let limit = secrets()
                    .try_fold(std::time::Duration::MAX, |l, b| b.reference.initial_fetch_timeout.map(|t| l.min(t)));
                arrived || limit.is_some_and(|l| w.since.elapsed() >= l)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in &ready {
            if let Some(w) = self.warming.remove(name) {
                self.install(w.config);
            }
        }
        if !ready.is_empty() {
            self.publish();
        }
        ready.len()
    }

    /// The newest version of a cluster's resource: the warming one if any, else the serving one.
    pub fn newest_proto(&self, name: &str) -> Option<Arc<envoy_types::pb::envoy::config::cluster::v3::Cluster>> {
        self.warming
            .get(name)
            .map(|w| w.config.proto.clone())
            .or_else(|| self.get(name).map(|c| c.config.proto.clone()))
    }

    /// Adds a bootstrap cluster, which CDS cannot change or remove.
    pub fn add_static(&mut self, config: ClusterConfig) {
        self.static_names.insert(config.name.clone());
        self.add_or_update(config);
    }

    /// A CDS state-of-the-world update: clusters not named (and not in `keep`, the names of rejected resources) are
    /// removed, the rest added or updated. Returns (name, reason) for each resource it refused.
    pub fn apply_sotw(
        &mut self,
        configs: Vec<ClusterConfig>,
        keep: &std::collections::HashSet<String>,
    ) -> Vec<(String, String)> {
        let named: std::collections::HashSet<String> = configs.iter().map(|c| c.name.clone()).collect();
        let stale: Vec<String> = self
            .entries
            .keys()
            .chain(self.warming.keys())
            .filter(|n| !named.contains(*n) && !keep.contains(*n) && !self.static_names.contains(*n))
            .cloned()
            .collect();
        for name in stale {
            self.take(&name);
        }
        let mut errors = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for c in configs {
            if !seen.insert(c.name.clone()) {
                errors.push((c.name.clone(), format!("duplicate cluster {} found", c.name)));
            } else if self.static_names.contains(&c.name) {
                errors.push((c.name.clone(), "a static cluster cannot be changed by CDS".to_string()));
            } else if let Err(refused) = self.upsert(c) {
                errors.push(refused);
            }
        }
        self.publish();
        errors
    }

    /// Adds or updates a cluster from delta CDS; static clusters are refused.
    pub fn add_dynamic(&mut self, config: ClusterConfig) -> Result<(), String> {
        if self.static_names.contains(&config.name) {
            return Err("a static cluster cannot be changed by CDS".to_string());
        }
        if self.upsert(config).map_err(|(_, e)| e)? {
            self.publish();
        }
        Ok(())
    }

    /// Removes a cluster named by delta CDS; false if it is static (absent ones are fine).
    pub fn remove_dynamic(&mut self, name: &str) -> bool {
        if self.static_names.contains(name) {
            return false;
        }
        self.remove(name);
        true
    }

    /// Service names of EDS clusters: the EDS subscription.
    pub fn eds_service_names(&self) -> std::collections::BTreeSet<String> {
        // Warming clusters too: their endpoints should be there when they start serving.
        self.entries
            .values()
            .map(|e| &*e.cluster.config)
            .chain(self.warming.values().map(|w| &w.config))
            .filter_map(|c| match &c.kind {
                ClusterKind::Eds { service_name } => Some(service_name.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn remove(&mut self, name: &str) -> bool {
        let removed = self.take(name);
        if removed {
            self.publish();
        }
        removed
    }

    /// `remove` without publishing, for batches.
    fn take(&mut self, name: &str) -> bool {
        let was_warming = self.warming.remove(name).is_some();
        let Some(old) = self.entries.remove(name) else { return was_warming };
        old.stop.cancel();
        info!(cluster = %name, "cluster removed");
        true
    }

    /// Replaces the endpoints of the EDS cluster(s) whose service name is `la.cluster_name`.
    pub fn set_load_assignment(
        &mut self,
        la: &envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment,
    ) -> Result<usize, ConfigError> {
        let endpoints = crate::config::cluster::endpoints(la, false, "")?;
        let clusters = self.eds_index.get(&la.cluster_name).map(Vec::as_slice).unwrap_or_default();
        for name in clusters {
            if let Some(e) = self.entries.get(name) {
                e.cluster.set_hosts(HostSet::from_endpoints(&endpoints, e.cluster.config.locality_weighted));
            }
        }
        Ok(clusters.len())
    }

    /// Waits until every DNS cluster finished its first resolution (or `timeout` passes), so static listeners do
    /// not start before their upstreams can be found.
    pub async fn wait_ready(&self, timeout: std::time::Duration) {
        let waits = self.entries.values().map(|e| {
            let mut rx = e.ready.clone();
            async move {
                let _ = rx.wait_for(|r| *r).await;
            }
        });
        let all = join_all(waits);
        let _ = tokio::time::timeout(timeout, all).await;
    }

    fn publish(&mut self) {
        // Rebuilt here because publish runs once per change or batch: EDS then finds its clusters without a scan.
        self.eds_index.clear();
        for (name, e) in &self.entries {
            if let ClusterKind::Eds { service_name } = &e.cluster.config.kind {
                self.eds_index.entry(service_name.clone()).or_default().push(name.clone());
            }
        }
        let clusters = self.entries.iter().map(|(k, e)| (k.clone(), e.cluster.clone())).collect();
        self.published.store(Arc::new(ClusterSet { clusters }));
    }
}

impl Drop for ClusterManager {
    fn drop(&mut self) {
        for e in self.entries.values() {
            e.stop.cancel();
        }
    }
}

/// Awaits every future; they are all timers or watches, so awaiting them one after another costs nothing extra.
async fn join_all<F: std::future::Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    for f in futs {
        f.await;
    }
}

/// Outlier detection's `interval` timer: the detector's sweep, until the cluster is gone.
async fn outlier_interval(cluster: std::sync::Weak<Cluster>, interval: std::time::Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let Some(c) = cluster.upgrade() else { return };
        c.outlier_sweep();
    }
}

async fn dns_refresh(cluster: std::sync::Weak<Cluster>, stop: CancellationToken, ready: watch::Sender<bool>) {
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let config = c.config.clone();
        drop(c);
        let (hosts, errors) = tokio::select! {
            _ = stop.cancelled() => return,
            r = dns::resolve(&config) => r,
        };
        for e in &errors {
            warn!(cluster = %config.name, "dns resolution failed: {e}");
        }
        let Some(c) = cluster.upgrade() else { return };
        // A failed refresh keeps the last good answer, as Envoy does.
        if !hosts.hosts.is_empty() || errors.is_empty() {
            c.set_hosts(hosts);
        }
        drop(c);
        let _ = ready.send(true);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(refresh_delay(config.dns_refresh_rate, config.dns_jitter)) => {}
        }
    }
}

/// The wait before the next DNS refresh: the refresh rate plus, with `dns_jitter`, a random part of the jitter, so
/// that many proxies do not ask their resolver at the same moment.
fn refresh_delay(rate: std::time::Duration, jitter: std::time::Duration) -> std::time::Duration {
    if jitter.is_zero() {
        return rate;
    }
    let extra = rand::random_range(0..=u64::try_from(jitter.as_millis()).unwrap_or(u64::MAX));
    rate.saturating_add(std::time::Duration::from_millis(extra))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn dns_jitter_adds_at_most_the_jitter() {
        let rate = Duration::from_secs(5);
        assert_eq!(super::refresh_delay(rate, Duration::ZERO), rate);
        let delays: Vec<Duration> = (0..200).map(|_| super::refresh_delay(rate, Duration::from_millis(100))).collect();
        assert!(delays.iter().all(|d| *d >= rate && *d <= rate + Duration::from_millis(100)));
        assert!(delays.iter().any(|d| *d != delays[0]), "drawn anew each time");
    }
}
