//! Filter chains at runtime and the one function that picks a chain for a connection.
//!
//! A chain is immutable and shared (`Arc`) by every worker and by every listener version that keeps it: an
//! in-place filter chain update hands the same `Arc` (with the same drain) to the new listener, so its
//! connections live on.

use std::sync::Arc;

use super::chain_match::{ChainIndex, ConnAttrs};
use super::filters::Detected;
use crate::config::listener::{FilterChainConfig, NetworkFilterConfig};
use crate::drain::DrainTrigger;
use crate::network::http::HttpConnectionManager;
use crate::network::http::rds::RouteRegistry;
use crate::network::tcp_proxy::TcpProxy;
use crate::stats::Store;
use crate::tls::SslStats;
use tracing::warn;

#[derive(Debug)]
pub enum NetworkFilter {
    TcpProxy(Box<TcpProxy>),
    Http(Arc<HttpConnectionManager>),
    DirectResponse(Arc<[u8]>),
}

#[derive(Debug)]
pub struct FilterChain {
    pub config: Arc<FilterChainConfig>,
    pub filter: NetworkFilter,
    /// Drains this chain's connections when the chain is removed or changed.
    pub drain: DrainTrigger,
    /// `listener.<addr>.ssl.*`, for chains that terminate TLS.
    pub ssl: Option<SslStats>,
}

impl FilterChain {
    pub fn new(config: Arc<FilterChainConfig>, stats: &Store, routes: &RouteRegistry, listener_prefix: &str) -> Self {
        let http_skipped = match config.terminal() {
            NetworkFilterConfig::HttpConnectionManager(h) => h.skipped_filters.as_slice(),
            _ => &[],
        };
        report_skipped(config.skipped.iter().chain(http_skipped), stats);
        let filter = match config.terminal() {
            NetworkFilterConfig::TcpProxy(tp) => NetworkFilter::TcpProxy(Box::new(TcpProxy::new(tp.clone(), stats))),
            NetworkFilterConfig::HttpConnectionManager(h) => {
                NetworkFilter::Http(Arc::new(HttpConnectionManager::new((**h).clone(), stats, routes)))
            }
            NetworkFilterConfig::DirectResponse(bytes) => NetworkFilter::DirectResponse(bytes.clone().into()),
        };
        let ssl = config.tls.as_ref().map(|_| SslStats::new(stats, listener_prefix));
        FilterChain { config, filter, drain: DrainTrigger::new(), ssl }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }
}

/// Counts every skipped filter in `filters_skipped` and warns once per filter name per process: an Istio config
/// carries the same telemetry filters on every chain, and one line per name says all there is to say.
fn report_skipped<'a>(names: impl Iterator<Item = &'a String>, stats: &Store) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    for name in names {
        stats.counter("listener_manager.filters_skipped").inc();
        let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
        if !warned.contains(name) {
            warn!(filter = %name, "skipping a filter that is pass-through on this proxy (Istio telemetry, or an empty config)");
            warned.push(name.clone());
        }
    }
}

/// A listener's chains and the index that selects among them.
#[derive(Debug, Clone, Default)]
pub struct ChainSet {
    pub chains: Vec<Arc<FilterChain>>,
    pub default: Option<Arc<FilterChain>>,
    index: Arc<ChainIndex>,
}

impl ChainSet {
    /// Builds the chains for a listener, reusing chains from `previous` whose proto is unchanged (Envoy's in-place
    /// filter chain update keeps those chains' connections).
    pub fn build(
        configs: &[Arc<FilterChainConfig>],
        default: Option<&Arc<FilterChainConfig>>,
        index: Arc<ChainIndex>,
        previous: Option<&ChainSet>,
        stats: &Store,
        routes: &RouteRegistry,
        listener_prefix: &str,
    ) -> ChainSet {
        let reuse_or_build = |c: &Arc<FilterChainConfig>| {
            previous
                .and_then(|p| p.all().find(|old| old.config.proto() == c.proto()))
                .cloned()
                .unwrap_or_else(|| Arc::new(FilterChain::new(c.clone(), stats, routes, listener_prefix)))
        };
        ChainSet { chains: configs.iter().map(reuse_or_build).collect(), default: default.map(reuse_or_build), index }
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<FilterChain>> {
        self.chains.iter().chain(self.default.iter())
    }

    /// The chain for a connection (Envoy's matching, see [`super::chain_match`]), else the default chain; `None`
    /// means close it and count `no_filter_chain_match`.
    pub fn select(&self, det: &Detected) -> Option<&Arc<FilterChain>> {
        let attrs = ConnAttrs {
            destination: det.local,
            source: det.peer,
            direct_source: det.direct_peer.ip(),
            server_name: det.server_name.as_deref(),
            transport_protocol: det.transport,
            application_protocols: &det.alpn,
        };
        self.index.select(&attrs).and_then(|i| self.chains.get(i)).or(self.default.as_ref())
    }

    /// Chains of `self` that `next` does not keep: the ones to drain after an update.
    pub fn dropped_by<'a>(&'a self, next: &'a ChainSet) -> impl Iterator<Item = &'a Arc<FilterChain>> {
        self.all().filter(move |c| !next.all().any(|n| Arc::ptr_eq(c, n)))
    }
}
