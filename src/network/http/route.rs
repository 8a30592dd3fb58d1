//! The route table: compiles an Envoy `RouteConfiguration` into an immutable [`RouteTable`] and answers which virtual
//! host and route a request takes, with Envoy's matching rules.
//!
//! Built once per RDS update on the control thread and shared by every worker behind an `Arc`, so everything here
//! is plain data (`Send + Sync`) and matching allocates nothing in the common case: exact domains sit in a hash map,
//! wildcards in per-length maps, regexes are compiled once. Every conversion error names its field relative to the
//! `RouteConfiguration`; a value we read and do not honour is refused rather than ignored. Fields that are only
//! metadata or telemetry (`name`, `decorator`, `metadata`, `validate_clusters`) are accepted and ignored;
//! `typed_per_filter_config` carries the fault and CORS filters' per-route configs (any other filter's is refused);
//! fields this module never reads are left to the descriptor-driven field audit.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::config::{ConfigError, duration, join};

/// Envoy's route timeout when `RouteAction.timeout` is unset.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's retry back-off base interval when `retry_back_off` is unset.
pub const DEFAULT_RETRY_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Envoy's default `max_direct_response_body_size_bytes`.
pub const DEFAULT_MAX_DIRECT_RESPONSE_BODY: u32 = 4096;

const PREVIOUS_HOSTS_NAME: &str = "envoy.retry_host_predicates.previous_hosts";
const PREVIOUS_PRIORITIES_NAME: &str = "envoy.retry_priorities.previous_priorities";
const PREVIOUS_PRIORITIES_TYPE: &str =
    "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig";
const PREVIOUS_HOSTS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

/// A compiled `RouteConfiguration`.
#[derive(Debug)]
pub struct RouteTable {
    name: String,
    vhosts: Vec<VirtualHost>,
    /// Host → index into `vhosts`.
    domains: DomainIndex,
    ignore_port_in_host_matching: bool,
    most_specific_header_mutations_wins: bool,
    request_headers: HeaderMutations,
    response_headers: HeaderMutations,
    /// Every cluster named by a route, sorted and deduplicated.
    cluster_names: Vec<String>,
    per_filter: PerFilter,
}

/// A virtual host's `require_tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRequirement {
    None,
    /// `ALL`: every request that did not come over TLS is redirected to https.
    All,
    /// `EXTERNAL_ONLY`: only external requests (not marked `x-envoy-internal`).
    ExternalOnly,
}

/// A `typed_per_filter_config`: the per-route configs of the filters we run that read one (fault, CORS), by
/// filter name.
pub type PerFilter = Vec<(String, FilterOverride)>;

/// One filter's per-route config.
#[derive(Debug)]
pub enum FilterOverride {
    /// `FilterConfig.disabled`: the filter does nothing here.
    Disabled,
    Fault(std::sync::Arc<super::fault::FaultConfig>),
    Cors(std::sync::Arc<super::cors::CorsPolicy>),
}

/// Compiles a route's, virtual host's or route configuration's `typed_per_filter_config`. A config for any filter
/// other than fault and CORS is refused: no other filter we run reads per-route config.
fn per_filter_configs(
    map: &std::collections::HashMap<String, envoy_types::pb::google::protobuf::Any>,
    path: &str,
) -> Result<PerFilter, ConfigError> {
    use crate::config::listener::{decode_any, type_name};
    let mut out = Vec::new();
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    for name in names {
        let at = join(path, &format!("typed_per_filter_config[\"{name}\"]"));
        let mut any = map[name].clone();
        if type_name(&any.type_url) == "envoy.config.route.v3.FilterConfig" {
            let fc: rpb::FilterConfig = decode_any(&any, &at)?;
            if fc.disabled {
                out.push((name.clone(), FilterOverride::Disabled));
                continue;
            }
            match fc.config {
                Some(inner) => any = inner,
                None => return Err(ConfigError::new(join(&at, "config"), "a filter config is required")),
            }
        }
        let config = match type_name(&any.type_url) {
            super::fault::TYPE_HTTP_FAULT => {
                FilterOverride::Fault(std::sync::Arc::new(super::fault::FaultConfig::from_any(&any, &at)?))
            }
            super::cors::TYPE_CORS_POLICY => {
                let c = decode_any(&any, &at)?;
                FilterOverride::Cors(std::sync::Arc::new(super::cors::CorsPolicy::from_filter(&c, &at)?))
            }
            other => {
                return Err(ConfigError::new(
                    at,
                    format!("per-route config for {other} is not supported (only the fault and CORS filters')"),
                ));
            }
        };
        out.push((name.clone(), config));
    }
    Ok(out)
}

/// What a request carries that routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a http::Method,
    /// Path and query are read from here; `:scheme` header matchers read its scheme when it has one.
    pub uri: &'a http::Uri,
    /// `:authority`, or the Host header on HTTP/1; may carry a port.
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
}

/// The result of routing a request: borrowed from the table for as long as the request holds its `Arc`.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'a> {
    pub vhost: &'a VirtualHost,
    pub route: &'a Route,
    table: &'a RouteTable,
}

#[derive(Debug)]
pub struct VirtualHost {
    name: String,
    routes: Vec<Route>,
    /// `include_request_attempt_count`: upstream requests carry `x-envoy-attempt-count`.
    pub include_attempt_count: bool,
    require_tls: TlsRequirement,
    request_headers: HeaderMutations,
    response_headers: HeaderMutations,
    per_filter: PerFilter,
    /// The deprecated `cors` field, which Istio 1.14 still sends.
    cors: Option<std::sync::Arc<super::cors::CorsPolicy>>,
}

#[derive(Debug)]
pub struct Route {
    name: String,
    path: PathMatch,
    grpc: bool,
    headers: Vec<HeaderMatcher>,
    query_parameters: Vec<QueryParameterMatcher>,
    action: Action,
    request_headers: HeaderMutations,
    response_headers: HeaderMutations,
    per_filter: PerFilter,
}

// One per route, built once and only read: boxing the large variant would add an indirection per request and save
// nothing that matters.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Action {
    Route(RouteAction),
    Redirect(Redirect),
    DirectResponse { status: StatusCode, body: Vec<u8> },
}

#[derive(Debug)]
pub struct RouteAction {
    pub cluster: ClusterSpecifier,
    /// The status to answer with when the chosen cluster does not exist (or `cluster_header` is missing, which
    /// Envoy treats the same way): `cluster_not_found_response_code`, 503 by default.
    pub cluster_not_found_status: StatusCode,
    /// Whole-request upstream timeout, retries included; `None` when configured as 0.
    pub timeout: Option<Duration>,
    /// Per-route stream idle timeout. `None`: the connection manager's applies; `Some(ZERO)`: disabled even if the
    /// connection manager configures one.
    pub idle_timeout: Option<Duration>,
    /// The route's retry policy, else the virtual host's (never merged, as in Envoy).
    pub retry_policy: Option<RetryPolicy>,
    pub host_rewrite: HostRewrite,
    rewrite: PathRewrite,
    /// The deprecated `cors` field, which Istio 1.14 still sends.
    cors: Option<std::sync::Arc<super::cors::CorsPolicy>>,
    /// `hash_policy`: what a RING_HASH cluster hashes to pick a host for this route's requests.
    hash_policy: Vec<HashPolicy>,
    /// How long a stream on this route may last (see [`StreamDuration`]).
    pub stream_duration: StreamDuration,
    /// `request_mirror_policies`: the route's, else the virtual host's (never merged, as in Envoy).
    pub mirrors: Vec<MirrorPolicy>,
}

/// One of Envoy's `request_mirror_policies`: a copy of the request goes to another cluster, fire and forget (its
/// answer is dropped), with `-shadow` appended to its host.
#[derive(Debug, Clone)]
pub struct MirrorPolicy {
    pub cluster: MirrorCluster,
    /// `runtime_fraction`'s default: the share of requests mirrored; None: all of them.
    fraction: Option<super::fault::Percent>,
    pub host: ShadowHost,
}

#[derive(Debug, Clone)]
pub enum MirrorCluster {
    Name(String),
    /// The cluster named by this request header's first value; no header, no copy.
    Header(HeaderName),
}

/// The mirrored request's Host.
#[derive(Debug, Clone)]
pub enum ShadowHost {
    /// The request's, with `-shadow` before any port (Envoy's default).
    Suffixed,
    /// `disable_shadow_host_suffix_append`: the request's as it is.
    Unchanged,
    /// `host_rewrite_literal`.
    Literal(HeaderValue),
}

impl MirrorPolicy {
    fn new(m: &rpb::route_action::RequestMirrorPolicy, path: &str) -> Result<MirrorPolicy, ConfigError> {
        let cluster = match (m.cluster.as_str(), m.cluster_header.as_str()) {
            ("", "") => {
                return Err(ConfigError::new(join(path, "cluster"), "a mirror policy needs cluster or cluster_header"));
            }
            (c, "") => MirrorCluster::Name(c.to_string()),
            ("", h) => MirrorCluster::Header(header_name(h, &join(path, "cluster_header"))?),
            _ => {
                return Err(ConfigError::new(
                    join(path, "cluster_header"),
                    "only one of cluster and cluster_header may be set",
                ));
            }
        };
        if !m.request_headers_mutations.is_empty() {
            return Err(ConfigError::new(join(path, "request_headers_mutations"), "not supported"));
        }
        if m.runtime_fraction.as_ref().is_some_and(|f| !f.runtime_key.is_empty()) {
            // Without a runtime there is no key to read: its default_value is what Envoy uses then.
            tracing::debug!("mirror policy runtime_key ignored: no runtime, the default_value applies");
        }
        let fraction = m.runtime_fraction.as_ref().map(|f| super::fault::Percent::of(f.default_value.as_ref()));
        let host = if !m.host_rewrite_literal.is_empty() {
            ShadowHost::Literal(
                HeaderValue::from_str(&m.host_rewrite_literal)
                    .map_err(|_| ConfigError::new(join(path, "host_rewrite_literal"), "not a valid header value"))?,
            )
        } else if m.disable_shadow_host_suffix_append {
            ShadowHost::Unchanged
        } else {
            ShadowHost::Suffixed
        };
        Ok(MirrorPolicy { cluster, fraction, host })
    }

    /// Whether this request is mirrored (the `runtime_fraction` draw).
    pub fn draw(&self) -> bool {
        self.fraction.is_none_or(super::fault::Percent::draw)
    }

    /// The shadow cluster for a request with these headers.
    pub fn cluster_name<'h>(&'h self, headers: &'h HeaderMap) -> Option<&'h str> {
        match &self.cluster {
            MirrorCluster::Name(n) => Some(n),
            MirrorCluster::Header(h) => headers.get(h).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()),
        }
    }

    /// The mirrored request's Host, given the one the request goes upstream with.
    pub fn host(&self, host: &str) -> Option<HeaderValue> {
        match &self.host {
            ShadowHost::Literal(v) => Some(v.clone()),
            ShadowHost::Unchanged => HeaderValue::from_str(host).ok(),
            // Envoy's shadow host: "name:port" becomes "name-shadow:port" (an IPv6 literal keeps its brackets).
            ShadowHost::Suffixed => {
                let (name, port) = host.split_at(port_start(host.as_bytes()).unwrap_or(host.len()));
                HeaderValue::from_str(&format!("{name}-shadow{port}")).ok()
            }
        }
    }
}

fn mirror_policies(
    list: &[rpb::route_action::RequestMirrorPolicy],
    path: &str,
) -> Result<Vec<MirrorPolicy>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, m)| MirrorPolicy::new(m, &join(path, &format!("request_mirror_policies[{i}]"))))
        .collect()
}

/// Envoy's limits on a stream's whole duration for one route. With a `max_stream_duration` message (Envoy's "new
/// timeouts", what Istio sends): the connection manager ends the stream at the route's `max_stream_duration` (0
/// disables; absent, the HCM's), or, for a gRPC request with a `grpc-timeout` header when `grpc_timeout_header_max`
/// is set, at that header's deadline (capped unless the max is 0, less the offset). Without it, the deprecated
/// `max_grpc_timeout` (and `grpc_timeout_offset`) turn a gRPC request's `grpc-timeout` into the route timeout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StreamDuration {
    /// No `max_stream_duration` message and no `max_grpc_timeout`: the HCM's `max_stream_duration` applies.
    #[default]
    Hcm,
    New {
        /// None: the HCM's; Some(ZERO): none at all.
        max: Option<Duration>,
        grpc_header_max: Option<Duration>,
        grpc_header_offset: Duration,
    },
    /// The legacy gRPC route timeout: `max_grpc_timeout` (0: uncapped) and `grpc_timeout_offset`.
    LegacyGrpc { max: Duration, offset: Duration },
}

impl StreamDuration {
    /// Envoy's "new timeouts": a route with a `max_stream_duration` message has no route timeout (its `timeout` is
    /// not read); the stream's duration limit takes its place.
    pub fn replaces_route_timeout(&self) -> bool {
        matches!(self, StreamDuration::New { .. })
    }

    /// Whether a gRPC request's upstream `grpc-timeout` is rewritten to the time the router will wait (the legacy
    /// `max_grpc_timeout` only).
    pub fn rewrites_grpc_timeout(&self) -> bool {
        matches!(self, StreamDuration::LegacyGrpc { .. })
    }

    /// The stream's duration limit for a request with these headers (None: no limit; zero: already over), given the
    /// HCM's.
    pub fn limit(&self, headers: &http::HeaderMap, hcm: Option<Duration>) -> Option<Duration> {
        if let StreamDuration::New { grpc_header_max: Some(cap), grpc_header_offset, .. } = *self
            && let Some(t) = is_grpc(headers).then(|| grpc_timeout(headers)).flatten()
        {
            let t = if !cap.is_zero() && t > cap { cap } else { t };
            // Envoy: an offset that eats the whole deadline (or a 0 header) leaves none, and the stream ends at once.
            return Some(t.saturating_sub(grpc_header_offset));
        }
        match *self {
            StreamDuration::New { max: Some(max), .. } => Some(max).filter(|t| !t.is_zero()),
            StreamDuration::New { max: None, .. } | StreamDuration::Hcm | StreamDuration::LegacyGrpc { .. } => {
                hcm.filter(|t| !t.is_zero())
            }
        }
    }

    /// The route timeout for this request under the legacy gRPC settings (None: the route's own timeout stands).
    /// Envoy: the header's value less the offset (unless that would reach 0), capped by `max_grpc_timeout` unless
    /// it is 0; no header means no timeout, or the cap.
    pub fn grpc_route_timeout(&self, headers: &http::HeaderMap) -> Option<Option<Duration>> {
        let StreamDuration::LegacyGrpc { max, offset } = *self else { return None };
        if !is_grpc(headers) {
            return None;
        }
        let mut t = grpc_timeout(headers).unwrap_or_default();
        if offset < t {
            t -= offset;
        }
        if !max.is_zero() && (t.is_zero() || t > max) {
            t = max;
        }
        Some(Some(t).filter(|t| !t.is_zero()))
    }
}

/// The `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n), per the gRPC wire spec; None if absent or
/// malformed.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// One of a route's `hash_policy` entries.
#[derive(Debug)]
struct HashPolicy {
    on: HashOn,
    /// Stop here if this or an earlier policy produced a hash.
    terminal: bool,
}

#[derive(Debug)]
enum HashOn {
    Header(HeaderName),
    Cookie(CookiePolicy),
    SourceIp,
    QueryParameter(String),
}

/// A `cookie` hash policy. With a `ttl` the router makes the cookie up when the request has none, as Envoy does: its
/// value is the hex xxHash64 of the connection's remote and local addresses (so requests on one connection agree),
/// sent back in a `Set-Cookie` on the upstream's response.
#[derive(Debug)]
struct CookiePolicy {
    name: String,
    /// The `Set-Cookie` to send with a generated value: everything but the value (`name="` and the attributes).
    generate: Option<(String, String)>,
}

impl CookiePolicy {
    fn new(c: &rpb::route_action::hash_policy::Cookie) -> CookiePolicy {
        let generate = c.ttl.as_ref().map(|ttl| {
            // Envoy's makeSetCookieValue: a quoted value, Max-Age unless 0 (a session cookie), Path, the listed
            // attributes, HttpOnly.
            let mut rest = String::from("\"");
            if ttl.seconds > 0 {
                rest.push_str(&format!("; Max-Age={}", ttl.seconds));
            }
            if !c.path.is_empty() {
                rest.push_str(&format!("; Path={}", c.path));
            }
            for a in &c.attributes {
                rest.push_str("; ");
                rest.push_str(&a.name);
                if !a.value.is_empty() {
                    rest.push('=');
                    rest.push_str(&a.value);
                }
            }
            rest.push_str("; HttpOnly");
            (format!("{}=\"", c.name), rest)
        });
        CookiePolicy { name: c.name.clone(), generate }
    }
}

/// The downstream connection a request came on, for hash policies that look at it.
#[derive(Debug, Clone, Copy)]
pub struct HashSource {
    /// The trusted client address (Envoy's downstream remote address): what `source_ip` hashes.
    pub client: std::net::IpAddr,
    /// The connection's own addresses, which a generated cookie's value is made of.
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
}

fn hash_policies(list: &[rpb::route_action::HashPolicy], path: &str) -> Result<Vec<HashPolicy>, ConfigError> {
    use rpb::route_action::hash_policy::PolicySpecifier as S;
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let at = join(path, &format!("hash_policy[{i}]"));
        let on = match &p.policy_specifier {
            Some(S::Header(h)) => {
                if h.regex_rewrite.is_some() {
                    return Err(ConfigError::new(join(&at, "header.regex_rewrite"), "regex_rewrite is not supported"));
                }
                HashOn::Header(
                    HeaderName::from_bytes(h.header_name.to_ascii_lowercase().as_bytes())
                        .map_err(|_| ConfigError::new(join(&at, "header.header_name"), "not a valid header name"))?,
                )
            }
            Some(S::Cookie(c)) => {
                for (j, a) in c.attributes.iter().enumerate() {
                    let bad = a.name.is_empty()
                        || HeaderValue::from_str(&format!("{}={}", a.name, a.value)).is_err()
                        || a.name.contains([';', '=']);
                    if bad {
                        return Err(ConfigError::new(
                            join(&at, &format!("cookie.attributes[{j}]")),
                            "not a valid cookie attribute",
                        ));
                    }
                }
                if HeaderValue::from_str(&format!("{}={}", c.name, c.path)).is_err() || c.path.contains(';') {
                    return Err(ConfigError::new(join(&at, "cookie"), "name or path not valid in a Set-Cookie header"));
                }
                HashOn::Cookie(CookiePolicy::new(c))
            }
            Some(S::ConnectionProperties(c)) if c.source_ip => HashOn::SourceIp,
            Some(S::ConnectionProperties(_)) => continue,
            Some(S::QueryParameter(q)) => HashOn::QueryParameter(q.name.clone()),
            Some(S::FilterState(_)) => {
                return Err(ConfigError::new(join(&at, "filter_state"), "filter_state hashing is not supported"));
            }
            None => {
                return Err(ConfigError::new(
                    at,
                    "a hash policy needs header, cookie, connection_properties or query_parameter",
                ));
            }
        };
        out.push(HashPolicy { on, terminal: p.terminal });
    }
    Ok(out)
}

impl RouteAction {
    /// The request's hash under the route's `hash_policy`, combined as Envoy combines them; None when no policy
    /// applies (a RING_HASH cluster then picks at random).
    /// A cookie policy with a `ttl` whose cookie the request lacks adds the `Set-Cookie` for the upstream's
    /// response to `set_cookies`.
    pub fn request_hash(
        &self,
        headers: &HeaderMap,
        uri: &http::Uri,
        source: &HashSource,
        set_cookies: &mut Vec<HeaderValue>,
    ) -> Option<u64> {
        use crate::upstream::lb::{combine, hash_value};
        let mut hash = None;
        for p in &self.hash_policy {
            let value = match &p.on {
                HashOn::Header(name) => headers.get(name).map(|v| hash_value(v.as_bytes())),
                HashOn::Cookie(c) => match (cookie(headers, &c.name), &c.generate) {
                    (Some(v), _) => Some(hash_value(v.as_bytes())),
                    (None, Some((head, tail))) => {
                        let made =
                            format!("{:016x}", hash_value(format!("{}{}", source.peer, source.local).as_bytes()));
                        if let Ok(v) = HeaderValue::from_str(&format!("{head}{made}{tail}")) {
                            set_cookies.push(v);
                        }
                        Some(hash_value(made.as_bytes()))
                    }
                    (None, None) => None,
                },
                HashOn::SourceIp => Some(hash_value(source.client.to_string().as_bytes())),
                HashOn::QueryParameter(name) => uri
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix(name.as_str())?.strip_prefix('=')))
                    .map(|v| hash_value(v.as_bytes())),
            };
            if let Some(v) = value {
                hash = Some(combine(hash, v));
            }
            if p.terminal && hash.is_some() {
                break;
            }
        }
        hash
    }
}

/// A cookie's value from the request's `Cookie` headers, without the double quotes it may be wrapped in (as Envoy's
/// parseCookieValue reads it, so a generated `name="value"` cookie comes back as the same value).
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get_all(http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|line| {
        line.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            let v = match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                Some(unquoted) => unquoted,
                None => v,
            };
            // An empty value is no cookie at all to Envoy.
            (k == name && !v.is_empty()).then_some(v)
        })
    })
}

#[derive(Debug)]
pub enum ClusterSpecifier {
    Cluster(String),
    Weighted(WeightedClusters),
    /// The cluster is the first value of this request header.
    Header(HeaderName),
}

#[derive(Debug)]
pub struct WeightedClusters {
    /// (cluster, weight) in configuration order; weights may be 0.
    pub clusters: Vec<(String, u32)>,
    /// What each entry adds when it is the one picked (Istio's per-destination `headers`), by position.
    extras: Vec<Option<Box<ClusterExtras>>>,
    /// The sum of the weights, greater than 0.
    pub total_weight: u64,
}

/// The cluster a request goes to, and with weighted clusters the chosen entry's own mutations and host rewrite (an
/// entry, not a name: two entries may name the same cluster with different extras).
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub name: Cow<'a, str>,
    pub extras: Option<&'a ClusterExtras>,
}

