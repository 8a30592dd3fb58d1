//! xDS: the ADS client that keeps the proxy's listeners, clusters and endpoints in step with a control plane.
//!
//! [`state`] (state of the world) and [`delta`] (incremental) are the protocol bookkeeping as plain data
//! (versions, nonces, subscriptions, ACK/NACK requests);
//! [`client`] owns the gRPC stream, reconnects with backoff, and hands resources to the managers, which say per
//! resource what they accepted; [`sds`] runs SDS streams of their own for secrets served apart from ADS (Istio's
//! `sds-grpc`); [`status`] remembers, per resource, what was accepted, when, and what was refused.

pub mod client;
pub mod delta;
pub mod sds;
pub mod state;
pub mod status;

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Which ADS flavour the bootstrap asks for (`ads_config.api_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// GRPC: StreamAggregatedResources, every response the full set of its type.
    StateOfTheWorld,
    /// DELTA_GRPC: DeltaAggregatedResources, per-resource versions and removals.
    Delta,
}
