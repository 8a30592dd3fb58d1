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
use crate::listener::chain_match::{ChainIndex, ChainMatch};

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
    /// `connection_balance_config.cpu_locality_balance`: the kernel hands each connection to the socket of the worker
    /// pinned to the CPU that received it. Not part of the socket spec: switching it keeps the sockets.
    pub cpu_locality: bool,
    /// `bind_to_port: false` listeners own no socket; they receive connections handed off by a
    /// `use_original_dst` listener.
    pub bind_to_port: bool,
    pub use_original_dst: bool,
    /// In order; `use_original_dst` puts an original_dst filter first when none is configured (Envoy's rule).
    pub listener_filters: Vec<ListenerFilterConfig>,
    /// Shared with the runtime chains built from them.
    pub filter_chains: Vec<Arc<FilterChainConfig>>,
    /// Selection over `filter_chains` by their matches, built once per config.
    pub chain_index: Arc<ChainIndex>,
    pub default_filter_chain: Option<Arc<FilterChainConfig>>,
    pub per_connection_buffer_limit_bytes: u32,
    pub drain_type: DrainType,
    /// Prefix of the `listener.<prefix>.*` stats: `stat_prefix`, else the address in Envoy's stat form.
    pub stat_prefix: String,
    pub listener_filters_timeout: Option<Duration>,
    pub continue_on_listener_filters_timeout: bool,
    /// Written for connections that end before a filter chain takes them (no chain matched).
    pub access_log: Arc<[crate::access_log::AccessLog]>,
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
        // Shared from the start: filter chain configs point into it instead of copying their protos.
        let proto = Arc::new(l);
        let l = &*proto;
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
        let use_original_dst = l.use_original_dst.as_ref().is_some_and(|v| v.value);
        let mut listener_filters = l
            .listener_filters
            .iter()
            .enumerate()
            .map(|(i, f)| ListenerFilterConfig::convert(f, &format!("listener_filters[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        if use_original_dst && !listener_filters.iter().any(|f| f.kind == ListenerFilterKind::OriginalDst) {
            listener_filters.insert(
                0,
                ListenerFilterConfig {
                    name: "envoy.filters.listener.original_dst".into(),
                    kind: ListenerFilterKind::OriginalDst,
                    disabled: None,
                },
            );
        }
        let reuse_port = l.enable_reuse_port.as_ref().is_none_or(|v| v.value);
        let socket_options = l
            .socket_options
            .iter()
            .enumerate()
            .map(|(i, o)| socket_option(o, &format!("socket_options[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let cpu_locality = match &l.connection_balance_config {
            None => false,
            Some(c) => {
                use envoy_types::pb::envoy::config::listener::v3::listener::connection_balance_config::BalanceType;
                match c.balance_type {
                    Some(BalanceType::CpuLocalityBalance(_)) => true,
                    // The field audit refuses the other balancers by name.
                    Some(_) => false,
                    None => {
                        return Err(ConfigError::new("connection_balance_config", "one balancer must be set"));
                    }
                }
            }
        };
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
            .map(|(i, _)| {
                FilterChainConfig::convert(&proto, ChainSlot::Chain(i), &format!("filter_chains[{i}]")).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let default_filter_chain = l
            .default_filter_chain
            .as_ref()
            .map(|_| FilterChainConfig::convert(&proto, ChainSlot::Default, "default_filter_chain").map(Arc::new))
            .transpose()?;
        if filter_chains.is_empty() && default_filter_chain.is_none() {
            return Err(ConfigError::new("filter_chains", "no filter chains specified (and no default_filter_chain)"));
        }
        let matches: Vec<ChainMatch> = filter_chains.iter().map(|c| c.chain_match.clone()).collect();
        let chain_index = ChainIndex::build(&matches)
            .map_err(|e| ConfigError::new(format!("filter_chains[{}]", e.chain()), e.to_string()))?;

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
            cpu_locality,
            bind_to_port: l.bind_to_port.as_ref().is_none_or(|v| v.value),
            use_original_dst,
            listener_filters,
            filter_chains,
            chain_index: Arc::new(chain_index),
            default_filter_chain,
            per_connection_buffer_limit_bytes: l
                .per_connection_buffer_limit_bytes
                .as_ref()
                .map_or(DEFAULT_BUFFER_LIMIT, |v| v.value),
            drain_type,
            stat_prefix,
            listener_filters_timeout: (!listener_filters_timeout.is_zero()).then_some(listener_filters_timeout),
            continue_on_listener_filters_timeout: l.continue_on_listener_filters_timeout,
            access_log: super::access_log::access_logs(&l.access_log, "access_log")?.into(),
            proto,
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

const TYPE_ORIGINAL_DST: &str = "envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
const TYPE_TLS_INSPECTOR: &str = "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
const TYPE_HTTP_INSPECTOR: &str = "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector";
const TYPE_PROXY_PROTOCOL: &str = "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerFilterKind {
    /// Restores the original destination (SO_ORIGINAL_DST) as the connection's local address.
    OriginalDst,
    /// Detects TLS from the ClientHello: transport `tls`, SNI, ALPN.
    TlsInspector { max_client_hello: usize, close_on_parse_error: bool },
    /// Detects HTTP/1.0, HTTP/1.1 and h2c prior knowledge as ALPN values.
    HttpInspector,
    /// Consumes a PROXY protocol v1/v2 header and takes its addresses.
    ProxyProtocol { allow_without: bool, allow_v1: bool, allow_v2: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerFilterConfig {
    pub name: String,
    pub kind: ListenerFilterKind,
    /// `filter_disabled`: the filter is skipped for connections this matches.
    pub disabled: Option<FilterPredicate>,
}

/// Envoy's `ListenerFilterChainMatchPredicate`, evaluated on the connection's (possibly restored) destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterPredicate {
    Any,
    Or(Vec<FilterPredicate>),
    And(Vec<FilterPredicate>),
    Not(Box<FilterPredicate>),
    /// Half-open `[start, end)`, as Envoy's Int32Range.
    DestinationPortRange {
        start: i32,
        end: i32,
    },
}

impl FilterPredicate {
    pub fn matches(&self, destination_port: u16) -> bool {
        match self {
            FilterPredicate::Any => true,
            FilterPredicate::Or(v) => v.iter().any(|p| p.matches(destination_port)),
            FilterPredicate::And(v) => v.iter().all(|p| p.matches(destination_port)),
            FilterPredicate::Not(p) => !p.matches(destination_port),
            FilterPredicate::DestinationPortRange { start, end } => {
                (*start..*end).contains(&i32::from(destination_port))
            }
        }
    }

    fn convert(p: &lpb::ListenerFilterChainMatchPredicate, path: &str) -> Result<Self, ConfigError> {
        use lpb::listener_filter_chain_match_predicate::Rule;
        let set = |rules: &[lpb::ListenerFilterChainMatchPredicate], field: &str| {
            rules
                .iter()
                .enumerate()
                .map(|(i, r)| FilterPredicate::convert(r, &join(path, &format!("{field}.rules[{i}]"))))
                .collect::<Result<Vec<_>, _>>()
        };
        match &p.rule {
            Some(Rule::AnyMatch(true)) => Ok(FilterPredicate::Any),
            Some(Rule::OrMatch(m)) => Ok(FilterPredicate::Or(set(&m.rules, "or_match")?)),
            Some(Rule::AndMatch(m)) => Ok(FilterPredicate::And(set(&m.rules, "and_match")?)),
            Some(Rule::NotMatch(inner)) => {
                Ok(FilterPredicate::Not(Box::new(FilterPredicate::convert(inner, &join(path, "not_match"))?)))
            }
            Some(Rule::DestinationPortRange(r)) => {
                if r.start > r.end {
                    return Err(ConfigError::new(join(path, "destination_port_range"), "start must not exceed end"));
                }
                Ok(FilterPredicate::DestinationPortRange { start: r.start, end: r.end })
            }
            Some(Rule::AnyMatch(false)) | None => Err(ConfigError::new(path, "a predicate needs a rule")),
            #[allow(unreachable_patterns)]
            Some(_) => Err(ConfigError::new(path, "this predicate rule is not supported")),
        }
    }
}

impl ListenerFilterConfig {
    fn convert(f: &lpb::ListenerFilter, path: &str) -> Result<Self, ConfigError> {
        use envoy_types::pb::envoy::extensions::filters::listener::{proxy_protocol, tls_inspector};
        use lpb::listener_filter::ConfigType;
        let (typed, discovery) = match &f.config_type {
            Some(ConfigType::TypedConfig(any)) => (Some(any), false),
            Some(ConfigType::ConfigDiscovery(_)) => (None, true),
            None => (None, false),
        };
        let any = typed_config(typed, discovery, &format!("listener filter '{}'", f.name), path)?;
        let tpath = join(path, "typed_config");
        let kind = match type_name(&any.type_url) {
            TYPE_ORIGINAL_DST => ListenerFilterKind::OriginalDst,
            TYPE_HTTP_INSPECTOR => ListenerFilterKind::HttpInspector,
            TYPE_TLS_INSPECTOR => {
                let c: tls_inspector::v3::TlsInspector = decode_any(any, &tpath)?;
                for (set, field) in [
                    (c.enable_ja3_fingerprinting.as_ref().is_some_and(|v| v.value), "enable_ja3_fingerprinting"),
                    (c.enable_ja4_fingerprinting.as_ref().is_some_and(|v| v.value), "enable_ja4_fingerprinting"),
                ] {
                    if set {
                        return Err(ConfigError::new(join(&tpath, field), "not supported"));
                    }
                }
                let max = c.max_client_hello_size.as_ref().map_or(DEFAULT_MAX_CLIENT_HELLO, |v| v.value as usize);
                ListenerFilterKind::TlsInspector {
                    max_client_hello: max.min(DEFAULT_MAX_CLIENT_HELLO),
                    close_on_parse_error: c.close_connection_on_client_hello_parsing_errors,
                }
            }
            TYPE_PROXY_PROTOCOL => {
                let c: proxy_protocol::v3::ProxyProtocol = decode_any(any, &tpath)?;
                let disallowed = |v: core::proxy_protocol_config::Version| c.disallowed_versions.contains(&(v as i32));
                ListenerFilterKind::ProxyProtocol {
                    allow_without: c.allow_requests_without_proxy_protocol,
                    allow_v1: !disallowed(core::proxy_protocol_config::Version::V1),
                    allow_v2: !disallowed(core::proxy_protocol_config::Version::V2),
                }
            }
            other => return Err(ConfigError::new(tpath, format!("listener filter '{other}' is not supported"))),
        };
        let disabled = f
            .filter_disabled
            .as_ref()
            .map(|p| FilterPredicate::convert(p, &join(path, "filter_disabled")))
            .transpose()?;
        Ok(ListenerFilterConfig { name: f.name.clone(), kind, disabled })
    }
}

/// Envoy's default (and our ceiling) for `max_client_hello_size`.
pub const DEFAULT_MAX_CLIENT_HELLO: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct FilterChainConfig {
    pub name: String,
    pub chain_match: ChainMatch,
    /// The network filters in order; the last one is terminal.
    pub filters: Vec<NetworkFilterConfig>,
    /// Names of Istio telemetry filters that were skipped (see [`skippable_filter`]).
    pub skipped: Vec<String>,
    /// TLS termination (`transport_socket` with a DownstreamTlsContext), shared by every worker.
    pub tls: Option<Arc<crate::tls::DownstreamTls>>,
    /// The listener resource this chain is part of, and where in it: the chain's proto without a copy.
    listener: Arc<lpb::Listener>,
    slot: ChainSlot,
}

/// Where a chain sits in its listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainSlot {
    Chain(usize),
    Default,
}

impl FilterChainConfig {
    /// The chain as received, for equality on update (in-place updates keep equal chains) and for dumps.
    pub fn proto(&self) -> &lpb::FilterChain {
        static EMPTY: std::sync::OnceLock<lpb::FilterChain> = std::sync::OnceLock::new();
        let found = match self.slot {
            ChainSlot::Chain(i) => self.listener.filter_chains.get(i),
            ChainSlot::Default => self.listener.default_filter_chain.as_ref(),
        };
        // `convert` only makes configs for slots that exist, so the fallback is never used.
        found.unwrap_or_else(|| EMPTY.get_or_init(lpb::FilterChain::default))
    }

    fn convert(listener: &Arc<lpb::Listener>, slot: ChainSlot, path: &str) -> Result<Self, ConfigError> {
        let fc = match slot {
            ChainSlot::Chain(i) => listener.filter_chains.get(i),
            ChainSlot::Default => listener.default_filter_chain.as_ref(),
        }
        .ok_or_else(|| ConfigError::new(path, "no such filter chain"))?;
        let chain_match = match &fc.filter_chain_match {
            Some(m) => ChainMatch::from_proto(m)
                .map_err(|e| ConfigError::new(join(&join(path, "filter_chain_match"), &e.path), e.message))?,
            None => ChainMatch::default(),
        };
        let mut tls = None;
        if let Some(ts) = &fc.transport_socket {
            let any = ts.config_type.as_ref().map(|core::transport_socket::ConfigType::TypedConfig(any)| any);
            let type_url = any.map_or("", |a| a.type_url.as_str());
            match (type_name(type_url), any) {
                (crate::tls::TYPE_DOWNSTREAM_TLS, Some(any)) => {
                    let tpath = join(path, "transport_socket.typed_config");
                    tls = Some(Arc::new(crate::tls::DownstreamTls::from_any(any, &tpath)?));
                }
                (TYPE_RAW_BUFFER, _) => {}
                ("", None) if ts.name.ends_with("raw_buffer") => {}
                (other, _) => {
                    return Err(ConfigError::new(
                        join(path, "transport_socket"),
                        format!(
                            "transport socket '{other}' is not supported (raw_buffer and DownstreamTlsContext are)"
                        ),
                    ));
                }
            }
        }
        if fc.filters.is_empty() {
            return Err(ConfigError::new(join(path, "filters"), "a filter chain needs a terminal network filter"));
        }
        let mut filters = Vec::with_capacity(1);
        let mut skipped = Vec::new();
        let last = fc.filters.len() - 1;
        for (i, f) in fc.filters.iter().enumerate() {
            let fpath = join(path, &format!("filters[{i}]"));
            if i < last && skippable_filter(f) {
                skipped.push(f.name.clone());
                continue;
            }
            if i < last {
                return Err(ConfigError::new(
                    fpath,
                    format!(
                        "network filter '{}' is not supported before the terminal filter (only Istio telemetry \
                         filters are skipped)",
                        f.name
                    ),
                ));
            }
            filters.push(NetworkFilterConfig::convert(f, &fpath)?);
        }
        Ok(FilterChainConfig {
            name: fc.name.clone(),
            chain_match,
            filters,
            skipped,
            tls,
            listener: listener.clone(),
            slot,
        })
    }

    pub fn terminal(&self) -> &NetworkFilterConfig {
        // `convert` guarantees at least one filter.
        &self.filters[self.filters.len() - 1]
    }
}

/// Istio's telemetry and peer-metadata network filters change no bytes on the wire that the proxied peers depend
/// on: metadata exchange only adds its own prelude when both sides run it, and the stats plugin only counts. They
/// are skipped (logged and counted) so Istio listeners load and carry traffic; any other non-terminal filter is
/// refused, because skipping it could change what the connection does.
pub fn skippable_filter(f: &lpb::Filter) -> bool {
    let Some(lpb::filter::ConfigType::TypedConfig(any)) = &f.config_type else { return false };
    match type_name(&any.type_url) {
        // Metadata exchange, and the native stats filter of the Istio versions that stopped using Wasm for it.
        ISTIO_MX | ISTIO_STATS => true,
        "udpa.type.v1.TypedStruct" | "xds.type.v3.TypedStruct" => IstioFilter::of(any).is_some_and(|f| {
            // Newer istiod wraps metadata exchange in a TypedStruct.
            f.typed_struct_type().is_some_and(|t| type_name(t) == ISTIO_MX) || f.is_null_vm_plugin()
        }),
        "envoy.extensions.filters.network.wasm.v3.Wasm" => IstioFilter::of(any).is_some_and(|f| f.is_null_vm_plugin()),
        _ => false,
    }
}

/// Istio's TCP metadata exchange filter config.
const ISTIO_MX: &str = "envoy.tcp.metadataexchange.config.MetadataExchange";
/// Istio's native stats filter config (network and HTTP).
pub(crate) const ISTIO_STATS: &str = "stats.PluginConfig";

/// A TypedStruct's or Wasm filter's config as JSON, converted once for the checks that tell Istio's telemetry
/// filters apart.
pub(crate) struct IstioFilter(serde_json::Value);

impl IstioFilter {
    pub(crate) fn of(any: &Any) -> Option<IstioFilter> {
        super::proto::to_json_value(any, "google.protobuf.Any").ok().map(IstioFilter)
    }

    /// The type a TypedStruct says its contents are (`type_url`).
    pub(crate) fn typed_struct_type(&self) -> Option<&str> {
        self.0.get("type_url").or_else(|| self.0.get("typeUrl"))?.as_str()
    }

    /// A Wasm filter running one of Istio's built-in (null VM) telemetry plugins.
    pub(crate) fn is_null_vm_plugin(&self) -> bool {
        // A TypedStruct carries the Wasm config under `value` with the user's spelling; a Wasm Any has it at the
        // top.
        let wasm = self.0.get("value").unwrap_or(&self.0);
        let field = |v: &serde_json::Value, snake: &str, camel: &str| v.get(snake).or_else(|| v.get(camel)).cloned();
        let vm = wasm.get("config").and_then(|c| field(c, "vm_config", "vmConfig"));
        let Some(vm) = vm else { return false };
        let runtime = vm.get("runtime").and_then(|r| r.as_str().map(str::to_owned));
        let code = vm
            .get("code")
            .and_then(|c| c.get("local"))
            .and_then(|l| field(l, "inline_string", "inlineString"))
            .and_then(|s| s.as_str().map(str::to_owned));
        runtime.as_deref() == Some("envoy.wasm.runtime.null")
            && matches!(code.as_deref(), Some("envoy.wasm.stats" | "envoy.wasm.metadata_exchange"))
    }
}

#[derive(Debug, Clone)]
pub enum NetworkFilterConfig {
    TcpProxy(TcpProxyConfig),
    HttpConnectionManager(Box<super::http::HcmConfig>),
    /// `envoy.filters.network.direct_response`: write these bytes, then close.
    DirectResponse(Vec<u8>),
}

impl NetworkFilterConfig {
    fn convert(f: &lpb::Filter, path: &str) -> Result<Self, ConfigError> {
        use lpb::filter::ConfigType;
        let (typed, discovery) = match &f.config_type {
            Some(ConfigType::TypedConfig(any)) => (Some(any), false),
            Some(ConfigType::ConfigDiscovery(_)) => (None, true),
            None => (None, false),
        };
        let any = typed_config(typed, discovery, &format!("filter '{}'", f.name), path)?;
        let path = join(path, "typed_config");
        match type_name(&any.type_url) {
            TYPE_TCP_PROXY => {
                Ok(NetworkFilterConfig::TcpProxy(TcpProxyConfig::convert(&decode_any(any, &path)?, &path)?))
            }
            t if super::http::is_hcm(t) => {
                Ok(NetworkFilterConfig::HttpConnectionManager(Box::new(super::http::HcmConfig::from_any(any, &path)?)))
            }
            TYPE_DIRECT_RESPONSE => {
                let c: direct_response::Config = decode_any(any, &path)?;
                Ok(NetworkFilterConfig::DirectResponse(data_source(c.response.as_ref(), &join(&path, "response"))?))
            }
            other => Err(ConfigError::new(path, format!("network filter '{other}' is not supported"))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TcpProxyConfig {
    pub stat_prefix: String,
    /// One cluster, or several with weights (tcp_proxy's `weighted_clusters`).
    pub clusters: Vec<(String, u32)>,
    /// None when disabled (`idle_timeout: 0s`).
    pub idle_timeout: Option<Duration>,
    /// `max_downstream_connection_duration` (Istio's connectionPool.tcp.maxConnectionDuration): the connection is
    /// closed this long after it began; None when unset or 0.
    pub max_downstream_connection_duration: Option<Duration>,
    pub max_connect_attempts: u32,
    pub access_log: Vec<crate::access_log::AccessLog>,
    /// `hash_policy: [{ source_ip: {} }]`: a RING_HASH cluster hashes the downstream address.
    pub hash_source_ip: bool,
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
        let mut hash_source_ip = false;
        for (i, h) in t.hash_policy.iter().enumerate() {
            use envoy_types::pb::envoy::r#type::v3::hash_policy::PolicySpecifier;
            match &h.policy_specifier {
                Some(PolicySpecifier::SourceIp(_)) => hash_source_ip = true,
                _ => {
                    return Err(ConfigError::new(
                        join(path, &format!("hash_policy[{i}]")),
                        "only source_ip hashing is supported",
                    ));
                }
            }
        }
        Ok(TcpProxyConfig {
            stat_prefix: t.stat_prefix.clone(),
            clusters,
            idle_timeout: (!idle.is_zero()).then_some(idle),
            max_downstream_connection_duration: Some(opt_duration(
                t.max_downstream_connection_duration.as_ref(),
                Duration::ZERO,
                &join(path, "max_downstream_connection_duration"),
            )?)
            .filter(|d| !d.is_zero()),
            max_connect_attempts: attempts,
            hash_source_ip,
            access_log: super::access_log::access_logs(&t.access_log, &join(path, "access_log"))?,
        })
    }
}

/// A filter's `typed_config`; filter config discovery (ECDS) is refused rather than ignored.
fn typed_config<'a>(typed: Option<&'a Any>, discovery: bool, what: &str, path: &str) -> Result<&'a Any, ConfigError> {
    match typed {
        Some(any) => Ok(any),
        None if discovery => {
            Err(ConfigError::new(join(path, "config_discovery"), "filter config discovery is not supported"))
        }
        None => Err(ConfigError::new(join(path, "typed_config"), format!("{what} needs a typed_config"))),
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
                listener(
                    "",
                    &format!("[ {{ filter_chain_match: {{ server_names: [\"a.*.com\"] }}, filters: [ {TCP} ] }} ]"),
                ),
                "filter_chains[0].filter_chain_match.server_names[0]: partial wildcards are not supported",
            ),
            (
                listener("", &format!("[ {{ name: a, filters: [ {TCP} ] }}, {{ name: b, filters: [ {TCP} ] }} ]")),
                "filter_chains[1]: multiple filter chains with the same matching rules are defined",
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
                "filter_chains[0].filters[0]: network filter 'envoy.filters.network.tcp_proxy' is not supported before the terminal filter",
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
