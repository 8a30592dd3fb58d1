//! The admin server: Envoy's admin HTTP endpoints and the admin gRPC services (CSDS, reflection, health) on one
//! port, the bootstrap's `admin.address`.
//!
//! One port because that is what users already point tools at: a request whose `content-type` starts with
//! `application/grpc` goes to the gRPC services, everything else to the HTTP endpoints. HTTP/1.1 and HTTP/2
//! (prior knowledge, as grpcurl and Envoy's own admin clients speak it) are both served. The server runs on the main
//! runtime: handlers read the managers under their locks briefly and never hold a lock across an `.await`.
//!
//! As in Envoy, every endpoint that changes the server is POST only; a GET gets 405 and changes nothing.

pub mod certs;
pub mod clusters;
pub mod config_dump;
pub mod csds;
pub mod init_dump;
pub mod json;
pub mod logging;
pub mod memory;
pub mod stats;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use envoy_types::pb::envoy::admin::v3 as admin;
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::config::bootstrap::BootstrapConfig;
use crate::listener::manager::{ListenerManager, StopScope};
use crate::server::{Lifecycle, ServerState};
use crate::stats::Store;
use crate::upstream::ClusterManager;
use crate::xds::status::XdsStatus;
use logging::LogControl;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// What the admin endpoints read and act on: the server's shared state.
#[derive(Debug, Clone)]
pub struct Context {
    pub listeners: Arc<Mutex<ListenerManager>>,
    pub clusters: Arc<Mutex<ClusterManager>>,
    pub stats: Store,
    pub bootstrap: Arc<BootstrapConfig>,
    pub status: XdsStatus,
    pub lifecycle: Arc<Lifecycle>,
    /// What /server_info reports as the command line.
    pub command_line: admin::CommandLineOptions,
    /// None when the process has no reloadable log subscriber (an in-process server in tests).
    pub logging: Option<LogControl>,
    /// The scope of a graceful /drain_listeners already under way: a repeat of it is a no-op, as in Envoy.
    draining: Arc<Mutex<Option<StopScope>>>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        listeners: Arc<Mutex<ListenerManager>>,
        clusters: Arc<Mutex<ClusterManager>>,
        stats: Store,
        bootstrap: Arc<BootstrapConfig>,
        status: XdsStatus,
        lifecycle: Arc<Lifecycle>,
        command_line: admin::CommandLineOptions,
        logging: Option<LogControl>,
    ) -> Self {
        Context {
            listeners,
            clusters,
            stats,
            bootstrap,
            status,
            lifecycle,
            command_line,
            logging,
            draining: Arc::default(),
        }
    }

    fn listener_manager(&self) -> MutexGuard<'_, ListenerManager> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cluster_manager(&self) -> MutexGuard<'_, ClusterManager> {
        self.clusters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_static_cluster(&self, name: &str) -> bool {
        self.bootstrap.clusters.iter().any(|c| c.name == name)
    }
}

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin.address: cannot listen on {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("admin socket: {0}")]
    Socket(std::io::Error),
    #[error(transparent)]
    Grpc(#[from] csds::GrpcError),
}

/// Binds the admin address on the control thread, so that a taken port fails start-up with a clear message.
pub fn bind(address: SocketAddr) -> Result<std::net::TcpListener, AdminError> {
    let l = std::net::TcpListener::bind(address).map_err(|source| AdminError::Bind { address, source })?;
    l.set_nonblocking(true).map_err(|source| AdminError::Bind { address, source })?;
    Ok(l)
}

