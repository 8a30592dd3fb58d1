//! The ADS client: one gRPC stream (StreamAggregatedResources, state of the world) to the cluster named in
//! `ads_config`, kept up with jittered exponential backoff (Envoy's defaults, 500 ms to 30 s) while the proxy goes
//! on serving its last good config. Each response is applied through the listener and cluster managers and answered
//! with exactly one ACK or NACK; a NACK's `error_detail` names every rejected resource, and the good resources of
//! the same response still apply (Envoy's partial-apply rule).

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span, warn};

use super::delta::DeltaState;
use super::state::SotwState;
use super::status::{Held, Received, Update, XdsStatus};
use super::{CLUSTER, ENDPOINT, LISTENER, Protocol, ROUTE, SECRET};
use crate::config::cluster::ClusterConfig;
use crate::config::listener::ListenerConfig;
use crate::listener::manager::ListenerManager;
use crate::secret::{Secret, SecretSource};
use crate::stats::{Counter, Gauge, Store};
use crate::upstream::ClusterManager;

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where the ADS stream goes and who it updates.
#[derive(Debug, Clone)]
pub struct AdsClient {
    /// The static cluster named by `ads_config.grpc_services[0].envoy_grpc.cluster_name`.
    pub cluster: String,
    pub protocol: Protocol,
    pub node: envoy_types::pb::envoy::config::core::v3::Node,
    pub listeners: Arc<Mutex<ListenerManager>>,
    pub clusters: Arc<Mutex<ClusterManager>>,
    pub stats: Store,
    /// Where each resource's version and ACK/NACK outcome is recorded for CSDS and /config_dump.
    pub status: XdsStatus,
    /// Cancelled at shutdown: a draining proxy applies no more config.
    pub stop: tokio_util::sync::CancellationToken,
}

/// Envoy's per-subscription stats (`listener_manager.lds.*`, `cluster_manager.cds.*`).
#[derive(Debug, Clone)]
struct SubscriptionStats {
    update_attempt: Counter,
    update_success: Counter,
    update_rejected: Counter,
    version: Gauge,
}

