//! Cost of the hand-off by original destination: accept-to-first-byte through a listener that serves the
//! connection itself vs one that hands it to a `bind_to_port: false` listener. Both run the same PROXY protocol
//! listener filter (which restores the destination here, as SO_ORIGINAL_DST does behind iptables), so the
//! difference is the hand-off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use xds_proxy::config::bootstrap::{BootstrapConfig, NodeOverrides};
use xds_proxy::config::proto;
use xds_proxy::drain::DrainStrategy;
use xds_proxy::server::{Options, Server};

const PROXY_PROTOCOL: &str = r#"[ { name: envoy.filters.listener.proxy_protocol, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol } } ]"#;
const BODY: &str = r#"[ { name: d, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config, response: { inline_string: "x" } } } ]"#;
const HEADER: &[u8] = b"PROXY TCP4 10.9.9.9 10.1.2.3 5555 8080\r\n";

fn bootstrap() -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: direct
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    listener_filters: {PROXY_PROTOCOL}
    filter_chains: [ {{ filters: {BODY} }} ]
  - name: virtual
    address: {{ socket_address: {{ address: 127.0.0.2, port_value: 0 }} }}
    use_original_dst: true
    listener_filters: {PROXY_PROTOCOL}
    filter_chains: [ {{ filters: {BODY} }} ]
  - name: target
    address: {{ socket_address: {{ address: 10.1.2.3, port_value: 8080 }} }}
    bind_to_port: false
    filter_chains: [ {{ filters: {BODY} }} ]
"#
    )
}

fn first_byte(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(HEADER).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
}

fn handoff(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let b = proto::load_bootstrap(None, Some(&bootstrap())).unwrap();
    let b = BootstrapConfig::from_proto(b, &NodeOverrides::default()).unwrap();
    let opts = Options {
        concurrency: 1,
        drain_time: Duration::from_secs(1),
        drain_strategy: DrainStrategy::Immediate,
        ..Default::default()
    };
    let server = rt.block_on(Server::start(b, &opts)).unwrap();
    let addr = |name: &str| server.listener_manager().listeners().into_iter().find(|l| l.name == name).unwrap().address;
    let (direct, virt) = (addr("direct"), addr("virtual"));

    let mut g = c.benchmark_group("accept_to_first_byte");
    g.bench_function("direct listener", |b| b.iter(|| first_byte(direct)));
    g.bench_function("hand-off to bind_to_port:false listener", |b| b.iter(|| first_byte(virt)));
    g.finish();
    let target = server.stats.get("listener.10.1.2.3_8080.downstream_cx_total");
    assert!(matches!(target, Some(xds_proxy::stats::Value::Counter(n)) if n > 0), "the hand-off happened: {target:?}");
}

criterion_group!(benches, handoff);
criterion_main!(benches);
