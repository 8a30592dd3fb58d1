//! The admin port: Envoy's HTTP endpoints (formats, POST-only mutations), /config_dump with listeners in every
//! state, CSDS over tonic and through reflection alone (and grpcurl), Prometheus output through a parser, the
//! readiness sequence Istio's pilot-agent watches, and /drain_listeners, /logging and /quitquitquit on the binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::admin::v3::{
    ClientResourceStatus, ConfigDump, ListenersConfigDump, ServerInfo, listeners_config_dump::DynamicListener,
};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::status::v3::ClientStatusRequest;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use http_body_util::BodyExt;
use prost::Message;
use tokio::net::TcpStream;
use xds_proxy::config::proto::{self, Format};
use xds_proxy::xds::{CLUSTER, LISTENER};

use super::ads::{NODE, WAIT, acked, any, mock};
use crate::common::*;

const ADMIN: &str = "\nadmin: { address: { socket_address: { address: 127.0.0.1, port_value: 0 } } }\n";

/// One request to the admin port over HTTP/1.1: status and body.
async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let (status, _, body) = admin_full(addr, method, path).await;
    (status, body)
}

async fn admin_full(addr: SocketAddr, method: &str, path: &str) -> (u16, hyper::HeaderMap, String) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn get(addr: SocketAddr, path: &str) -> impl Future<Output = (u16, String)> {
    let path = path.to_string();
    async move { admin(addr, "GET", &path).await }
}

fn post(addr: SocketAddr, path: &str) -> impl Future<Output = (u16, String)> {
    let path = path.to_string();
    async move { admin(addr, "POST", &path).await }
}

fn parse_dump(text: &str) -> ConfigDump {
    proto::decode(
        &proto::parse_dynamic(text, Format::Json, "envoy.admin.v3.ConfigDump")
            .unwrap_or_else(|e| panic!("config_dump does not parse back: {e}\n{text}")),
    )
    .unwrap()
}

fn listeners_dump(dump: &ConfigDump) -> ListenersConfigDump {
    let any = dump.configs.iter().find(|a| a.type_url.ends_with("envoy.admin.v3.ListenersConfigDump")).unwrap();
    ListenersConfigDump::decode(any.value.as_slice()).unwrap()
}

fn listener_of(any: &Option<Any>) -> Listener {
    Listener::decode(any.as_ref().unwrap().value.as_slice()).unwrap()
}

