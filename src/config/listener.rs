//! Validated listener configuration: Envoy's `Listener`, `FilterChain` and the network filters we run, converted
//! from the proto with every error naming its field path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::extensions::filters::network::direct_response::v3 as direct_response;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::{ConfigError, audit_resource, ip_socket_address, join, opt_duration};

/// Envoy's default for `per_connection_buffer_limit_bytes`.
pub const DEFAULT_BUFFER_LIMIT: u32 = 1024 * 1024;
/// Envoy's `ENVOY_TCP_BACKLOG_SIZE`.
pub const DEFAULT_BACKLOG: u32 = 128;
/// Envoy's default `listener_filters_timeout`.
pub const DEFAULT_LISTENER_FILTERS_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's default tcp_proxy `idle_timeout`.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

const TYPE_TCP_PROXY: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const TYPE_DIRECT_RESPONSE: &str = "envoy.extensions.filters.network.direct_response.v3.Config";
const TYPE_RAW_BUFFER: &str = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainType {
    /// Drain on LDS modify/remove and on /healthcheck/fail.
    Default,
    /// Drain only on LDS modify/remove.
    ModifyOnly,
}

/// The parts of a listener that decide its sockets. Two configs with equal specs can share sockets, which is how
/// an update keeps connections waiting in the accept queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketSpec {
    pub address: SocketAddr,
    pub reuse_port: bool,
    pub backlog: u32,
    pub freebind: bool,
    pub transparent: bool,
    /// `ipv4_compat` on a `::` address: accept IPv4-mapped connections too (IPV6_V6ONLY off).
    pub ipv4_compat: bool,
    pub socket_options: Vec<SocketOption>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOption {
    pub level: i32,
    pub name: i32,
    pub value: SocketOptionValue,
    pub state: SocketState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketOptionValue {
    Int(i32),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketState {
    Prebind,
    Bound,
    Listening,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub socket: SocketSpec,
    /// `bind_to_port: false` listeners own no socket; they receive connections handed off by a
    /// `use_original_dst` listener.
    pub bind_to_port: bool,
    pub use_original_dst: bool,
    pub filter_chains: Vec<FilterChainConfig>,
    pub default_filter_chain: Option<FilterChainConfig>,
    pub per_connection_buffer_limit_bytes: u32,
    pub drain_type: DrainType,
    /// Prefix of the `listener.<prefix>.*` stats: `stat_prefix`, else the address in Envoy's stat form.
    pub stat_prefix: String,
    pub listener_filters_timeout: Option<Duration>,
    pub continue_on_listener_filters_timeout: bool,
    /// The resource as received, for equality on update and for /config_dump.
    pub proto: Arc<lpb::Listener>,
}

impl ListenerConfig {
    /// True when `other` differs from `self` only in its filter chains: Envoy's condition for an in-place filter
    /// chain update, where the listener and its sockets stay and only changed chains drain.
    pub fn only_filter_chains_differ(&self, other: &ListenerConfig) -> bool {
        let strip = |l: &lpb::Listener| {
            let mut l = l.clone();
            l.filter_chains.clear();
            l.default_filter_chain = None;
            l
        };
        let chains_changed = self.proto.filter_chains != other.proto.filter_chains
            || self.proto.default_filter_chain != other.proto.default_filter_chain;
        chains_changed && strip(&self.proto) == strip(&other.proto)
    }
}

impl TryFrom<lpb::Listener> for ListenerConfig {
    type Error = ConfigError;

    fn try_from(l: lpb::Listener) -> Result<Self, ConfigError> {
        audit_resource(&l, "envoy.config.listener.v3.Listener")?;
        if l.name.is_empty() {
            return Err(ConfigError::new("name", "a listener needs a name"));
        }
        let address = ip_socket_address(l.address.as_ref(), "address")?;
        let ipv4_compat = match l.address.as_ref().and_then(|a| a.address.as_ref()) {
            Some(core::address::Address::SocketAddress(sa)) => sa.ipv4_compat,
            _ => false,
        };
        if ipv4_compat && !address.is_ipv6() {
            return Err(ConfigError::new(
                "address.socket_address.ipv4_compat",
                "ipv4_compat only applies to IPv6 addresses",
            ));
        }
        let reuse_port = l.enable_reuse_port.as_ref().is_none_or(|v| v.value);
        let socket_options = l
            .socket_options
            .iter()
            .enumerate()
            .map(|(i, o)| socket_option(o, &format!("socket_options[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let socket = SocketSpec {
            address,
            reuse_port,
            backlog: l.tcp_backlog_size.as_ref().map_or(DEFAULT_BACKLOG, |v| v.value),
            freebind: l.freebind.as_ref().is_some_and(|v| v.value),
            transparent: l.transparent.as_ref().is_some_and(|v| v.value),
            ipv4_compat,
            socket_options,
        };

        let filter_chains = l
            .filter_chains
            .iter()
            .enumerate()
            .map(|(i, fc)| FilterChainConfig::convert(fc, &format!("filter_chains[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let default_filter_chain = l
            .default_filter_chain
            .as_ref()
            .map(|fc| FilterChainConfig::convert(fc, "default_filter_chain"))
            .transpose()?;
        if filter_chains.is_empty() && default_filter_chain.is_none() {
            return Err(ConfigError::new("filter_chains", "no filter chains specified (and no default_filter_chain)"));
        }
        check_match_uniqueness(&filter_chains)?;

        let listener_filters_timeout = opt_duration(
            l.listener_filters_timeout.as_ref(),
            DEFAULT_LISTENER_FILTERS_TIMEOUT,
            "listener_filters_timeout",
        )?;
        let drain_type = if l.drain_type == lpb::listener::DrainType::ModifyOnly as i32 {
            DrainType::ModifyOnly
        } else {
            DrainType::Default
        };
        let stat_prefix =
            if l.stat_prefix.is_empty() { super::address_stat_name(&address) } else { l.stat_prefix.clone() };
        Ok(ListenerConfig {
            name: l.name.clone(),
            socket,
            bind_to_port: l.bind_to_port.as_ref().is_none_or(|v| v.value),
            use_original_dst: l.use_original_dst.as_ref().is_some_and(|v| v.value),
            filter_chains,
            default_filter_chain,
            per_connection_buffer_limit_bytes: l
                .per_connection_buffer_limit_bytes
                .as_ref()
                .map_or(DEFAULT_BUFFER_LIMIT, |v| v.value),
            drain_type,
            stat_prefix,
            listener_filters_timeout: (!listener_filters_timeout.is_zero()).then_some(listener_filters_timeout),
            continue_on_listener_filters_timeout: l.continue_on_listener_filters_timeout,
            proto: Arc::new(l),
        })
    }
}

fn socket_option(o: &core::SocketOption, path: &str) -> Result<SocketOption, ConfigError> {
    use core::socket_option::{SocketState as S, Value};
    let narrow = |v: i64, field: &str| {
        i32::try_from(v).map_err(|_| ConfigError::new(join(path, field), format!("{v} does not fit a C int")))
    };
    let value = match &o.value {
        Some(Value::IntValue(v)) => SocketOptionValue::Int(narrow(*v, "int_value")?),
        Some(Value::BufValue(b)) => SocketOptionValue::Bytes(b.clone()),
        None => return Err(ConfigError::new(path, "a socket option needs int_value or buf_value")),
    };
    let state = match S::try_from(o.state) {
        Ok(S::StatePrebind) => SocketState::Prebind,
        Ok(S::StateBound) => SocketState::Bound,
        Ok(S::StateListening) => SocketState::Listening,
        Err(_) => return Err(ConfigError::new(join(path, "state"), format!("unknown state {}", o.state))),
    };
    Ok(SocketOption { level: narrow(o.level, "level")?, name: narrow(o.name, "name")?, value, state })
}

/// Filter chain matching beyond "match everything" arrives with the listener-filters issue; until then a chain
/// with match criteria is refused rather than matched wrongly.
fn check_match_uniqueness(chains: &[FilterChainConfig]) -> Result<(), ConfigError> {
    let mut seen: Option<(usize, &FilterChainConfig)> = None;
    for (i, fc) in chains.iter().enumerate() {
        if let Some((j, first)) = seen {
            return Err(ConfigError::new(
                format!("filter_chains[{i}]"),
                format!(
                    "filter chain '{}' has the same matching rules defined as '{}' (filter_chains[{j}])",
                    fc.name, first.name
                ),
            ));
        }
        seen = Some((i, fc));
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct FilterChainConfig {
    pub name: String,
    /// The network filters in order; the last one is terminal.
    pub filters: Vec<NetworkFilterConfig>,
    pub proto: Arc<lpb::FilterChain>,
}

impl FilterChainConfig {
    fn convert(fc: &lpb::FilterChain, path: &str) -> Result<Self, ConfigError> {
        if let Some(m) = &fc.filter_chain_match
            && *m != lpb::FilterChainMatch::default()
        {
            return Err(ConfigError::new(
                join(path, "filter_chain_match"),
                "filter chain match criteria are not supported yet (only an empty match)",
            ));
        }
        if let Some(ts) = &fc.transport_socket {
            let type_url = match &ts.config_type {
                Some(core::transport_socket::ConfigType::TypedConfig(any)) => any.type_url.as_str(),
                None => "",
            };
            if type_name(type_url) != TYPE_RAW_BUFFER && !(type_url.is_empty() && ts.name.ends_with("raw_buffer")) {
                return Err(ConfigError::new(
                    join(path, "transport_socket"),
                    format!("transport socket '{}' is not supported (only raw_buffer)", type_name(type_url)),
                ));
            }
        }
        if fc.filters.is_empty() {
            return Err(ConfigError::new(join(path, "filters"), "a filter chain needs a terminal network filter"));
        }
        let filters = fc
            .filters
            .iter()
            .enumerate()
            .map(|(i, f)| NetworkFilterConfig::convert(f, &join(path, &format!("filters[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        let last = filters.len() - 1;
        if filters.len() > 1 {
            return Err(ConfigError::new(
                join(path, &format!("filters[{}]", last - 1)),
                "only a single terminal network filter per chain is supported yet",
            ));
        }
        Ok(FilterChainConfig { name: fc.name.clone(), filters, proto: Arc::new(fc.clone()) })
    }

    pub fn terminal(&self) -> &NetworkFilterConfig {
        // `convert` guarantees at least one filter.
        &self.filters[self.filters.len() - 1]
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum NetworkFilterConfig {
    TcpProxy(TcpProxyConfig),
    /// `envoy.filters.network.direct_response`: write these bytes, then close.
    DirectResponse(Vec<u8>),
}

impl NetworkFilterConfig {
    fn convert(f: &lpb::Filter, path: &str) -> Result<Self, ConfigError> {
        let any = match &f.config_type {
            Some(lpb::filter::ConfigType::TypedConfig(any)) => any,
            Some(lpb::filter::ConfigType::ConfigDiscovery(_)) => {
                return Err(ConfigError::new(
                    join(path, "config_discovery"),
                    "filter config discovery is not supported",
                ));
            }
            None => {
                return Err(ConfigError::new(
                    join(path, "typed_config"),
                    format!("filter '{}' needs a typed_config", f.name),
                ));
            }
        };
        let path = join(path, "typed_config");
        match type_name(&any.type_url) {
            TYPE_TCP_PROXY => {
                Ok(NetworkFilterConfig::TcpProxy(TcpProxyConfig::convert(&decode_any(any, &path)?, &path)?))
            }
            TYPE_DIRECT_RESPONSE => {
                let c: direct_response::Config = decode_any(any, &path)?;
                Ok(NetworkFilterConfig::DirectResponse(data_source(c.response.as_ref(), &join(&path, "response"))?))
            }
            other => Err(ConfigError::new(path, format!("network filter '{other}' is not supported"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TcpProxyConfig {
    pub stat_prefix: String,
    /// One cluster, or several with weights (tcp_proxy's `weighted_clusters`).
    pub clusters: Vec<(String, u32)>,
    /// None when disabled (`idle_timeout: 0s`).
    pub idle_timeout: Option<Duration>,
    pub max_connect_attempts: u32,
}

impl TcpProxyConfig {
    fn convert(t: &tcp_proxy::TcpProxy, path: &str) -> Result<Self, ConfigError> {
        use tcp_proxy::tcp_proxy::ClusterSpecifier;
        if t.stat_prefix.is_empty() {
            return Err(ConfigError::new(join(path, "stat_prefix"), "stat_prefix is required"));
        }
        let clusters = match &t.cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => vec![(c.clone(), 1)],
            Some(ClusterSpecifier::WeightedClusters(w)) => {
                let list: Vec<(String, u32)> = w.clusters.iter().map(|c| (c.name.clone(), c.weight)).collect();
                for (i, (name, _)) in list.iter().enumerate() {
                    if name.is_empty() {
                        return Err(ConfigError::new(
                            join(path, &format!("weighted_clusters.clusters[{i}].name")),
                            "a cluster name is required",
                        ));
                    }
                }
                if list.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() == 0 {
                    return Err(ConfigError::new(
                        join(path, "weighted_clusters"),
                        "weighted clusters need at least one cluster with a positive weight",
                    ));
                }
                list
            }
            _ => return Err(ConfigError::new(join(path, "cluster"), "tcp_proxy needs cluster or weighted_clusters")),
        };
        let idle = opt_duration(t.idle_timeout.as_ref(), DEFAULT_TCP_IDLE_TIMEOUT, &join(path, "idle_timeout"))?;
        let attempts = t.max_connect_attempts.as_ref().map_or(1, |v| v.value);
        if attempts == 0 {
            return Err(ConfigError::new(join(path, "max_connect_attempts"), "must be at least 1"));
        }
        Ok(TcpProxyConfig {
            stat_prefix: t.stat_prefix.clone(),
            clusters,
            idle_timeout: (!idle.is_zero()).then_some(idle),
            max_connect_attempts: attempts,
        })
    }
}

/// Type name of an Any's type URL (`type.googleapis.com/a.b.C` → `a.b.C`).
pub(crate) fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

pub(crate) fn decode_any<T: Message + Default>(any: &Any, path: &str) -> Result<T, ConfigError> {
    T::decode(any.value.as_slice()).map_err(|e| ConfigError::new(path, format!("cannot decode {}: {e}", any.type_url)))
}

pub(crate) fn data_source(ds: Option<&core::DataSource>, path: &str) -> Result<Vec<u8>, ConfigError> {
    use core::data_source::Specifier;
    match ds.and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(Specifier::InlineString(s)) => Ok(s.clone().into_bytes()),
        Some(Specifier::Filename(f)) => {
            std::fs::read(f).map_err(|e| ConfigError::new(join(path, "filename"), format!("cannot read {f}: {e}")))
        }
        Some(Specifier::EnvironmentVariable(v)) => std::env::var(v)
            .map(String::into_bytes)
            .map_err(|_| ConfigError::new(join(path, "environment_variable"), format!("{v} is not set"))),
        None => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::proto::{self, Format};

    fn convert(yaml: &str) -> Result<ListenerConfig, String> {
        let msg = proto::parse_dynamic(yaml, Format::Yaml, "envoy.config.listener.v3.Listener")
            .map_err(|e| format!("parse: {e}"))?;
        let l: lpb::Listener = proto::decode(&msg).map_err(|e| format!("decode: {e}"))?;
        ListenerConfig::try_from(l).map_err(|e| e.to_string())
    }

    const TCP: &str = r#"{ name: envoy.filters.network.tcp_proxy, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: c } }"#;

    fn listener(extra: &str, chains: &str) -> String {
        format!(
            "name: l\naddress: {{ socket_address: {{ address: 127.0.0.1, port_value: 80 }} }}\n{extra}\nfilter_chains: {chains}\n"
        )
    }

    #[test]
    fn defaults_are_envoys() {
        let l = convert(&listener("", &format!("[ {{ filters: [ {TCP} ] }} ]"))).unwrap_or_else(|e| panic!("{e}"));
        assert!(l.socket.reuse_port && l.bind_to_port && !l.use_original_dst);
        assert_eq!(l.socket.backlog, DEFAULT_BACKLOG);
        assert_eq!(l.per_connection_buffer_limit_bytes, DEFAULT_BUFFER_LIMIT);
        assert_eq!(l.listener_filters_timeout, Some(DEFAULT_LISTENER_FILTERS_TIMEOUT));
        assert_eq!(l.stat_prefix, "127.0.0.1_80");
        let NetworkFilterConfig::TcpProxy(tp) = l.filter_chains[0].terminal() else { panic!("not tcp_proxy") };
        assert_eq!(tp.idle_timeout, Some(DEFAULT_TCP_IDLE_TIMEOUT));
        assert_eq!(tp.max_connect_attempts, 1);
    }

    #[test]
    fn zero_timeouts_disable() {
        let chains = format!("[ {{ filters: [ {} ] }} ]", TCP.replace("cluster: c", "cluster: c, idle_timeout: 0s"));
        let l = convert(&listener("listener_filters_timeout: 0s", &chains)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.listener_filters_timeout, None);
        let NetworkFilterConfig::TcpProxy(tp) = l.filter_chains[0].terminal() else { panic!("not tcp_proxy") };
        assert_eq!(tp.idle_timeout, None);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (listener("", "[]"), "filter_chains: no filter chains specified (and no default_filter_chain)"),
            (
                listener("", &format!("[ {{ filter_chain_match: {{ destination_port: 80 }}, filters: [ {TCP} ] }} ]")),
                "filter_chains[0].filter_chain_match: filter chain match criteria are not supported yet",
            ),
            (
                listener("", &format!("[ {{ name: a, filters: [ {TCP} ] }}, {{ name: b, filters: [ {TCP} ] }} ]")),
                "filter_chains[1]: filter chain 'b' has the same matching rules defined as 'a'",
            ),
            (
                listener(
                    "",
                    r#"[ { filters: [ { name: x, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.echo.v3.Echo } } ] } ]"#,
                ),
                "filter_chains[0].filters[0].typed_config: envoy.extensions.filters.network.echo.v3.Echo is not supported",
            ),
            (
                listener("", &format!("[ {{ filters: [ {} ] }} ]", TCP.replace(", cluster: c", ""))),
                "filter_chains[0].filters[0].typed_config.cluster: tcp_proxy needs cluster or weighted_clusters",
            ),
            (
                listener(
                    "",
                    &format!(
                        "[ {{ filters: [ {} ] }} ]",
                        TCP.replace("cluster: c", "weighted_clusters: { clusters: [ { name: a, weight: 0 } ] }")
                    ),
                ),
                "weighted_clusters: weighted clusters need at least one cluster with a positive weight",
            ),
            (
                listener(
                    "",
                    &format!(
                        r#"[ {{ filters: [ {TCP} ], transport_socket: {{ name: tls, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext }} }} }} ]"#
                    ),
                ),
                "filter_chains[0].transport_socket",
            ),
            (
                listener("", &format!("[ {{ filters: [ {TCP}, {TCP} ] }} ]")),
                "filter_chains[0].filters[0]: only a single terminal network filter per chain is supported yet",
            ),
            (
                listener("socket_options: [ { level: 1, name: 2 } ]", &format!("[ {{ filters: [ {TCP} ] }} ]")),
                "socket_options[0]: a socket option needs int_value or buf_value",
            ),
        ];
        for (yaml, expect) in cases {
            let err = convert(&yaml).err().unwrap_or_default();
            assert!(err.contains(expect), "expected '{expect}', got '{err}'");
        }
    }

    #[test]
    fn ipv4_compat_needs_ipv6() {
        let chains = format!("[ {{ filters: [ {TCP} ] }} ]");
        let v6 = "name: l\naddress: { socket_address: { address: '::', port_value: 80, ipv4_compat: true } }\n";
        let l = convert(&format!("{v6}filter_chains: {chains}")).unwrap_or_else(|e| panic!("{e}"));
        assert!(l.socket.ipv4_compat);
        let v4 = v6.replace("'::'", "0.0.0.0");
        let err = convert(&format!("{v4}filter_chains: {chains}")).err().unwrap_or_default();
        assert_eq!(err, "address.socket_address.ipv4_compat: ipv4_compat only applies to IPv6 addresses");
    }

    #[test]
    fn only_chain_changes_allow_an_in_place_update() {
        let a =
            convert(&listener("", &format!("[ {{ name: a, filters: [ {TCP} ] }} ]"))).unwrap_or_else(|e| panic!("{e}"));
        let b =
            convert(&listener("", &format!("[ {{ name: b, filters: [ {TCP} ] }} ]"))).unwrap_or_else(|e| panic!("{e}"));
        let c = convert(&listener("tcp_backlog_size: 5", &format!("[ {{ name: b, filters: [ {TCP} ] }} ]")))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(a.only_filter_chains_differ(&b));
        assert!(!a.only_filter_chains_differ(&a), "nothing changed");
        assert!(!a.only_filter_chains_differ(&c), "a listener field changed too");
    }
}
