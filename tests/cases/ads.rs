//! The proxy driven by the xds-mock control plane over ADS (state of the world): listeners and clusters added,
//! changed and removed at runtime, per-resource NACKs with partial apply, EDS, and losing the control plane.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::net::TcpStream;
use xds_mock::server::{MockHandle, MockServer};
use xds_proxy::config::proto::{self, Format};
use xds_proxy::xds::{CLUSTER, ENDPOINT, LISTENER};

use crate::common::*;

pub(crate) const NODE: &str = "sidecar~10.0.0.1~test.ns~ns.svc.cluster.local";
pub(crate) const WAIT: Duration = Duration::from_secs(10);

pub(crate) fn any(yaml: &str, full_name: &str, type_url: &str) -> Any {
    let msg = proto::parse_dynamic(yaml, Format::Yaml, full_name).unwrap_or_else(|e| panic!("{e}"));
    let mut value = Vec::new();
    msg.encode(&mut value).unwrap();
    Any { type_url: type_url.to_string(), value }
}

fn listener_any(name: &str, port: u16, body: &str) -> Any {
    any(&direct_listener(name, port, body, ""), "envoy.config.listener.v3.Listener", LISTENER)
}

pub(crate) fn bootstrap(mock: SocketAddr, api: &str) -> String {
    format!(
        r#"
node: {{ id: "{NODE}", cluster: test }}
dynamic_resources:
  ads_config: {{ api_type: {api}, grpc_services: [ {{ envoy_grpc: {{ cluster_name: xds-grpc }} }} ] }}
  lds_config: {{ ads: {{}} }}
  cds_config: {{ ads: {{}} }}
static_resources:
  clusters:
  - name: xds-grpc
    connect_timeout: 1s
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }} }} ] }} ]
"#,
        mock.ip(),
        mock.port()
    )
}

pub(crate) async fn mock() -> MockHandle {
    MockServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap()
}

pub(crate) async fn acked(mock: &MockHandle, type_url: &str, version: &str) {
    mock.wait_for(NODE, type_url, version, WAIT).await.unwrap_or_else(|e| panic!("{type_url} v{version}: {e:?}"));
}

async fn listeners_added_updated_and_removed_through_ads(api: &str) {
    let mock = mock().await;
    let server = start(&bootstrap(mock.addr(), api), Duration::from_millis(300)).await;
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    let v = mock.set(LISTENER, vec![listener_any("l", port, "v1")]).unwrap();
    acked(&mock, LISTENER, &v).await;
    assert_eq!(fetch(addr).await.unwrap(), b"v1");

    let mut old = TcpStream::connect(addr).await.unwrap();
    eventually("old connection accepted", WAIT, async || {
        counter(&server, &format!("listener.127.0.0.1_{port}.downstream_cx_total")) >= 2
    })
    .await;
    let v = mock.set(LISTENER, vec![listener_any("l", port, "v2")]).unwrap();
    acked(&mock, LISTENER, &v).await;
    assert_eq!(fetch(addr).await.unwrap(), b"v2", "new connections see the new config");
    assert_eq!(read_to_end(&mut old).await, b"v1", "the old connection was served by its own chain");

    let v = mock.set(LISTENER, vec![]).unwrap();
    acked(&mock, LISTENER, &v).await;
    eventually("listener removed", WAIT, async || TcpStream::connect(addr).await.is_err()).await;
    assert_eq!(counter(&server, "listener_manager.lds.update_success"), 3);
    assert_eq!(gauge(&server, "control_plane.connected_state"), 1);
}

async fn bad_listeners_are_nacked_by_name_and_the_good_ones_still_apply(api: &str) {
    let mock = mock().await;
    let server = start(&bootstrap(mock.addr(), api), Duration::from_millis(300)).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let (good, dup) = (free_port(), free_port());
    let bad_match = any(
        &direct_listener("bad-match", free_port(), "x", "")
            .replace("- name: chain-x\n", "- name: chain-x\n  filter_chain_match: { server_names: [\"a.*.com\"] }\n"),
        "envoy.config.listener.v3.Listener",
        LISTENER,
    );
    let v = mock
        .set(
            LISTENER,
            vec![
                listener_any("good", good, "good"),
                listener_any("port-taken", taken_port, "x"),
                bad_match,
                listener_any("dup-a", dup, "a"),
                listener_any("dup-b", dup, "b"),
            ],
        )
        .unwrap();
    let nack = match mock.wait_for(NODE, LISTENER, &v, WAIT).await {
        Err(xds_mock::clients::WaitError::Nack(n)) => n,
        other => panic!("expected a NACK, got {other:?}"),
    };
    assert_eq!(nack.code, 3);
    for expect in [
        format!("port-taken: cannot bind '127.0.0.1:{taken_port}': Address already in use"),
        "bad-match: filter_chains[0].filter_chain_match.server_names[0]: partial wildcards are not supported"
            .to_string(),
        format!(
            "dup-b: error adding listener 'dup-b': has duplicate address '127.0.0.1:{dup}' as existing listener 'dup-a'"
        ),
    ] {
        assert!(nack.message.contains(&expect), "missing '{expect}' in:\n{}", nack.message);
    }
    assert_eq!(
        fetch(([127, 0, 0, 1], good).into()).await.unwrap(),
        b"good",
        "good listeners of a NACKed response apply"
    );
    assert_eq!(fetch(([127, 0, 0, 1], dup).into()).await.unwrap(), b"a");
    assert_eq!(counter(&server, "listener_manager.lds.update_rejected"), 1);

    let v = mock.set(LISTENER, vec![listener_any("good", good, "good2")]).unwrap();
    acked(&mock, LISTENER, &v).await;
    assert_eq!(fetch(([127, 0, 0, 1], good).into()).await.unwrap(), b"good2");
    let status = mock.clients().into_iter().find(|c| c.node_id == NODE).unwrap();
    assert_eq!(status.types.get(LISTENER).and_then(|t| t.last_acked_version.clone()), Some(v));
    drop(taken);
}

