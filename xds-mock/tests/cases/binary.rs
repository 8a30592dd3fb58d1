//! The `xds-mock` command as a process: start-up errors, serving a file (also on a Unix socket), stopping on SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use xds_mock::types::LISTENER;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_xds-mock");

async fn fails_with(args: &[&str], expected: &str) {
    let output = Command::new(BIN).args(args).output().await.unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: one line, got {stderr:?}");
    assert!(stderr.starts_with("xds-mock: ") && stderr.contains(expected), "{args:?}: {stderr}");
}

#[tokio::test]
async fn bad_flags_and_bad_files_exit_1_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "clusters:\n  - name: a\n    connect_timeout: soon\n").unwrap();
    let bad = bad.to_str().unwrap();
    fails_with(&["--bogus"], "--bogus").await;
    fails_with(&["--listen", "nowhere"], "nowhere").await;
    fails_with(&["--watch"], "--config").await;
    fails_with(&["--config", "/nonexistent/x.yaml"], "/nonexistent/x.yaml").await;
    fails_with(&["--config", bad], &format!("{bad}: clusters[0].connect_timeout")).await;
}

#[tokio::test]
async fn serves_a_file_and_stops_on_sigterm() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/resources.yaml");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--config", example, "--watch"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some((_, rest)) = line.split_once("addr=") {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("xds-mock exited before listening");
    })
    .await
    .unwrap();

    let mut client = envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let request = envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
        node: Some(node("bin")),
        type_url: LISTENER.into(),
        ..Default::default()
    };
    let mut responses = client.stream_aggregated_resources(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = responses.message().await.unwrap().unwrap();
    assert_eq!(names(&response), ["tcp_10000"]);

    // The shell's builtin kill: no extra crate for signals, no dependency on procps.
    let kill = format!("kill -TERM {}", child.id().unwrap());
    let status = Command::new("sh").args(["-c", &kill]).status().await.unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exits on SIGTERM").unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn serves_secrets_of_its_file_over_sds_on_a_unix_socket() {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.yaml");
    std::fs::write(&file, "secrets:\n  - name: default\n  - name: ROOTCA\n").unwrap();
    let uds = dir.path().join("agent.sock");
    // A socket file left by an earlier run is replaced, as pilot-agent does.
    drop(std::os::unix::net::UnixListener::bind(&uds).unwrap());
    let _child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--config", file.to_str().unwrap(), "--uds", uds.to_str().unwrap()])
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let path = uds.clone();
    let connector = tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
    });
    let endpoint = tonic::transport::Endpoint::from_static("http://localhost");
    let channel = tokio::time::timeout(TIMEOUT, async {
        loop {
            match endpoint.connect_with_connector(connector.clone()).await {
                Ok(channel) => return channel,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("the Unix socket accepts");
    let request = DiscoveryRequest {
        node: Some(node("sidecar")),
        type_url: xds_mock::types::SECRET.into(),
        resource_names: vec!["default".into()],
        ..Default::default()
    };
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let mut responses = client.stream_secrets(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = tokio::time::timeout(TIMEOUT, responses.message()).await.unwrap().unwrap().unwrap();
    let served: Vec<_> = response
        .resources
        .iter()
        .map(|r| xds_mock::types::resource_name(&r.type_url, &r.value).unwrap_or_default())
        .collect();
    assert_eq!(served, ["default"], "only the secret asked for");
}
