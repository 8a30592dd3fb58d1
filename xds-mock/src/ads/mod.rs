//! The Aggregated Discovery Service, and SDS on streams of its own: one task per stream, SotW ([`sotw`]) or delta
//! ([`delta`]).
//!
//! A stream task owns the subscription state of every type its client asked for and wakes on two things: a
//! request from the client, or a new store snapshot. After either it asks each type's state whether a response is
//! due and sends it. ACKs and NACKs go to the [`Clients`] registry. The task ends when the client hangs up, the
//! response channel closes, or the server shuts down (so graceful shutdown is not held up by endless streams).

pub mod delta;
pub mod sotw;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::clients::{Clients, Nack, Protocol, StreamGuard};
use crate::store::Store;

/// Responses queued per stream before the task waits for the client to read.
const RESPONSE_QUEUE: usize = 16;

/// Nonces are unique across all streams of the process, so a nonce from another stream is always stale.
static NEXT_NONCE: AtomicU64 = AtomicU64::new(1);

fn next_nonce() -> String {
    NEXT_NONCE.fetch_add(1, Ordering::Relaxed).to_string()
}

/// The ADS service over a store and a client registry.
#[derive(Debug, Clone)]
pub struct AdsService {
    store: Store,
    clients: Clients,
    shutdown: CancellationToken,
}

