//! State-of-the-world ADS: full sets, pushes, ACK/NACK bookkeeping, named subscriptions, several clients.

use xds_mock::WaitError;
use xds_mock::types::{ENDPOINT, LISTENER};

use crate::common::*;

#[tokio::test]
async fn initial_request_gets_the_full_set() {
    let mock = start().await;
    let version = mock.set(LISTENER, vec![listener("a", 1001), listener("b", 1002)]).unwrap();
    let mut client = SotwClient::connect(&mock, "node-1").await;
    client.subscribe(LISTENER, &[]).await;
    let response = client.recv().await;
    assert_eq!(response.version_info, version);
    assert_eq!(response.type_url, LISTENER);
    assert!(!response.nonce.is_empty());
    assert_eq!(names(&response), ["a", "b"]);
}

#[tokio::test]
async fn update_pushes_a_new_version_with_the_full_set() {
    let mock = start().await;
    mock.set(LISTENER, vec![listener("a", 1001), listener("b", 1002)]).unwrap();
    let mut client = SotwClient::connect(&mock, "node-1").await;
    client.subscribe(LISTENER, &[]).await;
    let first = client.recv().await;
    client.ack(&first, &[]).await;
    mock.wait_for("node-1", LISTENER, &first.version_info, TIMEOUT).await.unwrap();

    let version = mock.upsert(LISTENER, listener("c", 1003)).unwrap();
    let second = client.recv().await;
    assert_eq!(second.version_info, version);
    assert_ne!(second.version_info, first.version_info);
    assert_ne!(second.nonce, first.nonce);
    assert_eq!(names(&second), ["a", "b", "c"], "every SotW response carries the whole set");

    let version = mock.remove(LISTENER, "a").unwrap();
    let third = client.recv().await;
    assert_eq!((third.version_info.as_str(), names(&third)), (version.as_str(), vec!["b".into(), "c".into()]));
}

#[tokio::test]
async fn ack_is_recorded_and_not_answered() {
    let mock = start().await;
    let version = mock.set(LISTENER, vec![listener("a", 1001)]).unwrap();
    let mut client = SotwClient::connect(&mock, "node-ack").await;
    client.subscribe(LISTENER, &[]).await;
    let response = client.recv().await;
    client.ack(&response, &[]).await;
    let ack = mock.wait_for("node-ack", LISTENER, &version, TIMEOUT).await.unwrap();
    assert_eq!((ack.version, ack.nonce), (version.clone(), response.nonce.clone()));
    client.expect_quiet().await;

    let status = mock.clients().into_iter().find(|c| c.node_id == "node-ack").unwrap();
    assert_eq!(status.active_streams, 1);
    assert_eq!(status.node.cluster, "test-cluster");
    let listeners = &status.types[LISTENER];
    assert_eq!(listeners.last_acked_version.as_deref(), Some(version.as_str()));
    assert_eq!(listeners.last_sent_version.as_deref(), Some(version.as_str()));
    assert!(listeners.last_nack.is_none());
}

#[tokio::test]
async fn nack_is_recorded_with_its_message_and_not_resent() {
    let mock = start().await;
    let good = mock.set(LISTENER, vec![listener("a", 1001)]).unwrap();
    let mut client = SotwClient::connect(&mock, "node-nack").await;
    client.subscribe(LISTENER, &[]).await;
    let first = client.recv().await;
    client.ack(&first, &[]).await;

    let bad = mock.set(LISTENER, vec![listener("a", 1001), listener("b", 1001)]).unwrap();
    let second = client.recv().await;
    assert_eq!(second.version_info, bad);
    client.nack(&second, &good, "b: duplicate address 127.0.0.1:1001").await;
    let err = mock.wait_for("node-nack", LISTENER, &bad, TIMEOUT).await.unwrap_err();
    let WaitError::Nack(nack) = err else { panic!("expected a NACK, got {err}") };
    assert_eq!(
        (nack.message.as_str(), nack.code, nack.nonce.as_str()),
        ("b: duplicate address 127.0.0.1:1001", 3, second.nonce.as_str())
    );
    client.expect_quiet().await;

    let status = mock.clients().into_iter().find(|c| c.node_id == "node-nack").unwrap();
    let listeners = &status.types[LISTENER];
    assert_eq!(listeners.last_acked_version.as_deref(), Some(good.as_str()));
    assert_eq!(listeners.last_nack.as_ref().unwrap().version, bad);

    // A later good version is sent and ACKed.
    let fixed = mock.set(LISTENER, vec![listener("a", 1001), listener("b", 1002)]).unwrap();
    let third = client.recv().await;
    client.ack(&third, &[]).await;
    assert_eq!(mock.wait_for("node-nack", LISTENER, &fixed, TIMEOUT).await.unwrap().version, fixed);
}

