//! `envoy.filters.http.router`: picks the route, then the cluster and host, forwards the request over the worker's
//! connection pool with Envoy's header handling, retries and timeouts, and turns failures into Envoy's local replies.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;

use super::body::{CountOnDrop, DurationTimeout, ProxyBody, ShadowBody, StreamHold, Tee};
use super::cors;
use super::fault::AbortWith;
use super::route::{
    Action, ClusterExtras, FilterOverride, HashSource, HostRewrite, Matched, MirrorPolicy, RequestHead, RetryOn,
    RetryPolicy, RouteAction, Target, UpstreamFailure,
};
use super::{Connection, HealthCheckStats};
use crate::access_log::Flag;
use crate::config::cluster::UpstreamProtocol;
use crate::config::http::ServerHeader;
use crate::upstream::cluster::{Cluster, ConnectError, Host};
use crate::upstream::outlier::Outcome;
use crate::upstream::pool::{Lease, PoolError, Protocol};

const NO_HEALTHY_UPSTREAM: &str = "no healthy upstream";
const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
const RESET: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";
const OVERFLOW: &str = "upstream connect error or disconnect/reset before headers. reset reason: overflow";
const TIMEOUT: &str = "upstream request timeout";
const MAX_STREAM_DURATION: &str = "upstream max stream duration reached";
const STREAM_TIMEOUT: &str = "stream timeout";

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_ENVOY_INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");
static X_ENVOY_EXTERNAL_ADDRESS: HeaderName = HeaderName::from_static("x-envoy-external-address");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_UPSTREAM_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");
static X_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
static X_EXPECTED_RQ_TIMEOUT: HeaderName = HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
static X_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
static X_IMMEDIATE_HEALTH_CHECK_FAIL: HeaderName = HeaderName::from_static("x-envoy-immediate-health-check-fail");
static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
static X_UPSTREAM_HEALTHCHECKED_CLUSTER: HeaderName = HeaderName::from_static("x-envoy-upstream-healthchecked-cluster");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What the connection manager does to every request before routing (and before the access log looks at it):
/// x-request-id, x-forwarded-for/-proto, and path normalization.
/// Returns the trusted client address when x-forwarded-for, not the connection, names it.
pub(super) fn prepare(conn: &Connection, req: &mut Request<Incoming>) -> Option<SocketAddr> {
    let config = &conn.hcm.config;
    let remote = prepare_request_headers(conn, req.headers_mut());
    if (config.normalize_path || config.merge_slashes)
        && let Some(uri) = normalized_uri(req.uri(), config.normalize_path, config.merge_slashes)
    {
        *req.uri_mut() = uri;
    }
    remote
}

/// Runs the HTTP filters before the router (the health check filter, when configured), then routes.
pub(super) async fn route(conn: &Connection, req: Request<Incoming>, trace: &mut Trace) -> Response<ProxyBody> {
    let Some(health_check) = &conn.hcm.config.health_check else {
        return route_request(conn, req, trace).await;
    };
    let failed = conn.ctx.health_check_failed.load(Ordering::Relaxed);
    let authority = request_authority(&req);
    let head = RequestHead { method: req.method(), uri: req.uri(), authority: &authority, headers: req.headers() };
    if !health_check.headers.matches(&head) {
        let mut resp = route_request(conn, req, trace).await;
        if failed {
            // Envoy's filter marks every other response too, so that a downstream Envoy stops sending here at once.
            resp.headers_mut().insert(X_IMMEDIATE_HEALTH_CHECK_FAIL.clone(), HeaderValue::from_static("true"));
        }
        return resp;
    }
    let Some(stats) = &conn.hcm.health_check_stats else {
        return route_request(conn, req, trace).await;
    };
    stats.request_total.inc();
    // Envoy answers a health check itself unless in pass-through mode; in pass-through mode it still does when the
    // proxy is failed or an upstream answer is cached.
    let answer = if failed {
        Some(StatusCode::SERVICE_UNAVAILABLE)
    } else if let Some(code) = cached_health_answer(conn, health_check.cache_time) {
        stats.cached_response.inc();
        Some(code)
    } else if !health_check.pass_through {
        Some(cluster_health(conn, &health_check.min_healthy, stats))
    } else {
        None
    };
    let mut resp = match answer {
        Some(code) => {
            if code.is_success() {
                stats.ok.inc();
            } else {
                stats.failed.inc();
                trace.flags.push(Flag::FailedLocalHealthCheck);
            }
            local_reply(conn, code, "")
        }
        None => {
            let resp = route_request(conn, req, trace).await;
            if health_check.cache_time.is_some() {
                *conn.hcm.health_check_cache.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((resp.status(), Instant::now()));
            }
            resp
        }
    };
    if failed {
        resp.headers_mut().insert(X_IMMEDIATE_HEALTH_CHECK_FAIL.clone(), HeaderValue::from_static("true"));
    }
    // Named so that a health-checking Envoy can tell it reached the service it meant to.
    if let Ok(v) = HeaderValue::from_str(&conn.ctx.local_cluster) {
        resp.headers_mut().insert(X_UPSTREAM_HEALTHCHECKED_CLUSTER.clone(), v);
    }
    resp
}

/// The upstream's last answer to a health check while it is younger than `cache_time` (pass-through mode).
fn cached_health_answer(conn: &Connection, cache_time: Option<Duration>) -> Option<StatusCode> {
    let cache_time = cache_time?;
    let cached = *conn.hcm.health_check_cache.lock().unwrap_or_else(|p| p.into_inner());
    cached.filter(|(_, at)| at.elapsed() < cache_time).map(|(code, _)| code)
}