/// A weighted cluster entry's own header mutations and host rewrite, applied when it is picked: its headers before
/// the route's, virtual host's and configuration's; its host rewrite unless the route rewrites the host itself
/// (Envoy applies the entry's, then the route's over it).
#[derive(Debug)]
pub struct ClusterExtras {
    request_headers: HeaderMutations,
    response_headers: HeaderMutations,
    pub host_rewrite: Option<HeaderValue>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRewrite {
    None,
    Literal(String),
    /// Replace the Host with the chosen upstream host's hostname (`auto_host_rewrite`).
    Auto,
}

#[derive(Debug)]
pub struct Redirect {
    /// `scheme_redirect`, or `https` for `https_redirect`.
    scheme: Option<String>,
    host: Option<String>,
    port: Option<u32>,
    path: RedirectPath,
    strip_query: bool,
    status: StatusCode,
    /// How much of the request path the route matched, for `prefix_rewrite`.
    matched: MatchedPart,
}

#[derive(Debug)]
enum RedirectPath {
    Keep,
    /// `path_redirect`, and whether it carries its own query (which then wins over the request's and `strip_query`).
    Replace {
        path: String,
        has_query: bool,
    },
    Rewrite(PathRewrite),
}

/// Envoy's retry policy for a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    /// Only consulted when `retry_on.retriable_status_codes` is set.
    pub retriable_status_codes: Vec<u16>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// `envoy.retry_host_predicates.previous_hosts`: a retry avoids the hosts already tried.
    pub avoid_previous_hosts: bool,
    /// `host_selection_retry_max_attempts`: how many more picks a retry makes to find a host the predicate accepts
    /// before it takes the last one (Envoy's default 1; Istio sends 5).
    pub host_selection_attempts: u32,
    /// `envoy.retry_priorities.previous_priorities`'s `update_frequency` (Istio's `retryRemoteLocalities` sends 2):
    /// every that many attempts, the priorities tried so far leave the priority load, so retries go elsewhere.
    pub previous_priorities: Option<u32>,
}

/// The `retry_on` conditions, one flag per token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, and any reset or connect failure.
    pub five_xx: bool,
    /// `gateway-error`: 502, 503 or 504, and any reset or connect failure.
    pub gateway_error: bool,
    /// `connect-failure`.
    pub connect_failure: bool,
    /// `reset`: no response at all (disconnect, reset, read timeout), connect failures included.
    pub reset: bool,
    /// `retriable-status-codes`: the codes in `RetryPolicy::retriable_status_codes`.
    pub retriable_status_codes: bool,
    /// `refused-stream`: the upstream reset the stream with REFUSED_STREAM.
    pub refused_stream: bool,
    /// `retriable-4xx`: 409.
    pub retriable_4xx: bool,
    /// gRPC `cancelled` (grpc-status 1).
    pub grpc_cancelled: bool,
    /// gRPC `deadline-exceeded` (4).
    pub grpc_deadline_exceeded: bool,
    /// gRPC `resource-exhausted` (8).
    pub grpc_resource_exhausted: bool,
    /// gRPC `internal` (13).
    pub grpc_internal: bool,
    /// gRPC `unavailable` (14).
    pub grpc_unavailable: bool,
    /// `reset-before-request`: the attempt failed before any of the request went upstream (a connect failure).
    /// Istio 1.24 puts it on every inbound route.
    pub reset_before_request: bool,
}

/// Why an upstream attempt produced no response, for [`RetryPolicy::should_retry_failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    ConnectFailure,
    RefusedStream,
    /// Any other reset or disconnect before a response.
    Reset,
}

impl RouteTable {
    pub fn new(rc: &rpb::RouteConfiguration) -> Result<RouteTable, ConfigError> {
        if rc.vhds.is_some() {
            return Err(ConfigError::new("vhds", "VHDS is not supported"));
        }
        if !rc.vhost_header.is_empty() {
            return Err(ConfigError::new("vhost_header", "vhost_header is not supported"));
        }
        if rc.ignore_path_parameters_in_path_matching {
            return Err(ConfigError::new(
                "ignore_path_parameters_in_path_matching",
                "ignore_path_parameters_in_path_matching is not supported",
            ));
        }
        if !rc.route_specifiers.is_empty() {
            return Err(ConfigError::new("route_specifiers", "route_specifiers are not supported"));
        }
        let max_body =
            rc.max_direct_response_body_size_bytes.as_ref().map_or(DEFAULT_MAX_DIRECT_RESPONSE_BODY, |v| v.value);
        let request_headers =
            HeaderMutations::new(&rc.request_headers_to_add, &rc.request_headers_to_remove, "", "request")?;
        let response_headers =
            HeaderMutations::new(&rc.response_headers_to_add, &rc.response_headers_to_remove, "", "response")?;

        let vhosts = rc
            .virtual_hosts
            .iter()
            .enumerate()
            .map(|(i, vh)| VirtualHost::new(vh, &format!("virtual_hosts[{i}]"), max_body))
            .collect::<Result<Vec<_>, _>>()?;
        let domains = DomainIndex::new(&rc.virtual_hosts)?;

        let mut names = BTreeSet::new();
        for route in vhosts.iter().flat_map(|v| &v.routes) {
            if let Action::Route(a) = &route.action {
                match &a.cluster {
                    ClusterSpecifier::Cluster(c) => {
                        names.insert(c.clone());
                    }
                    ClusterSpecifier::Weighted(w) => names.extend(w.clusters.iter().map(|(c, _)| c.clone())),
                    ClusterSpecifier::Header(_) => {}
                }
                // Envoy validates shadow clusters as it does the route's own.
                names.extend(a.mirrors.iter().filter_map(|m| match &m.cluster {
                    MirrorCluster::Name(n) => Some(n.clone()),
                    MirrorCluster::Header(_) => None,
                }));
            }
        }
        Ok(RouteTable {
            name: rc.name.clone(),
            vhosts,
            domains,
            ignore_port_in_host_matching: rc.ignore_port_in_host_matching,
            most_specific_header_mutations_wins: rc.most_specific_header_mutations_wins,
            request_headers,
            response_headers,
            cluster_names: names.into_iter().collect(),
            per_filter: per_filter_configs(&rc.typed_per_filter_config, "")?,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Clusters this table can route to by name (`cluster` and `weighted_clusters`; not `cluster_header`), sorted
    /// and without duplicates.
    pub fn cluster_names(&self) -> impl Iterator<Item = &str> {
        self.cluster_names.iter().map(String::as_str)
    }

    pub fn virtual_hosts(&self) -> &[VirtualHost] {
        &self.vhosts
    }

    /// The virtual host a request's authority selects.
    pub fn virtual_host(&self, req: &RequestHead<'_>) -> Option<&VirtualHost> {
        self.vhosts.get(self.virtual_host_index(req.authority.as_bytes())?)
    }

    /// The route for a request, or `None` when no virtual host or no route matches (Envoy answers 404, flag NR).
    pub fn route<'a>(&'a self, req: &RequestHead<'_>) -> Option<Matched<'a>> {
        self.route_in(self.virtual_host(req)?, req)
    }

    /// The route for a request in its virtual host ([`RouteTable::virtual_host`]).
    pub fn route_in<'a>(&'a self, vhost: &'a VirtualHost, req: &RequestHead<'_>) -> Option<Matched<'a>> {
        let path_and_query = path_and_query(req.uri);
        let path = strip_query(path_and_query);
        // Envoy checks the other criteria before the path; all are pure conjunctions, so the cheap path goes first.
        let route = vhost.routes.iter().find(|r| {
            r.path.matches(path)
                && (!r.grpc || is_grpc(req.headers))
                && r.headers.iter().all(|h| h.matches(req))
                && (r.query_parameters.is_empty() || {
                    let query = path_and_query.split_once('?').map_or("", |(_, q)| q);
                    r.query_parameters.iter().all(|q| q.matches(query))
                })
        })?;
        Some(Matched { vhost, route, table: self })
    }

    /// The Host is matched with its port unless `ignore_port_in_host_matching`: Envoy does not retry without the
    /// port (Istio lists both `host` and `host:port`).
    fn virtual_host_index(&self, mut host: &[u8]) -> Option<usize> {
        if self.ignore_port_in_host_matching
            && let Some(port) = port_start(host)
        {
            host = host.get(..port).unwrap_or(host);
        }
        self.domains.find(host)
    }
}

/// Lower-cased domain (or the non-`*` part of a wildcard) → index of its virtual host.
type DomainMap = HashMap<Box<[u8]>, usize>;
/// Wildcard domains grouped by the length of their non-`*` part, longest first.
type Wildcards = Vec<(usize, DomainMap)>;

/// Envoy's virtual host search: exact domain, then the longest suffix wildcard (`*.foo.com`, `*-bar.foo.com`), then
/// the longest prefix wildcard (`foo.*`), then `*`, all case-insensitive.
#[derive(Debug, Default)]
struct DomainIndex {
    exact: DomainMap,
    suffixes: Wildcards,
    prefixes: Wildcards,
    /// The virtual host whose domains include `*`.
    default: Option<usize>,
}

impl DomainIndex {
    fn new(vhosts: &[rpb::VirtualHost]) -> Result<DomainIndex, ConfigError> {
        let mut index = DomainIndex::default();
        let mut suffixes: HashMap<usize, DomainMap> = HashMap::new();
        let mut prefixes: HashMap<usize, DomainMap> = HashMap::new();
        // Lower-cased domain → where it was first seen, so a duplicate names both places.
        let mut seen: HashMap<String, String> = HashMap::new();
        for (i, vh) in vhosts.iter().enumerate() {
            let path = format!("virtual_hosts[{i}]");
            if vh.domains.is_empty() {
                return Err(ConfigError::new(join(&path, "domains"), "a virtual host needs at least one domain"));
            }
            for (j, domain) in vh.domains.iter().enumerate() {
                let dpath = join(&path, &format!("domains[{j}]"));
                if domain.bytes().any(|b| b == 0 || b == b'\r' || b == b'\n') {
                    return Err(ConfigError::new(dpath, "domains cannot contain NUL, CR or LF"));
                }
                // Envoy lower-cases domains, so `Foo.com` and `foo.com` are duplicates.
                let lower = domain.to_ascii_lowercase();
                if let Some(first) = seen.get(&lower) {
                    let message = if lower == "*" {
                        format!("only one virtual host may have the \"*\" domain (already in {first})")
                    } else {
                        format!("duplicate domain \"{lower}\" (already in {first}); domains must be unique")
                    };
                    return Err(ConfigError::new(dpath, message));
                }
                let bytes = lower.as_bytes();
                if lower == "*" {
                    index.default = Some(i);
                } else if let Some(suffix) = bytes.strip_prefix(b"*") {
                    suffixes.entry(suffix.len()).or_default().insert(suffix.into(), i);
                } else if let Some(prefix) = bytes.strip_suffix(b"*") {
                    prefixes.entry(prefix.len()).or_default().insert(prefix.into(), i);
                } else {
                    index.exact.insert(bytes.into(), i);
                }
                seen.insert(lower, dpath);
            }
        }
        index.suffixes = longest_first(suffixes);
        index.prefixes = longest_first(prefixes);
        Ok(index)
    }

    fn find(&self, host: &[u8]) -> Option<usize> {
        if self.exact.is_empty() && self.suffixes.is_empty() && self.prefixes.is_empty() {
            return self.default;
        }
        with_ascii_lowercase(host, |host| {
            self.exact
                .get(host)
                .copied()
                .or_else(|| find_wildcard(&self.suffixes, host, |h, n| h.get(h.len() - n..)))
                .or_else(|| find_wildcard(&self.prefixes, host, |h, n| h.get(..n)))
                .or(self.default)
        })
    }
}

impl VirtualHost {
    /// Envoy's `require_tls`: where a request must be redirected to https instead of routed, the `Location`
    /// (`https://` + its host and path, as Envoy's SSL redirect builds it). A request counts as TLS when its
    /// `x-forwarded-proto` (set or trusted by the connection manager) says https.
    pub fn tls_redirect(&self, req: &RequestHead<'_>) -> Option<String> {
        if self.require_tls == TlsRequirement::None {
            return None;
        }
        let proto = req.headers.get("x-forwarded-proto").map(http::HeaderValue::as_bytes);
        if proto == Some(b"https".as_slice()) {
            return None;
        }
        let internal = req.headers.get("x-envoy-internal").is_some_and(|v| v == "true");
        match self.require_tls {
            TlsRequirement::All => {}
            TlsRequirement::ExternalOnly if !internal => {}
            TlsRequirement::ExternalOnly | TlsRequirement::None => return None,
        }
        Some(format!("https://{}{}", req.authority, path_and_query(req.uri)))
    }

