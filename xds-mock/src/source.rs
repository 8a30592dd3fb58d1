//! Resources from a file: the resource-file format or an Envoy config dump, YAML or JSON, and the `--watch` poller
//! that pushes every good edit and keeps the last good snapshot when an edit does not parse.
//!
//! Resource file: a mapping with any of `resources` (`@type`d Anys), `listeners`, `clusters`, `endpoints`,
//! `routes`, `secrets` (typed lists). Config dump: a mapping with `configs` (an `envoy.admin.v3.ConfigDump`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::admin::v3::{
    ClustersConfigDump, ConfigDump, EndpointsConfigDump, ListenersConfigDump, RoutesConfigDump, SecretsConfigDump,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;
use xds_proxy::config::proto::{Format, decode, parse_dynamic};

use crate::resource::{ResourceError, canonical_any, parse_resource};
use crate::store::{Store, StoreError};
use crate::types::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, TYPE_URL_PREFIX};

/// Every resource of a file, by type URL.
pub type Resources = BTreeMap<String, Vec<Any>>;

/// The typed lists of a resource file and the type of their items.
const TYPED_LISTS: &[(&str, &str)] =
    &[("listeners", LISTENER), ("clusters", CLUSTER), ("endpoints", ENDPOINT), ("routes", ROUTE), ("secrets", SECRET)];

/// A file that could not be served; the Display is one line: `file: field path: what is wrong`.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{}: {source}", file.display())]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{}: {message}", file.display())]
    Invalid { file: PathBuf, message: String },
    #[error("{}: {source}", file.display())]
    Store { file: PathBuf, source: StoreError },
}

fn invalid(file: &Path, message: impl Into<String>) -> SourceError {
    SourceError::Invalid { file: file.to_owned(), message: message.into() }
}

/// Reads and parses `file` (format by extension: `.json` is JSON, anything else YAML).
pub fn load_file(file: &Path) -> Result<Resources, SourceError> {
    let text = std::fs::read_to_string(file).map_err(|source| SourceError::Read { file: file.to_owned(), source })?;
    parse_text(&text, Format::from_path(file), file)
}

/// Parses file text; `file` only names the origin in errors.
pub fn parse_text(text: &str, format: Format, file: &Path) -> Result<Resources, SourceError> {
    let tree: Json = match format {
        Format::Json => serde_json::from_str(text).map_err(|err| invalid(file, err.to_string()))?,
        Format::Yaml => serde_yaml_ng::from_str(text).map_err(|err| invalid(file, err.to_string()))?,
    };
    let Some(top) = tree.as_object() else {
        return Err(invalid(file, "expected a mapping with resources/listeners/clusters/... or configs"));
    };
    if top.contains_key("configs") {
        return parse_config_dump(text, format, file);
    }
    let mut resources = Resources::new();
    for (key, list) in top {
        let type_url = match key.as_str() {
            "resources" => None,
            other => match TYPED_LISTS.iter().find(|(list, _)| *list == other) {
                Some((_, type_url)) => Some(*type_url),
                None => {
                    return Err(invalid(
                        file,
                        format!(
                            "{key}: unknown key (expected resources, listeners, clusters, endpoints, routes, secrets or configs)"
                        ),
                    ));
                }
            },
        };
        let items = match list {
            Json::Array(items) => items.as_slice(),
            Json::Null => &[],
            _ => return Err(invalid(file, format!("{key}: expected a list"))),
        };
        for (index, item) in items.iter().enumerate() {
            let any = parse_resource(type_url, item).map_err(|err| {
                let at = format!("{key}[{index}]");
                match err {
                    ResourceError::Parse(err) if !err.path().is_empty() => {
                        let separator = if err.path().starts_with('[') { "" } else { "." };
                        invalid(file, format!("{at}{separator}{}: {}", err.path(), err.message()))
                    }
                    other => invalid(file, format!("{at}: {other}")),
                }
            })?;
            resources.entry(any.type_url.clone()).or_default().push(any);
        }
    }
    // Every typed list is a type the file speaks for, even when empty: a file with `listeners: []` serves
    // "no listeners" rather than nothing at all.
    for (key, type_url) in TYPED_LISTS {
        if top.contains_key(*key) {
            resources.entry((*type_url).to_owned()).or_default();
        }
    }
    Ok(resources)
}