/// Envoy's `cluster_min_healthy_percentages`: 503 if a listed cluster is unknown, empty (unless its minimum is 0) or
/// has fewer hosts in service than its minimum percent (compared in whole percents, as Envoy does).
fn cluster_health(conn: &Connection, min_healthy: &[(String, f64)], stats: &HealthCheckStats) -> StatusCode {
    let clusters = conn.ctx.clusters.load();
    for (name, percent) in min_healthy {
        let minimum = *percent as u64;
        let Some(cluster) = clusters.get(name) else {
            stats.failed_cluster_not_found.inc();
            return StatusCode::SERVICE_UNAVAILABLE;
        };
        let (total, healthy) = cluster.membership();
        if total == 0 {
            if minimum == 0 {
                continue;
            }
            stats.failed_cluster_empty.inc();
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        if 100 * (healthy as u64) < (total as u64) * minimum {
            stats.failed_cluster_unhealthy.inc();
            return StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    StatusCode::OK
}

/// Routes one request (already [`prepare`]d) and returns the response to send downstream: the upstream's, or a local
/// reply.
async fn route_request(conn: &Connection, req: Request<Incoming>, trace: &mut Trace) -> Response<ProxyBody> {
    let hcm = &conn.hcm;
    let config = &hcm.config;
    let authority = request_authority(&req);
    let upgrade = is_websocket_upgrade(&req);

    let Some(table) = hcm.route_table() else {
        hcm.stats.no_route.inc();
        trace.flags.push(Flag::NoRoute);
        return local_reply(conn, StatusCode::NOT_FOUND, "");
    };
    let head = RequestHead { method: req.method(), uri: req.uri(), authority: &authority, headers: req.headers() };
    let vhost = table.virtual_host(&head);
    if let Some(location) = vhost.and_then(|v| v.tls_redirect(&head)) {
        // Envoy's SSL redirect route (a virtual host's require_tls): 301 to the same host and path over https.
        let mut resp = local_reply(conn, StatusCode::MOVED_PERMANENTLY, "");
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return resp;
    }
    let Some(matched) = vhost.and_then(|v| table.route_in(v, &head)) else {
        hcm.stats.no_route.inc();
        trace.flags.push(Flag::NoRoute);
        debug!(authority = %authority, path = %req.uri().path(), "no route");
        return local_reply(conn, StatusCode::NOT_FOUND, "");
    };
    if trace.logging {
        trace.route_name = Some(matched.route.name().to_string());
    }
    // Envoy's max_stream_duration (the route's, a gRPC request's grpc-timeout under it, or the HCM's) bounds the
    // whole stream from here, fault delays included.
    let limit = match matched.action() {
        Action::Route(a) => a.stream_duration.limit(req.headers(), config.max_stream_duration),
        Action::Redirect(_) | Action::DirectResponse { .. } => None,
    };
    let Some(limit) = limit else {
        return after_match(conn, &matched, req, trace, &authority, upgrade).await;
    };
    let deadline = Instant::now() + limit;
    trace.stream_deadline = Some(deadline);
    match tokio::time::timeout_at(deadline, after_match(conn, &matched, req, trace, &authority, upgrade)).await {
        Ok(mut resp) => {
            let expired = hcm.stats.downstream_rq_max_duration_reached.clone();
            resp.body_mut().deadline(deadline, expired, DurationTimeout::Stream);
            resp
        }
        Err(_) => {
            hcm.stats.downstream_rq_max_duration_reached.inc();
            trace.flags.push(Flag::DurationTimeout);
            duration_timeout_reply(conn, trace.received.as_ref().is_none_or(|p| p.done.load(Ordering::Relaxed)))
        }
    }
}

/// Envoy's reply when a stream outlives its max_stream_duration before its response began: for gRPC a trailers-only
/// DEADLINE_EXCEEDED, otherwise 504 once the request was complete and 408 while it was still arriving.
fn duration_timeout_reply(conn: &Connection, request_complete: bool) -> Response<ProxyBody> {
    let status = if request_complete { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::REQUEST_TIMEOUT };
    let mut resp = local_reply(conn, status, "downstream duration timeout");
    // Envoy names the gRPC status itself rather than mapping the HTTP one (which would say UNAVAILABLE).
    if let Some(r) = resp.extensions_mut().get_mut::<LocalReply>() {
        r.grpc_status = Some(4);
    }
    resp
}

/// The HTTP filters after routing (fault, then CORS) and the router's action.
async fn after_match(
    conn: &Connection,
    matched: &Matched<'_>,
    req: Request<Incoming>,
    trace: &mut Trace,
    authority: &str,
    upgrade: bool,
) -> Response<ProxyBody> {
    let config = &conn.hcm.config;
    let hcm = &conn.hcm;
    let head = RequestHead { method: req.method(), uri: req.uri(), authority, headers: req.headers() };
    // Chosen once: a weighted choice must be the same for the fault filter's upstream_cluster and the router.
    let target = match matched.action() {
        Action::Route(_) => matched.cluster(req.headers()),
        Action::Redirect(_) | Action::DirectResponse { .. } => None,
    };
    // The fault filter runs before the router, as Envoy requires it to: its delay holds the request, its abort
    // answers it, its rate limit throttles the response body.
    let mut throttle = None;
    if let (Some((filter, own)), Some(stats)) = (&config.fault, &hcm.fault_stats) {
        let fault = match matched.per_filter_config(filter) {
            Some(FilterOverride::Fault(route_config)) => Some(route_config),
            Some(FilterOverride::Disabled) => None,
            Some(FilterOverride::Cors(_)) | None => Some(own),
        };
        if let Some(plan) = fault.and_then(|f| f.plan(&head, target.as_ref().map(|t| t.name.as_ref()), stats)) {
            if let Some(delay) = plan.delay {
                trace.flags.push(Flag::DelayInjected);
                tokio::time::sleep(delay).await;
            }
            if let Some(with) = plan.abort {
                trace.flags.push(Flag::FaultInjected);
                return fault_abort_reply(conn, with);
            }
            throttle = plan.throttle_kbps.map(|kbps| (kbps, plan.active));
        }
    }
    // Then the CORS filter (Istio's order): it answers a preflight, and marks the response of an allowed origin.
    let mut decorate = None;
    if let (Some(filter), Some(stats)) = (&config.cors, &hcm.cors_stats)
        && let Some(policy) = matched.cors_policy(filter)
    {
        match cors::decide(policy, req.method(), req.headers(), stats) {
            cors::Decision::Pass => {}
            cors::Decision::Preflight(answer) => {
                let (parts, ()) = answer.into_parts();
                let mut resp = Response::from_parts(parts, ProxyBody::Empty);
                set_server(conn, resp.headers_mut());
                return resp;
            }
            cors::Decision::Decorate { policy, origin } => decorate = Some((policy, origin)),
        }
    }
    let mut resp = act(conn, matched, target, req, trace, authority, upgrade).await;
    if let Some((policy, origin)) = decorate {
        policy.decorate(origin, resp.headers_mut());
    }
    if let Some((kbps, active)) = throttle {
        resp.body_mut().throttle(kbps, active);
    }
    resp
}

/// The matched route's action: a direct response, a redirect, or the request forwarded to its cluster.
async fn act(
    conn: &Connection,
    matched: &Matched<'_>,
    target: Option<Target<'_>>,
    req: Request<Incoming>,
    trace: &mut Trace,
    authority: &str,
    upgrade: bool,
) -> Response<ProxyBody> {
    let hcm = &conn.hcm;
    let config = &hcm.config;
    let action = match matched.action() {
        Action::DirectResponse { status, body } => {
            hcm.stats.rq_direct_response.inc();
            let body = bytes::Bytes::from(body.clone());
            let mut resp = local_reply(conn, *status, "");
            *resp.body_mut() = ProxyBody::text(body.clone());
            // Its own text is what a gRPC client gets as grpc-message.
            if trace.grpc {
                resp.extensions_mut().insert(DirectText(body.clone()));
            }
            if !body.is_empty() {
                resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            matched.apply_response_headers(resp.headers_mut());
            return resp;
        }
        Action::Redirect(r) => {
            hcm.stats.rq_redirect.inc();
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            // Envoy's :scheme for a plaintext listener: what the client said it used, else http.
            let scheme = req
                .uri()
                .scheme_str()
                .or_else(|| req.headers().get(&X_FORWARDED_PROTO).and_then(|v| v.to_str().ok()))
                .unwrap_or("http")
                .to_string();
            let location = r.location(&scheme, authority, path);
            let mut resp = local_reply(conn, r.status(), "");
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            matched.apply_response_headers(resp.headers_mut());
            return resp;
        }
        Action::Route(a) => a,
    };
    if upgrade && !config.websocket {
        hcm.stats.downstream_rq_ws_on_non_ws_route.inc();
        return local_reply(conn, StatusCode::FORBIDDEN, "");
    }
    // A cluster_header route without its header finds no cluster, like a name that does not exist: both get the
    // route's cluster_not_found_response_code (503 unless configured).
    let cluster = target.as_ref().and_then(|t| conn.ctx.clusters.load().get(t.name.as_ref()).cloned());
    let Some(cluster) = cluster else {
        hcm.stats.no_cluster.inc();
        trace.flags.push(Flag::NoClusterFound);
        debug!("route points at no known cluster");
        return local_reply(conn, action.cluster_not_found_status, "");
    };
    if trace.logging {
        trace.cluster = Some(cluster.name().to_string());
    }
    // A weighted cluster entry's own mutations and host rewrite (Istio's per-destination headers).
    let extras = target.and_then(|t| t.extras);
    let chosen = Chosen { matched, action, extras, authority, upgrade };
    let mut resp = forward(conn, &chosen, &cluster, req, trace).await;
    match extras {
        Some(extras) => matched.apply_response_headers_with(extras, resp.headers_mut()),
        None => matched.apply_response_headers(resp.headers_mut()),
    }
    resp
}

/// The fault filter's answer: its HTTP status with Envoy's body, or for a gRPC abort a trailers-only gRPC response.
fn fault_abort_reply(conn: &Connection, with: AbortWith) -> Response<ProxyBody> {
    match with {
        AbortWith::Http(status) => local_reply(conn, status, "fault filter abort"),
        AbortWith::Grpc(code) => {
            let mut resp = local_reply(conn, StatusCode::OK, "");
            grpc_answer(&mut resp, code, Some(HeaderValue::from_static("fault filter abort")));
            resp
        }
    }
}

/// The request's authority: `:authority` on HTTP/2, else the Host header.
fn request_authority<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_default()
}

fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let has = |name: HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    req.version() <= Version::HTTP_11 && has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")
}

/// Envoy's request header handling before routing (its `mutateRequestHeaders`): x-forwarded-for/-proto, whether the
/// request is internal, the sanitizing of x-envoy-* headers, x-envoy-external-address and x-request-id. Returns the
/// client address the x-forwarded-for header names when that, not the connection's peer, is the trusted one.
fn prepare_request_headers(conn: &Connection, headers: &mut HeaderMap) -> Option<SocketAddr> {
    let config = &conn.hcm.config;
    let scheme = HeaderValue::from_static(if conn.secure { "https" } else { "http" });
    // Most requests carry no x-envoy-* header: one pass over the names present saves a hashed removal of each.
    let has_envoy_headers = headers.keys().any(|n| n.as_str().starts_with("x-envoy-"));
    if has_envoy_headers {
        // A client's claim to be internal is never taken; the proxy decides below.
        headers.remove(&X_ENVOY_INTERNAL);
    }
    let hops = config.xff_num_trusted_hops;
    let mut from_xff: Option<IpAddr> = None;
    // Envoy judges a request internal only when exactly one address is in play, and that address is internal.
    let single_address;
    if config.use_remote_address {
        single_address = !headers.contains_key(&X_FORWARDED_FOR);
        // With trusted proxies in front, the client is the address they recorded, read before we append.
        if hops > 0 {
            from_xff = xff_address(headers, hops - 1).map(|(ip, _)| ip);
        }
        if !config.skip_xff_append {
            let ip = conn.peer.ip().to_canonical().to_string();
            // Several x-forwarded-for headers are one list, as Envoy joins them.
            let prior: Vec<&str> = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .collect();
            let value = if prior.is_empty() { ip } else { format!("{},{ip}", prior.join(",")) };
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
        // A trusted proxy's x-forwarded-proto stands; an untrusted one's is overwritten.
        if hops == 0 || !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), scheme);
        }
    } else {
        // Envoy's default original-IP detection: the address xff_num_trusted_hops from the right of x-forwarded-for.
        let found = xff_address(headers, hops);
        single_address = found.is_some_and(|(_, single)| single);
        from_xff = found.map(|(ip, _)| ip);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), scheme);
        }
    }
    let remote = from_xff.unwrap_or_else(|| conn.peer.ip().to_canonical());
    let trusted = if config.use_remote_address { Some(remote) } else { from_xff };
    let internal = single_address && trusted.is_some_and(|ip| config.internal_addresses.iter().any(|c| c.contains(ip)));
    // An edge request: from an external client straight to us (we use its connection's address).
    let edge = !internal && config.use_remote_address;
    if internal {
        headers.insert(X_ENVOY_INTERNAL.clone(), HeaderValue::from_static("true"));
    } else if has_envoy_headers {
        clean_internal_headers(headers, edge);
    }
    if edge && let Ok(v) = HeaderValue::from_str(&remote.to_string()) {
        headers.insert(X_ENVOY_EXTERNAL_ADDRESS.clone(), v);
    }
    if config.generate_request_id {
        // An edge request's id is replaced unless told to preserve it; any other request keeps the one it has.
        let regenerate = edge && !config.preserve_external_request_id;
        if (regenerate || !headers.contains_key(&X_REQUEST_ID))
            && let Ok(v) = HeaderValue::from_str(&uuid_v4())
        {
            headers.insert(X_REQUEST_ID.clone(), v);
        }
    }
    from_xff.map(|ip| SocketAddr::new(ip, 0))
}

