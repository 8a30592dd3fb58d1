//! Listeners added, changed and removed at runtime through the ListenerManager while connections are open.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use xds_proxy::listener::manager::{ListenerError, Outcome};

use crate::common::*;

fn clusters_only(up: std::net::SocketAddr) -> String {
    format!("static_resources:\n  clusters:{}\n", static_cluster("echo", &[up]))
}

fn echo_listener(name: &str, port: u16, extra: &str) -> String {
    format!(
        r#"
name: {name}
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
{extra}
filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: {name}
      cluster: echo"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_and_removed_listeners_drain_their_connections() {
    let up = echo_server().await;
    let server = start(&clusters_only(up), Duration::from_millis(800)).await;
    let port = free_port();
    let added = server.listener_manager().add_or_update(listener(&echo_listener("l", port, "")), false);
    assert_eq!(added, Ok(Outcome::Added));
    let addr = listener_addr(&server, "l");
    let mut old = TcpStream::connect(addr).await.unwrap();
    assert!(echo_ok(&mut old, b"v1").await);

    // A change outside the filter chains: a full update; the old connection drains.
    let v2 = direct_listener("l", port, "v2", "per_connection_buffer_limit_bytes: 65536");
    assert_eq!(server.listener_manager().add_or_update(listener(&v2), false), Ok(Outcome::Updated));
    assert_eq!(listener_addr(&server, "l"), addr, "same address, same socket");
    assert_eq!(fetch(addr).await.unwrap(), b"v2", "a new connection gets the new config");
    assert!(echo_ok(&mut old, b"still served while draining").await);
    let t = Instant::now();
    let rest = tokio::time::timeout(Duration::from_secs(5), read_to_end(&mut old)).await.unwrap();
    assert!(rest.is_empty());
    assert!(t.elapsed() >= Duration::from_millis(400), "closed before the drain deadline: {:?}", t.elapsed());
    assert_eq!(gauge(&server, "listener_manager.total_listeners_active"), 1);

    // Removal: no new connections; the open one drains.
    let accepted = counter(&server, &format!("listener.127.0.0.1_{port}.downstream_cx_total"));
    let mut open = TcpStream::connect(addr).await.unwrap();
    // Only a connection a worker has accepted belongs to a chain; one still in the kernel queue is reset with the
    // socket, as in Envoy.
    eventually("connection accepted", Duration::from_secs(5), async || {
        counter(&server, &format!("listener.127.0.0.1_{port}.downstream_cx_total")) > accepted
    })
    .await;
    assert!(server.listener_manager().remove("l").unwrap());
    eventually("listener socket closed", Duration::from_secs(5), async || TcpStream::connect(addr).await.is_err())
        .await;
    let rest = tokio::time::timeout(Duration::from_secs(5), read_to_end(&mut open)).await.unwrap();
    assert_eq!(rest, b"v2", "an accepted connection is still served by its chain");
    assert_eq!(counter(&server, "listener_manager.listener_removed"), 1);
    assert_eq!(counter(&server, "listener_manager.listener_modified"), 1);
    eventually("drains finished", Duration::from_secs(5), async || {
        gauge(&server, "listener_manager.total_listeners_draining") == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_is_refused_across_100_updates() {
    let server = start("static_resources: {}", Duration::from_millis(200)).await;
    let port = free_port();
    let v = |i: usize| {
        // Alternate a listener-level field so every update is a full update on the same sockets.
        listener(&direct_listener(
            "l",
            port,
            &format!("v{i}"),
            &format!("tcp_backlog_size: 128\nstat_prefix: s{}", i % 2),
        ))
    };
    assert_eq!(server.listener_manager().add_or_update(v(0), false), Ok(Outcome::Added));
    let addr = listener_addr(&server, "l");

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, failures) = (stop.clone(), failures.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = HashSet::new();
            let mut ok = 0usize;
            while !stop.load(Ordering::Relaxed) {
                match fetch(addr).await {
                    Ok(body) if !body.is_empty() => {
                        ok += 1;
                        seen.insert(body);
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            (ok, seen)
        }));
    }
    for i in 1..=100 {
        assert_eq!(server.listener_manager().add_or_update(v(i), false), Ok(Outcome::Updated));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut versions = HashSet::new();
    for c in clients {
        let (ok, seen) = c.await.unwrap();
        total += ok;
        versions.extend(seen);
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "failed connections out of {total}");
    assert!(total > 100, "only {total} connections made");
    assert!(versions.len() > 10, "only {} versions seen", versions.len());
}

#[tokio::test]
async fn bind_conflict_fails_that_listener_only() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let server = start("static_resources: {}", Duration::from_secs(1)).await;
    let good_port = free_port();
    let results = server.listener_manager().apply_sotw(
        vec![
            listener(&direct_listener("good", good_port, "ok", "")),
            listener(&direct_listener("bad", taken_port, "never", "")),
        ],
        &HashSet::new(),
    );
    assert_eq!(results[0], ("good".to_string(), Ok(Outcome::Added)));
    let (name, bad) = &results[1];
    assert_eq!(name, "bad");
    let msg = bad.as_ref().err().map(ToString::to_string).unwrap_or_default();
    assert_eq!(msg, format!("cannot bind '127.0.0.1:{taken_port}': Address already in use (os error 98)"));
    assert_eq!(fetch(listener_addr(&server, "good")).await.unwrap(), b"ok");
    assert_eq!(counter(&server, "listener_manager.listener_create_failure"), 1);
    drop(taken);
}

#[tokio::test]
async fn in_place_filter_chain_update_drains_only_changed_chains() {
    let up = echo_server().await;
    let server = start(&clusters_only(up), Duration::from_millis(500)).await;
    let port = free_port();
    let chain = |name: &str, prefix: &str| {
        format!(
            r#"{{ name: {name}, filters: [ {{ name: envoy.filters.network.tcp_proxy, typed_config: {{ "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", stat_prefix: {prefix}, cluster: echo }} }} ] }}"#
        )
    };
    let with = |chains: &str| {
        format!(
            "name: l\naddress: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}\n\
             default_filter_chain: {}\nfilter_chains: [{chains}]\n",
            chain("default", "d")
        )
    };
    // Only the default chain: the first connection lands there.
    let lm = |s: &xds_proxy::server::Server, yaml: String| s.listener_manager().add_or_update(listener(&yaml), false);
    assert_eq!(lm(&server, with("")), Ok(Outcome::Added));
    let addr = listener_addr(&server, "l");
    let mut on_default = TcpStream::connect(addr).await.unwrap();
    assert!(echo_ok(&mut on_default, b"d").await);

    // Add chain A: in place, the default chain's connection stays; new connections go to A.
    let a = chain("a", "a1");
    assert_eq!(lm(&server, with(&a)), Ok(Outcome::InPlaceUpdated));
    let mut on_a = TcpStream::connect(addr).await.unwrap();
    assert!(echo_ok(&mut on_a, b"a").await);
    assert_eq!(counter(&server, "tcp.a1.downstream_cx_total"), 1);

    // Change chain A: its connection drains; the default chain's connection is untouched.
    let a2 = a.replace("stat_prefix: a1", "stat_prefix: a2");
    assert_eq!(lm(&server, with(&a2)), Ok(Outcome::InPlaceUpdated));
    let rest = tokio::time::timeout(Duration::from_secs(5), read_to_end(&mut on_a)).await.unwrap();
    assert!(rest.is_empty(), "the changed chain's connection is closed at the drain deadline");
    assert!(echo_ok(&mut on_default, b"default chain kept").await);
    assert_eq!(counter(&server, "listener_manager.listener_in_place_updated"), 2);
    let mut on_a2 = TcpStream::connect(addr).await.unwrap();
    assert!(echo_ok(&mut on_a2, b"a2").await);
    assert_eq!(counter(&server, "tcp.a2.downstream_cx_total"), 1);
}

#[tokio::test]
async fn duplicate_name_duplicate_address_and_reuse_port_change_are_rejected() {
    let server = start("static_resources: {}", Duration::from_secs(1)).await;
    let port = free_port();
    let results = server.listener_manager().apply_sotw(
        vec![
            listener(&direct_listener("a", port, "a", "")),
            listener(&direct_listener("a", port, "again", "")),
            listener(&direct_listener("b", port, "b", "")),
        ],
        &HashSet::new(),
    );
    assert_eq!(results[0].1, Ok(Outcome::Added));
    assert_eq!(results[1].1, Err(ListenerError::DuplicateName("a".into())));
    let dup = results[2].1.clone().err().map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(
        dup,
        format!("error adding listener 'b': has duplicate address '127.0.0.1:{port}' as existing listener 'a'")
    );
    let changed = listener(&direct_listener("a", port, "a", "enable_reuse_port: false"));
    assert_eq!(
        server.listener_manager().add_or_update(changed, false),
        Err(ListenerError::ReusePortChanged("a".into()))
    );
    assert_eq!(fetch(listener_addr(&server, "a")).await.unwrap(), b"a", "the rejected updates left 'a' serving");
}

#[tokio::test]
async fn an_address_can_move_between_listeners_in_one_update() {
    let server = start("static_resources: {}", Duration::from_millis(100)).await;
    let port = free_port();
    let first =
        server.listener_manager().apply_sotw(vec![listener(&direct_listener("old", port, "old", ""))], &HashSet::new());
    assert_eq!(first[0].1, Ok(Outcome::Added));
    let moved =
        server.listener_manager().apply_sotw(vec![listener(&direct_listener("new", port, "new", ""))], &HashSet::new());
    assert_eq!(moved, vec![("new".to_string(), Ok(Outcome::Added))]);
    let names: Vec<String> = server.listener_manager().listeners().into_iter().map(|l| l.name).collect();
    assert_eq!(names, vec!["new".to_string()]);
    assert_eq!(fetch(listener_addr(&server, "new")).await.unwrap(), b"new");
}

#[tokio::test]
async fn static_listeners_cannot_be_removed_or_changed_by_lds() {
    let port = free_port();
    let bootstrap = format!(
        r#"
static_resources:
  listeners:
  - name: s
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.direct_response
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config
          response: {{ inline_string: static }}
"#
    );
    let server = start(&bootstrap, Duration::from_secs(1)).await;
    let results = server.listener_manager().apply_sotw(vec![], &HashSet::new());
    assert!(results.is_empty());
    assert_eq!(server.listener_manager().listeners().len(), 1, "a SotW update leaves static listeners alone");
    let change = listener(&direct_listener("s", port, "changed", ""));
    assert_eq!(server.listener_manager().add_or_update(change, false), Err(ListenerError::Static("s".into())));
    assert_eq!(server.listener_manager().remove("s"), Err(ListenerError::Static("s".into())));
    let mut s = TcpStream::connect(listener_addr(&server, "s")).await.unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.unwrap();
    assert_eq!(body, b"static");
}

/// CPUs listed the way /proc shows them ("0-2,5").
fn cpu_list(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => out.push(part.parse().unwrap()),
        }
    }
    out
}

/// Each thread of this process named `name`, with the CPUs it may run on.
fn threads_named(name: &str) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if let Some(list) = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")) {
            out.push(cpu_list(list));
        }
    }
    out
}

