//! Validated cluster configuration: Envoy's `Cluster` and `ClusterLoadAssignment`, converted from the proto with
//! every error naming its field path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as epb;

use tracing::warn;

use super::listener::DEFAULT_BUFFER_LIMIT;
use super::{ConfigError, audit_resource, join, opt_duration, port_value, socket_address};

/// Envoy's default `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default `dns_refresh_rate`.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_millis(5000);
/// Envoy's default circuit breaker `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterKind {
    Static,
    StrictDns,
    LogicalDns,
    /// Endpoints arrive over EDS for this service name.
    Eds {
        service_name: String,
    },
    /// Connects to the downstream connection's original destination (Istio's PassthroughCluster).
    OriginalDst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
    Random,
    /// ORIGINAL_DST clusters pick their host themselves.
    ClusterProvided,
    /// Consistent hashing on a ring of at least `min` and at most `max` points (`ring_hash_lb_config`).
    RingHash {
        min: u64,
        max: u64,
    },
    /// Consistent hashing on a Maglev table of `table_size` slots (`maglev_lb_config`).
    Maglev {
        table_size: u64,
    },
}

/// The tuning of the ROUND_ROBIN and LEAST_REQUEST balancers (`round_robin_lb_config`, `least_request_lb_config`),
/// with Envoy's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Balancing {
    /// LEAST_REQUEST over equally weighted hosts: this many are drawn per pick and the least busy wins.
    pub choice_count: u32,
    /// LEAST_REQUEST over unequal weights: a host weighs weight / (active requests + 1)^bias.
    pub active_request_bias: f64,
    pub slow_start: Option<SlowStart>,
}

impl Default for Balancing {
    fn default() -> Self {
        Balancing { choice_count: 2, active_request_bias: 1.0, slow_start: None }
    }
}

