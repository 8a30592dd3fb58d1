//! The real Istio 1.14 sidecar config (../shared/fixtures): which listeners load today, and why the others do not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use envoy_types::pb::envoy::admin::v3::{ConfigDump, ListenersConfigDump};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use prost::Message;
use xds_proxy::config::listener::ListenerConfig;
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
fn tcp_listeners_load_and_http_or_tls_ones_say_why_not() {
    let listeners = fixture_listeners();
    assert_eq!(listeners.len(), 37);
    let mut loaded = Vec::new();
    for l in listeners {
        let name = l.name.clone();
        let hcm = uses(&l, "HttpConnectionManager");
        let tls = uses(&l, "DownstreamTlsContext");
        match ListenerConfig::try_from(l) {
            Ok(cfg) => {
                assert!(!hcm && !tls, "{name} loaded although it needs HTTP or TLS");
                loaded.push((name, cfg));
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(hcm || tls, "{name} should load: {msg}");
                assert!(msg.contains("is not supported"), "{name}: unclear rejection: {msg}");
            }
        }
    }
    let names: Vec<&str> = loaded.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"virtualOutbound"), "{names:?}");
    assert!(names.contains(&"10.104.39.252_6379"), "{names:?}");
    assert_eq!(loaded.len(), 12, "{names:?}");

    // Istio's telemetry filters were skipped, not dropped silently: each loaded chain names them.
    let (_, outbound) = loaded.iter().find(|(n, _)| n == "virtualOutbound").unwrap();
    assert!(outbound.use_original_dst);
    assert_eq!(outbound.listener_filters.len(), 1, "use_original_dst implies the original_dst filter");
    for chain in &outbound.filter_chains {
        assert_eq!(chain.skipped, vec!["istio.stats".to_string()]);
    }
}