fn static_bootstrap(up: SocketAddr, inbound: u16, outbound: u16) -> String {
    format!(
        r#"
node: {{ id: admin-test, cluster: test }}
static_resources:
  listeners:
  - name: inbound
    traffic_direction: INBOUND
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {inbound} }} }}
    filter_chains:
    - name: to-echo
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: inbound
          cluster: echo
  - name: outbound
    traffic_direction: OUTBOUND
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {outbound} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.direct_response
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config
          response: {{ inline_string: "out" }}
  clusters:{}
{ADMIN}"#,
        static_cluster("echo", &[up])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_in_envoys_formats_and_mutations_are_post_only() {
    let up = echo_server().await;
    let server = start(&static_bootstrap(up, free_port(), free_port()), Duration::from_millis(300)).await;
    let a = server.admin_address().expect("admin address");

    let (code, ready) = get(a, "/ready").await;
    assert_eq!((code, ready.as_str()), (200, "LIVE\n"));
    let (code, help) = get(a, "/help").await;
    assert_eq!(code, 200);
    for line in
        ["  /config_dump: dump current Envoy configs", "  /drain_listeners (POST): drain listeners", "  /explain:"]
    {
        assert!(help.contains(line), "{line} missing from:\n{help}");
    }
    let (code, body) = get(a, "/nosuch").await;
    assert_eq!(code, 404);
    assert!(body.starts_with("invalid path. admin commands are:\n"), "{body}");

    // Listeners: the real bound ports.
    let inbound = listener_addr(&server, "inbound");
    let outbound = listener_addr(&server, "outbound");
    assert_ne!(inbound.port(), 0);
    let (_, text) = get(a, "/listeners").await;
    assert_eq!(text, format!("inbound::{inbound}\noutbound::{outbound}\n"));
    let (_, headers, json) = admin_full(a, "GET", "/listeners?format=json").await;
    assert_eq!(headers["content-type"], "application/json");
    let parsed: envoy_types::pb::envoy::admin::v3::Listeners =
        proto::decode(&proto::parse_dynamic(&json, Format::Json, "envoy.admin.v3.Listeners").unwrap()).unwrap();
    assert_eq!(parsed.listener_statuses.len(), 2);
    assert!(json.contains(&format!("\"port_value\": {}", inbound.port())), "{json}");

    // /server_info parses back into Envoy's ServerInfo, with proto field names.
    let (_, info) = get(a, "/server_info").await;
    assert!(info.contains("\"uptime_current_epoch\""), "{info}");
    let info: ServerInfo =
        proto::decode(&proto::parse_dynamic(&info, Format::Json, "envoy.admin.v3.ServerInfo").unwrap()).unwrap();
    assert_eq!(info.state, envoy_types::pb::envoy::admin::v3::server_info::State::Live as i32);
    assert_eq!(info.node.map(|n| n.id), Some("admin-test".to_string()));

    // /clusters: Envoy's per-host lines.
    let (_, clusters) = get(a, "/clusters").await;
    for line in [
        "echo::default_priority::max_connections::1024".to_string(),
        "echo::added_via_api::false".to_string(),
        format!("echo::{up}::health_flags::healthy"),
        format!("echo::{up}::weight::1"),
        format!("echo::{up}::cx_active::0"),
    ] {
        assert!(clusters.lines().any(|l| l == line), "{line} missing from:\n{clusters}");
    }
    let (_, cj) = get(a, "/clusters?format=json").await;
    let cj: envoy_types::pb::envoy::admin::v3::Clusters =
        proto::decode(&proto::parse_dynamic(&cj, Format::Json, "envoy.admin.v3.Clusters").unwrap()).unwrap();
    assert_eq!(cj.cluster_statuses[0].host_statuses.len(), 1);

    // Traffic, then /stats in text and JSON, filtered.
    let mut s = TcpStream::connect(inbound).await.unwrap();
    assert!(echo_ok(&mut s, b"ping").await);
    drop(s);
    let stat = format!("listener.127.0.0.1_{}.downstream_cx_total", inbound.port());
    eventually("cx counted", WAIT, async || counter(&server, &stat) == 1).await;
    let (_, text) = get(a, "/stats").await;
    assert!(text.lines().any(|l| l == format!("{stat}: 1")), "{text}");
    // Envoy's names that only a mechanism we lack would move are there at 0 (see ListenerStats and TcpProxy::new).
    for zero in [
        format!("listener.127.0.0.1_{}.downstream_cx_overflow: 0", inbound.port()),
        "tcp.inbound.upstream_flush_total: 0".to_string(),
        "tcp.inbound.upstream_flush_active: 0".to_string(),
    ] {
        assert!(text.lines().any(|l| l == zero), "{zero} missing from:\n{text}");
    }
    // Counters and gauges sorted by name, then histograms (Envoy's order).
    let (scalars, histograms): (Vec<&str>, Vec<&str>) =
        text.lines().partition(|l| l.rsplit(": ").next().is_some_and(|v| v.parse::<i64>().is_ok()));
    let names: Vec<&str> = scalars.iter().map(|l| l.split(": ").next().unwrap()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "sorted by name");
    assert!(text.ends_with(&format!("{}\n", histograms.last().unwrap())), "histograms last:\n{text}");
    let length = format!("listener.127.0.0.1_{}.downstream_cx_length_ms", inbound.port());
    eventually("connection length recorded", WAIT, async || {
        get(a, "/stats").await.1.lines().any(|l| l.starts_with(&format!("{length}: P0(nan,")))
    })
    .await;
    let (_, used) = get(a, "/stats?usedonly").await;
    assert!(!used.contains("upstream_cx_connect_fail"), "never-incremented counters are not 'used':\n{used}");
    let (_, filtered) = get(a, "/stats?filter=downstream_cx_total$&format=json").await;
    let v: serde_json::Value = serde_json::from_str(&filtered).unwrap();
    let stats = v["stats"].as_array().unwrap();
    assert!(stats.iter().any(|s| s["name"] == stat.as_str() && s["value"] == 1), "{filtered}");
    assert!(stats.iter().all(|s| s["name"].as_str().unwrap().ends_with("downstream_cx_total")));
    let (code, _) = get(a, "/stats?filter=(").await;
    assert_eq!(code, 400, "a bad regex is the caller's error");

    // Mutations are POST only: a GET changes nothing.
    for path in [
        "/healthcheck/fail",
        "/healthcheck/ok",
        "/drain_listeners",
        "/quitquitquit",
        "/reset_counters",
        "/logging?level=debug",
    ] {
        let (code, body) = get(a, path).await;
        assert_eq!((code, body.as_str()), (405, "Method GET not allowed, POST required."), "{path}");
    }
    assert_eq!(get(a, "/ready").await.0, 200);
    assert_eq!(counter(&server, &stat), 1, "GET /reset_counters reset nothing");
    assert!(TcpStream::connect(inbound).await.is_ok(), "GET /drain_listeners drained nothing");

    // /reset_counters and /healthcheck.
    assert_eq!(post(a, "/reset_counters").await, (200, "OK\n".to_string()));
    assert_eq!(counter(&server, &stat), 0);
    let (_, used) = get(a, &format!("/stats?usedonly&filter={stat}")).await;
    assert_eq!(used, format!("{stat}: 0\n"), "a reset counter stays 'used'");
    assert_eq!(post(a, "/healthcheck/fail").await.0, 200);
    assert_eq!(get(a, "/ready").await, (503, "DRAINING\n".to_string()));
    assert_eq!(gauge(&server, "server.state"), 1);
    assert_eq!(post(a, "/healthcheck/ok").await.0, 200);
    assert_eq!(get(a, "/ready").await, (200, "LIVE\n".to_string()));

    // /logging without a reloadable subscriber (in-process): readable refusal.
    assert_eq!(post(a, "/logging?level=debug").await.0, 501);

    // /explain: the filter-chain decision for a described connection.
    let (code, why) = get(a, &format!("/explain?listener=inbound&dst={inbound}&src=10.0.0.9:5555")).await;
    assert_eq!(code, 200, "{why}");
    assert!(why.contains("listener 'inbound'") && why.contains("to-echo"), "{why}");
    assert_eq!(get(a, "/explain?listener=nosuch&dst=1.2.3.4:80").await.0, 404);
    assert_eq!(get(a, "/explain?listener=inbound").await.0, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_output_parses_with_envoys_names_and_tags() {
    let up = echo_server().await;
    let server = start(&static_bootstrap(up, free_port(), free_port()), Duration::from_millis(300)).await;
    let a = server.admin_address().unwrap();
    let inbound = listener_addr(&server, "inbound");
    let mut s = TcpStream::connect(inbound).await.unwrap();
    assert!(echo_ok(&mut s, b"ping").await);
    drop(s);
    let stat = format!("listener.127.0.0.1_{}.downstream_cx_total", inbound.port());
    eventually("cx counted", WAIT, async || counter(&server, &stat) == 1).await;

    let (code, headers, text) = admin_full(a, "GET", "/stats/prometheus").await;
    assert_eq!(code, 200);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    // Every line is a TYPE comment, a sample or a blank separator: nothing the parser would skip.
    for line in text.lines() {
        let info = prometheus_parse::LineInfo::parse(line);
        assert!(!matches!(info, prometheus_parse::LineInfo::Ignored), "unparsable line: {line:?}");
    }
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let find = |metric: &str, label: Option<(&str, &str)>| {
        scrape.samples.iter().find(|s| s.metric == metric && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
    };
    let cx = find(
        "envoy_listener_downstream_cx_total",
        Some(("envoy_listener_address", &format!("127.0.0.1_{}", inbound.port()))),
    )
    .unwrap_or_else(|| panic!("listener counter missing:\n{text}"));
    assert!(matches!(cx.value, prometheus_parse::Value::Counter(v) if v == 1.0), "{cx:?}");
    let state = find("envoy_server_state", None).unwrap();
    assert!(matches!(state.value, prometheus_parse::Value::Gauge(v) if v == 0.0));
    assert!(find("envoy_cluster_upstream_cx_total", Some(("envoy_cluster_name", "echo"))).is_some(), "{text}");
    assert!(find("envoy_tcp_downstream_cx_total", Some(("envoy_tcp_prefix", "inbound"))).is_some(), "{text}");
    assert!(text.contains("# TYPE envoy_server_state gauge\n"));
    let hist = scrape
        .samples
        .iter()
        .find(|s| s.metric == "envoy_listener_downstream_cx_length_ms")
        .unwrap_or_else(|| panic!("histogram missing:\n{text}"));
    assert!(matches!(&hist.value, prometheus_parse::Value::Histogram(b) if !b.is_empty()), "{hist:?}");
    assert!(text.contains("# TYPE envoy_listener_downstream_cx_total counter\n"));
    let (_, same) = get(a, "/stats?format=prometheus").await;
    assert_eq!(same.lines().count(), text.lines().count());
}

fn direct(name: &str, port: u16, body: &str, extra: &str) -> Any {
    any(&direct_listener(name, port, body, extra), "envoy.config.listener.v3.Listener", LISTENER)
}

fn ads_bootstrap(mock: SocketAddr, extra: &str) -> String {
    format!("{}{ADMIN}{extra}", super::ads::bootstrap(mock, "GRPC"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_and_csds_show_listeners_active_warming_draining_and_nacked() {
    let mock = mock().await;
    let server = start(&ads_bootstrap(mock.addr(), ""), Duration::from_secs(30)).await;
    let a = server.admin_address().unwrap();
    let (steady_port, a_port, moving_1, moving_2, warm_port) =
        (free_port(), free_port(), free_port(), free_port(), free_port());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let warm = any(
        &unlisted(&tcp_listener("warm", warm_port, "not-yet-there")),
        "envoy.config.listener.v3.Listener",
        LISTENER,
    );
    let steady = direct("steady", steady_port, "steady", "");
    let vc = mock.set(CLUSTER, vec![]).unwrap();
    acked(&mock, CLUSTER, &vc).await;
    let v1 = mock
        .set(
            LISTENER,
            vec![steady.clone(), direct("a", a_port, "a", ""), direct("moving", moving_1, "m1", ""), warm.clone()],
        )
        .unwrap();
    acked(&mock, LISTENER, &v1).await;

    // v2: "a" breaks (NACK, keeps v1), "moving" changes address (full update: v1 drains), "taken" cannot bind.
    let bad_a = any(
        &direct_listener("a", a_port, "a2", "")
            .replace("- name: chain-a2\n", "- name: chain-a2\n  filter_chain_match: { server_names: [\"x.*.com\"] }\n"),
        "envoy.config.listener.v3.Listener",
        LISTENER,
    );
    let taken_port = taken.local_addr().unwrap().port();
    let v2 = mock
        .set(
            LISTENER,
            vec![
                steady.clone(),
                bad_a,
                direct("moving", moving_2, "m2", ""),
                warm,
                direct("taken", taken_port, "t", ""),
            ],
        )
        .unwrap();
    match mock.wait_for(NODE, LISTENER, &v2, WAIT).await {
        Err(xds_mock::clients::WaitError::Nack(_)) => {}
        other => panic!("expected a NACK, got {other:?}"),
    }

    let (code, text) = get(a, "/config_dump").await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\"dynamic_listeners\""), "Envoy's proto field names");
    let dump = parse_dump(&text);
    let kinds: Vec<&str> = dump.configs.iter().map(|c| c.type_url.rsplit('.').next().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "BootstrapConfigDump",
            "ClustersConfigDump",
            "ListenersConfigDump",
            "ScopedRoutesConfigDump",
            "RoutesConfigDump",
            "SecretsConfigDump"
        ]
    );
    let lds = listeners_dump(&dump);
    assert_eq!(lds.version_info, v1, "the rejected version is not the listeners' version");
    let by_name: HashMap<String, DynamicListener> =
        lds.dynamic_listeners.into_iter().map(|d| (d.name.clone(), d)).collect();
    let mut names: Vec<&String> = by_name.keys().collect();
    names.sort();
    assert_eq!(names, ["a", "moving", "steady", "taken", "warm"]);

    let steady_dump = &by_name["steady"];
    let active = steady_dump.active_state.as_ref().unwrap();
    assert_eq!(active.version_info, v1);
    assert!(active.last_updated.is_some());
    assert_eq!(
        listener_of(&active.listener),
        Listener::decode(steady.value.as_slice()).unwrap(),
        "the dumped listener is the one the mock sent"
    );
    assert_eq!(steady_dump.client_status, ClientResourceStatus::Acked as i32);
    assert!(steady_dump.error_state.is_none() && steady_dump.warming_state.is_none());

    let a_dump = &by_name["a"];
    assert_eq!(a_dump.active_state.as_ref().unwrap().version_info, v1, "the NACKed update left v1 serving");
    let err = a_dump.error_state.as_ref().unwrap();
    assert!(err.details.contains("partial wildcards are not supported"), "{err:?}");
    assert_eq!(err.version_info, v2);
    assert!(err.failed_configuration.is_some() && err.last_update_attempt.is_some());
    assert_eq!(a_dump.client_status, ClientResourceStatus::Nacked as i32);

    let moving = &by_name["moving"];
    assert_eq!(moving.active_state.as_ref().unwrap().version_info, v2);
    let draining = moving.draining_state.as_ref().expect("the replaced version drains");
    assert_eq!(draining.version_info, v1);
    assert_eq!(port_of(&listener_of(&draining.listener)), moving_1);
    assert_eq!(port_of(&listener_of(&moving.active_state.as_ref().unwrap().listener)), moving_2);

    let warm_dump = &by_name["warm"];
    assert!(warm_dump.active_state.is_none());
    assert_eq!(warm_dump.warming_state.as_ref().unwrap().version_info, v1);

    let taken_dump = &by_name["taken"];
    assert!(taken_dump.active_state.is_none() && taken_dump.warming_state.is_none());
    assert!(taken_dump.error_state.as_ref().unwrap().details.contains("cannot bind"), "{taken_dump:?}");

    // ?resource= with ?mask=, ?name_regex=, and the errors Envoy gives.
    let (_, masked) = get(a, "/config_dump?resource=dynamic_listeners&mask=name").await;
    let masked = parse_dump(&masked);
    assert_eq!(masked.configs.len(), 5);
    for c in &masked.configs {
        assert!(c.type_url.ends_with("envoy.admin.v3.ListenersConfigDump.DynamicListener"), "{}", c.type_url);
        let d = DynamicListener::decode(c.value.as_slice()).unwrap();
        assert!(d.active_state.is_none() && d.warming_state.is_none() && !d.name.is_empty(), "masked to the name");
    }
    let (_, one) = get(a, "/config_dump?resource=dynamic_listeners&name_regex=^st").await;
    assert_eq!(parse_dump(&one).configs.len(), 1);
    let (_, inner) = get(a, "/config_dump?resource=dynamic_active_clusters&mask=cluster.name").await;
    assert_eq!(parse_dump(&inner).configs.len(), 0, "no dynamic clusters");
    let (_, only_static) = get(a, "/config_dump?mask=static_listeners").await;
    assert_eq!(parse_dump(&only_static).configs.len(), 1, "only ListenersConfigDump has that field");
    assert_eq!(get(a, "/config_dump?resource=nosuch").await, (404, "nosuch not found in config dump".to_string()));
    assert_eq!(get(a, "/config_dump?resource=version_info").await.0, 400);
    assert_eq!(get(a, "/config_dump?mask=nosuch").await.0, 400);
    assert_eq!(get(a, "/config_dump?name_regex=(").await.0, 400);
    let (_, eds) = get(a, "/config_dump?include_eds").await;
    assert!(parse_dump(&eds).configs.iter().any(|c| c.type_url.ends_with("EndpointsConfigDump")));

    // CSDS over a tonic client: the same picture, per resource.
    let mut csds = ClientStatusDiscoveryServiceClient::connect(format!("http://{a}")).await.unwrap();
    let resp = csds.fetch_client_status(ClientStatusRequest::default()).await.unwrap().into_inner();
    let config = &resp.config[0];
    assert_eq!(config.node.as_ref().map(|n| n.id.as_str()), Some(NODE));
    let listeners: BTreeMap<&str, _> =
        config.generic_xds_configs.iter().filter(|g| g.type_url == LISTENER).map(|g| (g.name.as_str(), g)).collect();
    assert_eq!(listeners.keys().copied().collect::<Vec<_>>(), ["a", "moving", "steady", "taken", "warm"]);
    assert_eq!(listeners["steady"].client_status, ClientResourceStatus::Acked as i32);
    assert_eq!(listeners["steady"].version_info, v1);
    assert_eq!(listeners["steady"].xds_config.as_ref(), Some(&steady));
    assert_eq!(listeners["a"].client_status, ClientResourceStatus::Nacked as i32);
    assert!(listeners["a"].error_state.as_ref().unwrap().details.contains("partial wildcards"));
    assert_eq!(listeners["moving"].version_info, v2);
    assert!(listeners["taken"].xds_config.is_none());
    let lean = csds
        .fetch_client_status(ClientStatusRequest { exclude_resource_contents: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(lean.config[0].generic_xds_configs.iter().all(|g| g.xds_config.is_none()));
    // StreamClientStatus answers each request.
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(ClientStatusRequest::default()).await.unwrap();
    let mut stream =
        csds.stream_client_status(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().config.len(), 1);
    tx.send(ClientStatusRequest::default()).await.unwrap();
    assert!(stream.message().await.unwrap().is_some());

    // grpcurl, as a user would run it.
    if let Some(out) = grpcurl(&["-plaintext", &a.to_string(), "list"]).await {
        for service in [
            "envoy.service.status.v3.ClientStatusDiscoveryService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(out.lines().any(|l| l == service), "{service} not listed:\n{out}");
        }
        let out = grpcurl(&[
            "-plaintext",
            &a.to_string(),
            "envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus",
        ])
        .await
        .unwrap();
        assert!(out.contains("\"name\": \"steady\"") && out.contains("\"clientStatus\": \"NACKED\""), "{out}");
        assert!(out.contains("\"@type\":\"type.googleapis.com/envoy.config.listener.v3.Listener\""), "{out}");
    }
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csds_follows_delta_versions_and_removals() {
    let mock = mock().await;
    let bootstrap = format!("{}{ADMIN}", super::ads::bootstrap(mock.addr(), "DELTA_GRPC"));
    let server = start(&bootstrap, Duration::from_millis(300)).await;
    let a = server.admin_address().unwrap();
    let v = mock.set(LISTENER, vec![direct("x", free_port(), "x", ""), direct("y", free_port(), "y", "")]).unwrap();
    acked(&mock, LISTENER, &v).await;
    let listeners = async || {
        let mut csds = ClientStatusDiscoveryServiceClient::connect(format!("http://{a}")).await.unwrap();
        let resp = csds.fetch_client_status(ClientStatusRequest::default()).await.unwrap().into_inner();
        resp.config[0]
            .generic_xds_configs
            .iter()
            .filter(|g| g.type_url == LISTENER)
            .map(|g| (g.name.clone(), g.version_info.clone(), g.client_status))
            .collect::<Vec<_>>()
    };
    let before = listeners().await;
    assert_eq!(before.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>(), ["x", "y"]);
    assert!(before.iter().all(|(_, v, s)| !v.is_empty() && *s == ClientResourceStatus::Acked as i32), "{before:?}");

    // Delta removes y by name; x is untouched and keeps its per-resource version.
    let v = mock.set(LISTENER, vec![before_x(&mock)]).unwrap();
    acked(&mock, LISTENER, &v).await;
    let after = listeners().await;
    assert_eq!(after, before[..1].to_vec());
    // The removed listener drains for the drain time (300 ms here), shown as draining only, then goes.
    let lds = listeners_dump(&parse_dump(&get(a, "/config_dump").await.1));
    let y = lds.dynamic_listeners.iter().find(|d| d.name == "y").expect("y drains");
    assert!(y.active_state.is_none() && y.draining_state.as_ref().is_some_and(|d| d.version_info == before[1].1));
    eventually("y drained", WAIT, async || {
        let lds = listeners_dump(&parse_dump(&get(a, "/config_dump").await.1));
        lds.dynamic_listeners.iter().map(|d| d.name.as_str()).collect::<Vec<_>>() == ["x"]
    })
    .await;
}

/// The listener "x" exactly as the mock holds it now, so that re-sending it changes nothing.
fn before_x(mock: &xds_mock::server::MockHandle) -> Any {
    let snapshot = mock.store().snapshot();
    snapshot.get(LISTENER).and_then(|t| t.resources.get("x")).map(|r| r.any.clone()).unwrap()
}

fn port_of(l: &Listener) -> u16 {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    match l.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => match sa.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(p)) => p as u16,
            _ => 0,
        },
        _ => 0,
    }
}

/// Runs grpcurl (installed by `make deps`); None when it is missing outside CI, where it must be there.
async fn grpcurl(args: &[&str]) -> Option<String> {
    let out = match tokio::process::Command::new("grpcurl").args(args).output().await {
        Ok(out) => out,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("grpcurl not runnable ({e}); run `make deps` to include it");
            return None;
        }
        Err(e) => panic!("grpcurl is needed in CI (.ci/deps.sh installs it): {e}"),
    };
    assert!(out.status.success(), "grpcurl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8(out.stdout).unwrap())
}

/// gRPC framing of raw message bytes, so the test can call a method it only knows from reflection.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csds_is_found_and_called_through_reflection_alone() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let up = echo_server().await;
    let server = start(&static_bootstrap(up, free_port(), free_port()), Duration::from_millis(300)).await;
    let a = server.admin_address().unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{a}")).unwrap().connect().await.unwrap();
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let ask = async |client: &mut ServerReflectionClient<tonic::transport::Channel>, req: MessageRequest| {
        let request = ServerReflectionRequest { host: String::new(), message_request: Some(req) };
        let mut responses = client.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
        let resp: ServerReflectionResponse = responses.message().await.unwrap().unwrap();
        resp.message_response.unwrap()
    };

    let MessageResponse::ListServicesResponse(list) =
        ask(&mut reflection, MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list")
    };
    let service = list
        .service
        .iter()
        .map(|s| s.name.clone())
        .find(|n| n.ends_with("ClientStatusDiscoveryService"))
        .expect("CSDS is listed");

    // Load the service's file and, one by one, every file it imports.
    let mut files: BTreeMap<String, prost_types::FileDescriptorProto> = BTreeMap::new();
    let mut pending = vec![MessageRequest::FileContainingSymbol(service.clone())];
    while let Some(req) = pending.pop() {
        let MessageResponse::FileDescriptorResponse(fds) = ask(&mut reflection, req).await else {
            panic!("not a file descriptor")
        };
        for raw in fds.file_descriptor_proto {
            let file = prost_types::FileDescriptorProto::decode(raw.as_slice()).unwrap();
            for dep in &file.dependency {
                if !files.contains_key(dep) {
                    pending.push(MessageRequest::FileByFilename(dep.clone()));
                }
            }
            files.insert(file.name().to_string(), file);
        }
    }
    let pool = prost_reflect::DescriptorPool::from_file_descriptor_set(prost_types::FileDescriptorSet {
        file: files.into_values().collect(),
    })
    .unwrap();
    let svc = pool.get_service_by_name(&service).unwrap();
    let method = svc.methods().find(|m| m.name() == "FetchClientStatus").unwrap();

    let request = prost_reflect::DynamicMessage::new(method.input()).encode_to_vec();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::try_from(format!("/{}/{}", svc.full_name(), method.name())).unwrap();
    let resp = grpc.unary(tonic::Request::new(request), path, RawCodec).await.unwrap().into_inner();
    let resp = prost_reflect::DynamicMessage::decode(method.output(), resp.as_slice()).unwrap();
    let configs = resp.get_field_by_name("config").unwrap();
    let first = configs.as_list().unwrap()[0].as_message().unwrap().clone();
    let generic = first.get_field_by_name("generic_xds_configs").unwrap();
    let names: Vec<String> = generic
        .as_list()
        .unwrap()
        .iter()
        .map(|g| g.as_message().unwrap().get_field_by_name("name").unwrap().as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["inbound", "outbound", "echo"], "the static listeners and cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_as_pilot_agent_sees_it() {
    let mock = mock().await;
    let server = start(&ads_bootstrap(mock.addr(), ""), Duration::from_millis(300)).await;
    let a = server.admin_address().unwrap();
    let probe = "/stats?usedonly&filter=^(server\\.state|listener_manager\\.workers_started)";

    // Connected, but the control plane has answered nothing: INITIALIZING, as Envoy's init manager keeps it.
    eventually("ADS connected", WAIT, async || {
        server.stats.get("control_plane.connected_state") == Some(xds_proxy::stats::Value::Gauge(1))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(a, probe).await.1, "listener_manager.workers_started: 1\nserver.state: 3\n");
    assert_eq!(get(a, "/ready").await, (503, "INITIALIZING\n".to_string()));

    // CDS answered (a NACK counts: it is an answer), LDS not yet: still not ready.
    let bad_cluster = any("name: broken\ntype: EDS", "envoy.config.cluster.v3.Cluster", CLUSTER);
    let vc = mock.set(CLUSTER, vec![bad_cluster]).unwrap();
    assert!(matches!(mock.wait_for(NODE, CLUSTER, &vc, WAIT).await, Err(xds_mock::clients::WaitError::Nack(_))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get(a, "/ready").await.0, 503);

    let vl = mock.set(LISTENER, vec![direct("l", free_port(), "x", "")]).unwrap();
    acked(&mock, LISTENER, &vl).await;
    eventually("ready", WAIT, async || get(a, "/ready").await.0 == 200).await;
    assert_eq!(get(a, probe).await.1, "listener_manager.workers_started: 1\nserver.state: 0\n");
    let (_, counters) = get(a, "/stats?filter=^(cluster_manager\\.cds|listener_manager\\.lds)\\.update_").await;
    for line in [
        "cluster_manager.cds.update_rejected: 1",
        "cluster_manager.cds.update_success: 0",
        "listener_manager.lds.update_rejected: 0",
        "listener_manager.lds.update_success: 1",
    ] {
        assert!(counters.lines().any(|l| l == line), "{line} missing:\n{counters}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_initial_fetch_times_out_into_live() {
    let mock = mock().await;
    let bootstrap = ads_bootstrap(mock.addr(), "")
        .replace("lds_config: { ads: {} }", "lds_config: { ads: {}, initial_fetch_timeout: 1s }")
        .replace("cds_config: { ads: {} }", "cds_config: { ads: {}, initial_fetch_timeout: 1s }");
    let server = start(&bootstrap, Duration::from_millis(300)).await;
    let a = server.admin_address().unwrap();
    assert_eq!(get(a, "/ready").await.0, 503);
    let t = std::time::Instant::now();
    eventually("live after the timeouts", WAIT, async || get(a, "/ready").await.0 == 200).await;
    assert!(t.elapsed() >= Duration::from_millis(1500), "both timeouts (CDS, then LDS) ran: {:?}", t.elapsed());
}

const BINARY: &str = r#"
node: { id: binary-test, cluster: test }
admin: { address: { socket_address: { address: 127.0.0.1, port_value: 0 } } }
static_resources:
  listeners:
  - name: inbound
    traffic_direction: INBOUND
    address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.direct_response
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config
          response: { inline_string: "in" }
  - name: outbound
    traffic_direction: OUTBOUND
    address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.direct_response
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config
          response: { inline_string: "out" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_drains_inbound_listeners_changes_log_levels_and_quits_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin-address");
    let mut proxy = Proxy::spawn(
        BINARY,
        &["--concurrency", "1", "--drain-time-s", "1", "--admin-address-path", path.to_str().unwrap()],
    );
    eventually("admin address written", WAIT, async || std::fs::read_to_string(&path).is_ok_and(|s| !s.is_empty()))
        .await;
    let a: SocketAddr = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    eventually("live", WAIT, async || {
        TcpStream::connect(a).await.is_ok() && get(a, "/ready").await == (200, "LIVE\n".to_string())
    })
    .await;
    let (_, listeners) = get(a, "/listeners").await;
    let addr_of = |name: &str| -> SocketAddr {
        let line = listeners.lines().find(|l| l.starts_with(&format!("{name}::"))).unwrap();
        line.split("::").nth(1).unwrap().parse().unwrap()
    };
    let (inbound, outbound) = (addr_of("inbound"), addr_of("outbound"));
    assert_eq!(fetch(inbound).await.unwrap(), b"in");

    // /logging: levels listed, changed, and the new level is live (every admin request is logged at debug).
    let (code, listing) = get(a, "/logging").await;
    assert_eq!(code, 200);
    assert!(listing.starts_with("active loggers:\n") && listing.contains("  listener: info\n"), "{listing}");
    let (code, changed) = post(a, "/logging?paths=admin:debug,listener:debug").await;
    assert_eq!(code, 200, "{changed}");
    assert!(changed.contains("  listener: debug\n") && changed.contains("  xds: info\n"), "{changed}");
    let (code, refused) = post(a, "/logging?level=loud").await;
    assert_eq!(code, 400);
    assert!(refused.starts_with("error: unknown logger level\n"), "{refused}");
    assert_eq!(fetch(outbound).await.unwrap(), b"out");

    // /drain_listeners?inboundonly: inbound stops (refused, not queued), outbound serves on; a repeat is harmless.
    assert_eq!(post(a, "/drain_listeners?inboundonly").await, (200, "OK\n".to_string()));
    eventually("inbound refused", WAIT, async || TcpStream::connect(inbound).await.is_err()).await;
    assert_eq!(fetch(outbound).await.unwrap(), b"out");
    assert_eq!(post(a, "/drain_listeners?inboundonly").await.0, 200);
    let (_, still) = get(a, "/listeners").await;
    assert!(still.contains("inbound::"), "a stopped listener is still listed, as in Envoy:\n{still}");
    let (_, stopped) = get(a, "/stats?filter=listener_stopped").await;
    assert_eq!(stopped, "listener_manager.listener_stopped: 1\n");

    // /quitquitquit: the SIGTERM path, exit 0.
    assert_eq!(get(a, "/quitquitquit").await.0, 405);
    assert_eq!(post(a, "/quitquitquit").await, (200, "OK\n".to_string()));
    let (status, stderr) = proxy.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(stderr.contains("shutting down on /quitquitquit"), "{stderr}");
    assert!(stderr.contains("DEBUG"), "debug logs appeared after /logging:\n{stderr}");
}

/// Envoy's `/healthcheck/fail` drain-closes HTTP connections on listeners with `drain_type: DEFAULT` (one response
/// at a time) and leaves `MODIFY_ONLY` ones alone; `/healthcheck/ok` ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_health_check_closes_http_connections_of_default_drain_listeners() {
    let up = http_upstream("U").await;
    let routes = "          route_config: { name: r, virtual_hosts: [ { name: all, domains: ['*'], routes: [ { match: { prefix: / }, route: { cluster: u } } ] } ] }";
    let modify_only = http_listener("m", 0, routes, "").replacen(
        "    filter_chains:",
        "    drain_type: MODIFY_ONLY\n    filter_chains:",
        1,
    );
    let yaml = format!(
        "{ADMIN}static_resources:\n  listeners:{}{modify_only}\n  clusters:{}\n",
        http_listener("d", 0, routes, ""),
        static_cluster("u", &[up])
    );
    let server = start(&yaml, Duration::from_secs(1)).await;
    let a = server.admin_address().expect("admin address");
    let mut default = http1_client(listener_addr(&server, "d")).await;
    let mut keep = http1_client(listener_addr(&server, "m")).await;
    assert!(http1_request(&mut default, "GET", "/", "x", &[]).await.1.get("connection").is_none());

    assert_eq!(post(a, "/healthcheck/fail").await.0, 200);
    let (_, headers, _) = http1_request(&mut default, "GET", "/", "x", &[]).await;
    assert_eq!(headers["connection"], "close", "DEFAULT drain type closes on a failed health check");
    let (_, headers, _) = http1_request(&mut keep, "GET", "/", "x", &[]).await;
    assert!(headers.get("connection").is_none(), "MODIFY_ONLY ignores it");

    assert_eq!(post(a, "/healthcheck/ok").await.0, 200);
    let mut again = http1_client(listener_addr(&server, "d")).await;
    let (_, headers, _) = http1_request(&mut again, "GET", "/", "x", &[]).await;
    assert!(headers.get("connection").is_none(), "health check passes again");
}

/// Envoy's init manager also waits for the first listeners to warm: an HTTP listener whose RDS route configuration
/// has not arrived keeps the server INITIALIZING (not ready) after LDS is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_first_listeners_to_warm() {
    use super::http_rds::{rds_listener_any, route_any};
    let mock = mock().await;
    let server = start(&ads_bootstrap(mock.addr(), ""), Duration::from_millis(300)).await;
    let a = server.admin_address().unwrap();
    let vc = mock.set(CLUSTER, vec![]).unwrap();
    acked(&mock, CLUSTER, &vc).await;
    let vl = mock.set(LISTENER, vec![rds_listener_any("web", free_port(), "web-routes")]).unwrap();
    acked(&mock, LISTENER, &vl).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(a, "/ready").await, (503, "INITIALIZING\n".to_string()), "the listener is still warming");

    let vr = mock.set(xds_proxy::xds::ROUTE, vec![route_any("web-routes", "nowhere")]).unwrap();
    acked(&mock, xds_proxy::xds::ROUTE, &vr).await;
    eventually("ready once the listener warmed", WAIT, async || get(a, "/ready").await.0 == 200).await;
}

/// `/memory`, `/runtime` and `/init_dump` in Envoy's shapes: `envoy.admin.v3.Memory` with every field, the runtime's
/// layers and entries (none: the bootstrap has no layered_runtime), and `envoy.admin.v3.UnreadyTargetsDumps` naming
/// what each warming listener still waits for, until it no longer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_runtime_and_init_dump_in_envoys_shapes() {
    use super::http_rds::{rds_listener_any, route_any};
    use envoy_types::pb::envoy::admin::v3::{Memory, UnreadyTargetsDumps};
    let mock = mock().await;
    let server = start(&ads_bootstrap(mock.addr(), ""), Duration::from_millis(300)).await;
    let a = server.admin_address().unwrap();

    let (code, text) = get(a, "/memory").await;
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for field in
        ["allocated", "heap_size", "pageheap_unmapped", "pageheap_free", "total_thread_cache", "total_physical_bytes"]
    {
        assert!(v.get(field).is_some(), "{field} missing from {text}");
    }
    let memory: Memory =
        proto::decode(&proto::parse_dynamic(&text, Format::Json, "envoy.admin.v3.Memory").unwrap()).unwrap();
    assert!(memory.allocated > 0 && memory.heap_size >= memory.allocated, "{memory:?}");
    assert!(memory.total_physical_bytes > 0, "{memory:?}");

    let (code, text) = get(a, "/runtime").await;
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v, serde_json::json!({ "layers": [], "entries": {} }));

    let vc = mock.set(CLUSTER, vec![]).unwrap();
    acked(&mock, CLUSTER, &vc).await;
    let tcp = any(
        &unlisted(&tcp_listener("tcp", free_port(), "not-yet-there")),
        "envoy.config.listener.v3.Listener",
        LISTENER,
    );
    let vl = mock.set(LISTENER, vec![rds_listener_any("web", free_port(), "web-routes"), tcp]).unwrap();
    acked(&mock, LISTENER, &vl).await;
    let dumps = async |query: &str| -> BTreeMap<String, Vec<String>> {
        let (code, text) = get(a, &format!("/init_dump{query}")).await;
        assert_eq!(code, 200, "{text}");
        let d: UnreadyTargetsDumps =
            proto::decode(&proto::parse_dynamic(&text, Format::Json, "envoy.admin.v3.UnreadyTargetsDumps").unwrap())
                .unwrap();
        d.unready_targets_dumps
            .into_iter()
            .map(|u| {
                let listener = u.name.strip_prefix("Listener-local-init-manager ").unwrap_or(&u.name);
                (listener.split(' ').next().unwrap_or_default().to_string(), u.target_names)
            })
            .collect()
    };
    let expected = BTreeMap::from([
        ("tcp".to_string(), vec!["Cluster not-yet-there".to_string()]),
        ("web".to_string(), vec!["RdsRouteConfigSubscription init web-routes".to_string()]),
    ]);
    assert_eq!(dumps("").await, expected);
    assert_eq!(dumps("?mask=listener").await, expected);
    assert_eq!(dumps("?mask=cluster").await, BTreeMap::new(), "listeners are the only component, as in Envoy");

    let vr = mock.set(xds_proxy::xds::ROUTE, vec![route_any("web-routes", "nowhere")]).unwrap();
    acked(&mock, xds_proxy::xds::ROUTE, &vr).await;
    eventually("web warmed", WAIT, async || !dumps("").await.contains_key("web")).await;
    assert!(dumps("").await.contains_key("tcp"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_cluster_options_bind_source_address_and_publish_breaker_gauges() {
    // An upstream that answers with the address the connection came from.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            tokio::spawn(async move {
                let _ = tokio::io::AsyncWriteExt::write_all(&mut s, format!("{}\n", peer.ip()).as_bytes()).await;
                let mut b = [0u8; 16];
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut b).await;
            });
        }
    });
    // Istio's inbound passthrough shape: connect from 127.0.0.6, keepalive on, breakers tracked.
    let cluster = format!(
        r#"
  - name: passthrough
    connect_timeout: 1s
    upstream_bind_config: {{ source_address: {{ address: 127.0.0.6, port_value: 0 }} }}
    upstream_connection_options: {{ tcp_keepalive: {{ keepalive_time: 300 }} }}
    circuit_breakers: {{ thresholds: [ {{ max_connections: 7, max_requests: 9, track_remaining: true }} ] }}
    load_assignment:
      cluster_name: passthrough
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}"#,
        up.port()
    );
    let yaml = format!(
        "static_resources:\n  listeners:{}\n  clusters:{cluster}\n{ADMIN}",
        tcp_listener("l", 0, "passthrough")
    );
    let server = start(&yaml, Duration::from_millis(300)).await;
    let a = server.admin_address().expect("admin address");
    let mut s = tokio::net::TcpStream::connect(listener_addr(&server, "l")).await.unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while tokio::io::AsyncReadExt::read(&mut s, &mut b).await.unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    assert_eq!(String::from_utf8(line).unwrap(), "127.0.0.6", "the upstream saw the bound source address");

    let (_, text) = get(a, "/stats?filter=circuit_breakers").await;
    for line in [
        "cluster.passthrough.circuit_breakers.default.cx_open: 0",
        "cluster.passthrough.circuit_breakers.default.remaining_cx: 6",
        "cluster.passthrough.circuit_breakers.default.remaining_rq: 9",
        "cluster.passthrough.circuit_breakers.default.remaining_retries: 3",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}

/// The binary runs on mimalloc, counted: `/memory` reports the bytes in use, what mimalloc has committed as the heap
/// size, and the resident set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reports_mimallocs_memory() {
    use envoy_types::pb::envoy::admin::v3::Memory;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin-address");
    let _proxy = Proxy::spawn(BINARY, &["--concurrency", "1", "--admin-address-path", path.to_str().unwrap()]);
    eventually("admin address written", WAIT, async || std::fs::read_to_string(&path).is_ok_and(|s| !s.is_empty()))
        .await;
    let a: SocketAddr = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    eventually("admin up", WAIT, async || TcpStream::connect(a).await.is_ok()).await;
    let (code, text) = get(a, "/memory").await;
    assert_eq!(code, 200, "{text}");
    let memory: Memory =
        proto::decode(&proto::parse_dynamic(&text, Format::Json, "envoy.admin.v3.Memory").unwrap()).unwrap();
    assert!(memory.heap_size > 0, "mimalloc has committed memory: {memory:?}");
    assert!(memory.total_physical_bytes > 0, "{memory:?}");
    assert!(memory.allocated > 0 && memory.heap_size >= memory.allocated, "{memory:?}");
}