    fn new(vh: &rpb::VirtualHost, path: &str, max_body: u32) -> Result<VirtualHost, ConfigError> {
        if vh.name.is_empty() {
            return Err(ConfigError::new(join(path, "name"), "a virtual host needs a name"));
        }
        if vh.matcher.is_some() {
            return Err(ConfigError::new(join(path, "matcher"), "matcher trees are not supported; use routes"));
        }
        use rpb::virtual_host::TlsRequirementType as Tls;
        let require_tls = match Tls::try_from(vh.require_tls) {
            Ok(Tls::None) => TlsRequirement::None,
            Ok(Tls::All) => TlsRequirement::All,
            Ok(Tls::ExternalOnly) => TlsRequirement::ExternalOnly,
            Err(_) => {
                return Err(ConfigError::new(join(path, "require_tls"), format!("unknown value {}", vh.require_tls)));
            }
        };
        if !vh.route_specifiers.is_empty() {
            return Err(ConfigError::new(join(path, "route_specifiers"), "route_specifiers are not supported"));
        }
        let retry_policy =
            vh.retry_policy.as_ref().map(|p| RetryPolicy::new(p, &join(path, "retry_policy"))).transpose()?;
        let inherited =
            Inherited { retry: retry_policy.as_ref(), mirrors: &mirror_policies(&vh.request_mirror_policies, path)? };
        let routes = vh
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| Route::new(r, &join(path, &format!("routes[{i}]")), &inherited, max_body))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VirtualHost {
            name: vh.name.clone(),
            routes,
            include_attempt_count: vh.include_request_attempt_count,
            require_tls,
            per_filter: per_filter_configs(&vh.typed_per_filter_config, path)?,
            // Deprecated in Envoy's API, still what Istio 1.14 sends for a VirtualService's corsPolicy.
            #[allow(deprecated)]
            cors: vh
                .cors
                .as_ref()
                .map(|c| super::cors::CorsPolicy::from_route(c, &join(path, "cors")).map(std::sync::Arc::new))
                .transpose()?,
            request_headers: HeaderMutations::new(
                &vh.request_headers_to_add,
                &vh.request_headers_to_remove,
                path,
                "request",
            )?,
            response_headers: HeaderMutations::new(
                &vh.response_headers_to_add,
                &vh.response_headers_to_remove,
                path,
                "response",
            )?,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// What a virtual host gives the routes that do not set their own.
struct Inherited<'a> {
    retry: Option<&'a RetryPolicy>,
    mirrors: &'a [MirrorPolicy],
}

impl Route {
    fn new(r: &rpb::Route, path: &str, vhost: &Inherited<'_>, max_body: u32) -> Result<Route, ConfigError> {
        let mpath = join(path, "match");
        let m = r.r#match.as_ref().ok_or_else(|| ConfigError::new(&mpath, "a route needs a match"))?;
        let (path_match, headers, query_parameters) = route_match(m, &mpath)?;
        if !r.route_specifiers.is_empty() {
            return Err(ConfigError::new(join(path, "route_specifiers"), "route_specifiers are not supported"));
        }
        let matched = path_match.matched_part();
        let action = match &r.action {
            Some(rpb::route::Action::Route(a)) => Action::Route(RouteAction::new(a, &join(path, "route"), vhost)?),
            Some(rpb::route::Action::Redirect(a)) => {
                Action::Redirect(Redirect::new(a, &join(path, "redirect"), matched)?)
            }
            Some(rpb::route::Action::DirectResponse(d)) => {
                direct_response(d, &join(path, "direct_response"), max_body)?
            }
            Some(rpb::route::Action::FilterAction(_)) => {
                return Err(ConfigError::new(join(path, "filter_action"), "filter_action is not supported"));
            }
            Some(rpb::route::Action::NonForwardingAction(_)) => {
                return Err(ConfigError::new(
                    join(path, "non_forwarding_action"),
                    "non_forwarding_action is not supported",
                ));
            }
            None => return Err(ConfigError::new(path, "a route needs route, redirect or direct_response")),
        };
        Ok(Route {
            name: r.name.clone(),
            per_filter: per_filter_configs(&r.typed_per_filter_config, path)?,
            path: path_match,
            grpc: m.grpc.is_some(),
            headers,
            query_parameters,
            action,
            request_headers: HeaderMutations::new(
                &r.request_headers_to_add,
                &r.request_headers_to_remove,
                path,
                "request",
            )?,
            response_headers: HeaderMutations::new(
                &r.response_headers_to_add,
                &r.response_headers_to_remove,
                path,
                "response",
            )?,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn action(&self) -> &Action {
        &self.action
    }
}

fn route_match(
    m: &rpb::RouteMatch,
    path: &str,
) -> Result<(PathMatch, Vec<HeaderMatcher>, Vec<QueryParameterMatcher>), ConfigError> {
    use rpb::route_match::PathSpecifier as P;
    // Routing depends on each of these, so one left unread would change which route a request takes.
    if m.runtime_fraction.is_some() {
        return Err(ConfigError::new(join(path, "runtime_fraction"), "runtime_fraction is not supported"));
    }
    if m.tls_context.is_some() {
        return Err(ConfigError::new(join(path, "tls_context"), "tls_context matching is not supported"));
    }
    if !m.dynamic_metadata.is_empty() {
        return Err(ConfigError::new(join(path, "dynamic_metadata"), "dynamic_metadata matching is not supported"));
    }
    if !m.filter_state.is_empty() {
        return Err(ConfigError::new(join(path, "filter_state"), "filter_state matching is not supported"));
    }
    if !m.cookies.is_empty() {
        return Err(ConfigError::new(join(path, "cookies"), "cookie matching is not supported"));
    }
    let case_sensitive = m.case_sensitive.as_ref().is_none_or(|b| b.value);
    let path_match = match &m.path_specifier {
        Some(P::Prefix(p)) => PathMatch::Prefix { prefix: p.clone(), case_sensitive },
        Some(P::Path(p)) => PathMatch::Exact { path: p.clone(), case_sensitive },
        // case_sensitive does not apply to regexes (Envoy ignores it; `(?i)` does the job).
        Some(P::SafeRegex(r)) => PathMatch::Regex(full_match_regex(r, &join(path, "safe_regex"))?),
        Some(P::PathSeparatedPrefix(p)) => {
            // The proto's rule `^[^?#]+[^?#/]$`.
            let valid = p.len() >= 2 && !p.contains(['?', '#']) && !p.ends_with('/');
            if !valid {
                return Err(ConfigError::new(
                    join(path, "path_separated_prefix"),
                    "must be at least 2 characters, contain no '?' or '#', and not end in '/'",
                ));
            }
            PathMatch::SeparatedPrefix { prefix: p.clone(), case_sensitive }
        }
        Some(P::ConnectMatcher(_)) => {
            return Err(ConfigError::new(join(path, "connect_matcher"), "CONNECT matching is not supported"));
        }
        Some(P::PathMatchPolicy(_)) => {
            return Err(ConfigError::new(join(path, "path_match_policy"), "path_match_policy is not supported"));
        }
        None => {
            return Err(ConfigError::new(
                path,
                "a path specifier is required (prefix, path, safe_regex or path_separated_prefix)",
            ));
        }
    };
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| HeaderMatcher::new(h, &join(path, &format!("headers[{i}]"))))
        .collect::<Result<Vec<_>, _>>()?;
    let query_parameters = m
        .query_parameters
        .iter()
        .enumerate()
        .map(|(i, q)| QueryParameterMatcher::new(q, &join(path, &format!("query_parameters[{i}]"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((path_match, headers, query_parameters))
}

impl RouteAction {
    fn new(a: &rpb::RouteAction, path: &str, vhost: &Inherited<'_>) -> Result<RouteAction, ConfigError> {
        use rpb::route_action::{ClusterNotFoundResponseCode as Nf, ClusterSpecifier as C, HostRewriteSpecifier as H};
        let cluster = match &a.cluster_specifier {
            Some(C::Cluster(c)) if c.is_empty() => {
                return Err(ConfigError::new(join(path, "cluster"), "cluster must not be empty"));
            }
            Some(C::Cluster(c)) => ClusterSpecifier::Cluster(c.clone()),
            Some(C::ClusterHeader(h)) => ClusterSpecifier::Header(header_name(h, &join(path, "cluster_header"))?),
            Some(C::WeightedClusters(w)) => {
                ClusterSpecifier::Weighted(WeightedClusters::new(w, &join(path, "weighted_clusters"))?)
            }
            Some(C::ClusterSpecifierPlugin(_)) => {
                return Err(ConfigError::new(
                    join(path, "cluster_specifier_plugin"),
                    "cluster specifier plugins are not supported",
                ));
            }
            Some(C::InlineClusterSpecifierPlugin(_)) => {
                return Err(ConfigError::new(
                    join(path, "inline_cluster_specifier_plugin"),
                    "cluster specifier plugins are not supported",
                ));
            }
            None => {
                return Err(ConfigError::new(
                    path,
                    "a route action needs cluster, weighted_clusters or cluster_header",
                ));
            }
        };
        let cluster_not_found_status = match Nf::try_from(a.cluster_not_found_response_code) {
            Ok(Nf::ServiceUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Ok(Nf::NotFound) => StatusCode::NOT_FOUND,
            Ok(Nf::InternalServerError) => StatusCode::INTERNAL_SERVER_ERROR,
            Err(_) => {
                return Err(ConfigError::new(
                    join(path, "cluster_not_found_response_code"),
                    format!("unknown value {}", a.cluster_not_found_response_code),
                ));
            }
        };
        if a.metadata_match.is_some() {
            return Err(ConfigError::new(join(path, "metadata_match"), "subset load balancing is not supported"));
        }
        if a.append_x_forwarded_host {
            return Err(ConfigError::new(
                join(path, "append_x_forwarded_host"),
                "append_x_forwarded_host is not supported",
            ));
        }
        if a.path_rewrite_policy.is_some() {
            return Err(ConfigError::new(join(path, "path_rewrite_policy"), "path_rewrite_policy is not supported"));
        }
        if !a.path_rewrite.is_empty() {
            return Err(ConfigError::new(join(path, "path_rewrite"), "path_rewrite is not supported"));
        }
        if a.retry_policy_typed_config.is_some() {
            return Err(ConfigError::new(
                join(path, "retry_policy_typed_config"),
                "retry_policy_typed_config is not supported",
            ));
        }
        let rewrite = match (a.prefix_rewrite.as_str(), &a.regex_rewrite) {
            ("", None) => PathRewrite::None,
            (p, None) => PathRewrite::Prefix(header_value_text(p, &join(path, "prefix_rewrite"))?),
            ("", Some(r)) => PathRewrite::Regex(RegexRewrite::new(r, &join(path, "regex_rewrite"))?),
            (_, Some(_)) => {
                return Err(ConfigError::new(
                    join(path, "regex_rewrite"),
                    "only one of prefix_rewrite and regex_rewrite may be set",
                ));
            }
        };
        let host_rewrite = match &a.host_rewrite_specifier {
            None => HostRewrite::None,
            // Envoy treats an empty literal as no rewrite.
            Some(H::HostRewriteLiteral(h)) if h.is_empty() => HostRewrite::None,
            Some(H::HostRewriteLiteral(h)) => {
                HostRewrite::Literal(header_value_text(h, &join(path, "host_rewrite_literal"))?)
            }
            Some(H::AutoHostRewrite(b)) if b.value => HostRewrite::Auto,
            Some(H::AutoHostRewrite(_)) => HostRewrite::None,
            Some(H::HostRewriteHeader(_)) => {
                return Err(ConfigError::new(
                    join(path, "host_rewrite_header"),
                    "host_rewrite_header is not supported",
                ));
            }
            Some(H::HostRewritePathRegex(_)) => {
                return Err(ConfigError::new(
                    join(path, "host_rewrite_path_regex"),
                    "host_rewrite_path_regex is not supported",
                ));
            }
            Some(H::HostRewrite(_)) => {
                return Err(ConfigError::new(join(path, "host_rewrite"), "host_rewrite is not supported"));
            }
        };
        let timeout = match &a.timeout {
            None => Some(DEFAULT_ROUTE_TIMEOUT),
            Some(t) => Some(duration(t, &join(path, "timeout"))?).filter(|t| !t.is_zero()),
        };
        let idle_timeout = a.idle_timeout.as_ref().map(|t| duration(t, &join(path, "idle_timeout"))).transpose()?;
        let opt = |d: Option<&envoy_types::pb::google::protobuf::Duration>, field: &str| {
            d.map(|d| duration(d, &join(path, field))).transpose()
        };
        #[allow(deprecated)]
        let stream_duration = match (&a.max_stream_duration, &a.max_grpc_timeout) {
            (Some(m), _) => StreamDuration::New {
                max: opt(m.max_stream_duration.as_ref(), "max_stream_duration.max_stream_duration")?,
                grpc_header_max: opt(
                    m.grpc_timeout_header_max.as_ref(),
                    "max_stream_duration.grpc_timeout_header_max",
                )?,
                grpc_header_offset: opt(
                    m.grpc_timeout_header_offset.as_ref(),
                    "max_stream_duration.grpc_timeout_header_offset",
                )?
                .unwrap_or_default(),
            },
            (None, Some(max)) => StreamDuration::LegacyGrpc {
                max: duration(max, &join(path, "max_grpc_timeout"))?,
                offset: opt(a.grpc_timeout_offset.as_ref(), "grpc_timeout_offset")?.unwrap_or_default(),
            },
            (None, None) => StreamDuration::Hcm,
        };
        let retry_policy = match &a.retry_policy {
            Some(p) => Some(RetryPolicy::new(p, &join(path, "retry_policy"))?),
            None => vhost.retry.cloned(),
        };
        let mirrors = match mirror_policies(&a.request_mirror_policies, path)? {
            own if own.is_empty() => vhost.mirrors.to_vec(),
            own => own,
        };
        Ok(RouteAction {
            mirrors,
            cluster,
            cluster_not_found_status,
            timeout,
            idle_timeout,
            retry_policy,
            host_rewrite,
            rewrite,
            hash_policy: hash_policies(&a.hash_policy, path)?,
            stream_duration,
            // Deprecated in Envoy's API, still what Istio 1.14 sends for a VirtualService's corsPolicy.
            #[allow(deprecated)]
            cors: a
                .cors
                .as_ref()
                .map(|c| super::cors::CorsPolicy::from_route(c, &join(path, "cors")).map(std::sync::Arc::new))
                .transpose()?,
        })
    }
}

impl WeightedClusters {
    // `total_weight` is deprecated and current Envoy ignores it in favour of the sum.
    fn new(w: &rpb::WeightedCluster, path: &str) -> Result<WeightedClusters, ConfigError> {
        if w.clusters.is_empty() {
            return Err(ConfigError::new(join(path, "clusters"), "at least one cluster is required"));
        }
        if w.random_value_specifier.is_some() {
            return Err(ConfigError::new(
                path,
                "header_name and use_hash_policy (the random value specifier) are not supported",
            ));
        }
        let mut clusters = Vec::with_capacity(w.clusters.len());
        let mut extras = Vec::with_capacity(w.clusters.len());
        let mut total: u64 = 0;
        for (i, c) in w.clusters.iter().enumerate() {
            let cpath = join(path, &format!("clusters[{i}]"));
            if !c.cluster_header.is_empty() {
                return Err(ConfigError::new(join(&cpath, "cluster_header"), "cluster_header is not supported here"));
            }
            if c.name.is_empty() {
                return Err(ConfigError::new(join(&cpath, "name"), "a weighted cluster needs a name"));
            }
            if c.metadata_match.is_some() {
                return Err(ConfigError::new(join(&cpath, "metadata_match"), "subset load balancing is not supported"));
            }
            use rpb::weighted_cluster::cluster_weight::HostRewriteSpecifier as H;
            let host_rewrite =
                match &c.host_rewrite_specifier {
                    None => None,
                    Some(H::HostRewriteLiteral(h)) if h.is_empty() => None,
                    Some(H::HostRewriteLiteral(h)) => Some(HeaderValue::from_str(h).map_err(|_| {
                        ConfigError::new(join(&cpath, "host_rewrite_literal"), "not a valid header value")
                    })?),
                };
            let request_headers =
                HeaderMutations::new(&c.request_headers_to_add, &c.request_headers_to_remove, &cpath, "request")?;
            let response_headers =
                HeaderMutations::new(&c.response_headers_to_add, &c.response_headers_to_remove, &cpath, "response")?;
            let plain = host_rewrite.is_none() && request_headers.is_empty() && response_headers.is_empty();
            extras.push((!plain).then(|| Box::new(ClusterExtras { request_headers, response_headers, host_rewrite })));
            // An unset weight reads as 0 in Envoy.
            let weight = c.weight.as_ref().map_or(0, |v| v.value);
            total += u64::from(weight);
            clusters.push((c.name.clone(), weight));
        }
        if total == 0 {
            return Err(ConfigError::new(path, "the sum of the weights must be greater than 0"));
        }
        if total > u64::from(u32::MAX) {
            return Err(ConfigError::new(
                path,
                format!("the sum of the weights ({total}) must not exceed {}", u32::MAX),
            ));
        }
        Ok(WeightedClusters { clusters, extras, total_weight: total })
    }

    /// Envoy's pick: `random % total_weight` falls into one entry's interval, in configuration order. Returns the
    /// entry's index.
    pub fn pick(&self, random: u64) -> usize {
        let selected = random % self.total_weight;
        let mut end = 0;
        for (i, (_, weight)) in self.clusters.iter().enumerate() {
            end += u64::from(*weight);
            if selected < end {
                return i;
            }
        }
        // Unreachable: the weights add up to total_weight.
        self.clusters.len().saturating_sub(1)
    }
}

impl Redirect {
    fn new(r: &rpb::RedirectAction, path: &str, matched: MatchedPart) -> Result<Redirect, ConfigError> {
        use rpb::redirect_action::{
            PathRewriteSpecifier as P, RedirectResponseCode as Code, SchemeRewriteSpecifier as S,
        };
        // An empty scheme_redirect means none, as in Envoy.
        let scheme = match &r.scheme_rewrite_specifier {
            Some(S::SchemeRedirect(s)) if !s.is_empty() => Some(s.clone()),
            Some(S::HttpsRedirect(true)) => Some("https".to_string()),
            _ => None,
        };
        let host = match r.host_redirect.as_str() {
            "" => None,
            h => Some(header_value_text(h, &join(path, "host_redirect"))?),
        };
        let path_rewrite = match &r.path_rewrite_specifier {
            None => RedirectPath::Keep,
            Some(P::PathRedirect(p)) if p.is_empty() => RedirectPath::Keep,
            Some(P::PathRedirect(p)) => RedirectPath::Replace {
                path: header_value_text(p, &join(path, "path_redirect"))?,
                has_query: p.contains('?'),
            },
            Some(P::PrefixRewrite(p)) if p.is_empty() => RedirectPath::Keep,
            Some(P::PrefixRewrite(p)) => {
                RedirectPath::Rewrite(PathRewrite::Prefix(header_value_text(p, &join(path, "prefix_rewrite"))?))
            }
            Some(P::RegexRewrite(rw)) => {
                RedirectPath::Rewrite(PathRewrite::Regex(RegexRewrite::new(rw, &join(path, "regex_rewrite"))?))
            }
            Some(P::PathRewrite(_)) => {
                return Err(ConfigError::new(join(path, "path_rewrite"), "path_rewrite is not supported"));
            }
        };
        let status = match Code::try_from(r.response_code) {
            Ok(Code::MovedPermanently) => StatusCode::MOVED_PERMANENTLY,
            Ok(Code::Found) => StatusCode::FOUND,
            Ok(Code::SeeOther) => StatusCode::SEE_OTHER,
            Ok(Code::TemporaryRedirect) => StatusCode::TEMPORARY_REDIRECT,
            Ok(Code::PermanentRedirect) => StatusCode::PERMANENT_REDIRECT,
            Err(_) => {
                return Err(ConfigError::new(
                    join(path, "response_code"),
                    format!("unknown value {}", r.response_code),
                ));
            }
        };
        Ok(Redirect {
            scheme,
            host,
            port: Some(r.port_redirect).filter(|p| *p != 0),
            path: path_rewrite,
            strip_query: r.strip_query,
            status,
            matched,
        })
    }

    /// The Location for a request, built as Envoy does. `scheme` is the request's scheme (`:scheme`, or
    /// x-forwarded-proto), `authority` its Host, `path_and_query` its original path; the redirect's own
    /// `prefix_rewrite` / `regex_rewrite` is applied here.
    pub fn location(&self, scheme: &str, authority: &str, path_and_query: &str) -> String {
        let new_scheme = self.scheme.as_deref().unwrap_or(scheme);
        let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
        let host = match &self.host {
            Some(h) => h.as_str(),
            None => request_host_for_redirect(authority, scheme, new_scheme, self.port.is_some()),
        };
        let mut path: Cow<'_, str> = match &self.path {
            RedirectPath::Keep => Cow::Borrowed(path_and_query),
            RedirectPath::Rewrite(rw) => {
                rw.apply(self.matched, path_and_query).map_or(Cow::Borrowed(path_and_query), Cow::Owned)
            }
            // A query in path_redirect wins over the request's.
            RedirectPath::Replace { path, has_query: true } => Cow::Borrowed(path.as_str()),
            RedirectPath::Replace { path, has_query: false } => match path_and_query.find('?') {
                Some(q) => Cow::Owned(format!("{path}{}", &path_and_query[q..])),
                None => Cow::Borrowed(path.as_str()),
            },
        };
        if !path.starts_with('/') {
            path = Cow::Owned(format!("/{path}"));
        }
        let path_has_own_query = matches!(self.path, RedirectPath::Replace { has_query: true, .. });
        let path = match path.find('?') {
            Some(q) if self.strip_query && !path_has_own_query => &path[..q],
            _ => &path[..],
        };
        format!("{new_scheme}://{host}{port}{path}")
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

/// Envoy's `processRequestHost`: the request's Host for a redirect, without its port when a port_redirect is set or
/// when the scheme changes away from one whose default port the Host names (`http://h:80` → `https://h`).
fn request_host_for_redirect<'a>(authority: &'a str, scheme: &str, new_scheme: &str, new_port: bool) -> &'a str {
    let host_end = if authority.starts_with('[') { authority.rfind("]:").map(|i| i + 1) } else { authority.rfind(':') };
    let Some(end) = host_end else { return authority };
    let port = &authority[end..];
    let remove = new_port
        || (new_scheme != scheme && ((scheme == "https" && port == ":443") || (scheme == "http" && port == ":80")));
    if remove { &authority[..end] } else { authority }
}

fn direct_response(d: &rpb::DirectResponseAction, path: &str, max_body: u32) -> Result<Action, ConfigError> {
    use core::data_source::Specifier;
    let status = match d.status {
        200..=599 => StatusCode::from_u16(d.status as u16)
            .map_err(|_| ConfigError::new(join(path, "status"), format!("invalid status {}", d.status)))?,
        s => return Err(ConfigError::new(join(path, "status"), format!("status {s} is not in [200, 600)"))),
    };
    if d.body_format.is_some() {
        return Err(ConfigError::new(join(path, "body_format"), "body_format is not supported"));
    }
    let bpath = join(path, "body");
    let body = match &d.body {
        None => Vec::new(),
        Some(ds) => {
            if ds.watched_directory.is_some() {
                return Err(ConfigError::new(join(&bpath, "watched_directory"), "watched_directory is not supported"));
            }
            match &ds.specifier {
                None => Vec::new(),
                Some(Specifier::InlineBytes(b)) => b.clone(),
                Some(Specifier::InlineString(s)) => s.clone().into_bytes(),
                // Read once here, as Envoy does; a later change to the file needs a new RDS version.
                Some(Specifier::Filename(f)) => std::fs::read(f)
                    .map_err(|e| ConfigError::new(join(&bpath, "filename"), format!("cannot read {f}: {e}")))?,
                Some(Specifier::EnvironmentVariable(_)) => {
                    return Err(ConfigError::new(
                        join(&bpath, "environment_variable"),
                        "environment_variable is not supported",
                    ));
                }
            }
        }
    };
    if body.len() > max_body as usize {
        return Err(ConfigError::new(
            bpath,
            format!(
                "response body size is {} bytes; maximum is {max_body} (max_direct_response_body_size_bytes)",
                body.len()
            ),
        ));
    }
    Ok(Action::DirectResponse { status, body })
}

impl RetryPolicy {
    /// Envoy's policy for a route without one, which a request's `x-envoy-retry-on` can still switch on: one retry,
    /// 25 ms backoff up to 250 ms.
    pub fn envoy_default() -> RetryPolicy {
        RetryPolicy {
            retry_on: RetryOn::default(),
            num_retries: 1,
            per_try_timeout: None,
            retriable_status_codes: Vec::new(),
            backoff_base: DEFAULT_RETRY_BACKOFF_BASE,
            backoff_max: DEFAULT_RETRY_BACKOFF_BASE * 10,
            avoid_previous_hosts: false,
            host_selection_attempts: 1,
            previous_priorities: None,
        }
    }

    fn new(p: &rpb::RetryPolicy, path: &str) -> Result<RetryPolicy, ConfigError> {
        let unsupported = |field: &str| Err(ConfigError::new(join(path, field), format!("{field} is not supported")));
        if p.per_try_idle_timeout.is_some() {
            return unsupported("per_try_idle_timeout");
        }
        let previous_priorities = match &p.retry_priority {
            None => None,
            Some(rp) => Some(previous_priorities(rp, &join(path, "retry_priority"))?),
        };
        if !p.retry_options_predicates.is_empty() {
            return unsupported("retry_options_predicates");
        }
        if p.rate_limited_retry_back_off.is_some() {
            return unsupported("rate_limited_retry_back_off");
        }
        if !p.retriable_headers.is_empty() {
            return unsupported("retriable_headers");
        }
        if !p.retriable_request_headers.is_empty() {
            return unsupported("retriable_request_headers");
        }
        let retry_on = RetryOn::parse(&p.retry_on, &join(path, "retry_on"))?;
        // Unset (0) means once, as in Envoy. Bounded so a config cannot make one retry spin.
        let host_selection_attempts = match p.host_selection_retry_max_attempts {
            ..=0 => 1,
            n @ 1..=1000 => n as u32,
            _ => {
                return Err(ConfigError::new(join(path, "host_selection_retry_max_attempts"), "must be at most 1000"));
            }
        };
        let mut avoid_previous_hosts = false;
        for (i, pred) in p.retry_host_predicate.iter().enumerate() {
            use rpb::retry_policy::retry_host_predicate::ConfigType;
            // Envoy finds the extension by its typed_config's type, else by name.
            let previous_hosts = match &pred.config_type {
                Some(ConfigType::TypedConfig(any)) => any.type_url == PREVIOUS_HOSTS_TYPE,
                None => pred.name == PREVIOUS_HOSTS_NAME,
            };
            if !previous_hosts {
                return Err(ConfigError::new(
                    join(path, &format!("retry_host_predicate[{i}]")),
                    format!("retry host predicate \"{}\" is not supported (only {PREVIOUS_HOSTS_NAME})", pred.name),
                ));
            }
            avoid_previous_hosts = true;
        }
        // Codes that do not fit a u16 can never match a response; dropping them changes nothing.
        let retriable_status_codes = p.retriable_status_codes.iter().filter_map(|c| u16::try_from(*c).ok()).collect();
        let (backoff_base, backoff_max) = match &p.retry_back_off {
            None => (DEFAULT_RETRY_BACKOFF_BASE, DEFAULT_RETRY_BACKOFF_BASE * 10),
            Some(b) => {
                let bpath = join(path, "retry_back_off");
                let base = b
                    .base_interval
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(join(&bpath, "base_interval"), "base_interval is required"))?;
                let base = duration(base, &join(&bpath, "base_interval"))?;
                if base.is_zero() {
                    return Err(ConfigError::new(
                        join(&bpath, "base_interval"),
                        "base_interval must be greater than 0",
                    ));
                }
                // Envoy works in whole milliseconds, at least 1.
                let base = whole_millis(base);
                let max = match &b.max_interval {
                    None => base.saturating_mul(10),
                    Some(m) => {
                        let max = whole_millis(duration(m, &join(&bpath, "max_interval"))?);
                        if max < base {
                            return Err(ConfigError::new(
                                join(&bpath, "max_interval"),
                                "max_interval must be greater than or equal to base_interval",
                            ));
                        }
                        max
                    }
                };
                (base, max)
            }
        };
        let per_try_timeout = p
            .per_try_timeout
            .as_ref()
            .map(|t| duration(t, &join(path, "per_try_timeout")))
            .transpose()?
            .filter(|t| !t.is_zero());
        Ok(RetryPolicy {
            retry_on,
            num_retries: p.num_retries.as_ref().map_or(1, |v| v.value),
            per_try_timeout,
            retriable_status_codes,
            backoff_base,
            backoff_max,
            avoid_previous_hosts,
            host_selection_attempts,
            previous_priorities,
        })
    }

    /// Whether a response with this status is retried: `5xx`, `gateway-error` (502, 503, 504), `retriable-4xx`
    /// (409) and `retriable-status-codes`.
    pub fn should_retry_status(&self, status: u16) -> bool {
        let on = &self.retry_on;
        (on.five_xx && (500..=599).contains(&status))
            || (on.gateway_error && matches!(status, 502..=504))
            || (on.retriable_4xx && status == 409)
            || (on.retriable_status_codes && self.retriable_status_codes.contains(&status))
    }

    /// Whether an attempt that got no response is retried. As in Envoy, `5xx`, `gateway-error` and `reset` cover
    /// every kind of reset, connect failures included.
    pub fn should_retry_failure(&self, failure: UpstreamFailure) -> bool {
        let on = &self.retry_on;
        on.five_xx
            || on.gateway_error
            || on.reset
            || match failure {
                UpstreamFailure::ConnectFailure => on.connect_failure || on.reset_before_request,
                UpstreamFailure::RefusedStream => on.refused_stream,
                UpstreamFailure::Reset => false,
            }
    }

    /// Whether a gRPC response with this `grpc-status` is retried (Envoy's `x-envoy-retry-grpc-on` conditions).
    pub fn should_retry_grpc_status(&self, grpc_status: u32) -> bool {
        let on = &self.retry_on;
        match grpc_status {
            1 => on.grpc_cancelled,
            4 => on.grpc_deadline_exceeded,
            8 => on.grpc_resource_exhausted,
            13 => on.grpc_internal,
            14 => on.grpc_unavailable,
            _ => false,
        }
    }
}

/// A retry policy's `retry_priority`: only Envoy's `previous_priorities`, whose `update_frequency` is returned.
fn previous_priorities(rp: &rpb::retry_policy::RetryPriority, path: &str) -> Result<u32, ConfigError> {
    use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
    use rpb::retry_policy::retry_priority::ConfigType;
    let Some(ConfigType::TypedConfig(any)) = &rp.config_type else {
        return Err(ConfigError::new(path, format!("{PREVIOUS_PRIORITIES_NAME} needs its typed_config")));
    };
    if crate::config::listener::type_name(&any.type_url) != PREVIOUS_PRIORITIES_TYPE {
        return Err(ConfigError::new(
            join(path, "typed_config"),
            format!("retry priority \"{}\" is not supported (only {PREVIOUS_PRIORITIES_NAME})", rp.name),
        ));
    }
    let c: PreviousPrioritiesConfig = crate::config::listener::decode_any(any, &join(path, "typed_config"))?;
    u32::try_from(c.update_frequency)
        .ok()
        .filter(|f| *f >= 1)
        .ok_or_else(|| ConfigError::new(join(path, "typed_config.update_frequency"), "must be at least 1"))
}

fn whole_millis(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().clamp(1, u128::from(u64::MAX)) as u64)
}

impl RetryOn {
    /// Adds `other`'s conditions to these.
    pub fn merge(&mut self, other: RetryOn) {
        let RetryOn {
            five_xx,
            gateway_error,
            connect_failure,
            reset,
            retriable_status_codes,
            refused_stream,
            retriable_4xx,
            grpc_cancelled,
            grpc_deadline_exceeded,
            grpc_resource_exhausted,
            grpc_internal,
            grpc_unavailable,
            reset_before_request,
        } = other;
        self.five_xx |= five_xx;
        self.gateway_error |= gateway_error;
        self.connect_failure |= connect_failure;
        self.reset |= reset;
        self.retriable_status_codes |= retriable_status_codes;
        self.refused_stream |= refused_stream;
        self.retriable_4xx |= retriable_4xx;
        self.grpc_cancelled |= grpc_cancelled;
        self.grpc_deadline_exceeded |= grpc_deadline_exceeded;
        self.grpc_resource_exhausted |= grpc_resource_exhausted;
        self.grpc_internal |= grpc_internal;
        self.grpc_unavailable |= grpc_unavailable;
        self.reset_before_request |= reset_before_request;
    }

    /// Whether any condition is set.
    pub fn any(&self) -> bool {
        *self != RetryOn::default()
    }

    /// Adds the conditions an `x-envoy-retry-on` header (`grpc` false: the HTTP ones) or `x-envoy-retry-grpc-on`
    /// header (`grpc` true) names. A request cannot be refused for its header as a config is, so names we do not
    /// know or do not act on are skipped, as Envoy skips unknown ones.
    pub fn add_header(&mut self, value: &str, grpc: bool) {
        for token in value.split(',').map(str::trim) {
            if let Some((flag, is_grpc)) = self.flag(token)
                && is_grpc == grpc
            {
                *flag = true;
            }
        }
    }

    /// The condition a `retry_on` token names, and whether it is a gRPC one; None for names we do not act on.
    fn flag(&mut self, token: &str) -> Option<(&mut bool, bool)> {
        Some(match token {
            "5xx" => (&mut self.five_xx, false),
            "gateway-error" => (&mut self.gateway_error, false),
            "connect-failure" => (&mut self.connect_failure, false),
            "reset" => (&mut self.reset, false),
            "retriable-status-codes" => (&mut self.retriable_status_codes, false),
            "refused-stream" => (&mut self.refused_stream, false),
            "retriable-4xx" => (&mut self.retriable_4xx, false),
            "reset-before-request" => (&mut self.reset_before_request, false),
            "cancelled" => (&mut self.grpc_cancelled, true),
            "deadline-exceeded" => (&mut self.grpc_deadline_exceeded, true),
            "resource-exhausted" => (&mut self.grpc_resource_exhausted, true),
            "internal" => (&mut self.grpc_internal, true),
            "unavailable" => (&mut self.grpc_unavailable, true),
            _ => return None,
        })
    }

    fn parse(s: &str, path: &str) -> Result<RetryOn, ConfigError> {
        let mut on = RetryOn::default();
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match on.flag(token) {
                Some((flag, _)) => *flag = true,
                None if matches!(token, "envoy-ratelimited" | "retriable-headers" | "http3-post-connect-failure") => {
                    return Err(ConfigError::new(path, format!("retry condition \"{token}\" is not supported")));
                }
                None => return Err(ConfigError::new(path, format!("unknown retry condition \"{token}\""))),
            }
        }
        Ok(on)
    }
}

impl<'a> Matched<'a> {
    pub fn action(&self) -> &'a Action {
        &self.route.action
    }

    /// The per-route config of the filter named `filter`, most specific first (route, virtual host, route
    /// configuration), as Envoy resolves it.
    pub fn per_filter_config(&self, filter: &str) -> Option<&'a FilterOverride> {
        [&self.route.per_filter, &self.vhost.per_filter, &self.table.per_filter]
            .into_iter()
            .find_map(|p| p.iter().find(|(name, _)| name == filter))
            .map(|(_, c)| c)
    }

    /// The CORS policy for this request as Envoy's filter named `filter` finds it: the route's (its per-filter
    /// config, else its action's `cors`), else the virtual host's (the same way), else the route configuration's
    /// per-filter config. None where there is none or the filter is disabled.
    pub fn cors_policy(&self, filter: &str) -> Option<&'a super::cors::CorsPolicy> {
        let own = |p: &'a PerFilter| p.iter().find(|(name, _)| name == filter).map(|(_, c)| c);
        let route_field = match &self.route.action {
            Action::Route(a) => a.cors.as_deref(),
            Action::Redirect(_) | Action::DirectResponse { .. } => None,
        };
        let levels = [
            (own(&self.route.per_filter), route_field),
            (own(&self.vhost.per_filter), self.vhost.cors.as_deref()),
            (own(&self.table.per_filter), None),
        ];
        for (per_filter, field) in levels {
            match per_filter {
                Some(FilterOverride::Cors(c)) => return Some(c),
                Some(FilterOverride::Disabled) => return None,
                Some(FilterOverride::Fault(_)) | None => {}
            }
            if field.is_some() {
                return field;
            }
        }
        None
    }

