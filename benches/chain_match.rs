//! Benchmarks filter chain selection (`listener::chain_match`) against the number of chains: selection should stay
//! under 1 µs and flat from 10 to 10,000 chains, and compiling 10,000 chains should take under 50 ms.
//!
//! Run: `cargo bench --bench chain_match`. The chains mix exact and port-less destination ports, no prefix, /16
//! and /24 destination prefixes, exact and wildcard server names and listed or unlisted ALPN, so every level of
//! the index is populated; each chain is unique by its server name, so none overlap.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3::FilterChainMatch;
use envoy_types::pb::google::protobuf::UInt32Value;
use xds_proxy::listener::chain_match::{ChainIndex, ChainMatch, ConnAttrs};

const SIZES: [usize; 3] = [10, 1_000, 10_000];
/// Port for connections to chains without a destination port: no chain names it.
const UNNAMED_PORT: u16 = 9999;

fn port_of(i: usize) -> Option<u16> {
    // Every fourth chain has no destination port; the others spread over 64 ports.
    (!i.is_multiple_of(4)).then(|| 8000 + (i % 64) as u16)
}

/// The destination prefix of chain `i` (none, a /16 or a /24) and an address that selects it.
fn prefix_of(i: usize) -> (Option<(Ipv4Addr, u32)>, Ipv4Addr) {
    let (b, c) = ((i % 200) as u8, ((i / 200) % 250) as u8);
    match i % 3 {
        0 => (None, Ipv4Addr::new(192, 0, 2, 1)),
        // No /24 uses a third byte of 255, so this address stays on the /16.
        1 => (Some((Ipv4Addr::new(10, b, 0, 0), 16)), Ipv4Addr::new(10, b, 255, 1)),
        _ => (Some((Ipv4Addr::new(10, b, c, 0), 24)), Ipv4Addr::new(10, b, c, 1)),
    }
}

fn chain(i: usize) -> FilterChainMatch {
    let (prefix, _) = prefix_of(i);
    FilterChainMatch {
        destination_port: port_of(i).map(|p| UInt32Value { value: u32::from(p) }),
        prefix_ranges: prefix
            .map(|(addr, len)| CidrRange {
                address_prefix: addr.to_string(),
                prefix_len: Some(UInt32Value { value: len }),
            })
            .into_iter()
            .collect(),
        server_names: vec![if i.is_multiple_of(2) {
            format!("svc{i}.ns{}.example.com", i % 97)
        } else {
            format!("*.ns{i}.example.com")
        }],
        transport_protocol: "tls".to_owned(),
        application_protocols: if i.is_multiple_of(5) {
            vec!["h2".to_owned(), "http/1.1".to_owned()]
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

fn matches(n: usize) -> Vec<ChainMatch> {
    (0..n)
        .map(|i| match ChainMatch::from_proto(&chain(i)) {
            Ok(m) => m,
            Err(e) => panic!("chain {i}: {e}"),
        })
        .collect()
}

/// A connection owned by the bench; `attrs` borrows it.
struct Conn {
    destination: SocketAddr,
    sni: String,
    alpn: Vec<String>,
}

impl Conn {
    fn attrs(&self) -> ConnAttrs<'_> {
        let source = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(172, 16, 0, 9)), 40000);
        ConnAttrs {
            destination: self.destination,
            source,
            direct_source: source.ip(),
            server_name: Some(&self.sni),
            transport_protocol: "tls",
            application_protocols: &self.alpn,
        }
    }
}

/// A connection that selects chain `i`; wildcard chains get a name two labels below the wildcard, so the lookup
/// tries three names before it hits.
fn conn_for(i: usize) -> Conn {
    let (_, ip) = prefix_of(i);
    let sni =
        if i.is_multiple_of(2) { format!("svc{i}.ns{}.example.com", i % 97) } else { format!("a.b.ns{i}.example.com") };
    Conn {
        destination: SocketAddr::new(IpAddr::V4(ip), port_of(i).unwrap_or(UNNAMED_PORT)),
        sni,
        alpn: vec!["h2".to_owned(), "http/1.1".to_owned()],
    }
}

fn build(n: usize) -> ChainIndex {
    match ChainIndex::build(&matches(n)) {
        Ok(index) => index,
        Err(e) => panic!("{n} chains: {e}"),
    }
}

fn select(c: &mut Criterion) {
    let mut group = c.benchmark_group("select");
    for n in SIZES {
        let index = build(n);
        // 256 connections spread over the chains, each checked to select its chain.
        let hits: Vec<(usize, Conn)> = (0..256).map(|k| k * n / 256).map(|i| (i, conn_for(i))).collect();
        for (i, conn) in &hits {
            assert_eq!(index.select(&conn.attrs()), Some(*i), "{}", index.explain(&conn.attrs()));
        }
        let hits: Vec<Conn> = hits.into_iter().map(|(_, conn)| conn).collect();
        group.bench_with_input(BenchmarkId::new("hit", n), &hits, |b, conns| {
            let mut k = 0usize;
            b.iter(|| {
                k = k.wrapping_add(1);
                index.select(black_box(&conns[k % conns.len()].attrs()))
            })
        });

        // A name no chain lists, on a named port: exact and wildcard lookups all miss, then there is no
        // chain without server names.
        let miss = Conn {
            destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 255, 1)), 8001),
            sni: "www.unknown.example.org".to_owned(),
            alpn: vec!["h2".to_owned()],
        };
        assert_eq!(index.select(&miss.attrs()), None);
        group.bench_function(BenchmarkId::new("miss", n), |b| b.iter(|| index.select(black_box(&miss.attrs()))));
    }
    group.finish();
}

fn build_index(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.sample_size(20);
    let all = matches(10_000);
    // The old index is dropped off the connection path when a listener update replaces it: time building only.
    group.bench_function("10000", |b| b.iter_with_large_drop(|| ChainIndex::build(black_box(&all))));
    // Both, for the cost of a whole listener update.
    group.bench_function("10000_and_drop", |b| b.iter(|| ChainIndex::build(black_box(&all)).is_ok()));
    group.finish();
}

criterion_group!(benches, select, build_index);
criterion_main!(benches);
