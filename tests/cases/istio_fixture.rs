//! The real Istio 1.14 sidecar config (../shared/fixtures): every listener and cluster of it loads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use envoy_types::pb::envoy::admin::v3::{ConfigDump, ListenersConfigDump};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use prost::Message;
use xds_proxy::config::listener::{ListenerConfig, NetworkFilterConfig};
use xds_proxy::config::proto::{self, Format};

pub fn fixture_listeners() -> Vec<Listener> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/istio-1.14-sidecar-config-dump.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let dump: ConfigDump =
        proto::decode(&proto::parse_dynamic(&text, Format::Yaml, "envoy.admin.v3.ConfigDump").unwrap()).unwrap();
    let mut out = Vec::new();
    for any in dump.configs.iter().filter(|a| a.type_url.ends_with("ListenersConfigDump")) {
        let l = ListenersConfigDump::decode(any.value.as_slice()).unwrap();
        for s in l.static_listeners {
            if let Some(listener) = s.listener {
                out.push(Listener::decode(listener.value.as_slice()).unwrap());
            }
        }
        for d in l.dynamic_listeners {
            if let Some(listener) = d.active_state.and_then(|s| s.listener) {
                out.push(Listener::decode(listener.value.as_slice()).unwrap());
            }
        }
    }
    out
}

#[test]
fn every_listener_loads_including_the_mtls_chains_of_virtual_inbound() {
    let listeners = fixture_listeners();
    assert_eq!(listeners.len(), 37);
    let mut loaded = Vec::new();
    for mut l in listeners {
        if l.name.is_empty() {
            // A bootstrap listener without a name: the bootstrap loader names it (Envoy gives it a UUID).
            l.name = "unnamed".into();
        }
        let name = l.name.clone();
        match ListenerConfig::try_from(l) {
            Ok(cfg) => loaded.push((name, cfg)),
            Err(e) => panic!("{name} should load: {e}"),
        }
    }
    // virtualInbound's mutual-TLS chains take their certificate and CA from Istio's SDS (pilot-agent's sds-grpc).
    let (_, inbound) = loaded.iter().find(|(n, _)| n == "virtualInbound").unwrap();
    let secrets: std::collections::BTreeSet<String> = inbound
        .filter_chains
        .iter()
        .filter_map(|c| c.tls.as_ref())
        .flat_map(|t| t.secrets().map(|b| b.reference.name.clone()).collect::<Vec<_>>())
        .collect();
    assert_eq!(secrets.into_iter().collect::<Vec<_>>(), ["ROOTCA", "default"]);
    let names: Vec<&str> = loaded.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"virtualOutbound"), "{names:?}");
    assert!(names.contains(&"10.104.39.252_6379"), "{names:?}");
    assert!(names.contains(&"0.0.0.0_8080"), "{names:?}");
    let hcm = loaded
        .iter()
        .filter(|(_, c)| {
            c.filter_chains.iter().any(|fc| matches!(fc.terminal(), NetworkFilterConfig::HttpConnectionManager(_)))
        })
        .count();
    assert!(hcm >= 20, "HTTP listeners load: {hcm}");
    eprintln!("{} of 37 listeners load: {names:?}", loaded.len());

    // Istio's telemetry filters were skipped, not dropped silently: each loaded chain names them.
    let (_, outbound) = loaded.iter().find(|(n, _)| n == "virtualOutbound").unwrap();
    assert!(outbound.use_original_dst);
    assert_eq!(outbound.listener_filters.len(), 1, "use_original_dst implies the original_dst filter");
    for chain in &outbound.filter_chains {
        assert_eq!(chain.skipped, vec!["istio.stats".to_string()]);
    }
    let (_, http) = loaded.iter().find(|(n, _)| n == "0.0.0.0_8080").unwrap();
    let NetworkFilterConfig::HttpConnectionManager(h) = http.filter_chains[0].terminal() else { panic!() };
    assert_eq!(h.rds_name(), Some("8080"));
    assert_eq!(h.skipped_filters, ["istio.metadata_exchange", "istio.alpn", "istio.stats"]);
    // The fault and CORS filters run (empty here: routes' fault configs and CORS policies turn them on).
    assert_eq!(h.fault.as_ref().map(|(name, _)| name.as_str()), Some("envoy.filters.http.fault"));
    assert_eq!(h.cors.as_deref(), Some("envoy.filters.http.cors"));
}

