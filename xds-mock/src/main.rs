//! The `xds-mock` command: serves a resource file (or an Envoy config dump) over ADS with the management API,
//! reflection and health on one port, until Ctrl-C or SIGTERM.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use xds_mock::source::{load_into, watch_file};
use xds_mock::{Clients, Store, serve};

/// How often `--watch` looks at the file's modification time.
const WATCH_INTERVAL: Duration = Duration::from_millis(300);

/// A mock xDS control plane (ADS, SotW and delta) with a gRPC management API.
#[derive(Debug, Parser)]
#[command(name = "xds-mock", version)]
struct Cli {
    /// Address to serve ADS, the management API, reflection and health on.
    #[arg(long, default_value = "127.0.0.1:18000")]
    listen: SocketAddr,
    /// Resource file or Envoy config dump, YAML or JSON (`.json`); without it the mock starts empty.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also serve everything (SecretDiscoveryService included) on this Unix socket, as Istio's pilot-agent serves
    /// SDS to its sidecar; a socket file left by an earlier run is replaced.
    #[arg(long)]
    uds: Option<PathBuf>,
    /// Reload the file when it changes and push the new version; a bad edit is logged and not served.
    #[arg(long, requires = "config")]
    watch: bool,
    /// Log filter (`info`, `debug`, `xds_mock=debug,warn`, ...).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version: not errors.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            // clap's message is several lines (details, tips, usage); the first paragraph, on one line, is the error.
            let text = err.to_string();
            let first = text.split("\n\n").next().unwrap_or_default().trim_start_matches("error: ");
            let first_line = first.split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("xds-mock: {first_line} (see --help)");
            return ExitCode::from(1);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xds-mock: {err:#}");
            ExitCode::from(1)
        }
    }
}

#[tokio::main]
async fn run(cli: Cli) -> Result<()> {
    let filter = EnvFilter::try_new(&cli.log_level).with_context(|| format!("--log-level {:?}", cli.log_level))?;
    // Plain text when piped (tests and scripts read the `addr=` of the listening line).
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();

    // Registered before anything listens, so a SIGTERM sent as soon as the port answers stops us cleanly.
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    #[cfg(not(unix))]
    let term = ();
    let store = Store::new();
    if let Some(file) = &cli.config {
        let changed = load_into(file, &store)?;
        for (type_url, version) in changed {
            let count = store.snapshot().get(&type_url).map_or(0, |t| t.resources.len());
            tracing::info!(type_url, version, count, "loaded from {}", file.display());
        }
    }
    let listener = match TcpListener::bind(cli.listen).await {
        Ok(listener) => listener,
        Err(err) => bail!("--listen {}: {err}", cli.listen),
    };
    tracing::info!(addr = %listener.local_addr()?, "serving ADS, xds_mock.v1.Management, reflection and health");

    let shutdown = CancellationToken::new();
    if let (true, Some(file)) = (cli.watch, &cli.config) {
        tokio::spawn(watch_file(file.clone(), store.clone(), WATCH_INTERVAL, shutdown.clone()));
    }
    tokio::spawn(stop_on_signal(term, shutdown.clone()));
    let clients = Clients::new();
    if let Some(path) = &cli.uds {
        let uds = xds_mock::server::bind_uds(path)?;
        tracing::info!(path = %path.display(), "serving the same services on a Unix socket");
        let (store, clients, shutdown) = (store.clone(), clients.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = xds_mock::server::serve_uds_listener(uds, store, clients, shutdown).await {
                tracing::warn!("Unix socket server stopped: {e}");
            }
        });
    }
    serve(listener, store, clients, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM.
#[cfg(unix)]
async fn stop_on_signal(term: std::io::Result<tokio::signal::unix::Signal>, shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(err) => {
            tracing::warn!("cannot listen for SIGTERM: {err}");
            let _ = ctrl_c.await;
        }
    }
    tracing::info!("signal received, stopping");
    shutdown.cancel();
}

/// Cancels `shutdown` on Ctrl-C.
#[cfg(not(unix))]
async fn stop_on_signal(_term: (), shutdown: CancellationToken) {
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("signal received, stopping");
    shutdown.cancel();
}