    /// The path (with query) to send upstream after the route's `prefix_rewrite` / `regex_rewrite`, or `None`
    /// when the route rewrites nothing. `original_path_and_query` must be the path the route matched. (A redirect
    /// applies its own rewrite in [`Redirect::location`].)
    pub fn rewritten_path(&self, original_path_and_query: &str) -> Option<String> {
        match &self.route.action {
            Action::Route(a) => a.rewrite.apply(self.route.path.matched_part(), original_path_and_query),
            Action::Redirect(_) | Action::DirectResponse { .. } => None,
        }
    }

    /// Applies `request_headers_to_remove` then `request_headers_to_add` of the route, the virtual host and the
    /// route configuration, most specific first (so the route configuration's wins), or the reverse with
    /// `most_specific_header_mutations_wins`.
    pub fn apply_request_headers(&self, headers: &mut HeaderMap) {
        self.apply(&[&self.route.request_headers, &self.vhost.request_headers, &self.table.request_headers], headers);
    }

    /// As [`Matched::apply_request_headers`], for the response (local replies included).
    pub fn apply_response_headers(&self, headers: &mut HeaderMap) {
        self.apply(
            &[&self.route.response_headers, &self.vhost.response_headers, &self.table.response_headers],
            headers,
        );
    }

    /// As [`Matched::apply_request_headers`], after the picked weighted cluster's own mutations: Envoy applies the
    /// entry's first, then the route's as it always does (so with `most_specific_header_mutations_wins` too, the
    /// entry's come first).
    pub fn apply_request_headers_with(&self, cluster: &ClusterExtras, headers: &mut HeaderMap) {
        cluster.request_headers.apply(headers);
        self.apply_request_headers(headers);
    }

    /// As [`Matched::apply_response_headers`], after the picked weighted cluster's own mutations.
    pub fn apply_response_headers_with(&self, cluster: &ClusterExtras, headers: &mut HeaderMap) {
        cluster.response_headers.apply(headers);
        self.apply_response_headers(headers);
    }

    fn apply(&self, most_specific_first: &[&HeaderMutations], headers: &mut HeaderMap) {
        if self.table.most_specific_header_mutations_wins {
            most_specific_first.iter().rev().for_each(|m| m.apply(headers));
        } else {
            most_specific_first.iter().for_each(|m| m.apply(headers));
        }
    }

    /// The cluster for this request: weighted clusters pick at random by weight; `cluster_header` reads the
    /// header's first value (`None` when absent or not text: answer with `cluster_not_found_status`, as Envoy does).
    pub fn cluster(&self, headers: &HeaderMap) -> Option<Target<'a>> {
        self.cluster_with_random(headers, rand::random())
    }

    /// [`Matched::cluster`] with the random value given, for tests and for callers that draw one per request.
    /// Borrowed from the route table (so the request stays free to move on), copied only from a `cluster_header`.
    pub fn cluster_with_random(&self, headers: &HeaderMap, random: u64) -> Option<Target<'a>> {
        let Action::Route(a) = &self.route.action else { return None };
        match &a.cluster {
            ClusterSpecifier::Cluster(c) => Some(Target { name: Cow::Borrowed(c), extras: None }),
            ClusterSpecifier::Weighted(w) => {
                let i = w.pick(random);
                let (name, _) = w.clusters.get(i)?;
                Some(Target { name: Cow::Borrowed(name), extras: w.extras.get(i).and_then(|e| e.as_deref()) })
            }
            ClusterSpecifier::Header(h) => headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(|v| Target { name: Cow::Owned(v.to_string()), extras: None }),
        }
    }
}

// ---- Path matching and rewriting ----

#[derive(Debug)]
enum PathMatch {
    Prefix {
        prefix: String,
        case_sensitive: bool,
    },
    Exact {
        path: String,
        case_sensitive: bool,
    },
    /// Anchored: the whole path (without query) must match.
    Regex(regex::Regex),
    /// `path_separated_prefix`: the prefix, then end of path or `/`.
    SeparatedPrefix {
        prefix: String,
        case_sensitive: bool,
    },
}

/// How much of the path a route matched, which `prefix_rewrite` replaces.
#[derive(Debug, Clone, Copy)]
enum MatchedPart {
    Bytes(usize),
    /// Regex routes: the whole path without the query.
    WholePath,
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix { prefix, case_sensitive } => starts_with(path, prefix, *case_sensitive),
            PathMatch::Exact { path: p, case_sensitive: true } => path == p,
            PathMatch::Exact { path: p, case_sensitive: false } => path.eq_ignore_ascii_case(p),
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::SeparatedPrefix { prefix, case_sensitive } => {
                starts_with(path, prefix, *case_sensitive)
                    && path.as_bytes().get(prefix.len()).is_none_or(|b| *b == b'/')
            }
        }
    }

    fn matched_part(&self) -> MatchedPart {
        match self {
            PathMatch::Prefix { prefix: p, .. }
            | PathMatch::Exact { path: p, .. }
            | PathMatch::SeparatedPrefix { prefix: p, .. } => MatchedPart::Bytes(p.len()),
            PathMatch::Regex(_) => MatchedPart::WholePath,
        }
    }
}

fn starts_with(path: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        path.starts_with(prefix)
    } else {
        path.as_bytes().get(..prefix.len()).is_some_and(|p| p.eq_ignore_ascii_case(prefix.as_bytes()))
    }
}

#[derive(Debug)]
enum PathRewrite {
    None,
    /// Replaces the matched part of the path.
    Prefix(String),
    /// Replaces every match in the path; the query is kept.
    Regex(RegexRewrite),
}

impl PathRewrite {
    fn apply(&self, matched: MatchedPart, path_and_query: &str) -> Option<String> {
        match self {
            PathRewrite::None => None,
            PathRewrite::Prefix(new) => {
                let n = match matched {
                    MatchedPart::Bytes(n) => n,
                    MatchedPart::WholePath => strip_query(path_and_query).len(),
                };
                Some(format!("{new}{}", path_and_query.get(n..)?))
            }
            PathRewrite::Regex(r) => {
                let path = strip_query(path_and_query);
                let rest = &path_and_query[path.len()..];
                let mut out = r.regex.replace_all(path, Expand(&r.substitution)).into_owned();
                out.push_str(rest);
                Some(out)
            }
        }
    }
}

/// `RegexMatchAndSubstitute`: RE2's global replace, with RE2's `\N` group references.
#[derive(Debug)]
struct RegexRewrite {
    regex: regex::Regex,
    substitution: Vec<Piece>,
}

#[derive(Debug)]
enum Piece {
    Literal(String),
    Group(usize),
}

impl RegexRewrite {
    fn new(r: &matcher::RegexMatchAndSubstitute, path: &str) -> Result<RegexRewrite, ConfigError> {
        let pattern =
            r.pattern.as_ref().ok_or_else(|| ConfigError::new(join(path, "pattern"), "pattern is required"))?;
        let regex = compile_regex(&pattern.regex, &join(path, "pattern.regex"))?;
        let substitution = parse_substitution(&r.substitution, regex.captures_len() - 1, &join(path, "substitution"))?;
        Ok(RegexRewrite { regex, substitution })
    }
}

/// RE2's rewrite syntax: `\0`–`\9` insert a group, `\\` a backslash; any other escape is invalid (RE2 would refuse
/// to rewrite at run time, so it is refused here).
fn parse_substitution(s: &str, groups: usize, path: &str) -> Result<Vec<Piece>, ConfigError> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            literal.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => literal.push('\\'),
            Some(d @ '0'..='9') => {
                let n = d as usize - '0' as usize;
                if n > groups {
                    return Err(ConfigError::new(
                        path,
                        format!("\\{n} refers to a group the pattern does not have ({groups} groups)"),
                    ));
                }
                if !literal.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Group(n));
            }
            _ => return Err(ConfigError::new(path, "invalid rewrite: '\\' must be followed by a digit or '\\'")),
        }
    }
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    Ok(pieces)
}

struct Expand<'a>(&'a [Piece]);

impl regex::Replacer for Expand<'_> {
    fn replace_append(&mut self, caps: &regex::Captures<'_>, dst: &mut String) {
        for piece in self.0 {
            match piece {
                Piece::Literal(s) => dst.push_str(s),
                Piece::Group(n) => dst.push_str(caps.get(*n).map_or("", |m| m.as_str())),
            }
        }
    }
}

fn compile_regex(re: &str, path: &str) -> Result<regex::Regex, ConfigError> {
    regex::Regex::new(re).map_err(|e| regex_error(&e, path))
}

/// A regex that must match the whole input, as RE2's FullMatch does in Envoy.
fn full_match_regex(r: &matcher::RegexMatcher, path: &str) -> Result<regex::Regex, ConfigError> {
    let rpath = join(path, "regex");
    // Compiled alone first so that the error shows the user's pattern, not the anchored one.
    compile_regex(&r.regex, &rpath)?;
    compile_regex(&format!("^(?:{})$", r.regex), &rpath)
}

fn full_match_bytes_regex(r: &matcher::RegexMatcher, path: &str) -> Result<regex::bytes::Regex, ConfigError> {
    let rpath = join(path, "regex");
    compile_regex(&r.regex, &rpath)?;
    regex::bytes::Regex::new(&format!("^(?:{})$", r.regex)).map_err(|e| regex_error(&e, &rpath))
}

fn regex_error(e: &regex::Error, path: &str) -> ConfigError {
    // The regex crate's message spans lines; a NACK is one line.
    let message = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    ConfigError::new(path, format!("invalid regex: {message}"))
}

// ---- Header and query matching ----

#[derive(Debug)]
struct HeaderMatcher {
    key: HeaderKey,
    kind: HeaderMatch,
    invert: bool,
    treat_missing_as_empty: bool,
}

/// Where a header matcher reads its value. Envoy keeps the request line in pseudo-headers, so matchers may name
/// them.
#[derive(Debug)]
enum HeaderKey {
    Authority,
    Method,
    /// `:path`: the path with its query.
    Path,
    Scheme,
    /// A name Envoy's header map never holds: other pseudo-headers, and `host`, which Envoy keeps as `:authority`.
    NeverPresent,
    Header(HeaderName),
}

#[derive(Debug)]
enum HeaderMatch {
    /// `present_match`: present (true) or absent (false).
    Present(bool),
    Value(ValueMatch),
}

#[derive(Debug)]
enum ValueMatch {
    /// `[start, end)` over the value parsed as a base-10 integer.
    Range(i64, i64),
    String(StringMatcher),
}

impl ValueMatch {
    fn matches(&self, value: &[u8]) -> bool {
        match self {
            // Envoy parses with absl::SimpleAtoi: optional sign, digits, surrounding whitespace allowed.
            ValueMatch::Range(start, end) => std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim_ascii().parse::<i64>().ok())
                .is_some_and(|n| *start <= n && n < *end),
            ValueMatch::String(m) => m.matches(value),
        }
    }
}

impl HeaderMatcher {
    // The deprecated exact/prefix/suffix/contains/safe_regex variants are still sent by control planes.
    #[allow(deprecated)]
    fn new(h: &rpb::HeaderMatcher, path: &str) -> Result<HeaderMatcher, ConfigError> {
        use rpb::header_matcher::HeaderMatchSpecifier as S;
        let key = header_key(&h.name, &join(path, "name"))?;
        let nonempty = |s: &str, field: &str| -> Result<Box<[u8]>, ConfigError> {
            if s.is_empty() {
                return Err(ConfigError::new(join(path, field), "must not be empty (use present_match)"));
            }
            Ok(s.as_bytes().into())
        };
        let string = |kind| HeaderMatch::Value(ValueMatch::String(StringMatcher { kind, ignore_case: false }));
        let kind = match &h.header_match_specifier {
            None => HeaderMatch::Present(true),
            Some(S::PresentMatch(p)) => HeaderMatch::Present(*p),
            // Envoy: an empty exact_match matches any value of a present header.
            Some(S::ExactMatch(v)) if v.is_empty() => HeaderMatch::Value(ValueMatch::String(StringMatcher::any())),
            Some(S::ExactMatch(v)) => string(StringMatch::Exact(v.as_bytes().into())),
            Some(S::PrefixMatch(v)) => string(StringMatch::Prefix(nonempty(v, "prefix_match")?)),
            Some(S::SuffixMatch(v)) => string(StringMatch::Suffix(nonempty(v, "suffix_match")?)),
            Some(S::ContainsMatch(v)) => string(StringMatch::Contains(nonempty(v, "contains_match")?)),
            Some(S::SafeRegexMatch(r)) => {
                string(StringMatch::Regex(full_match_bytes_regex(r, &join(path, "safe_regex_match"))?))
            }
            Some(S::RangeMatch(r)) => HeaderMatch::Value(ValueMatch::Range(r.start, r.end)),
            Some(S::StringMatch(m)) => {
                HeaderMatch::Value(ValueMatch::String(StringMatcher::new(m, &join(path, "string_match"))?))
            }
        };
        Ok(HeaderMatcher { key, kind, invert: h.invert_match, treat_missing_as_empty: h.treat_missing_header_as_empty })
    }

    /// Envoy's rules: a missing header fails every matcher except `present_match` (even inverted) unless
    /// `treat_missing_header_as_empty`; multiple values are matched joined with `,`.
    fn matches(&self, req: &RequestHead<'_>) -> bool {
        match &self.kind {
            HeaderMatch::Present(want) => {
                let present = header_present(&self.key, req) || self.treat_missing_as_empty;
                (present == *want) != self.invert
            }
            HeaderMatch::Value(m) => match header_value(&self.key, req) {
                Some(v) => m.matches(&v) != self.invert,
                None if self.treat_missing_as_empty => m.matches(b"") != self.invert,
                None => false,
            },
        }
    }
}

/// A list of Envoy `HeaderMatcher`s that must all match, for HTTP filters that select requests by header (the
/// health check filter's `headers`).
#[derive(Debug)]
pub struct HeaderMatchers(Vec<HeaderMatcher>);

impl HeaderMatchers {
    pub fn new(list: &[rpb::HeaderMatcher], path: &str) -> Result<Self, ConfigError> {
        let matchers = list
            .iter()
            .enumerate()
            .map(|(i, h)| HeaderMatcher::new(h, &join(path, &format!("[{i}]"))))
            .collect::<Result<_, _>>()?;
        Ok(HeaderMatchers(matchers))
    }

    pub fn matches(&self, req: &RequestHead<'_>) -> bool {
        self.0.iter().all(|m| m.matches(req))
    }
}

fn header_key(name: &str, path: &str) -> Result<HeaderKey, ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::new(path, "a header name is required"));
    }
    Ok(match name.to_ascii_lowercase().as_str() {
        ":authority" => HeaderKey::Authority,
        ":method" => HeaderKey::Method,
        ":path" => HeaderKey::Path,
        ":scheme" => HeaderKey::Scheme,
        "host" => HeaderKey::NeverPresent,
        n if n.starts_with(':') => HeaderKey::NeverPresent,
        _ => HeaderKey::Header(header_name(name, path)?),
    })
}

fn header_present(key: &HeaderKey, req: &RequestHead<'_>) -> bool {
    match key {
        HeaderKey::Authority => !req.authority.is_empty(),
        HeaderKey::Method | HeaderKey::Path | HeaderKey::Scheme => true,
        HeaderKey::NeverPresent => false,
        HeaderKey::Header(name) => req.headers.contains_key(name),
    }
}

fn header_value<'r>(key: &HeaderKey, req: &'r RequestHead<'_>) -> Option<Cow<'r, [u8]>> {
    let borrowed = |s: &'r str| Some(Cow::Borrowed(s.as_bytes()));
    match key {
        HeaderKey::Authority if req.authority.is_empty() => None,
        HeaderKey::Authority => borrowed(req.authority),
        HeaderKey::Method => borrowed(req.method.as_str()),
        HeaderKey::Path => borrowed(path_and_query(req.uri)),
        HeaderKey::Scheme => borrowed(request_scheme(req)),
        HeaderKey::NeverPresent => None,
        HeaderKey::Header(name) => {
            let mut values = req.headers.get_all(name).iter();
            let first = values.next()?;
            match values.next() {
                None => Some(Cow::Borrowed(first.as_bytes())),
                Some(second) => {
                    let mut joined = [first.as_bytes(), b",", second.as_bytes()].concat();
                    for v in values {
                        joined.push(b',');
                        joined.extend_from_slice(v.as_bytes());
                    }
                    Some(Cow::Owned(joined))
                }
            }
        }
    }
}

/// The request's `:scheme`: the URI's when it has one (HTTP/2, absolute-form HTTP/1), else x-forwarded-proto as
/// the connection manager set it before routing, which is where Envoy takes an HTTP/1 `:scheme` from.
fn request_scheme<'r>(req: &'r RequestHead<'_>) -> &'r str {
    req.uri
        .scheme_str()
        .or_else(|| req.headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()))
        .unwrap_or("http")
}

#[derive(Debug)]
struct QueryParameterMatcher {
    name: String,
    kind: QueryMatch,
}

#[derive(Debug)]
enum QueryMatch {
    /// `present_match`: present (true) or absent (false).
    Present(bool),
    Value(StringMatcher),
}

