//! Listeners: the manager that applies listener configs on the main thread, the sockets it binds, the filter
//! chains it builds, and the workers that accept and serve connections from immutable snapshots.

pub mod chain_match;
pub mod explain;
pub mod filter_chain;
pub mod filters;
pub mod manager;
pub mod socket;
pub mod worker;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use crate::config::listener::ListenerConfig;
use crate::stats::{Counter, Gauge, Histogram, Store};
use filter_chain::ChainSet;

#[derive(Debug, Clone)]
pub struct ListenerStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_cx_destroy: Counter,
    pub no_filter_chain_match: Counter,
    /// Connections still in their listener filters.
    pub downstream_pre_cx_active: Gauge,
    pub downstream_pre_cx_timeout: Counter,
    pub downstream_cx_length_ms: Histogram,
    /// Envoy's per-handler stats, by worker index: `worker_<i>.downstream_cx_total` and `.downstream_cx_active`.
    pub per_worker: Vec<(Counter, Gauge)>,
}

impl ListenerStats {
    pub fn new(store: &Store, prefix: &str, workers: usize) -> Self {
        let c = |s: &str| store.counter(&format!("listener.{prefix}.{s}"));
        // Envoy counts connections refused by the listener's connection limit here; that limit is a runtime key
        // (`envoy.resource_limits.listener.<name>.connection_limit`) and we have no runtime layers, so it stays 0,
        // as in an Envoy without that key.
        c("downstream_cx_overflow");
        ListenerStats {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_active: store.gauge(&format!("listener.{prefix}.downstream_cx_active")),
            downstream_cx_destroy: c("downstream_cx_destroy"),
            no_filter_chain_match: c("no_filter_chain_match"),
            downstream_pre_cx_active: store.gauge(&format!("listener.{prefix}.downstream_pre_cx_active")),
            downstream_pre_cx_timeout: c("downstream_pre_cx_timeout"),
            downstream_cx_length_ms: store.histogram(&format!("listener.{prefix}.downstream_cx_length_ms")),
            per_worker: (0..workers)
                .map(|i| {
                    let name = format!("listener.{prefix}.worker_{i}");
                    (
                        store.counter(&format!("{name}.downstream_cx_total")),
                        store.gauge(&format!("{name}.downstream_cx_active")),
                    )
                })
                .collect(),
        }
    }
}

/// Envoy's hand-off lookup (connection_handler_impl.cc, getBalancedHandlerByAddress): the listener on exactly
/// `dst`, else the wildcard listener of that port and family; an IPv4 destination also finds a `[::]` listener
/// with `ipv4_compat`.
pub fn handoff_lookup<'a, T: ?Sized>(
    dst: SocketAddr,
    get: impl Fn(&SocketAddr) -> Option<&'a T>,
    ipv4_compat: impl Fn(&T) -> bool,
) -> Option<&'a T> {
    if let Some(l) = get(&dst) {
        return Some(l);
    }
    let port = dst.port();
    let v6_any = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    match dst {
        SocketAddr::V4(_) => get(&SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)))
            .or_else(|| get(&v6_any).filter(|l| ipv4_compat(l))),
        SocketAddr::V6(_) => get(&v6_any),
    }
}

/// One version of a listener. Immutable: an update builds a new `Listener` (with a new id), possibly sharing this
/// one's sockets and chains.
#[derive(Debug)]
pub struct Listener {
    /// Unique per version; workers run one accept loop per (id, worker).
    pub id: u64,
    /// The bound address (port 0 resolved); the configured one for `bind_to_port: false`.
    pub local_address: SocketAddr,
    /// Bound sockets: one per worker with reuse_port, one shared otherwise, none without bind_to_port. Shared
    /// with later versions that keep the same socket spec, so queued connections survive an update. Only the
    /// manager and accept loops hold them: a removed listener's socket closes as soon as nobody accepts on it,
    /// however long its connections live.
    pub sockets: Arc<Vec<TcpListener>>,
    /// What connections hold for their life.
    pub core: Arc<ListenerCore>,
}

/// The part of a listener its connections need.
#[derive(Debug)]
pub struct ListenerCore {
    pub config: Arc<ListenerConfig>,
    pub chains: ChainSet,
    pub stats: ListenerStats,
    /// Connections still in their listener filters (no chain yet) watch this; it drains when the whole version goes
    /// (removal, or an update that is not in place), so they close at its deadline, as Envoy closes the sockets of
    /// a removed listener that never got past its listener filters. Shared with the next version of an in-place
    /// update, which keeps the listener (and its pending sockets) in Envoy.
    pub pending: Arc<crate::drain::DrainTrigger>,
}

impl Listener {
    pub fn name(&self) -> &str {
        &self.core.config.name
    }

    pub fn config(&self) -> &ListenerConfig {
        &self.core.config
    }

    pub fn chains(&self) -> &ChainSet {
        &self.core.chains
    }

    /// The socket worker `index` accepts on.
    pub fn socket_for_worker(&self, index: usize) -> Option<&TcpListener> {
        match self.sockets.len() {
            0 => None,
            n => self.sockets.get(index % n),
        }
    }
}
