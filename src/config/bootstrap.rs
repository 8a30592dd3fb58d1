//! The validated bootstrap: node identity, admin address, static listeners and clusters, and the dynamic resource
//! sources (kept for the xDS client).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::bootstrap::v3 as bpb;
use envoy_types::pb::envoy::config::core::v3 as core;

use super::cluster::ClusterConfig;
use super::http::RouteSource;
use super::listener::{ListenerConfig, NetworkFilterConfig};
use super::{ConfigError, audit_resource, ip_socket_address};

#[derive(Debug, Clone)]
pub struct BootstrapConfig {
    pub node: core::Node,
    pub admin_address: Option<SocketAddr>,
    pub listeners: Vec<ListenerConfig>,
    pub clusters: Vec<ClusterConfig>,
    /// The process's secret registry, holding `static_resources.secrets`; the static listeners' and clusters' TLS
    /// contexts are bound to it already, and the server hands it to its managers.
    pub secrets: crate::secret::SecretRegistry,
    /// LDS/CDS/ADS sources, consumed by the xDS client.
    pub dynamic_resources: Option<bpb::bootstrap::DynamicResources>,
    /// The static cluster the ADS stream goes through and its protocol, when `ads_config` is set.
    pub ads_cluster: Option<(String, crate::xds::Protocol)>,
    /// `enable_worker_cpu_affinity`: worker i runs on the i-th CPU of the process's affinity mask.
    pub worker_cpu_affinity: bool,
    pub proto: Arc<bpb::Bootstrap>,
}

/// Command-line values that Envoy lets override the bootstrap.
#[derive(Debug, Clone, Default)]
pub struct NodeOverrides {
    pub service_node: Option<String>,
    pub service_cluster: Option<String>,
}

impl BootstrapConfig {
    pub fn from_proto(mut b: bpb::Bootstrap, overrides: &NodeOverrides) -> Result<Self, ConfigError> {
        audit_resource(&b, "envoy.config.bootstrap.v3.Bootstrap")?;
        let node = b.node.get_or_insert_with(Default::default);
        if let Some(id) = &overrides.service_node {
            node.id = id.clone();
        }
        if let Some(cluster) = &overrides.service_cluster {
            node.cluster = cluster.clone();
        }
        let node = node.clone();
        let admin_address = b
            .admin
            .as_ref()
            .and_then(|a| a.address.as_ref())
            .map(|a| ip_socket_address(Some(a), "admin.address"))
            .transpose()?;

        let statics = b.static_resources.clone().unwrap_or_default();
        // Before clusters and listeners, as Envoy loads them, so references to them can be checked.
        let mut secrets = Vec::with_capacity(statics.secrets.len());
        for (i, s) in statics.secrets.into_iter().enumerate() {
            let path = format!("static_resources.secrets[{i}]");
            secrets.push(Arc::new(crate::secret::Secret::parse(s, "", 0).map_err(|e| e.under(&path))?));
        }
        let mut clusters = Vec::with_capacity(statics.clusters.len());
        let mut cluster_names = HashSet::new();
        for (i, c) in statics.clusters.into_iter().enumerate() {
            let path = format!("static_resources.clusters[{i}]");
            let name = c.name.clone();
            let c = ClusterConfig::try_from(c).map_err(|e| e.under(&path))?;
            if !cluster_names.insert(name.clone()) {
                return Err(ConfigError::new(path, format!("cluster manager: duplicate cluster '{name}' found")));
            }
            clusters.push(c);
        }
        // Envoy: a gRPC config source must go through a statically defined, non-EDS cluster.
        let grpc_clusters = clusters
            .iter()
            .filter(|c| !matches!(c.kind, super::cluster::ClusterKind::Eds { .. }))
            .map(|c| c.name.clone())
            .collect();
        let registry = crate::secret::SecretRegistry::with_static(&secrets, grpc_clusters)?;
        let pipe_clusters: HashSet<String> =
            clusters.iter().filter(|c| c.pipe.is_some()).map(|c| c.name.clone()).collect();
        drop(secrets);
        for (i, c) in clusters.iter().enumerate() {
            for tls in c.tls_contexts() {
                tls.bind(&registry)
                    .map_err(|e| ConfigError::new(format!("static_resources.clusters[{i}]"), e.to_string()))?;
            }
        }

        let cds = b.dynamic_resources.as_ref().is_some_and(|d| d.cds_config.is_some());
        let mut listeners = Vec::with_capacity(statics.listeners.len());
        let mut listener_names = HashSet::new();
        for (i, mut l) in statics.listeners.into_iter().enumerate() {
            let path = format!("static_resources.listeners[{i}]");
            if l.name.is_empty() {
                // Envoy gives an unnamed static listener an internal UUID; ours is stable across restarts.
                l.name = format!("static_listener_{i}");
            }
            let l = ListenerConfig::try_from(l).map_err(|e| e.under(&path))?;
            for tls in l.filter_chains.iter().chain(l.default_filter_chain.iter()).filter_map(|c| c.tls.as_ref()) {
                tls.bind(&registry).map_err(|e| ConfigError::new(&path, e.to_string()))?;
            }
            if !listener_names.insert(l.name.clone()) {
                return Err(ConfigError::new(path, format!("duplicate listener {} found", l.name)));
            }
            // Without CDS no cluster can appear later, so a dangling reference can only be a typo.
            if !cds {
                check_clusters(&l, &cluster_names).map_err(|e| e.under(&path))?;
            }
            check_pipe_use(&l, &pipe_clusters).map_err(|e| e.under(&path))?;
            listeners.push(l);
        }

        let ads_cluster = match &b.dynamic_resources {
            Some(d) => crate::xds::client::ads_cluster(d)?,
            None => None,
        };
        if let Some((name, _)) = &ads_cluster
            && !cluster_names.contains(name)
        {
            return Err(ConfigError::new(
                "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name",
                format!("unknown cluster '{name}' (the ADS cluster must be a static cluster)"),
            ));
        }
        Ok(BootstrapConfig {
            node,
            ads_cluster,
            admin_address,
            listeners,
            clusters,
            secrets: registry,
            dynamic_resources: b.dynamic_resources.clone(),
            worker_cpu_affinity: b.enable_worker_cpu_affinity,
            proto: Arc::new(b),
        })
    }
}