/// Envoy's slow start: for `window` after a host joins the cluster its weight is scaled by
/// max(min_weight, time_factor^(1/aggression)), time_factor = max(time in the cluster, 1 ms) / window (Envoy's
/// code; its docs say 1 s).
#[derive(Debug, Clone, PartialEq)]
pub struct SlowStart {
    pub window: Duration,
    pub aggression: f64,
    /// A fraction (Envoy's `min_weight_percent` / 100, default 10%).
    pub min_weight: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsFamily {
    /// Envoy's AUTO: IPv6 if any, else IPv4.
    Auto,
    V4Only,
    V6Only,
    V4Preferred,
    All,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddress {
    Ip(SocketAddr),
    /// Resolved by STRICT_DNS / LOGICAL_DNS clusters.
    Dns {
        host: String,
        port: u16,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    pub address: EndpointAddress,
    pub weight: u32,
    pub priority: u32,
    /// False for hosts EDS marks UNHEALTHY, DRAINING or TIMEOUT: they receive traffic only in panic mode.
    pub healthy: bool,
    pub hostname: String,
    /// The endpoint's `envoy.transport_socket_match` metadata, else its locality's: what `transport_socket_matches`
    /// test (sorted keys, canonical values).
    pub socket_labels: Option<Arc<[(String, String)]>>,
    /// The locality's `load_balancing_weight`, and the sum of its endpoints' weights: what locality-weighted load
    /// balancing needs.
    pub locality_weight: Option<u32>,
    pub locality_total: u32,
}

impl EndpointConfig {
    /// The weight the load balancer gives this endpoint. With `locality_weighted_lb_config`, Envoy first picks a
    /// locality by its weight, then a host inside it by host weight; scaling each host's weight by its locality's
    /// share gives every host the same probability in one flat pick. A locality without a weight then gets no
    /// traffic (0), as in Envoy.
    pub fn lb_weight(&self, locality_weighted: bool) -> u32 {
        if !locality_weighted {
            return self.weight;
        }
        match self.locality_weight {
            None | Some(0) => 0,
            Some(lw) => {
                let w = u64::from(self.weight) * u64::from(lw) * 1024 / u64::from(self.locality_total.max(1));
                u32::try_from(w.max(1)).unwrap_or(u32::MAX)
            }
        }
    }
}

/// The metadata namespace `transport_socket_matches` criteria are tested against.
const SOCKET_MATCH_KEY: &str = "envoy.transport_socket_match";

/// One entry of a cluster's `transport_socket_matches`: endpoints whose labels carry every criterion use `tls`
/// (None: plaintext, a raw_buffer socket).
#[derive(Debug, Clone)]
pub struct TransportSocketMatch {
    pub name: String,
    pub criteria: Vec<(String, String)>,
    pub tls: Option<Arc<crate::tls::UpstreamTls>>,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub name: String,
    pub kind: ClusterKind,
    pub connect_timeout: Duration,
    pub lb_policy: LbPolicy,
    pub endpoints: Vec<EndpointConfig>,
    pub dns_refresh_rate: Duration,
    /// `dns_jitter`: up to this much (drawn anew each time) is added to every DNS refresh interval.
    pub dns_jitter: Duration,
    pub dns_family: DnsFamily,
    pub max_connections: u32,
    pub per_connection_buffer_limit_bytes: u32,
    /// `alt_stat_name`, else the name: the `cluster.<stat_name>.*` prefix.
    pub stat_name: String,
    pub http: HttpUpstream,
    /// TLS to the hosts (`transport_socket` with an UpstreamTlsContext) unless a transport socket match says
    /// otherwise.
    pub tls: Option<Arc<crate::tls::UpstreamTls>>,
    pub transport_socket_matches: Vec<TransportSocketMatch>,
    /// The Unix socket of a STATIC cluster whose one endpoint is a `pipe` address. Such a cluster serves gRPC config
    /// sources only (Istio's `sds-grpc`); it has no hosts for tcp_proxy or HTTP.
    pub pipe: Option<std::path::PathBuf>,
    /// `upstream_connection_options.tcp_keepalive`: TCP keepalive on every upstream connection (unset parts keep
    /// the system's values, as in Envoy).
    pub tcp_keepalive: Option<socket2::TcpKeepalive>,
    /// `upstream_bind_config.source_address`: the local address upstream connections are made from (Istio's
    /// inbound passthrough binds 127.0.0.6 so its own iptables rules let the connection through).
    pub source_address: Option<SocketAddr>,
    /// Istio's upstream metadata-exchange filters, skipped as on listeners (see
    /// [`crate::config::listener::skippable_filter`]).
    pub skipped_filters: Vec<String>,
    /// `common_lb_config.locality_weighted_lb_config`: see [`EndpointConfig::lb_weight`].
    pub locality_weighted: bool,
    /// `outlier_detection`: ejection of hosts that fail more than the others (see [`OutlierConfig`]).
    pub outlier: Option<OutlierConfig>,
    /// `common_lb_config.healthy_panic_threshold`, a percentage (see [`panic_threshold`]).
    pub healthy_panic_threshold: f64,
    pub balancing: Balancing,
    pub proto: Arc<cpb::Cluster>,
}

impl ClusterConfig {
    /// The transport socket for a host with these labels: the first `transport_socket_matches` entry whose every
    /// criterion the labels carry (an empty match takes any host), else the cluster's `transport_socket` (Envoy's
    /// rule; Istio labels mTLS-capable endpoints `tlsMode: istio`).
    pub fn tls_for(&self, labels: Option<&[(String, String)]>) -> Option<&Arc<crate::tls::UpstreamTls>> {
        let labels = labels.unwrap_or_default();
        self.transport_socket_matches
            .iter()
            .find(|m| m.criteria.iter().all(|c| labels.contains(c)))
            .map_or(self.tls.as_ref(), |m| m.tls.as_ref())
    }

    /// Every TLS context the cluster may use (its own and its transport socket matches'), for secret binding and
    /// warming.
    pub fn tls_contexts(&self) -> impl Iterator<Item = &Arc<crate::tls::UpstreamTls>> {
        self.tls.iter().chain(self.transport_socket_matches.iter().filter_map(|m| m.tls.as_ref()))
    }
}

/// `ring_hash_lb_config`, with Envoy's defaults (1,024 and 8M points) and limits.
fn ring_hash(c: &cpb::Cluster) -> Result<LbPolicy, ConfigError> {
    use cpb::cluster::LbConfig;
    use cpb::cluster::ring_hash_lb_config::HashFunction;
    const MAX: u64 = 8 * 1024 * 1024;
    let config = match &c.lb_config {
        Some(LbConfig::RingHashLbConfig(r)) => Some(r),
        Some(_) => return Err(ConfigError::new("lb_config", "only ring_hash_lb_config goes with RING_HASH")),
        None => None,
    };
    let min = config.and_then(|r| r.minimum_ring_size.as_ref()).map_or(1024, |v| v.value);
    let max = config.and_then(|r| r.maximum_ring_size.as_ref()).map_or(MAX, |v| v.value);
    if max > MAX {
        return Err(ConfigError::new("ring_hash_lb_config.maximum_ring_size", "must be at most 8388608"));
    }
    if min == 0 || min > max {
        return Err(ConfigError::new(
            "ring_hash_lb_config.minimum_ring_size",
            format!("must be at least 1 and at most maximum_ring_size ({max})"),
        ));
    }
    if config.is_some_and(|r| r.hash_function != HashFunction::XxHash as i32) {
        return Err(ConfigError::new("ring_hash_lb_config.hash_function", "only XX_HASH is supported"));
    }
    Ok(LbPolicy::RingHash { min, max })
}

/// `maglev_lb_config`: Envoy's default table of 65,537 slots; the size must be a prime (at most 5,000,011).
fn maglev(c: &cpb::Cluster) -> Result<LbPolicy, ConfigError> {
    use cpb::cluster::LbConfig;
    let table_size = match &c.lb_config {
        Some(LbConfig::MaglevLbConfig(m)) => m.table_size.as_ref().map_or(65537, |v| v.value),
        Some(_) => return Err(ConfigError::new("lb_config", "only maglev_lb_config goes with MAGLEV")),
        None => 65537,
    };
    let prime = table_size >= 2 && (2..).take_while(|d| d * d <= table_size).all(|d| table_size % d != 0);
    if !prime || table_size > 5_000_011 {
        return Err(ConfigError::new("maglev_lb_config.table_size", "must be a prime of at most 5000011"));
    }
    Ok(LbPolicy::Maglev { table_size })
}

/// Envoy's outlier detection, every detector of `envoy.config.cluster.v3.OutlierDetection` with Envoy's defaults:
/// consecutive 5xx, consecutive gateway failures and (with `split_external_local_origin_errors`) consecutive
/// local-origin failures, counted as results arrive; success rate and failure percentage over each `interval`.
/// Percentages are whole percents (0–100), as in the proto.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// How often the sweep runs: hosts back to service, success rate and failure percentage, backoff decay.
    pub interval: Duration,
    /// Ejection lasts this times the host's backoff (which grows with each ejection and decays while it is healthy),
    /// up to `max_ejection_time`, plus a random jitter up to `max_ejection_time_jitter`.
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_time_jitter: Duration,
    pub max_ejection_percent: u32,
    /// Eject one host even when that alone exceeds `max_ejection_percent` (Envoy's default is false).
    pub always_eject_one_host: bool,
    /// Count connect failures, resets and timeouts apart from the hosts' own answers.
    pub split_external_local_origin_errors: bool,
    pub consecutive_5xx: u32,
    pub enforcing_consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub consecutive_local_origin_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    pub success_rate_minimum_hosts: u32,
    pub success_rate_request_volume: u32,
    /// Hosts below mean − factor/1000 × stdev of the cluster's success rates are outliers.
    pub success_rate_stdev_factor: u32,
    pub enforcing_success_rate: u32,
    pub enforcing_local_origin_success_rate: u32,
    pub failure_percentage_threshold: u32,
    pub failure_percentage_minimum_hosts: u32,
    pub failure_percentage_request_volume: u32,
    pub enforcing_failure_percentage: u32,
    pub enforcing_failure_percentage_local_origin: u32,
}

fn outlier(c: &cpb::Cluster) -> Result<Option<OutlierConfig>, ConfigError> {
    let Some(o) = &c.outlier_detection else { return Ok(None) };
    let at = |f: &str| join("outlier_detection", f);
    if !o.monitors.is_empty() {
        return Err(ConfigError::new(at("monitors"), "not supported (outlier detection extensions)"));
    }
    let count = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, default: u32| {
        v.as_ref().map_or(default, |v| v.value)
    };
    let percent = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, default: u32, field: &str| {
        let v = count(v, default);
        if v > 100 { Err(ConfigError::new(at(field), "must be at most 100")) } else { Ok(v) }
    };
    let interval = opt_duration(o.interval.as_ref(), Duration::from_secs(10), &at("interval"))?;
    if interval.is_zero() {
        return Err(ConfigError::new(at("interval"), "must be greater than 0"));
    }
    let base_ejection_time =
        opt_duration(o.base_ejection_time.as_ref(), Duration::from_secs(30), &at("base_ejection_time"))?;
    // Envoy: the default ceiling is 300 s, or the base time if that is longer; a smaller ceiling is an error.
    let max_ejection_time = opt_duration(
        o.max_ejection_time.as_ref(),
        base_ejection_time.max(Duration::from_secs(300)),
        &at("max_ejection_time"),
    )?;
    if max_ejection_time < base_ejection_time {
        return Err(ConfigError::new(at("max_ejection_time"), "cannot be smaller than base_ejection_time"));
    }
    Ok(Some(OutlierConfig {
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_time_jitter: opt_duration(
            o.max_ejection_time_jitter.as_ref(),
            Duration::ZERO,
            &at("max_ejection_time_jitter"),
        )?,
        max_ejection_percent: percent(&o.max_ejection_percent, 10, "max_ejection_percent")?,
        always_eject_one_host: o.always_eject_one_host.as_ref().is_some_and(|v| v.value),
        split_external_local_origin_errors: o.split_external_local_origin_errors,
        consecutive_5xx: count(&o.consecutive_5xx, 5),
        enforcing_consecutive_5xx: percent(&o.enforcing_consecutive_5xx, 100, "enforcing_consecutive_5xx")?,
        consecutive_gateway_failure: count(&o.consecutive_gateway_failure, 5),
        enforcing_consecutive_gateway_failure: percent(
            &o.enforcing_consecutive_gateway_failure,
            0,
            "enforcing_consecutive_gateway_failure",
        )?,
        consecutive_local_origin_failure: count(&o.consecutive_local_origin_failure, 5),
        enforcing_consecutive_local_origin_failure: percent(
            &o.enforcing_consecutive_local_origin_failure,
            100,
            "enforcing_consecutive_local_origin_failure",
        )?,
        success_rate_minimum_hosts: count(&o.success_rate_minimum_hosts, 5),
        success_rate_request_volume: count(&o.success_rate_request_volume, 100),
        success_rate_stdev_factor: count(&o.success_rate_stdev_factor, 1900),
        enforcing_success_rate: percent(&o.enforcing_success_rate, 100, "enforcing_success_rate")?,
        enforcing_local_origin_success_rate: percent(
            &o.enforcing_local_origin_success_rate,
            100,
            "enforcing_local_origin_success_rate",
        )?,
        failure_percentage_threshold: percent(&o.failure_percentage_threshold, 85, "failure_percentage_threshold")?,
        failure_percentage_minimum_hosts: count(&o.failure_percentage_minimum_hosts, 5),
        failure_percentage_request_volume: count(&o.failure_percentage_request_volume, 50),
        enforcing_failure_percentage: percent(&o.enforcing_failure_percentage, 0, "enforcing_failure_percentage")?,
        enforcing_failure_percentage_local_origin: percent(
            &o.enforcing_failure_percentage_local_origin,
            0,
            "enforcing_failure_percentage_local_origin",
        )?,
    }))
}

/// `round_robin_lb_config` and `least_request_lb_config`, each only with its own policy. A `RuntimeDouble`'s runtime
/// key names an override in a runtime this proxy does not have, so its default value applies.
fn balancing(c: &cpb::Cluster, policy: LbPolicy) -> Result<Balancing, ConfigError> {
    use cpb::cluster::LbConfig;
    let mut out = Balancing::default();
    let slow = match (&c.lb_config, policy) {
        (Some(LbConfig::RoundRobinLbConfig(rr)), LbPolicy::RoundRobin) => {
            slow_start(rr.slow_start_config.as_ref(), "round_robin_lb_config.slow_start_config")?
        }
        (Some(LbConfig::RoundRobinLbConfig(_)), _) => {
            return Err(ConfigError::new("round_robin_lb_config", "only goes with lb_policy ROUND_ROBIN"));
        }
        (Some(LbConfig::LeastRequestLbConfig(lr)), LbPolicy::LeastRequest) => {
            let at = |f: &str| join("least_request_lb_config", f);
            if let Some(n) = &lr.choice_count {
                if n.value < 2 {
                    return Err(ConfigError::new(at("choice_count"), "must be at least 2"));
                }
                out.choice_count = n.value;
            }
            if let Some(bias) = &lr.active_request_bias {
                if !(bias.default_value >= 0.0 && bias.default_value.is_finite()) {
                    return Err(ConfigError::new(at("active_request_bias"), "must be a finite value of at least 0"));
                }
                out.active_request_bias = bias.default_value;
            }
            slow_start(lr.slow_start_config.as_ref(), &at("slow_start_config"))?
        }
        (Some(LbConfig::LeastRequestLbConfig(_)), _) => {
            return Err(ConfigError::new("least_request_lb_config", "only goes with lb_policy LEAST_REQUEST"));
        }
        _ => None,
    };
    out.slow_start = slow;
    Ok(out)
}

fn slow_start(s: Option<&cpb::cluster::SlowStartConfig>, at: &str) -> Result<Option<SlowStart>, ConfigError> {
    let Some(s) = s else { return Ok(None) };
    let window = opt_duration(s.slow_start_window.as_ref(), Duration::ZERO, &join(at, "slow_start_window"))?;
    let aggression = s.aggression.as_ref().map_or(1.0, |a| a.default_value);
    if !(aggression > 0.0 && aggression.is_finite()) {
        return Err(ConfigError::new(join(at, "aggression"), "must be greater than 0"));
    }
    let min = s.min_weight_percent.as_ref().map_or(10.0, |p| p.value);
    if !(0.0..=100.0).contains(&min) {
        return Err(ConfigError::new(join(at, "min_weight_percent"), "must be between 0 and 100"));
    }
    // A zero window is no slow start at all.
    Ok((!window.is_zero()).then_some(SlowStart { window, aggression, min_weight: min / 100.0 }))
}

/// `common_lb_config.healthy_panic_threshold`: below this percentage of hosts in service, the load balancer ignores
/// outlier ejections and balances over every host (Envoy's panic mode); 0 turns panic mode off. Default 50.
fn panic_threshold(c: &cpb::Cluster) -> Result<f64, ConfigError> {
    let Some(p) = c.common_lb_config.as_ref().and_then(|l| l.healthy_panic_threshold.as_ref()) else {
        return Ok(50.0);
    };
    if !(0.0..=100.0).contains(&p.value) {
        return Err(ConfigError::new("common_lb_config.healthy_panic_threshold.value", "must be between 0 and 100"));
    }
    Ok(p.value)
}

/// How HTTP requests go to this cluster's hosts: the cluster's `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`
/// and the request circuit breakers (Envoy's defaults when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUpstream {
    pub protocol: UpstreamProtocol,
    pub max_requests_per_connection: Option<u32>,
    /// How long an unused pooled connection is kept (`common_http_protocol_options.idle_timeout`, default 1 h).
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_connection_duration`: a connection this old takes no new request and
    /// closes once its exchanges end.
    pub max_connection_duration: Option<Duration>,
    /// `common_http_protocol_options.max_stream_duration`: how long one upstream request may last, its response
    /// included (an internal request's `x-envoy-upstream-stream-duration-ms` replaces it).
    pub max_stream_duration: Option<Duration>,
    pub max_requests: u32,
    pub max_pending_requests: u32,
    /// Retries outstanding at once across the cluster (Envoy's default 3), not a per-request cap.
    pub max_retries: u32,
    /// `track_remaining` on the default thresholds: publish `circuit_breakers.default.remaining_*`.
    pub track_remaining: bool,
    /// HTTP/2's `max_concurrent_streams` (Istio's `http.maxConcurrentStreams`): streams per upstream connection
    /// before the pool opens another; None at Envoy's default (2^31 - 1) or above 2^30, as Istio sends it unset.
    pub max_concurrent_streams: Option<u32>,
    /// `upstream_http_protocol_options.auto_sni`: a new TLS connection's SNI is the request's host (Some(None)) or
    /// this header's value (`override_auto_sni_header`); connections are pooled by that name.
    pub auto_sni: Option<Option<http::HeaderName>>,
    /// `upstream_http_protocol_options.auto_san_validation`: the certificate must carry that name as a DNS SAN.
    pub auto_san_validation: bool,
}

impl Default for HttpUpstream {
    fn default() -> Self {
        HttpUpstream {
            protocol: UpstreamProtocol::Http1,
            max_requests_per_connection: None,
            idle_timeout: Some(Duration::from_secs(3600)),
            max_connection_duration: None,
            max_stream_duration: None,
            max_requests: 1024,
            max_pending_requests: 1024,
            max_retries: 3,
            track_remaining: false,
            max_concurrent_streams: None,
            auto_sni: None,
            auto_san_validation: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// `use_downstream_protocol_config`: the downstream request's protocol.
    Downstream,
}

/// The cluster's `typed_dns_resolver_config`. Names are resolved by the system resolver (getaddrinfo), not c-ares:
/// the c-ares config Istio sends with only `udp_max_queries` (a cap on queries per c-ares UDP socket, a c-ares
/// tuning knob with no counterpart there) is accepted with a warning, like `respect_dns_ttl`; anything that would
/// change which servers answer or how (custom resolvers, search domains, TCP, timeouts) is refused.
fn dns_resolver(r: &core::TypedExtensionConfig, cluster: &str) -> Result<(), ConfigError> {
    use envoy_types::pb::envoy::extensions::network::dns_resolver::cares::v3::CaresDnsResolverConfig;
    const CARES: &str = "envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig";
    let path = "typed_dns_resolver_config.typed_config";
    let Some(any) = &r.typed_config else {
        return Err(ConfigError::new("typed_dns_resolver_config", "a typed_config is required"));
    };
    if crate::config::listener::type_name(&any.type_url) != CARES {
        return Err(ConfigError::new(path, format!("DNS resolver {} is not supported", any.type_url)));
    }
    let c: CaresDnsResolverConfig = crate::config::listener::decode_any(any, path)?;
    let honoured_only_udp_max_queries = CaresDnsResolverConfig { udp_max_queries: None, ..c.clone() };
    if honoured_only_udp_max_queries != CaresDnsResolverConfig::default() {
        return Err(ConfigError::new(
            path,
            "only udp_max_queries is accepted (names are resolved by the system resolver, not c-ares)",
        ));
    }
    if c.udp_max_queries.is_some() {
        warn!(cluster, "typed_dns_resolver_config: udp_max_queries is a c-ares setting; the system resolver is used");
    }
    Ok(())
}

fn upstream_tls(
    ts: Option<&core::TransportSocket>,
    http: &HttpUpstream,
    path: &str,
) -> Result<Option<Arc<crate::tls::UpstreamTls>>, ConfigError> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    let Some(ts) = ts else { return Ok(None) };
    let Some(ConfigType::TypedConfig(any)) = &ts.config_type else { return Ok(None) };
    match crate::config::listener::type_name(&any.type_url) {
        crate::tls::TYPE_UPSTREAM_TLS => {
            let alpn: &[&str] = if http.protocol == UpstreamProtocol::Http2 { &["h2"] } else { &[] };
            Ok(Some(Arc::new(crate::tls::UpstreamTls::from_any(
                any,
                &join(path, "typed_config"),
                alpn,
                http.auto_san_validation,
            )?)))
        }
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" => Ok(None),
        other => Err(ConfigError::new(path, format!("transport socket '{other}' is not supported"))),
    }
}

fn transport_socket_matches(c: &cpb::Cluster, http: &HttpUpstream) -> Result<Vec<TransportSocketMatch>, ConfigError> {
    let mut out = Vec::new();
    for (i, m) in c.transport_socket_matches.iter().enumerate() {
        let path = format!("transport_socket_matches[{i}]");
        let criteria = m.r#match.as_ref().map(struct_labels).unwrap_or_default();
        let tls = upstream_tls(m.transport_socket.as_ref(), http, &join(&path, "transport_socket"))?;
        out.push(TransportSocketMatch { name: m.name.clone(), criteria: criteria.to_vec(), tls });
    }
    Ok(out)
}

/// The cluster's upstream network `filters`: Istio's telemetry ones are skipped with a warning, like on listeners;
/// anything else would act on the bytes and is refused.
fn upstream_filters(c: &cpb::Cluster) -> Result<Vec<String>, ConfigError> {
    let mut skipped = Vec::new();
    for (i, f) in c.filters.iter().enumerate() {
        let as_listener_filter = envoy_types::pb::envoy::config::listener::v3::Filter {
            name: f.name.clone(),
            config_type: f
                .typed_config
                .clone()
                .map(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig),
        };
        if !crate::config::listener::skippable_filter(&as_listener_filter) {
            return Err(ConfigError::new(
                format!("filters[{i}]"),
                format!(
                    "upstream network filter '{}' is not supported (only Istio telemetry filters are skipped)",
                    f.name
                ),
            ));
        }
        warn!(cluster = %c.name, filter = %f.name, "skipping Istio telemetry upstream filter");
        skipped.push(f.name.clone());
    }
    Ok(skipped)
}

/// A metadata struct as sorted (key, canonical value) pairs; values of different kinds never compare equal.
fn struct_labels(s: &envoy_types::pb::google::protobuf::Struct) -> Arc<[(String, String)]> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let mut labels: Vec<(String, String)> = s
        .fields
        .iter()
        .map(|(k, v)| {
            let canonical = match &v.kind {
                Some(Kind::StringValue(s)) => format!("s:{s}"),
                Some(Kind::NumberValue(n)) => format!("n:{n}"),
                Some(Kind::BoolValue(b)) => format!("b:{b}"),
                Some(Kind::NullValue(_)) | None => "null".to_string(),
                Some(other) => format!("{other:?}"),
            };
            (k.clone(), canonical)
        })
        .collect();
    labels.sort();
    labels.into()
}

fn socket_labels(m: Option<&core::Metadata>) -> Option<Arc<[(String, String)]>> {
    m.and_then(|m| m.filter_metadata.get(SOCKET_MATCH_KEY)).map(struct_labels)
}

const TYPE_HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

fn http_upstream(c: &cpb::Cluster) -> Result<HttpUpstream, ConfigError> {
    use envoy_types::pb::envoy::extensions::upstreams::http::v3 as up;
    use up::http_protocol_options::UpstreamProtocolOptions as P;
    use up::http_protocol_options::explicit_http_config::ProtocolConfig as E;
    let mut out = HttpUpstream::default();
    if let Some(t) = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == core::RoutingPriority::Default as i32))
    {
        out.max_requests = t.max_requests.as_ref().map_or(out.max_requests, |v| v.value);
        out.max_pending_requests = t.max_pending_requests.as_ref().map_or(out.max_pending_requests, |v| v.value);
        out.max_retries = t.max_retries.as_ref().map_or(out.max_retries, |v| v.value);
        out.track_remaining = t.track_remaining;
    }
    // The cluster-level field Envoy deprecated in favour of the protocol options below, which override it.
    #[allow(deprecated)]
    let legacy = c.max_requests_per_connection.as_ref();
    out.max_requests_per_connection = legacy.map(|v| v.value).filter(|v| *v > 0);
    for (key, any) in &c.typed_extension_protocol_options {
        let path = format!("typed_extension_protocol_options[\"{key}\"]");
        if crate::config::listener::type_name(&any.type_url) != TYPE_HTTP_PROTOCOL_OPTIONS {
            return Err(ConfigError::new(path, format!("protocol options {} are not supported", any.type_url)));
        }
        let o: up::HttpProtocolOptions = crate::config::listener::decode_any(any, &path)?;
        if let Some(common) = &o.common_http_protocol_options {
            out.idle_timeout = match &common.idle_timeout {
                Some(d) => {
                    let d = super::duration(d, &join(&path, "common_http_protocol_options.idle_timeout"))?;
                    (!d.is_zero()).then_some(d)
                }
                None => out.idle_timeout,
            };
            if let Some(v) = &common.max_requests_per_connection {
                out.max_requests_per_connection = Some(v.value).filter(|v| *v > 0);
            }
            if let Some(d) = &common.max_connection_duration {
                let d = super::duration(d, &join(&path, "common_http_protocol_options.max_connection_duration"))?;
                out.max_connection_duration = (!d.is_zero()).then_some(d);
            }
            if let Some(d) = &common.max_stream_duration {
                let d = super::duration(d, &join(&path, "common_http_protocol_options.max_stream_duration"))?;
                out.max_stream_duration = (!d.is_zero()).then_some(d);
            }
        }
        if let Some(u) = &o.upstream_http_protocol_options {
            let upath = join(&path, "upstream_http_protocol_options");
            if u.auto_sni {
                out.auto_sni = Some(match u.override_auto_sni_header.as_str() {
                    "" => None,
                    h => Some(http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                        ConfigError::new(join(&upath, "override_auto_sni_header"), "not a valid header name")
                    })?),
                });
            } else if !u.override_auto_sni_header.is_empty() {
                return Err(ConfigError::new(join(&upath, "override_auto_sni_header"), "needs auto_sni"));
            }
            if u.auto_san_validation && !u.auto_sni {
                return Err(ConfigError::new(
                    join(&upath, "auto_san_validation"),
                    "auto_san_validation without auto_sni is not supported",
                ));
            }
            out.auto_san_validation = u.auto_san_validation;
        }
        // Istio sends 2^30: our upstream HTTP/2 connections open as many streams as the server's SETTINGS allow,
        // one connection per host, so only a cap at least that high is what we do.
        let h2 = match &o.upstream_protocol_options {
            Some(P::ExplicitHttpConfig(e)) => match &e.protocol_config {
                Some(E::Http2ProtocolOptions(h2)) => Some(("explicit_http_config", h2)),
                _ => None,
            },
            Some(P::UseDownstreamProtocolConfig(d)) => {
                d.http2_protocol_options.as_ref().map(|h2| ("use_downstream_protocol_config", h2))
            }
            Some(P::AutoConfig(a)) => a.http2_protocol_options.as_ref().map(|h2| ("auto_config", h2)),
            None => None,
        };
        if let Some((at, h2)) = h2
            && let Some(max) = &h2.max_concurrent_streams
        {
            if max.value == 0 {
                return Err(ConfigError::new(
                    join(&path, &format!("{at}.http2_protocol_options.max_concurrent_streams")),
                    "must be at least 1",
                ));
            }
            out.max_concurrent_streams = (max.value < 1 << 30).then_some(max.value);
        }
        out.protocol = match &o.upstream_protocol_options {
            Some(P::ExplicitHttpConfig(e)) => match &e.protocol_config {
                Some(E::Http2ProtocolOptions(_)) => UpstreamProtocol::Http2,
                Some(E::HttpProtocolOptions(_)) | None => UpstreamProtocol::Http1,
                Some(E::Http3ProtocolOptions(_)) => {
                    return Err(ConfigError::new(
                        join(&path, "explicit_http_config.http3_protocol_options"),
                        "HTTP/3 upstreams are not supported",
                    ));
                }
            },
            Some(P::UseDownstreamProtocolConfig(_)) => UpstreamProtocol::Downstream,
            // Without TLS there is no ALPN to negotiate with: Envoy's auto_config then speaks HTTP/1.1.
            Some(P::AutoConfig(_)) | None => UpstreamProtocol::Http1,
        };
    }
    Ok(out)
}

impl TryFrom<cpb::Cluster> for ClusterConfig {
    type Error = ConfigError;

    fn try_from(c: cpb::Cluster) -> Result<Self, ConfigError> {
        use cpb::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy as P};
        audit_resource(&c, "envoy.config.cluster.v3.Cluster")?;
        if c.name.is_empty() {
            return Err(ConfigError::new("name", "a cluster needs a name"));
        }
        let discovery = match &c.cluster_discovery_type {
            Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(*t)
                .map_err(|_| ConfigError::new("type", format!("unknown discovery type {t}")))?,
            Some(ClusterDiscoveryType::ClusterType(_)) => {
                return Err(ConfigError::new("cluster_type", "custom cluster types are not supported"));
            }
            None => DiscoveryType::Static,
        };
        let kind = match discovery {
            DiscoveryType::Static => ClusterKind::Static,
            DiscoveryType::StrictDns => ClusterKind::StrictDns,
            DiscoveryType::LogicalDns => ClusterKind::LogicalDns,
            DiscoveryType::OriginalDst => ClusterKind::OriginalDst,
            DiscoveryType::Eds => {
                let eds = c
                    .eds_cluster_config
                    .as_ref()
                    .ok_or_else(|| ConfigError::new("eds_cluster_config", "EDS clusters need eds_cluster_config"))?;
                let service_name = if eds.service_name.is_empty() { c.name.clone() } else { eds.service_name.clone() };
                ClusterKind::Eds { service_name }
            }
        };
        let lb_policy = match P::try_from(c.lb_policy) {
            Ok(P::RoundRobin) => LbPolicy::RoundRobin,
            Ok(P::LeastRequest) => LbPolicy::LeastRequest,
            Ok(P::Random) => LbPolicy::Random,
            Ok(P::ClusterProvided) => LbPolicy::ClusterProvided,
            Ok(P::RingHash) => ring_hash(&c)?,
            Ok(P::Maglev) => maglev(&c)?,
            Ok(other) => {
                return Err(ConfigError::new("lb_policy", format!("{} is not supported", other.as_str_name())));
            }
            Err(_) => return Err(ConfigError::new("lb_policy", format!("unknown lb_policy {}", c.lb_policy))),
        };
        // Envoy's pairing rule: ORIGINAL_DST clusters and only they use CLUSTER_PROVIDED.
        match (&kind, lb_policy) {
            (ClusterKind::OriginalDst, LbPolicy::ClusterProvided) => {}
            (ClusterKind::OriginalDst, p) => {
                return Err(ConfigError::new(
                    "lb_policy",
                    format!(
                        "LB policy {p:?} is not valid for cluster type ORIGINAL_DST; only CLUSTER_PROVIDED is allowed"
                    ),
                ));
            }
            (_, LbPolicy::ClusterProvided) => {
                return Err(ConfigError::new(
                    "lb_policy",
                    "CLUSTER_PROVIDED is only valid for cluster type ORIGINAL_DST",
                ));
            }
            _ => {}
        }

        let dns = matches!(kind, ClusterKind::StrictDns | ClusterKind::LogicalDns);
        let pipe = match &c.load_assignment {
            Some(la) => pipe_endpoint(la, &kind)?,
            None => None,
        };
        let endpoints = match &c.load_assignment {
            Some(_) if pipe.is_some() => Vec::new(),
            Some(la) => endpoints(la, dns, "load_assignment")?,
            None => Vec::new(),
        };
        match kind {
            ClusterKind::OriginalDst if !endpoints.is_empty() => {
                return Err(ConfigError::new("load_assignment", "ORIGINAL_DST clusters must have no load assignment"));
            }
            ClusterKind::LogicalDns if endpoints.len() != 1 => {
                return Err(ConfigError::new(
                    "load_assignment",
                    "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
                ));
            }
            ClusterKind::StrictDns if endpoints.is_empty() => {
                return Err(ConfigError::new("load_assignment", "STRICT_DNS clusters need at least one endpoint"));
            }
            _ => {}
        }

        let dns_family = match cpb::cluster::DnsLookupFamily::try_from(c.dns_lookup_family) {
            Ok(cpb::cluster::DnsLookupFamily::Auto) => DnsFamily::Auto,
            Ok(cpb::cluster::DnsLookupFamily::V4Only) => DnsFamily::V4Only,
            Ok(cpb::cluster::DnsLookupFamily::V6Only) => DnsFamily::V6Only,
            Ok(cpb::cluster::DnsLookupFamily::V4Preferred) => DnsFamily::V4Preferred,
            Ok(cpb::cluster::DnsLookupFamily::All) => DnsFamily::All,
            Err(_) => {
                return Err(ConfigError::new("dns_lookup_family", format!("unknown value {}", c.dns_lookup_family)));
            }
        };
        // Deprecated upstream in favour of DNS cluster extensions, but it is what Istio and most configs send.
        #[allow(deprecated)]
        let refresh = c.dns_refresh_rate.as_ref();
        let dns_refresh_rate = opt_duration(refresh, DEFAULT_DNS_REFRESH, "dns_refresh_rate")?;
        // Deprecated upstream like dns_refresh_rate, and sent by Istio all the same.
        #[allow(deprecated)]
        let respect_ttl = c.respect_dns_ttl;
        if respect_ttl {
            // The system resolver behind tokio's lookup_host reports no TTLs, so names are re-resolved every
            // dns_refresh_rate instead; said once per cluster load rather than refused (Istio sets it on its DNS
            // clusters).
            warn!(cluster = %c.name, "respect_dns_ttl: TTLs are not available from the system resolver; re-resolving every dns_refresh_rate ({dns_refresh_rate:?})");
        }
        if dns && dns_refresh_rate < Duration::from_millis(1) {
            return Err(ConfigError::new("dns_refresh_rate", "must be at least 1ms"));
        }
        #[allow(deprecated)]
        let dns_jitter = opt_duration(c.dns_jitter.as_ref(), Duration::ZERO, "dns_jitter")?;
        if let Some(r) = &c.typed_dns_resolver_config {
            dns_resolver(r, &c.name)?;
        }
        let http = http_upstream(&c)?;
        let max_connections = c
            .circuit_breakers
            .as_ref()
            .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == core::RoutingPriority::Default as i32))
            .and_then(|t| t.max_connections.as_ref())
            .map_or(DEFAULT_MAX_CONNECTIONS, |v| v.value);

        Ok(ClusterConfig {
            name: c.name.clone(),
            kind,
            connect_timeout: opt_duration(c.connect_timeout.as_ref(), DEFAULT_CONNECT_TIMEOUT, "connect_timeout")?,
            lb_policy,
            endpoints,
            dns_refresh_rate,
            dns_jitter,
            dns_family,
            max_connections,
            per_connection_buffer_limit_bytes: c
                .per_connection_buffer_limit_bytes
                .as_ref()
                .map_or(DEFAULT_BUFFER_LIMIT, |v| v.value),
            stat_name: if c.alt_stat_name.is_empty() { c.name.clone() } else { c.alt_stat_name.clone() },
            tls: upstream_tls(c.transport_socket.as_ref(), &http, "transport_socket")?,
            transport_socket_matches: transport_socket_matches(&c, &http)?,
            pipe,
            source_address: match c.upstream_bind_config.as_ref() {
                None => None,
                Some(b) => {
                    let path = "upstream_bind_config.source_address";
                    let sa = b
                        .source_address
                        .as_ref()
                        .ok_or_else(|| ConfigError::new(path, "a source address is required"))?;
                    let port = port_value(sa, path)?;
                    let ip = sa.address.parse().map_err(|_| {
                        ConfigError::new(join(path, "address"), format!("malformed IP address: {}", sa.address))
                    })?;
                    Some(SocketAddr::new(ip, port))
                }
            },
            skipped_filters: upstream_filters(&c)?,
            locality_weighted: c.common_lb_config.as_ref().is_some_and(|l| {
                matches!(
                    l.locality_config_specifier,
                    Some(cpb::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
                )
            }),
            tcp_keepalive: c.upstream_connection_options.as_ref().and_then(|o| o.tcp_keepalive.as_ref()).map(|k| {
                let secs = |v: &Option<u32>| v.map(|s| Duration::from_secs(u64::from(s)));
                let mut out = socket2::TcpKeepalive::new();
                if let Some(t) = secs(&k.keepalive_time.as_ref().map(|v| v.value)) {
                    out = out.with_time(t);
                }
                if let Some(i) = secs(&k.keepalive_interval.as_ref().map(|v| v.value)) {
                    out = out.with_interval(i);
                }
                if let Some(p) = k.keepalive_probes.as_ref() {
                    out = out.with_retries(p.value);
                }
                out
            }),
            outlier: outlier(&c)?,
            healthy_panic_threshold: panic_threshold(&c)?,
            balancing: balancing(&c, lb_policy)?,
            http,
            proto: Arc::new(c),
        })
    }
}

/// The path of a load assignment's `pipe` endpoint, refused anywhere but as the only endpoint of a STATIC cluster.
fn pipe_endpoint(
    la: &epb::ClusterLoadAssignment,
    kind: &ClusterKind,
) -> Result<Option<std::path::PathBuf>, ConfigError> {
    use core::address::Address as A;
    let all: Vec<(String, Option<&A>)> = la
        .endpoints
        .iter()
        .enumerate()
        .flat_map(|(i, l)| {
            l.lb_endpoints.iter().enumerate().map(move |(j, lb)| {
                let address = match &lb.host_identifier {
                    Some(epb::lb_endpoint::HostIdentifier::Endpoint(ep)) => {
                        ep.address.as_ref().and_then(|a| a.address.as_ref())
                    }
                    _ => None,
                };
                (format!("load_assignment.endpoints[{i}].lb_endpoints[{j}].endpoint.address"), address)
            })
        })
        .collect();
    let Some((path, pipe)) = all.iter().find_map(|(path, a)| match a {
        Some(A::Pipe(p)) => Some((path, p)),
        _ => None,
    }) else {
        return Ok(None);
    };
    if *kind != ClusterKind::Static || all.len() != 1 {
        return Err(ConfigError::new(
            join(path, "pipe"),
            "a pipe address is only supported as the one endpoint of a STATIC cluster (a gRPC config source such as \
             sds-grpc)",
        ));
    }
    if pipe.mode != 0 {
        return Err(ConfigError::new(join(path, "pipe.mode"), "not supported for an upstream socket"));
    }
    if pipe.path.is_empty() || pipe.path.starts_with('@') {
        return Err(ConfigError::new(join(path, "pipe.path"), "a filesystem path is required (no abstract sockets)"));
    }
    Ok(Some(std::path::PathBuf::from(&pipe.path)))
}

/// Endpoints of a load assignment (a cluster's inline one, or an EDS resource). `dns` allows host names.
pub fn endpoints(la: &epb::ClusterLoadAssignment, dns: bool, path: &str) -> Result<Vec<EndpointConfig>, ConfigError> {
    let mut out = Vec::new();
    for (i, locality) in la.endpoints.iter().enumerate() {
        let lpath = join(path, &format!("endpoints[{i}]"));
        let first = out.len();
        for (j, lb) in locality.lb_endpoints.iter().enumerate() {
            let epath = join(&lpath, &format!("lb_endpoints[{j}]"));
            let ep = match &lb.host_identifier {
                Some(epb::lb_endpoint::HostIdentifier::Endpoint(ep)) => ep,
                Some(epb::lb_endpoint::HostIdentifier::EndpointName(_)) => {
                    return Err(ConfigError::new(join(&epath, "endpoint_name"), "named endpoints are not supported"));
                }
                None => return Err(ConfigError::new(join(&epath, "endpoint"), "an endpoint is required")),
            };
            let apath = join(&epath, "endpoint.address");
            let sa = socket_address(ep.address.as_ref(), &apath)?;
            let port = port_value(sa, &apath)?;
            let address = match sa.address.parse() {
                Ok(ip) => EndpointAddress::Ip(SocketAddr::new(ip, port)),
                Err(_) if dns => EndpointAddress::Dns { host: sa.address.clone(), port },
                Err(_) => {
                    return Err(ConfigError::new(
                        join(&apath, "socket_address.address"),
                        format!("malformed IP address: {}", sa.address),
                    ));
                }
            };
            let weight = lb.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            if weight == 0 {
                return Err(ConfigError::new(join(&epath, "load_balancing_weight"), "must be at least 1"));
            }
            let healthy = !matches!(
                core::HealthStatus::try_from(lb.health_status),
                Ok(core::HealthStatus::Unhealthy | core::HealthStatus::Draining | core::HealthStatus::Timeout)
            );
            out.push(EndpointConfig {
                address,
                weight,
                priority: locality.priority,
                healthy,
                hostname: ep.hostname.clone(),
                // Envoy looks at the endpoint's labels first, then its locality's.
                socket_labels: socket_labels(lb.metadata.as_ref())
                    .or_else(|| socket_labels(locality.metadata.as_ref())),
                locality_weight: locality.load_balancing_weight.as_ref().map(|w| w.value),
                locality_total: 0,
            });
        }
        let total = out[first..].iter().map(|e| e.weight).fold(0u32, u32::saturating_add);
        for e in &mut out[first..] {
            e.locality_total = total;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::proto::{self, Format};

    #[test]
    fn istio_cluster_options_are_read() {
        let c = convert(
            r#"
name: c
type: STATIC
max_requests_per_connection: 5
upstream_bind_config: { source_address: { address: 127.0.0.6, port_value: 0 } }
upstream_connection_options: { tcp_keepalive: { keepalive_time: 300 } }
circuit_breakers: { thresholds: [ { max_connections: 7, track_remaining: true } ] }
common_lb_config: { locality_weighted_lb_config: {} }
load_assignment:
  cluster_name: c
  endpoints:
  - load_balancing_weight: 3
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 1 } } }
  - load_balancing_weight: 1
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 2 } } }
    - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 3 } } }
  - lb_endpoints:
    - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 4 } } }
"#,
        )
        .unwrap();
        assert_eq!(c.http.max_requests_per_connection, Some(5), "the deprecated cluster-level field");
        assert_eq!(c.source_address, Some("127.0.0.6:0".parse().unwrap()));
        assert!(c.tcp_keepalive.is_some() && c.http.track_remaining && c.locality_weighted);
        // Locality weights 3 : 1, the second locality's share split between its two hosts; no weight, no traffic.
        let w: Vec<u32> = c.endpoints.iter().map(|e| e.lb_weight(c.locality_weighted)).collect();
        assert_eq!(w, [3072, 512, 512, 0]);
        let flat: Vec<u32> = c.endpoints.iter().map(|e| e.lb_weight(false)).collect();
        assert_eq!(flat, [1, 1, 1, 1]);
    }

    #[test]
    fn transport_socket_matches_take_the_first_match_and_fall_back_to_locality_labels() {
        let c = convert(
            r#"
name: c
type: STATIC
transport_socket_matches:
- name: istio
  match: { tlsMode: istio }
  transport_socket: { name: tls, typed_config: { "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: a } }
- name: any
  match: {}
  transport_socket: { name: raw, typed_config: { "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer } }
load_assignment:
  cluster_name: c
  endpoints:
  - metadata: { filter_metadata: { envoy.transport_socket_match: { tlsMode: istio } } }
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 1 } } }
    - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 2 } } }
      metadata: { filter_metadata: { envoy.transport_socket_match: { tlsMode: disabled } } }
"#,
        )
        .unwrap();
        let names: Vec<&str> = c.transport_socket_matches.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["istio", "any"]);
        // Endpoint 1 has no labels of its own: its locality's say istio.
        assert!(c.tls_for(c.endpoints[0].socket_labels.as_deref()).is_some());
        // Endpoint 2's own labels win over the locality's and match only the catch-all raw_buffer.
        assert!(c.tls_for(c.endpoints[1].socket_labels.as_deref()).is_none());
        // A host with no labels at all (an ORIGINAL_DST one) takes the catch-all as well.
        assert!(c.tls_for(None).is_none());
    }

    fn convert(yaml: &str) -> Result<ClusterConfig, String> {
        let msg = proto::parse_dynamic(yaml, Format::Yaml, "envoy.config.cluster.v3.Cluster")
            .map_err(|e| format!("parse: {e}"))?;
        let c: cpb::Cluster = proto::decode(&msg).map_err(|e| format!("decode: {e}"))?;
        ClusterConfig::try_from(c).map_err(|e| e.to_string())
    }

    fn with_endpoints(head: &str, hosts: &[&str]) -> String {
        let eps: Vec<String> = hosts
            .iter()
            .map(|h| format!("{{ endpoint: {{ address: {{ socket_address: {{ address: {h}, port_value: 80 }} }} }} }}"))
            .collect();
        format!(
            "name: c\n{head}\nload_assignment: {{ cluster_name: c, endpoints: [ {{ lb_endpoints: [ {} ] }} ] }}\n",
            eps.join(", ")
        )
    }

    #[test]
    fn static_cluster_defaults() {
        let c = convert(&with_endpoints("", &["127.0.0.1"])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.kind, ClusterKind::Static);
        assert_eq!(c.lb_policy, LbPolicy::RoundRobin);
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.endpoints.len(), 1);
        assert_eq!(c.endpoints[0].weight, 1);
    }

    #[test]
    fn eds_service_name_defaults_to_the_cluster_name() {
        let c = convert("name: c\ntype: EDS\neds_cluster_config: { eds_config: { ads: {} } }")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.kind, ClusterKind::Eds { service_name: "c".into() });
        let c = convert("name: c\ntype: EDS\neds_cluster_config: { service_name: s, eds_config: { ads: {} } }")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.kind, ClusterKind::Eds { service_name: "s".into() });
    }

    #[test]
    fn ring_hash_takes_envoys_sizes_and_limits() {
        let c = convert("name: c\nlb_policy: MAGLEV").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.lb_policy, LbPolicy::Maglev { table_size: 65537 });
        let c = convert("name: c\nlb_policy: RING_HASH").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.lb_policy, LbPolicy::RingHash { min: 1024, max: 8 * 1024 * 1024 });
        let c = convert(
            "name: c\nlb_policy: RING_HASH\nring_hash_lb_config: { minimum_ring_size: 64, maximum_ring_size: 128 }",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.lb_policy, LbPolicy::RingHash { min: 64, max: 128 });
        let err = |yaml: &str| convert(yaml).err().unwrap_or_default();
        assert!(
            err(
                "name: c\nlb_policy: RING_HASH\nring_hash_lb_config: { minimum_ring_size: 256, maximum_ring_size: 128 }"
            )
            .contains("ring_hash_lb_config.minimum_ring_size: must be at least 1 and at most maximum_ring_size (128)")
        );
        assert!(
            err("name: c\nlb_policy: RING_HASH\nring_hash_lb_config: { hash_function: MURMUR_HASH_2 }")
                .contains("ring_hash_lb_config.hash_function: only XX_HASH is supported")
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                with_endpoints("type: STATIC", &["example.com"]),
                "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: malformed IP address: example.com",
            ),
            (
                with_endpoints("type: LOGICAL_DNS", &["a.example", "b.example"]),
                "load_assignment: LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
            ),
            (
                "name: c\ntype: ORIGINAL_DST".to_string(),
                "lb_policy: LB policy RoundRobin is not valid for cluster type ORIGINAL_DST",
            ),
            (
                with_endpoints("lb_policy: CLUSTER_PROVIDED", &["127.0.0.1"]),
                "lb_policy: CLUSTER_PROVIDED is only valid for cluster type ORIGINAL_DST",
            ),
            (
                with_endpoints("lb_policy: MAGLEV\nmaglev_lb_config: { table_size: 65536 }", &["127.0.0.1"]),
                "maglev_lb_config.table_size: must be a prime of at most 5000011",
            ),
            ("name: c\ntype: EDS".to_string(), "eds_cluster_config: EDS clusters need eds_cluster_config"),
            (
                "name: c\noutlier_detection: { base_ejection_time: 60s, max_ejection_time: 30s }".to_string(),
                "outlier_detection.max_ejection_time: cannot be smaller than base_ejection_time",
            ),
            (
                "name: c\noutlier_detection: { failure_percentage_threshold: 101 }".to_string(),
                "outlier_detection.failure_percentage_threshold: must be at most 100",
            ),
            (
                "name: c\noutlier_detection: { monitors: [ { name: m } ] }".to_string(),
                "outlier_detection.monitors: not supported",
            ),
            (
                "name: c\nlb_policy: ROUND_ROBIN\nleast_request_lb_config: {}".to_string(),
                "least_request_lb_config: only goes with lb_policy LEAST_REQUEST",
            ),
            (
                "name: c\nlb_policy: LEAST_REQUEST\nleast_request_lb_config: { choice_count: 1 }".to_string(),
                "least_request_lb_config.choice_count: must be at least 2",
            ),
            (
                "name: c\nround_robin_lb_config: { slow_start_config: { slow_start_window: 10s, \
                 aggression: { default_value: 0, runtime_key: k } } }"
                    .to_string(),
                "round_robin_lb_config.slow_start_config.aggression: must be greater than 0",
            ),
            (
                "name: c\ncommon_lb_config: { healthy_panic_threshold: { value: 150 } }".to_string(),
                "common_lb_config.healthy_panic_threshold.value: must be between 0 and 100",
            ),
        ];
        for (yaml, expect) in cases {
            let err = convert(&yaml).err().unwrap_or_default();
            assert!(err.contains(expect), "expected '{expect}', got '{err}'");
        }
    }

    #[test]
    fn outlier_detection_takes_envoys_defaults() {
        let o = convert("name: c\noutlier_detection: { base_ejection_time: 600s }")
            .unwrap_or_else(|e| panic!("{e}"))
            .outlier
            .unwrap_or_else(|| panic!("no outlier"));
        assert_eq!((o.consecutive_5xx, o.enforcing_consecutive_5xx), (5, 100));
        assert_eq!((o.consecutive_gateway_failure, o.enforcing_consecutive_gateway_failure), (5, 0));
        assert_eq!((o.consecutive_local_origin_failure, o.enforcing_consecutive_local_origin_failure), (5, 100));
        assert_eq!((o.success_rate_minimum_hosts, o.success_rate_request_volume), (5, 100));
        assert_eq!((o.success_rate_stdev_factor, o.enforcing_success_rate), (1900, 100));
        assert_eq!(o.enforcing_local_origin_success_rate, 100);
        assert_eq!((o.failure_percentage_threshold, o.failure_percentage_minimum_hosts), (85, 5));
        assert_eq!((o.failure_percentage_request_volume, o.enforcing_failure_percentage), (50, 0));
        assert_eq!(o.enforcing_failure_percentage_local_origin, 0);
        assert_eq!((o.interval, o.max_ejection_percent), (Duration::from_secs(10), 10));
        assert!(!o.always_eject_one_host && !o.split_external_local_origin_errors);
        assert_eq!(o.max_ejection_time_jitter, Duration::ZERO);
        assert_eq!(o.max_ejection_time, Duration::from_secs(600), "the base time when it exceeds 300 s");
    }

    /// What Istio 1.14 generates for a DestinationRule's outlierDetection (consecutiveGatewayErrors,
    /// consecutive5xxErrors, minHealthPercent left at 0): every field is honoured, none refused.
    #[test]
    fn istios_outlier_detection_loads() {
        let yaml = "name: c\noutlier_detection: { consecutive_5xx: 7, enforcing_consecutive_5xx: 100, \
                    consecutive_gateway_failure: 3, enforcing_consecutive_gateway_failure: 100, \
                    enforcing_success_rate: 0, interval: 5s, base_ejection_time: 15s, max_ejection_percent: 100, \
                    split_external_local_origin_errors: true, consecutive_local_origin_failure: 2, \
                    enforcing_consecutive_local_origin_failure: 100, enforcing_local_origin_success_rate: 0 }\n\
                    common_lb_config: { healthy_panic_threshold: {} }";
        let c = convert(yaml).unwrap_or_else(|e| panic!("{e}"));
        let o = c.outlier.unwrap_or_else(|| panic!("no outlier"));
        assert_eq!((o.consecutive_gateway_failure, o.enforcing_consecutive_gateway_failure), (3, 100));
        assert_eq!((o.enforcing_success_rate, o.consecutive_local_origin_failure), (0, 2));
        assert!(o.split_external_local_origin_errors);
        assert_eq!(c.healthy_panic_threshold, 0.0);
        assert_eq!(convert("name: c").map(|c| c.healthy_panic_threshold), Ok(50.0));
    }

    /// Istio's DestinationRule `warmupDurationSecs` becomes a slow_start_config on the policy's own lb config.
    #[test]
    fn balancer_configs_take_envoys_defaults() {
        let c = convert(
            "name: c\nlb_policy: LEAST_REQUEST\nleast_request_lb_config: { choice_count: 3, \
             slow_start_config: { slow_start_window: 45s } }",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.balancing.choice_count, c.balancing.active_request_bias), (3, 1.0));
        assert_eq!(
            c.balancing.slow_start,
            Some(SlowStart { window: Duration::from_secs(45), aggression: 1.0, min_weight: 0.1 })
        );
        let c = convert(
            "name: c\nround_robin_lb_config: { slow_start_config: { slow_start_window: 10s, \
             aggression: { default_value: 2, runtime_key: k }, min_weight_percent: { value: 25 } } }",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.balancing.slow_start,
            Some(SlowStart { window: Duration::from_secs(10), aggression: 2.0, min_weight: 0.25 })
        );
        assert_eq!(convert("name: c").map(|c| c.balancing), Ok(Balancing::default()));
    }

    /// The upstream HttpProtocolOptions are audited field by field: what Istio 1.14 sends loads, anything we would
    /// not honour (header count limits, upstream HTTP filters, codec tuning) is refused by its path.
    #[test]
    fn upstream_http_protocol_options_refuse_what_is_not_honoured() {
        let with = |options: &str| {
            convert(&format!(
                "name: c\ntyped_extension_protocol_options:\n  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n    \
                 '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n    {options}"
            ))
        };
        let istio = with(
            "use_downstream_protocol_config: { http_protocol_options: {}, \
             http2_protocol_options: { max_concurrent_streams: 1073741824 } }",
        );
        assert_eq!(
            istio.map(|c| (c.http.protocol, c.http.max_concurrent_streams)),
            Ok((UpstreamProtocol::Downstream, None))
        );
        let capped = with("explicit_http_config: { http2_protocol_options: { max_concurrent_streams: 100 } }");
        assert_eq!(capped.map(|c| c.http.max_concurrent_streams), Ok(Some(100)));
        let at = "typed_extension_protocol_options[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"]";
        for (options, expect) in [
            (
                "common_http_protocol_options: { max_headers_count: 50 }",
                "common_http_protocol_options.max_headers_count: not supported",
            ),
            ("http_filters: [ { name: f } ]", "http_filters: not supported"),
            (
                "explicit_http_config: { http2_protocol_options: { initial_stream_window_size: 65536 } }",
                "explicit_http_config.http2_protocol_options.initial_stream_window_size: not supported",
            ),
            (
                "explicit_http_config: { http2_protocol_options: { max_concurrent_streams: 0 } }",
                "explicit_http_config.http2_protocol_options.max_concurrent_streams: must be at least 1",
            ),
        ] {
            let err = with(options).err().unwrap_or_default();
            assert!(err.contains(at) && err.contains(expect), "{options}: expected '{expect}', got '{err}'");
        }
    }

    #[test]
    fn original_dst_with_cluster_provided_is_valid() {
        let c = convert("name: passthrough\ntype: ORIGINAL_DST\nlb_policy: CLUSTER_PROVIDED")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.kind, ClusterKind::OriginalDst);
    }

    #[test]
    fn unhealthy_endpoints_and_priorities_are_kept_with_their_state() {
        let yaml = r#"
name: c
load_assignment:
  cluster_name: c
  endpoints:
  - lb_endpoints:
    - { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 1 } } }, health_status: UNHEALTHY }
    - { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 2 } } }, load_balancing_weight: 3 }
  - priority: 1
    lb_endpoints:
    - { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 3 } } } }
"#;
        let c = convert(yaml).unwrap_or_else(|e| panic!("{e}"));
        let summary: Vec<(bool, u32, u32)> = c.endpoints.iter().map(|e| (e.healthy, e.weight, e.priority)).collect();
        assert_eq!(summary, vec![(false, 1, 0), (true, 3, 0), (true, 1, 1)]);
    }
}