impl AdsService {
    pub fn new(store: Store, clients: Clients, shutdown: CancellationToken) -> Self {
        AdsService { store, clients, shutdown }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let stream = StreamTask::new(self.clone(), tx, Protocol::Sotw);
        let span = info_span!("ads", protocol = "sotw", peer = ?peer);
        tokio::spawn(stream.run_sotw(request.into_inner()).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let stream = StreamTask::new(self.clone(), tx, Protocol::Delta);
        let span = info_span!("ads", protocol = "delta", peer = ?peer);
        tokio::spawn(stream.run_delta(request.into_inner()).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// SDS on a stream of its own (`SecretDiscoveryService`, as Istio's pilot-agent serves it on a Unix socket): the same
/// streams as ADS, carrying only secrets because that is all its clients ask for.
#[tonic::async_trait]
impl SecretDiscoveryService for AdsService {
    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let stream = StreamTask::new(self.clone(), tx, Protocol::Sotw);
        tokio::spawn(stream.run_sotw(request.into_inner()).instrument(info_span!("sds", protocol = "sotw")));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let stream = StreamTask::new(self.clone(), tx, Protocol::Delta);
        tokio::spawn(stream.run_delta(request.into_inner()).instrument(info_span!("sds", protocol = "delta")));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(&self, _request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("FetchSecrets (REST-style polling) is not served; use StreamSecrets"))
    }
}

/// What woke a stream task.
enum Wake<T> {
    Request(T),
    Snapshot,
    Done,
}

struct StreamTask<R> {
    service: AdsService,
    tx: mpsc::Sender<Result<R, Status>>,
    protocol: Protocol,
    /// The node from the first request that carried one; later requests may omit it.
    node_id: Option<String>,
    /// Counts the stream as open in the registry until the task ends.
    _guard: Option<StreamGuard>,
}

impl<R> StreamTask<R> {
    fn new(service: AdsService, tx: mpsc::Sender<Result<R, Status>>, protocol: Protocol) -> Self {
        StreamTask { service, tx, protocol, node_id: None, _guard: None }
    }

    /// Registers the stream under the node of its first request (or of the first request carrying a node).
    fn remember_node(&mut self, node: Option<&Node>) {
        if self.node_id.is_some() {
            return;
        }
        let node = node.cloned().unwrap_or_default();
        info!(node = %node.id, protocol = self.protocol.as_str(), "ADS stream opened");
        self._guard = Some(self.service.clients.stream_opened(&node));
        self.node_id = Some(node.id);
    }

    fn node_id(&self) -> &str {
        self.node_id.as_deref().unwrap_or_default()
    }

    /// Waits for the next request, snapshot change or end of stream.
    async fn wake<T>(
        &self,
        requests: &mut Streaming<T>,
        snapshots: &mut tokio::sync::watch::Receiver<std::sync::Arc<crate::store::Snapshot>>,
    ) -> Wake<T> {
        tokio::select! {
            request = requests.message() => match request {
                Ok(Some(request)) => Wake::Request(request),
                Ok(None) => Wake::Done,
                Err(status) => {
                    debug!(%status, "ADS stream ended with an error");
                    Wake::Done
                }
            },
            changed = snapshots.changed() => if changed.is_ok() { Wake::Snapshot } else { Wake::Done },
            () = self.tx.closed() => Wake::Done,
            () = self.service.shutdown.cancelled() => Wake::Done,
        }
    }

    fn record_nack(&self, type_url: &str, version: String, nonce: String, message: String, code: i32) {
        warn!(node = %self.node_id(), type_url, version, %message, "NACK");
        self.service.clients.nacked(Nack {
            node_id: self.node_id().to_owned(),
            type_url: type_url.to_owned(),
            version,
            nonce,
            message,
            code,
            at: SystemTime::now(),
        });
    }

    fn record_ack(&self, type_url: &str, version: &str, nonce: &str) {
        debug!(node = %self.node_id(), type_url, version, "ACK");
        self.service.clients.acked(self.node_id(), type_url, version, nonce);
    }
}

impl StreamTask<DiscoveryResponse> {
    async fn run_sotw(mut self, mut requests: Streaming<DiscoveryRequest>) {
        let mut snapshots = self.service.store.subscribe();
        let mut types: BTreeMap<String, sotw::SotwState> = BTreeMap::new();
        loop {
            match self.wake(&mut requests, &mut snapshots).await {
                Wake::Done => break,
                Wake::Snapshot => {}
                Wake::Request(request) => {
                    self.remember_node(request.node.as_ref());
                    if request.type_url.is_empty() {
                        warn!(node = %self.node_id(), "request without type_url ignored");
                        continue;
                    }
                    let state = types.entry(request.type_url.clone()).or_default();
                    match state.on_request(&request) {
                        sotw::RequestKind::Ack { version, nonce } => {
                            if request.version_info != version {
                                warn!(node = %self.node_id(), sent = version, acked = request.version_info,
                                    "ACK names another version than the one sent with its nonce");
                            }
                            self.record_ack(&request.type_url, &version, &nonce);
                        }
                        sotw::RequestKind::Nack { version, nonce, message, code } => {
                            self.record_nack(&request.type_url, version, nonce, message, code);
                        }
                        sotw::RequestKind::Stale => {
                            debug!(
                                nonce = request.response_nonce,
                                type_url = request.type_url,
                                "stale request ignored"
                            );
                        }
                        sotw::RequestKind::Initial | sotw::RequestKind::Update => {}
                    }
                }
            }
            let snapshot = snapshots.borrow_and_update().clone();
            for (type_url, state) in &mut types {
                if let Some(response) = state.response(type_url, snapshot.get(type_url).map(|t| &**t), next_nonce()) {
                    self.service.clients.sent(self.node_id(), type_url, &response.version_info, self.protocol);
                    debug!(type_url, version = response.version_info, resources = response.resources.len(), "sent");
                    if self.tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        }
        info!(node = %self.node_id(), "ADS stream closed");
    }
}

impl StreamTask<DeltaDiscoveryResponse> {
    async fn run_delta(mut self, mut requests: Streaming<DeltaDiscoveryRequest>) {
        let mut snapshots = self.service.store.subscribe();
        let mut types: BTreeMap<String, delta::DeltaState> = BTreeMap::new();
        loop {
            match self.wake(&mut requests, &mut snapshots).await {
                Wake::Done => break,
                Wake::Snapshot => {}
                Wake::Request(request) => {
                    self.remember_node(request.node.as_ref());
                    if request.type_url.is_empty() {
                        warn!(node = %self.node_id(), "request without type_url ignored");
                        continue;
                    }
                    let state = types.entry(request.type_url.clone()).or_default();
                    match state.on_request(&request) {
                        delta::RequestKind::Ack { version, nonce } => {
                            self.record_ack(&request.type_url, &version, &nonce);
                        }
                        delta::RequestKind::Nack { version, nonce, message, code } => {
                            self.record_nack(&request.type_url, version, nonce, message, code);
                        }
                        delta::RequestKind::Stale => {
                            debug!(nonce = request.response_nonce, type_url = request.type_url, "stale nonce ignored");
                        }
                        delta::RequestKind::Initial | delta::RequestKind::Update => {}
                    }
                }
            }
            let snapshot = snapshots.borrow_and_update().clone();
            for (type_url, state) in &mut types {
                if let Some(response) = state.response(type_url, snapshot.get(type_url).map(|t| &**t), next_nonce()) {
                    self.service.clients.sent(self.node_id(), type_url, &response.system_version_info, self.protocol);
                    debug!(
                        type_url,
                        version = response.system_version_info,
                        resources = response.resources.len(),
                        removed = response.removed_resources.len(),
                        "sent"
                    );
                    if self.tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        }
        info!(node = %self.node_id(), "ADS stream closed");
    }
}
