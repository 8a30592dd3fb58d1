//! The real Istio 1.14 sidecar config (../shared/fixtures): every listener loads, its mutual-TLS chains with their
//! secrets from pilot-agent's `sds-grpc`.
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

fn uses(l: &Listener, needle: &str) -> bool {
    l.filter_chains.iter().chain(l.default_filter_chain.iter()).any(|fc| {
        fc.filters.iter().any(|f| format!("{f:?}").contains(needle))
            || fc.transport_socket.as_ref().is_some_and(|t| format!("{t:?}").contains(needle))
    })
}

#[test]
fn every_listener_loads_and_mutual_tls_chains_take_their_secrets_from_sds_grpc() {
    use xds_proxy::secret::SecretSource;
    let listeners = fixture_listeners();
    assert_eq!(listeners.len(), 37);
    let mut loaded = Vec::new();
    for mut l in listeners {
        if l.name.is_empty() {
            // A bootstrap listener without a name: the bootstrap loader names it (Envoy gives it a UUID).
            l.name = "unnamed".into();
        }
        let name = l.name.clone();
        let tls = uses(&l, "DownstreamTlsContext");
        let cfg = ListenerConfig::try_from(l).unwrap_or_else(|e| panic!("{name} should load: {e}"));
        let secrets: Vec<(String, SecretSource)> = cfg
            .filter_chains
            .iter()
            .filter_map(|c| c.tls.as_ref())
            .flat_map(|t| t.secrets().map(|b| (b.reference.name.clone(), b.reference.source.clone())))
            .collect();
        assert_eq!(tls, !secrets.is_empty(), "{name}");
        // Istio's mTLS chains: the workload certificate and the root CA, both from pilot-agent's socket.
        for (secret, source) in &secrets {
            assert!(secret == "default" || secret == "ROOTCA", "{name}: {secret}");
            assert_eq!(*source, SecretSource::Grpc("sds-grpc".into()), "{name}");
        }
        loaded.push((name, cfg));
    }
    assert!(loaded.iter().any(|(n, _)| n == "virtualInbound"), "virtualInbound loads");
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
    assert_eq!(
        h.skipped_filters,
        ["istio.metadata_exchange", "istio.alpn", "envoy.filters.http.fault", "envoy.filters.http.cors", "istio.stats"]
    );
}
