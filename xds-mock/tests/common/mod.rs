//! Helpers shared by the integration cases: resources, an ADS client per protocol, and the mock on a free port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Address, Node, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use xds_mock::types::{CLUSTER, ENDPOINT, LISTENER};
use xds_mock::{MockHandle, MockServer};

/// Long enough for a loaded CI machine; tests wait on events, never for the full time unless failing.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// How long "nothing more is sent" is watched for.
pub const QUIET: Duration = Duration::from_millis(300);

pub async fn start() -> MockHandle {
    MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("mock starts")
}

pub fn listener(name: &str, port: u32) -> Any {
    let listener = Listener {
        name: name.into(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    Any { type_url: LISTENER.into(), value: listener.encode_to_vec() }
}

pub fn cluster(name: &str) -> Any {
    let cluster = Cluster { name: name.into(), ..Default::default() };
    Any { type_url: CLUSTER.into(), value: cluster.encode_to_vec() }
}

pub fn endpoints(name: &str) -> Any {
    let cla = ClusterLoadAssignment { cluster_name: name.into(), ..Default::default() };
    Any { type_url: ENDPOINT.into(), value: cla.encode_to_vec() }
}

/// The names in a SotW response, decoded by type.
pub fn names(response: &DiscoveryResponse) -> Vec<String> {
    let mut names: Vec<String> = response
        .resources
        .iter()
        .map(|any| match any.type_url.as_str() {
            LISTENER => Listener::decode(any.value.as_slice()).unwrap().name,
            CLUSTER => Cluster::decode(any.value.as_slice()).unwrap().name,
            ENDPOINT => ClusterLoadAssignment::decode(any.value.as_slice()).unwrap().cluster_name,
            other => panic!("unexpected type {other}"),
        })
        .collect();
    names.sort();
    names
}

pub fn node(id: &str) -> Node {
    Node { id: id.into(), cluster: "test-cluster".into(), ..Default::default() }
}

/// A SotW ADS stream driven by hand.
pub struct SotwClient {
    pub node_id: String,
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    first: bool,
}

impl SotwClient {
    pub async fn connect(mock: &MockHandle, node_id: &str) -> SotwClient {
        let mut client = AggregatedDiscoveryServiceClient::connect(mock.uri()).await.expect("connect");
        let (tx, requests) = mpsc::channel(16);
        let rx = client.stream_aggregated_resources(ReceiverStream::new(requests)).await.expect("stream").into_inner();
        SotwClient { node_id: node_id.into(), tx, rx, first: true }
    }

    /// Sends a request; the first one of the stream carries the node, as the protocol wants.
    pub async fn send(&mut self, mut request: DiscoveryRequest) {
        if self.first {
            request.node = Some(node(&self.node_id));
            self.first = false;
        }
        self.tx.send(request).await.expect("send");
    }

    pub async fn subscribe(&mut self, type_url: &str, names: &[&str]) {
        let request = DiscoveryRequest {
            type_url: type_url.into(),
            resource_names: names.iter().map(|n| (*n).into()).collect(),
            ..Default::default()
        };
        self.send(request).await;
    }

    pub async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(TIMEOUT, self.rx.message())
            .await
            .expect("a response in time")
            .expect("stream ok")
            .expect("stream open")
    }

    /// The next response, or `None` when the server ended the stream (an error status counts as ended).
    pub async fn next(&mut self) -> Option<DiscoveryResponse> {
        tokio::time::timeout(TIMEOUT, self.rx.message()).await.expect("an answer in time").ok().flatten()
    }

    /// Asserts nothing arrives for [`QUIET`].
    pub async fn expect_quiet(&mut self) {
        if let Ok(message) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!("expected no response, got {message:?}");
        }
    }

    pub async fn ack(&mut self, response: &DiscoveryResponse, names: &[&str]) {
        let request = DiscoveryRequest {
            version_info: response.version_info.clone(),
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            resource_names: names.iter().map(|n| (*n).into()).collect(),
            ..Default::default()
        };
        self.send(request).await;
    }

    pub async fn nack(&mut self, response: &DiscoveryResponse, previous_version: &str, message: &str) {
        let request = DiscoveryRequest {
            version_info: previous_version.into(),
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(Status { code: 3, message: message.into(), details: vec![] }),
            ..Default::default()
        };
        self.send(request).await;
    }
}

/// A delta ADS stream driven by hand.
pub struct DeltaClient {
    pub node_id: String,
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    first: bool,
}

impl DeltaClient {
    pub async fn connect(mock: &MockHandle, node_id: &str) -> DeltaClient {
        let mut client = AggregatedDiscoveryServiceClient::connect(mock.uri()).await.expect("connect");
        let (tx, requests) = mpsc::channel(16);
        let rx = client.delta_aggregated_resources(ReceiverStream::new(requests)).await.expect("stream").into_inner();
        DeltaClient { node_id: node_id.into(), tx, rx, first: true }
    }

    pub async fn send(&mut self, mut request: DeltaDiscoveryRequest) {
        if self.first {
            request.node = Some(node(&self.node_id));
            self.first = false;
        }
        self.tx.send(request).await.expect("send");
    }

    pub async fn subscribe(&mut self, type_url: &str, subscribe: &[&str], unsubscribe: &[&str]) {
        let request = DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: subscribe.iter().map(|n| (*n).into()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|n| (*n).into()).collect(),
            ..Default::default()
        };
        self.send(request).await;
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(TIMEOUT, self.rx.message())
            .await
            .expect("a response in time")
            .expect("stream ok")
            .expect("stream open")
    }

    pub async fn expect_quiet(&mut self) {
        if let Ok(message) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!("expected no response, got {message:?}");
        }
    }

    pub async fn ack(&mut self, response: &DeltaDiscoveryResponse) {
        let request = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        self.send(request).await;
    }

    pub async fn nack(&mut self, response: &DeltaDiscoveryResponse, message: &str) {
        let request = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(Status { code: 3, message: message.into(), details: vec![] }),
            ..Default::default()
        };
        self.send(request).await;
    }
}

/// Sorted names of a delta response's resources.
pub fn delta_names(response: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut names: Vec<String> = response.resources.iter().map(|r| r.name.clone()).collect();
    names.sort();
    names
}

/// The Istio sidecar config dump shared by the project (CI lays shared/ beside the clone).
pub fn istio_fixture() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        manifest.join("../../shared/fixtures/istio-1.14-sidecar-config-dump.yaml"),
        manifest.join("../tests/fixtures/istio-1.14-sidecar-config-dump.yaml"),
    ];
    candidates.iter().find(|path| path.exists()).cloned().unwrap_or_else(|| panic!("fixture not in {candidates:?}"))
}
