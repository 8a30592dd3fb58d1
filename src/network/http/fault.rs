//! Envoy's fault injection filter (`envoy.filters.http.fault`): compiles an `HTTPFault` (the filter's own config or
//! a route's `typed_per_filter_config`, which replaces it for that route; see [`super::route::FilterOverride`]) and decides, per request, whether to delay
//! it and whether to abort it with a chosen status, as Envoy does: the request must match `headers`,
//! `upstream_cluster` and `downstream_nodes`; each fault is drawn against its `percentage`; `header_delay` and
//! `header_abort` take their values from the request's `x-envoy-fault-*` headers; `max_active_faults` caps the
//! faults in progress; `response_rate_limit` throttles the response body (see [`super::body::Throttle`]). Runtime
//! keys (`*_runtime`) only name runtime overrides, and this proxy's runtime has none, so the configured values apply.

use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fpb;
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::Any;
use http::{HeaderMap, StatusCode};

use super::route::{HeaderMatchers, RequestHead};
use crate::config::listener::decode_any;
use crate::config::{ConfigError, duration, join};
use crate::stats::{Counter, Gauge, Store};

pub const TYPE_HTTP_FAULT: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";

/// A compiled `HTTPFault`.
#[derive(Debug, Default)]
pub struct FaultConfig {
    delay: Option<Delay>,
    abort: Option<Abort>,
    throttle: Option<Throttle>,
    upstream_cluster: Option<String>,
    headers: Option<HeaderMatchers>,
    downstream_nodes: Vec<String>,
    max_active_faults: Option<u64>,
    downstream_cluster_stats: bool,
}

#[derive(Debug)]
struct Delay {
    /// None: the delay comes from `x-envoy-fault-delay-request` (milliseconds).
    fixed: Option<Duration>,
    percent: Percent,
}

/// `response_rate_limit`: the response body at most this fast.
#[derive(Debug)]
struct Throttle {
    /// KiB/s; None: from `x-envoy-fault-throttle-response`.
    fixed_kbps: Option<u64>,
    percent: Percent,
}

#[derive(Debug)]
struct Abort {
    /// None: the status comes from `x-envoy-fault-abort-request` or `x-envoy-fault-abort-grpc-request`.
    fixed: Option<AbortWith>,
    percent: Percent,
}

/// How an aborted request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortWith {
    Http(StatusCode),
    /// HTTP 200 carrying this `grpc-status`.
    Grpc(u32),
}

/// A `FractionalPercent`: `numerator` out of `denominator`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Percent {
    numerator: u64,
    denominator: u64,
}

impl Percent {
    pub(crate) fn of(p: Option<&FractionalPercent>) -> Self {
        // Envoy reads an absent percentage as the proto default: 0 of 100, so nothing is injected.
        let Some(p) = p else { return Percent { numerator: 0, denominator: 100 } };
        let denominator = match p.denominator {
            1 => 10_000,
            2 => 1_000_000,
            _ => 100,
        };
        Percent { numerator: u64::from(p.numerator).min(denominator), denominator }
    }

    /// The `x-envoy-fault-*-percentage` header may lower the configured numerator, never raise it.
    fn capped_by(self, header: Option<u64>) -> Self {
        match header {
            Some(n) => Percent { numerator: n.min(self.numerator), ..self },
            None => self,
        }
    }

    pub(crate) fn draw(self) -> bool {
        self.numerator > 0 && rand::random_range(0..self.denominator) < self.numerator
    }
}

impl FaultConfig {
    /// The filter's `typed_config`; an empty one injects nothing (Istio sends it so routes can turn faults on).
    pub fn from_any(any: &Any, path: &str) -> Result<Self, ConfigError> {
        let f: fpb::HttpFault = decode_any(any, path)?;
        Self::from_proto(&f, path)
    }

