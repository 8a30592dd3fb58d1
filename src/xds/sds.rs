//! SDS over a gRPC stream of its own (`envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets`, state of the
//! world), for secrets whose `sds_config` is an `api_config_source` naming a static cluster: Istio's sidecars get their
//! workload certificate (`default`) and CA (`ROOTCA`) this way from pilot-agent, over the Unix socket of `sds-grpc`.
//!
//! One stream per cluster, opened once something refers to a secret of it. It follows the same protocol rules and
//! the same backoff as the ADS stream, installs secrets through the same code ([`super::client::install_secrets`]),
//! and follows the subscription as listeners and clusters come and go.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::SECRET;
use super::client::{StreamError, backoff, channel, install_secrets, redacted_secret};
use super::state::SotwState;
use super::status::{Held, Received, Update, XdsStatus};
use crate::listener::manager::ListenerManager;
use crate::secret::{SecretRegistry, SecretSource};
use crate::stats::Store;
use crate::upstream::ClusterManager;

/// How often a stream looks at its subscription besides being woken: a listener that goes away releases its secrets
/// without telling anyone.
const RESUBSCRIBE_INTERVAL: Duration = Duration::from_secs(1);

/// Who an SDS stream updates; shared by every gRPC source.
#[derive(Debug, Clone)]
pub struct SdsContext {
    pub node: Node,
    pub listeners: Arc<Mutex<ListenerManager>>,
    pub clusters: Arc<Mutex<ClusterManager>>,
    pub secrets: SecretRegistry,
    pub stats: Store,
    pub status: XdsStatus,
    pub stop: CancellationToken,
}

impl SdsContext {
    /// Runs until `stop`: starts one SDS stream per gRPC source cluster as TLS contexts come to refer to them.
    pub async fn run(self) {
        let mut started = BTreeSet::new();
        loop {
            for cluster in self.secrets.grpc_sources() {
                if started.insert(cluster.clone()) {
                    let span = info_span!("sds", cluster = %cluster);
                    tokio::spawn(SdsStream { ctx: self.clone(), cluster }.run().instrument(span));
                }
            }
            tokio::select! {
                _ = self.secrets.changed() => {}
                _ = tokio::time::sleep(RESUBSCRIBE_INTERVAL) => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }
}

struct SdsStream {
    ctx: SdsContext,
    cluster: String,
}

impl SdsStream {
    fn source(&self) -> SecretSource {
        SecretSource::Grpc(self.cluster.clone())
    }

    /// The names to ask this source for now; CSDS shows every source's names.
    fn subscription(&self) -> BTreeSet<String> {
        let names = self.ctx.secrets.subscription(&self.source());
        self.ctx.status.set_subscription(SECRET, &self.ctx.secrets.dynamic_names());
        names
    }

    async fn run(self) {
        let mut state = SotwState::new(self.ctx.node.clone());
        let mut attempt = 0u32;
        loop {
            let result = tokio::select! {
                r = self.stream(&mut state, &mut attempt) => r,
                _ = self.ctx.stop.cancelled() => return,
            };
            let delay = backoff(attempt);
            attempt = attempt.saturating_add(1);
            match result {
                Ok(()) | Err(StreamError::Closed) => info!("SDS stream closed; reconnecting in {delay:?}"),
                Err(e) => warn!("SDS stream: {e}; reconnecting in {delay:?}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.ctx.stop.cancelled() => return,
            }
        }
    }

    async fn stream(&self, state: &mut SotwState, attempt: &mut u32) -> Result<(), StreamError> {
        // Nothing asked for (yet, or any more): no stream, as an empty first request would be a wildcard.
        let mut names = self.subscription();
        while names.is_empty() {
            tokio::select! {
                _ = self.ctx.secrets.changed() => {}
                _ = tokio::time::sleep(RESUBSCRIBE_INTERVAL) => {}
            }
            names = self.subscription();
        }
        let channel = channel(&self.ctx.clusters, &self.cluster, *attempt).await?;
        let mut client = SecretDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
        let _ = state.subscribe_named(SECRET, names);
        for req in state.restart() {
            let _ = tx.send(req);
        }
        let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let mut responses = client.stream_secrets(requests).await?.into_inner();
        info!("SDS stream up");
        loop {
            tokio::select! {
                msg = responses.message() => {
                    let Some(resp) = msg? else { return Err(StreamError::Closed) };
                    *attempt = 0;
                    state.received(&resp);
                    let reply = self.apply(state, &resp);
                    let _ = tx.send(reply);
                }
                _ = self.ctx.secrets.changed() => {}
                _ = tokio::time::sleep(RESUBSCRIBE_INTERVAL) => {}
            }
            if let Some(req) = state.subscribe_named(SECRET, self.subscription()) {
                let _ = tx.send(req);
            }
        }
    }

    /// Applies one response; returns its ACK, or its NACK naming each rejected secret.
    fn apply(&self, state: &mut SotwState, resp: &DiscoveryResponse) -> DiscoveryRequest {
        let errors = if resp.type_url == SECRET {
            let resources = resp.resources.iter().map(|any| (None, any));
            install_secrets(
                &self.ctx.listeners,
                &self.ctx.clusters,
                &self.ctx.stats,
                &self.source(),
                resources,
                &resp.version_info,
            )
        } else {
            vec![format!("type {} is not supported on an SDS stream", resp.type_url)]
        };
        let redacted: Vec<Any> = resp.resources.iter().map(redacted_secret).collect();
        self.ctx.status.record(
            &Update {
                type_url: SECRET,
                version: &resp.version_info,
                resources: redacted.iter().map(|any| Received { name: None, any, version: None }).collect(),
                removed: &[],
                errors: &errors,
            },
            |_, any| Some(Held::Any(any.clone())),
            |_| true,
        );
        if errors.is_empty() {
            info!(version = %resp.version_info, resources = resp.resources.len(), "SDS ACK");
            state.ack(resp)
        } else {
            let message = errors.join("\n");
            warn!(version = %resp.version_info, "SDS NACK: {}", message.replace('\n', "; "));
            state.nack(resp, message)
        }
    }
}
