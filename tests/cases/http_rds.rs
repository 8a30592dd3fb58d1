//! HTTP listeners whose routes come from RDS over ADS (xds-mock): warming until the route configuration arrives,
//! route updates reaching open keep-alive connections, and the real Istio `0.0.0.0_8080` listener with its `8080`
//! route configuration routing by Host as Istio intends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::admin::v3::{ConfigDump, ListenersConfigDump, RoutesConfigDump};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use xds_proxy::config::proto::{self, Format};
use xds_proxy::xds::{CLUSTER, LISTENER, ROUTE};

use super::ads::{WAIT, acked, any, bootstrap, mock, static_cluster_any};
use crate::common::*;

pub(crate) fn rds_listener_any(name: &str, port: u16, route_config: &str) -> Any {
    let rds = format!(
        "          rds:\n            route_config_name: {route_config}\n            config_source: {{ ads: {{}}, initial_fetch_timeout: 0s }}"
    );
    any(&unlisted(&http_listener(name, port, &rds, "")), "envoy.config.listener.v3.Listener", LISTENER)
}

pub(crate) fn route_any(name: &str, cluster: &str) -> Any {
    let yaml = format!(
        "name: {name}\nvirtual_hosts:\n- name: all\n  domains: ['*']\n  routes:\n  - match: {{ prefix: / }}\n    route: {{ cluster: {cluster} }}"
    );
    any(&yaml, "envoy.config.route.v3.RouteConfiguration", ROUTE)
}

async fn http_listener_warms_until_rds_and_updates_reach_open_connections(api: &str) {
    let mock = mock().await;
    let server = start(&bootstrap(mock.addr(), api), Duration::from_millis(200)).await;
    let a = http_upstream("A").await;
    let b = http_upstream("B").await;
    let v = mock.set(CLUSTER, vec![static_cluster_any("a", a), static_cluster_any("b", b)]).unwrap();
    acked(&mock, CLUSTER, &v).await;
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    let v = mock.set(LISTENER, vec![rds_listener_any("web", port, "web-routes")]).unwrap();
    acked(&mock, LISTENER, &v).await;
    // Envoy's warming: the listener waits for its route configuration (initial_fetch_timeout 0s: for ever).
    assert_eq!(gauge(&server, "listener_manager.total_listeners_warming"), 1);
    assert_eq!(gauge(&server, "listener_manager.total_listeners_active"), 0);

    let v = mock.set(ROUTE, vec![route_any("web-routes", "a")]).unwrap();
    acked(&mock, ROUTE, &v).await;
    eventually("listener active", WAIT, async || gauge(&server, "listener_manager.total_listeners_active") == 1).await;
    let mut c = http1_client(addr).await;
    let (status, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("A\n"), "{body}");

    // A new route version applies to the next request on the same keep-alive connection.
    let v = mock.set(ROUTE, vec![route_any("web-routes", "b")]).unwrap();
    acked(&mock, ROUTE, &v).await;
    let (_, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert!(body.starts_with("B\n"), "{body}");
    assert_eq!(counter(&server, "http.web.downstream_cx_total"), 1, "one connection carried both requests");

    // A bad route configuration is NACKed by name and the good one keeps serving.
    let bad = any(
        "name: web-routes\nvirtual_hosts:\n- name: x\n  domains: ['*']\n  routes:\n  - match: { safe_regex: { regex: '(' } }\n    route: { cluster: a }",
        "envoy.config.route.v3.RouteConfiguration",
        ROUTE,
    );
    let v = mock.set(ROUTE, vec![bad]).unwrap();
    let nack = mock.wait_for(super::ads::NODE, ROUTE, &v, WAIT).await.unwrap_err();
    let text = format!("{nack:?}");
    assert!(text.contains("web-routes") && text.contains("regex"), "{text}");
    let (_, _, body) = http1_request(&mut c, "GET", "/", "x", &[]).await;
    assert!(body.starts_with("B\n"), "{body}");
}

/// The fixture's resources of one kind, by their dump type.
fn fixture<T: Message + Default>(dump_type: &str, pick: impl Fn(&[u8]) -> Vec<T>) -> Vec<T> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/istio-1.14-sidecar-config-dump.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let dump: ConfigDump =
        proto::decode(&proto::parse_dynamic(&text, Format::Yaml, "envoy.admin.v3.ConfigDump").unwrap()).unwrap();
    dump.configs.iter().filter(|a| a.type_url.ends_with(dump_type)).flat_map(|a| pick(&a.value)).collect()
}

