//! Envoy's CORS filter (`envoy.filters.http.cors`): compiles a route's or virtual host's CORS policy (the `cors`
//! field Istio 1.14 sends, or a `CorsPolicy` in `typed_per_filter_config`) and applies it as Envoy does. A request
//! with an `Origin` the policy allows is a CORS request: a preflight (`OPTIONS` with
//! `Access-Control-Request-Method`) is answered by the proxy with the policy's `Access-Control-Allow-*` headers, and
//! any other request goes on and its response gets `Access-Control-Allow-Origin` (and `-Credentials`,
//! `-Expose-Headers`). A request whose origin is not allowed passes untouched.

use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3 as cpb;
use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher as StringMatcherPb;
use envoy_types::pb::google::protobuf::BoolValue;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};

use super::route::StringMatcher;
use crate::config::{ConfigError, join};
use crate::stats::{Counter, Store};

pub const TYPE_CORS_POLICY: &str = "envoy.extensions.filters.http.cors.v3.CorsPolicy";

/// A compiled CORS policy.
#[derive(Debug)]
pub struct CorsPolicy {
    origins: Vec<StringMatcher>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    /// `filter_enabled` as a fraction (numerator, denominator); Envoy's default is 100%.
    enabled: (u64, u64),
    /// `forward_not_matching_preflights` (default true): a preflight from an origin the policy does not allow goes
    /// upstream; false, the filter answers it, without `access-control-allow-origin`.
    forward_not_matching_preflights: bool,
}

/// The fields the route's `CorsPolicy` and the filter's per-route `CorsPolicy` share.
struct Fields<'a> {
    origins: &'a [StringMatcherPb],
    allow_methods: &'a str,
    allow_headers: &'a str,
    expose_headers: &'a str,
    max_age: &'a str,
    allow_credentials: Option<&'a BoolValue>,
    filter_enabled: Option<&'a RuntimeFractionalPercent>,
    shadow_enabled: Option<&'a RuntimeFractionalPercent>,
    allow_private_network_access: Option<&'a BoolValue>,
    forward_not_matching_preflights: Option<&'a BoolValue>,
}

/// The shared fields of either proto's `CorsPolicy` (two types with the same field names).
macro_rules! fields {
    ($c:expr, $enabled:expr) => {
        Fields {
            origins: &$c.allow_origin_string_match,
            allow_methods: &$c.allow_methods,
            allow_headers: &$c.allow_headers,
            expose_headers: &$c.expose_headers,
            max_age: &$c.max_age,
            allow_credentials: $c.allow_credentials.as_ref(),
            filter_enabled: $enabled,
            shadow_enabled: $c.shadow_enabled.as_ref(),
            allow_private_network_access: $c.allow_private_network_access.as_ref(),
            forward_not_matching_preflights: $c.forward_not_matching_preflights.as_ref(),
        }
    };
}

impl CorsPolicy {
    /// The `cors` field of a route action or virtual host.
    pub fn from_route(c: &rpb::CorsPolicy, path: &str) -> Result<Self, ConfigError> {
        use rpb::cors_policy::EnabledSpecifier;
        let enabled = c.enabled_specifier.as_ref().map(|EnabledSpecifier::FilterEnabled(e)| e);
        Self::new(&fields!(c, enabled), path)
    }

    /// A `CorsPolicy` from a `typed_per_filter_config`.
    pub fn from_filter(c: &cpb::CorsPolicy, path: &str) -> Result<Self, ConfigError> {
        Self::new(&fields!(c, c.filter_enabled.as_ref()), path)
    }