/// The x-envoy-* headers only an internal request may carry (Envoy's `cleanInternalHeaders`); an edge request also
/// loses the ones naming a downstream Envoy.
fn clean_internal_headers(headers: &mut HeaderMap, edge: bool) {
    const EDGE_ONLY: [&str; 3] =
        ["x-envoy-decorator-operation", "x-envoy-downstream-service-cluster", "x-envoy-downstream-service-node"];
    const EXTERNAL: [&str; 15] = [
        "x-envoy-retriable-status-codes",
        "x-envoy-retriable-header-names",
        "x-envoy-retry-on",
        "x-envoy-retry-grpc-on",
        "x-envoy-max-retries",
        "x-envoy-upstream-alt-stat-name",
        "x-envoy-upstream-rq-timeout-ms",
        "x-envoy-upstream-rq-per-try-timeout-ms",
        "x-envoy-upstream-rq-timeout-alt-response",
        // Stripped from external requests by recent Envoy (runtime guard sanitize_upstream_stream_duration_header);
        // older releases honoured it from any client.
        "x-envoy-upstream-stream-duration-ms",
        "x-envoy-expected-rq-timeout-ms",
        "x-envoy-force-trace",
        "x-envoy-ip-tags",
        "x-envoy-original-url",
        "x-envoy-hedge-on-per-try-timeout",
    ];
    // One pass over the names present; most requests carry none of these.
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            let n = n.as_str();
            EXTERNAL.contains(&n) || (edge && EDGE_ONLY.contains(&n))
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// The address `skip` entries from the right end of the x-forwarded-for list (several headers are one list), and
/// whether it is the list's only entry; None when the list is shorter or that entry is not an IP address. Envoy's
/// `getLastAddressFromXFF`.
fn xff_address(headers: &HeaderMap, skip: u32) -> Option<(IpAddr, bool)> {
    let skip = usize::try_from(skip).ok()?;
    let mut seen = 0usize;
    let mut found = None;
    // From the right end: the last header's last entry first. No list is built.
    for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        for entry in value.to_str().ok()?.rsplit(',') {
            if seen == skip {
                found = Some(entry);
            }
            seen += 1;
        }
    }
    let ip: IpAddr = found?.trim().parse().ok()?;
    Some((ip.to_canonical(), seen == 1))
}

/// The router's own request headers, honoured when the connection manager let them through (an internal request)
/// and consumed so that they go no further: Envoy's `x-envoy-upstream-rq-timeout-ms`,
/// `x-envoy-upstream-rq-per-try-timeout-ms`, `x-envoy-upstream-rq-timeout-alt-response` and the retry headers.
#[derive(Debug, Default)]
struct RequestOverrides {
    /// The route timeout; zero: none.
    timeout: Option<Duration>,
    /// The per-try timeout; zero: none.
    per_try_timeout: Option<Duration>,
    /// A timeout answers 204 instead of 504.
    alt_response: bool,
    /// The upstream request's max stream duration, replacing the cluster's; zero: none.
    stream_duration: Option<Duration>,
    retry_on: RetryOn,
    max_retries: Option<u32>,
    retriable_status_codes: Vec<u16>,
    /// Whether any retry header was present.
    retry: bool,
}

impl RequestOverrides {
    /// Takes the router's headers out of an internal request's `headers`.
    fn take(headers: &mut HeaderMap) -> RequestOverrides {
        let mut o = RequestOverrides::default();
        let mut take = |name: &str| headers.remove(name).and_then(|v| v.to_str().ok().map(|s| s.trim().to_string()));
        let millis = |v: Option<String>| v.and_then(|s| s.parse::<u64>().ok()).map(Duration::from_millis);
        o.timeout = millis(take("x-envoy-upstream-rq-timeout-ms"));
        o.per_try_timeout = millis(take("x-envoy-upstream-rq-per-try-timeout-ms"));
        o.alt_response = take("x-envoy-upstream-rq-timeout-alt-response").is_some();
        o.stream_duration = millis(take("x-envoy-upstream-stream-duration-ms"));
        if let Some(v) = take("x-envoy-retry-on") {
            o.retry = true;
            o.retry_on.add_header(&v, false);
        }
        if let Some(v) = take("x-envoy-retry-grpc-on") {
            o.retry = true;
            o.retry_on.add_header(&v, true);
        }
        if let Some(v) = take("x-envoy-max-retries") {
            o.retry = true;
            o.max_retries = v.parse::<u64>().ok().map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        }
        if let Some(v) = take("x-envoy-retriable-status-codes") {
            o.retry = true;
            o.retriable_status_codes = v.split(',').filter_map(|c| c.trim().parse().ok()).collect();
        }
        // Consumed as Envoy consumes them, though not acted on here (no hedging; header-name retries need a
        // response header matcher list we only take from config).
        take("x-envoy-retriable-header-names");
        take("x-envoy-hedge-on-per-try-timeout");
        o
    }

    /// The route's retry policy with the headers' conditions, retry count and status codes merged in, as Envoy's
    /// RetryState merges them; None when the headers change nothing or switch nothing on.
    fn retry_policy(&self, route: Option<&RetryPolicy>) -> Option<RetryPolicy> {
        if !self.retry {
            return None;
        }
        let mut p = route.cloned().unwrap_or_else(RetryPolicy::envoy_default);
        p.retry_on.merge(self.retry_on);
        if !p.retry_on.any() {
            return None;
        }
        if let Some(n) = self.max_retries {
            p.num_retries = n;
        }
        p.retriable_status_codes.extend(&self.retriable_status_codes);
        Some(p)
    }
}

/// Connection-specific headers never cross the proxy (RFC 9110 §7.6.1), except the ones an upgrade needs.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these: one pass over the few names present is cheaper than a hashed removal of
    // each hop-by-hop name.
    let hop = |n: &HeaderName| {
        n == header::CONNECTION
            || n == header::UPGRADE
            || n == header::TRANSFER_ENCODING
            || n == header::TE
            || n == header::TRAILER
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
    };
    if !headers.keys().any(hop) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [&KEEP_ALIVE, &PROXY_CONNECTION, &header::TRANSFER_ENCODING, &header::TE, &header::TRAILER] {
        if name == header::TE && headers.get(name).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers")) {
            continue;
        }
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// The URI with its path normalized the way Envoy's `normalize_path` (RFC 3986 §5.2.4 dot-segment removal) and
/// `merge_slashes` do; None when nothing changes.
fn normalized_uri(uri: &Uri, dots: bool, slashes: bool) -> Option<Uri> {
    let path = uri.path();
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        trailing_slash = false;
        match *seg {
            "." if dots => trailing_slash = i == last,
            ".." if dots => {
                out.pop();
                trailing_slash = i == last;
            }
            "" if slashes && i != last => {}
            s => out.push(s),
        }
    }
    let mut normalized = String::with_capacity(path.len());
    for s in &out {
        normalized.push('/');
        normalized.push_str(s);
    }
    if trailing_slash || normalized.is_empty() {
        normalized.push('/');
    }
    if normalized == path {
        return None;
    }
    let pq = match uri.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = pq.parse().ok();
    Uri::from_parts(parts).ok()
}

/// A random (version 4) UUID, the form of Envoy's generated x-request-id.
fn uuid_v4() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

/// Envoy's reply when `request_timeout` fires before the request was fully received.
pub(super) fn request_timeout_reply(conn: &Connection) -> Response<ProxyBody> {
    local_reply(conn, StatusCode::REQUEST_TIMEOUT, "request timeout")
}

