//! gRPC server reflection and health, as grpcurl uses them.

use tokio_stream::StreamExt;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

use crate::common::*;

async fn channel(mock: &xds_mock::MockHandle) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(mock.uri()).unwrap().connect().await.unwrap()
}

async fn ask(mock: &xds_mock::MockHandle, request: MessageRequest) -> ServerReflectionResponse {
    let mut client = ServerReflectionClient::new(channel(mock).await);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut responses = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    responses.next().await.unwrap().unwrap()
}

#[tokio::test]
async fn lists_the_served_services() {
    let mock = start().await;
    let response = ask(&mock, MessageRequest::ListServices(String::new())).await;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!("{response:?}") };
    let mut services: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    services.sort();
    assert_eq!(
        services,
        [
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            "envoy.service.secret.v3.SecretDiscoveryService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "xds_mock.v1.Management",
        ]
    );
}

#[tokio::test]
async fn describes_ads_and_management_and_their_messages() {
    let mock = start().await;
    for symbol in [
        "xds_mock.v1.Management",
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        "envoy.config.listener.v3.Listener",
        "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    ] {
        let response = ask(&mock, MessageRequest::FileContainingSymbol(symbol.into())).await;
        let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
            panic!("{symbol}: {response:?}")
        };
        assert!(!files.file_descriptor_proto.is_empty(), "{symbol}");
    }
}

#[tokio::test]
async fn health_says_serving() {
    let mock = start().await;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel(&mock).await);
    let response = client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(response.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}
