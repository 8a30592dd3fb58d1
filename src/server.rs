//! Wires the process together: the main runtime (control: config, cluster and listener managers, drains, the
//! admin server), the worker threads (data), the server's state as Envoy reports it, and shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::admin::v3 as admin_pb;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::logging::LogControl;
use crate::config::bootstrap::BootstrapConfig;
use crate::drain::DrainStrategy;
use crate::listener::manager::{DrainSettings, ListenerError, ListenerManager};
use crate::listener::socket::{SocketFactory, SystemSockets};
use crate::listener::worker::Workers;
use crate::stats::{Gauge, Store};
use crate::upstream::ClusterManager;
use crate::xds::client::AdsClient;
use crate::xds::status::XdsStatus;

/// How long start-up waits for DNS clusters' first answers before listeners start anyway.
const DNS_WARM_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default `initial_fetch_timeout` of a config source.
const INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct Options {
    /// Worker threads (`--concurrency`).
    pub concurrency: usize,
    pub drain_time: Duration,
    pub drain_strategy: DrainStrategy,
    /// The command line as /server_info reports it.
    pub command_line: admin_pb::CommandLineOptions,
    /// The process's reloadable log filter, for /logging; None leaves /logging read-only.
    pub logging: Option<LogControl>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: std::thread::available_parallelism().map_or(1, usize::from),
            drain_time: Duration::from_secs(600),
            drain_strategy: DrainStrategy::Gradual,
            command_line: admin_pb::CommandLineOptions::default(),
            logging: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start workers: {0}")]
    Workers(std::io::Error),
    #[error("static_resources.listeners: {name}: {error}")]
    Listener { name: String, error: ListenerError },
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

/// A running proxy. Dropping it without [`Server::shutdown`] stops the workers abruptly.
#[derive(Debug)]
pub struct Server {
    pub listeners: Arc<Mutex<ListenerManager>>,
    pub clusters: Arc<Mutex<ClusterManager>>,
    pub stats: Store,
    pub bootstrap: Arc<BootstrapConfig>,
    /// Every xDS resource's version and ACK/NACK state (CSDS, /config_dump).
    pub xds_status: XdsStatus,
    /// `server.state`, health check failure and the admin's shutdown request.
    pub lifecycle: Arc<Lifecycle>,
    /// Stops the background tasks (ADS, warming timeouts) at shutdown.
    background: CancellationToken,
    /// The admin server's bound address, and what stops it once shutdown has drained.
    admin: Option<(SocketAddr, CancellationToken)>,
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
        let lifecycle = Arc::new(Lifecycle::new(stats.gauge("server.state")));
        stats.gauge("server.concurrency").set(options.concurrency as i64);
        stats.register_counter("access_log.lines_dropped", &crate::config::access_log::DROPPED);
        // Bound first, as Envoy does, so a taken admin port fails start-up before anything else happens.
        let admin_socket = bootstrap.admin_address.map(crate::admin::bind).transpose()?;
        let mut clusters = ClusterManager::new(stats.clone());
        clusters.set_secrets(bootstrap.secrets.clone());
        for c in &bootstrap.clusters {
            clusters.add_static(c.clone());
        }
        clusters.wait_ready(DNS_WARM_TIMEOUT).await;

        let local = crate::listener::worker::LocalInfo {
            health_check_failed: lifecycle.health_check_flag(),
            cluster: bootstrap.node.cluster.as_str().into(),
        };
        let pin = bootstrap.worker_cpu_affinity;
        let workers = Workers::start(options.concurrency.max(1), clusters.published(), &stats, local, pin)
            .map_err(StartError::Workers)?;
        let drain = DrainSettings { drain_time: options.drain_time, strategy: options.drain_strategy };
        let mut listeners = ListenerManager::new(workers, sockets, drain, stats.clone(), clusters.published());
        listeners.set_cluster_wait(bootstrap.cds_initial_fetch_timeout());
        listeners.set_secrets(bootstrap.secrets.clone());
        for l in &bootstrap.listeners {
            listeners.add_static(l.clone()).map_err(|error| StartError::Listener { name: l.name.clone(), error })?;
        }
        listeners.start_workers().await;
        let mut server = Server {
            listeners: Arc::new(Mutex::new(listeners)),
            clusters: Arc::new(Mutex::new(clusters)),
            stats: stats.clone(),
            bootstrap: Arc::new(bootstrap),
            xds_status: XdsStatus::default(),
            lifecycle,
            background: CancellationToken::new(),
            admin: None,
        };
        if let Some(socket) = admin_socket {
            let address = socket.local_addr().map_err(crate::admin::AdminError::Socket)?;
            let ctx = crate::admin::Context::new(
                server.listeners.clone(),
                server.clusters.clone(),
                stats.clone(),
                server.bootstrap.clone(),
                server.xds_status.clone(),
                server.lifecycle.clone(),
                options.command_line.clone(),
                options.logging.clone(),
            );
            let stop = CancellationToken::new();
            let admin_stop = stop.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::admin::serve(socket, ctx, admin_stop).await {
                    warn!("admin server stopped: {e}");
                }
            });
            server.admin = Some((address, stop));
        }
        // Warming clusters and listeners time out even when no update comes to wake them.
        let warming = Arc::downgrade(&server.listeners);
        let warming_clusters = Arc::downgrade(&server.clusters);
        let stop = server.background.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let Some(cm) = warming_clusters.upgrade() else { return };
                cm.lock().unwrap_or_else(|p| p.into_inner()).promote_warming();
                drop(cm);
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
                status: server.xds_status.clone(),
                stop: server.background.clone(),
            };
            tokio::spawn(ads.run());
        }
        // SDS streams of their own (api_config_source), started as TLS contexts come to name their clusters.
        let sds = crate::xds::sds::SdsContext {
            node: server.bootstrap.node.clone(),
            listeners: server.listeners.clone(),
            clusters: server.clusters.clone(),
            secrets: server.bootstrap.secrets.clone(),
            stats: stats.clone(),
            status: server.xds_status.clone(),
            stop: server.background.clone(),
        };
        tokio::spawn(sds.run());
        let fetches = initial_fetches(&server.bootstrap);
        // Bootstrap listeners waiting for SDS secrets hold the server in INITIALIZING too.
        let static_warming = !server.listener_manager().warming_names().is_empty();
        if fetches.is_empty() && !static_warming {
            server.lifecycle.initialized();
        } else {
            // Envoy's init manager: the server is not LIVE (so not ready for Istio's probe) until the first CDS and
            // LDS responses have been answered, each bounded by its config source's initial_fetch_timeout.
            let (status, lifecycle, stop) =
                (server.xds_status.clone(), server.lifecycle.clone(), server.background.clone());
            let listeners = Arc::downgrade(&server.listeners);
            tokio::spawn(async move {
                for (type_url, timeout) in fetches {
                    let answered = status.answered(type_url);
                    let done = async {
                        match timeout {
                            Some(t) => {
                                if tokio::time::timeout(t, answered).await.is_err() {
                                    warn!(type_url, "initial fetch timed out after {t:?}; continuing");
                                }
                            }
                            None => answered.await,
                        }
                    };
                    tokio::select! {
                        _ = done => {}
                        _ = stop.cancelled() => return,
                    }
                }
                // Then the first listeners must have warmed (their clusters, RDS route configurations and SDS secrets
                // arrived, or their own fetch timeouts passed), as Envoy's listener manager init target requires.
                loop {
                    let Some(lm) = listeners.upgrade() else { return };
                    let warming = lm.lock().unwrap_or_else(|p| p.into_inner()).warming_names().len();
                    drop(lm);
                    if warming == 0 {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
                lifecycle.initialized();
            });
        }
        info!(workers = options.concurrency, listeners = server.bootstrap.listeners.len(), "server started");
        Ok(server)
    }

    /// Where the admin server listens (its real port when the bootstrap asked for port 0).
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(a, _)| *a)
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
        self.lifecycle.shutting_down();
        info!("shutting down: draining listeners");
        self.background.cancel();
        let drained = self.listener_manager().shutdown();
        drained.await;
        let mut lm = self.listener_manager();
        lm.stop_workers();
        drop(lm);
        // The admin port stays up through the drain, so operators can watch it; it goes last.
        if let Some((_, stop)) = &self.admin {
            stop.cancel();
        }
        info!("shutdown complete");
    }
}