/// Envoy's bootstrap `enable_worker_cpu_affinity` pins worker i to the i-th CPU the process may use (none pinned
/// when there are more workers than CPUs), and a listener with `connection_balance_config.cpu_locality_balance`
/// hands each connection to the worker on the CPU that received it; an update that switches it off keeps the
/// sockets and lets the kernel's hash decide again. The other balancers are refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_workers_serve_a_cpu_locality_balanced_listener() {
    let server = start("enable_worker_cpu_affinity: true\n", Duration::from_secs(1)).await;
    let port = free_port();
    let steered =
        |extra: &str| listener(&direct_listener("steered", port, "steered", &format!("stat_prefix: steered{extra}")));
    let on = steered("\nconnection_balance_config: { cpu_locality_balance: {} }");
    assert_eq!(server.listener_manager().add_or_update(on, false), Ok(Outcome::Added));
    let addr = listener_addr(&server, "steered");
    assert_eq!(fetch(addr).await.unwrap(), b"steered");

    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let allowed = cpu_list(status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap());
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut version = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    if allowed.len() < 2 || (version.next().unwrap_or(0), version.next().unwrap_or(0)) < (6, 2) {
        // One CPU: two workers cannot be pinned (Envoy's rule), and every thread here runs on that CPU anyway.
        // Before Linux 6.2 the kernel ignores the steering (the listener serves without it, with a warning).
        return;
    }
    // Other tests' workers run unpinned at the same time: a worker on exactly one CPU is this server's.
    let pinned = |name: &str| threads_named(name).into_iter().filter(|cpus| cpus.len() == 1).collect::<Vec<_>>();
    assert_eq!(pinned("worker_0"), vec![vec![allowed[0]]]);
    assert_eq!(pinned("worker_1"), vec![vec![allowed[1]]]);

    // Connections made on each worker's CPU in turn (on loopback the handshake is handled there); which worker
    // served each, from the per-worker counters.
    let per_worker = |i: usize| format!("listener.steered.worker_{i}.downstream_cx_total");
    let counts = || [counter(&server, &per_worker(0)), counter(&server, &per_worker(1))];
    let served_by = |rounds: usize| {
        let cpus = [allowed[0], allowed[1]];
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut workers = Vec::new();
                    for i in (0..rounds).flat_map(|_| [0, 1]) {
                        // SAFETY: an all-zero cpu_set_t is a valid empty set; the CPU number is below CPU_SETSIZE.
                        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                        unsafe { libc::CPU_SET(cpus[i], &mut set) };
                        // SAFETY: pins this test-owned thread only.
                        let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
                        assert_eq!(rc, 0, "pin to CPU {}", cpus[i]);
                        let before = counts();
                        let mut c = std::net::TcpStream::connect(addr).unwrap();
                        let mut out = Vec::new();
                        std::io::Read::read_to_end(&mut c, &mut out).unwrap();
                        assert_eq!(out, b"steered");
                        let after = counts();
                        workers.push(if after[0] > before[0] { 0 } else { 1 });
                    }
                    workers
                })
                .join()
                .unwrap()
        })
    };
    assert_eq!(served_by(3), [0, 1, 0, 1, 0, 1], "each connection on the worker of the CPU it came in on");

    assert_eq!(server.listener_manager().add_or_update(steered(""), false), Ok(Outcome::Updated));
    assert_eq!(listener_addr(&server, "steered"), addr);
    let hashed = served_by(16);
    assert_ne!(hashed, [0, 1].repeat(16), "switched off: the kernel's hash picks the worker");

    let err = listener_error(&direct_listener("exact", 0, "x", "connection_balance_config: { exact_balance: {} }"));
    assert!(err.contains("connection_balance_config.exact_balance: not supported"), "{err}");
}
