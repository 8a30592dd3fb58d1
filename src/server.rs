//! Wires the process together: the main runtime (control: config, cluster and listener managers, drains), the
//! worker threads (data), and shutdown.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tracing::info;

use crate::config::bootstrap::BootstrapConfig;
use crate::drain::DrainStrategy;
use crate::listener::manager::{DrainSettings, ListenerError, ListenerManager};
use crate::listener::socket::{SocketFactory, SystemSockets};
use crate::listener::worker::Workers;
use crate::stats::Store;
use crate::upstream::ClusterManager;
use crate::xds::client::AdsClient;

/// How long start-up waits for DNS clusters' first answers before listeners start anyway.
const DNS_WARM_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Options {
    /// Worker threads (`--concurrency`).
    pub concurrency: usize,
    pub drain_time: Duration,
    pub drain_strategy: DrainStrategy,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: std::thread::available_parallelism().map_or(1, usize::from),
            drain_time: Duration::from_secs(600),
            drain_strategy: DrainStrategy::Gradual,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start workers: {0}")]
    Workers(std::io::Error),
    #[error("static_resources.listeners: {name}: {error}")]
    Listener { name: String, error: ListenerError },
}

/// A running proxy. Dropping it without [`Server::shutdown`] stops the workers abruptly.
#[derive(Debug)]
pub struct Server {
    pub listeners: Arc<Mutex<ListenerManager>>,
    pub clusters: Arc<Mutex<ClusterManager>>,
    pub stats: Store,
    pub bootstrap: Arc<BootstrapConfig>,
    /// Stops the background tasks (ADS, warming timeouts) at shutdown.
    background: tokio_util::sync::CancellationToken,
}

impl Server {
    /// Starts workers, static clusters and static listeners. Must run on the main runtime.
    pub async fn start(bootstrap: BootstrapConfig, options: &Options) -> Result<Server, StartError> {
        Self::start_with_sockets(bootstrap, options, Box::new(SystemSockets)).await
    }

    pub async fn start_with_sockets(
        bootstrap: BootstrapConfig,
        options: &Options,
        sockets: Box<dyn SocketFactory>,
    ) -> Result<Server, StartError> {
        let stats = Store::default();
        stats.gauge("server.state").set(ServerState::Initializing as i64);
        stats.gauge("server.concurrency").set(options.concurrency as i64);
        stats.register_counter("access_log.lines_dropped", &crate::config::access_log::DROPPED);
        let mut clusters = ClusterManager::new(stats.clone());
        for c in &bootstrap.clusters {
            clusters.add_static(c.clone());
        }
        clusters.wait_ready(DNS_WARM_TIMEOUT).await;

        let workers =
            Workers::start(options.concurrency.max(1), clusters.published(), &stats).map_err(StartError::Workers)?;
        let drain = DrainSettings { drain_time: options.drain_time, strategy: options.drain_strategy };
        let mut listeners = ListenerManager::new(workers, sockets, drain, stats.clone(), clusters.published());
        listeners.set_cluster_wait(bootstrap.cds_initial_fetch_timeout());
        for l in &bootstrap.listeners {
            listeners.add_static(l.clone()).map_err(|error| StartError::Listener { name: l.name.clone(), error })?;
        }
        listeners.start_workers().await;
        let server = Server {
            listeners: Arc::new(Mutex::new(listeners)),
            clusters: Arc::new(Mutex::new(clusters)),
            stats: stats.clone(),
            bootstrap: Arc::new(bootstrap),
            background: tokio_util::sync::CancellationToken::new(),
        };
        // Warming listeners time out even when no cluster update comes to wake them.
        let warming = Arc::downgrade(&server.listeners);
        let stop = server.background.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let Some(lm) = warming.upgrade() else { return };
                lm.lock().unwrap_or_else(|p| p.into_inner()).promote_warming();
            }
        });
        if let Some((cluster, protocol)) = &server.bootstrap.ads_cluster {
            let ads = AdsClient {
                cluster: cluster.clone(),
                protocol: *protocol,
                node: server.bootstrap.node.clone(),
                listeners: server.listeners.clone(),
                clusters: server.clusters.clone(),
                stats: stats.clone(),
                stop: server.background.clone(),
            };
            tokio::spawn(ads.run());
        }
        stats.gauge("server.state").set(ServerState::Live as i64);
        info!(workers = options.concurrency, listeners = server.bootstrap.listeners.len(), "server live");
        Ok(server)
    }

    pub fn listener_manager(&self) -> MutexGuard<'_, ListenerManager> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn cluster_manager(&self) -> MutexGuard<'_, ClusterManager> {
        self.clusters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops accepting everywhere, drains every connection (graceful, then forced at the drain time), stops the
    /// workers.
    pub async fn shutdown(self) {
        self.stats.gauge("server.state").set(ServerState::Draining as i64);
        info!("shutting down: draining listeners");
        self.background.cancel();
        let drained = self.listener_manager().shutdown();
        drained.await;
        let mut lm = self.listener_manager();
        lm.stop_workers();
        info!("shutdown complete");
    }
}

/// Envoy's `server.state` values.
#[derive(Debug, Clone, Copy)]
pub enum ServerState {
    Live = 0,
    Draining = 1,
    PreInitializing = 2,
    Initializing = 3,
}
