//! Configuration: the Envoy v3 protos as the user writes them, turned into our own validated types.
//!
//! Three layers (see STYLE.md): Envoy proto (`envoy-types`, parsed through descriptors by [`proto`]) → validated
//! config (the types in this module's children, built with `TryFrom` and checked by [`audit`] so that no set field
//! is silently ignored) → runtime objects (built by the listener and cluster managers). Every error carries the
//! field path, and that text is what a NACK or a start-up failure says.

pub mod access_log;
pub mod audit;
pub mod bootstrap;
pub mod cluster;
pub mod http;
pub mod listener;
pub mod proto;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::google::protobuf;

/// A configuration error at a field path, relative to the resource being converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }

    /// Re-roots the error under `parent` (`filter_chains[0]` + `filters[1]` → `filter_chains[0].filters[1]`).
    pub fn under(mut self, parent: &str) -> Self {
        self.path = join(parent, &self.path);
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

impl std::error::Error for ConfigError {}

impl From<audit::Unsupported> for ConfigError {
    fn from(u: audit::Unsupported) -> Self {
        ConfigError::new(u.path, u.reason)
    }
}

/// Joins two field paths; indexes (`[3]`) attach without a dot.
pub fn join(parent: &str, child: &str) -> String {
    match (parent.is_empty(), child.is_empty()) {
        (true, _) => child.to_string(),
        (_, true) => parent.to_string(),
        _ if child.starts_with('[') => format!("{parent}{child}"),
        _ => format!("{parent}.{child}"),
    }
}

/// Runs the field audit for a resource and turns the first finding into a [`ConfigError`].
///
/// Only the first is reported so that the NACK text stays one line per resource, as Envoy's does.
pub fn audit_resource<T: prost::Message>(msg: &T, full_name: &str) -> Result<(), ConfigError> {
    match audit::audit(msg, full_name) {
        Ok(()) => Ok(()),
        Err(found) => Err(found
            .into_iter()
            .next()
            .map(ConfigError::from)
            .unwrap_or_else(|| ConfigError::new("", "rejected by the field audit"))),
    }
}

pub(crate) fn duration(d: &protobuf::Duration, path: &str) -> Result<Duration, ConfigError> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(ConfigError::new(path, "duration must be non-negative"));
    }
    // google.protobuf.Duration's own range (10,000 years): beyond it the value is malformed, and a deadline that far
    // out would overflow the clock.
    if d.seconds > 315_576_000_000 {
        return Err(ConfigError::new(path, "duration must be at most 315576000000 s"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

pub(crate) fn opt_duration(
    d: Option<&protobuf::Duration>,
    default: Duration,
    path: &str,
) -> Result<Duration, ConfigError> {
    d.map_or(Ok(default), |d| duration(d, path))
}

/// An IP socket address from an Envoy `Address`; `resolve` names are not allowed here (listeners and STATIC
/// endpoints need literal IPs, as in Envoy).
pub(crate) fn ip_socket_address(addr: Option<&core::Address>, path: &str) -> Result<SocketAddr, ConfigError> {
    let sa = socket_address(addr, path)?;
    let ip: IpAddr = sa.address.parse().map_err(|_| {
        ConfigError::new(join(path, "socket_address.address"), format!("malformed IP address: {}", sa.address))
    })?;
    Ok(SocketAddr::new(ip, port_value(sa, path)?))
}

pub(crate) fn socket_address<'a>(
    addr: Option<&'a core::Address>,
    path: &str,
) -> Result<&'a core::SocketAddress, ConfigError> {
    use core::address::Address as A;
    match addr.and_then(|a| a.address.as_ref()) {
        Some(A::SocketAddress(sa)) => {
            if sa.protocol != core::socket_address::Protocol::Tcp as i32 {
                return Err(ConfigError::new(join(path, "socket_address.protocol"), "only TCP is supported"));
            }
            Ok(sa)
        }
        Some(A::Pipe(_)) => Err(ConfigError::new(join(path, "pipe"), "pipe addresses are not supported")),
        Some(A::EnvoyInternalAddress(_)) => {
            Err(ConfigError::new(join(path, "envoy_internal_address"), "internal addresses are not supported"))
        }
        None => Err(ConfigError::new(path, "an address is required")),
    }
}

pub(crate) fn port_value(sa: &core::SocketAddress, path: &str) -> Result<u16, ConfigError> {
    use core::socket_address::PortSpecifier;
    match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(p).map_err(|_| {
            ConfigError::new(join(path, "socket_address.port_value"), format!("port {p} is out of range"))
        }),
        Some(PortSpecifier::NamedPort(_)) => {
            Err(ConfigError::new(join(path, "socket_address.named_port"), "named ports are not supported"))
        }
        None => Ok(0),
    }
}

/// Envoy's stat-name form of an address: `127.0.0.1_10000`, `[::]_80`.
pub fn address_stat_name(addr: &SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{}_{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]_{}", a.ip(), a.port()),
    }
}
