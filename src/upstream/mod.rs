//! Upstreams: the cluster manager (owned by the main thread) and the immutable cluster set it publishes to
//! workers through an `ArcSwap`, so the connection path finds a cluster without taking a lock.

pub mod cluster;
pub mod dns;
pub mod lb;
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
    /// Stops the DNS refresh loop of a replaced or removed cluster.
    refresh: Option<CancellationToken>,
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
}

impl ClusterManager {
    pub fn new(stats: Store) -> Self {
        ClusterManager {
            entries: HashMap::new(),
            static_names: Default::default(),
            eds_index: HashMap::new(),
            published: Arc::new(ArcSwap::from_pointee(ClusterSet::default())),
            stats,
        }
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
        let changed = self.upsert(config);
        if changed {
            self.publish();
        }
        changed
    }

    /// `add_or_update` without publishing, for batches.
    fn upsert(&mut self, config: ClusterConfig) -> bool {
        if let Some(old) = self.entries.get(&config.name)
            && old.cluster.config.proto == config.proto
        {
            return false;
        }
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
            None => Arc::new(HostSet::from_endpoints(&config.endpoints)),
        };
        if let Some(token) = old.as_ref().and_then(|o| o.refresh.as_ref()) {
            token.cancel();
        }
        let cluster = Arc::new(Cluster::with_hosts(config.clone(), hosts, &self.stats));
        if let Some(outlier) = &config.outlier {
            tokio::spawn(outlier_interval(Arc::downgrade(&cluster), outlier.interval));
        }
        let (refresh, ready) = match config.kind {
            ClusterKind::StrictDns | ClusterKind::LogicalDns => {
                let token = CancellationToken::new();
                let (tx, rx) = watch::channel(false);
                tokio::spawn(dns_refresh(Arc::downgrade(&cluster), token.clone(), tx));
                (Some(token), rx)
            }
            _ => (None, watch::channel(true).1),
        };
        info!(cluster = %name, "cluster {}", if old.is_some() { "updated" } else { "added" });
        self.entries.insert(name, Entry { cluster, refresh, ready });
        true
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
            } else {
                self.upsert(c);
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
        self.add_or_update(config);
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
        self.entries
            .values()
            .filter_map(|e| match &e.cluster.config.kind {
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
        let Some(old) = self.entries.remove(name) else { return false };
        if let Some(token) = old.refresh {
            token.cancel();
        }
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
                e.cluster.set_hosts(HostSet::from_endpoints(&endpoints));
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
            if let Some(t) = &e.refresh {
                t.cancel();
            }
        }
    }
}

/// Awaits every future; they are all timers or watches, so awaiting them one after another costs nothing extra.
async fn join_all<F: std::future::Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    for f in futs {
        f.await;
    }
}

/// Outlier detection's `interval` timer: returns ejected hosts to service once their time is over, until the cluster
/// is gone.
async fn outlier_interval(cluster: std::sync::Weak<Cluster>, interval: std::time::Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(c) = cluster.upgrade() else { return };
        c.uneject_expired();
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
            _ = tokio::time::sleep(config.dns_refresh_rate) => {}
        }
    }
}