/// The xDS types whose first response the server waits for before it is LIVE, with their
/// `initial_fetch_timeout` (None: wait for ever, Envoy's meaning of 0). Only with ADS, the one client we have.
fn initial_fetches(bootstrap: &BootstrapConfig) -> Vec<(&'static str, Option<Duration>)> {
    let Some(dynamic) = bootstrap.dynamic_resources.as_ref().filter(|_| bootstrap.ads_cluster.is_some()) else {
        return Vec::new();
    };
    // CDS first, as Envoy initializes the cluster manager before it starts LDS.
    let mut out = Vec::new();
    if dynamic.cds_config.is_some() {
        out.push((crate::xds::CLUSTER, bootstrap.cds_initial_fetch_timeout()));
    }
    if let Some(lds) = &dynamic.lds_config {
        let timeout = lds
            .initial_fetch_timeout
            .as_ref()
            .and_then(|d| crate::config::duration(d, "dynamic_resources.lds_config.initial_fetch_timeout").ok())
            .unwrap_or(INITIAL_FETCH_TIMEOUT);
        out.push((crate::xds::LISTENER, (!timeout.is_zero()).then_some(timeout)));
    }
    out
}

/// Envoy's `server.state` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    Live = 0,
    Draining = 1,
    PreInitializing = 2,
    Initializing = 3,
}