    fn new(f: &Fields<'_>, path: &str) -> Result<Self, ConfigError> {
        if f.shadow_enabled.is_some() {
            return Err(ConfigError::new(join(path, "shadow_enabled"), "shadow_enabled is not supported"));
        }
        if f.allow_private_network_access.is_some_and(|v| v.value) {
            return Err(ConfigError::new(
                join(path, "allow_private_network_access"),
                "allow_private_network_access is not supported",
            ));
        }
        let origins = f
            .origins
            .iter()
            .enumerate()
            .map(|(i, m)| StringMatcher::new(m, &join(path, &format!("allow_origin_string_match[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        let value = |v: &str, field: &str| -> Result<Option<HeaderValue>, ConfigError> {
            if v.is_empty() {
                return Ok(None);
            }
            HeaderValue::from_str(v)
                .map(Some)
                .map_err(|_| ConfigError::new(join(path, field), "not a valid header value"))
        };
        let enabled = match f.filter_enabled.and_then(|e| e.default_value.as_ref()) {
            None => (100, 100),
            Some(p) => {
                let denominator = match p.denominator {
                    1 => 10_000,
                    2 => 1_000_000,
                    _ => 100,
                };
                (u64::from(p.numerator).min(denominator), denominator)
            }
        };
        Ok(CorsPolicy {
            origins,
            allow_methods: value(f.allow_methods, "allow_methods")?,
            allow_headers: value(f.allow_headers, "allow_headers")?,
            expose_headers: value(f.expose_headers, "expose_headers")?,
            max_age: value(f.max_age, "max_age")?,
            allow_credentials: f.allow_credentials.is_some_and(|v| v.value),
            enabled,
            forward_not_matching_preflights: f.forward_not_matching_preflights.is_none_or(|v| v.value),
        })
    }

    /// Envoy's rule: allowed if a matcher matches the origin, or matches `*` (a wildcard policy).
    fn allows(&self, origin: &[u8]) -> bool {
        self.origins.iter().any(|m| m.matches(b"*") || m.matches(origin))
    }

    fn is_enabled(&self) -> bool {
        let (numerator, denominator) = self.enabled;
        numerator >= denominator || (numerator > 0 && rand::random_range(0..denominator) < numerator)
    }
}

/// `http.<stat_prefix>.cors.*`, Envoy's names.
#[derive(Debug)]
pub struct CorsStats {
    pub origin_valid: Counter,
    pub origin_invalid: Counter,
}

impl CorsStats {
    pub fn new(store: &Store, stat_prefix: &str) -> Self {
        let c = |n: &str| store.counter(&format!("http.{stat_prefix}.cors.{n}"));
        CorsStats { origin_valid: c("origin_valid"), origin_invalid: c("origin_invalid") }
    }
}

/// What the filter decided for one request.
pub enum Decision<'a> {
    /// Not a CORS request for this policy: nothing to do.
    Pass,
    /// A preflight from an allowed origin: the proxy answers it.
    Preflight(Response<()>),
    /// An allowed origin's request: its response gets these headers.
    Decorate { policy: &'a CorsPolicy, origin: HeaderValue },
}

static ACCESS_CONTROL_REQUEST_METHOD: HeaderName = header::ACCESS_CONTROL_REQUEST_METHOD;

/// Applies `policy` (the route's, else the virtual host's) to a request's method and headers.
pub fn decide<'a>(policy: &'a CorsPolicy, method: &Method, headers: &HeaderMap, stats: &CorsStats) -> Decision<'a> {
    let Some(origin) = headers.get(header::ORIGIN).filter(|o| !o.is_empty()) else { return Decision::Pass };
    if !policy.is_enabled() {
        return Decision::Pass;
    }
    let allowed = policy.allows(origin.as_bytes());
    if allowed { &stats.origin_valid } else { &stats.origin_invalid }.inc();
    let preflight =
        method == Method::OPTIONS && headers.get(&ACCESS_CONTROL_REQUEST_METHOD).is_some_and(|m| !m.is_empty());
    match (allowed, preflight) {
        (true, false) => return Decision::Decorate { policy, origin: origin.clone() },
        (false, false) => return Decision::Pass,
        (false, true) if policy.forward_not_matching_preflights => return Decision::Pass,
        (_, true) => {}
    }
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    // Envoy answers a preflight it does not forward with the policy's headers, naming the origin only if allowed.
    if allowed {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    }
    if policy.allow_credentials {
        h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    for (name, value) in [
        (header::ACCESS_CONTROL_ALLOW_METHODS, &policy.allow_methods),
        (header::ACCESS_CONTROL_ALLOW_HEADERS, &policy.allow_headers),
        (header::ACCESS_CONTROL_MAX_AGE, &policy.max_age),
    ] {
        if let Some(v) = value {
            h.insert(name, v.clone());
        }
    }
    Decision::Preflight(resp)
}

impl CorsPolicy {
    /// The headers an allowed origin's (non-preflight) response carries.
    pub fn decorate(&self, origin: HeaderValue, headers: &mut HeaderMap) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.allow_credentials {
            headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if let Some(v) = &self.expose_headers {
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Result<CorsPolicy, String> {
        let msg = crate::config::proto::parse_dynamic(
            yaml,
            crate::config::proto::Format::Yaml,
            "envoy.config.route.v3.CorsPolicy",
        )
        .map_err(|e| e.to_string())?;
        let c: rpb::CorsPolicy = crate::config::proto::decode(&msg).map_err(|e| e.to_string())?;
        CorsPolicy::from_route(&c, "cors").map_err(|e| e.to_string())
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn preflights_from_allowed_origins_are_answered_and_others_pass() {
        let stats = CorsStats::new(&Store::default(), "t");
        let p = policy(
            "{ allow_origin_string_match: [ { exact: 'https://a.example' } ], allow_methods: 'GET,POST', \
             allow_headers: x-a, max_age: '600', allow_credentials: true }",
        )
        .unwrap();
        let pre = headers(&[("origin", "https://a.example"), ("access-control-request-method", "POST")]);
        let Decision::Preflight(resp) = decide(&p, &Method::OPTIONS, &pre, &stats) else { panic!("not answered") };
        assert_eq!(resp.headers()["access-control-allow-origin"], "https://a.example");
        assert_eq!(resp.headers()["access-control-allow-methods"], "GET,POST");
        assert_eq!(resp.headers()["access-control-allow-headers"], "x-a");
        assert_eq!(resp.headers()["access-control-max-age"], "600");
        assert_eq!(resp.headers()["access-control-allow-credentials"], "true");
        let other = headers(&[("origin", "https://b.example"), ("access-control-request-method", "POST")]);
        assert!(matches!(decide(&p, &Method::OPTIONS, &other, &stats), Decision::Pass));
        assert!(matches!(decide(&p, &Method::GET, &HeaderMap::new(), &stats), Decision::Pass), "no origin");
        let get = headers(&[("origin", "https://a.example")]);
        assert!(matches!(decide(&p, &Method::GET, &get, &stats), Decision::Decorate { .. }));
        assert_eq!((stats.origin_valid.value(), stats.origin_invalid.value()), (2, 1));
    }

    /// Istio's `unmatchedPreflights: IGNORE`: a preflight from an origin not allowed is answered here (the policy's
    /// headers, no `access-control-allow-origin`) instead of going upstream; a plain request still passes.
    #[test]
    fn preflights_not_matching_are_answered_when_not_forwarded() {
        let stats = CorsStats::new(&Store::default(), "t");
        let p = policy(
            "{ allow_origin_string_match: [ { exact: 'https://a.example' } ], allow_methods: GET, \
             forward_not_matching_preflights: false }",
        )
        .unwrap();
        let other = headers(&[("origin", "https://b.example"), ("access-control-request-method", "POST")]);
        let Decision::Preflight(resp) = decide(&p, &Method::OPTIONS, &other, &stats) else { panic!("forwarded") };
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!resp.headers().contains_key("access-control-allow-origin"));
        assert_eq!(resp.headers()["access-control-allow-methods"], "GET");
        let get = headers(&[("origin", "https://b.example")]);
        assert!(matches!(decide(&p, &Method::GET, &get, &stats), Decision::Pass));
        assert_eq!(stats.origin_invalid.value(), 2);
    }

    #[test]
    fn a_wildcard_matcher_allows_every_origin_and_disabled_policies_pass() {
        let stats = CorsStats::new(&Store::default(), "t");
        let any = policy("{ allow_origin_string_match: [ { exact: '*' } ] }").unwrap();
        let get = headers(&[("origin", "https://z.example")]);
        assert!(matches!(decide(&any, &Method::GET, &get, &stats), Decision::Decorate { .. }));
        let off = policy(
            "{ allow_origin_string_match: [ { exact: '*' } ], filter_enabled: { default_value: { numerator: 0 } } }",
        )
        .unwrap();
        assert!(matches!(decide(&off, &Method::GET, &get, &stats), Decision::Pass));
        assert_eq!(
            policy("{ shadow_enabled: { default_value: { numerator: 1 } } }").unwrap_err(),
            "cors.shadow_enabled: shadow_enabled is not supported"
        );
    }
}