impl BootstrapConfig {
    /// `dynamic_resources.cds_config.initial_fetch_timeout` (Envoy's default 15 s; 0 s waits for ever): how long a
    /// listener from LDS waits for the clusters it names.
    pub fn cds_initial_fetch_timeout(&self) -> Option<std::time::Duration> {
        let timeout = self
            .dynamic_resources
            .as_ref()
            .and_then(|d| d.cds_config.as_ref())
            .and_then(|c| c.initial_fetch_timeout.as_ref())
            .and_then(|d| super::duration(d, "dynamic_resources.cds_config.initial_fetch_timeout").ok())
            .unwrap_or(crate::listener::manager::WARMING_TIMEOUT);
        (!timeout.is_zero()).then_some(timeout)
    }
}

/// Every network filter of a listener's chains, with the path of its `typed_config`. Skipped Istio filters are not
/// in `filters`, so the path names the chain's last proto filter: the terminal one, the only kind that names clusters.
fn chain_filters(l: &ListenerConfig) -> impl Iterator<Item = (String, &NetworkFilterConfig)> {
    let chains = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("filter_chains[{i}]"), c))
        .chain(l.default_filter_chain.iter().map(|c| ("default_filter_chain".to_string(), c)));
    chains.flat_map(|(path, chain)| {
        let j = chain.proto().filters.len().saturating_sub(1);
        let at = format!("{path}.filters[{j}].typed_config");
        chain.filters.iter().map(move |f| (at.clone(), f))
    })
}

/// A cluster whose endpoint is a Unix socket serves gRPC config sources only: tcp_proxy and routes cannot use it.
fn check_pipe_use(l: &ListenerConfig, pipe_clusters: &HashSet<String>) -> Result<(), ConfigError> {
    for (at, f) in chain_filters(l) {
        let used: Vec<&str> = match f {
            NetworkFilterConfig::TcpProxy(tp) => tp.clusters.iter().map(|(n, _)| n.as_str()).collect(),
            NetworkFilterConfig::HttpConnectionManager(h) => match &h.routes {
                RouteSource::Inline(table) => table.cluster_names().collect(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        if let Some(name) = used.into_iter().find(|n| pipe_clusters.contains(*n)) {
            return Err(ConfigError::new(
                at,
                format!("{}", crate::listener::manager::ListenerError::PipeCluster(name.to_string())),
            ));
        }
    }
    Ok(())
}

fn check_clusters(l: &ListenerConfig, known: &HashSet<String>) -> Result<(), ConfigError> {
    for (at, f) in chain_filters(l) {
        if let NetworkFilterConfig::TcpProxy(tp) = f
            && let Some((name, _)) = tp.clusters.iter().find(|(n, _)| !known.contains(n))
        {
            return Err(ConfigError::new(format!("{at}.cluster"), format!("unknown cluster '{name}'")));
        }
        // Envoy's validate_clusters defaults to true for an inline route_config.
        if let NetworkFilterConfig::HttpConnectionManager(h) = f
            && let RouteSource::Inline(table) = &h.routes
            && let Some(name) = table.cluster_names().find(|n| !known.contains(*n))
        {
            return Err(ConfigError::new(
                format!("{at}.route_config"),
                format!("route points at unknown cluster '{name}'"),
            ));
        }
    }
    Ok(())
}