#[test]
fn every_cluster_loads_with_its_transport_socket_matches() {
    use envoy_types::pb::envoy::admin::v3::ClustersConfigDump;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use xds_proxy::config::cluster::ClusterConfig;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/istio-1.14-sidecar-config-dump.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let dump: ConfigDump =
        proto::decode(&proto::parse_dynamic(&text, Format::Yaml, "envoy.admin.v3.ConfigDump").unwrap()).unwrap();
    let mut clusters = Vec::new();
    for any in dump.configs.iter().filter(|a| a.type_url.ends_with("ClustersConfigDump")) {
        let c = ClustersConfigDump::decode(any.value.as_slice()).unwrap();
        let all = c.static_clusters.into_iter().filter_map(|s| s.cluster);
        clusters.extend(all.chain(c.dynamic_active_clusters.into_iter().filter_map(|d| d.cluster)));
    }
    assert!(clusters.len() > 30, "{}", clusters.len());
    let mut with_matches = 0;
    for any in clusters {
        let c = Cluster::decode(any.value.as_slice()).unwrap();
        let name = c.name.clone();
        let cfg = match ClusterConfig::try_from(c) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("FAIL {name}: {e}");
                continue;
            }
        };
        if !cfg.transport_socket_matches.is_empty() {
            with_matches += 1;
            // Istio's pair: mTLS for endpoints labelled tlsMode: istio, plaintext for the rest.
            let names: Vec<&str> = cfg.transport_socket_matches.iter().map(|m| m.name.as_str()).collect();
            assert_eq!(names, ["tlsMode-istio", "tlsMode-disabled"], "{name}");
            assert!(cfg.transport_socket_matches[0].tls.is_some() && cfg.transport_socket_matches[1].tls.is_none());
        }
    }
    assert!(with_matches >= 10, "outbound clusters carry transport socket matches: {with_matches}");
}

/// The whole fixture served by xds-mock, as istiod and pilot-agent would serve it: LDS, CDS, EDS and RDS over ADS,
/// the workload certificate and root CA over the agent's SDS socket (`sds-grpc`, a pipe cluster). Every listener
/// goes active and every update is ACKed. virtualOutbound and virtualInbound bind 15001 and 15006 on 0.0.0.0, which
/// nothing else in the suite binds in this network namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_fixture_served_by_xds_mock_is_acked_and_every_listener_goes_active() {
    use super::ads::{NODE, WAIT, bootstrap};
    use super::tls::Pki;
    use crate::common::*;
    use xds_proxy::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/istio-1.14-sidecar-config-dump.yaml");
    let store = xds_mock::store::Store::new();
    xds_mock::source::load_into(std::path::Path::new(path), &store).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("sds.sock");
    let mock = xds_mock::server::MockServer::start_with_uds("127.0.0.1:0".parse().unwrap(), &uds, store).await.unwrap();
    let pki = Pki::new();
    let workload = pki.leaf(&[], &["spiffe://cluster.local/ns/cndt/sa/default"]);
    let secrets_version = mock.set(SECRET, super::mesh::secrets(&workload, &pki)).unwrap();
    let sds_cluster = super::sds::sds_grpc_cluster(&uds);
    let server = start(&(bootstrap(mock.addr(), "GRPC") + &sds_cluster), std::time::Duration::from_millis(300)).await;

    let snapshot = mock.store().snapshot();
    for type_url in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        let version = snapshot.get(type_url).unwrap().version_string();
        let ack = mock.wait_for(NODE, type_url, &version, WAIT).await;
        assert!(ack.is_ok(), "{type_url} v{version}: {ack:?}");
    }
    let ack = mock.wait_for(NODE, SECRET, &secrets_version, WAIT).await;
    assert!(ack.is_ok(), "secrets over the agent's socket: {ack:?}");
    eventually("every listener active", WAIT, async || server.listener_manager().warming_names().is_empty()).await;
    let active = server.listener_manager().active_listeners().len();
    assert_eq!(active, snapshot.get(LISTENER).unwrap().resources.len(), "all of the fixture's listeners serve");
    let inbound = server.listener_manager().get("virtualInbound").unwrap();
    assert_eq!(inbound.local_address.port(), 15006);
}
