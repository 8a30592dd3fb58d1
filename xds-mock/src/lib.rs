//! xds-mock: a real xDS control plane for driving xds-proxy (or Envoy) in development and tests.
//!
//! # Layout and data flow
//! - [`store`]: the snapshot store. Resources are `google.protobuf.Any`s keyed by type URL and name, with a version
//!   per type (a counter, sent as `version_info`) and per resource (a content hash, for delta). Every change
//!   publishes a new immutable [`store::Snapshot`] on a `tokio::sync::watch` channel.
//! - [`ads`]: the Aggregated Discovery Service, SotW and delta. One task per stream holds the subscription state of
//!   each type (pure logic in [`ads::sotw`] and [`ads::delta`]) and answers on a request or a new snapshot.
//! - [`clients`]: per node id and type, what was sent, ACKed and NACKed; awaited by [`MockHandle::wait_for`].
//! - [`source`]: a resource file or an Envoy config dump (YAML/JSON) to resources, and the `--watch` poller.
//! - [`management`]: the `xds_mock.v1.Management` gRPC API (`proto/xds_mock/v1/management.proto`).
//! - [`server`]: one tonic server with ADS, management, reflection (v1 and v1alpha) and health on one port, and
//!   the test handle [`MockServer`] / [`MockHandle`].
//!
//! # Runtime
//! Everything runs on the caller's tokio runtime (the binary uses the default multi-threaded one): one task for
//! the server, one per ADS stream, one for the file poller. No lock is held across an `.await`: streams read
//! snapshots by `Arc`, the client registry is a short-held mutex.
//!
//! # Resource file
//! A YAML or JSON (by extension) mapping with any of these keys, each a list:
//! `resources` (`@type`d Anys of any type), `listeners`, `clusters`, `endpoints` (ClusterLoadAssignments),
//! `routes` (RouteConfigurations), `secrets` (tls Secrets); the typed lists take plain messages (an `@type` is
//! allowed and must match). A mapping with a top-level `configs` key is read as an `envoy.admin.v3.ConfigDump`
//! and its dynamic active listeners, dynamic active clusters, dynamic route configs, dynamic endpoint configs
//! and dynamic active secrets are served, byte for byte as the dump's Anys encode them.

pub mod ads;
pub mod clients;
pub mod management;
pub mod resource;
pub mod server;
pub mod source;
pub mod store;
pub mod types;

pub use clients::{Ack, ClientStatus, Clients, Nack, Protocol, TypeStatus, WaitError};
pub use server::{MockHandle, MockServer, ServeError, serve};
pub use store::{Resource, Snapshot, Store, StoreError, TypeSnapshot};

/// Generated code of the management API (`proto/xds_mock/v1/management.proto`).
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
    tonic::include_proto!("xds_mock.v1");

    /// The encoded `FileDescriptorSet` of the management API (and its imports), for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xds_mock_descriptor.bin"));
}
