//! File input: the resource-file format, the Istio config dump, and `--watch`.

use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use prost::Message;
use tokio_util::sync::CancellationToken;
use xds_mock::source::{load_file, load_into, watch_file};
use xds_mock::types::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};
use xds_mock::{MockServer, Store};

use crate::common::*;

const RESOURCE_FILE: &str = r#"
listeners:
  - name: http
    address: {socket_address: {address: 127.0.0.1, port_value: 10000}}
    filter_chains:
      - filters:
          - name: envoy.filters.network.tcp_proxy
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
              stat_prefix: tcp
              cluster: backend
clusters:
  - name: backend
    type: EDS
    eds_cluster_config: {eds_config: {ads: {}}}
endpoints:
  - cluster_name: backend
    endpoints:
      - lb_endpoints:
          - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}
routes:
  - name: local_route
    virtual_hosts: [{name: all, domains: ["*"]}]
resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: second
    address: {socket_address: {address: 127.0.0.1, port_value: 10001}}
  - "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
    name: cert
"#;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn resource_file_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "resources.yaml", RESOURCE_FILE);
    let resources = load_file(&path).unwrap();
    let counts: Vec<(&str, usize)> = resources.iter().map(|(t, r)| (t.as_str(), r.len())).collect();
    assert_eq!(counts, [(CLUSTER, 1), (ENDPOINT, 1), (LISTENER, 2), (ROUTE, 1), (SECRET, 1)]);

    let store = Store::new();
    load_into(&path, &store).unwrap();
    let mock = MockServer::start_with_store("127.0.0.1:0".parse().unwrap(), store).await.unwrap();
    let mut client = SotwClient::connect(&mock, "file-node").await;
    client.subscribe(LISTENER, &[]).await;
    let response = client.recv().await;
    assert_eq!(names(&response), ["http", "second"]);
    client.subscribe(CLUSTER, &[]).await;
    assert_eq!(names(&client.recv().await), ["backend"]);
}

#[test]
fn json_resource_file_and_one_line_errors_with_field_paths() {
    let dir = tempfile::tempdir().unwrap();
    let json = write(&dir, "r.json", r#"{"clusters": [{"name": "a", "connect_timeout": "1s"}]}"#);
    assert_eq!(load_file(&json).unwrap()[CLUSTER].len(), 1);

    let cases = [
        ("typo.yaml", "listeners:\n  - name: x\n    adress: {}\n", "listeners[0].adress"),
        (
            "port.yaml",
            "clusters:\n  - name: a\n  - name: b\n    connect_timeout: soon\n",
            "clusters[1].connect_timeout",
        ),
        ("type.yaml", "resources:\n  - \"@type\": type.googleapis.com/nope.Nope\n", "resources[0]"),
        ("key.yaml", "listners: []\n", "listners: unknown key"),
        ("dup.yaml", "clusters: [{name: a}, {name: a}]\n", "duplicate"),
        ("syntax.yaml", "clusters: [\n", "dup.yaml"),
    ];
    let store = Store::new();
    for (name, text, expected) in cases {
        let path = write(&dir, name, text);
        let err = load_into(&path, &store).unwrap_err().to_string();
        let expected = if name == "syntax.yaml" { name } else { expected };
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(err.contains(expected), "{name}: {err}");
        assert!(!err.contains('\n'), "{err}");
    }
    assert!(store.snapshot().get(CLUSTER).is_none(), "nothing from a bad file is served");
}

#[tokio::test]
async fn istio_config_dump_is_served_byte_exact() {
    let fixture = istio_fixture();
    let store = Store::new();
    load_into(&fixture, &store).unwrap();
    let snapshot = store.snapshot();
    let count = |type_url: &str| snapshot.get(type_url).map_or(0, |t| t.resources.len());
    assert_eq!(count(LISTENER), 35, "dynamic active listeners");
    assert!(count(CLUSTER) > 0 && count(ROUTE) > 0 && count(ENDPOINT) > 0);
    // Encoding is canonical (maps sorted), so reading the same dump again changes nothing.
    assert!(load_into(&fixture, &store).unwrap().is_empty(), "a reload of the same file is not a new version");

    let mock = MockServer::start_with_store("127.0.0.1:0".parse().unwrap(), store.clone()).await.unwrap();
    let mut client = SotwClient::connect(&mock, "istio").await;
    client.subscribe(LISTENER, &[]).await;
    let listeners = client.recv().await;
    assert_eq!(listeners.resources.len(), 35);
    client.subscribe(CLUSTER, &[]).await;
    assert_eq!(client.recv().await.resources.len(), count(CLUSTER));

    // The served bytes are exactly the dump's Anys as the proxy's pool encodes them, Istio-only types included.
    let dump: serde_json::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&fixture).unwrap()).unwrap();
    let listeners_dump = dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["@type"] == "type.googleapis.com/envoy.admin.v3.ListenersConfigDump")
        .unwrap();
    let mut istio_types = std::collections::BTreeSet::new();
    for entry in listeners_dump["dynamic_listeners"].as_array().unwrap() {
        let Some(any_json) = entry.get("active_state").and_then(|s| s.get("listener")) else { continue };
        let expected = xds_mock::resource::parse_resource(Some(LISTENER), any_json).unwrap();
        let served = listeners
            .resources
            .iter()
            .find(|any| Listener::decode(any.value.as_slice()).unwrap().name == any_json["name"].as_str().unwrap())
            .unwrap();
        assert_eq!(served.value, expected.value, "listener {}", any_json["name"]);
        // And they still read back as the same JSON (nothing lost for types envoy-types has no struct for).
        assert_eq!(xds_mock::resource::to_json(served).unwrap()["name"], any_json["name"]);
        let listener = Listener::decode(served.value.as_slice()).unwrap();
        for any in typed_configs(&listener) {
            if any.type_url.contains("metadataexchange") {
                let json = xds_mock::resource::to_json(&any).unwrap();
                assert_eq!(json["protocol"], "istio-peer-exchange", "{json}");
            }
            let istio_only = ["istio", "TypedStruct", "metadataexchange"];
            if istio_only.iter().any(|part| any.type_url.contains(part)) {
                assert!(xds_mock::resource::to_json(&any).is_some(), "{}", any.type_url);
                istio_types.insert(any.type_url);
            }
        }
    }
    assert_eq!(
        istio_types.into_iter().collect::<Vec<_>>(),
        [
            "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
            "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
            "type.googleapis.com/udpa.type.v1.TypedStruct",
        ]
    );
}