impl QueryParameterMatcher {
    fn new(q: &rpb::QueryParameterMatcher, path: &str) -> Result<QueryParameterMatcher, ConfigError> {
        use rpb::query_parameter_matcher::QueryParameterMatchSpecifier as S;
        if q.name.is_empty() {
            return Err(ConfigError::new(join(path, "name"), "a query parameter name is required"));
        }
        let kind = match &q.query_parameter_match_specifier {
            // Only a name: the parameter must be present.
            None => QueryMatch::Present(true),
            Some(S::PresentMatch(p)) => QueryMatch::Present(*p),
            Some(S::StringMatch(m)) => QueryMatch::Value(StringMatcher::new(m, &join(path, "string_match"))?),
        };
        Ok(QueryParameterMatcher { name: q.name.clone(), kind })
    }

    /// Envoy looks at the first occurrence of the parameter only, and compares its raw (still percent-encoded) value.
    fn matches(&self, query: &str) -> bool {
        let value = query.split('&').find_map(|param| {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            (k == self.name).then_some(v)
        });
        match &self.kind {
            QueryMatch::Present(want) => value.is_some() == *want,
            QueryMatch::Value(m) => value.is_some_and(|v| m.matches(v.as_bytes())),
        }
    }
}

/// `envoy.type.matcher.v3.StringMatcher` over bytes (header values need not be UTF-8).
#[derive(Debug)]
pub(crate) struct StringMatcher {
    kind: StringMatch,
    /// ASCII case folding for exact/prefix/suffix/contains; patterns are stored lower-cased.
    ignore_case: bool,
}

#[derive(Debug)]
enum StringMatch {
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    Suffix(Box<[u8]>),
    Contains(Box<[u8]>),
    Regex(regex::bytes::Regex),
}

impl StringMatcher {
    fn any() -> StringMatcher {
        StringMatcher { kind: StringMatch::Prefix(Box::default()), ignore_case: false }
    }

    pub(crate) fn new(m: &matcher::StringMatcher, path: &str) -> Result<StringMatcher, ConfigError> {
        use matcher::string_matcher::MatchPattern as P;
        let ignore_case = m.ignore_case;
        let pattern = |s: &str, field: &str| -> Result<Box<[u8]>, ConfigError> {
            if s.is_empty() && field != "exact" {
                return Err(ConfigError::new(join(path, field), "must not be empty"));
            }
            Ok(if ignore_case { s.to_ascii_lowercase().into_bytes().into() } else { s.as_bytes().into() })
        };
        let kind = match &m.match_pattern {
            Some(P::Exact(s)) => StringMatch::Exact(pattern(s, "exact")?),
            Some(P::Prefix(s)) => StringMatch::Prefix(pattern(s, "prefix")?),
            Some(P::Suffix(s)) => StringMatch::Suffix(pattern(s, "suffix")?),
            Some(P::Contains(s)) => StringMatch::Contains(pattern(s, "contains")?),
            // ignore_case has no effect on regexes in Envoy.
            Some(P::SafeRegex(r)) => StringMatch::Regex(full_match_bytes_regex(r, &join(path, "safe_regex"))?),
            Some(P::Custom(_)) => {
                return Err(ConfigError::new(join(path, "custom"), "custom matchers are not supported"));
            }
            None => {
                return Err(ConfigError::new(
                    path,
                    "a match pattern is required (exact, prefix, suffix, contains, safe_regex)",
                ));
            }
        };
        Ok(StringMatcher { kind, ignore_case })
    }

