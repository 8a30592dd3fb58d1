//! Validated `envoy.filters.network.http_connection_manager` configuration: the HCM proto turned into the settings
//! the HTTP connection manager runs with, every error naming its field path.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::google::protobuf::Any;

use super::listener::{IstioFilter, decode_any, type_name};
use super::{ConfigError, duration, join, opt_duration};
use crate::listener::chain_match::{Cidr, cidrs};
use crate::network::http::fault::FaultConfig;
use crate::network::http::route::{HeaderMatchers, RouteTable};

/// Envoy's default `stream_idle_timeout`.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Envoy's default `drain_timeout`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default `common_http_protocol_options.idle_timeout` for downstream connections.
pub const DEFAULT_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Envoy's default `max_request_headers_kb`.
pub const DEFAULT_MAX_REQUEST_HEADERS_KB: u32 = 60;
/// Envoy's default for the `server` header.
pub const DEFAULT_SERVER_NAME: &str = "envoy";

const TYPE_HCM: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TYPE_ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";
const TYPE_HEALTH_CHECK: &str = "envoy.extensions.filters.http.health_check.v3.HealthCheck";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// HTTP/2 prior knowledge is recognised by its preface, anything else is HTTP/1.
    Auto,
    Http1,
    Http2,
}

/// Where the route table comes from.
#[derive(Debug, Clone)]
pub enum RouteSource {
    Inline(Arc<RouteTable>),
    /// Subscribed over ADS by name; the listener warms until it arrives.
    Rds {
        name: String,
        initial_fetch_timeout: Option<Duration>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerHeader {
    /// Envoy's OVERWRITE: always our `server_name`.
    Overwrite,
    /// APPEND_IF_ABSENT: the upstream's `server` header wins.
    AppendIfAbsent,
    /// PASS_THROUGH: never touched.
    PassThrough,
}

#[derive(Debug, Clone)]
pub struct HcmConfig {
    pub stat_prefix: String,
    pub codec: Codec,
    pub routes: RouteSource,
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    pub skip_xff_append: bool,
    /// `internal_address_config.cidr_ranges`: which trusted client addresses make a request internal. Empty when
    /// unset: since Envoy 1.33 (the API we embed) no address is internal unless listed.
    pub internal_addresses: Vec<Cidr>,
    pub server_name: String,
    pub server_header: ServerHeader,
    pub via: Option<http::HeaderValue>,
    pub generate_request_id: bool,
    pub preserve_external_request_id: bool,
    pub always_set_request_id_in_response: bool,
    /// None when disabled (0 s).
    pub stream_idle_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub connection_idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub max_request_headers_kb: u32,
    pub max_requests_per_connection: Option<u32>,
    /// `common_http_protocol_options.max_stream_duration`: the longest a stream may last unless its route says
    /// otherwise; None when unset or 0.
    pub max_stream_duration: Option<Duration>,
    /// `common_http_protocol_options.max_connection_duration`: a connection this old is drained; None when unset or 0.
    pub max_connection_duration: Option<Duration>,
    /// The router's `suppress_envoy_headers`: no `x-envoy-upstream-service-time`, `x-envoy-overloaded` or
    /// `x-envoy-expected-rq-timeout-ms`.
    pub suppress_envoy_headers: bool,
    pub websocket: bool,
    /// `proxy_100_continue`: a request's `Expect: 100-continue` goes upstream (else it is answered here and removed).
    pub proxy_100_continue: bool,
    /// `http_protocol_options.accept_http_10`: HTTP/1.0 requests are served (else answered 426, as Envoy does).
    pub accept_http_10: bool,
    /// `http_protocol_options.default_host_for_http_10`: the Host an HTTP/1.0 request without one gets.
    pub default_host_for_http_10: Option<http::HeaderValue>,
    /// `normalize_path`: RFC 3986 dot-segment removal before routing.
    pub normalize_path: bool,
    pub merge_slashes: bool,
    /// HTTP filters that run before the router and that we skip (Istio telemetry, empty fault/cors).
    pub skipped_filters: Vec<String>,
    /// `envoy.filters.http.health_check`: which requests are health checks and how they are answered.
    pub health_check: Option<Arc<HealthCheckConfig>>,
    /// `envoy.filters.http.fault`: its name in `http_filters` (routes' `typed_per_filter_config` is keyed by it)
    /// and its own config, which a route's replaces.
    pub fault: Option<(String, Arc<FaultConfig>)>,
    /// `envoy.filters.http.cors`, by its name in `http_filters` (its policies are the routes').
    pub cors: Option<String>,
    pub access_log: std::sync::Arc<[crate::access_log::AccessLog]>,
}

impl HcmConfig {
    pub fn from_any(any: &Any, path: &str) -> Result<Self, ConfigError> {
        let h: hcm::HttpConnectionManager = decode_any(any, path)?;
        HcmConfig::convert(&h, path)
    }

    pub fn rds_name(&self) -> Option<&str> {
        match &self.routes {
            RouteSource::Rds { name, .. } => Some(name),
            RouteSource::Inline(_) => None,
        }
    }

    fn convert(h: &hcm::HttpConnectionManager, path: &str) -> Result<Self, ConfigError> {
        use hcm::http_connection_manager::{CodecType, RouteSpecifier, ServerHeaderTransformation};
        let at = |f: &str| join(path, f);
        if h.stat_prefix.is_empty() {
            return Err(ConfigError::new(at("stat_prefix"), "stat_prefix is required"));
        }
        let codec = match CodecType::try_from(h.codec_type) {
            Ok(CodecType::Auto) => Codec::Auto,
            Ok(CodecType::Http1) => Codec::Http1,
            Ok(CodecType::Http2) => Codec::Http2,
            Ok(CodecType::Http3) => return Err(ConfigError::new(at("codec_type"), "HTTP3 is not supported")),
            Err(_) => return Err(ConfigError::new(at("codec_type"), format!("unknown codec_type {}", h.codec_type))),
        };
        let routes = match &h.route_specifier {
            Some(RouteSpecifier::RouteConfig(rc)) => Inline(Arc::new(
                RouteTable::new(rc).map_err(|e| ConfigError::new(join(&at("route_config"), &e.path), e.message))?,
            )),
            Some(RouteSpecifier::Rds(rds)) => {
                if rds.route_config_name.is_empty() {
                    return Err(ConfigError::new(at("rds.route_config_name"), "route_config_name is required"));
                }
                let source = rds.config_source.as_ref();
                if !source.is_some_and(|s| matches!(s.config_source_specifier, Some(ConfigSourceSpecifier::Ads(_)))) {
                    return Err(ConfigError::new(
                        at("rds.config_source"),
                        "only ads config sources are supported for RDS",
                    ));
                }
                let initial_fetch_timeout = opt_duration(
                    source.and_then(|s| s.initial_fetch_timeout.as_ref()),
                    Duration::from_secs(15),
                    &at("rds.config_source.initial_fetch_timeout"),
                )?;
                Rds {
                    name: rds.route_config_name.clone(),
                    initial_fetch_timeout: (!initial_fetch_timeout.is_zero()).then_some(initial_fetch_timeout),
                }
            }
            Some(RouteSpecifier::ScopedRoutes(_)) => {
                return Err(ConfigError::new(at("scoped_routes"), "scoped routes are not supported"));
            }
            None => return Err(ConfigError::new(path, "either rds or route_config is required")),
        };
        let HttpFilters { suppress_envoy_headers, skipped: skipped_filters, health_check, fault, cors } =
            http_filters(&h.http_filters, &at("http_filters"))?;

        let server_header = match ServerHeaderTransformation::try_from(h.server_header_transformation) {
            Ok(ServerHeaderTransformation::Overwrite) => ServerHeader::Overwrite,
            Ok(ServerHeaderTransformation::AppendIfAbsent) => ServerHeader::AppendIfAbsent,
            Ok(ServerHeaderTransformation::PassThrough) => ServerHeader::PassThrough,
            Err(_) => {
                return Err(ConfigError::new(
                    at("server_header_transformation"),
                    format!("unknown value {}", h.server_header_transformation),
                ));
            }
        };
        let via = if h.via.is_empty() {
            None
        } else {
            Some(
                http::HeaderValue::from_str(&h.via)
                    .map_err(|_| ConfigError::new(at("via"), "not a valid header value"))?,
            )
        };
        let internal_addresses = match &h.internal_address_config {
            Some(c) => cidrs(&at("internal_address_config.cidr_ranges"), &c.cidr_ranges)
                .map_err(|e| ConfigError::new(e.path, e.message))?,
            None => Vec::new(),
        };
        let common = h.common_http_protocol_options.as_ref();
        let connection_idle = opt_duration(
            common.and_then(|c| c.idle_timeout.as_ref()),
            DEFAULT_CONNECTION_IDLE_TIMEOUT,
            &at("common_http_protocol_options.idle_timeout"),
        )?;
        let max_requests_per_connection =
            common.and_then(|c| c.max_requests_per_connection.as_ref()).map(|v| v.value).filter(|v| *v > 0);
        let max_connection_duration = opt_duration(
            common.and_then(|c| c.max_connection_duration.as_ref()),
            Duration::ZERO,
            &at("common_http_protocol_options.max_connection_duration"),
        )?;
        let max_stream_duration = opt_duration(
            common.and_then(|c| c.max_stream_duration.as_ref()),
            Duration::ZERO,
            &at("common_http_protocol_options.max_stream_duration"),
        )?;
        let stream_idle =
            opt_duration(h.stream_idle_timeout.as_ref(), DEFAULT_STREAM_IDLE_TIMEOUT, &at("stream_idle_timeout"))?;
        let request_timeout = opt_duration(h.request_timeout.as_ref(), Duration::ZERO, &at("request_timeout"))?;
        let max_request_headers_kb =
            h.max_request_headers_kb.as_ref().map_or(DEFAULT_MAX_REQUEST_HEADERS_KB, |v| v.value);
        if !(1..=8192).contains(&max_request_headers_kb) {
            return Err(ConfigError::new(at("max_request_headers_kb"), "must be between 1 and 8192"));
        }
        use hcm::http_connection_manager::PathWithEscapedSlashesAction as Slashes;
        match Slashes::try_from(h.path_with_escaped_slashes_action) {
            Ok(Slashes::ImplementationSpecificDefault | Slashes::KeepUnchanged) => {}
            _ => {
                return Err(ConfigError::new(
                    at("path_with_escaped_slashes_action"),
                    "only KEEP_UNCHANGED is supported",
                ));
            }
        }
        let mut websocket = false;
        for (i, u) in h.upgrade_configs.iter().enumerate() {
            let upath = at(&format!("upgrade_configs[{i}]"));
            if !u.upgrade_type.eq_ignore_ascii_case("websocket") {
                return Err(ConfigError::new(
                    join(&upath, "upgrade_type"),
                    format!("upgrade type '{}' is not supported (only websocket)", u.upgrade_type),
                ));
            }
            if !u.filters.is_empty() {
                return Err(ConfigError::new(join(&upath, "filters"), "per-upgrade filters are not supported"));
            }
            websocket = u.enabled.as_ref().is_none_or(|v| v.value);
        }
        Ok(HcmConfig {
            stat_prefix: h.stat_prefix.clone(),
            codec,
            routes,
            use_remote_address: h.use_remote_address.as_ref().is_some_and(|v| v.value),
            xff_num_trusted_hops: h.xff_num_trusted_hops,
            skip_xff_append: h.skip_xff_append,
            internal_addresses,
            server_name: if h.server_name.is_empty() { DEFAULT_SERVER_NAME.into() } else { h.server_name.clone() },
            server_header,
            via,
            generate_request_id: h.generate_request_id.as_ref().is_none_or(|v| v.value),
            preserve_external_request_id: h.preserve_external_request_id,
            always_set_request_id_in_response: h.always_set_request_id_in_response,
            stream_idle_timeout: (!stream_idle.is_zero()).then_some(stream_idle),
            request_timeout: (!request_timeout.is_zero()).then_some(request_timeout),
            connection_idle_timeout: (!connection_idle.is_zero()).then_some(connection_idle),
            drain_timeout: opt_duration(h.drain_timeout.as_ref(), DEFAULT_DRAIN_TIMEOUT, &at("drain_timeout"))?,
            max_request_headers_kb,
            max_requests_per_connection,
            max_stream_duration: (!max_stream_duration.is_zero()).then_some(max_stream_duration),
            max_connection_duration: (!max_connection_duration.is_zero()).then_some(max_connection_duration),
            suppress_envoy_headers,
            websocket,
            proxy_100_continue: h.proxy_100_continue,
            accept_http_10: h.http_protocol_options.as_ref().is_some_and(|o| o.accept_http_10),
            default_host_for_http_10: match h
                .http_protocol_options
                .as_ref()
                .map(|o| o.default_host_for_http_10.as_str())
            {
                None | Some("") => None,
                Some(host) => Some(http::HeaderValue::from_str(host).map_err(|_| {
                    ConfigError::new(at("http_protocol_options.default_host_for_http_10"), "not a valid header value")
                })?),
            },
            normalize_path: h.normalize_path.as_ref().is_some_and(|v| v.value),
            merge_slashes: h.merge_slashes,
            skipped_filters,
            health_check,
            fault,
            cors,
            access_log: super::access_log::access_logs(&h.access_log, &at("access_log"))?.into(),
        })
    }
}

use RouteSource::{Inline, Rds};
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;

/// What the HTTP filter list leaves the connection manager to do besides routing.
struct HttpFilters {
    /// The router's `suppress_envoy_headers`.
    suppress_envoy_headers: bool,
    skipped: Vec<String>,
    health_check: Option<Arc<HealthCheckConfig>>,
    fault: Option<(String, Arc<FaultConfig>)>,
    cors: Option<String>,
}

/// Envoy's `envoy.filters.http.health_check`. Without pass-through the proxy answers health checks itself: 200, or
/// 503 after `/healthcheck/fail` or when a listed cluster has too few healthy hosts. With pass-through they go to
/// the upstream like any request, unless the proxy is failed or an upstream answer is still cached (`cache_time`).
#[derive(Debug)]
pub struct HealthCheckConfig {
    pub headers: HeaderMatchers,
    pub pass_through: bool,
    pub cache_time: Option<Duration>,
    /// `cluster_min_healthy_percentages`: cluster name and the percent of its hosts that must be in service.
    pub min_healthy: Vec<(String, f64)>,
}

/// Checks the HTTP filter list and returns the names of the filters that are skipped. The router must come last;
/// before it, only filters that change nothing on this proxy's path are allowed: Istio's telemetry and peer-metadata
/// plugins, `istio.alpn` (it only picks upstream ALPN for TLS origination), `grpc_stats` (counting only), and
/// `fault`/`cors` with an empty config, which Envoy runs as pass-through until a route enables them; and the one
/// filter we run, `health_check`.
fn http_filters(filters: &[hcm::HttpFilter], path: &str) -> Result<HttpFilters, ConfigError> {
    use hcm::http_filter::ConfigType;
    let Some((last, before)) = filters.split_last() else {
        return Err(ConfigError::new(path, "http_filters must end with envoy.filters.http.router"));
    };
    let any_of = |f: &hcm::HttpFilter, i: usize| -> Result<Option<Any>, ConfigError> {
        match &f.config_type {
            Some(ConfigType::TypedConfig(any)) => Ok(Some(any.clone())),
            Some(ConfigType::ConfigDiscovery(_)) => Err(ConfigError::new(
                join(path, &format!("[{i}].config_discovery")),
                "filter config discovery is not supported",
            )),
            None => Ok(None),
        }
    };
    let last_i = filters.len() - 1;
    let router = any_of(last, last_i)?;
    let is_router =
        router.as_ref().map_or(last.name == "envoy.filters.http.router", |a| type_name(&a.type_url) == TYPE_ROUTER);
    if !is_router {
        return Err(ConfigError::new(
            join(path, &format!("[{last_i}]")),
            format!("the last HTTP filter must be envoy.filters.http.router, not '{}'", last.name),
        ));
    }
    let mut skipped = Vec::new();
    let mut health_check = None;
    let mut fault = None;
    let mut cors = None;
    for (i, f) in before.iter().enumerate() {
        let fpath = join(path, &format!("[{i}]"));
        if f.disabled {
            continue;
        }
        let any = any_of(f, i)?;
        let Some(any) = any else {
            return Err(ConfigError::new(
                join(&fpath, "typed_config"),
                format!("HTTP filter '{}' needs a typed_config", f.name),
            ));
        };
        if skippable_http_filter(&any) {
            skipped.push(f.name.clone());
            continue;
        }
        if type_name(&any.type_url) == TYPE_HEALTH_CHECK {
            let tpath = join(&fpath, "typed_config");
            if health_check.is_some() {
                return Err(ConfigError::new(tpath, "only one health_check filter is supported"));
            }
            health_check = Some(Arc::new(health_check_filter(&any, &tpath)?));
            continue;
        }
        if type_name(&any.type_url) == "envoy.extensions.filters.http.cors.v3.Cors" {
            if cors.is_some() {
                return Err(ConfigError::new(join(&fpath, "typed_config"), "only one CORS filter is supported"));
            }
            cors = Some(f.name.clone());
            continue;
        }
        if type_name(&any.type_url) == crate::network::http::fault::TYPE_HTTP_FAULT {
            let tpath = join(&fpath, "typed_config");
            if fault.is_some() {
                return Err(ConfigError::new(tpath, "only one fault filter is supported"));
            }
            fault = Some((f.name.clone(), Arc::new(FaultConfig::from_any(&any, &tpath)?)));
            continue;
        }
        let optional = if f.is_optional { " (is_optional only covers unknown types)" } else { "" };
        return Err(ConfigError::new(
            join(&fpath, "typed_config"),
            format!("HTTP filter '{}' ({}) is not supported{optional}", f.name, type_name(&any.type_url)),
        ));
    }
    let suppress_envoy_headers = match &router {
        Some(any) => router_filter(any, &join(path, &format!("[{last_i}].typed_config")))?,
        None => false,
    };
    Ok(HttpFilters { suppress_envoy_headers, skipped, health_check, fault, cors })
}

/// `envoy.filters.http.router`'s own config: `suppress_envoy_headers` is honoured; `dynamic_stats` only at its
/// default (true), and `suppress_grpc_request_failure_code_stats` is moot (no gRPC failure-code stats are made);
/// anything else set is refused by its path.
fn router_filter(any: &Any, path: &str) -> Result<bool, ConfigError> {
    use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
    let r: Router = decode_any(any, path)?;
    let refuse = |field: &str| Err(ConfigError::new(join(path, field), "not supported"));
    if r.dynamic_stats.as_ref().is_some_and(|v| !v.value) {
        return refuse("dynamic_stats");
    }
    #[allow(deprecated)]
    if r.start_child_span {
        return refuse("start_child_span");
    }
    if r.reject_connect_request_early_data.as_ref().is_some_and(|v| v.value) {
        return refuse("reject_connect_request_early_data");
    }
    if !r.upstream_log.is_empty() {
        return refuse("upstream_log");
    }
    if r.upstream_log_options.is_some() {
        return refuse("upstream_log_options");
    }
    if !r.strict_check_headers.is_empty() {
        return refuse("strict_check_headers");
    }
    if r.respect_expected_rq_timeout {
        return refuse("respect_expected_rq_timeout");
    }
    if !r.upstream_http_filters.is_empty() {
        return refuse("upstream_http_filters");
    }
    Ok(r.suppress_envoy_headers)
}

/// `envoy.filters.http.health_check`, all of its fields.
fn health_check_filter(any: &Any, path: &str) -> Result<HealthCheckConfig, ConfigError> {
    use envoy_types::pb::envoy::extensions::filters::http::health_check::v3::HealthCheck;
    let hc: HealthCheck = decode_any(any, path)?;
    let Some(pass_through) = hc.pass_through_mode.as_ref().map(|v| v.value) else {
        return Err(ConfigError::new(join(path, "pass_through_mode"), "pass_through_mode is required"));
    };
    let cache_time = match &hc.cache_time {
        None => None,
        Some(d) => {
            let d = duration(d, &join(path, "cache_time"))?;
            (!d.is_zero()).then_some(d)
        }
    };
    let mut min_healthy: Vec<(String, f64)> = Vec::new();
    for (cluster, percent) in &hc.cluster_min_healthy_percentages {
        if !(0.0..=100.0).contains(&percent.value) {
            return Err(ConfigError::new(
                join(path, &format!("cluster_min_healthy_percentages.{cluster}")),
                "must be between 0 and 100",
            ));
        }
        min_healthy.push((cluster.clone(), percent.value));
    }
    // A map in the proto: sorted so that equal configs compare equal.
    min_healthy.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(HealthCheckConfig {
        headers: HeaderMatchers::new(&hc.headers, &join(path, "headers"))?,
        pass_through,
        cache_time,
        min_healthy,
    })
}

fn skippable_http_filter(any: &Any) -> bool {
    match type_name(&any.type_url) {
        "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig" => true,
        "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig" => true,
        super::listener::ISTIO_STATS => true,
        "udpa.type.v1.TypedStruct" | "xds.type.v3.TypedStruct" => IstioFilter::of(any).is_some_and(|f| {
            // Newer istiod's native peer metadata filter (it only adds Istio's peer metadata headers), in a
            // TypedStruct.
            f.typed_struct_type().is_some_and(|t| type_name(t) == "io.istio.http.peer_metadata.Config")
                || f.is_null_vm_plugin()
        }),
        "envoy.extensions.filters.http.wasm.v3.Wasm" => IstioFilter::of(any).is_some_and(|f| f.is_null_vm_plugin()),
        _ => false,
    }
}

pub(crate) fn is_hcm(type_url: &str) -> bool {
    type_name(type_url) == TYPE_HCM
}

/// A route configuration from RDS: audited like every resource (no set field ignored), then compiled.
pub fn route_table(
    rc: &envoy_types::pb::envoy::config::route::v3::RouteConfiguration,
) -> Result<RouteTable, ConfigError> {
    super::audit_resource(rc, "envoy.config.route.v3.RouteConfiguration")?;
    RouteTable::new(rc)
}
