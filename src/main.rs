//! The `xds-proxy` command line: Envoy's flags where Envoy has them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use envoy_types::pb::envoy::admin::v3::{CommandLineOptions, command_line_options};
use tracing::{error, info};
use xds_proxy::admin::logging::LogControl;
use xds_proxy::config::bootstrap::{BootstrapConfig, NodeOverrides};
use xds_proxy::config::proto;
use xds_proxy::drain::DrainStrategy;
use xds_proxy::server::{Options, Server};

#[derive(Debug, Parser)]
#[command(name = "xds-proxy", version, about = "An Envoy-compatible proxy driven by xDS")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Envoy v3 bootstrap file (YAML or JSON by extension).
    #[arg(short = 'c', long = "config-path", global = true)]
    config_path: Option<PathBuf>,
    /// Bootstrap YAML merged over --config-path (protobuf merge: scalars replace, lists append).
    #[arg(long = "config-yaml", global = true)]
    config_yaml: Option<String>,
    /// Worker threads; defaults to the number of CPUs.
    #[arg(long)]
    concurrency: Option<usize>,
    #[arg(long, value_enum, default_value = "serve")]
    mode: Mode,
    /// How long draining connections get before they are closed.
    #[arg(long = "drain-time-s", default_value_t = 600)]
    drain_time_s: u64,
    #[arg(long = "drain-strategy", value_enum, default_value = "gradual")]
    drain_strategy: Strategy,
    /// trace, debug, info, warning, error, critical, off.
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    log_level: String,
    /// Overrides node.id.
    #[arg(long = "service-node")]
    service_node: Option<String>,
    /// Overrides node.cluster.
    #[arg(long = "service-cluster")]
    service_cluster: Option<String>,
    /// Envoy's hot-restart id: refused, there is no hot restart.
    #[arg(long = "base-id")]
    base_id: Option<u32>,
    /// Writes the admin server's bound address (ip:port) to this file once it listens.
    #[arg(long = "admin-address-path")]
    admin_address_path: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Which filter chain would a connection take, and why (from the bootstrap's listeners; no sockets).
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
struct ExplainArgs {
    /// The listener that accepts the connection, e.g. virtualOutbound.
    #[arg(long)]
    listener: String,
    /// Where the client connected to (the original destination), ip:port.
    #[arg(long)]
    destination: std::net::SocketAddr,
    #[arg(long, default_value = "127.0.0.1:40000")]
    source: std::net::SocketAddr,
    /// Server name from the TLS ClientHello.
    #[arg(long)]
    sni: Option<String>,
    /// tls or raw_buffer.
    #[arg(long, default_value = "raw_buffer")]
    transport: String,
    /// ALPN values in the client's order, comma separated (http/1.1 or h2c for plaintext HTTP).
    #[arg(long, value_delimiter = ',')]
    alpn: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Serve,
    Validate,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Strategy {
    Gradual,
    Immediate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logging = match init_logging(&cli.log_level) {
        Ok(control) => control,
        Err(msg) => {
            eprintln!("error: --log-level: {msg}");
            return ExitCode::FAILURE;
        }
    };
    if cli.base_id.is_some() {
        eprintln!("error: --base-id: hot restart is not supported");
        return ExitCode::FAILURE;
    }
    let source = match (&cli.config_path, &cli.config_yaml) {
        (Some(p), _) => p.display().to_string(),
        (None, Some(_)) => "--config-yaml".to_string(),
        (None, None) => String::new(),
    };
    let bootstrap = proto::load_bootstrap(cli.config_path.as_deref(), cli.config_yaml.as_deref())
        .map_err(|e| e.to_string())
        .and_then(|b| {
            let overrides =
                NodeOverrides { service_node: cli.service_node.clone(), service_cluster: cli.service_cluster.clone() };
            BootstrapConfig::from_proto(b, &overrides).map_err(|e| format!("{source}: {e}"))
        });
    let bootstrap = match bootstrap {
        Ok(b) => b,
        Err(msg) => {
            eprintln!("error: {}", one_line(&msg));
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Explain(a)) = &cli.command {
        let query = xds_proxy::listener::explain::Query {
            listener: a.listener.clone(),
            destination: a.destination,
            source: a.source,
            server_name: a.sni.clone(),
            transport: a.transport.clone(),
            alpn: a.alpn.clone(),
        };
        return match xds_proxy::listener::explain::explain(&bootstrap.listeners, &query) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Mode::Validate = cli.mode {
        println!("configuration '{source}' OK");
        return ExitCode::SUCCESS;
    }

    let mut options = Options::default();
    if let Some(n) = cli.concurrency {
        options.concurrency = n.max(1);
    }
    options.drain_time = Duration::from_secs(cli.drain_time_s);
    options.drain_strategy = match cli.drain_strategy {
        Strategy::Gradual => DrainStrategy::Gradual,
        Strategy::Immediate => DrainStrategy::Immediate,
    };
    options.command_line = command_line_options(&cli, options.concurrency);
    options.logging = Some(logging);

    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().thread_name("main").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the main runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Handlers go in before anything binds: a SIGTERM that arrives while listeners are already accepting but
        // start-up is still finishing must drain them, not kill the process by the default action.
        let signals = Signals::install();
        let server = match Server::start(bootstrap, &options).await {
            Ok(s) => s,
            Err(e) => {
                error!("{e}");
                eprintln!("error: {}", one_line(&format!("{source}: {e}")));
                return ExitCode::FAILURE;
            }
        };
        for l in server.listener_manager().listeners() {
            info!(listener = %l.name, address = %l.address, "listening");
        }
        if let (Some(path), Some(address)) = (&cli.admin_address_path, server.admin_address())
            && let Err(e) = std::fs::write(path, address.to_string())
        {
            error!("cannot write the admin address to {}: {e}", path.display());
        }
        tokio::select! {
            _ = signals.wait() => {}
            _ = server.lifecycle.quit_requested() => info!("shutting down on /quitquitquit"),
        }
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// SIGTERM and SIGINT streams, registered at install time so a signal that arrives before `wait` is kept.
struct Signals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(term), Ok(int)) => Signals(Some((term, int))),
            _ => {
                error!("cannot install signal handlers; running until killed");
                Signals(None)
            }
        }
    }

    async fn wait(self) {
        let Some((mut term, mut int)) = self.0 else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => info!("caught SIGTERM"),
            _ = int.recv() => info!("caught SIGINT"),
        }
    }
}