    pub fn from_proto(f: &fpb::HttpFault, path: &str) -> Result<Self, ConfigError> {
        if f.filter_metadata.is_some() {
            return Err(ConfigError::new(join(path, "filter_metadata"), "filter_metadata is not supported"));
        }
        let delay = f.delay.as_ref().map(|d| delay(d, &join(path, "delay"))).transpose()?;
        let abort = f.abort.as_ref().map(|a| abort(a, &join(path, "abort"))).transpose()?;
        let throttle =
            f.response_rate_limit.as_ref().map(|r| throttle(r, &join(path, "response_rate_limit"))).transpose()?;
        let headers =
            if f.headers.is_empty() { None } else { Some(HeaderMatchers::new(&f.headers, &join(path, "headers"))?) };
        Ok(FaultConfig {
            delay,
            abort,
            throttle,
            upstream_cluster: (!f.upstream_cluster.is_empty()).then(|| f.upstream_cluster.clone()),
            headers,
            downstream_nodes: f.downstream_nodes.clone(),
            max_active_faults: f.max_active_faults.as_ref().map(|v| u64::from(v.value)),
            downstream_cluster_stats: !f.disable_downstream_cluster_stats,
        })
    }
}

fn delay(d: &common_fault::FaultDelay, path: &str) -> Result<Delay, ConfigError> {
    use common_fault::fault_delay::FaultDelaySecifier;
    let fixed = match &d.fault_delay_secifier {
        Some(FaultDelaySecifier::FixedDelay(t)) => Some(duration(t, &join(path, "fixed_delay"))?),
        Some(FaultDelaySecifier::HeaderDelay(_)) => None,
        None => return Err(ConfigError::new(path, "one of fixed_delay or header_delay is required")),
    };
    Ok(Delay { fixed, percent: Percent::of(d.percentage.as_ref()) })
}

fn throttle(r: &common_fault::FaultRateLimit, path: &str) -> Result<Throttle, ConfigError> {
    use common_fault::fault_rate_limit::LimitType;
    let fixed_kbps = match &r.limit_type {
        Some(LimitType::FixedLimit(f)) if f.limit_kbps == 0 => {
            return Err(ConfigError::new(join(path, "fixed_limit.limit_kbps"), "must be at least 1"));
        }
        Some(LimitType::FixedLimit(f)) => Some(f.limit_kbps),
        Some(LimitType::HeaderLimit(_)) => None,
        None => return Err(ConfigError::new(path, "one of fixed_limit or header_limit is required")),
    };
    Ok(Throttle { fixed_kbps, percent: Percent::of(r.percentage.as_ref()) })
}

fn abort(a: &fpb::FaultAbort, path: &str) -> Result<Abort, ConfigError> {
    use fpb::fault_abort::ErrorType;
    let fixed = match &a.error_type {
        Some(ErrorType::HttpStatus(code)) => Some(AbortWith::Http(
            http_status(u64::from(*code))
                .ok_or_else(|| ConfigError::new(join(path, "http_status"), "must be in the range [200, 600)"))?,
        )),
        Some(ErrorType::GrpcStatus(code)) => Some(AbortWith::Grpc(*code)),
        Some(ErrorType::HeaderAbort(_)) => None,
        None => {
            return Err(ConfigError::new(path, "one of http_status, grpc_status or header_abort is required"));
        }
    };
    Ok(Abort { fixed, percent: Percent::of(a.percentage.as_ref()) })
}

fn http_status(code: u64) -> Option<StatusCode> {
    (200..600).contains(&code).then(|| StatusCode::from_u16(code as u16).ok()).flatten()
}

/// `http.<stat_prefix>.fault.*`, Envoy's names, and the faults in progress for `max_active_faults`.
#[derive(Debug)]
pub struct FaultStats {
    store: Store,
    prefix: String,
    pub delays_injected: Counter,
    pub aborts_injected: Counter,
    pub response_rl_injected: Counter,
    pub faults_overflow: Counter,
    active_faults: Gauge,
}