async fn eds_cluster_from_cds_carries_traffic(api: &str) {
    let mock = mock().await;
    let server = start(&bootstrap(mock.addr(), api), Duration::from_millis(300)).await;
    let up = echo_server().await;
    let port = free_port();
    let cluster = any(
        "name: backend\ntype: EDS\neds_cluster_config: { eds_config: { ads: {} } }",
        "envoy.config.cluster.v3.Cluster",
        CLUSTER,
    );
    let cla = any(
        &format!(
            "cluster_name: backend\nendpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }} ] }} ]",
            up.port()
        ),
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
        ENDPOINT,
    );
    let listener = any(
        &format!(
            r#"name: front
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
filter_chains: [ {{ filters: [ {{ name: t, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: front, cluster: backend }} }} ] }} ]"#
        ),
        "envoy.config.listener.v3.Listener",
        LISTENER,
    );
    let vc = mock.set(CLUSTER, vec![cluster]).unwrap();
    let ve = mock.set(ENDPOINT, vec![cla]).unwrap();
    let vl = mock.set(LISTENER, vec![listener]).unwrap();
    acked(&mock, CLUSTER, &vc).await;
    acked(&mock, ENDPOINT, &ve).await;
    acked(&mock, LISTENER, &vl).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert!(echo_ok(&mut s, b"through EDS").await);
    assert_eq!(counter(&server, "cluster_manager.cds.update_success"), 1);
}

async fn losing_the_control_plane_keeps_traffic_and_a_restart_reapplies_nothing(api: &str) {
    let first = mock().await;
    let mock_addr = first.addr();
    let server = start(&bootstrap(mock_addr, api), Duration::from_millis(300)).await;
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let v = first.set(LISTENER, vec![listener_any("l", port, "kept")]).unwrap();
    acked(&first, LISTENER, &v).await;
    let mut open = TcpStream::connect(addr).await.unwrap();
    eventually("accepted", WAIT, async || {
        counter(&server, &format!("listener.127.0.0.1_{port}.downstream_cx_total")) >= 1
    })
    .await;

    first.shutdown().await.unwrap();
    eventually("disconnect noticed", WAIT, async || gauge(&server, "control_plane.connected_state") == 0).await;
    assert_eq!(fetch(addr).await.unwrap(), b"kept", "serving the last good config without a control plane");

    // A new control plane on the same address with the same listener plus a new one: reconnect, resync, the
    // unchanged listener is not re-applied (delta: not even resent, thanks to initial_resource_versions).
    let second = MockServer::start(mock_addr).await.unwrap();
    let port2 = free_port();
    let v = second.set(LISTENER, vec![listener_any("l", port, "kept"), listener_any("l2", port2, "new")]).unwrap();
    acked(&second, LISTENER, &v).await;
    assert_eq!(fetch(([127, 0, 0, 1], port2).into()).await.unwrap(), b"new");
    assert_eq!(counter(&server, "listener_manager.listener_modified"), 0, "an unchanged listener is not replaced");
    assert_eq!(read_to_end(&mut open).await, b"kept", "the connection opened before the outage was never drained");
    assert_eq!(gauge(&server, "control_plane.connected_state"), 1);
}