#[tokio::test]
async fn eds_is_subscribed_by_name() {
    let mock = start().await;
    mock.set(ENDPOINT, vec![endpoints("a"), endpoints("b"), endpoints("c")]).unwrap();
    let mut client = SotwClient::connect(&mock, "node-eds").await;
    client.subscribe(ENDPOINT, &["a", "c", "missing"]).await;
    let first = client.recv().await;
    assert_eq!(names(&first), ["a", "c"]);

    // An ACK with the same names is only an ACK.
    client.ack(&first, &["a", "c", "missing"]).await;
    client.expect_quiet().await;

    // A changed subscription is answered at the same version with the new names.
    client.ack(&first, &["b"]).await;
    let second = client.recv().await;
    assert_eq!((second.version_info.as_str(), names(&second)), (first.version_info.as_str(), vec!["b".into()]));
    client.ack(&second, &["b"]).await;

    // A push of a named type still sends only the subscribed names.
    mock.upsert(ENDPOINT, endpoints("d")).unwrap();
    let third = client.recv().await;
    assert_eq!(names(&third), ["b"]);
}

#[tokio::test]
async fn two_clients_at_once() {
    let mock = start().await;
    let v1 = mock.set(LISTENER, vec![listener("a", 1001)]).unwrap();
    let mut one = SotwClient::connect(&mock, "node-one").await;
    let mut two = SotwClient::connect(&mock, "node-two").await;
    one.subscribe(LISTENER, &[]).await;
    two.subscribe(LISTENER, &[]).await;
    let (r1, r2) = (one.recv().await, two.recv().await);
    assert_eq!((names(&r1), names(&r2)), (vec!["a".to_owned()], vec!["a".to_owned()]));
    assert_ne!(r1.nonce, r2.nonce);
    one.ack(&r1, &[]).await;
    two.ack(&r2, &[]).await;
    mock.wait_for("node-one", LISTENER, &v1, TIMEOUT).await.unwrap();
    mock.wait_for("node-two", LISTENER, &v1, TIMEOUT).await.unwrap();

    let v2 = mock.upsert(LISTENER, listener("b", 1002)).unwrap();
    let (r1, r2) = (one.recv().await, two.recv().await);
    assert_eq!((r1.version_info.as_str(), r2.version_info.as_str()), (v2.as_str(), v2.as_str()));
    one.ack(&r1, &[]).await;
    two.nack(&r2, &v1, "no").await;
    mock.wait_for("node-one", LISTENER, &v2, TIMEOUT).await.unwrap();
    assert!(mock.wait_for("node-two", LISTENER, &v2, TIMEOUT).await.is_err());
    let ids: Vec<_> = mock.clients().into_iter().map(|c| c.node_id).collect();
    assert_eq!(ids, ["node-one", "node-two"]);
}

#[tokio::test]
async fn stream_close_is_seen_and_wait_times_out() {
    let mock = start().await;
    mock.set(LISTENER, vec![listener("a", 1001)]).unwrap();
    let mut client = SotwClient::connect(&mock, "node-gone").await;
    client.subscribe(LISTENER, &[]).await;
    client.recv().await;
    drop(client);
    let err = mock.wait_for("node-gone", LISTENER, "1", std::time::Duration::from_millis(200)).await.unwrap_err();
    assert!(matches!(err, WaitError::Timeout { .. }));
    for _ in 0..100 {
        if mock.clients()[0].active_streams == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("stream still counted as open");
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_the_port_can_be_reused() {
    let mock = start().await;
    let addr = mock.addr();
    mock.set(LISTENER, vec![listener("a", 1001)]).unwrap();
    let mut client = SotwClient::connect(&mock, "node-restart").await;
    client.subscribe(LISTENER, &[]).await;
    client.recv().await;
    // The client keeps its side of the stream open: shutdown must not wait for it.
    tokio::time::timeout(TIMEOUT, mock.shutdown()).await.expect("shutdown in time").unwrap();
    assert!(client.next().await.is_none(), "the stream ends with the server");

    let again = xds_mock::MockServer::start(addr).await.expect("same port again");
    let version = again.set(LISTENER, vec![listener("a", 1001)]).unwrap();
    let mut client = SotwClient::connect(&again, "node-restart").await;
    client.subscribe(LISTENER, &[]).await;
    assert_eq!(client.recv().await.version_info, version);
}