impl FaultStats {
    pub fn new(store: &Store, stat_prefix: &str) -> Self {
        let prefix = format!("http.{stat_prefix}.fault");
        let c = |n: &str| store.counter(&format!("{prefix}.{n}"));
        FaultStats {
            delays_injected: c("delays_injected"),
            aborts_injected: c("aborts_injected"),
            response_rl_injected: c("response_rl_injected"),
            faults_overflow: c("faults_overflow"),
            active_faults: store.gauge(&format!("{prefix}.active_faults")),
            store: store.clone(),
            prefix,
        }
    }

    /// `<downstream-cluster>.delays_injected` / `.aborts_injected`, by `x-envoy-downstream-service-cluster`.
    fn downstream(&self, headers: &HeaderMap, what: &str) {
        if let Some(cluster) = headers.get("x-envoy-downstream-service-cluster").and_then(|v| v.to_str().ok())
            && !cluster.is_empty()
        {
            self.store.counter(&format!("{}.{cluster}.{what}", self.prefix)).inc();
        }
    }
}

/// A fault in progress, counted in `active_faults` until dropped.
#[derive(Debug)]
pub struct ActiveFault(Gauge);

impl Drop for ActiveFault {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the filter does to one request: wait `delay`, then answer with `abort`, or let the response body through at
/// `throttle_kbps` (any may be absent). `active` counts the fault in progress until the plan, or the throttled body
/// it is handed to, is dropped.
#[derive(Debug)]
pub struct Plan {
    pub delay: Option<Duration>,
    pub abort: Option<AbortWith>,
    pub throttle_kbps: Option<u64>,
    pub active: ActiveFault,
}

impl FaultConfig {
    /// Whether this request is in the fault's scope: `upstream_cluster`, `headers` and `downstream_nodes`.
    fn applies(&self, head: &RequestHead<'_>, cluster: Option<&str>) -> bool {
        if let Some(want) = &self.upstream_cluster
            && cluster != Some(want.as_str())
        {
            return false;
        }
        if let Some(h) = &self.headers
            && !h.matches(head)
        {
            return false;
        }
        if !self.downstream_nodes.is_empty() {
            let node = head.headers.get("x-envoy-downstream-service-node").and_then(|v| v.to_str().ok());
            if !node.is_some_and(|n| self.downstream_nodes.iter().any(|d| d == n)) {
                return false;
            }
        }
        true
    }

    /// The delay to inject, if one is drawn: Envoy decides the delay when the request's headers arrive.
    fn draw_delay(&self, headers: &HeaderMap) -> Option<Duration> {
        let d = self.delay.as_ref()?;
        let (length, percent) = match d.fixed {
            Some(t) => (t, d.percent),
            None => {
                let ms = header_number(headers, "x-envoy-fault-delay-request")?;
                (
                    Duration::from_millis(ms),
                    d.percent.capped_by(header_number(headers, "x-envoy-fault-delay-request-percentage")),
                )
            }
        };
        (!length.is_zero() && percent.draw()).then_some(length)
    }

    /// The abort to answer with, if one is drawn (after any delay, as in Envoy).
    fn draw_abort(&self, headers: &HeaderMap) -> Option<AbortWith> {
        let a = self.abort.as_ref()?;
        let (with, percent) = match a.fixed {
            Some(w) => (w, a.percent),
            None => {
                let with = match header_number(headers, "x-envoy-fault-abort-request") {
                    Some(code) => AbortWith::Http(http_status(code)?),
                    None => AbortWith::Grpc(
                        u32::try_from(header_number(headers, "x-envoy-fault-abort-grpc-request")?).ok()?,
                    ),
                };
                (with, a.percent.capped_by(header_number(headers, "x-envoy-fault-abort-request-percentage")))
            }
        };
        percent.draw().then_some(with)
    }

    /// The response body's rate limit in KiB/s, if one is drawn.
    fn draw_throttle(&self, headers: &HeaderMap) -> Option<u64> {
        let t = self.throttle.as_ref()?;
        let (kbps, percent) = match t.fixed_kbps {
            Some(k) => (k, t.percent),
            None => (
                header_number(headers, "x-envoy-fault-throttle-response").filter(|k| *k > 0)?,
                t.percent.capped_by(header_number(headers, "x-envoy-fault-throttle-response-percentage")),
            ),
        };
        percent.draw().then_some(kbps)
    }