impl SubscriptionStats {
    fn new(store: &Store, prefix: &str) -> Self {
        let c = |s: &str| store.counter(&format!("{prefix}.{s}"));
        SubscriptionStats {
            update_attempt: c("update_attempt"),
            update_success: c("update_success"),
            update_rejected: c("update_rejected"),
            version: store.gauge(&format!("{prefix}.version")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    #[error("config source cluster '{0}' has no endpoint")]
    NoEndpoint(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, tonic::transport::Error),
    #[error("stream failed: {0}")]
    Grpc(#[from] tonic::Status),
    #[error("stream closed by the control plane")]
    Closed,
}

impl AdsClient {
    /// Runs forever: connect, subscribe, apply; on any failure keep the config and reconnect after a backoff.
    pub async fn run(self) {
        let mut sotw = SotwState::new(self.node.clone());
        let mut delta = DeltaState::new(self.node.clone());
        // CDS before LDS, as Envoy orders them, so listeners find their clusters.
        for t in [CLUSTER, LISTENER] {
            let _ = sotw.subscribe(t, BTreeSet::new());
            let _ = delta.subscribe(t, BTreeSet::new());
        }
        // Secrets the bootstrap's listeners and clusters ask for over ADS.
        let secrets = self.secret_subscription();
        let _ = sotw.subscribe_named(SECRET, secrets.clone());
        let _ = delta.subscribe_named(SECRET, secrets);
        let connected = self.stats.gauge("control_plane.connected_state");
        let mut attempt = 0u32;
        loop {
            let span = info_span!("ads", cluster = %self.cluster, protocol = ?self.protocol);
            let stream = async {
                match self.protocol {
                    Protocol::StateOfTheWorld => self.stream(&mut sotw, &connected, &mut attempt).await,
                    Protocol::Delta => self.delta_stream(&mut delta, &connected, &mut attempt).await,
                }
            };
            let result = tokio::select! {
                r = stream.instrument(span) => r,
                _ = self.stop.cancelled() => {
                    connected.set(0);
                    info!("ADS stopped for shutdown");
                    return;
                }
            };
            connected.set(0);
            if result.is_err() {
                for prefix in ["cluster_manager.cds", "listener_manager.lds"] {
                    self.stats.counter(&format!("{prefix}.update_failure")).inc();
                }
            }
            let delay = backoff(attempt);
            attempt = attempt.saturating_add(1);
            match result {
                Ok(()) | Err(StreamError::Closed) => info!("ADS stream closed; reconnecting in {delay:?}"),
                Err(e) => warn!("ADS stream: {e}; reconnecting in {delay:?}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    async fn connect(
        &self,
        attempt: u32,
    ) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, StreamError> {
        let channel = channel(&self.clusters, &self.cluster, attempt).await?;
        Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX))
    }

    async fn stream(&self, state: &mut SotwState, connected: &Gauge, attempt: &mut u32) -> Result<(), StreamError> {
        // Per stream: after a reconnect every resource is looked at once more (cheap: unchanged ones are no-ops).
        let mut seen = Seen::default();
        let mut client = self.connect(*attempt).await?;
        let (tx, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
        for req in state.restart() {
            let _ = tx.send(req);
        }
        let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let mut responses = client.stream_aggregated_resources(requests).await?.into_inner();
        connected.set(1);
        info!("ADS stream up (state of the world)");
        while let Some(resp) = responses.message().await? {
            // A stream that delivers is healthy: the next failure starts the backoff afresh.
            *attempt = 0;
            state.received(&resp);
            let large = is_large(&resp.resources);
            let answer = self.apply(state, &resp, &mut seen);
            drop(resp);
            answer_response(&tx, answer, large);
        }
        Err(StreamError::Closed)
    }

    async fn delta_stream(
        &self,
        state: &mut DeltaState,
        connected: &Gauge,
        attempt: &mut u32,
    ) -> Result<(), StreamError> {
        let mut client = self.connect(*attempt).await?;
        let (tx, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
        for req in state.restart() {
            let _ = tx.send(req);
        }
        let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let mut responses = client.delta_aggregated_resources(requests).await?.into_inner();
        connected.set(1);
        info!("ADS stream up (delta)");
        while let Some(resp) = responses.message().await? {
            *attempt = 0;
            let large = is_large(resp.resources.iter().filter_map(|r| r.resource.as_ref()));
            let answer = self.apply_delta(state, &resp);
            drop(resp);
            answer_response(&tx, answer, large);
        }
        Err(StreamError::Closed)
    }

    /// Applies one delta response: what it carries is added or updated, what it names in `removed_resources` goes.
    fn apply_delta(
        &self,
        state: &mut DeltaState,
        resp: &DeltaDiscoveryResponse,
    ) -> (DeltaDiscoveryRequest, Vec<DeltaDiscoveryRequest>) {
        let mut errors = Vec::new();
        let mut applied = Vec::new();
        let mut follow_up = Vec::new();
        let stats_prefix = match resp.type_url.as_str() {
            LISTENER => Some("listener_manager.lds"),
            CLUSTER => Some("cluster_manager.cds"),
            _ => None,
        };
        let resources = resp.resources.iter().filter_map(|r| r.resource.as_ref().map(|any| (r, any)));
        match resp.type_url.as_str() {
            LISTENER => {
                let mut configs = Vec::new();
                let mut versions = std::collections::HashMap::new();
                for (r, any) in resources {
                    match decode::<Listener>(any, LISTENER)
                        .and_then(|l| ListenerConfig::try_from(l).map_err(|e| e.to_string()))
                    {
                        Ok(c) => {
                            versions.insert(c.name.clone(), r.version.clone());
                            configs.push(c);
                        }
                        Err(e) => errors.push(format!("{}: {e}", r.name)),
                    }
                }
                let mut lm = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
                for (name, result) in lm.apply_delta(configs, &resp.removed_resources) {
                    match result {
                        Ok(_) => applied.push((name.clone(), versions.remove(&name).unwrap_or_default())),
                        Err(e) => errors.push(format!("{name}: {e}")),
                    }
                }
                let routes = lm.routes().collect();
                drop(lm);
                self.status.set_subscription(ROUTE, &routes);
                follow_up.extend(state.subscribe_named(ROUTE, routes));
                follow_up.extend(state.subscribe_named(SECRET, self.secret_subscription()));
            }
            CLUSTER => {
                let mut cm = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
                for name in &resp.removed_resources {
                    if !cm.remove_dynamic(name) {
                        errors.push(format!("{name}: a static cluster cannot be removed by CDS"));
                    }
                }
                for (r, any) in resources {
                    match decode::<Cluster>(any, CLUSTER)
                        .and_then(|c| ClusterConfig::try_from(c).map_err(|e| e.to_string()))
                        .and_then(|c| cm.add_dynamic(c))
                    {
                        Ok(()) => applied.push((r.name.clone(), r.version.clone())),
                        Err(e) => errors.push(format!("{}: {e}", r.name)),
                    }
                }
                let names = cm.eds_service_names();
                self.status.set_subscription(ENDPOINT, &names);
                follow_up.extend(state.subscribe_named(ENDPOINT, names));
                drop(cm);
                self.listeners.lock().unwrap_or_else(|p| p.into_inner()).promote_warming();
                follow_up.extend(state.subscribe_named(SECRET, self.secret_subscription()));
            }
            ENDPOINT => {
                let mut cm = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
                for (r, any) in resources {
                    match decode::<ClusterLoadAssignment>(any, ENDPOINT)
                        .and_then(|la| cm.set_load_assignment(&la).map_err(|e| e.to_string()))
                    {
                        Ok(_) => applied.push((r.name.clone(), r.version.clone())),
                        Err(e) => errors.push(format!("{}: {e}", r.name)),
                    }
                }
                // A removed assignment leaves its cluster without endpoints.
                for name in &resp.removed_resources {
                    let empty = ClusterLoadAssignment { cluster_name: name.clone(), ..Default::default() };
                    let _ = cm.set_load_assignment(&empty);
                }
            }
            ROUTE => {
                let mut names = Vec::new();
                let with_versions = resp.resources.iter().filter_map(|r| {
                    r.resource.as_ref().map(|any| {
                        names.push((r.name.clone(), r.version.clone()));
                        (Some(r.version.as_str()), any)
                    })
                });
                match self.apply_routes(with_versions, &resp.system_version_info, &resp.removed_resources) {
                    Ok(()) => applied.extend(names),
                    Err(e) => errors.extend(e),
                }
            }
            SECRET => {
                let with_versions = resp
                    .resources
                    .iter()
                    .filter_map(|r| r.resource.as_ref().map(|any| (Some(r.version.as_str()), any)));
                let outcome = self.apply_secrets(with_versions, &resp.system_version_info);
                for r in resp.resources.iter().filter(|r| r.resource.is_some()) {
                    if !outcome.iter().any(|e| e.starts_with(&format!("{}: ", r.name))) {
                        applied.push((r.name.clone(), r.version.clone()));
                    }
                }
                // A removed secret stays in force for the contexts that use it: Envoy keeps serving the last one
                // too, and dropping it would break every handshake of a chain that is still configured.
                errors.extend(outcome);
            }
            other => errors.push(format!("type {other} is not supported")),
        }
        let redacted: Vec<(&str, &str, Any)> = if resp.type_url == SECRET {
            resp.resources
                .iter()
                .filter_map(|r| {
                    r.resource.as_ref().map(|any| (r.name.as_str(), r.version.as_str(), redacted_secret(any)))
                })
                .collect()
        } else {
            Vec::new()
        };
        let received: Vec<Received<'_>> = if resp.type_url == SECRET {
            redacted
                .iter()
                .map(|(name, version, any)| Received { name: Some(*name), any, version: Some(*version) })
                .collect()
        } else {
            resp.resources
                .iter()
                .filter_map(|r| {
                    r.resource.as_ref().map(|any| Received { name: Some(&r.name), any, version: Some(&r.version) })
                })
                .collect()
        };
        self.record_status(&Update {
            type_url: &resp.type_url,
            version: &resp.system_version_info,
            resources: received,
            removed: &resp.removed_resources,
            errors: &errors,
        });
        let stats = stats_prefix.map(|p| SubscriptionStats::new(&self.stats, p));
        if let Some(s) = &stats {
            s.update_attempt.inc();
        }
        let reply = if errors.is_empty() {
            if let Some(s) = &stats {
                s.update_success.inc();
                s.version.set(version_hash(&resp.system_version_info));
            }
            info!(type_url = %resp.type_url, resources = resp.resources.len(), removed = resp.removed_resources.len(), "ACK");
            state.ack(resp, &applied, &resp.removed_resources)
        } else {
            if let Some(s) = &stats {
                s.update_rejected.inc();
            }
            let message = errors.join("\n");
            warn!(type_url = %resp.type_url, "NACK: {}", message.replace('\n', "; "));
            state.nack(resp, &applied, &resp.removed_resources, message)
        };
        (reply, follow_up)
    }

    /// Applies one response; returns its ACK or NACK and, after CDS, a changed EDS subscription.
    fn apply(
        &self,
        state: &mut SotwState,
        resp: &DiscoveryResponse,
        seen: &mut Seen,
    ) -> (DiscoveryRequest, Vec<DiscoveryRequest>) {
        let (stats, outcome, follow_up) = match resp.type_url.as_str() {
            CLUSTER => {
                let outcome = self.apply_clusters(&resp.resources, &mut seen.clusters);
                let names = self.clusters.lock().unwrap_or_else(|p| p.into_inner()).eds_service_names();
                self.status.set_subscription(ENDPOINT, &names);
                let follow_up = state
                    .subscribe_named(ENDPOINT, names)
                    .into_iter()
                    .chain(state.subscribe_named(SECRET, self.secret_subscription()))
                    .collect();
                (Some(SubscriptionStats::new(&self.stats, "cluster_manager.cds")), outcome, follow_up)
            }
            LISTENER => {
                let outcome = self.apply_listeners(&resp.resources, &mut seen.listeners);
                let routes = self.route_subscription();
                self.status.set_subscription(ROUTE, &routes);
                let follow_up = state
                    .subscribe_named(ROUTE, routes)
                    .into_iter()
                    .chain(state.subscribe_named(SECRET, self.secret_subscription()))
                    .collect();
                (Some(SubscriptionStats::new(&self.stats, "listener_manager.lds")), outcome, follow_up)
            }
            ENDPOINT => (None, self.apply_endpoints(&resp.resources), Vec::new()),
            ROUTE => {
                let resources = resp.resources.iter().map(|any| (None, any));
                (None, self.apply_routes(resources, &resp.version_info, &[]), Vec::new())
            }
            SECRET => {
                let errors = self.apply_secrets(resp.resources.iter().map(|any| (None, any)), &resp.version_info);
                (None, if errors.is_empty() { Ok(()) } else { Err(errors) }, Vec::new())
            }
            other => (None, Err(vec![format!("type {other} is not supported")]), Vec::new()),
        };
        // Secrets are recorded (for CSDS and dumps) with their private keys redacted.
        let redacted: Vec<Any> =
            if resp.type_url == SECRET { resp.resources.iter().map(redacted_secret).collect() } else { Vec::new() };
        let recorded = if resp.type_url == SECRET { &redacted } else { &resp.resources };
        self.record_status(&Update {
            type_url: &resp.type_url,
            version: &resp.version_info,
            resources: recorded.iter().map(|any| Received { name: None, any, version: None }).collect(),
            removed: &[],
            errors: outcome.as_ref().err().map_or(&[], Vec::as_slice),
        });
        if let Some(s) = &stats {
            s.update_attempt.inc();
        }
        let reply = match outcome {
            Ok(()) => {
                if let Some(s) = &stats {
                    s.update_success.inc();
                    s.version.set(version_hash(&resp.version_info));
                }
                info!(type_url = %resp.type_url, version = %resp.version_info, resources = resp.resources.len(), "ACK");
                state.ack(resp)
            }
            Err(errors) => {
                if let Some(s) = &stats {
                    s.update_rejected.inc();
                }
                let message = errors.join("\n");
                warn!(type_url = %resp.type_url, version = %resp.version_info, "NACK: {}", message.replace('\n', "; "));
                state.nack(resp, message)
            }
        };
        (reply, follow_up)
    }

    /// Records what an applied response left in the managers, resource by resource, for CSDS and /config_dump.
    fn record_status(&self, update: &Update<'_>) {
        match update.type_url {
            LISTENER => {
                let lm = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
                self.status.record(
                    update,
                    |name, _| lm.newest(name).map(|l| Held::Listener(l.config().proto.clone())),
                    |name| lm.newest(name).is_some() && !lm.is_static(name),
                );
            }
            CLUSTER => {
                let cm = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
                self.status.record(
                    update,
                    |name, _| cm.newest_proto(name).map(Held::Cluster),
                    |name| cm.newest_proto(name).is_some(),
                );
            }
            _ => self.status.record(update, |_, any| Some(Held::Any(any.clone())), |_| true),
        }
    }

    fn apply_listeners(&self, resources: &[Any], seen: &mut Unchanged) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let (configs, mut keep, hashes) = convert_all(resources, seen, &mut errors, |any| {
            let l = decode::<Listener>(any, LISTENER).map_err(|e| (None, e))?;
            let name = l.name.clone();
            ListenerConfig::try_from(l).map(|c| (name.clone(), c)).map_err(|e| (Some(name), e.to_string()))
        });
        let mut lm = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        if unnamed_failure(&errors) {
            // A resource we could not even name might be any listener: remove nothing this time.
            keep.extend(lm.listeners().into_iter().map(|l| l.name));
            keep.extend(lm.warming_names());
        }
        for name in lm.apply_sotw(configs, &keep).into_iter().filter_map(|(name, result)| match result {
            Ok(_) => Some(name),
            Err(e) => {
                errors.push(format!("{name}: {e}"));
                None
            }
        }) {
            keep.insert(name);
        }
        seen.remember(hashes, &keep);
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    fn apply_clusters(&self, resources: &[Any], seen: &mut Unchanged) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let (configs, mut keep, hashes) = convert_all(resources, seen, &mut errors, |any| {
            let c = decode::<Cluster>(any, CLUSTER).map_err(|e| (None, e))?;
            let name = c.name.clone();
            ClusterConfig::try_from(c).map(|c| (name.clone(), c)).map_err(|e| (Some(name), e.to_string()))
        });
        let applied: Vec<String> = configs.iter().map(|c| c.name.clone()).collect();
        let mut cm = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        if unnamed_failure(&errors) {
            keep.extend(cm.names());
        }
        let refused = cm.apply_sotw(configs, &keep);
        for name in applied {
            if !refused.iter().any(|(n, _)| *n == name) {
                keep.insert(name);
            }
        }
        errors.extend(refused.into_iter().map(|(name, e)| format!("{name}: {e}")));
        seen.remember(hashes, &keep);
        drop(cm);
        self.listeners.lock().unwrap_or_else(|p| p.into_inner()).promote_warming();
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// The route configuration names listeners refer to now: the RDS subscription.
    fn route_subscription(&self) -> BTreeSet<String> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner()).routes().collect()
    }

    /// Installs route configurations (each resource with its delta version, if any) and removes the ones a delta
    /// response names; listeners that waited for them start serving.
    fn apply_routes<'a>(
        &self,
        resources: impl Iterator<Item = (Option<&'a str>, &'a Any)>,
        version: &str,
        removed: &[String],
    ) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let registry = self.listeners.lock().unwrap_or_else(|p| p.into_inner()).routes();
        for (i, (resource_version, any)) in resources.enumerate() {
            let rc = match decode::<RouteConfiguration>(any, ROUTE) {
                Ok(rc) => rc,
                Err(e) => {
                    errors.push(format!("resources[{i}]: {e}"));
                    continue;
                }
            };
            match crate::config::http::route_table(&rc) {
                Ok(table) => {
                    if !registry.set(table, resource_version.unwrap_or(version)) {
                        info!(route_config = %rc.name, "ignoring a route configuration no listener asked for");
                    }
                }
                Err(e) => errors.push(format!("{}: {e}", rc.name)),
            }
        }
        for name in removed {
            registry.clear(name);
        }
        self.listeners.lock().unwrap_or_else(|p| p.into_inner()).promote_warming();
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// The secret names listeners and clusters ask ADS for now: the SDS subscription (also recorded for CSDS).
    fn secret_subscription(&self) -> BTreeSet<String> {
        let registry = self.listeners.lock().unwrap_or_else(|p| p.into_inner()).secrets();
        let names = registry.subscription(&SecretSource::Ads);
        // CSDS shows every source's secrets under one type.
        self.status.set_subscription(SECRET, &registry.dynamic_names());
        names
    }

    /// Installs secrets delivered over ADS; see [`install_secrets`].
    fn apply_secrets<'a>(
        &self,
        resources: impl Iterator<Item = (Option<&'a str>, &'a Any)>,
        version: &str,
    ) -> Vec<String> {
        install_secrets(&self.listeners, &self.clusters, &self.stats, &SecretSource::Ads, resources, version)
    }

    fn apply_endpoints(&self, resources: &[Any]) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let mut cm = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        for (i, any) in resources.iter().enumerate() {
            match decode::<ClusterLoadAssignment>(any, ENDPOINT) {
                Ok(la) => {
                    if let Err(e) = cm.set_load_assignment(&la) {
                        errors.push(format!("{}: {e}", la.cluster_name));
                    }
                }
                Err(e) => errors.push(format!("resources[{i}]: {e}")),
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}

/// Installs secrets delivered by `source` (each with its delta version, if any); returns the rejections, one line per
/// secret naming it and the field. A rejected secret leaves the version in force as it was; listeners and clusters
/// that waited for a secret start serving.
pub(crate) fn install_secrets<'a>(
    listeners: &Mutex<ListenerManager>,
    clusters: &Mutex<ClusterManager>,
    store: &Store,
    source: &SecretSource,
    resources: impl Iterator<Item = (Option<&'a str>, &'a Any)>,
    version: &str,
) -> Vec<String> {
    let mut errors = Vec::new();
    let registry = listeners.lock().unwrap_or_else(|p| p.into_inner()).secrets();
    for (i, (resource_version, any)) in resources.enumerate() {
        let proto = match decode::<envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret>(any, SECRET)
        {
            Ok(s) => s,
            Err(e) => {
                errors.push(format!("resources[{i}]: {e}"));
                continue;
            }
        };
        let name = proto.name.clone();
        let stats = |s: &str| store.counter(&format!("sds.{name}.{s}"));
        // Envoy's SdsApi skips a secret whose content did not change: a state-of-the-world response repeats every
        // secret, and re-installing one would rebuild every TLS context that uses it for nothing.
        let hash = bytes_hash(&any.value);
        if registry.holds(source, &name, hash) {
            continue;
        }
        stats("update_attempt").inc();
        match Secret::parse(proto, resource_version.unwrap_or(version), hash) {
            Ok(secret) => {
                if registry.set(source, secret) {
                    stats("update_success").inc();
                    info!(secret = %name, "secret updated");
                } else {
                    info!(secret = %name, "ignoring a secret no listener or cluster asked for");
                }
            }
            Err(e) => {
                stats("update_rejected").inc();
                errors.push(format!("{name}: {e}"));
            }
        }
    }
    // Clusters first: a listener may be waiting for a cluster that was waiting for a secret.
    clusters.lock().unwrap_or_else(|p| p.into_inner()).promote_warming();
    listeners.lock().unwrap_or_else(|p| p.into_inner()).promote_warming();
    errors
}

/// A gRPC channel (HTTP/2) to a config source's static cluster: one of its hosts, rotating across reconnects so one
/// dead control plane is not retried forever, or its Unix socket (a `pipe` endpoint, as Istio's `sds-grpc`).
pub(crate) async fn channel(
    clusters: &Mutex<ClusterManager>,
    name: &str,
    attempt: u32,
) -> Result<tonic::transport::Channel, StreamError> {
    enum Target {
        Tcp(std::net::SocketAddr),
        Unix(std::path::PathBuf),
    }
    let (target, timeout) = {
        let cm = clusters.lock().unwrap_or_else(|p| p.into_inner());
        let cluster = cm.get(name).ok_or_else(|| StreamError::NoEndpoint(name.to_string()))?;
        let target = match &cluster.config.pipe {
            Some(path) => Target::Unix(path.clone()),
            None => {
                let hosts = cluster.hosts();
                let host = hosts.hosts.get(attempt as usize % hosts.hosts.len().max(1)).cloned();
                Target::Tcp(host.ok_or_else(|| StreamError::NoEndpoint(name.to_string()))?.address)
            }
        };
        (target, cluster.config.connect_timeout)
    };
    // For a Unix socket the URI only names the HTTP/2 authority; the connector below picks the socket.
    let uri = match &target {
        Target::Tcp(addr) => format!("http://{addr}"),
        Target::Unix(_) => "http://localhost".to_string(),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(uri.clone())
        .map_err(|e| StreamError::Connect(uri.clone(), e))?
        .connect_timeout(timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let channel = match target {
        Target::Tcp(addr) => {
            let channel = endpoint.connect().await.map_err(|e| StreamError::Connect(uri.clone(), e))?;
            info!(control_plane = %addr, "connected");
            channel
        }
        Target::Unix(path) => {
            let shown = format!("unix:{}", path.display());
            let connector = tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
            });
            let channel =
                endpoint.connect_with_connector(connector).await.map_err(|e| StreamError::Connect(shown.clone(), e))?;
            info!(control_plane = %shown, "connected");
            channel
        }
    };
    Ok(channel)
}

/// Resources applied from the previous response of a type, by a hash of their bytes: a state-of-the-world
/// response repeats every resource, and one whose bytes did not change needs no decoding, validation or diffing.
#[derive(Debug, Default)]
struct Unchanged {
    by_hash: std::collections::HashMap<u64, String>,
}

impl Unchanged {
    /// Keeps the hashes of the resources that are now in effect (`in_effect` names), forgetting the rest.
    fn remember(&mut self, hashes: Vec<(u64, String)>, in_effect: &HashSet<String>) {
        self.by_hash = hashes.into_iter().filter(|(_, name)| in_effect.contains(name)).collect();
    }
}

#[derive(Debug, Default)]
struct Seen {
    listeners: Unchanged,
    clusters: Unchanged,
}

/// Converts the resources that changed since the last response; returns the configs to apply, the names to keep
/// as they are (unchanged, or rejected here: a rejected resource leaves the current one in place, as in Envoy),
/// and each resource's hash and name.
fn convert_all<C>(
    resources: &[Any],
    seen: &Unchanged,
    errors: &mut Vec<String>,
    convert: impl Fn(&Any) -> Result<(String, C), (Option<String>, String)>,
) -> (Vec<C>, HashSet<String>, Vec<(u64, String)>) {
    let mut configs = Vec::new();
    let mut keep = HashSet::new();
    let mut hashes = Vec::with_capacity(resources.len());
    for (i, any) in resources.iter().enumerate() {
        let hash = bytes_hash(&any.value);
        if let Some(name) = seen.by_hash.get(&hash) {
            keep.insert(name.clone());
            hashes.push((hash, name.clone()));
            continue;
        }
        match convert(any) {
            Ok((name, config)) => {
                hashes.push((hash, name));
                configs.push(config);
            }
            Err((Some(name), e)) => {
                errors.push(format!("{name}: {e}"));
                keep.insert(name);
            }
            Err((None, e)) => errors.push(format!("resources[{i}]: {e}")),
        }
    }
    (configs, keep, hashes)
}

/// Whether some resource failed before its name was known (`resources[i]: ...`).
fn unnamed_failure(errors: &[String]) -> bool {
    errors.iter().any(|e| e.starts_with("resources["))
}

/// Sends a response's ACK/NACK and any subscription change it caused; after a large response (already dropped by
/// the caller) returns the freed decoding buffers to the OS.
fn answer_response<R>(tx: &mpsc::UnboundedSender<R>, (reply, follow_up): (R, Vec<R>), large: bool) {
    if large {
        release_heap();
    }
    let _ = tx.send(reply);
    for req in follow_up {
        let _ = tx.send(req);
    }
}

/// A response big enough that its decoding buffers are worth handing back to the OS afterwards.
fn is_large<'a>(resources: impl IntoIterator<Item = &'a Any>) -> bool {
    resources.into_iter().map(|a| a.value.len()).sum::<usize>() >= 1 << 20
}

/// After a large response the decoding buffers are free but still held by the allocator; hand them back so the
/// proxy's RSS reflects the config it holds, not the biggest response it ever parsed.
fn release_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the OS; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn bytes_hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// A secret resource with its private key redacted, for the status CSDS and /config_dump read; one that does not
/// decode is recorded empty rather than as received.
pub(crate) fn redacted_secret(any: &Any) -> Any {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret as SecretPb;
    let value =
        SecretPb::decode(any.value.as_slice()).map(|s| crate::secret::redact(s).encode_to_vec()).unwrap_or_default();
    Any { type_url: any.type_url.clone(), value }
}

pub(crate) fn decode<T: Message + Default>(any: &Any, type_url: &str) -> Result<T, String> {
    if any.type_url != type_url {
        return Err(format!("expected {type_url}, got {}", any.type_url));
    }
    T::decode(any.value.as_slice()).map_err(|e| format!("cannot decode: {e}"))
}

/// Full jitter: a random delay up to the exponential bound, so a fleet that lost its control plane does not
/// reconnect in lockstep.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let bound = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_MAX);
    bound.mul_f64(rand::random::<f64>()).max(Duration::from_millis(50))
}

/// Envoy reports `<prefix>.version` as a hash of the version string.
fn version_hash(version: &str) -> i64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    version.hash(&mut h);
    (h.finish() >> 1) as i64
}