/// Serves until `stop` is cancelled. Must run on a tokio runtime.
pub async fn serve(listener: std::net::TcpListener, ctx: Context, stop: CancellationToken) -> Result<(), AdminError> {
    let listener = TcpListener::from_std(listener).map_err(AdminError::Socket)?;
    let grpc = csds::routes(ctx.clone())?;
    if let Ok(address) = listener.local_addr() {
        info!(%address, "admin address");
    }
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return Ok(()),
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends pass; a short pause keeps a full descriptor table from spinning the loop.
                warn!("admin accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (ctx, grpc, stop) = (ctx.clone(), grpc.clone(), stop.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (ctx, grpc) = (ctx.clone(), grpc.clone());
                async move { Ok::<_, Infallible>(handle(ctx, grpc, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!("admin connection: {e}") },
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

async fn handle(ctx: Context, grpc: tonic::service::Routes, req: Request<Incoming>) -> Response<Body> {
    if is_grpc(&req) {
        let resp = match grpc.oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
        return resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let reply = http(&ctx, &method, &path, &query);
    debug!(%method, %path, status = reply.code, "admin request");
    reply.into_response()
}

/// One admin URL: Envoy's prefix, help text, whether it changes the server (POST only) and its parameters.
struct Endpoint {
    prefix: &'static str,
    help: &'static str,
    mutates: bool,
    params: &'static [(&'static str, &'static str)],
}

/// Envoy's admin endpoints this proxy serves, plus `/explain`, sorted as `/help` prints them.
const ENDPOINTS: &[Endpoint] = &[
    Endpoint { prefix: "/", help: "Admin home page", mutates: false, params: &[] },
    Endpoint { prefix: "/certs", help: "print certs on machine", mutates: false, params: &[] },
    Endpoint {
        prefix: "/clusters",
        help: "upstream cluster status",
        mutates: false,
        params: &[("format", "File format to use; One of (text, json)")],
    },
    Endpoint {
        prefix: "/config_dump",
        help: "dump current Envoy configs (experimental)",
        mutates: false,
        params: &[
            ("resource", "The resource to dump"),
            (
                "mask",
                "The mask to apply. When both resource and mask are specified, the mask is applied to every element \
                 in the desired repeated field so that only a subset of fields are returned. The mask is parsed as a \
                 ProtobufWkt::FieldMask",
            ),
            (
                "name_regex",
                "Dump only the currently loaded configurations whose names match the specified regex. Can be used \
                 with both resource and mask query parameters.",
            ),
            (
                "include_eds",
                "Dump currently loaded configuration including EDS. See the response definition for more information",
            ),
        ],
    },
    Endpoint {
        prefix: "/drain_listeners",
        help: "drain listeners",
        mutates: true,
        params: &[
            (
                "graceful",
                "When draining listeners, enter a graceful drain period prior to closing listeners. This behaviour \
                 and duration is configurable via server options or CLI",
            ),
            (
                "skip_exit",
                "When draining listeners, do not exit after the drain period. This must be used with graceful",
            ),
            (
                "inboundonly",
                "Drains all inbound listeners. traffic_direction field in envoy_v3_api_msg_config.listener.v3.Listener \
                 is used to determine whether a listener is inbound or outbound.",
            ),
        ],
    },
    Endpoint {
        prefix: "/explain",
        help: "which filter chain a connection would take, and why (xds-proxy)",
        mutates: false,
        params: &[
            ("listener", "The listener that accepts the connection, e.g. virtualOutbound"),
            ("dst", "Where the client connected to (the original destination), ip:port"),
            ("src", "The client's address, ip:port (default 127.0.0.1:40000)"),
            ("sni", "Server name from the TLS ClientHello"),
            ("transport", "tls or raw_buffer (default raw_buffer)"),
            ("alpn", "ALPN values in the client's order, comma separated"),
        ],
    },
    Endpoint {
        prefix: "/healthcheck/fail",
        help: "cause the server to fail health checks",
        mutates: true,
        params: &[],
    },
    Endpoint { prefix: "/healthcheck/ok", help: "cause the server to pass health checks", mutates: true, params: &[] },
    Endpoint { prefix: "/help", help: "print out list of admin commands", mutates: false, params: &[] },
    Endpoint {
        prefix: "/init_dump",
        help: "dump current Envoy init manager information (experimental)",
        mutates: false,
        params: &[(
            "mask",
            "The desired component to dump unready targets. The mask is parsed as a ProtobufWkt::FieldMask. For \
             example, get the unready targets of all listeners with /init_dump?mask=listener`",
        )],
    },
    Endpoint {
        prefix: "/listeners",
        help: "print listener info",
        mutates: false,
        params: &[("format", "File format to use; One of (text, json)")],
    },
    Endpoint {
        prefix: "/logging",
        help: "query/change logging levels",
        mutates: true,
        params: &[
            (
                "paths",
                "Change multiple logging levels by setting to <logger_name1>:<desired_level1>,\
                 <logger_name2>:<desired_level2>.",
            ),
            (
                "level",
                "desired logging level, this will change all loggers's level; One of (, trace, debug, info, warning, \
                 error, critical, off)",
            ),
        ],
    },
    Endpoint { prefix: "/memory", help: "print current allocation/heap usage", mutates: false, params: &[] },
    Endpoint { prefix: "/quitquitquit", help: "exit the server", mutates: true, params: &[] },
    Endpoint {
        prefix: "/ready",
        help: "print server state, return 200 if LIVE, otherwise return 503",
        mutates: false,
        params: &[],
    },
    Endpoint { prefix: "/reset_counters", help: "reset all counters to zero", mutates: true, params: &[] },
    Endpoint { prefix: "/runtime", help: "print runtime values", mutates: false, params: &[] },
    Endpoint { prefix: "/server_info", help: "print server version/status information", mutates: false, params: &[] },
    Endpoint {
        prefix: "/stats",
        help: "print server stats",
        mutates: false,
        params: &[
            ("usedonly", "Only include stats that have been written by system since restart"),
            ("filter", "Regular expression (Google re2) for filtering stats"),
            ("format", "Format to use; One of (text, json, prometheus)"),
            ("type", "Stat types to include.; One of (All, Counters, Histograms, Gauges)"),
        ],
    },
    Endpoint {
        prefix: "/stats/prometheus",
        help: "print server stats in prometheus format",
        mutates: false,
        params: &[
            ("usedonly", "Only include stats that have been written by system since restart"),
            ("filter", "Regular expression (Google re2) for filtering stats"),
        ],
    },
];

/// Envoy's `/help` text.
pub fn help() -> String {
    let mut out = String::from("admin commands are:\n");
    for e in ENDPOINTS {
        let post = if e.mutates { " (POST)" } else { "" };
        let _ = writeln!(out, "  {}{post}: {}", e.prefix, e.help);
        for (id, help) in e.params {
            let _ = writeln!(out, "      {id}: {help}");
        }
    }
    out
}

/// A finished admin response.
struct Reply {
    code: u16,
    content_type: &'static str,
    body: String,
}

const TEXT: &str = "text/plain; charset=UTF-8";
const JSON: &str = "application/json";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=UTF-8";

impl Reply {
    fn text(code: u16, body: impl Into<String>) -> Reply {
        Reply { code, content_type: TEXT, body: body.into() }
    }

    /// Compact, as Envoy writes `/stats?format=json`.
    fn json(v: &serde_json::Value) -> Reply {
        Reply { code: 200, content_type: JSON, body: v.to_string() }
    }

    fn message<T: prost::Message>(msg: &T, full_name: &str, always_print_primitive_fields: bool) -> Reply {
        match json::message_text(msg, full_name, always_print_primitive_fields) {
            Ok(body) => Reply { code: 200, content_type: JSON, body },
            Err(e) => Reply::text(500, format!("{e}\n")),
        }
    }

    fn into_response(self) -> Response<Body> {
        let body = http_body_util::Full::new(Bytes::from(self.body)).map_err(|never| match never {}).boxed_unsync();
        let mut resp = Response::new(body);
        *resp.status_mut() = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, max-age=0"));
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        resp
    }
}

/// Query parameters in order, percent-decoded (`+` stays a `+`, as in Envoy: it is a regex character in filters).
fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn flag(q: &[(String, String)], name: &str) -> bool {
    q.iter().any(|(k, _)| k == name)
}

fn http(ctx: &Context, method: &Method, path: &str, q: &[(String, String)]) -> Reply {
    let Some(endpoint) = ENDPOINTS.iter().find(|e| e.prefix == path) else {
        return Reply::text(404, format!("invalid path. {}", help()));
    };
    // Listing the log levels changes nothing, so a plain GET /logging is let through; setting them needs POST.
    let read_only_logging = path == "/logging" && q.is_empty();
    if endpoint.mutates && method != Method::POST && !read_only_logging {
        warn!("admin path \"{path}\" mutates state, method={method} rather than POST");
        return Reply::text(405, format!("Method {method} not allowed, POST required."));
    }
    match path {
        "/" | "/help" => Reply::text(200, help()),
        "/ready" => ready(ctx),
        "/server_info" => server_info(ctx),
        "/listeners" => listeners(ctx, q),
        "/config_dump" => config_dump(ctx, q),
        "/certs" => Reply::message(&certs::certificates(ctx), "envoy.admin.v3.Certificates", false),
        "/clusters" => clusters(ctx, q),
        "/stats" => stats(ctx, q, param(q, "format")),
        "/stats/prometheus" => stats(ctx, q, Some("prometheus")),
        "/reset_counters" => {
            ctx.stats.reset_counters();
            Reply::text(200, "OK\n")
        }
        "/healthcheck/fail" => {
            ctx.lifecycle.fail_health_check(true);
            Reply::text(200, "OK\n")
        }
        "/healthcheck/ok" => {
            ctx.lifecycle.fail_health_check(false);
            Reply::text(200, "OK\n")
        }
        "/quitquitquit" => {
            info!("shutdown requested by /quitquitquit");
            ctx.lifecycle.request_quit();
            Reply::text(200, "OK\n")
        }
        "/drain_listeners" => drain_listeners(ctx, q),
        "/logging" => log_levels(ctx, q),
        "/explain" => explain(ctx, q),
        "/memory" => Reply::message(&memory::measure(), "envoy.admin.v3.Memory", true),
        // Envoy's answer without a layered_runtime in the bootstrap (ours refuses one): no layers, no entries.
        "/runtime" => Reply::json(&serde_json::json!({ "layers": [], "entries": {} })),
        "/init_dump" => {
            let warming = ctx.listener_manager().warming_listeners();
            let clusters = ctx.cluster_manager().published().load_full();
            let dump = init_dump::dump(&warming, &clusters, param(q, "mask").filter(|m| !m.is_empty()));
            Reply::message(&dump, "envoy.admin.v3.UnreadyTargetsDumps", false)
        }
        _ => Reply::text(404, format!("invalid path. {}", help())),
    }
}

fn ready(ctx: &Context) -> Reply {
    let state = ctx.lifecycle.state();
    Reply::text(if state == ServerState::Live { 200 } else { 503 }, format!("{}\n", state.name()))
}

/// The version string in Envoy's shape (`<revision>/<version>/<status>/<build type>/<TLS library>`), which tools
/// split on `/` to find the version.
fn version() -> String {
    let build = if cfg!(debug_assertions) { "DEBUG" } else { "RELEASE" };
    format!("xds-proxy/{}/Clean/{build}/none", env!("CARGO_PKG_VERSION"))
}

fn server_info(ctx: &Context) -> Reply {
    let uptime = SystemTime::now().duration_since(ctx.lifecycle.started()).unwrap_or_default();
    let uptime = ProtoDuration { seconds: uptime.as_secs() as i64, nanos: 0 };
    let info = admin::ServerInfo {
        version: version(),
        state: ctx.lifecycle.state().admin_state() as i32,
        uptime_current_epoch: Some(uptime),
        uptime_all_epochs: Some(uptime),
        hot_restart_version: "disabled".to_string(),
        command_line_options: Some(ctx.command_line.clone()),
        node: Some(ctx.bootstrap.node.clone()),
        hot_restart_initializing: false,
    };
    Reply::message(&info, "envoy.admin.v3.ServerInfo", true)
}

fn listeners(ctx: &Context, q: &[(String, String)]) -> Reply {
    let all = ctx.listener_manager().listeners();
    if param(q, "format") == Some("json") {
        let statuses = all
            .iter()
            .map(|l| admin::ListenerStatus {
                name: l.name.clone(),
                local_address: Some(clusters::socket_address(l.address)),
                ..Default::default()
            })
            .collect();
        return Reply::message(&admin::Listeners { listener_statuses: statuses }, "envoy.admin.v3.Listeners", false);
    }
    let mut out = String::new();
    for l in all {
        let _ = writeln!(out, "{}::{}", l.name, l.address);
    }
    Reply::text(200, out)
}

fn config_dump(ctx: &Context, q: &[(String, String)]) -> Reply {
    let name_regex = match param(q, "name_regex").filter(|r| !r.is_empty()) {
        None => None,
        Some(re) => match regex::Regex::new(re) {
            Ok(r) => Some(r),
            Err(e) => return Reply::text(400, format!("Error while parsing name_regex from {re}: {e}")),
        },
    };
    let params = config_dump::Params {
        resource: param(q, "resource").filter(|r| !r.is_empty()).map(str::to_string),
        mask: param(q, "mask").filter(|m| !m.is_empty()).map(str::to_string),
        name_regex,
        include_eds: flag(q, "include_eds"),
    };
    match config_dump::dump(ctx, &params) {
        Ok(dump) => Reply::message(&dump, "envoy.admin.v3.ConfigDump", false),
        Err(refused) => Reply::text(refused.code, refused.text),
    }
}

fn clusters(ctx: &Context, q: &[(String, String)]) -> Reply {
    use crate::config::cluster::ClusterKind;
    let all: Vec<_> = {
        let cm = ctx.cluster_manager();
        cm.names().iter().filter_map(|n| cm.get(n)).collect()
    };
    let eds: std::collections::HashMap<String, _> = ctx.status.resources(crate::xds::ENDPOINT).into_iter().collect();
    let entries: Vec<clusters::Entry> = all
        .into_iter()
        .map(|cluster| {
            let la = match &cluster.config.kind {
                ClusterKind::Eds { service_name } => eds
                    .get(service_name)
                    .and_then(|s| s.resource.as_ref())
                    .and_then(|h| prost::Message::decode(h.to_any().value.as_slice()).ok()),
                _ => cluster.config.proto.load_assignment.clone(),
            };
            clusters::Entry {
                added_via_api: !ctx.is_static_cluster(cluster.name()),
                placement: la.as_ref().map(clusters::placement).unwrap_or_default(),
                cluster,
            }
        })
        .collect();
    if param(q, "format") == Some("json") {
        return Reply::message(&clusters::json(&entries), "envoy.admin.v3.Clusters", false);
    }
    Reply::text(200, clusters::text(&entries))
}

fn stats(ctx: &Context, q: &[(String, String)], format: Option<&str>) -> Reply {
    let filter = match param(q, "filter").filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => match regex::Regex::new(f) {
            Ok(r) => Some(r),
            Err(e) => return Reply::text(400, format!("Invalid re2 regex: {e}\n")),
        },
    };
    let kind = match param(q, "type").unwrap_or("All") {
        "All" => stats::Kind::All,
        "Counters" => stats::Kind::Counters,
        "Gauges" => stats::Kind::Gauges,
        "Histograms" => stats::Kind::Histograms,
        other => return Reply::text(400, format!("invalid type: {other}\n")),
    };
    let select = stats::Select { used_only: flag(q, "usedonly"), filter, kind };
    {
        let cm = ctx.cluster_manager();
        for cluster in cm.names().iter().filter_map(|n| cm.get(n)) {
            cluster.publish_breakers();
        }
    }
    let snapshot = ctx.stats.stats();
    match format.unwrap_or("text") {
        "text" => Reply::text(200, stats::text(&snapshot, &select)),
        "json" => Reply::json(&stats::json(&snapshot, &select)),
        "prometheus" => Reply { code: 200, content_type: PROMETHEUS, body: stats::prometheus(&snapshot, &select) },
        other => Reply::text(404, format!("usage: /stats?format=(text|json|prometheus); unknown format {other}\n")),
    }
}

fn drain_listeners(ctx: &Context, q: &[(String, String)]) -> Reply {
    let scope = if flag(q, "inboundonly") { StopScope::InboundOnly } else { StopScope::All };
    let graceful = flag(q, "graceful");
    let skip_exit = flag(q, "skip_exit");
    if graceful {
        let mut draining = ctx.draining.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(
            (*draining, scope),
            (Some(StopScope::All), _) | (Some(StopScope::InboundOnly), StopScope::InboundOnly)
        ) {
            return Reply::text(200, "OK\n");
        }
        *draining = Some(scope);
    }
    let mut lm = ctx.listener_manager();
    info!(?scope, graceful, skip_exit, "draining listeners (admin)");
    lm.drain_connections(scope);
    if skip_exit {
        return Reply::text(200, "OK\n");
    }
    if graceful {
        // Listeners keep accepting for the drain time (there is no other version to take new connections), then stop.
        let drain_time = lm.drain_settings().drain_time;
        let listeners = Arc::downgrade(&ctx.listeners);
        tokio::spawn(async move {
            tokio::time::sleep(drain_time).await;
            if let Some(lm) = listeners.upgrade() {
                lm.lock().unwrap_or_else(|p| p.into_inner()).stop_listeners(scope);
            }
        });
    } else {
        lm.stop_listeners(scope);
    }
    Reply::text(200, "OK\n")
}

fn log_levels(ctx: &Context, q: &[(String, String)]) -> Reply {
    let Some(control) = &ctx.logging else {
        return Reply::text(501, "log levels cannot be changed: this process has no reloadable log subscriber\n");
    };
    if q.is_empty() {
        return Reply::text(200, control.listing());
    }
    match control.change(q) {
        Ok(()) => {
            info!(change = ?q, "log levels changed");
            Reply::text(200, control.listing())
        }
        Err(e) => Reply::text(400, format!("error: {e}\n\n{}{}", logging::usage(), control.listing())),
    }
}

fn explain(ctx: &Context, q: &[(String, String)]) -> Reply {
    let usage = "usage: /explain?listener=<name>&dst=<ip:port>[&src=<ip:port>][&sni=<name>][&transport=tls|raw_buffer]\
                 [&alpn=a,b]\n";
    let (Some(listener), Some(dst)) = (param(q, "listener"), param(q, "dst").or_else(|| param(q, "destination")))
    else {
        return Reply::text(400, usage);
    };
    let parse = |what: &str, v: &str| v.parse::<SocketAddr>().map_err(|e| format!("{what}: '{v}': {e}\n{usage}"));
    let destination = match parse("dst", dst) {
        Ok(a) => a,
        Err(e) => return Reply::text(400, e),
    };
    let source = match param(q, "src").or_else(|| param(q, "source")).map(|s| parse("src", s)) {
        None => SocketAddr::from(([127, 0, 0, 1], 40000)),
        Some(Ok(a)) => a,
        Some(Err(e)) => return Reply::text(400, e),
    };
    let query = crate::listener::explain::Query {
        listener: listener.to_string(),
        destination,
        source,
        server_name: param(q, "sni").filter(|s| !s.is_empty()).map(str::to_string),
        transport: param(q, "transport").unwrap_or("raw_buffer").to_string(),
        alpn: param(q, "alpn")
            .map(|a| a.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
            .unwrap_or_default(),
    };
    let configs: Vec<crate::config::listener::ListenerConfig> =
        ctx.listener_manager().active_listeners().iter().map(|l| (*l.core.config).clone()).collect();
    match crate::listener::explain::explain(&configs, &query) {
        Ok(text) => Reply::text(200, text),
        Err(e) => Reply::text(404, format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_post_endpoints_as_envoy_does() {
        let h = help();
        assert!(h.starts_with("admin commands are:\n  /: Admin home page\n"), "{h}");
        assert!(h.contains("  /quitquitquit (POST): exit the server\n"));
        assert!(h.contains("      usedonly: Only include stats that have been written by system since restart\n"));
        let prefixes: Vec<&str> = ENDPOINTS.iter().map(|e| e.prefix).collect();
        let mut sorted = prefixes.clone();
        sorted.sort_unstable();
        assert_eq!(prefixes, sorted);
    }

    #[test]
    fn queries_decode_percent_but_keep_plus() {
        let q = parse_query(Some("usedonly&filter=%5E(server%5C.state%7Ca+b)&format=json"));
        assert_eq!(
            q,
            [("usedonly", ""), ("filter", r"^(server\.state|a+b)"), ("format", "json")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }
}