/// The typed configs of a listener's network filters and of its HTTP connection managers' HTTP filters.
fn typed_configs(listener: &Listener) -> Vec<envoy_types::pb::google::protobuf::Any> {
    use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
    let network =
        listener.filter_chains.iter().flat_map(|chain| &chain.filters).filter_map(|filter| match &filter.config_type {
            Some(ConfigType::TypedConfig(any)) => Some(any.clone()),
            _ => None,
        });
    let mut all: Vec<_> = network.collect();
    let http: Vec<_> = all
        .iter()
        .filter(|any| any.type_url.ends_with("HttpConnectionManager"))
        .flat_map(|any| hcm::HttpConnectionManager::decode(any.value.as_slice()).unwrap().http_filters)
        .filter_map(|filter| match filter.config_type {
            Some(hcm::http_filter::ConfigType::TypedConfig(any)) => Some(any),
            _ => None,
        })
        .collect();
    all.extend(http);
    all
}

#[tokio::test]
async fn watch_pushes_edits_and_keeps_the_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "watched.yaml", "clusters: [{name: a}]\n");
    let store = Store::new();
    load_into(&path, &store).unwrap();
    let mock = MockServer::start_with_store("127.0.0.1:0".parse().unwrap(), store.clone()).await.unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_file(path.clone(), store.clone(), Duration::from_millis(50), shutdown.clone()));

    let mut client = SotwClient::connect(&mock, "watcher").await;
    client.subscribe(CLUSTER, &[]).await;
    let first = client.recv().await;
    assert_eq!(names(&first), ["a"]);
    client.ack(&first, &[]).await;

    std::fs::write(&path, "clusters: [{name: a}, {name: b}]\n").unwrap();
    let second = client.recv().await;
    assert_eq!(names(&second), ["a", "b"]);
    client.ack(&second, &[]).await;

    // A bad edit is rejected: nothing is pushed and the last good snapshot stays.
    std::fs::write(&path, "clusters: [{name: a}, {name: b, connect_timeout: never}]\n").unwrap();
    client.expect_quiet().await;
    assert_eq!(store.snapshot().get(CLUSTER).unwrap().version_string(), second.version_info);

    std::fs::write(&path, "clusters: [{name: c}]\n").unwrap();
    let third = client.recv().await;
    assert_eq!(names(&third), ["c"]);
    shutdown.cancel();
}