/// The cluster the ADS stream connects through, from `dynamic_resources.ads_config`, if ADS is configured.
pub fn ads_cluster(
    dynamic: &envoy_types::pb::envoy::config::bootstrap::v3::bootstrap::DynamicResources,
) -> Result<Option<(String, Protocol)>, crate::config::ConfigError> {
    use crate::config::ConfigError;
    use envoy_types::pb::envoy::config::core::v3::api_config_source::ApiType;
    use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
    let Some(ads) = &dynamic.ads_config else { return Ok(None) };
    let protocol = match ApiType::try_from(ads.api_type) {
        Ok(ApiType::Grpc) => Protocol::StateOfTheWorld,
        Ok(ApiType::DeltaGrpc) => Protocol::Delta,
        _ => {
            return Err(ConfigError::new("dynamic_resources.ads_config.api_type", "ADS needs GRPC or DELTA_GRPC"));
        }
    };
    match ads.grpc_services.first().and_then(|g| g.target_specifier.as_ref()) {
        Some(TargetSpecifier::EnvoyGrpc(e)) if !e.cluster_name.is_empty() => {
            Ok(Some((e.cluster_name.clone(), protocol)))
        }
        Some(TargetSpecifier::GoogleGrpc(_)) => Err(ConfigError::new(
            "dynamic_resources.ads_config.grpc_services[0].google_grpc",
            "google_grpc is not supported; use envoy_grpc with a static cluster",
        )),
        _ => Err(ConfigError::new(
            "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name",
            "ADS needs a cluster",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= BACKOFF_MAX, "{attempt}: {d:?}");
        }
        let early: Duration = (0..200).map(|_| backoff(0)).max().unwrap_or_default();
        assert!(early <= BACKOFF_BASE);
    }
}