    /// Decides this request's faults and counts them; None when it gets none. The abort is drawn now too: the only
    /// thing between them in Envoy is the delay's timer.
    pub fn plan(&self, head: &RequestHead<'_>, cluster: Option<&str>, stats: &FaultStats) -> Option<Plan> {
        if (self.delay.is_none() && self.abort.is_none() && self.throttle.is_none()) || !self.applies(head, cluster) {
            return None;
        }
        let delay = self.draw_delay(head.headers);
        let abort = self.draw_abort(head.headers);
        let throttle_kbps = self.draw_throttle(head.headers);
        if delay.is_none() && abort.is_none() && throttle_kbps.is_none() {
            return None;
        }
        // The gauge sums every worker's count: the faults in progress across the proxy, as Envoy counts them.
        let prior = u64::try_from(stats.active_faults.value()).unwrap_or(0);
        stats.active_faults.inc();
        let active = ActiveFault(stats.active_faults.clone());
        if self.max_active_faults.is_some_and(|max| prior >= max) {
            stats.faults_overflow.inc();
            return None;
        }
        if delay.is_some() {
            stats.delays_injected.inc();
            if self.downstream_cluster_stats {
                stats.downstream(head.headers, "delays_injected");
            }
        }
        if abort.is_some() {
            stats.aborts_injected.inc();
            if self.downstream_cluster_stats {
                stats.downstream(head.headers, "aborts_injected");
            }
        }
        if throttle_kbps.is_some() {
            stats.response_rl_injected.inc();
        }
        Some(Plan { delay, abort, throttle_kbps, active })
    }
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<FaultConfig, String> {
        let msg = crate::config::proto::parse_dynamic(yaml, crate::config::proto::Format::Yaml, TYPE_HTTP_FAULT)
            .map_err(|e| e.to_string())?;
        let f: fpb::HttpFault = crate::config::proto::decode(&msg).map_err(|e| e.to_string())?;
        FaultConfig::from_proto(&f, "fault").map_err(|e| e.to_string())
    }

    fn head<'a>(headers: &'a HeaderMap, uri: &'a http::Uri) -> RequestHead<'a> {
        static GET: http::Method = http::Method::GET;
        RequestHead { method: &GET, uri, authority: "x", headers }
    }

    #[test]
    fn fixed_faults_at_100_percent_always_apply_and_0_percent_never() {
        let stats = FaultStats::new(&Store::default(), "t");
        let uri: http::Uri = "/".parse().unwrap();
        let headers = HeaderMap::new();
        let always = parse(
            "{ delay: { fixed_delay: 0.01s, percentage: { numerator: 100 } }, \
             abort: { http_status: 418, percentage: { numerator: 1000000, denominator: MILLION } } }",
        )
        .unwrap();
        let plan = always.plan(&head(&headers, &uri), Some("c"), &stats).unwrap();
        assert_eq!(plan.delay, Some(Duration::from_millis(10)));
        assert_eq!(plan.abort, Some(AbortWith::Http(StatusCode::IM_A_TEAPOT)));
        drop(plan);
        let never = parse("{ abort: { http_status: 503 } }").unwrap();
        assert!(never.plan(&head(&headers, &uri), Some("c"), &stats).is_none(), "no percentage means 0%");
        assert_eq!(stats.aborts_injected.value(), 1);
        assert_eq!(stats.active_faults.value(), 0);
    }