    pub(crate) fn matches(&self, v: &[u8]) -> bool {
        let eq = |a: &[u8], b: &[u8]| if self.ignore_case { a.eq_ignore_ascii_case(b) } else { a == b };
        match &self.kind {
            StringMatch::Exact(p) => eq(v, p),
            StringMatch::Prefix(p) => v.get(..p.len()).is_some_and(|h| eq(h, p)),
            StringMatch::Suffix(p) => v.len() >= p.len() && v.get(v.len() - p.len()..).is_some_and(|t| eq(t, p)),
            StringMatch::Contains(p) => p.is_empty() || v.windows(p.len()).any(|w| eq(w, p)),
            StringMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// A gRPC request, as Envoy tells them.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    // Envoy: exactly application/grpc or application/grpc+<codec>; application/grpc-web is not gRPC.
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.as_bytes().strip_prefix(b"application/grpc"))
        .is_some_and(|rest| rest.first().is_none_or(|b| *b == b'+'))
}

// ---- Header mutations ----

/// One level's `*_headers_to_add` / `*_headers_to_remove`.
#[derive(Debug, Default)]
struct HeaderMutations {
    remove: Vec<HeaderName>,
    add: Vec<HeaderAdd>,
}

#[derive(Debug)]
struct HeaderAdd {
    name: HeaderName,
    value: HeaderValue,
    action: AppendAction,
    /// `keep_empty_value`: otherwise an empty value is not added at all.
    keep_empty: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

impl HeaderMutations {
    fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    /// `parent` is the message's path, `direction` "request" or "response".
    fn new(
        add: &[core::HeaderValueOption],
        remove: &[String],
        parent: &str,
        direction: &str,
    ) -> Result<HeaderMutations, ConfigError> {
        let add_field = join(parent, &format!("{direction}_headers_to_add"));
        let remove_field = join(parent, &format!("{direction}_headers_to_remove"));
        let remove = remove
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let path = join(&remove_field, &format!("[{i}]"));
                if !is_modifiable(name) {
                    return Err(ConfigError::new(path, ":-prefixed or host headers may not be removed"));
                }
                header_name(name, &path)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let add = add
            .iter()
            .enumerate()
            .map(|(i, o)| HeaderAdd::new(o, &join(&add_field, &format!("[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HeaderMutations { remove, add })
    }

    /// Envoy's order within a level: removals first; then every add is decided against the headers as they are
    /// now, overwrites are applied, and appends last.
    fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        if self.add.is_empty() {
            return;
        }
        let wanted = |a: &HeaderAdd, headers: &HeaderMap| {
            (a.keep_empty || !a.value.is_empty())
                && match a.action {
                    AppendAction::AppendIfExistsOrAdd | AppendAction::OverwriteIfExistsOrAdd => true,
                    AppendAction::AddIfAbsent => !headers.contains_key(&a.name),
                    AppendAction::OverwriteIfExists => headers.contains_key(&a.name),
                }
        };
        // Decisions for the first 64 entries live in a bitmask; the rare longer list allocates.
        let mut small = 0u64;
        let mut large = Vec::new();
        for (i, a) in self.add.iter().enumerate() {
            let w = wanted(a, headers);
            if i < 64 {
                small |= u64::from(w) << i;
            } else {
                large.push(w);
            }
        }
        let chosen =
            |i: usize| if i < 64 { small & (1 << i) != 0 } else { large.get(i - 64).copied().unwrap_or(false) };
        for (i, a) in self.add.iter().enumerate() {
            if chosen(i) && matches!(a.action, AppendAction::OverwriteIfExistsOrAdd | AppendAction::OverwriteIfExists) {
                headers.insert(a.name.clone(), a.value.clone());
            }
        }
        for (i, a) in self.add.iter().enumerate() {
            if chosen(i) && matches!(a.action, AppendAction::AppendIfExistsOrAdd | AppendAction::AddIfAbsent) {
                headers.append(a.name.clone(), a.value.clone());
            }
        }
    }
}

impl HeaderAdd {
    // `append` is deprecated but still sent.
    #[allow(deprecated)]
    fn new(o: &core::HeaderValueOption, path: &str) -> Result<HeaderAdd, ConfigError> {
        use core::header_value_option::HeaderAppendAction as A;
        let hpath = join(path, "header");
        let h = o.header.as_ref().ok_or_else(|| ConfigError::new(&hpath, "header is required"))?;
        let kpath = join(&hpath, "key");
        if h.key.is_empty() {
            return Err(ConfigError::new(kpath, "a header name is required"));
        }
        if !is_modifiable(&h.key) {
            return Err(ConfigError::new(kpath, ":-prefixed or host headers may not be modified"));
        }
        let name = header_name(&h.key, &kpath)?;
        if !h.raw_value.is_empty() {
            return Err(ConfigError::new(join(&hpath, "raw_value"), "raw_value is not supported"));
        }
        let vpath = join(&hpath, "value");
        let text = literal_header_value(&h.value, &vpath)?;
        let value = HeaderValue::from_str(&text)
            .map_err(|_| ConfigError::new(&vpath, "invalid header value (control characters are not allowed)"))?;
        let action = match A::try_from(o.append_action) {
            Ok(A::AppendIfExistsOrAdd) => AppendAction::AppendIfExistsOrAdd,
            Ok(A::AddIfAbsent) => AppendAction::AddIfAbsent,
            Ok(A::OverwriteIfExistsOrAdd) => AppendAction::OverwriteIfExistsOrAdd,
            Ok(A::OverwriteIfExists) => AppendAction::OverwriteIfExists,
            Err(_) => {
                return Err(ConfigError::new(
                    join(path, "append_action"),
                    format!("unknown value {}", o.append_action),
                ));
            }
        };
        let action = match &o.append {
            None => action,
            Some(_) if action != AppendAction::AppendIfExistsOrAdd => {
                return Err(ConfigError::new(path, "both append and append_action are set; set only append_action"));
            }
            Some(b) if b.value => AppendAction::AppendIfExistsOrAdd,
            Some(_) => AppendAction::OverwriteIfExistsOrAdd,
        };
        Ok(HeaderAdd { name, value, action, keep_empty: o.keep_empty_value })
    }
}

/// Envoy refuses to add, overwrite or remove pseudo-headers and Host through header mutations.
fn is_modifiable(name: &str) -> bool {
    !name.starts_with(':') && !name.eq_ignore_ascii_case("host")
}

/// A header value without Envoy's `%COMMAND%` substitutions, which we do not evaluate: `%%` is a literal `%`, and
/// any other `%` is refused rather than sent verbatim.
fn literal_header_value(s: &str, path: &str) -> Result<String, ConfigError> {
    if !s.contains('%') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
        } else if chars.next() == Some('%') {
            out.push('%');
        } else {
            return Err(ConfigError::new(
                path,
                "substitution format operators (%...%) are not supported; write a literal % as %%",
            ));
        }
    }
    Ok(out)
}

fn header_name(name: &str, path: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| ConfigError::new(path, format!("invalid header name \"{name}\"")))
}

/// Checks a string that ends up in a header (Host, Location, path): Envoy's HTTP_HEADER_VALUE rule.
fn header_value_text(s: &str, path: &str) -> Result<String, ConfigError> {
    if s.bytes().any(|b| b == 0 || b == b'\r' || b == b'\n') {
        return Err(ConfigError::new(path, "must not contain NUL, CR or LF"));
    }
    Ok(s.to_string())
}

// ---- Small helpers ----

fn path_and_query(uri: &http::Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

/// The path without query or fragment, which is what Envoy's path matchers see.
fn strip_query(path_and_query: &str) -> &str {
    path_and_query.find(['?', '#']).map_or(path_and_query, |i| &path_and_query[..i])
}

/// Envoy's `getPortStart`: the last `:` unless it is inside an IPv6 literal's brackets.
pub(crate) fn port_start(host: &[u8]) -> Option<usize> {
    let colon = host.iter().rposition(|b| *b == b':')?;
    match host.iter().rposition(|b| *b == b']') {
        Some(v6_end) if v6_end > colon => None,
        _ => Some(colon),
    }
}

/// Runs `f` on the ASCII-lower-cased `s` without allocating unless it is long and has upper case.
fn with_ascii_lowercase<R>(s: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    if !s.iter().any(u8::is_ascii_uppercase) {
        return f(s);
    }
    let mut buf = [0u8; 256];
    match buf.get_mut(..s.len()) {
        Some(lower) => {
            lower.copy_from_slice(s);
            lower.make_ascii_lowercase();
            f(lower)
        }
        None => f(&s.to_ascii_lowercase()),
    }
}

/// The longest wildcard that matches wins; a wildcard never matches an empty remainder (`*.foo.com` does not match
/// `.foo.com`).
fn find_wildcard(
    wildcards: &[(usize, DomainMap)],
    host: &[u8],
    part: impl Fn(&[u8], usize) -> Option<&[u8]>,
) -> Option<usize> {
    wildcards
        .iter()
        .filter(|(len, _)| *len < host.len())
        .find_map(|(len, map)| part(host, *len).and_then(|key| map.get(key)).copied())
}

fn longest_first(by_len: HashMap<usize, DomainMap>) -> Wildcards {
    let mut v: Wildcards = by_len.into_iter().collect();
    v.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
    use http::{Method, Uri};
    use rpb::route_action::ClusterSpecifier as C;
    use rpb::route_match::PathSpecifier as P;

    // ---- Builders ----

    fn path_match(spec: P) -> rpb::RouteMatch {
        rpb::RouteMatch { path_specifier: Some(spec), ..Default::default() }
    }

    fn prefix(p: &str) -> rpb::RouteMatch {
        path_match(P::Prefix(p.into()))
    }

    fn regex_matcher(re: &str) -> matcher::RegexMatcher {
        matcher::RegexMatcher { regex: re.into(), ..Default::default() }
    }

    fn action(a: rpb::RouteAction) -> Option<rpb::route::Action> {
        Some(rpb::route::Action::Route(a))
    }

    fn to_cluster(c: &str) -> rpb::RouteAction {
        rpb::RouteAction { cluster_specifier: Some(C::Cluster(c.into())), ..Default::default() }
    }

    fn route(name: &str, m: rpb::RouteMatch, a: Option<rpb::route::Action>) -> rpb::Route {
        rpb::Route { name: name.into(), r#match: Some(m), action: a, ..Default::default() }
    }

    /// A route named `name` sending `m` to cluster `name`.
    fn to(name: &str, m: rpb::RouteMatch) -> rpb::Route {
        route(name, m, action(to_cluster(name)))
    }

    fn vhost(name: &str, domains: &[&str], routes: Vec<rpb::Route>) -> rpb::VirtualHost {
        rpb::VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes,
            ..Default::default()
        }
    }

    /// A virtual host whose single catch-all route is named after it.
    fn catch_all(name: &str, domains: &[&str]) -> rpb::VirtualHost {
        vhost(name, domains, vec![to(name, prefix("/"))])
    }

    fn config(vhosts: Vec<rpb::VirtualHost>) -> rpb::RouteConfiguration {
        rpb::RouteConfiguration { name: "rc".into(), virtual_hosts: vhosts, ..Default::default() }
    }

    fn single(r: rpb::Route) -> rpb::RouteConfiguration {
        config(vec![vhost("vh", &["*"], vec![r])])
    }

    fn table(rc: &rpb::RouteConfiguration) -> RouteTable {
        RouteTable::new(rc).unwrap_or_else(|e| panic!("{e}"))
    }

    fn error(rc: &rpb::RouteConfiguration) -> String {
        match RouteTable::new(rc) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    fn pb_duration(ms: u64) -> PbDuration {
        PbDuration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
    }

    fn hvo(key: &str, value: &str, append_action: i32) -> core::HeaderValueOption {
        core::HeaderValueOption {
            header: Some(core::HeaderValue { key: key.into(), value: value.into(), ..Default::default() }),
            append_action,
            ..Default::default()
        }
    }

    struct Req {
        method: Method,
        uri: Uri,
        authority: String,
        headers: HeaderMap,
    }

    impl Req {
        fn new(authority: &str, path: &str) -> Req {
            let uri = path.parse().unwrap_or_else(|e| panic!("{path}: {e}"));
            Req { method: Method::GET, uri, authority: authority.into(), headers: HeaderMap::new() }
        }

        fn get(path: &str) -> Req {
            Req::new("example.com", path)
        }

        fn header(mut self, k: &'static str, v: &str) -> Req {
            self.headers.append(k, HeaderValue::from_str(v).unwrap_or_else(|e| panic!("{v}: {e}")));
            self
        }

        fn head(&self) -> RequestHead<'_> {
            RequestHead { method: &self.method, uri: &self.uri, authority: &self.authority, headers: &self.headers }
        }
    }

    /// The name of the route a request takes.
    fn route_of(t: &RouteTable, req: &Req) -> Option<String> {
        t.route(&req.head()).map(|m| m.route.name().to_string())
    }

    fn vhost_of(t: &RouteTable, authority: &str) -> Option<String> {
        t.route(&Req::new(authority, "/").head()).map(|m| m.vhost.name().to_string())
    }

    fn route_action(t: &RouteTable) -> &RouteAction {
        match t.vhosts[0].routes[0].action() {
            Action::Route(a) => a,
            other => panic!("not a route action: {other:?}"),
        }
    }

    #[test]
    fn table_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<RouteTable>();
    }

    // ---- Virtual host selection ----

    fn domains_table() -> RouteTable {
        table(&config(vec![
            catch_all("exact", &["foo.example.com"]),
            catch_all("suffix", &["*.example.com"]),
            catch_all("longer_suffix", &["*-bar.example.com"]),
            catch_all("prefix", &["foo.*"]),
            catch_all("longer_prefix", &["foo.example.*"]),
            catch_all("default", &["*"]),
        ]))
    }

    #[test]
    fn domains_exact_then_suffix_then_prefix_then_default() {
        let t = domains_table();
        assert_eq!(vhost_of(&t, "foo.example.com").as_deref(), Some("exact"));
        assert_eq!(vhost_of(&t, "x.example.com").as_deref(), Some("suffix"));
        // Suffix wildcards are searched before prefix wildcards, whatever their lengths.
        assert_eq!(vhost_of(&t, "foo.bar.example.com").as_deref(), Some("suffix"));
        assert_eq!(vhost_of(&t, "foo.net").as_deref(), Some("prefix"));
        assert_eq!(vhost_of(&t, "other.net").as_deref(), Some("default"));
    }

    #[test]
    fn longest_wildcard_wins() {
        let t = domains_table();
        // Envoy's example: "foo-bar.baz.com" takes "*-bar.baz.com" before "*.baz.com".
        assert_eq!(vhost_of(&t, "baz-bar.example.com").as_deref(), Some("longer_suffix"));
        assert_eq!(vhost_of(&t, "foo.example.org").as_deref(), Some("longer_prefix"));
    }

    #[test]
    fn wildcard_does_not_match_the_empty_string() {
        // Envoy: `*-bar.foo.com` matches `baz-bar.foo.com` but not `-bar.foo.com`.
        let t = table(&config(vec![catch_all("w", &["*-bar.foo.com"]), catch_all("p", &["foo-*"])]));
        assert_eq!(vhost_of(&t, "baz-bar.foo.com").as_deref(), Some("w"));
        assert_eq!(vhost_of(&t, "-bar.foo.com"), None);
        assert_eq!(vhost_of(&t, "foo-x").as_deref(), Some("p"));
        assert_eq!(vhost_of(&t, "foo-"), None);
    }

    #[test]
    fn domains_are_case_insensitive() {
        let t = table(&config(vec![catch_all("a", &["Foo.Example.COM"]), catch_all("b", &["*.Upper.ORG"])]));
        assert_eq!(vhost_of(&t, "FOO.example.com").as_deref(), Some("a"));
        assert_eq!(vhost_of(&t, "foo.example.com").as_deref(), Some("a"));
        assert_eq!(vhost_of(&t, "X.UPPER.org").as_deref(), Some("b"));
        // Longer than the stack buffer used for lower-casing.
        let long = format!("{}.UPPER.ORG", "A".repeat(300));
        assert_eq!(vhost_of(&t, &long).as_deref(), Some("b"));
    }

    #[test]
    fn host_port_is_part_of_the_match_unless_ignored() {
        let rc = config(vec![
            catch_all("plain", &["foo.example.com"]),
            // Istio lists both forms.
            catch_all("with_port", &["foo.example.com:8080"]),
            catch_all("prefix", &["bar.*"]),
            catch_all("default", &["*"]),
        ]);
        let t = table(&rc);
        assert_eq!(vhost_of(&t, "foo.example.com:8080").as_deref(), Some("with_port"));
        // No retry without the port: Envoy matches the Host as sent.
        assert_eq!(vhost_of(&t, "foo.example.com:9090").as_deref(), Some("default"));
        assert_eq!(vhost_of(&t, "bar.com:80").as_deref(), Some("prefix"));

        let t = table(&rpb::RouteConfiguration { ignore_port_in_host_matching: true, ..rc });
        assert_eq!(vhost_of(&t, "foo.example.com:9090").as_deref(), Some("plain"));
        // Domains keep their ports: Envoy only strips the request's.
        assert_eq!(vhost_of(&t, "foo.example.com:8080").as_deref(), Some("plain"));
    }

    #[test]
    fn ignore_port_understands_ipv6_literals() {
        let mut rc = config(vec![catch_all("v6", &["[::1]"]), catch_all("default", &["*"])]);
        rc.ignore_port_in_host_matching = true;
        let t = table(&rc);
        assert_eq!(vhost_of(&t, "[::1]:8080").as_deref(), Some("v6"));
        assert_eq!(vhost_of(&t, "[::1]").as_deref(), Some("v6"));
    }

    #[test]
    fn only_a_default_virtual_host() {
        let t = table(&config(vec![catch_all("default", &["*"])]));
        assert_eq!(vhost_of(&t, "").as_deref(), Some("default"));
        assert_eq!(vhost_of(&t, "anything:1").as_deref(), Some("default"));
        let t = table(&config(vec![catch_all("a", &["a.com"])]));
        assert_eq!(vhost_of(&t, "b.com"), None);
    }

    #[test]
    fn duplicate_domains_are_rejected_with_their_paths() {
        let e = error(&config(vec![catch_all("a", &["a.com", "b.com"]), catch_all("b", &["c.com", "B.COM"])]));
        assert_eq!(
            e,
            "virtual_hosts[1].domains[1]: duplicate domain \"b.com\" (already in virtual_hosts[0].domains[1]); \
             domains must be unique"
        );
        let e = error(&config(vec![catch_all("a", &["*"]), catch_all("b", &["*"])]));
        assert!(e.starts_with("virtual_hosts[1].domains[0]: only one virtual host may have the \"*\" domain"), "{e}");
        let e = error(&config(vec![catch_all("a", &["*.a.com", "*.A.com"])]));
        assert!(e.starts_with("virtual_hosts[0].domains[1]: duplicate domain"), "{e}");
    }

    #[test]
    fn virtual_host_needs_a_name_and_domains() {
        assert_eq!(error(&config(vec![catch_all("", &["a"])])), "virtual_hosts[0].name: a virtual host needs a name");
        assert_eq!(
            error(&config(vec![catch_all("a", &[])])),
            "virtual_hosts[0].domains: a virtual host needs at least one domain"
        );
    }

    // ---- Route matching ----

    #[test]
    fn first_matching_route_wins() {
        let t = table(&config(vec![vhost(
            "vh",
            &["*"],
            vec![to("foo", prefix("/foo")), to("all", prefix("/")), to("never", prefix("/foo/bar"))],
        )]));
        assert_eq!(route_of(&t, &Req::get("/foo/bar")).as_deref(), Some("foo"));
        assert_eq!(route_of(&t, &Req::get("/bar")).as_deref(), Some("all"));
        let t = table(&single(to("foo", prefix("/foo"))));
        assert_eq!(route_of(&t, &Req::get("/bar")), None);
    }

    #[test]
    fn prefix_and_exact_path() {
        let t = table(&config(vec![vhost(
            "vh",
            &["*"],
            vec![to("exact", path_match(P::Path("/exact".into()))), to("prefix", prefix("/pre"))],
        )]));
        assert_eq!(route_of(&t, &Req::get("/exact")).as_deref(), Some("exact"));
        // Path matching ignores the query string.
        assert_eq!(route_of(&t, &Req::get("/exact?a=b")).as_deref(), Some("exact"));
        assert_eq!(route_of(&t, &Req::get("/exact/")), None);
        assert_eq!(route_of(&t, &Req::get("/EXACT")), None);
        assert_eq!(route_of(&t, &Req::get("/prefix")).as_deref(), Some("prefix"));
        assert_eq!(route_of(&t, &Req::get("/Prefix")), None);
        // A prefix is matched against the path only, not the query.
        assert_eq!(route_of(&t, &Req::get("/x?/pre")), None);
    }

    #[test]
    fn case_insensitive_prefix_and_path() {
        let insensitive = |mut m: rpb::RouteMatch| {
            m.case_sensitive = Some(BoolValue { value: false });
            m
        };
        let t = table(&config(vec![vhost(
            "vh",
            &["*"],
            vec![
                to("exact", insensitive(path_match(P::Path("/Exact".into())))),
                to("prefix", insensitive(prefix("/API/"))),
            ],
        )]));
        assert_eq!(route_of(&t, &Req::get("/eXACT")).as_deref(), Some("exact"));
        assert_eq!(route_of(&t, &Req::get("/api/v1")).as_deref(), Some("prefix"));
        assert_eq!(route_of(&t, &Req::get("/Api/v1")).as_deref(), Some("prefix"));
    }

    #[test]
    fn safe_regex_matches_the_whole_path_without_query() {
        let t = table(&single(to("re", path_match(P::SafeRegex(regex_matcher("/b[io]t"))))));
        assert_eq!(route_of(&t, &Req::get("/bit")).as_deref(), Some("re"));
        assert_eq!(route_of(&t, &Req::get("/bot?x=1")).as_deref(), Some("re"));
        // Not a substring match: the entire path must match.
        assert_eq!(route_of(&t, &Req::get("/bits")), None);
        assert_eq!(route_of(&t, &Req::get("/a/bit")), None);
        // case_sensitive does not apply to regexes.
        assert_eq!(route_of(&t, &Req::get("/BIT")), None);
    }

    #[test]
    fn path_separated_prefix() {
        // The proto's example: `/api/dev` matches `/api/dev`, `/api/dev/`, `/api/dev/v1` and `/api/dev?param=true`
        // but not `/api/developer`.
        let t = table(&single(to("sep", path_match(P::PathSeparatedPrefix("/api/dev".into())))));
        for p in ["/api/dev", "/api/dev/", "/api/dev/v1", "/api/dev?param=true"] {
            assert_eq!(route_of(&t, &Req::get(p)).as_deref(), Some("sep"), "{p}");
        }
        assert_eq!(route_of(&t, &Req::get("/api/developer")), None);
        assert_eq!(route_of(&t, &Req::get("/api/de")), None);
        for bad in ["/foo/", "/", "/a?b", "/a#b", ""] {
            let e = error(&single(to("sep", path_match(P::PathSeparatedPrefix(bad.into())))));
            assert!(e.starts_with("virtual_hosts[0].routes[0].match.path_separated_prefix: "), "{bad}: {e}");
        }
    }

    #[test]
    fn header_matchers() {
        use matcher::string_matcher::MatchPattern as M;
        use rpb::header_matcher::HeaderMatchSpecifier as S;
        let hm = |name: &str, spec: Option<S>, invert: bool| rpb::HeaderMatcher {
            name: name.into(),
            header_match_specifier: spec,
            invert_match: invert,
            ..Default::default()
        };
        let sm = |p: M, ignore_case: bool| {
            Some(S::StringMatch(matcher::StringMatcher { ignore_case, match_pattern: Some(p) }))
        };
        let with = |matchers: Vec<rpb::HeaderMatcher>| {
            let mut m = prefix("/");
            m.headers = matchers;
            table(&single(to("r", m)))
        };
        let hit = |t: &RouteTable, req: Req| route_of(t, &req).is_some();

        #[allow(deprecated)]
        let t = with(vec![hm("x-a", Some(S::ExactMatch("1".into())), false)]);
        assert!(hit(&t, Req::get("/").header("x-a", "1")));
        assert!(!hit(&t, Req::get("/").header("x-a", "2")));
        assert!(!hit(&t, Req::get("/")));

        // Envoy: an empty exact_match matches any value of a present header.
        #[allow(deprecated)]
        let t = with(vec![hm("x-a", Some(S::ExactMatch(String::new())), false)]);
        assert!(hit(&t, Req::get("/").header("x-a", "anything")));
        assert!(!hit(&t, Req::get("/")));

        let t = with(vec![hm("x-a", sm(M::Prefix("ab".into()), false), false)]);
        assert!(hit(&t, Req::get("/").header("x-a", "abc")));
        assert!(!hit(&t, Req::get("/").header("x-a", "xab")));
        let t = with(vec![hm("x-a", sm(M::Suffix("bc".into()), true), false)]);
        assert!(hit(&t, Req::get("/").header("x-a", "aBC")));
        let t = with(vec![hm("x-a", sm(M::Contains("Mid".into()), true), false)]);
        assert!(hit(&t, Req::get("/").header("x-a", "amidb")));
        assert!(!hit(&t, Req::get("/").header("x-a", "ami")));
        let t = with(vec![hm("x-a", sm(M::Exact("Val".into()), true), false)]);
        assert!(hit(&t, Req::get("/").header("x-a", "VAL")));
        // The regex must match the whole value: `\d{3}` does not match `1234` (the proto's example)...
        let t = with(vec![hm("x-a", sm(M::SafeRegex(regex_matcher(r"\d{3}")), false), false)]);
        assert!(hit(&t, Req::get("/").header("x-a", "123")));
        assert!(!hit(&t, Req::get("/").header("x-a", "1234")));
        // ...so it matches when inverted.
        let t = with(vec![hm("x-a", sm(M::SafeRegex(regex_matcher(r"\d{3}")), false), true)]);
        assert!(hit(&t, Req::get("/").header("x-a", "1234")));
        // An inverted matcher still needs the header to be present.
        assert!(!hit(&t, Req::get("/")));

        // Range [-10, 0): the proto's examples.
        let t = with(vec![hm(
            "x-n",
            Some(S::RangeMatch(envoy_types::pb::envoy::r#type::v3::Int64Range { start: -10, end: 0 })),
            false,
        )]);
        assert!(hit(&t, Req::get("/").header("x-n", "-1")));
        for v in ["0", "somestring", "10.9", "-1somestring"] {
            assert!(!hit(&t, Req::get("/").header("x-n", v)), "{v}");
        }

        // Multiple values are matched joined with ",".
        let t = with(vec![hm("x-m", sm(M::Exact("a,b".into()), false), false)]);
        assert!(hit(&t, Req::get("/").header("x-m", "a").header("x-m", "b")));
    }

    #[test]
    fn present_match_and_missing_headers() {
        use matcher::string_matcher::MatchPattern as M;
        use rpb::header_matcher::HeaderMatchSpecifier as S;
        let with = |spec: Option<S>, invert: bool, treat_missing: bool| {
            let mut m = prefix("/");
            m.headers = vec![rpb::HeaderMatcher {
                name: "x-p".into(),
                header_match_specifier: spec,
                invert_match: invert,
                treat_missing_header_as_empty: treat_missing,
            }];
            table(&single(to("r", m)))
        };
        let present = Req::get("/").header("x-p", "v");
        let absent = Req::get("/");
        let hit = |t: &RouteTable, req: &Req| route_of(t, req).is_some();

        // No specifier: present.
        let t = with(None, false, false);
        assert!(hit(&t, &present) && !hit(&t, &absent));
        let t = with(Some(S::PresentMatch(true)), false, false);
        assert!(hit(&t, &present) && !hit(&t, &absent));
        // present_match: false matches an absent header.
        let t = with(Some(S::PresentMatch(false)), false, false);
        assert!(!hit(&t, &present) && hit(&t, &absent));
        let t = with(Some(S::PresentMatch(true)), true, false);
        assert!(!hit(&t, &present) && hit(&t, &absent));

        // treat_missing_header_as_empty, the proto's examples: regex `^$` matches a missing header...
        let empty = Some(S::StringMatch(matcher::StringMatcher {
            match_pattern: Some(M::SafeRegex(regex_matcher("^$"))),
            ..Default::default()
        }));
        let t = with(empty.clone(), false, true);
        assert!(hit(&t, &absent));
        // ...but only when treated as empty.
        let t = with(empty, false, false);
        assert!(!hit(&t, &absent));
        // Range [0, 10] inverted over a missing header: matches only when treated as empty.
        let range = Some(S::RangeMatch(envoy_types::pb::envoy::r#type::v3::Int64Range { start: 0, end: 10 }));
        assert!(hit(&with(range.clone(), true, true), &absent));
        assert!(!hit(&with(range, true, false), &absent));
    }

    #[test]
    fn pseudo_header_matchers() {
        use matcher::string_matcher::MatchPattern as M;
        use rpb::header_matcher::HeaderMatchSpecifier as S;
        let exact = |name: &str, v: &str| rpb::HeaderMatcher {
            name: name.into(),
            header_match_specifier: Some(S::StringMatch(matcher::StringMatcher {
                match_pattern: Some(M::Exact(v.into())),
                ..Default::default()
            })),
            ..Default::default()
        };
        let mut m = prefix("/");
        m.headers = vec![exact(":method", "GET"), exact(":authority", "example.com"), exact(":path", "/a?b=c")];
        let t = table(&single(to("r", m)));
        assert!(route_of(&t, &Req::get("/a?b=c")).is_some());
        assert!(route_of(&t, &Req::get("/a")).is_none());
        let mut post = Req::get("/a?b=c");
        post.method = Method::POST;
        assert!(route_of(&t, &post).is_none());

        let mut m = prefix("/");
        m.headers = vec![exact(":scheme", "https")];
        let t = table(&single(to("r", m)));
        assert!(route_of(&t, &Req::get("/").header("x-forwarded-proto", "https")).is_some());
        assert!(route_of(&t, &Req::new("example.com", "https://example.com/")).is_some());
        assert!(route_of(&t, &Req::get("/")).is_none());

        // Envoy keeps Host as :authority, so a matcher on `host` never sees a value.
        let mut m = prefix("/");
        m.headers = vec![rpb::HeaderMatcher { name: "host".into(), ..Default::default() }];
        let t = table(&single(to("r", m)));
        assert!(route_of(&t, &Req::get("/").header("host", "example.com")).is_none());
    }

    #[test]
    fn query_parameter_matchers() {
        use matcher::string_matcher::MatchPattern as M;
        use rpb::query_parameter_matcher::QueryParameterMatchSpecifier as S;
        let with = |spec: Option<S>| {
            let mut m = prefix("/");
            m.query_parameters =
                vec![rpb::QueryParameterMatcher { name: "debug".into(), query_parameter_match_specifier: spec }];
            table(&single(to("r", m)))
        };
        let hit = |t: &RouteTable, p: &str| route_of(t, &Req::get(p)).is_some();
        let t = with(Some(S::StringMatch(matcher::StringMatcher {
            match_pattern: Some(M::Exact("1".into())),
            ..Default::default()
        })));
        assert!(hit(&t, "/?debug=1"));
        assert!(hit(&t, "/?a=b&debug=1"));
        assert!(!hit(&t, "/?debug=2"));
        assert!(!hit(&t, "/"));
        // Only the first value counts.
        assert!(!hit(&t, "/?debug=2&debug=1"));
        // Values are compared raw, not percent-decoded.
        let t = with(Some(S::StringMatch(matcher::StringMatcher {
            match_pattern: Some(M::Exact("a b".into())),
            ..Default::default()
        })));
        assert!(!hit(&t, "/?debug=a%20b"));

        let t = with(Some(S::PresentMatch(true)));
        assert!(hit(&t, "/?debug") && hit(&t, "/?debug=") && !hit(&t, "/?x=debug"));
        let t = with(Some(S::PresentMatch(false)));
        assert!(!hit(&t, "/?debug") && hit(&t, "/?x=1"));
        // A name alone is a presence check.
        let t = with(None);
        assert!(hit(&t, "/?debug") && !hit(&t, "/"));
    }

    #[test]
    fn grpc_matcher() {
        let mut m = prefix("/");
        m.grpc = Some(rpb::route_match::GrpcRouteMatchOptions {});
        let t = table(&single(to("r", m)));
        let hit = |ct: Option<&str>| {
            let req = Req::get("/svc/Method");
            route_of(
                &t,
                &match ct {
                    Some(ct) => req.header("content-type", ct),
                    None => req,
                },
            )
            .is_some()
        };
        assert!(hit(Some("application/grpc")));
        assert!(hit(Some("application/grpc+proto")));
        // grpc-web is not gRPC.
        assert!(!hit(Some("application/grpc-web")));
        assert!(!hit(Some("application/json")));
        assert!(!hit(None));
    }

    // ---- Actions ----

    #[test]
    fn route_action_defaults_and_timeouts() {
        let t = table(&single(to("c", prefix("/"))));
        let a = route_action(&t);
        assert_eq!(a.timeout, Some(DEFAULT_ROUTE_TIMEOUT));
        assert_eq!(a.idle_timeout, None);
        assert_eq!(a.retry_policy, None);
        assert_eq!(a.host_rewrite, HostRewrite::None);
        assert_eq!(a.cluster_not_found_status, StatusCode::SERVICE_UNAVAILABLE);

        let mut ra = to_cluster("c");
        ra.timeout = Some(pb_duration(0));
        ra.idle_timeout = Some(pb_duration(0));
        let t = table(&single(route("r", prefix("/"), action(ra))));
        let a = route_action(&t);
        // timeout 0 disables the route timeout; idle_timeout 0 disables the stream idle timeout.
        assert_eq!(a.timeout, None);
        assert_eq!(a.idle_timeout, Some(Duration::ZERO));

        let mut ra = to_cluster("c");
        ra.timeout = Some(pb_duration(2500));
        ra.host_rewrite_specifier = Some(rpb::route_action::HostRewriteSpecifier::HostRewriteLiteral("up.svc".into()));
        ra.cluster_not_found_response_code = rpb::route_action::ClusterNotFoundResponseCode::NotFound as i32;
        let t = table(&single(route("r", prefix("/"), action(ra))));
        let a = route_action(&t);
        assert_eq!(a.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(a.host_rewrite, HostRewrite::Literal("up.svc".into()));
        assert_eq!(a.cluster_not_found_status, StatusCode::NOT_FOUND);

        let mut ra = to_cluster("c");
        ra.host_rewrite_specifier =
            Some(rpb::route_action::HostRewriteSpecifier::AutoHostRewrite(BoolValue { value: true }));
        assert_eq!(route_action(&table(&single(route("r", prefix("/"), action(ra))))).host_rewrite, HostRewrite::Auto);
    }

    fn weighted(clusters: &[(&str, u32)]) -> rpb::RouteAction {
        rpb::RouteAction {
            cluster_specifier: Some(C::WeightedClusters(rpb::WeightedCluster {
                clusters: clusters
                    .iter()
                    .map(|(n, w)| rpb::weighted_cluster::ClusterWeight {
                        name: n.to_string(),
                        weight: Some(UInt32Value { value: *w }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn weighted_clusters_pick_by_interval() {
        let t = table(&single(route("r", prefix("/"), action(weighted(&[("a", 10), ("zero", 0), ("b", 30)])))));
        let m = t.route(&Req::get("/").head()).unwrap_or_else(|| panic!("no route"));
        let h = HeaderMap::new();
        let pick = |r: u64| m.cluster_with_random(&h, r).map(|c| c.name.into_owned());
        // Intervals [0, 10) → a, [10, 40) → b, over random % 40.
        assert_eq!(pick(0).as_deref(), Some("a"));
        assert_eq!(pick(9).as_deref(), Some("a"));
        assert_eq!(pick(10).as_deref(), Some("b"));
        assert_eq!(pick(39).as_deref(), Some("b"));
        assert_eq!(pick(40).as_deref(), Some("a"));
        assert_eq!(pick(u64::MAX).as_deref(), Some("b"));
        match &route_action(&t).cluster {
            ClusterSpecifier::Weighted(w) => assert_eq!(w.total_weight, 40),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.cluster_names().collect::<Vec<_>>(), ["a", "b", "zero"]);
    }

    /// The extras come with the entry picked, not with the first entry of that name.
    #[test]
    fn weighted_entries_of_one_cluster_keep_their_own_extras() {
        let mut ra = weighted(&[("a", 1), ("a", 1)]);
        let Some(C::WeightedClusters(w)) = &mut ra.cluster_specifier else { unreachable!() };
        w.clusters[0].request_headers_to_add = vec![hvo("x-entry", "first", 0)];
        w.clusters[1].request_headers_to_add = vec![hvo("x-entry", "second", 0)];
        let t = table(&single(route("r", prefix("/"), action(ra))));
        let m = t.route(&Req::get("/").head()).unwrap_or_else(|| panic!("no route"));
        let entry = |random: u64| {
            let target = m.cluster_with_random(&HeaderMap::new(), random).unwrap_or_else(|| panic!("no cluster"));
            assert_eq!(target.name, "a");
            let mut headers = HeaderMap::new();
            m.apply_request_headers_with(target.extras.unwrap_or_else(|| panic!("no extras")), &mut headers);
            headers.get("x-entry").cloned()
        };
        assert_eq!(entry(0), Some(HeaderValue::from_static("first")));
        assert_eq!(entry(1), Some(HeaderValue::from_static("second")));
    }

    #[test]
    fn weighted_clusters_distribution() {
        let t = table(&single(route("r", prefix("/"), action(weighted(&[("a", 25), ("b", 75)])))));
        let m = t.route(&Req::get("/").head()).unwrap_or_else(|| panic!("no route"));
        let h = HeaderMap::new();
        let n = 20_000;
        let a = (0..n).filter(|_| m.cluster(&h).is_some_and(|t| t.name == "a")).count();
        // 25% ± a wide margin (the standard deviation is about 0.3%).
        assert!((4_000..6_000).contains(&a), "{a} of {n}");
    }

    #[test]
    fn weighted_clusters_errors() {
        assert_eq!(
            error(&single(route("r", prefix("/"), action(weighted(&[("a", 0), ("b", 0)]))))),
            "virtual_hosts[0].routes[0].route.weighted_clusters: the sum of the weights must be greater than 0"
        );
        assert!(
            error(&single(route("r", prefix("/"), action(weighted(&[("a", u32::MAX), ("b", 1)])))))
                .contains("must not exceed 4294967295")
        );
        assert_eq!(
            error(&single(route("r", prefix("/"), action(weighted(&[("a", 1), ("", 1)]))))),
            "virtual_hosts[0].routes[0].route.weighted_clusters.clusters[1].name: a weighted cluster needs a name"
        );
    }

    #[test]
    fn cluster_header() {
        let ra =
            rpb::RouteAction { cluster_specifier: Some(C::ClusterHeader("x-Cluster".into())), ..Default::default() };
        let t = table(&single(route("r", prefix("/"), action(ra))));
        let req = Req::get("/").header("x-cluster", "backend");
        let m = t.route(&req.head()).unwrap_or_else(|| panic!("no route"));
        assert_eq!(m.cluster(&req.headers).map(|t| t.name.into_owned()).as_deref(), Some("backend"));
        assert!(m.cluster(&HeaderMap::new()).is_none());
        assert_eq!(t.cluster_names().count(), 0);
    }

    #[test]
    fn prefix_rewrite_envoy_example() {
        // From the prefix_rewrite docs: `/prefix` is stripped to `/`, `/prefix/etc` to `/etc`.
        let rewrite = |p: &str| {
            let mut ra = to_cluster(p);
            ra.prefix_rewrite = "/".into();
            route(p, prefix(p), action(ra))
        };
        let t = table(&config(vec![vhost("vh", &["*"], vec![rewrite("/prefix/"), rewrite("/prefix")])]));
        let rewritten = |path: &str| {
            let req = Req::get(path);
            t.route(&req.head()).and_then(|m| m.rewritten_path(path))
        };
        assert_eq!(rewritten("/prefix").as_deref(), Some("/"));
        assert_eq!(rewritten("/prefix/etc").as_deref(), Some("/etc"));
        assert_eq!(rewritten("/prefix/etc?q=1").as_deref(), Some("/etc?q=1"));
        // Without the first route, `/prefix/etc` would become `//etc`.
        let t = table(&single(rewrite("/prefix")));
        let m = t.route(&Req::get("/prefix/etc").head()).unwrap_or_else(|| panic!("no route"));
        assert_eq!(m.rewritten_path("/prefix/etc").as_deref(), Some("//etc"));
        // No rewrite configured.
        let t = table(&single(to("c", prefix("/"))));
        let m = t.route(&Req::get("/a").head()).unwrap_or_else(|| panic!("no route"));
        assert_eq!(m.rewritten_path("/a"), None);
    }

    #[test]
    fn prefix_rewrite_after_case_insensitive_and_exact_matches() {
        let mut m = prefix("/API/");
        m.case_sensitive = Some(BoolValue { value: false });
        let mut ra = to_cluster("c");
        ra.prefix_rewrite = "/v2/".into();
        let t = table(&single(route("r", m, action(ra))));
        let m = t.route(&Req::get("/api/users").head()).unwrap_or_else(|| panic!("no route"));
        assert_eq!(m.rewritten_path("/api/users").as_deref(), Some("/v2/users"));

        // On a regex route prefix_rewrite replaces the whole path (query kept).
        let mut ra = to_cluster("c");
        ra.prefix_rewrite = "/new".into();
        let t = table(&single(route("r", path_match(P::SafeRegex(regex_matcher("/old/.*"))), action(ra))));
        let m = t.route(&Req::get("/old/x?y=1").head()).unwrap_or_else(|| panic!("no route"));
        assert_eq!(m.rewritten_path("/old/x?y=1").as_deref(), Some("/new?y=1"));
    }

    fn regex_rewrite(pattern: &str, substitution: &str) -> matcher::RegexMatchAndSubstitute {
        matcher::RegexMatchAndSubstitute { pattern: Some(regex_matcher(pattern)), substitution: substitution.into() }
    }

    #[test]
    fn regex_rewrite_envoy_examples() {
        let rewrite = |pattern: &str, substitution: &str, path: &str| {
            let mut ra = to_cluster("c");
            ra.regex_rewrite = Some(regex_rewrite(pattern, substitution));
            let t = table(&single(route("r", prefix("/"), action(ra))));
            let req = Req::get(path);
            let m = t.route(&req.head()).unwrap_or_else(|| panic!("no route"));
            m.rewritten_path(path).unwrap_or_else(|| panic!("no rewrite"))
        };
        // The four examples of RouteAction.regex_rewrite.
        assert_eq!(
            rewrite(r"^/service/([^/]+)(/.*)$", r"\2/instance/\1", "/service/foo/v1/api"),
            "/v1/api/instance/foo"
        );
        assert_eq!(rewrite("one", "two", "/xxx/one/yyy/one/zzz"), "/xxx/two/yyy/two/zzz");
        assert_eq!(rewrite(r"^(.*?)one(.*)$", r"\1two\2", "/xxx/one/yyy/one/zzz"), "/xxx/two/yyy/one/zzz");
        assert_eq!(rewrite("(?i)/xxx/", "/yyy/", "/aaa/XxX/bbb"), "/aaa/yyy/bbb");
        // Applied to the path only; the query is kept as is.
        assert_eq!(rewrite("one", "two", "/one?q=one"), "/two?q=one");
        // `\\` is a backslash; `$` has no meaning in RE2 rewrites.
        assert_eq!(rewrite("a", r"\\$1", "/a"), r"/\$1");
    }

    #[test]
    fn regex_rewrite_errors() {
        let with = |rw: matcher::RegexMatchAndSubstitute| {
            let mut ra = to_cluster("c");
            ra.regex_rewrite = Some(rw);
            error(&single(route("r", prefix("/"), action(ra))))
        };
        assert!(
            with(regex_rewrite("(", "x"))
                .starts_with("virtual_hosts[0].routes[0].route.regex_rewrite.pattern.regex: invalid regex: "),
        );
        assert_eq!(
            with(regex_rewrite("(a)", r"\2")),
            "virtual_hosts[0].routes[0].route.regex_rewrite.substitution: \\2 refers to a group the pattern does not \
             have (1 groups)"
        );
        assert!(with(regex_rewrite("a", r"\x")).contains("invalid rewrite"));
        let mut ra = to_cluster("c");
        ra.regex_rewrite = Some(regex_rewrite("a", "b"));
        ra.prefix_rewrite = "/".into();
        assert_eq!(
            error(&single(route("r", prefix("/"), action(ra)))),
            "virtual_hosts[0].routes[0].route.regex_rewrite: only one of prefix_rewrite and regex_rewrite may be set"
        );
    }

    fn redirect_table(r: rpb::RedirectAction, m: rpb::RouteMatch) -> RouteTable {
        table(&single(route("r", m, Some(rpb::route::Action::Redirect(r)))))
    }

    fn location(t: &RouteTable, scheme: &str, authority: &str, path: &str) -> (StatusCode, String) {
        let req = Req::new(authority, path);
        let m = t.route(&req.head()).unwrap_or_else(|| panic!("no route"));
        match m.action() {
            Action::Redirect(r) => (r.status(), r.location(scheme, authority, path)),
            other => panic!("not a redirect: {other:?}"),
        }
    }

    #[test]
    fn https_redirect() {
        use rpb::redirect_action::SchemeRewriteSpecifier as S;
        let t = redirect_table(
            rpb::RedirectAction { scheme_rewrite_specifier: Some(S::HttpsRedirect(true)), ..Default::default() },
            prefix("/"),
        );
        assert_eq!(
            location(&t, "http", "foo.com", "/a?b=c"),
            (StatusCode::MOVED_PERMANENTLY, "https://foo.com/a?b=c".into())
        );
        // The explicit default port of the old scheme is dropped...
        assert_eq!(location(&t, "http", "foo.com:80", "/a").1, "https://foo.com/a");
        // ...any other port is kept.
        assert_eq!(location(&t, "http", "foo.com:8080", "/a").1, "https://foo.com:8080/a");
        assert_eq!(location(&t, "http", "[::1]:80", "/").1, "https://[::1]/");
        // Already https: nothing to strip.
        assert_eq!(location(&t, "https", "foo.com:443", "/").1, "https://foo.com:443/");
    }

    #[test]
    fn redirect_host_port_path_and_query() {
        use rpb::redirect_action::{
            PathRewriteSpecifier as Pr, RedirectResponseCode as Code, SchemeRewriteSpecifier as S,
        };
        let t = redirect_table(
            rpb::RedirectAction {
                host_redirect: "new.com".into(),
                port_redirect: 8443,
                scheme_rewrite_specifier: Some(S::SchemeRedirect("https".into())),
                response_code: Code::PermanentRedirect as i32,
                ..Default::default()
            },
            prefix("/"),
        );
        assert_eq!(
            location(&t, "http", "old.com:80", "/p?q"),
            (StatusCode::PERMANENT_REDIRECT, "https://new.com:8443/p?q".into())
        );

        // A port_redirect replaces the request's port.
        let t = redirect_table(rpb::RedirectAction { port_redirect: 9000, ..Default::default() }, prefix("/"));
        assert_eq!(location(&t, "http", "old.com:8080", "/").1, "http://old.com:9000/");

        // path_redirect keeps the request's query unless strip_query...
        let path_redirect = |p: &str, strip_query: bool| rpb::RedirectAction {
            path_rewrite_specifier: Some(Pr::PathRedirect(p.into())),
            strip_query,
            response_code: Code::Found as i32,
            ..Default::default()
        };
        // The proto's three examples.
        let t = redirect_table(path_redirect("/new-path-1", false), prefix("/"));
        assert_eq!(
            location(&t, "http", "h", "/old-path-1?bar=1"),
            (StatusCode::FOUND, "http://h/new-path-1?bar=1".into())
        );
        let t = redirect_table(path_redirect("/new-path-2", true), prefix("/"));
        assert_eq!(location(&t, "http", "h", "/old-path-2?bar=1").1, "http://h/new-path-2");
        // ...and a query in path_redirect wins and is never stripped.
        let t = redirect_table(path_redirect("/new-path-3?foo=1", true), prefix("/"));
        assert_eq!(location(&t, "http", "h", "/old-path-3?bar=1").1, "http://h/new-path-3?foo=1");
        // A path without a leading slash gets one.
        let t = redirect_table(path_redirect("relative", false), prefix("/"));
        assert_eq!(location(&t, "http", "h", "/x").1, "http://h/relative");

        let t = redirect_table(rpb::RedirectAction { strip_query: true, ..Default::default() }, prefix("/"));
        assert_eq!(location(&t, "http", "h", "/x?y=1").1, "http://h/x");

        for (code, status) in [(Code::SeeOther, 303), (Code::TemporaryRedirect, 307), (Code::MovedPermanently, 301)] {
            let t =
                redirect_table(rpb::RedirectAction { response_code: code as i32, ..Default::default() }, prefix("/"));
            assert_eq!(location(&t, "http", "h", "/").0.as_u16(), status);
        }
    }

    #[test]
    fn redirect_prefix_and_regex_rewrite() {
        use rpb::redirect_action::PathRewriteSpecifier as Pr;
        let t = redirect_table(
            rpb::RedirectAction {
                path_rewrite_specifier: Some(Pr::PrefixRewrite("/new/".into())),
                ..Default::default()
            },
            prefix("/old/"),
        );
        assert_eq!(location(&t, "http", "h", "/old/a?b=c").1, "http://h/new/a?b=c");
        let t = redirect_table(
            rpb::RedirectAction {
                path_rewrite_specifier: Some(Pr::RegexRewrite(regex_rewrite(
                    r"^/service/([^/]+)(/.*)$",
                    r"\2/instance/\1",
                ))),
                strip_query: true,
                ..Default::default()
            },
            prefix("/"),
        );
        assert_eq!(location(&t, "https", "h", "/service/foo/v1/api?x=1").1, "https://h/v1/api/instance/foo");
    }

    #[test]
    fn direct_response() {
        let direct = |status: u32, body: Option<core::data_source::Specifier>| {
            single(route(
                "r",
                prefix("/"),
                Some(rpb::route::Action::DirectResponse(rpb::DirectResponseAction {
                    status,
                    body: body.map(|s| core::DataSource { specifier: Some(s), ..Default::default() }),
                    ..Default::default()
                })),
            ))
        };
        use super::core::data_source::Specifier as Ds;
        let t = table(&direct(503, Some(Ds::InlineString("unavailable".into()))));
        match t.vhosts[0].routes[0].action() {
            Action::DirectResponse { status, body } => {
                assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(body, b"unavailable");
            }
            other => panic!("{other:?}"),
        }
        let t = table(&direct(200, None));
        assert!(matches!(t.vhosts[0].routes[0].action(), Action::DirectResponse { body, .. } if body.is_empty()));
        assert!(table(&direct(204, Some(Ds::InlineBytes(vec![0, 1])))).cluster_names().next().is_none());

        assert_eq!(
            error(&direct(600, None)),
            "virtual_hosts[0].routes[0].direct_response.status: status 600 is not in [200, 600)"
        );
        assert_eq!(
            error(&direct(200, Some(Ds::InlineBytes(vec![b'x'; 4097])))),
            "virtual_hosts[0].routes[0].direct_response.body: response body size is 4097 bytes; maximum is 4096 \
             (max_direct_response_body_size_bytes)"
        );
        let mut rc = direct(200, Some(Ds::InlineBytes(vec![b'x'; 4097])));
        rc.max_direct_response_body_size_bytes = Some(UInt32Value { value: 8192 });
        table(&rc);

        let file = std::env::temp_dir().join(format!("route-direct-{}.txt", std::process::id()));
        std::fs::write(&file, "from a file").unwrap_or_else(|e| panic!("{e}"));
        let t = table(&direct(200, Some(Ds::Filename(file.to_string_lossy().into_owned()))));
        let _ = std::fs::remove_file(&file);
        assert!(
            matches!(t.vhosts[0].routes[0].action(), Action::DirectResponse { body, .. } if body == b"from a file")
        );
        assert!(
            error(&direct(200, Some(Ds::Filename("/nonexistent/x".into())))).contains("body.filename: cannot read")
        );
    }

    // ---- Header mutations ----

    /// A table whose three levels each set `x-level` to their name with `action` and remove `x-remove-<level>`.
    fn levels(action: i32, most_specific_wins: bool) -> RouteTable {
        let mut r = to("c", prefix("/"));
        r.request_headers_to_add = vec![hvo("x-level", "route", action), hvo("x-route", "1", 0)];
        r.request_headers_to_remove = vec!["x-remove-route".into()];
        r.response_headers_to_add = vec![hvo("x-level", "route", action)];
        let mut vh = vhost("vh", &["*"], vec![r]);
        vh.request_headers_to_add = vec![hvo("x-level", "vhost", action)];
        vh.request_headers_to_remove = vec!["x-remove-vhost".into()];
        vh.response_headers_to_add = vec![hvo("x-level", "vhost", action)];
        let mut rc = config(vec![vh]);
        rc.request_headers_to_add = vec![hvo("x-level", "config", action)];
        rc.request_headers_to_remove = vec!["x-remove-config".into(), "x-route".into()];
        rc.response_headers_to_add = vec![hvo("x-level", "config", action)];
        rc.most_specific_header_mutations_wins = most_specific_wins;
        table(&rc)
    }

    fn values(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name).iter().map(|v| v.to_str().unwrap_or("?").to_string()).collect()
    }

    fn mutate(t: &RouteTable, mut headers: HeaderMap) -> HeaderMap {
        let req = Req::get("/");
        let m = t.route(&req.head()).unwrap_or_else(|| panic!("no route"));
        m.apply_request_headers(&mut headers);
        headers
    }

    #[test]
    fn header_levels_apply_most_specific_first_so_the_route_configuration_wins() {
        use super::core::header_value_option::HeaderAppendAction as A;
        let t = levels(A::OverwriteIfExistsOrAdd as i32, false);
        let mut h = HeaderMap::new();
        for name in ["x-remove-route", "x-remove-vhost", "x-remove-config", "x-keep"] {
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("v"));
        }
        let h = mutate(&t, h);
        assert_eq!(values(&h, "x-level"), ["config"]);
        assert!(
            !h.contains_key("x-remove-route")
                && !h.contains_key("x-remove-vhost")
                && !h.contains_key("x-remove-config")
        );
        assert_eq!(values(&h, "x-keep"), ["v"]);
        // The route configuration's removal runs after the route's addition.
        assert!(!h.contains_key("x-route"));

        let req = Req::get("/");
        let m = t.route(&req.head()).unwrap_or_else(|| panic!("no route"));
        let mut resp = HeaderMap::new();
        m.apply_response_headers(&mut resp);
        assert_eq!(values(&resp, "x-level"), ["config"]);
    }

    #[test]
    fn most_specific_header_mutations_wins_reverses_the_order() {
        use super::core::header_value_option::HeaderAppendAction as A;
        let t = levels(A::OverwriteIfExistsOrAdd as i32, true);
        let h = mutate(&t, HeaderMap::new());
        assert_eq!(values(&h, "x-level"), ["route"]);
        // Now the route's addition comes after the route configuration's removal.
        assert_eq!(values(&h, "x-route"), ["1"]);
        let t = levels(A::AddIfAbsent as i32, true);
        assert_eq!(values(&mutate(&t, HeaderMap::new()), "x-level"), ["config"]);
    }

    #[test]
    fn append_actions() {
        use super::core::header_value_option::HeaderAppendAction as A;
        let existing = || {
            let mut h = HeaderMap::new();
            h.insert("x-level", HeaderValue::from_static("client"));
            h
        };
        // APPEND_IF_EXISTS_OR_ADD, the default, keeps every value.
        let t = levels(A::AppendIfExistsOrAdd as i32, false);
        assert_eq!(values(&mutate(&t, existing()), "x-level"), ["client", "route", "vhost", "config"]);
        // ADD_IF_ABSENT: the first level to find it absent adds it.
        let t = levels(A::AddIfAbsent as i32, false);
        assert_eq!(values(&mutate(&t, existing()), "x-level"), ["client"]);
        assert_eq!(values(&mutate(&t, HeaderMap::new()), "x-level"), ["route"]);
        // OVERWRITE_IF_EXISTS does nothing to an absent header.
        let t = levels(A::OverwriteIfExists as i32, false);
        assert_eq!(values(&mutate(&t, existing()), "x-level"), ["config"]);
        assert!(values(&mutate(&t, HeaderMap::new()), "x-level").is_empty());
    }

    #[test]
    fn within_a_level_adds_are_decided_before_any_is_applied() {
        use super::core::header_value_option::HeaderAppendAction as A;
        // Envoy's HeaderParser: ADD_IF_ABSENT looks at the headers before this level's overwrite adds the header,
        // and overwrites are applied before appends.
        let mut r = to("c", prefix("/"));
        r.request_headers_to_add = vec![
            hvo("x-a", "appended", A::AppendIfExistsOrAdd as i32),
            hvo("x-a", "overwritten", A::OverwriteIfExistsOrAdd as i32),
            hvo("x-a", "if-absent", A::AddIfAbsent as i32),
        ];
        let t = table(&single(r));
        assert_eq!(values(&mutate(&t, HeaderMap::new()), "x-a"), ["overwritten", "appended", "if-absent"]);
    }

    #[test]
    fn many_header_adds_in_one_level() {
        use super::core::header_value_option::HeaderAppendAction as A;
        // More entries than the decision bitmask holds.
        let mut r = to("c", prefix("/"));
        r.request_headers_to_add = (0..70).map(|i| hvo(&format!("x-h{i}"), "v", A::AddIfAbsent as i32)).collect();
        r.request_headers_to_add.push(hvo("x-h69", "second", A::AddIfAbsent as i32));
        let h = mutate(&table(&single(r)), HeaderMap::new());
        assert_eq!(h.len(), 71);
        assert_eq!(values(&h, "x-h0"), ["v"]);
        // Both were decided while x-h69 was absent.
        assert_eq!(values(&h, "x-h69"), ["v", "second"]);
    }

    #[test]
    #[allow(deprecated)]
    fn header_add_options() {
        use super::core::header_value_option::HeaderAppendAction as A;
        let with = |o: core::HeaderValueOption| {
            let mut r = to("c", prefix("/"));
            r.request_headers_to_add = vec![o];
            single(r)
        };
        let mut existing = HeaderMap::new();
        existing.insert("x-a", HeaderValue::from_static("old"));

        // The deprecated append: false means overwrite.
        let mut o = hvo("x-a", "new", 0);
        o.append = Some(BoolValue { value: false });
        assert_eq!(values(&mutate(&table(&with(o)), existing.clone()), "x-a"), ["new"]);
        let mut o = hvo("x-a", "new", 0);
        o.append = Some(BoolValue { value: true });
        assert_eq!(values(&mutate(&table(&with(o)), existing.clone()), "x-a"), ["old", "new"]);
        let mut o = hvo("x-a", "new", A::AddIfAbsent as i32);
        o.append = Some(BoolValue { value: true });
        assert_eq!(
            error(&with(o)),
            "virtual_hosts[0].routes[0].request_headers_to_add[0]: both append and append_action are set; set only \
             append_action"
        );

        // Empty values are dropped unless keep_empty_value.
        assert!(!mutate(&table(&with(hvo("x-e", "", 0))), HeaderMap::new()).contains_key("x-e"));
        let mut o = hvo("x-e", "", 0);
        o.keep_empty_value = true;
        assert_eq!(values(&mutate(&table(&with(o)), HeaderMap::new()), "x-e"), [""]);

        // `%%` is a literal percent; any other `%` would be a format operator.
        assert_eq!(values(&mutate(&table(&with(hvo("x-p", "100%%", 0))), HeaderMap::new()), "x-p"), ["100%"]);
        assert_eq!(
            error(&with(hvo("x-p", "%REQ(x-b)%", 0))),
            "virtual_hosts[0].routes[0].request_headers_to_add[0].header.value: substitution format operators (%...%) \
             are not supported; write a literal % as %%"
        );
    }

    #[test]
    fn header_mutation_errors_name_the_field() {
        let mut r = to("c", prefix("/"));
        r.response_headers_to_add = vec![hvo("x-ok", "1", 0), hvo(":status", "200", 0)];
        assert_eq!(
            error(&single(r)),
            "virtual_hosts[0].routes[0].response_headers_to_add[1].header.key: :-prefixed or host headers may not be \
             modified"
        );
        let mut rc = single(to("c", prefix("/")));
        rc.request_headers_to_remove = vec!["Host".into()];
        assert_eq!(error(&rc), "request_headers_to_remove[0]: :-prefixed or host headers may not be removed");
        let mut vh = catch_all("vh", &["*"]);
        vh.request_headers_to_add = vec![hvo("bad name", "1", 0)];
        assert_eq!(
            error(&config(vec![vh])),
            "virtual_hosts[0].request_headers_to_add[0].header.key: invalid header name \"bad name\""
        );
        let mut vh = catch_all("vh", &["*"]);
        vh.response_headers_to_add = vec![hvo("x-a", "line\nbreak", 0)];
        assert!(
            error(&config(vec![vh])).starts_with("virtual_hosts[0].response_headers_to_add[0].header.value: invalid")
        );
    }

    // ---- Retry policy ----

    fn retry(retry_on: &str) -> rpb::RetryPolicy {
        rpb::RetryPolicy { retry_on: retry_on.into(), ..Default::default() }
    }

    fn with_route_retry(p: rpb::RetryPolicy) -> rpb::RouteConfiguration {
        let mut ra = to_cluster("c");
        ra.retry_policy = Some(p);
        single(route("r", prefix("/"), action(ra)))
    }

    #[test]
    fn retry_policy_defaults() {
        let t = table(&with_route_retry(retry("5xx")));
        let p = route_action(&t).retry_policy.clone().unwrap_or_else(|| panic!("no retry policy"));
        assert_eq!(p.num_retries, 1);
        assert_eq!(p.per_try_timeout, None);
        assert_eq!(p.backoff_base, Duration::from_millis(25));
        assert_eq!(p.backoff_max, Duration::from_millis(250));
        assert!(!p.avoid_previous_hosts);
        assert!(p.retry_on.five_xx && !p.retry_on.gateway_error);
    }

    #[test]
    fn retry_priorities_other_than_previous_priorities_are_refused() {
        use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
        use prost::Message;
        let with = |type_url: &str, update_frequency: i32| {
            let any = Any {
                type_url: format!("type.googleapis.com/{type_url}"),
                value: PreviousPrioritiesConfig { update_frequency }.encode_to_vec(),
            };
            let p = rpb::RetryPolicy {
                retry_on: "5xx".into(),
                retry_priority: Some(rpb::retry_policy::RetryPriority {
                    name: "p".into(),
                    config_type: Some(rpb::retry_policy::retry_priority::ConfigType::TypedConfig(any)),
                }),
                ..Default::default()
            };
            RetryPolicy::new(&p, "r").map(|p| p.previous_priorities)
        };
        let previous = "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig";
        assert_eq!(with(previous, 2).ok(), Some(Some(2)), "Istio's retryRemoteLocalities");
        assert_eq!(
            with(previous, 0).err().map(|e| e.path),
            Some("r.retry_priority.typed_config.update_frequency".into())
        );
        assert_eq!(with("x.Other", 1).err().map(|e| e.path), Some("r.retry_priority.typed_config".into()));
    }

    #[test]
    fn retry_policy_fields() {
        let p = rpb::RetryPolicy {
            retry_on: "gateway-error, retriable-status-codes,retriable-4xx".into(),
            num_retries: Some(UInt32Value { value: 3 }),
            per_try_timeout: Some(pb_duration(500)),
            retriable_status_codes: vec![418, 70_000],
            retry_back_off: Some(rpb::retry_policy::RetryBackOff {
                base_interval: Some(PbDuration { seconds: 0, nanos: 100 }),
                max_interval: None,
            }),
            ..Default::default()
        };
        let t = table(&with_route_retry(p));
        let p = route_action(&t).retry_policy.clone().unwrap_or_else(|| panic!("no retry policy"));
        assert_eq!(p.num_retries, 3);
        assert_eq!(p.per_try_timeout, Some(Duration::from_millis(500)));
        assert_eq!(p.retriable_status_codes, [418]);
        // Below a millisecond rounds up to one, as in Envoy; the maximum defaults to ten times the base.
        assert_eq!((p.backoff_base, p.backoff_max), (Duration::from_millis(1), Duration::from_millis(10)));
        for (status, retried) in
            [(500, false), (502, true), (503, true), (504, true), (409, true), (418, true), (404, false)]
        {
            assert_eq!(p.should_retry_status(status), retried, "{status}");
        }
        assert!(p.should_retry_failure(UpstreamFailure::ConnectFailure));
        assert!(p.should_retry_failure(UpstreamFailure::Reset));
    }

    #[test]
    fn retry_on_flags() {
        let p = RetryOn::parse("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", "")
            .unwrap_or_else(|e| panic!("{e}"));
        // Istio's default retry_on.
        assert!(
            p.connect_failure && p.refused_stream && p.grpc_unavailable && p.grpc_cancelled && p.retriable_status_codes
        );
        assert!(!p.five_xx && !p.reset && !p.grpc_internal);
        let policy = RetryPolicy { retry_on: p, ..RetryPolicy::envoy_default() };
        assert!(policy.should_retry_failure(UpstreamFailure::ConnectFailure));
        assert!(policy.should_retry_failure(UpstreamFailure::RefusedStream));
        assert!(!policy.should_retry_failure(UpstreamFailure::Reset));
        assert!(!policy.should_retry_status(503));
        // Istio 1.24's inbound default: only an attempt that sent nothing (a connect failure) is tried again.
        let before = RetryPolicy {
            retry_on: RetryOn::parse("reset-before-request", "").unwrap_or_else(|e| panic!("{e}")),
            ..policy.clone()
        };
        assert!(before.should_retry_failure(UpstreamFailure::ConnectFailure));
        assert!(!before.should_retry_failure(UpstreamFailure::RefusedStream));
        assert!(!before.should_retry_failure(UpstreamFailure::Reset));
        assert!(!before.should_retry_status(503));
        assert!(policy.should_retry_grpc_status(14) && policy.should_retry_grpc_status(1));
        assert!(!policy.should_retry_grpc_status(13));
        let all = RetryOn::parse("5xx,reset,internal,deadline-exceeded,resource-exhausted", "")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            all.five_xx && all.reset && all.grpc_internal && all.grpc_deadline_exceeded && all.grpc_resource_exhausted
        );
    }

    #[test]
    fn unknown_retry_on_is_refused() {
        assert_eq!(
            error(&with_route_retry(retry("5xx,bogus"))),
            "virtual_hosts[0].routes[0].route.retry_policy.retry_on: unknown retry condition \"bogus\""
        );
        assert_eq!(
            error(&with_route_retry(retry("envoy-ratelimited"))),
            "virtual_hosts[0].routes[0].route.retry_policy.retry_on: retry condition \"envoy-ratelimited\" is not \
             supported"
        );
    }

    #[test]
    fn route_retry_policy_overrides_the_virtual_host_one() {
        let mut ra = to_cluster("own");
        ra.retry_policy = Some(retry("reset"));
        let mut vh = vhost("vh", &["*"], vec![route("own", prefix("/own"), action(ra)), to("inherits", prefix("/"))]);
        vh.retry_policy = Some(rpb::RetryPolicy { num_retries: Some(UInt32Value { value: 5 }), ..retry("5xx") });
        let t = table(&config(vec![vh]));
        let policy = |path: &str| {
            let req = Req::get(path);
            match t.route(&req.head()).map(|m| m.action()) {
                Some(Action::Route(a)) => a.retry_policy.clone(),
                other => panic!("{other:?}"),
            }
        };
        // Not merged: the route's policy replaces the virtual host's entirely.
        let own = policy("/own").unwrap_or_else(|| panic!("no policy"));
        assert!(own.retry_on.reset && !own.retry_on.five_xx);
        assert_eq!(own.num_retries, 1);
        let inherited = policy("/x").unwrap_or_else(|| panic!("no policy"));
        assert!(inherited.retry_on.five_xx);
        assert_eq!(inherited.num_retries, 5);

        let mut vh = catch_all("vh", &["*"]);
        vh.retry_policy = Some(retry("nope"));
        assert_eq!(
            error(&config(vec![vh])),
            "virtual_hosts[0].retry_policy.retry_on: unknown retry condition \"nope\""
        );
    }

    #[test]
    fn retry_host_predicates() {
        use rpb::retry_policy::{RetryHostPredicate, retry_host_predicate::ConfigType};
        let typed = |type_url: &str| RetryHostPredicate {
            name: PREVIOUS_HOSTS_NAME.into(),
            config_type: Some(ConfigType::TypedConfig(Any { type_url: type_url.into(), value: vec![] })),
        };
        // What Istio sends.
        let p = rpb::RetryPolicy {
            retry_host_predicate: vec![typed(PREVIOUS_HOSTS_TYPE)],
            host_selection_retry_max_attempts: 5,
            ..retry("connect-failure")
        };
        let t = table(&with_route_retry(p));
        assert!(route_action(&t).retry_policy.as_ref().is_some_and(|p| p.avoid_previous_hosts));
        assert_eq!(route_action(&t).retry_policy.as_ref().map(|p| p.host_selection_attempts), Some(5));
        let by_name = RetryHostPredicate { name: PREVIOUS_HOSTS_NAME.into(), config_type: None };
        let t = table(&with_route_retry(rpb::RetryPolicy { retry_host_predicate: vec![by_name], ..retry("") }));
        assert!(route_action(&t).retry_policy.as_ref().is_some_and(|p| p.avoid_previous_hosts));

        let other =
            typed("type.googleapis.com/envoy.extensions.retry.host.omit_canary_hosts.v3.OmitCanaryHostsPredicate");
        let e = error(&with_route_retry(rpb::RetryPolicy { retry_host_predicate: vec![other], ..retry("") }));
        assert!(e.starts_with("virtual_hosts[0].routes[0].route.retry_policy.retry_host_predicate[0]: "), "{e}");
    }

    #[test]
    fn retry_back_off_errors() {
        let back_off = |base: Option<PbDuration>, max: Option<PbDuration>| rpb::RetryPolicy {
            retry_back_off: Some(rpb::retry_policy::RetryBackOff { base_interval: base, max_interval: max }),
            ..retry("5xx")
        };
        assert_eq!(
            error(&with_route_retry(back_off(None, None))),
            "virtual_hosts[0].routes[0].route.retry_policy.retry_back_off.base_interval: base_interval is required"
        );
        assert_eq!(
            error(&with_route_retry(back_off(Some(pb_duration(100)), Some(pb_duration(50))))),
            "virtual_hosts[0].routes[0].route.retry_policy.retry_back_off.max_interval: max_interval must be greater \
             than or equal to base_interval"
        );
        let t = table(&with_route_retry(back_off(Some(pb_duration(100)), Some(pb_duration(1000)))));
        let p = route_action(&t).retry_policy.clone().unwrap_or_else(|| panic!("no policy"));
        assert_eq!((p.backoff_base, p.backoff_max), (Duration::from_millis(100), Duration::from_secs(1)));
    }

    // ---- Errors naming their paths ----

    #[test]
    #[allow(deprecated)]
    fn errors_name_the_field() {
        let second_route =
            |r: rpb::Route| config(vec![catch_all("a", &["a"]), vhost("b", &["*"], vec![to("ok", prefix("/")), r])]);
        assert!(
            error(&second_route(to("bad", path_match(P::SafeRegex(regex_matcher("/(unclosed"))))))
                .starts_with("virtual_hosts[1].routes[1].match.safe_regex.regex: invalid regex: ")
        );
        assert_eq!(
            error(&second_route(to("c", path_match(P::ConnectMatcher(rpb::route_match::ConnectMatcher {}))))),
            "virtual_hosts[1].routes[1].match.connect_matcher: CONNECT matching is not supported"
        );
        let mut m = prefix("/");
        m.runtime_fraction = Some(core::RuntimeFractionalPercent::default());
        assert_eq!(
            error(&second_route(to("c", m))),
            "virtual_hosts[1].routes[1].match.runtime_fraction: runtime_fraction is not supported"
        );
        assert_eq!(
            error(&second_route(route("c", prefix("/"), None))),
            "virtual_hosts[1].routes[1]: a route needs route, redirect or direct_response"
        );
        assert_eq!(
            error(&second_route(to("c", rpb::RouteMatch::default()))),
            "virtual_hosts[1].routes[1].match: a path specifier is required (prefix, path, safe_regex or \
             path_separated_prefix)"
        );
        assert_eq!(
            error(&second_route(route("c", prefix("/"), action(rpb::RouteAction::default())))),
            "virtual_hosts[1].routes[1].route: a route action needs cluster, weighted_clusters or cluster_header"
        );
        let mut m = prefix("/");
        m.headers = vec![rpb::HeaderMatcher {
            name: "x".into(),
            header_match_specifier: Some(rpb::header_matcher::HeaderMatchSpecifier::SafeRegexMatch(regex_matcher("["))),
            ..Default::default()
        }];
        let e = error(&second_route(to("c", m)));
        assert!(
            e.starts_with("virtual_hosts[1].routes[1].match.headers[0].safe_regex_match.regex: invalid regex: "),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        let mut ra = to_cluster("c");
        ra.host_rewrite_specifier = Some(rpb::route_action::HostRewriteSpecifier::HostRewriteHeader("x".into()));
        assert_eq!(
            error(&second_route(route("c", prefix("/"), action(ra)))),
            "virtual_hosts[1].routes[1].route.host_rewrite_header: host_rewrite_header is not supported"
        );
        let rc = rpb::RouteConfiguration { vhost_header: "x-host".into(), ..single(to("c", prefix("/"))) };
        assert_eq!(error(&rc), "vhost_header: vhost_header is not supported");
    }

    #[test]
    fn hash_policies_hash_what_envoy_hashes_and_stop_at_a_terminal_one() {
        use rpb::route_action::HashPolicy;
        use rpb::route_action::hash_policy::{self as hp, PolicySpecifier as S};
        let policy = |spec: S, terminal: bool| HashPolicy { policy_specifier: Some(spec), terminal };
        let header = |n: &str| S::Header(hp::Header { header_name: n.into(), ..Default::default() });
        let mut ra = to_cluster("c");
        ra.hash_policy = vec![
            policy(header("x-user"), true),
            policy(S::Cookie(hp::Cookie { name: "sid".into(), ..Default::default() }), false),
            policy(S::QueryParameter(hp::QueryParameter { name: "q".into() }), false),
            policy(S::ConnectionProperties(hp::ConnectionProperties { source_ip: true }), false),
        ];
        let t = table(&single(route("r", prefix("/"), action(ra))));
        let uri: Uri = "/x?a=1&q=7".parse().unwrap();
        let headers = HeaderMap::new();
        let head = RequestHead { method: &Method::GET, uri: &uri, authority: "h", headers: &headers };
        let Action::Route(a) = t.route(&head).unwrap().action() else { panic!() };
        let ip: std::net::IpAddr = [10, 0, 0, 1].into();
        let source =
            HashSource { client: ip, peer: "192.0.2.1:4000".parse().unwrap(), local: "192.0.2.2:80".parse().unwrap() };
        let hash = |h: &[(&'static str, &'static str)]| {
            let map: HeaderMap =
                h.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v))).collect();
            let mut set = Vec::new();
            let hash = a.request_hash(&map, &uri, &source, &mut set);
            assert!(set.is_empty(), "no ttl: no cookie is made up");
            hash
        };
        use crate::upstream::lb::{combine, hash_value};
        // The terminal header policy stops the rest when it hashes.
        assert_eq!(hash(&[("x-user", "ann")]), Some(hash_value(b"ann")));
        // Without it: cookie, query parameter and source IP, folded in order.
        let folded = combine(Some(combine(Some(hash_value(b"s1")), hash_value(b"7"))), hash_value(b"10.0.0.1"));
        assert_eq!(hash(&[("cookie", "a=b; sid=s1")]), Some(folded));
        assert_ne!(hash(&[("x-user", "ann")]), hash(&[("x-user", "bob")]));

        let mut bad = to_cluster("c");
        let attribute = |name: &str| hp::CookieAttribute { name: name.into(), value: "x".into() };
        bad.hash_policy = vec![policy(
            S::Cookie(hp::Cookie { name: "sid".into(), attributes: vec![attribute("a;b")], ..Default::default() }),
            false,
        )];
        assert_eq!(
            error(&single(route("r", prefix("/"), action(bad)))),
            "virtual_hosts[0].routes[0].route.hash_policy[0].cookie.attributes[0]: not a valid cookie attribute"
        );
    }

    #[test]
    fn shadow_hosts_get_their_suffix_before_the_port() {
        let policy = |host: ShadowHost| MirrorPolicy { cluster: MirrorCluster::Name("s".into()), fraction: None, host };
        let suffixed = policy(ShadowHost::Suffixed);
        for (host, want) in [
            ("app", "app-shadow"),
            ("app.example:8080", "app.example-shadow:8080"),
            ("[::1]:80", "[::1]-shadow:80"),
            ("[::1]", "[::1]-shadow"),
            ("10.0.0.1", "10.0.0.1-shadow"),
        ] {
            assert_eq!(suffixed.host(host).unwrap(), want, "{host}");
        }
        assert_eq!(policy(ShadowHost::Unchanged).host("app:1").unwrap(), "app:1");
        assert_eq!(policy(ShadowHost::Literal(HeaderValue::from_static("m"))).host("app").unwrap(), "m");
    }

    #[test]
    fn mirror_policy_errors_name_the_field() {
        use rpb::route_action::RequestMirrorPolicy as M;
        let with = |m: M| {
            let mut ra = to_cluster("c");
            ra.request_mirror_policies = vec![m];
            error(&single(route("r", prefix("/"), action(ra))))
        };
        let at = "virtual_hosts[0].routes[0].route.request_mirror_policies[0]";
        assert_eq!(with(M::default()), format!("{at}.cluster: a mirror policy needs cluster or cluster_header"));
        let both = M { cluster: "s".into(), cluster_header: "x-c".into(), ..Default::default() };
        assert_eq!(with(both), format!("{at}.cluster_header: only one of cluster and cluster_header may be set"));
        let mutations =
            M { cluster: "s".into(), request_headers_mutations: vec![Default::default()], ..Default::default() };
        assert_eq!(with(mutations), format!("{at}.request_headers_mutations: not supported"));
        let mut ra = to_cluster("c");
        ra.request_mirror_policies = vec![M { cluster: "s".into(), ..Default::default() }];
        let t = table(&single(route("r", prefix("/"), action(ra))));
        assert_eq!(t.cluster_names().collect::<Vec<_>>(), ["c", "s"], "shadow clusters are validated too");
    }

    /// Envoy's cookie with a ttl: made up from the connection's addresses when the request has none, sent back
    /// quoted with Max-Age, Path, the attributes and HttpOnly, and read back without its quotes.
    #[test]
    fn a_cookie_policy_with_a_ttl_makes_the_cookie_up() {
        use rpb::route_action::HashPolicy;
        use rpb::route_action::hash_policy::{self as hp, PolicySpecifier as S};
        let mut ra = to_cluster("c");
        let cookie = hp::Cookie {
            name: "sid".into(),
            ttl: Some(pb_duration(3_600_000)),
            path: "/".into(),
            attributes: vec![hp::CookieAttribute { name: "SameSite".into(), value: "Strict".into() }],
        };
        ra.hash_policy = vec![HashPolicy { policy_specifier: Some(S::Cookie(cookie)), terminal: false }];
        let t = table(&single(route("r", prefix("/"), action(ra))));
        let uri: Uri = "/".parse().unwrap();
        let none = HeaderMap::new();
        let head = RequestHead { method: &Method::GET, uri: &uri, authority: "h", headers: &none };
        let Action::Route(a) = t.route(&head).unwrap().action() else { panic!() };
        let source = HashSource {
            client: [10, 0, 0, 1].into(),
            peer: "192.0.2.1:4000".parse().unwrap(),
            local: "192.0.2.2:80".parse().unwrap(),
        };
        use crate::upstream::lb::hash_value;
        let made = format!("{:016x}", hash_value(b"192.0.2.1:4000192.0.2.2:80"));
        let mut set = Vec::new();
        assert_eq!(a.request_hash(&none, &uri, &source, &mut set), Some(hash_value(made.as_bytes())));
        assert_eq!(set, [format!("sid=\"{made}\"; Max-Age=3600; Path=/; SameSite=Strict; HttpOnly")]);
        let mut back = HeaderMap::new();
        back.insert(http::header::COOKIE, HeaderValue::from_str(&format!("other=1; sid=\"{made}\"")).unwrap());
        let mut set = Vec::new();
        assert_eq!(a.request_hash(&back, &uri, &source, &mut set), Some(hash_value(made.as_bytes())));
        assert!(set.is_empty(), "the request has the cookie");
        let mut empty = HeaderMap::new();
        empty.insert(http::header::COOKIE, HeaderValue::from_static("sid="));
        let mut set = Vec::new();
        assert_eq!(a.request_hash(&empty, &uri, &source, &mut set), Some(hash_value(made.as_bytes())));
        assert_eq!(set.len(), 1, "an empty cookie is no cookie: one is made up");
    }

    /// The gRPC wire spec's `grpc-timeout` (digits and a unit) and how a route's max_stream_duration uses it.
    #[test]
    fn grpc_timeout_headers_and_stream_duration_limits() {
        let headers = |timeout: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, http::HeaderValue::from_static("application/grpc+proto"));
            h.insert("grpc-timeout", http::HeaderValue::from_str(timeout).unwrap());
            h
        };
        for (v, want) in [
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("3S", Some(Duration::from_secs(3))),
            ("250m", Some(Duration::from_millis(250))),
            ("7u", Some(Duration::from_micros(7))),
            ("9n", Some(Duration::from_nanos(9))),
            ("123456789S", None),
            ("S", None),
            ("5x", None),
            ("-1S", None),
        ] {
            assert_eq!(grpc_timeout(&headers(v)), want, "{v}");
        }
        let ms = Duration::from_millis;
        let istio = StreamDuration::New {
            max: Some(Duration::ZERO),
            grpc_header_max: Some(Duration::ZERO),
            grpc_header_offset: Duration::ZERO,
        };
        assert_eq!(istio.limit(&headers("20S"), Some(ms(5))), Some(Duration::from_secs(20)), "uncapped header");
        assert_eq!(istio.limit(&HeaderMap::new(), Some(ms(5))), None, "a route's 0 turns the HCM's off");
        let capped = StreamDuration::New { max: None, grpc_header_max: Some(ms(100)), grpc_header_offset: ms(30) };
        assert_eq!(capped.limit(&headers("20S"), None), Some(ms(70)), "capped, then the offset");
        assert_eq!(capped.limit(&headers("20m"), None), Some(Duration::ZERO), "the offset ate it: over at once");
        assert_eq!(capped.limit(&HeaderMap::new(), Some(ms(5))), Some(ms(5)), "no header: the HCM's");
        assert_eq!(StreamDuration::Hcm.limit(&headers("1S"), Some(ms(5))), Some(ms(5)));
        let legacy = StreamDuration::LegacyGrpc { max: ms(300), offset: ms(50) };
        assert_eq!(legacy.grpc_route_timeout(&headers("10S")), Some(Some(ms(300))));
        assert_eq!(legacy.grpc_route_timeout(&headers("100m")), Some(Some(ms(50))));
        assert_eq!(legacy.grpc_route_timeout(&HeaderMap::new()), None, "not gRPC: the route timeout stands");
    }

    #[test]
    fn metadata_only_fields_are_accepted() {
        let mut r = to("c", prefix("/"));
        r.decorator = Some(rpb::Decorator { operation: "op".into(), ..Default::default() });
        r.metadata = Some(core::Metadata::default());
        if let Some(rpb::route::Action::Route(a)) = &mut r.action {
            a.max_stream_duration = Some(rpb::route_action::MaxStreamDuration::default());
        }
        let mut vh = vhost("vh", &["*"], vec![r]);
        vh.include_request_attempt_count = true;
        let mut rc = config(vec![vh]);
        rc.validate_clusters = Some(BoolValue { value: false });
        let t = table(&rc);
        assert_eq!(t.name(), "rc");
        assert_eq!(t.cluster_names().collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn cluster_names_are_deduplicated() {
        let t = table(&config(vec![
            vhost("a", &["a"], vec![to("x", prefix("/a")), to("y", prefix("/"))]),
            vhost(
                "b",
                &["*"],
                vec![to("x", prefix("/")), route("w", prefix("/w"), action(weighted(&[("y", 1), ("z", 1)])))],
            ),
        ]));
        assert_eq!(t.cluster_names().collect::<Vec<_>>(), ["x", "y", "z"]);
    }
}