/// Envoy's grpcToHttpStatus: the HTTP status a gRPC status stands for (500 for one it does not know).
fn grpc_to_http(status: &[u8]) -> u16 {
    match std::str::from_utf8(status).ok().and_then(|s| s.trim().parse::<u8>().ok()) {
        Some(0) => 200,
        Some(1) => 499,
        Some(3 | 9 | 11) => 400,
        Some(4) => 504,
        Some(5) => 404,
        Some(6 | 10) => 409,
        Some(7) => 403,
        Some(8) => 429,
        Some(12) => 501,
        Some(14) => 503,
        Some(16) => 401,
        _ => 500,
    }
}

/// Marks a reply the proxy made itself, with its text, so that a gRPC request's can be turned into a gRPC answer;
/// `grpc_status` when Envoy names one rather than mapping the HTTP status.
#[derive(Debug, Clone, Copy)]
pub(super) struct LocalReply {
    text: &'static str,
    grpc_status: Option<u32>,
}

/// A direct response's configured body, the text of its gRPC form.
#[derive(Debug, Clone)]
struct DirectText(bytes::Bytes);

/// Envoy answers a gRPC request's local reply in gRPC's terms: a trailers-only 200 whose `grpc-status` is the HTTP
/// status mapped as Envoy maps it (httpToGrpcStatus) and whose `grpc-message` is the reply's text. Replies that are
/// already gRPC answers (a 200) are left alone.
pub(super) fn grpc_local_reply(resp: &mut Response<ProxyBody>) {
    let Some(LocalReply { text, grpc_status }) = resp.extensions().get::<LocalReply>().copied() else { return };
    if resp.status() == StatusCode::OK {
        return;
    }
    let code = grpc_status.unwrap_or(match resp.status().as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    });
    let message = match resp.extensions_mut().remove::<DirectText>() {
        Some(DirectText(body)) => HeaderValue::from_maybe_shared(body).ok(),
        None => Some(HeaderValue::from_static(text)),
    };
    grpc_answer(resp, code, message);
}

/// Makes `resp` a trailers-only gRPC answer: 200, `application/grpc`, this `grpc-status` and, if any, `grpc-message`.
fn grpc_answer(resp: &mut Response<ProxyBody>, code: u32, message: Option<HeaderValue>) {
    *resp.status_mut() = StatusCode::OK;
    *resp.body_mut() = ProxyBody::Empty;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(GRPC_STATUS.clone(), HeaderValue::from(code));
    if let Some(m) = message.filter(|m| !m.is_empty()) {
        h.insert(GRPC_MESSAGE.clone(), m);
    }
}

/// A reply made by the proxy itself, with Envoy's headers.
fn local_reply(conn: &Connection, status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::text(body));
    *resp.status_mut() = status;
    resp.extensions_mut().insert(LocalReply { text: body, grpc_status: None });
    if !body.is_empty() {
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    set_server(conn, resp.headers_mut());
    resp
}

fn set_server(conn: &Connection, headers: &mut HeaderMap) {
    let config = &conn.hcm.config;
    let set = match config.server_header {
        ServerHeader::Overwrite => true,
        ServerHeader::AppendIfAbsent => !headers.contains_key(header::SERVER),
        ServerHeader::PassThrough => false,
    };
    if set && let Ok(v) = HeaderValue::from_str(&config.server_name) {
        headers.insert(header::SERVER, v);
    }
}

/// What the access log needs to know about how a request was routed; filled as routing goes.
#[derive(Debug, Default)]
pub(super) struct Trace {
    /// Whether anyone will read the names below (they cost an allocation each).
    pub logging: bool,
    pub flags: Vec<Flag>,
    pub route_name: Option<String>,
    pub cluster: Option<String>,
    pub upstream_host: Option<SocketAddr>,
    /// Request body bytes, counted as they are forwarded.
    pub received: Option<Arc<super::body::Progress>>,
    /// When the stream's max_stream_duration runs out (an upgraded connection's tunnel ends then too).
    pub stream_deadline: Option<Instant>,
    /// A gRPC request (its content type), read once by the connection manager.
    pub grpc: bool,
    /// The trusted client address when x-forwarded-for named it (Envoy's downstream remote address then).
    pub remote: Option<SocketAddr>,
}

impl Trace {
    /// Moves what routing found into the request's access log entry.
    pub fn fill(&mut self, entry: &mut crate::access_log::Entry) {
        entry.flags = std::mem::take(&mut self.flags);
        entry.route_name = self.route_name.take();
        entry.upstream_cluster = self.cluster.take();
        entry.upstream_host = self.upstream_host;
        entry.bytes_received = self.received.as_ref().map_or(0, |r| r.bytes.load(Ordering::Relaxed));
    }
}

/// Why an attempt did not produce a response to pass on.
enum Failure {
    Pool(PoolError),
    PerTryTimeout,
    /// The attempt outlived the upstream max stream duration before its response began.
    MaxStreamDuration,
}

/// What routing decided for a request that goes upstream.
struct Chosen<'a> {
    matched: &'a Matched<'a>,
    action: &'a RouteAction,
    extras: Option<&'a ClusterExtras>,
    authority: &'a str,
    upgrade: bool,
}