async fn istio_8080_listener_routes_by_host_with_its_rds_config(api: &str) {
    let listener = fixture::<Listener>("ListenersConfigDump", |b| {
        let d = ListenersConfigDump::decode(b).unwrap();
        d.dynamic_listeners
            .into_iter()
            .filter_map(|l| l.active_state.and_then(|s| s.listener))
            .map(|a| Listener::decode(a.value.as_slice()).unwrap())
            .collect()
    })
    .into_iter()
    .find(|l| l.name == "0.0.0.0_8080")
    .unwrap();
    let route = fixture::<RouteConfiguration>("RoutesConfigDump", |b| {
        let d = RoutesConfigDump::decode(b).unwrap();
        d.dynamic_route_configs
            .into_iter()
            .filter_map(|r| r.route_config)
            .map(|a| RouteConfiguration::decode(a.value.as_slice()).unwrap())
            .collect()
    })
    .into_iter()
    .find(|r| r.name == "8080")
    .unwrap();

    // The sidecar's listener is reached through virtualOutbound's hand-off; here it binds loopback directly.
    let port = free_port();
    let mut listener = listener;
    listener.address = Some(proto_address(([127, 0, 0, 1], port).into()));
    listener.bind_to_port = None;

    let mock = mock().await;
    let server = start(&bootstrap(mock.addr(), api), Duration::from_millis(200)).await;
    let default_ns = http_upstream("l2.default").await;
    let mark_ns = http_upstream("l2.mark").await;
    let passthrough = http_upstream("passthrough").await;
    let v = mock
        .set(
            CLUSTER,
            vec![
                static_cluster_any("outbound|8080||fortio-server-l2.default.svc.cluster.local", default_ns),
                static_cluster_any("outbound|8080||fortio-server-l2.mark.svc.cluster.local", mark_ns),
                static_cluster_any("PassthroughCluster", passthrough),
            ],
        )
        .unwrap();
    acked(&mock, CLUSTER, &v).await;
    let v = mock.set(LISTENER, vec![Any { type_url: LISTENER.into(), value: listener.encode_to_vec() }]).unwrap();
    acked(&mock, LISTENER, &v).await;
    let v = mock.set(ROUTE, vec![Any { type_url: ROUTE.into(), value: route.encode_to_vec() }]).unwrap();
    acked(&mock, ROUTE, &v).await;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    eventually("listener active", WAIT, async || gauge(&server, "listener_manager.total_listeners_active") == 1).await;

    // http_inspector runs first (the chain matches http/1.1 and h2c), then the HCM routes by Host.
    let mut c = http1_client(addr).await;
    for (host, expect) in [
        ("fortio-server-l2.default.svc.cluster.local:8080", "l2.default"),
        ("fortio-server-l2.default", "l2.default"),
        ("10.104.5.115:8080", "l2.default"),
        ("fortio-server-l2", "l2.mark"),
        ("fortio-server-l2.mark.svc:8080", "l2.mark"),
        ("example.com", "passthrough"),
    ] {
        let (status, _, body) = http1_request(&mut c, "GET", "/echo", host, &[]).await;
        assert_eq!(status, 200, "{host}: {body}");
        assert_eq!(body.lines().next(), Some(expect), "{host}");
    }
}

fn proto_address(a: SocketAddr) -> envoy_types::pb::envoy::config::core::v3::Address {
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(a.port()))),
            ..Default::default()
        })),
    }
}

both_protocols!(
    http_listener_warms_until_rds_and_updates_reach_open_connections,
    istio_8080_listener_routes_by_host_with_its_rds_config
);
