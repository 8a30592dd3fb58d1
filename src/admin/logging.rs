//! Log levels changeable at runtime (`/logging`): Envoy's logger names mapped onto this crate's modules, turned into
//! a `tracing` filter that the process's reloadable subscriber applies.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// Envoy's level names, in its order (`spdlog::level::level_string_views`).
pub const LEVELS: &[&str] = &["trace", "debug", "info", "warning", "error", "critical", "off"];

/// The loggers `/logging` lists and sets: this crate's modules (tracing targets `xds_proxy::<name>`) and the
/// libraries whose logs help with protocol problems.
const LOGGERS: &[(&str, &str)] = &[
    ("admin", "xds_proxy::admin"),
    ("config", "xds_proxy::config"),
    ("drain", "xds_proxy::drain"),
    ("h2", "h2"),
    ("hyper", "hyper"),
    ("listener", "xds_proxy::listener"),
    ("network", "xds_proxy::network"),
    ("server", "xds_proxy::server"),
    ("stats", "xds_proxy::stats"),
    ("tonic", "tonic"),
    ("upstream", "xds_proxy::upstream"),
    ("xds", "xds_proxy::xds"),
];

/// Applies a `tracing_subscriber::EnvFilter` directive string; set up by `main` around its reload handle.
pub type Apply = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// The current levels and the way to apply them.
#[derive(Clone)]
pub struct LogControl {
    levels: Arc<Mutex<Levels>>,
    apply: Arc<Apply>,
}

#[derive(Debug, Clone)]
struct Levels {
    /// Level of everything not named below (what `--log-level` set).
    default: String,
    by_logger: BTreeMap<&'static str, String>,
}

impl fmt::Debug for LogControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogControl").field("levels", &self.levels).finish_non_exhaustive()
    }
}

/// Why a `/logging` change was refused (Envoy's messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid number of parameters")]
    Parameters,
    #[error("unknown logger level")]
    Level,
    #[error("unknown logger name")]
    Logger,
    #[error("empty logger name or empty logger level")]
    Empty,
    #[error("cannot apply the log filter: {0}")]
    Apply(String),
}

/// Envoy's level name as a `tracing` directive level.
fn directive_level(level: &str) -> Option<&'static str> {
    Some(match level {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warning" | "warn" => "warn",
        "error" | "critical" => "error",
        "off" => "off",
        _ => return None,
    })
}

impl LogControl {
    /// `initial` is the `--log-level` value (Envoy's names).
    pub fn new(initial: &str, apply: Box<Apply>) -> Self {
        let default = if LEVELS.contains(&initial) { initial.to_string() } else { "info".to_string() };
        let by_logger = LOGGERS.iter().map(|(name, _)| (*name, default.clone())).collect();
        LogControl { levels: Arc::new(Mutex::new(Levels { default, by_logger })), apply: Arc::from(apply) }
    }

    /// Envoy's listing: `active loggers:` then `  <name>: <level>` per logger.
    pub fn listing(&self) -> String {
        let levels = self.levels.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::from("active loggers:\n");
        for (name, level) in &levels.by_logger {
            out.push_str(&format!("  {name}: {level}\n"));
        }
        out.push('\n');
        out
    }

    /// Applies one `/logging` query: `level=<l>` (every logger), `paths=<name>:<l>,...`, or `<name>=<l>`.
    pub fn change(&self, params: &[(String, String)]) -> Result<(), LoggingError> {
        let [(key, value)] = params else { return Err(LoggingError::Parameters) };
        let mut next = self.levels.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if key == "level" {
            let level = canonical(value)?;
            next.default = level.clone();
            for l in next.by_logger.values_mut() {
                *l = level.clone();
            }
        } else {
            let pairs: Vec<(String, String)> = if key == "paths" {
                value
                    .split(',')
                    .filter(|p| !p.trim().is_empty())
                    .map(|p| {
                        let (n, l) = p.split_once(':').unwrap_or((p, ""));
                        (n.trim().to_string(), l.trim().to_string())
                    })
                    .collect()
            } else {
                vec![(key.clone(), value.clone())]
            };
            for (name, level) in pairs {
                if name.is_empty() || level.is_empty() {
                    return Err(LoggingError::Empty);
                }
                let level = canonical(&level)?;
                let slot = next.by_logger.get_mut(name.as_str()).ok_or(LoggingError::Logger)?;
                *slot = level;
            }
        }
        (self.apply)(&directives(&next)).map_err(LoggingError::Apply)?;
        *self.levels.lock().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }
}

fn canonical(level: &str) -> Result<String, LoggingError> {
    LEVELS.iter().find(|l| **l == level).map(|l| l.to_string()).ok_or(LoggingError::Level)
}

/// The `EnvFilter` directives for a set of levels: the default first, then each logger that differs from it.
fn directives(levels: &Levels) -> String {
    let mut out = vec![directive_level(&levels.default).unwrap_or("info").to_string()];
    for (name, level) in &levels.by_logger {
        if *level != levels.default
            && let Some(target) = LOGGERS.iter().find(|(n, _)| n == name).map(|(_, t)| *t)
        {
            out.push(format!("{target}={}", directive_level(level).unwrap_or("info")));
        }
    }
    out.join(",")
}

/// Envoy's usage text after a refused change.
pub fn usage() -> String {
    format!(
        "usage: /logging?<name>=<level> (change single level)\n\
         usage: /logging?paths=name1:level1,name2:level2,... (change multiple levels)\n\
         usage: /logging?level=<level> (change all levels)\n\
         levels: {} \n",
        LEVELS.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> (LogControl, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let c = LogControl::new(
            "info",
            Box::new(move |d: &str| {
                sink.lock().unwrap().push(d.to_string());
                Ok(())
            }),
        );
        (c, seen)
    }

    fn p(k: &str, v: &str) -> Vec<(String, String)> {
        vec![(k.to_string(), v.to_string())]
    }

    #[test]
    fn levels_change_by_logger_and_all_at_once() {
        let (c, seen) = control();
        c.change(&p("paths", "xds:debug,upstream:trace")).unwrap();
        assert_eq!(seen.lock().unwrap().last().unwrap(), "info,xds_proxy::upstream=trace,xds_proxy::xds=debug");
        assert!(c.listing().contains("  xds: debug\n"));
        c.change(&p("listener", "warning")).unwrap();
        assert!(seen.lock().unwrap().last().unwrap().contains("xds_proxy::listener=warn"));
        c.change(&p("level", "critical")).unwrap();
        assert_eq!(seen.lock().unwrap().last().unwrap(), "error");
        assert!(c.listing().contains("  xds: critical\n"));
        assert_eq!(c.change(&p("level", "loud")), Err(LoggingError::Level));
        assert_eq!(c.change(&p("nosuch", "info")), Err(LoggingError::Logger));
        assert_eq!(c.change(&p("paths", "xds:")), Err(LoggingError::Empty));
    }
}