/// Sends the request upstream (with retries) and returns the downstream response.
async fn forward(
    conn: &Connection,
    chosen: &Chosen<'_>,
    cluster: &Arc<Cluster>,
    req: Request<Incoming>,
    trace: &mut Trace,
) -> Response<ProxyBody> {
    let Chosen { matched, action, extras, authority, upgrade } = *chosen;
    let start = Instant::now();
    let source =
        HashSource { client: trace.remote.map_or(conn.peer.ip(), |a| a.ip()), peer: conn.peer, local: conn.local };
    let mut set_cookies = Vec::new();
    let hash = action.request_hash(req.headers(), req.uri(), &source, &mut set_cookies);
    let mut req = req;
    // Only an internal request can still carry them: the connection manager strips them from every other.
    let overrides = req.headers().contains_key(&X_ENVOY_INTERNAL).then(|| RequestOverrides::take(req.headers_mut()));
    // Envoy's route timeout: none under the "new timeouts" (a route max_stream_duration), else the legacy
    // max_grpc_timeout's reading of a gRPC request's grpc-timeout, else the route's; an internal request's
    // x-envoy-upstream-rq-timeout-ms replaces it.
    let mut route_timeout = if action.stream_duration.replaces_route_timeout() {
        None
    } else {
        action.stream_duration.grpc_route_timeout(req.headers()).unwrap_or(action.timeout)
    };
    let retry_owned = overrides.as_ref().and_then(|o| o.retry_policy(action.retry_policy.as_ref()));
    let retry = retry_owned.as_ref().or(action.retry_policy.as_ref());
    let mut per_try = retry.and_then(|p| p.per_try_timeout);
    let mut timeout_status = StatusCode::GATEWAY_TIMEOUT;
    if let Some(o) = &overrides {
        if let Some(t) = o.timeout {
            route_timeout = Some(t).filter(|t| !t.is_zero());
        }
        if let Some(t) = o.per_try_timeout {
            per_try = Some(t).filter(|t| !t.is_zero());
        }
        if o.alt_response {
            timeout_status = StatusCode::NO_CONTENT;
        }
    }
    // Envoy's upstream max_stream_duration: the cluster's, or an internal request's header (0 turns it off). Each
    // attempt gets its own, response included.
    let stream_duration = match overrides.as_ref().and_then(|o| o.stream_duration) {
        Some(d) => Some(d).filter(|d| !d.is_zero()),
        None => cluster.config.http.max_stream_duration,
    };
    // A per-try timeout at or past the route's is no limit of its own.
    if let (Some(p), Some(r)) = (per_try, route_timeout)
        && p >= r
    {
        per_try = None;
    }
    let downstream_h2 = req.version() == Version::HTTP_2;
    let protocol = upstream_protocol(cluster.config.http.protocol, downstream_h2, upgrade);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    // Build the upstream request's head once.
    let mut headers = std::mem::take(&mut parts.headers);
    let grpc = trace.grpc;
    strip_hop_by_hop(&mut headers, upgrade);
    // Envoy answers `Expect: 100-continue` itself and removes it, unless proxy_100_continue passes it upstream.
    if !conn.hcm.config.proxy_100_continue {
        headers.remove(header::EXPECT);
    }
    match extras {
        Some(e) => matched.apply_request_headers_with(e, &mut headers),
        None => matched.apply_request_headers(&mut headers),
    }
    let extra_host = extras.and_then(|e| e.host_rewrite.as_ref());
    if let Some(via) = &conn.hcm.config.via {
        headers.append(header::VIA, via.clone());
    }
    // The upstream Host: a literal rewrite, else the request's own (kept as received when it already is a Host
    // header, so the common case copies nothing).
    let host: Option<HeaderValue> = match &action.host_rewrite {
        HostRewrite::None if extra_host.is_some() => extra_host.cloned(),
        HostRewrite::Literal(h) => HeaderValue::from_str(h).ok(),
        HostRewrite::None | HostRewrite::Auto if headers.contains_key(header::HOST) => None,
        HostRewrite::None | HostRewrite::Auto => HeaderValue::from_str(authority).ok(),
    };
    let original_path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    // An origin-form request URI without a rewrite goes upstream as it is.
    let path: Option<String> = match matched.rewritten_path(original_path) {
        Some(p) => Some(p),
        None if parts.uri.scheme().is_some() => Some(original_path.to_string()),
        None => None,
    };

    let body_empty = http_body::Body::is_end_stream(&body);
    let max_attempts = retry.map_or(1, |p| p.num_retries.saturating_add(1));
    let deadline = route_timeout.map(|t| start + t);
    // Envoy's router tells the upstream how long it will wait for an attempt (its setTimeoutHeaders): the per-try
    // timeout, else the route's, never past what is left of the route's; under the legacy max_grpc_timeout a gRPC
    // request's grpc-timeout says the same.
    let announce = !conn.hcm.config.suppress_envoy_headers;
    let grpc_deadline = grpc && action.stream_duration.rewrites_grpc_timeout();
    let expected_ms = |elapsed: Duration| -> Option<u64> {
        let mut t = per_try.or(route_timeout)?;
        if let Some(global) = route_timeout {
            t = t.min(global.saturating_sub(elapsed));
        }
        Some(u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1))
    };
    // A route's idle_timeout overrides the HCM's stream_idle_timeout; 0 disables it.
    let idle = match action.idle_timeout {
        Some(t) if t.is_zero() => None,
        Some(t) => Some(t),
        None => conn.hcm.config.stream_idle_timeout,
    };
    // Tracks the request body as it is sent (for BYTES_RECEIVED, request_timeout and connection reuse).
    let request_progress = if body_empty { None } else { Some(trace.received.clone().unwrap_or_default()) };
    let mut body = (!body_empty).then(|| ProxyBody::stream(body, idle, None, request_progress.clone()));
    // Envoy's request mirroring: each drawn policy gets a copy of the request, sent once the request is complete.
    if !upgrade && !action.mirrors.is_empty() {
        let shadows: Vec<&MirrorPolicy> = action.mirrors.iter().filter(|m| m.draw()).collect();
        let mut bodies: Vec<Option<ShadowBody>> = match body.take() {
            Some(b) if !shadows.is_empty() => {
                let (b, rx) =
                    Tee::wrap(b, conn.buffer_limit, cluster.stats.retry_or_shadow_abandoned.clone(), shadows.len());
                body = Some(b);
                rx.into_iter().map(Some).collect()
            }
            b => {
                body = b;
                Vec::new()
            }
        };
        let request_host = match &host {
            Some(v) => v.to_str().unwrap_or(authority),
            None => headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or(authority),
        };
        for (i, policy) in shadows.into_iter().enumerate() {
            let Some(name) = policy.cluster_name(&headers) else { continue };
            let mut h = headers.clone();
            if let Some(v) = policy.host(request_host) {
                h.insert(header::HOST, v);
            }
            let shadow = Shadow {
                cluster: name.to_string(),
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                path: path.clone(),
                headers: h,
                downstream_h2,
                timeout: route_timeout,
                idle,
                hash,
            };
            spawn_shadow(conn, shadow, bodies.get_mut(i).and_then(Option::take));
        }
    }
    // A body that a retry may need again is kept as it streams to the first attempt (never collected before it).
    let replay = match body.take() {
        Some(b) if max_attempts > 1 => {
            Some(super::body::Replay::new(b, conn.buffer_limit, cluster.stats.retry_or_shadow_abandoned.clone()))
        }
        b => {
            body = b;
            None
        }
    };
    // The retry in flight, holding its place under the cluster's max_retries until its outcome is known.
    let mut retry_slot = None;
    let mut tried: Vec<SocketAddr> = Vec::new();
    // previous_priorities: the priorities of the attempts so far, and those the priority load now leaves out.
    let mut tried_priorities: Vec<u32> = Vec::new();
    let mut attempt = 0;
    let stats = &cluster.stats;
    loop {
        attempt += 1;
        // Envoy's previous_priorities: every update_frequency attempts, the priorities tried so far leave the load.
        let avoid: &[u32] = match retry.and_then(|p| p.previous_priorities).map(|f| f as usize) {
            Some(every) if every > 0 => &tried_priorities[..tried_priorities.len() / every * every],
            _ => &[],
        };
        let Some(host_entry) = choose_host(conn, cluster, retry, &tried, hash, avoid) else {
            stats.upstream_cx_none_healthy.inc();
            trace.flags.push(Flag::NoHealthyUpstream);
            return local_reply(conn, StatusCode::SERVICE_UNAVAILABLE, NO_HEALTHY_UPSTREAM);
        };
        if max_attempts > 1 {
            tried.push(host_entry.address);
            if retry.is_some_and(|p| p.previous_priorities.is_some()) {
                tried_priorities.push(host_entry.priority);
            }
        }
        trace.upstream_host = Some(host_entry.address);
        let Some(rq_slot) = cluster.start_request() else {
            trace.flags.push(Flag::UpstreamOverflow);
            let mut resp = local_reply(conn, StatusCode::SERVICE_UNAVAILABLE, OVERFLOW);
            if !conn.hcm.config.suppress_envoy_headers {
                resp.headers_mut().insert(X_OVERLOADED.clone(), HeaderValue::from_static("true"));
            }
            return resp;
        };
        // The last possible attempt takes the headers; earlier ones copy them for a retry.
        let mut h = if attempt < max_attempts { headers.clone() } else { std::mem::take(&mut headers) };
        if matched.vhost.include_attempt_count {
            h.insert(X_ATTEMPT_COUNT.clone(), HeaderValue::from(attempt));
        }
        if (announce || grpc_deadline)
            // A retry is told what is left; the first attempt the whole (Envoy counts from the request's end).
            && let Some(ms) = expected_ms(if attempt == 1 { Duration::ZERO } else { start.elapsed() })
        {
            if announce {
                h.insert(X_EXPECTED_RQ_TIMEOUT.clone(), HeaderValue::from(ms));
            }
            if grpc_deadline && let Ok(v) = HeaderValue::from_str(&grpc_timeout_value(ms)) {
                h.insert(GRPC_TIMEOUT.clone(), v);
            }
        }
        if matches!(action.host_rewrite, HostRewrite::Auto) {
            h.insert(header::HOST, host_value(&host_entry.address, &host_entry.hostname));
        } else if let Some(v) = &host {
            h.insert(header::HOST, v.clone());
        }
        let (upstream_body, sent) = match (&replay, body.take()) {
            (Some(r), _) => {
                let (b, sent) = r.attempt();
                (b, Some(sent))
            }
            (None, Some(b)) => (b, request_progress.clone()),
            (None, None) => (ProxyBody::Empty, None),
        };
        let request = match build_request(&parts.method, &parts.uri, path.as_deref(), protocol, h, upstream_body) {
            Ok(r) => r,
            Err(e) => {
                debug!("cannot build the upstream request: {e}");
                return local_reply(conn, StatusCode::BAD_REQUEST, "");
            }
        };
        stats.upstream_rq_total.inc();
        let now = Instant::now();
        let try_deadline = [deadline, per_try.map(|t| now + t), idle.map(|t| now + t)].into_iter().flatten().min();
        // The upstream max stream duration runs from when the pool has a connection for the attempt (Envoy's
        // onPoolReady), so a slow connect stays a connect failure.
        let ready = tokio::sync::Notify::new();
        let mut limit_end = None;
        let send = conn.ctx.http_pools.send(cluster, &host_entry, protocol, request, stream_duration.map(|_| &ready));
        let send = async {
            let Some(d) = stream_duration else { return send.await.map_err(Failure::Pool) };
            let limit = async {
                ready.notified().await;
                let at = Instant::now() + d;
                limit_end = Some(at);
                tokio::time::sleep_until(at).await;
            };
            tokio::select! {
                biased;
                r = send => r.map_err(Failure::Pool),
                () = limit => Err(Failure::MaxStreamDuration),
            }
        };
        // Dropped armed (a timeout fired, or hyper dropped this request because the downstream went away), the
        // upstream request was reset by us: Envoy's upstream_rq_tx_reset.
        let in_flight = CountOnDrop::new(&stats.upstream_rq_tx_reset);
        let outcome = if let Some(progress) = &request_progress {
            // A request with a body: as in Envoy, the route timeout (and the wait for a response under the idle
            // timeout) counts from the end of the request, so a long upload is not cut short by either. The route
            // timeout covers every attempt from there; a per-try timeout starts with its attempt (or the request's
            // end, if later).
            let timers = async {
                progress.finished().await;
                let complete = progress.finished_at().unwrap_or_else(Instant::now);
                let global = route_timeout.map(|t| complete + t);
                let this_try = per_try.map(|t| complete.max(now) + t);
                let waiting = idle.map(|t| Instant::now() + t);
                match [global, this_try, waiting].into_iter().flatten().min() {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending::<()>().await,
                }
                let passed = |at: Option<Instant>| at.is_some_and(|at| at <= Instant::now());
                (passed(global), passed(this_try))
            };
            tokio::select! {
                r = send => r,
                fired = timers => match fired {
                    (true, _) => {
                        stats.upstream_rq_timeout.inc();
                        trace.flags.push(Flag::UpstreamRequestTimeout);
                        // Envoy reports the route timeout to outlier detection as a timeout of this host.
                        cluster.report(&host_entry, Outcome::Timeout);
                        return timeout_reply(conn, timeout_status);
                    }
                    (false, true) => {
                        stats.upstream_rq_per_try_timeout.inc();
                        Err(Failure::PerTryTimeout)
                    }
                    (false, false) => {
                        trace.flags.push(Flag::StreamIdleTimeout);
                        conn.hcm.stats.downstream_rq_idle_timeout.inc();
                        return local_reply(conn, StatusCode::REQUEST_TIMEOUT, STREAM_TIMEOUT);
                    }
                }
            }
        } else {
            match try_deadline {
                Some(d) => match tokio::time::timeout_at(d, send).await {
                    Ok(r) => r,
                    Err(_) if deadline.is_some_and(|g| g <= Instant::now()) => {
                        stats.upstream_rq_timeout.inc();
                        trace.flags.push(Flag::UpstreamRequestTimeout);
                        // Envoy reports the route timeout to outlier detection as a timeout of this host.
                        cluster.report(&host_entry, Outcome::Timeout);
                        return timeout_reply(conn, timeout_status);
                    }
                    Err(_)
                        if idle.is_some_and(|t| now + t <= Instant::now())
                            && per_try.is_none_or(|p| p > idle.unwrap_or(p)) =>
                    {
                        // Envoy's stream_idle_timeout before any response: 408 "stream timeout".
                        trace.flags.push(Flag::StreamIdleTimeout);
                        conn.hcm.stats.downstream_rq_idle_timeout.inc();
                        return local_reply(conn, StatusCode::REQUEST_TIMEOUT, STREAM_TIMEOUT);
                    }
                    Err(_) => {
                        stats.upstream_rq_per_try_timeout.inc();
                        Err(Failure::PerTryTimeout)
                    }
                },
                None => send.await,
            }
        };
        // Where the limit ends, for the response body.
        let stream_end = stream_duration.map(|d| limit_end.unwrap_or_else(|| now + d));
        if !matches!(outcome, Err(Failure::PerTryTimeout | Failure::MaxStreamDuration)) {
            in_flight.disarm();
        }
        // A body that outgrew the retry buffer ends retrying, as Envoy drops its retry state then.
        let policy = retry.filter(|_| replay.as_ref().is_none_or(|r| r.replayable()));
        let can_retry = attempt < max_attempts && policy.is_some();
        // Envoy's shouldRetry gives the previous retry's max_retries place back before it decides on the next.
        let retried = retry_slot.take().is_some();
        match outcome {
            Ok((resp, lease)) => {
                let status = resp.status().as_u16();
                cluster.count_response(status);
                // Envoy judges a gRPC answer by the grpc-status of a trailers-only response, mapped to HTTP.
                let judged = match resp.headers().get(&GRPC_STATUS) {
                    Some(v) if grpc => grpc_to_http(v.as_bytes()),
                    _ => status,
                };
                cluster.report(&host_entry, Outcome::Status(judged));
                let retriable = policy.is_some_and(|p| p.should_retry_status(status));
                if can_retry && retriable {
                    if let Some(slot) = admit_retry(cluster, retry, attempt, deadline).await {
                        retry_slot = Some(slot);
                        continue;
                    }
                    // The cluster's max_retries are all outstanding: Envoy passes this answer on, flagged UO.
                    trace.flags.push(Flag::UpstreamOverflow);
                } else if retriable && attempt > 1 {
                    // Envoy counts a retriable answer that used up the retries.
                    stats.upstream_rq_retry_limit_exceeded.inc();
                    trace.flags.push(Flag::UpstreamRetryLimitExceeded);
                } else if retried && !retriable {
                    stats.upstream_rq_retry_success.inc();
                }
                let lease = lease.map(|l| l.with_request(sent));
                // Envoy's upstream_rq_time runs from the end of the downstream request to the end of the upstream
                // response, retries included; none is recorded if the response began before the request ended.
                let complete = match &request_progress {
                    None => Some(start),
                    Some(p) => p.finished_at(),
                };
                let timing = complete.map(|t| (stats.upstream_rq_time.clone(), t));
                let hold = StreamHold {
                    slot: Some(rq_slot),
                    timing,
                    upstream_tx_reset: Some(CountOnDrop::new(&stats.upstream_rq_tx_reset)),
                    ..Default::default()
                };
                // A tunnel ends at the stream's deadline or the upstream request's, whichever comes first.
                let stream = trace
                    .stream_deadline
                    .map(|at| (at, conn.hcm.stats.downstream_rq_max_duration_reached.clone(), DurationTimeout::Stream));
                let upstream = stream_end
                    .map(|at| (at, stats.upstream_rq_max_duration_reached.clone(), DurationTimeout::Upstream));
                let expiry = match (stream, upstream) {
                    (Some(s), Some(u)) => Some(if u.0 <= s.0 { u } else { s }),
                    (s, u) => s.or(u),
                };
                let tunnel = Tunnel { downstream: downstream_upgrade, expiry };
                let mut resp = upstream_response(conn, resp, lease, hold, start, tunnel, parts.version, idle);
                if let Some(at) = stream_end {
                    let expired = stats.upstream_rq_max_duration_reached.clone();
                    resp.body_mut().deadline(at, expired, DurationTimeout::Upstream);
                }
                // A cookie the hash policy made up goes back with the upstream's answer, as Envoy's router adds it.
                for v in set_cookies {
                    resp.headers_mut().append(header::SET_COOKIE, v);
                }
                return resp;
            }
            Err(failure) => {
                if matches!(failure, Failure::Pool(PoolError::PendingOverflow)) {
                    trace.flags.push(Flag::UpstreamOverflow);
                    let mut resp = local_reply(conn, StatusCode::SERVICE_UNAVAILABLE, OVERFLOW);
                    if !conn.hcm.config.suppress_envoy_headers {
                        resp.headers_mut().insert(X_OVERLOADED.clone(), HeaderValue::from_static("true"));
                    }
                    return resp;
                }
                // Envoy's router reports a failure to get an answer to outlier detection: a per-try timeout as a
                // timeout, a refused connection or a reset as a connect failure; never our own max_connections
                // overflow.
                match &failure {
                    // Our own limit, or a connection another request was opening and has reported already.
                    Failure::Pool(PoolError::Connect(ConnectError::Overflow(_)) | PoolError::Shared(..)) => {}
                    Failure::PerTryTimeout => cluster.report(&host_entry, Outcome::Timeout),
                    Failure::Pool(_) => cluster.report(&host_entry, Outcome::ConnectFailed),
                    // Envoy's onStreamMaxDurationReached tells outlier detection nothing.
                    Failure::MaxStreamDuration => {}
                }
                let (retryable, reply) = match &failure {
                    Failure::Pool(e) if e.is_connect_failure() => {
                        debug!(cluster = %cluster.name(), "upstream connect failure: {e}");
                        (
                            policy.is_some_and(|p| p.should_retry_failure(UpstreamFailure::ConnectFailure)),
                            (StatusCode::SERVICE_UNAVAILABLE, CONNECT_FAILURE),
                        )
                    }
                    Failure::Pool(e) => {
                        debug!(cluster = %cluster.name(), "upstream reset: {e}");
                        stats.upstream_rq_rx_reset.inc();
                        (
                            policy.is_some_and(|p| p.should_retry_failure(UpstreamFailure::Reset)),
                            (StatusCode::SERVICE_UNAVAILABLE, RESET),
                        )
                    }
                    Failure::PerTryTimeout => (
                        policy.is_some_and(|p| p.retry_on.five_xx || p.retry_on.gateway_error || p.retry_on.reset),
                        (timeout_status, if timeout_status == StatusCode::NO_CONTENT { "" } else { TIMEOUT }),
                    ),
                    Failure::MaxStreamDuration => {
                        stats.upstream_rq_max_duration_reached.inc();
                        // A local reset, retried as Envoy's maybeRetryReset retries one; the answer is Envoy's
                        // maybeRequestTimeoutCode: 504 once the request was complete, 408 while it was arriving.
                        let complete = request_progress.as_ref().is_none_or(|p| p.finished_at().is_some());
                        let status = if complete { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::REQUEST_TIMEOUT };
                        (
                            policy.is_some_and(|p| p.should_retry_failure(UpstreamFailure::Reset)),
                            (status, MAX_STREAM_DURATION),
                        )
                    }
                };
                if can_retry && retryable {
                    if let Some(slot) = admit_retry(cluster, retry, attempt, deadline).await {
                        retry_slot = Some(slot);
                        continue;
                    }
                    // The cluster's max_retries are all outstanding: no retry, flagged UO as in Envoy.
                    trace.flags.push(Flag::UpstreamOverflow);
                }
                trace.flags.push(match &failure {
                    Failure::Pool(e) if e.is_connect_failure() => Flag::UpstreamConnectionFailure,
                    Failure::Pool(_) => Flag::UpstreamConnectionTermination,
                    Failure::PerTryTimeout => Flag::UpstreamRequestTimeout,
                    Failure::MaxStreamDuration => Flag::UpstreamMaxStreamDurationReached,
                });
                if attempt > 1 && retryable && !can_retry {
                    stats.upstream_rq_retry_limit_exceeded.inc();
                    trace.flags.push(Flag::UpstreamRetryLimitExceeded);
                }
                return local_reply(conn, reply.0, reply.1);
            }
        }
    }
}

