//! The management API through a real gRPC client.

use tonic::Code;
use xds_mock::pb::management_client::ManagementClient;
use xds_mock::pb::{ListClientsRequest, ListResourcesRequest, RemoveResourceRequest, SetResourceRequest};
use xds_mock::types::{CLUSTER, LISTENER};

use crate::common::*;

const LISTENER_JSON: &str =
    r#"{"name": "added", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}}}"#;

#[tokio::test]
async fn set_list_and_remove_resources() {
    let mock = start().await;
    let mut api = ManagementClient::connect(mock.uri()).await.unwrap();
    let mut ads = SotwClient::connect(&mock, "mgmt-node").await;
    mock.set(LISTENER, vec![]).unwrap();
    ads.subscribe(LISTENER, &[]).await;
    let empty = ads.recv().await;
    assert!(empty.resources.is_empty());
    ads.ack(&empty, &[]).await;

    let set = api
        .set_resource(SetResourceRequest { r#type: "listener".into(), resource_json: LISTENER_JSON.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((set.type_url.as_str(), set.name.as_str(), set.version.as_str()), (LISTENER, "added", "2"));
    let pushed = ads.recv().await;
    assert_eq!((pushed.version_info.as_str(), names(&pushed)), ("2", vec!["added".to_owned()]));

    // "@type" works without a type, camelCase too; a type that disagrees is refused.
    let cluster =
        r#"{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "c", "connectTimeout": "2s"}"#;
    let set =
        api.set_resource(SetResourceRequest { r#type: String::new(), resource_json: cluster.into() }).await.unwrap();
    assert_eq!(set.into_inner().type_url, CLUSTER);
    let wrong = api.set_resource(SetResourceRequest { r#type: "listener".into(), resource_json: cluster.into() }).await;
    assert_eq!(wrong.unwrap_err().code(), Code::InvalidArgument);
    let typo = r#"{"name": "x", "adress": {}}"#;
    let err =
        api.set_resource(SetResourceRequest { r#type: "lds".into(), resource_json: typo.into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("adress"), "{}", err.message());

    let listed = api.list_resources(ListResourcesRequest { r#type: "listener".into(), include_json: true }).await;
    let listed = listed.unwrap().into_inner();
    assert_eq!(listed.types.len(), 1);
    assert_eq!(listed.types[0].version, "2");
    assert_eq!(listed.types[0].resources[0].name, "added");
    let json: serde_json::Value = serde_json::from_str(&listed.types[0].resources[0].json).unwrap();
    assert_eq!(json["address"]["socket_address"]["port_value"], 10000);
    let all = api.list_resources(ListResourcesRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.types.iter().map(|t| t.type_url.as_str()).collect::<Vec<_>>(), [CLUSTER, LISTENER]);

    let removed = api.remove_resource(RemoveResourceRequest { r#type: "listener".into(), name: "added".into() }).await;
    assert_eq!(removed.unwrap().into_inner().version, "3");
    assert!(ads.recv().await.resources.is_empty());
    let again = api.remove_resource(RemoveResourceRequest { r#type: "listener".into(), name: "added".into() }).await;
    assert_eq!(again.unwrap_err().code(), Code::NotFound);
    let unknown = api.remove_resource(RemoveResourceRequest { r#type: "listnr".into(), name: "x".into() }).await;
    assert_eq!(unknown.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn list_clients_shows_acks_and_nacks() {
    let mock = start().await;
    let good = mock.set(LISTENER, vec![listener("a", 1001)]).unwrap();
    let mut ads = SotwClient::connect(&mock, "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local").await;
    ads.subscribe(LISTENER, &[]).await;
    let first = ads.recv().await;
    ads.ack(&first, &[]).await;
    let bad = mock.upsert(LISTENER, listener("b", 1001)).unwrap();
    let second = ads.recv().await;
    ads.nack(&second, &good, "b: address 127.0.0.1:1001 already in use").await;
    assert!(mock.wait_for(&ads.node_id, LISTENER, &bad, TIMEOUT).await.is_err());

    let mut api = ManagementClient::connect(mock.uri()).await.unwrap();
    let clients = api.list_clients(ListClientsRequest {}).await.unwrap().into_inner().clients;
    assert_eq!(clients.len(), 1);
    let client = &clients[0];
    assert_eq!((client.node_id.as_str(), client.node_cluster.as_str()), (ads.node_id.as_str(), "test-cluster"));
    assert_eq!(client.active_streams, 1);
    assert!(client.connected_since.is_some());
    let status = &client.types[0];
    assert_eq!((status.type_url.as_str(), status.protocol.as_str()), (LISTENER, "SOTW"));
    assert_eq!((status.last_sent_version.as_str(), status.last_acked_version.as_str()), (bad.as_str(), good.as_str()));
    let nack = status.last_nack.as_ref().unwrap();
    assert_eq!((nack.version.as_str(), nack.code), (bad.as_str(), 3));
    assert_eq!(nack.message, "b: address 127.0.0.1:1001 already in use");
}

#[tokio::test]
async fn secrets_are_set_by_name_and_served_to_whoever_asks_for_them() {
    let mock = start().await;
    let mut api = ManagementClient::connect(mock.uri()).await.unwrap();
    let mut sds = SotwClient::connect(&mock, "sds-node").await;
    let secret = r#"{"name": "default", "tls_certificate": {"certificate_chain": {"inline_string": "PEM"}}}"#;
    let set = api
        .set_resource(SetResourceRequest { r#type: "secret".into(), resource_json: secret.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((set.type_url.as_str(), set.name.as_str()), (xds_mock::types::SECRET, "default"));
    let rootca = r#"{"name": "ROOTCA", "validation_context": {"trusted_ca": {"inline_string": "CA"}}}"#;
    api.set_resource(SetResourceRequest { r#type: "sds".into(), resource_json: rootca.into() }).await.unwrap();
    sds.subscribe(xds_mock::types::SECRET, &["default"]).await;
    let pushed = sds.recv().await;
    let served: Vec<_> = pushed
        .resources
        .iter()
        .map(|r| xds_mock::types::resource_name(&r.type_url, &r.value).unwrap_or_default())
        .collect();
    assert_eq!(served, ["default"], "a named type serves only the names asked for");
}