async fn churn_of_1000_pushes_never_disturbs_an_unchanged_listener(api: &str) {
    let mock = mock().await;
    let server = start(&bootstrap(mock.addr(), api), Duration::from_millis(100)).await;
    let (stable, churn) = (free_port(), free_port());
    let stable_addr: SocketAddr = ([127, 0, 0, 1], stable).into();
    let v =
        mock.set(LISTENER, vec![listener_any("stable", stable, "stable"), listener_any("churn", churn, "0")]).unwrap();
    acked(&mock, LISTENER, &v).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match fetch(stable_addr).await {
                    Ok(body) if body == b"stable" => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    let mut last = String::new();
    for i in 1..=1000 {
        last = mock
            .set(LISTENER, vec![listener_any("stable", stable, "stable"), listener_any("churn", churn, &i.to_string())])
            .unwrap();
    }
    acked(&mock, LISTENER, &last).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = client.await.unwrap();
    assert_eq!(failed, 0, "failed connections to the unchanged listener ({ok} succeeded)");
    assert!(ok > 0);
    assert_eq!(fetch(([127, 0, 0, 1], churn).into()).await.unwrap(), b"1000", "the last push is in effect");
    assert_eq!(
        counter(&server, &format!("listener.127.0.0.1_{stable}.downstream_cx_total")) as usize,
        ok,
        "every connection reached the unchanged listener, which was never replaced"
    );
}

fn tcp_listener_any(name: &str, port: u16, cluster: &str) -> Any {
    any(
        &format!(
            r#"name: {name}
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
filter_chains: [ {{ filters: [ {{ name: t, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {name}, cluster: {cluster} }} }} ] }} ]"#
        ),
        "envoy.config.listener.v3.Listener",
        LISTENER,
    )
}

pub(crate) fn static_cluster_any(name: &str, up: SocketAddr) -> Any {
    any(
        &format!(
            "name: {name}\nload_assignment: {{ cluster_name: {name}, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }} ] }} ] }}",
            up.port()
        ),
        "envoy.config.cluster.v3.Cluster",
        CLUSTER,
    )
}

async fn listeners_warm_until_their_clusters_arrive(api: &str) {
    let mock = mock().await;
    let server = start(&bootstrap(mock.addr(), api), Duration::from_millis(200)).await;
    let a = tagged_server(b"A").await;
    let b = tagged_server(b"B").await;
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    // A new listener whose cluster does not exist yet: bound (so a bind error would still NACK) but warming.
    let v = mock.set(LISTENER, vec![tcp_listener_any("w", port, "cluster-a")]).unwrap();
    acked(&mock, LISTENER, &v).await;
    assert_eq!(gauge(&server, "listener_manager.total_listeners_warming"), 1);
    assert_eq!(gauge(&server, "listener_manager.total_listeners_active"), 0);
    // A connection made while warming waits in the accept queue and is served once the listener is active.
    let mut early = TcpStream::connect(addr).await.unwrap();
    let v = mock.set(CLUSTER, vec![static_cluster_any("cluster-a", a)]).unwrap();
    acked(&mock, CLUSTER, &v).await;
    let mut tag = [0u8; 1];
    tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_exact(&mut early, &mut tag)).await.unwrap().unwrap();
    assert_eq!(&tag, b"A");
    assert_eq!(gauge(&server, "listener_manager.total_listeners_warming"), 0);

    // An update that needs a missing cluster warms while the current version keeps serving.
    let v = mock.set(LISTENER, vec![tcp_listener_any("w", port, "cluster-b")]).unwrap();
    acked(&mock, LISTENER, &v).await;
    assert_eq!(gauge(&server, "listener_manager.total_listeners_warming"), 1);
    let mut s = TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut tag).await.unwrap();
    assert_eq!(&tag, b"A", "the serving version stays while the update warms");
    let v = mock.set(CLUSTER, vec![static_cluster_any("cluster-a", a), static_cluster_any("cluster-b", b)]).unwrap();
    acked(&mock, CLUSTER, &v).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut tag).await.unwrap();
    assert_eq!(&tag, b"B", "the warmed version took over");
}

both_protocols!(
    listeners_warm_until_their_clusters_arrive,
    churn_of_1000_pushes_never_disturbs_an_unchanged_listener,
    listeners_added_updated_and_removed_through_ads,
    bad_listeners_are_nacked_by_name_and_the_good_ones_still_apply,
    eds_cluster_from_cds_carries_traffic,
    losing_the_control_plane_keeps_traffic_and_a_restart_reapplies_nothing
);

/// `cds_config.initial_fetch_timeout` bounds how long a listener waits for its clusters (Envoy's init target
/// timeout); the listener then serves, and its connections to the missing cluster fail fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_stops_warming_after_the_cds_initial_fetch_timeout() {
    let mock = mock().await;
    let yaml = bootstrap(mock.addr(), "GRPC")
        .replace("cds_config: { ads: {} }", "cds_config: { ads: {}, initial_fetch_timeout: 0.3s }");
    assert!(yaml.contains("initial_fetch_timeout: 0.3s"));
    let server = start(&yaml, Duration::from_millis(200)).await;
    let port = free_port();
    let v = mock.set(LISTENER, vec![tcp_listener_any("w", port, "never-arrives")]).unwrap();
    acked(&mock, LISTENER, &v).await;
    assert_eq!(gauge(&server, "listener_manager.total_listeners_warming"), 1);
    let started = std::time::Instant::now();
    eventually("listener active without its cluster", WAIT, async || {
        gauge(&server, "listener_manager.total_listeners_active") == 1
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
}