/// The dynamic resources of an Envoy `/config_dump`. Each resource is the dump's own `Any` (canonically encoded),
/// so types the proxy knows only by descriptor (Istio's) are served exactly as the pool encodes them.
fn parse_config_dump(text: &str, format: Format, file: &Path) -> Result<Resources, SourceError> {
    let message =
        parse_dynamic(text, format, "envoy.admin.v3.ConfigDump").map_err(|err| invalid(file, err.to_string()))?;
    let dump: ConfigDump = decode(&message).map_err(|err| invalid(file, err.to_string()))?;
    let mut resources = Resources::new();
    // A dump always speaks for these four: an empty section means none, as Envoy had none.
    for type_url in [LISTENER, CLUSTER, ROUTE, ENDPOINT] {
        resources.insert(type_url.to_owned(), Vec::new());
    }
    let mut add = |any: Option<Any>| {
        if let Some(any) = any {
            resources.entry(any.type_url.clone()).or_default().push(canonical_any(any));
        }
    };
    for (index, config) in dump.configs.iter().enumerate() {
        let kind = config.type_url.strip_prefix(TYPE_URL_PREFIX).unwrap_or(&config.type_url);
        let bad = |err: prost::DecodeError| invalid(file, format!("configs[{index}]: {kind}: {err}"));
        match kind {
            "envoy.admin.v3.ListenersConfigDump" => {
                let section = ListenersConfigDump::decode(config.value.as_slice()).map_err(bad)?;
                for listener in section.dynamic_listeners {
                    add(listener.active_state.and_then(|state| state.listener));
                }
            }
            "envoy.admin.v3.ClustersConfigDump" => {
                let section = ClustersConfigDump::decode(config.value.as_slice()).map_err(bad)?;
                for cluster in section.dynamic_active_clusters {
                    add(cluster.cluster);
                }
            }
            "envoy.admin.v3.RoutesConfigDump" => {
                let section = RoutesConfigDump::decode(config.value.as_slice()).map_err(bad)?;
                for route in section.dynamic_route_configs {
                    add(route.route_config);
                }
            }
            "envoy.admin.v3.EndpointsConfigDump" => {
                let section = EndpointsConfigDump::decode(config.value.as_slice()).map_err(bad)?;
                for endpoints in section.dynamic_endpoint_configs {
                    add(endpoints.endpoint_config);
                }
            }
            "envoy.admin.v3.SecretsConfigDump" => {
                let section = SecretsConfigDump::decode(config.value.as_slice()).map_err(bad)?;
                for secret in section.dynamic_active_secrets {
                    add(secret.secret);
                }
            }
            // Bootstrap, scoped routes and anything newer hold no dynamic resources we serve.
            _ => {}
        }
    }
    Ok(resources)
}

/// Loads `file` into `store`; returns the `(type URL, version)` of every type that changed.
pub fn load_into(file: &Path, store: &Store) -> Result<Vec<(String, String)>, SourceError> {
    let resources = load_file(file)?;
    store.replace_all(resources).map_err(|source| SourceError::Store { file: file.to_owned(), source })
}

/// What identifies a file edit: modification time and length (an edit within one mtime tick usually changes the
/// length; a rewrite with identical content changes nothing served anyway).
fn stamp(file: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(file).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Polls `file` every `interval` until `shutdown`, loading each change into `store`. A change that does not parse
/// is logged (one line, naming the field) and the last good snapshot stays served.
pub async fn watch_file(file: PathBuf, store: Store, interval: Duration, shutdown: CancellationToken) {
    let mut last = stamp(&file);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = stamp(&file);
        if now == last {
            continue;
        }
        last = now;
        match load_into(&file, &store) {
            Ok(changed) if changed.is_empty() => {
                tracing::info!(file = %file.display(), "file changed, resources did not")
            }
            Ok(changed) => {
                for (type_url, version) in changed {
                    tracing::info!(file = %file.display(), type_url, version, "pushing new version");
                }
            }
            Err(err) => tracing::warn!("{err}; still serving the last good version"),
        }
    }
}
