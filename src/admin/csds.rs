//! gRPC on the admin port: CSDS (`envoy.service.status.v3.ClientStatusDiscoveryService`, the proxy's own view of
//! every xDS resource it holds, as gRPC's xDS clients serve it per proposal A40), server reflection (v1 and v1alpha,
//! from the embedded Envoy descriptors, so grpcurl can decode every Any) and health.

use std::pin::Pin;

use envoy_types::pb::envoy::service::status::v3::client_config::GenericXdsConfig;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::{
    ClientStatusDiscoveryService, ClientStatusDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::status::v3::{ClientConfig, ClientStatusRequest, ClientStatusResponse};
use tokio_stream::{Stream, StreamExt};

use super::Context;
use super::json::{pack, timestamp};
use crate::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};

/// The gRPC services `grpcurl list` shows.
pub const SERVICES: &[&str] = &[
    "envoy.service.status.v3.ClientStatusDiscoveryService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Why the gRPC side could not be built (only a broken descriptor set, a build-time invariant, can cause it).
#[derive(Debug, thiserror::Error)]
#[error("internal: building gRPC reflection from the descriptor sets: {0}")]
pub struct GrpcError(#[from] tonic_reflection::server::Error);

fn reflection() -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::config::proto::descriptor_set_bytes())
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .include_reflection_service(false);
    for service in SERVICES {
        builder = builder.with_service_name(*service);
    }
    builder
}

/// Every gRPC service of the admin port, routed by path.
pub fn routes(ctx: Context) -> Result<tonic::service::Routes, GrpcError> {
    // The reporter is dropped: every service is SERVING from the start, the default for "" and named services alike.
    let (reporter, health) = tonic_health::server::health_reporter();
    drop(reporter);
    Ok(tonic::service::Routes::new(ClientStatusDiscoveryServiceServer::new(Csds { ctx }))
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(health)
        .prepare())
}

struct Csds {
    ctx: Context,
}

/// The proxy's view as one `ClientConfig`: LDS, RDS, CDS, EDS and SDS resources, bootstrap ones flagged static.
pub fn client_config(ctx: &Context, exclude_resource_contents: bool) -> ClientConfig {
    let mut configs = Vec::new();
    let content = |any: envoy_types::pb::google::protobuf::Any| (!exclude_resource_contents).then_some(any);
    for l in &ctx.bootstrap.listeners {
        configs.push(GenericXdsConfig {
            type_url: LISTENER.to_string(),
            name: l.name.clone(),
            xds_config: content(pack(&*l.proto)),
            last_updated: Some(timestamp(ctx.lifecycle.started())),
            is_static_resource: true,
            ..Default::default()
        });
    }
    for type_url in [LISTENER, ROUTE] {
        push_dynamic(ctx, type_url, exclude_resource_contents, &mut configs);
    }
    for c in &ctx.bootstrap.clusters {
        configs.push(GenericXdsConfig {
            type_url: CLUSTER.to_string(),
            name: c.name.clone(),
            xds_config: content(pack(&*c.proto)),
            last_updated: Some(timestamp(ctx.lifecycle.started())),
            is_static_resource: true,
            ..Default::default()
        });
    }
    for type_url in [CLUSTER, ENDPOINT] {
        push_dynamic(ctx, type_url, exclude_resource_contents, &mut configs);
    }
    let secrets = ctx.listener_manager().secrets().all();
    for slot in secrets.iter().filter(|s| s.source == crate::secret::SecretSource::Static) {
        configs.push(GenericXdsConfig {
            type_url: SECRET.to_string(),
            name: slot.name.clone(),
            xds_config: slot.current().and_then(|s| content(pack(&s.redacted))),
            last_updated: Some(timestamp(ctx.lifecycle.started())),
            is_static_resource: true,
            ..Default::default()
        });
    }
    // Recorded redacted by the ADS client: CSDS never carries a private key.
    push_dynamic(ctx, SECRET, exclude_resource_contents, &mut configs);
    ClientConfig { node: Some(ctx.bootstrap.node.clone()), generic_xds_configs: configs, ..Default::default() }
}

fn push_dynamic(ctx: &Context, type_url: &str, exclude: bool, out: &mut Vec<GenericXdsConfig>) {
    for (name, st) in ctx.status.resources(type_url) {
        out.push(GenericXdsConfig {
            type_url: type_url.to_string(),
            name,
            version_info: st.version.clone(),
            xds_config: if exclude { None } else { st.resource.as_ref().map(|h| h.to_any()) },
            last_updated: st.last_updated.map(timestamp),
            client_status: st.status as i32,
            error_state: st.error.as_ref().map(|f| envoy_types::pb::envoy::admin::v3::UpdateFailureState {
                failed_configuration: if exclude { None } else { f.failed.clone() },
                last_update_attempt: Some(timestamp(f.at)),
                details: f.details.clone(),
                version_info: f.version.clone(),
            }),
            ..Default::default()
        });
    }
}

fn response(ctx: &Context, req: &ClientStatusRequest) -> ClientStatusResponse {
    // node_matchers select among the clients a management server knows; a client answers for itself only.
    ClientStatusResponse { config: vec![client_config(ctx, req.exclude_resource_contents)] }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<ClientStatusResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ClientStatusDiscoveryService for Csds {
    type StreamClientStatusStream = StatusStream;

    async fn stream_client_status(
        &self,
        request: tonic::Request<tonic::Streaming<ClientStatusRequest>>,
    ) -> Result<tonic::Response<Self::StreamClientStatusStream>, tonic::Status> {
        let ctx = self.ctx.clone();
        let requests = request.into_inner();
        let out = requests.map(move |req| req.map(|r| response(&ctx, &r)));
        Ok(tonic::Response::new(Box::pin(out)))
    }

    async fn fetch_client_status(
        &self,
        request: tonic::Request<ClientStatusRequest>,
    ) -> Result<tonic::Response<ClientStatusResponse>, tonic::Status> {
        Ok(tonic::Response::new(response(&self.ctx, request.get_ref())))
    }
}