/// The protocol a request goes upstream in: the cluster's, or the downstream's under `use_downstream_protocol_config`;
/// an upgrade always goes over HTTP/1.1.
fn upstream_protocol(configured: UpstreamProtocol, downstream_h2: bool, upgrade: bool) -> Protocol {
    match configured {
        _ if upgrade => Protocol::Http1,
        UpstreamProtocol::Http1 => Protocol::Http1,
        UpstreamProtocol::Http2 => Protocol::Http2,
        UpstreamProtocol::Downstream if downstream_h2 => Protocol::Http2,
        UpstreamProtocol::Downstream => Protocol::Http1,
    }
}

/// A `grpc-timeout` value for `ms` milliseconds: at most 8 digits, as the gRPC wire spec allows, in the finest unit
/// that fits (Envoy's toGrpcTimeout).
fn grpc_timeout_value(ms: u64) -> String {
    const MAX: u64 = 99_999_999;
    let mut value = ms;
    for (unit, next) in [("m", 1000), ("S", 60), ("M", 60)] {
        if value <= MAX {
            return format!("{value}{unit}");
        }
        value /= next;
    }
    format!("{}H", value.min(MAX))
}

/// Envoy's answer to a route or per-try timeout: 504 "upstream request timeout", or with
/// `x-envoy-upstream-rq-timeout-alt-response` a 204, which carries no body.
fn timeout_reply(conn: &Connection, status: StatusCode) -> Response<ProxyBody> {
    if status == StatusCode::NO_CONTENT {
        return local_reply(conn, status, "");
    }
    local_reply(conn, status, TIMEOUT)
}