    #[test]
    fn scope_and_header_controlled_faults_follow_envoy() {
        let stats = FaultStats::new(&Store::default(), "t");
        let uri: http::Uri = "/".parse().unwrap();
        let f = parse(
            "{ upstream_cluster: c, downstream_nodes: [ n1 ], \
             abort: { header_abort: {}, percentage: { numerator: 100 } } }",
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-envoy-fault-abort-request", "429".parse().unwrap());
        assert!(f.plan(&head(&headers, &uri), Some("c"), &stats).is_none(), "node not listed");
        headers.insert("x-envoy-downstream-service-node", "n1".parse().unwrap());
        assert!(f.plan(&head(&headers, &uri), Some("other"), &stats).is_none(), "another cluster");
        let plan = f.plan(&head(&headers, &uri), Some("c"), &stats).unwrap();
        assert_eq!(plan.abort, Some(AbortWith::Http(StatusCode::TOO_MANY_REQUESTS)));
        headers.insert("x-envoy-fault-abort-request-percentage", "0".parse().unwrap());
        assert!(f.plan(&head(&headers, &uri), Some("c"), &stats).is_none(), "the header lowers the percentage");
        headers.remove("x-envoy-fault-abort-request");
        headers.remove("x-envoy-fault-abort-request-percentage");
        headers.insert("x-envoy-fault-abort-grpc-request", "14".parse().unwrap());
        assert_eq!(f.plan(&head(&headers, &uri), Some("c"), &stats).unwrap().abort, Some(AbortWith::Grpc(14)));
    }

    #[test]
    fn response_rate_limits_are_drawn_like_other_faults() {
        let stats = FaultStats::new(&Store::default(), "t");
        let uri: http::Uri = "/".parse().unwrap();
        let mut headers = HeaderMap::new();
        let fixed =
            parse("{ response_rate_limit: { fixed_limit: { limit_kbps: 8 }, percentage: { numerator: 100 } } }")
                .unwrap();
        let plan = fixed.plan(&head(&headers, &uri), None, &stats).unwrap();
        assert_eq!((plan.delay, plan.abort, plan.throttle_kbps), (None, None, Some(8)));
        assert_eq!(stats.active_faults.value(), 1, "active while the body is throttled");
        drop(plan);
        let by_header = parse("{ response_rate_limit: { header_limit: {}, percentage: { numerator: 100 } } }").unwrap();
        assert!(by_header.plan(&head(&headers, &uri), None, &stats).is_none(), "no header, no limit");
        headers.insert("x-envoy-fault-throttle-response", "16".parse().unwrap());
        assert_eq!(by_header.plan(&head(&headers, &uri), None, &stats).unwrap().throttle_kbps, Some(16));
        headers.insert("x-envoy-fault-throttle-response-percentage", "0".parse().unwrap());
        assert!(by_header.plan(&head(&headers, &uri), None, &stats).is_none(), "the header lowers the percentage");
        assert_eq!(stats.response_rl_injected.value(), 2);
    }

    #[test]
    fn max_active_faults_overflows() {
        let stats = FaultStats::new(&Store::default(), "t");
        let uri: http::Uri = "/".parse().unwrap();
        let headers = HeaderMap::new();
        let f = parse("{ max_active_faults: 1, delay: { fixed_delay: 1s, percentage: { numerator: 100 } } }").unwrap();
        let first = f.plan(&head(&headers, &uri), None, &stats).unwrap();
        assert!(f.plan(&head(&headers, &uri), None, &stats).is_none());
        assert_eq!(stats.faults_overflow.value(), 1);
        drop(first);
        assert!(f.plan(&head(&headers, &uri), None, &stats).is_some());
    }

    #[test]
    fn config_errors_name_the_field() {
        assert_eq!(
            parse("{ abort: { http_status: 99 } }").unwrap_err(),
            "fault.abort.http_status: must be in the range [200, 600)"
        );
        assert_eq!(
            parse("{ response_rate_limit: { fixed_limit: { limit_kbps: 0 } } }").unwrap_err(),
            "fault.response_rate_limit.fixed_limit.limit_kbps: must be at least 1"
        );
        assert_eq!(
            parse("{ delay: { percentage: { numerator: 1 } } }").unwrap_err(),
            "fault.delay: one of fixed_delay or header_delay is required"
        );
        assert!(parse("{}").is_ok());
    }
}