/// Installs the log subscriber behind a reload handle, so /logging can change levels while the proxy runs.
fn init_logging(level: &str) -> Result<LogControl, String> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (envoy_level, directive) = match level {
        "trace" | "debug" | "info" | "error" | "off" => (level, level),
        "warning" | "warn" => ("warning", "warn"),
        "critical" => ("critical", "error"),
        other => return Err(format!("unknown level '{other}'")),
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directive));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    Ok(LogControl::new(
        envoy_level,
        Box::new(move |directives: &str| {
            let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        }),
    ))
}

/// The command line as Envoy's /server_info reports it.
fn command_line_options(cli: &Cli, concurrency: usize) -> CommandLineOptions {
    use xds_proxy::admin::json::duration;
    CommandLineOptions {
        base_id: cli.base_id.map_or(0, u64::from),
        concurrency: u32::try_from(concurrency).unwrap_or(u32::MAX),
        config_path: cli.config_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        config_yaml: cli.config_yaml.clone().unwrap_or_default(),
        admin_address_path: cli.admin_address_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        log_level: cli.log_level.clone(),
        service_cluster: cli.service_cluster.clone().unwrap_or_default(),
        service_node: cli.service_node.clone().unwrap_or_default(),
        drain_time: Some(duration(Duration::from_secs(cli.drain_time_s))),
        drain_strategy: match cli.drain_strategy {
            Strategy::Gradual => command_line_options::DrainStrategy::Gradual,
            Strategy::Immediate => command_line_options::DrainStrategy::Immediate,
        } as i32,
        mode: match cli.mode {
            Mode::Serve => command_line_options::Mode::Serve,
            Mode::Validate => command_line_options::Mode::Validate,
        } as i32,
        disable_hot_restart: true,
        ..Default::default()
    }
}

/// Start-up errors are one line, whatever the underlying error text holds.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