/// A host for this attempt; with `previous_hosts`, one not tried yet when the cluster has another.
fn choose_host(
    conn: &Connection,
    cluster: &Cluster,
    retry: Option<&RetryPolicy>,
    tried: &[SocketAddr],
    hash: Option<u64>,
    avoid_priorities: &[u32],
) -> Option<Arc<Host>> {
    let avoid = retry.filter(|p| p.avoid_previous_hosts && !tried.is_empty());
    let mut pick = cluster.choose_avoiding(conn.original_dst, hash, avoid_priorities)?;
    if let Some(policy) = avoid {
        for attempt in 1..=u64::from(policy.host_selection_attempts) {
            if !tried.contains(&pick.address) {
                break;
            }
            // The same hash would find the same host again: a retry that must avoid it hashes elsewhere.
            pick = cluster.choose_avoiding(
                conn.original_dst,
                hash.map(|h| h.wrapping_add(attempt << 40)),
                avoid_priorities,
            )?;
        }
    }
    Some(pick)
}

/// Envoy's retry back-off: fully jittered exponential between `base` and `max`, never past the route's deadline.
/// A retry under the cluster's `max_retries`, counted and after its back-off; None when the breaker is full.
async fn admit_retry(
    cluster: &Cluster,
    retry: Option<&RetryPolicy>,
    attempt: u32,
    deadline: Option<Instant>,
) -> Option<crate::upstream::cluster::RetrySlot> {
    let slot = cluster.start_retry()?;
    cluster.stats.upstream_rq_retry.inc();
    backoff(retry, attempt, deadline).await;
    Some(slot)
}

async fn backoff(retry: Option<&RetryPolicy>, attempt: u32, deadline: Option<Instant>) {
    let Some(p) = retry else { return };
    // Envoy's jittered back-off: a random wait in [0, base × (2^attempt − 1)], capped at max_interval.
    let ceiling = p.backoff_base.saturating_mul((1u32 << attempt.min(16)) - 1).min(p.backoff_max);
    let wait = Duration::from_secs_f64(ceiling.as_secs_f64() * rand::random::<f64>());
    let until = Instant::now() + wait;
    tokio::time::sleep_until(deadline.map_or(until, |d| d.min(until))).await;
}

fn host_value(addr: &SocketAddr, hostname: &str) -> HeaderValue {
    let text = if hostname.is_empty() { addr.to_string() } else { hostname.to_string() };
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The upstream request: `path` is the rewritten (or origin-form) path and query, None to send `uri` unchanged.
fn build_request(
    method: &http::Method,
    uri: &Uri,
    path: Option<&str>,
    protocol: Protocol,
    mut headers: HeaderMap,
    body: ProxyBody,
) -> Result<Request<ProxyBody>, http::Error> {
    let path = path.unwrap_or_else(|| uri.path_and_query().map_or("/", |p| p.as_str()));
    let (uri, version) = match protocol {
        Protocol::Http1 if uri.scheme().is_none() && path == uri.path_and_query().map_or("/", |p| p.as_str()) => {
            (uri.clone(), Version::HTTP_11)
        }
        Protocol::Http1 => (Uri::try_from(path)?, Version::HTTP_11),
        Protocol::Http2 => {
            // HTTP/2 carries the authority as :authority, built from the URI.
            let host = headers.remove(header::HOST);
            let authority = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            (Uri::try_from(format!("http://{authority}{path}"))?, Version::HTTP_2)
        }
    };
    let mut req = Request::builder().method(method.clone()).uri(uri).version(version).body(body)?;
    *req.headers_mut() = headers;
    Ok(req)
}

/// A mirrored copy of a request (see [`spawn_shadow`]).
struct Shadow {
    cluster: String,
    method: http::Method,
    uri: Uri,
    path: Option<String>,
    headers: HeaderMap,
    downstream_h2: bool,
    /// The route timeout, which bounds the shadow too (Envoy's global timeout); None: none.
    timeout: Option<Duration>,
    /// The stream idle timeout, which bounds each wait for its answer when there is no route timeout.
    idle: Option<Duration>,
    hash: Option<u64>,
}

/// Sends a shadow request on its own task, as Envoy's shadow writer does: once the request body is complete (with
/// it, or not at all if it outgrew the buffer), to a host of the shadow cluster as it is then (a cluster that is gone
/// gets nothing), under its circuit breakers, counted in its stats and its outlier detection. The answer is read
/// and dropped; nobody waits for it.
fn spawn_shadow(conn: &Connection, shadow: Shadow, body: Option<ShadowBody>) {
    let ctx = conn.ctx.clone();
    let original_dst = conn.original_dst;
    tokio::spawn(async move {
        let body = match body {
            None => ProxyBody::Empty,
            Some(b) => match b.wait().await {
                Some(bytes) => ProxyBody::Bytes(Some(bytes)),
                None => return,
            },
        };
        let Some(cluster) = ctx.clusters.load().get(shadow.cluster.as_str()).cloned() else {
            debug!(cluster = %shadow.cluster, "shadow cluster does not exist");
            return;
        };
        let Some(host) = cluster.choose_hashed(original_dst, shadow.hash) else {
            cluster.stats.upstream_cx_none_healthy.inc();
            return;
        };
        let Some(_slot) = cluster.start_request() else { return };
        let protocol = upstream_protocol(cluster.config.http.protocol, shadow.downstream_h2, false);
        let Ok(request) =
            build_request(&shadow.method, &shadow.uri, shadow.path.as_deref(), protocol, shadow.headers, body)
        else {
            return;
        };
        let stats = &cluster.stats;
        stats.upstream_rq_total.inc();
        // The whole exchange, its answer's body included, under the route timeout; without one, each wait for the
        // upstream under the stream idle timeout. A stalled shadow never holds its task, connection or slot for
        // good.
        let idle = shadow.idle;
        let exchange = async {
            let send = ctx.http_pools.send(&cluster, &host, protocol, request, None);
            let sent = match (shadow.timeout, idle) {
                (None, Some(t)) => tokio::time::timeout(t, send).await.map_err(|_| ())?,
                _ => send.await,
            };
            match sent {
                Ok((resp, lease)) => {
                    let status = resp.status().as_u16();
                    cluster.count_response(status);
                    cluster.report(&host, Outcome::Status(status));
                    let mut rest = ProxyBody::stream(resp.into_body(), idle, lease, None);
                    while let Some(frame) = http_body_util::BodyExt::frame(&mut rest).await {
                        if frame.is_err() {
                            break;
                        }
                    }
                }
                // Our own limits, not the host's doing.
                Err(
                    PoolError::Connect(ConnectError::Overflow(_)) | PoolError::PendingOverflow | PoolError::Shared(..),
                ) => {}
                Err(e) => {
                    debug!(cluster = %cluster.name(), "shadow request failed: {e}");
                    cluster.report(&host, Outcome::ConnectFailed);
                }
            }
            Ok::<(), ()>(())
        };
        let finished = match shadow.timeout {
            Some(t) => tokio::time::timeout(t, exchange).await.map_err(|_| ()).and_then(|r| r),
            None => exchange.await,
        };
        if finished.is_err() {
            stats.upstream_rq_timeout.inc();
            cluster.report(&host, Outcome::Timeout);
        }
    });
}

/// An upgrade's downstream side, and when its tunnel must end (a max_stream_duration) with the counter that counts it
/// and which limit it is.
struct Tunnel {
    downstream: Option<hyper::upgrade::OnUpgrade>,
    expiry: Option<(Instant, crate::stats::Counter, DurationTimeout)>,
}

/// How an upgraded stream's tunnel ended, for its access log entry, which Envoy writes when the stream ends.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TunnelEnd {
    /// Bytes from the client through the tunnel, and to it.
    pub received: u64,
    pub sent: u64,
    /// The duration limit that closed it, if one did.
    pub cut: Option<DurationTimeout>,
}