impl ServerState {
    /// The name /ready prints (`envoy.admin.v3.ServerInfo.State`).
    pub fn name(self) -> &'static str {
        self.admin_state().as_str_name()
    }

    pub fn admin_state(self) -> admin_pb::server_info::State {
        use admin_pb::server_info::State;
        match self {
            ServerState::Live => State::Live,
            ServerState::Draining => State::Draining,
            ServerState::PreInitializing => State::PreInitializing,
            ServerState::Initializing => State::Initializing,
        }
    }
}

/// The server's life as Envoy reports it (`server.state`, /ready, /server_info), and the admin's requests to change
/// it. Envoy's rule: INITIALIZING until the initial xDS fetch is done, then LIVE, or DRAINING while health checks
/// are failed (/healthcheck/fail) or the server is shutting down.
#[derive(Debug)]
pub struct Lifecycle {
    started: SystemTime,
    initialized: AtomicBool,
    /// Shared with the workers, whose HTTP connections drain-close while it is set.
    health_check_failed: Arc<AtomicBool>,
    shutting_down: AtomicBool,
    gauge: Gauge,
    quit: CancellationToken,
}

impl Lifecycle {
    fn new(gauge: Gauge) -> Self {
        let l = Lifecycle {
            started: SystemTime::now(),
            initialized: AtomicBool::new(false),
            health_check_failed: Arc::new(AtomicBool::new(false)),
            shutting_down: AtomicBool::new(false),
            gauge,
            quit: CancellationToken::new(),
        };
        l.publish();
        l
    }

    pub fn state(&self) -> ServerState {
        if self.shutting_down.load(Ordering::Relaxed) {
            ServerState::Draining
        } else if !self.initialized.load(Ordering::Relaxed) {
            ServerState::Initializing
        } else if self.health_check_failed.load(Ordering::Relaxed) {
            ServerState::Draining
        } else {
            ServerState::Live
        }
    }

    /// When the server started (/server_info uptime, static resources' `last_updated`).
    pub fn started(&self) -> SystemTime {
        self.started
    }

    fn publish(&self) {
        self.gauge.set(self.state() as i64);
    }

    fn initialized(&self) {
        self.initialized.store(true, Ordering::Relaxed);
        self.publish();
        info!("all dependencies initialized: server {}", self.state().name());
    }

    fn shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.publish();
    }

    /// /healthcheck/fail and /healthcheck/ok.
    pub fn fail_health_check(&self, failed: bool) {
        self.health_check_failed.store(failed, Ordering::Relaxed);
        self.publish();
        info!(failed, "health check state changed");
    }

    /// Whether /healthcheck/fail is in force. Envoy's `envoy.filters.http.health_check` filter answers 503 and
    /// listeners with `drain_type: DEFAULT` drain-close their HTTP connections while it is; the HTTP connection
    /// manager reads it here.
    pub fn health_check_failed(&self) -> bool {
        self.health_check_failed.load(Ordering::Relaxed)
    }

    fn health_check_flag(&self) -> Arc<AtomicBool> {
        self.health_check_failed.clone()
    }

    /// /quitquitquit: asks the process to shut down as SIGTERM does.
    pub fn request_quit(&self) {
        self.quit.cancel();
    }

    /// Resolves once /quitquitquit was called.
    pub async fn quit_requested(&self) {
        self.quit.cancelled().await;
    }
}
