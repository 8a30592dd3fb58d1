//! "Which filter chain would this connection take, and why": the hand-off by original destination and Envoy's
//! chain selection, step by step, computed from listener configs alone, for operators debugging a mesh.

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::chain_match::ConnAttrs;
use super::filters::RAW_BUFFER;
use crate::config::listener::{FilterChainConfig, ListenerConfig, ListenerFilterKind, NetworkFilterConfig};

/// A connection as the operator describes it.
#[derive(Debug, Clone)]
pub struct Query {
    /// The listener that accepts the connection (e.g. `virtualOutbound`).
    pub listener: String,
    /// The destination after original_dst: what the app dialled.
    pub destination: SocketAddr,
    pub source: SocketAddr,
    pub server_name: Option<String>,
    /// `tls` or `raw_buffer`.
    pub transport: String,
    pub alpn: Vec<String>,
}

/// Explains the path of `q` through `listeners`, one line per decision.
pub fn explain(listeners: &[ListenerConfig], q: &Query) -> Result<String, String> {
    let find = |name: &str| listeners.iter().find(|l| l.name == name);
    let first = find(&q.listener).ok_or_else(|| format!("no listener named '{}'", q.listener))?;
    let mut out = String::new();
    let _ =
        writeln!(out, "listener '{}' ({}) accepts {} → {}", first.name, first.socket.address, q.source, q.destination);
    describe_filters(&mut out, first, q.destination.port());

    let mut listener = first;
    if first.use_original_dst {
        let target = super::handoff_lookup(
            q.destination,
            |a| listeners.iter().find(|l| l.socket.address == *a),
            |l| l.socket.ipv4_compat,
        );
        match target {
            Some(t) if t.name != first.name => {
                let how =
                    if t.socket.address == q.destination { "exact address" } else { "wildcard address of the port" };
                let _ =
                    writeln!(out, "hand-off: use_original_dst → listener '{}' ({}, {how})", t.name, t.socket.address);
                describe_filters(&mut out, t, q.destination.port());
                listener = t;
            }
            _ => {
                let _ = writeln!(
                    out,
                    "hand-off: no listener for {}; the connection stays on '{}'",
                    q.destination, first.name
                );
            }
        }
    }

    let transport = if q.transport.is_empty() { RAW_BUFFER } else { q.transport.as_str() };
    let attrs = ConnAttrs {
        destination: q.destination,
        source: q.source,
        direct_source: q.source.ip(),
        server_name: q.server_name.as_deref(),
        transport_protocol: transport,
        application_protocols: &q.alpn,
    };
    let explanation = listener.chain_index.explain(&attrs);
    let _ = writeln!(out, "filter chain match on '{}':", listener.name);
    for step in &explanation.steps {
        let _ = writeln!(out, "  {step}");
    }
    match explanation.chain.and_then(|i| listener.filter_chains.get(i).map(|c| (i, c))) {
        Some((i, chain)) => {
            let _ = writeln!(out, "result: filter_chains[{i}] {}", describe_chain(chain));
        }
        None => match &listener.default_filter_chain {
            Some(chain) => {
                let _ = writeln!(out, "result: default_filter_chain {}", describe_chain(chain));
            }
            None => {
                let _ = writeln!(out, "result: no filter chain; the connection is closed (no_filter_chain_match)");
            }
        },
    }
    Ok(out)
}

fn describe_filters(out: &mut String, l: &ListenerConfig, port: u16) {
    if l.listener_filters.is_empty() {
        return;
    }
    let names: Vec<String> = l
        .listener_filters
        .iter()
        .map(|f| {
            let name = match f.kind {
                ListenerFilterKind::OriginalDst => "original_dst",
                ListenerFilterKind::TlsInspector { .. } => "tls_inspector",
                ListenerFilterKind::HttpInspector => "http_inspector",
                ListenerFilterKind::ProxyProtocol { .. } => "proxy_protocol",
            };
            if f.disabled.as_ref().is_some_and(|p| p.matches(port)) {
                format!("{name} (disabled for port {port})")
            } else {
                name.to_string()
            }
        })
        .collect();
    let _ = writeln!(out, "listener filters: {}", names.join(", "));
}