/// On a 101 response: where the tunnel's end will be told (shared only because response extensions must be Clone).
#[derive(Clone)]
pub(super) struct TunnelLog(pub Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<TunnelEnd>>>>);

/// On a 101 response: where what the stream holds goes, to be released when its tunnel closes. An upgraded stream
/// lives (active, in its circuit-breaker slot, in flight on its connection) until then, as in Envoy.
#[derive(Clone)]
pub(super) struct TunnelHolds(tokio::sync::mpsc::UnboundedSender<StreamHold>);

impl TunnelHolds {
    /// Hands `hold` to the tunnel, or releases it at once if the tunnel is already gone.
    pub(super) fn give(&self, hold: StreamHold) {
        if let Err(gone) = self.0.send(hold) {
            let mut hold = gone.0;
            hold.complete();
        }
    }
}

/// Counts what is read through one side of a tunnel.
struct Counted<T> {
    inner: T,
    read: u64,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[allow(clippy::too_many_arguments)]
fn upstream_response(
    conn: &Connection,
    mut resp: Response<Incoming>,
    lease: Option<Lease>,
    hold: StreamHold,
    start: Instant,
    tunnel: Tunnel,
    downstream_version: Version,
    idle: Option<Duration>,
) -> Response<ProxyBody> {
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let mut hold = Some(hold);
    if switching && let Some(down) = tunnel.downstream {
        let up = hyper::upgrade::on(&mut resp);
        let expired = tunnel.expiry;
        let (done, told) = tokio::sync::oneshot::channel();
        resp.extensions_mut().insert(TunnelLog(Arc::new(std::sync::Mutex::new(Some(told)))));
        let (holds, mut held) = tokio::sync::mpsc::unbounded_channel();
        let holds = TunnelHolds(holds);
        if let Some(mut hold) = hold.take() {
            // upstream_rq_time ends at the 101: the tunnel's life is not a request time.
            hold.record_time();
            holds.give(hold);
        }
        resp.extensions_mut().insert(holds);
        let mut drain = conn.drain.clone();
        tokio::spawn(async move {
            let mut end = TunnelEnd::default();
            // Ended by us (a duration limit, the drain, a failed upgrade): a reset, as the body path counts one.
            let mut ended_by_us = true;
            match (down.await, up.await) {
                (Ok(d), Ok(u)) => {
                    let mut d = Counted { inner: hyper_util::rt::TokioIo::new(d), read: 0 };
                    let mut u = Counted { inner: hyper_util::rt::TokioIo::new(u), read: 0 };
                    let copy = tokio::io::copy_bidirectional(&mut d, &mut u);
                    let limit = async {
                        match &expired {
                            Some((at, _, _)) => tokio::time::sleep_until(*at).await,
                            None => std::future::pending().await,
                        }
                    };
                    let ended = tokio::select! {
                        r = copy => {
                            ended_by_us = false;
                            r.map(|_| ())
                        }
                        () = limit => {
                            // A max_stream_duration (the stream's or the upstream request's) covers the tunnel
                            // too, as Envoy caps WebSocket lifetimes with it: both sides close.
                            if let Some((_, counter, cause)) = &expired {
                                counter.inc();
                                end.cut = Some(*cause);
                            }
                            Ok(())
                        }
                        // The chain's drain deadline closes the tunnel as it closes every other connection of it.
                        _ = drain.closed() => Ok(()),
                    };
                    if let Err(e) = ended {
                        debug!("upgraded connection ended: {e}");
                    }
                    (end.received, end.sent) = (d.read, u.read);
                }
                (d, u) => debug!(downstream = d.is_ok(), upstream = u.is_ok(), "upgrade failed"),
            }
            // Closed first, so that a hold given from now on is released by its giver, not lost in the channel.
            held.close();
            while let Ok(mut hold) = held.try_recv() {
                if ended_by_us {
                    hold.reset(false);
                } else {
                    hold.complete();
                }
            }
            let _ = done.send(end);
        });
    }
    let (mut parts, body) = resp.into_parts();
    // The downstream codec speaks its own version whatever the upstream spoke (an HTTP/1.0 upstream must not turn a
    // keep-alive HTTP/1.1 client connection into a closing one).
    parts.version = downstream_version;
    strip_hop_by_hop(&mut parts.headers, switching);
    if !conn.hcm.config.suppress_envoy_headers {
        parts.headers.insert(X_UPSTREAM_SERVICE_TIME.clone(), HeaderValue::from(start.elapsed().as_millis() as u64));
    }
    if let Some(via) = &conn.hcm.config.via {
        parts.headers.append(header::VIA, via.clone());
    }
    set_server(conn, &mut parts.headers);
    // An upgraded connection never returns to the pool: its bytes now belong to the tunnel.
    let lease = if switching { None } else { lease };
    let mut body = ProxyBody::stream(body, idle, lease, None);
    if let Some(hold) = hold {
        body.hold(hold);
    }
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Envoy's grpcToHttpStatus, which outlier detection judges a trailers-only gRPC answer by.
    #[test]
    fn grpc_statuses_map_to_envoys_http_statuses() {
        for (grpc, http) in [
            ("0", 200),
            ("1", 499),
            ("3", 400),
            ("4", 504),
            ("5", 404),
            ("7", 403),
            ("8", 429),
            ("12", 501),
            ("13", 500),
        ] {
            assert_eq!(grpc_to_http(grpc.as_bytes()), http, "{grpc}");
        }
        assert_eq!(grpc_to_http(b"14"), 503);
        assert_eq!(grpc_to_http(b"16"), 401);
        assert_eq!(grpc_to_http(b"99"), 500, "unknown");
        assert_eq!(grpc_to_http(b"x"), 500, "malformed");
    }

    fn norm(p: &str) -> String {
        let uri: Uri = p.parse().unwrap_or_else(|e| panic!("{p}: {e}"));
        normalized_uri(&uri, true, false).map_or_else(|| p.to_string(), |u| u.to_string())
    }

    #[test]
    fn normalize_path_removes_dot_segments_as_rfc_3986_does() {
        assert_eq!(norm("/a/b/c/./../../g"), "/a/g");
        assert_eq!(norm("/mid/content=5/../6"), "/mid/6");
        assert_eq!(norm("/a/./b/"), "/a/b/");
        assert_eq!(norm("/a/b/.."), "/a/");
        assert_eq!(norm("/../../x?q=/../"), "/x?q=/../");
        assert_eq!(norm("/plain/path"), "/plain/path");
        assert_eq!(norm("/"), "/");
        let uri: Uri = "/a//b///c/".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(normalized_uri(&uri, false, true).map(|u| u.to_string()).as_deref(), Some("/a/b/c/"));
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_te_trailers_kept() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
    }

    #[test]
    fn grpc_timeouts_fit_eight_digits_in_the_finest_unit() {
        assert_eq!(grpc_timeout_value(300), "300m");
        assert_eq!(grpc_timeout_value(99_999_999), "99999999m");
        assert_eq!(grpc_timeout_value(100_000_000), "100000S");
        assert_eq!(grpc_timeout_value(u64::MAX), "99999999H");
    }

    #[test]
    fn the_xff_address_is_counted_from_the_right_across_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(xff_address(&h, 0), None);
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        assert_eq!(xff_address(&h, 0), Some(("10.0.0.1".parse().unwrap(), true)));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("192.0.2.1, 192.0.2.2"));
        assert_eq!(xff_address(&h, 0), Some(("192.0.2.2".parse().unwrap(), false)));
        assert_eq!(xff_address(&h, 2), Some(("10.0.0.1".parse().unwrap(), false)));
        assert_eq!(xff_address(&h, 3), None);
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("not-an-ip"));
        assert_eq!(xff_address(&h, 0), None);
    }

    #[test]
    fn request_ids_are_version_4_uuids() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(id, uuid_v4());
    }
}
