//! TEMPORARY stand-in for the route table (being written separately); same API, prefix matching only.

use std::borrow::Cow;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3 as rpb;

use crate::config::ConfigError;

#[derive(Debug)]
pub struct RouteTable {
    name: String,
    vhosts: Vec<VirtualHost>,
}

#[derive(Debug)]
pub struct VirtualHost {
    domains: Vec<String>,
    routes: Vec<Route>,
}

#[derive(Debug)]
pub struct Route {
    prefix: String,
    action: Action,
}

#[derive(Debug)]
pub enum Action {
    Route(RouteAction),
    Redirect(Redirect),
    DirectResponse { status: http::StatusCode, body: Vec<u8> },
}

#[derive(Debug)]
pub struct Redirect;
impl Redirect {
    pub fn location(&self, _scheme: &str, _authority: &str, path_and_query: &str) -> String {
        path_and_query.to_string()
    }
    pub fn status(&self) -> http::StatusCode {
        http::StatusCode::MOVED_PERMANENTLY
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub connect_failure: bool,
    pub reset: bool,
    pub retriable_status_codes: bool,
    pub refused_stream: bool,
}

#[derive(Debug)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub avoid_previous_hosts: bool,
}

impl RetryPolicy {
    pub fn should_retry_status(&self, status: u16) -> bool {
        (self.retry_on.five_xx && status >= 500)
            || (self.retry_on.gateway_error && matches!(status, 502..=504))
            || (self.retry_on.retriable_status_codes && self.retriable_status_codes.contains(&status))
    }
}

#[derive(Debug)]
pub enum HostRewrite {
    None,
    Literal(String),
    Auto,
}

#[derive(Debug)]
pub enum ClusterSpecifier {
    Cluster(String),
}

#[derive(Debug)]
pub struct RouteAction {
    pub cluster: ClusterSpecifier,
    pub timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub retry_policy: Option<RetryPolicy>,
    pub host_rewrite: HostRewrite,
}

pub struct RequestHead<'a> {
    pub method: &'a http::Method,
    pub uri: &'a http::Uri,
    pub authority: &'a str,
    pub headers: &'a http::HeaderMap,
}

pub struct Matched<'a> {
    pub vhost: &'a VirtualHost,
    pub route: &'a Route,
}

impl RouteTable {
    pub fn new(rc: &rpb::RouteConfiguration) -> Result<RouteTable, ConfigError> {
        let mut vhosts = Vec::new();
        for v in &rc.virtual_hosts {
            let mut routes = Vec::new();
            for r in &v.routes {
                let prefix = match r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()) {
                    Some(rpb::route_match::PathSpecifier::Prefix(p)) => p.clone(),
                    _ => return Err(ConfigError::new("match", "stub")),
                };
                let action = match &r.action {
                    Some(rpb::route::Action::Route(ra)) => match &ra.cluster_specifier {
                        Some(rpb::route_action::ClusterSpecifier::Cluster(c)) => Action::Route(RouteAction {
                            cluster: ClusterSpecifier::Cluster(c.clone()),
                            timeout: Some(Duration::from_secs(15)),
                            idle_timeout: None,
                            retry_policy: None,
                            host_rewrite: HostRewrite::None,
                        }),
                        _ => return Err(ConfigError::new("route", "stub")),
                    },
                    Some(rpb::route::Action::DirectResponse(d)) => Action::DirectResponse {
                        status: http::StatusCode::from_u16(d.status as u16).unwrap_or(http::StatusCode::OK),
                        body: match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                            Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(s)) => {
                                s.clone().into_bytes()
                            }
                            _ => Vec::new(),
                        },
                    },
                    _ => return Err(ConfigError::new("action", "stub")),
                };
                routes.push(Route { prefix, action });
            }
            vhosts.push(VirtualHost { domains: v.domains.clone(), routes });
        }
        Ok(RouteTable { name: rc.name.clone(), vhosts })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn cluster_names(&self) -> impl Iterator<Item = &str> {
        self.vhosts.iter().flat_map(|v| v.routes.iter()).filter_map(|r| match &r.action {
            Action::Route(RouteAction { cluster: ClusterSpecifier::Cluster(c), .. }) => Some(c.as_str()),
            _ => None,
        })
    }

    pub fn route<'a>(&'a self, req: &RequestHead<'_>) -> Option<Matched<'a>> {
        let host = req.authority.to_ascii_lowercase();
        let vhost = self
            .vhosts
            .iter()
            .find(|v| v.domains.iter().any(|d| *d == host || d.strip_suffix(":*").is_some_and(|d| host.starts_with(d))))
            .or_else(|| self.vhosts.iter().find(|v| v.domains.iter().any(|d| d == "*")))?;
        let route = vhost.routes.iter().find(|r| req.uri.path().starts_with(&r.prefix))?;
        Some(Matched { vhost, route })
    }
}

impl Matched<'_> {
    pub fn action(&self) -> &Action {
        &self.route.action
    }
    pub fn rewritten_path(&self, _original: &str) -> Option<String> {
        None
    }
    pub fn apply_request_headers(&self, _headers: &mut http::HeaderMap) {}
    pub fn apply_response_headers(&self, _headers: &mut http::HeaderMap) {}
    pub fn cluster_name<'h>(&'h self, _headers: &'h http::HeaderMap) -> Option<Cow<'h, str>> {
        match &self.route.action {
            Action::Route(RouteAction { cluster: ClusterSpecifier::Cluster(c), .. }) => Some(Cow::Borrowed(c)),
            _ => None,
        }
    }
}
