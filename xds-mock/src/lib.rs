//! xds-mock: a real xDS control plane (ADS over gRPC, SotW and delta) that serves Envoy-format resources and can be
//! changed at runtime.

/// Generated code of the management API (`proto/xds_mock/v1/management.proto`).
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
    tonic::include_proto!("xds_mock.v1");

    /// The encoded `FileDescriptorSet` of the management API (and its imports), for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xds_mock_descriptor.bin"));
}