fn describe_chain(c: &FilterChainConfig) -> String {
    let name = if c.name.is_empty() { String::new() } else { format!("'{}' ", c.name) };
    let what = match c.terminal() {
        NetworkFilterConfig::TcpProxy(tp) => {
            let clusters: Vec<&str> = tp.clusters.iter().map(|(n, _)| n.as_str()).collect();
            format!("tcp_proxy → cluster {}", clusters.join(", "))
        }
        NetworkFilterConfig::HttpConnectionManager(h) => match h.rds_name() {
            Some(rds) => format!("http_connection_manager → routes from RDS '{rds}'"),
            None => "http_connection_manager → inline routes".to_string(),
        },
        NetworkFilterConfig::DirectResponse(_) => "direct_response".to_string(),
    };
    format!("{name}({what})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::proto::{self, Format};

    fn listener(yaml: &str) -> ListenerConfig {
        let msg = proto::parse_dynamic(yaml, Format::Yaml, "envoy.config.listener.v3.Listener")
            .unwrap_or_else(|e| panic!("{e}"));
        let l: envoy_types::pb::envoy::config::listener::v3::Listener =
            proto::decode(&msg).unwrap_or_else(|e| panic!("{e}"));
        ListenerConfig::try_from(l).unwrap_or_else(|e| panic!("{e}"))
    }

    const TCP: &str = r#"[ { name: t, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: CLUSTER } } ]"#;

    #[test]
    fn explains_the_hand_off_and_the_chain() {
        let virt = listener(&format!(
            "name: virtualOutbound\naddress: {{ socket_address: {{ address: 0.0.0.0, port_value: 15001 }} }}\nuse_original_dst: true\n\
             filter_chains: [ {{ name: blackhole, filter_chain_match: {{ destination_port: 15001 }}, filters: {} }}, {{ name: passthrough, filters: {} }} ]",
            TCP.replace("CLUSTER", "BlackHoleCluster"),
            TCP.replace("CLUSTER", "PassthroughCluster")
        ));
        let port = listener(&format!(
            "name: 0.0.0.0_8080\naddress: {{ socket_address: {{ address: 0.0.0.0, port_value: 8080 }} }}\nbind_to_port: false\n\
             filter_chains: [ {{ filter_chain_match: {{ transport_protocol: raw_buffer }}, filters: {} }} ]",
            TCP.replace("CLUSTER", "outbound|8080||svc")
        ));
        let all = vec![virt, port];
        let q = |dst: &str, transport: &str| Query {
            listener: "virtualOutbound".into(),
            destination: dst.parse().unwrap_or_else(|_| unreachable!()),
            source: "10.0.0.5:40000".parse().unwrap_or_else(|_| unreachable!()),
            server_name: None,
            transport: transport.into(),
            alpn: vec![],
        };
        let text = explain(&all, &q("10.96.0.10:8080", "")).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            text.contains(
                "hand-off: use_original_dst → listener '0.0.0.0_8080' (0.0.0.0:8080, wildcard address of the port)"
            ),
            "{text}"
        );
        assert!(text.contains("result: filter_chains[0] (tcp_proxy → cluster outbound|8080||svc)"), "{text}");

        let tls = explain(&all, &q("10.96.0.10:8080", "tls")).unwrap_or_else(|e| panic!("{e}"));
        assert!(tls.contains("result: no filter chain; the connection is closed (no_filter_chain_match)"), "{tls}");

        let other = explain(&all, &q("10.96.0.10:9999", "")).unwrap_or_else(|e| panic!("{e}"));
        assert!(other.contains("hand-off: no listener for 10.96.0.10:9999"), "{other}");
        assert!(
            other.contains("result: filter_chains[1] 'passthrough' (tcp_proxy → cluster PassthroughCluster)"),
            "{other}"
        );

        let blackhole = explain(&all, &q("127.0.0.1:15001", "")).unwrap_or_else(|e| panic!("{e}"));
        assert!(blackhole.contains("destination_port: exact 15001"), "{blackhole}");
        assert!(blackhole.contains("'blackhole'"), "{blackhole}");
        assert_eq!(
            explain(&all, &Query { listener: "nope".into(), ..q("1.2.3.4:1", "") }).err(),
            Some("no listener named 'nope'".to_string())
        );
    }
}
