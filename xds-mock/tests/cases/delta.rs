//! Delta ADS: wildcard and named subscriptions, removals, per-resource versions and resync on reconnect.

use std::collections::HashMap;

use xds_mock::WaitError;
use xds_mock::types::{CLUSTER, ENDPOINT};

use crate::common::*;

#[tokio::test]
async fn initial_wildcard_gets_every_resource_with_versions() {
    let mock = start().await;
    let version = mock.set(CLUSTER, vec![cluster("a"), cluster("b")]).unwrap();
    let mut client = DeltaClient::connect(&mock, "delta-1").await;
    client.subscribe(CLUSTER, &[], &[]).await;
    let response = client.recv().await;
    assert_eq!(response.system_version_info, version);
    assert_eq!(delta_names(&response), ["a", "b"]);
    assert!(response.resources.iter().all(|r| r.version.len() == 16 && r.resource.is_some()));
    assert!(response.removed_resources.is_empty());
    client.ack(&response).await;
    let ack = mock.wait_for("delta-1", CLUSTER, &version, TIMEOUT).await.unwrap();
    assert_eq!(ack.nonce, response.nonce);
    client.expect_quiet().await;
}

#[tokio::test]
async fn only_changed_resources_are_pushed_and_removals_are_named() {
    let mock = start().await;
    mock.set(CLUSTER, vec![cluster("a"), cluster("b")]).unwrap();
    let mut client = DeltaClient::connect(&mock, "delta-2").await;
    client.subscribe(CLUSTER, &["*"], &[]).await;
    let first = client.recv().await;
    client.ack(&first).await;

    let version = mock.upsert(CLUSTER, cluster("c")).unwrap();
    let added = client.recv().await;
    assert_eq!((added.system_version_info.as_str(), delta_names(&added)), (version.as_str(), vec!["c".into()]));
    client.ack(&added).await;

    let version = mock.remove(CLUSTER, "a").unwrap();
    let removed = client.recv().await;
    assert_eq!(removed.system_version_info, version);
    assert!(removed.resources.is_empty());
    assert_eq!(removed.removed_resources, ["a"]);
    client.nack(&removed, "cluster a is in use").await;
    let err = mock.wait_for("delta-2", CLUSTER, &version, TIMEOUT).await.unwrap_err();
    assert!(matches!(err, WaitError::Nack(ref nack) if nack.message == "cluster a is in use"), "{err}");
    client.expect_quiet().await;
}

#[tokio::test]
async fn named_subscribe_and_unsubscribe() {
    let mock = start().await;
    mock.set(ENDPOINT, vec![endpoints("a"), endpoints("b"), endpoints("c")]).unwrap();
    let mut client = DeltaClient::connect(&mock, "delta-eds").await;
    client.subscribe(ENDPOINT, &["a"], &[]).await;
    let first = client.recv().await;
    assert_eq!(delta_names(&first), ["a"]);
    client.ack(&first).await;

    client.subscribe(ENDPOINT, &["b", "c"], &["a"]).await;
    let second = client.recv().await;
    assert_eq!(delta_names(&second), ["b", "c"]);
    assert!(second.removed_resources.is_empty(), "an unsubscribed name is not reported as removed");
    client.ack(&second).await;

    // A change to an unsubscribed resource is not sent; removal of a subscribed one is.
    mock.upsert(ENDPOINT, endpoints("a")).unwrap();
    client.expect_quiet().await;
    mock.remove(ENDPOINT, "b").unwrap();
    let third = client.recv().await;
    assert_eq!(third.removed_resources, ["b"]);
}

#[tokio::test]
async fn reconnect_with_initial_versions_resyncs_only_differences() {
    let mock = start().await;
    mock.set(CLUSTER, vec![cluster("a"), cluster("b")]).unwrap();
    let mut client = DeltaClient::connect(&mock, "delta-resync").await;
    client.subscribe(CLUSTER, &[], &[]).await;
    let first = client.recv().await;
    client.ack(&first).await;
    let held: HashMap<String, String> = first.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
    drop(client);

    // Everything the client holds is current: nothing is sent.
    let mut again = DeltaClient::connect(&mock, "delta-resync").await;
    again
        .send(envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            initial_resource_versions: held.clone(),
            ..Default::default()
        })
        .await;
    again.expect_quiet().await;

    // One changed, one gone, one the client never had: exactly those are sent.
    let mut stale = held.clone();
    stale.insert("a".into(), "0000000000000000".into());
    stale.insert("gone".into(), "0000000000000001".into());
    mock.upsert(CLUSTER, cluster("new")).unwrap();
    let mut third = DeltaClient::connect(&mock, "delta-resync").await;
    third
        .send(envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            initial_resource_versions: stale,
            ..Default::default()
        })
        .await;
    let response = third.recv().await;
    assert_eq!(delta_names(&response), ["a", "new"]);
    assert_eq!(response.removed_resources, ["gone"]);
}
