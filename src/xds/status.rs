//! What the proxy holds of each xDS resource and how its last update went: the version and time it last changed,
//! ACKED / NACKED / REQUESTED / DOES_NOT_EXIST, and the rejection details. The ADS client records every response
//! here after applying it; CSDS and `/config_dump` read it.
//!
//! Listener and cluster contents are not copied: the status keeps the same `Arc` proto the managers hold, so a
//! config of 10,000 listeners costs a pointer each here. Route configurations and load assignments are kept as
//! received, because their managers compile them and keep no proto.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use envoy_types::pb::envoy::admin::v3::ClientResourceStatus;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::watch;

use super::{CLUSTER, LISTENER};

/// A resource's accepted content.
#[derive(Debug, Clone)]
pub enum Held {
    /// Shared with the listener manager's config of that version.
    Listener(Arc<Listener>),
    /// Shared with the cluster manager's config.
    Cluster(Arc<Cluster>),
    /// As received: route configurations and load assignments.
    Any(Any),
}

impl Held {
    /// The resource as an `Any` of its xDS type.
    pub fn to_any(&self) -> Any {
        match self {
            Held::Listener(l) => Any { type_url: LISTENER.to_string(), value: l.encode_to_vec() },
            Held::Cluster(c) => Any { type_url: CLUSTER.to_string(), value: c.encode_to_vec() },
            Held::Any(a) => a.clone(),
        }
    }

    /// Same content; pointer equality first, since an unchanged resource keeps its `Arc` in the managers.
    fn same(&self, other: &Held) -> bool {
        match (self, other) {
            (Held::Listener(a), Held::Listener(b)) => Arc::ptr_eq(a, b) || a == b,
            (Held::Cluster(a), Held::Cluster(b)) => Arc::ptr_eq(a, b) || a == b,
            (Held::Any(a), Held::Any(b)) => a == b,
            _ => false,
        }
    }

    /// Whether this exact version is still held outside the status (a draining listener).
    fn alive_elsewhere(&self) -> bool {
        match self {
            Held::Listener(l) => Arc::strong_count(l) > 1,
            Held::Cluster(c) => Arc::strong_count(c) > 1,
            Held::Any(_) => false,
        }
    }

    fn is(&self, proto: &Arc<Listener>) -> bool {
        matches!(self, Held::Listener(l) if Arc::ptr_eq(l, proto))
    }
}

/// The last rejected update of a resource (Envoy's `UpdateFailureState`), cleared by its next accepted update.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub details: String,
    /// The version of the rejected response.
    pub version: String,
    pub at: SystemTime,
    /// The rejected resource as received.
    pub failed: Option<Any>,
}

/// One resource's state.
#[derive(Debug, Clone)]
pub struct ResourceStatus {
    /// The version in which the held content last changed (an unchanged resource keeps its version, as in Envoy).
    pub version: String,
    pub last_updated: Option<SystemTime>,
    /// None when never accepted, or removed by the control plane.
    pub resource: Option<Held>,
    pub status: ClientResourceStatus,
    pub error: Option<Failure>,
}

#[derive(Debug)]
struct Retired {
    held: Held,
    version: String,
    last_updated: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct TypeState {
    /// `version_info` of the last response accepted whole.
    version: String,
    last_updated: Option<SystemTime>,
    resources: BTreeMap<String, ResourceStatus>,
    /// Named types (RDS, EDS): the names subscribed now; a name not yet delivered is REQUESTED.
    subscribed: Option<BTreeSet<String>>,
    /// Replaced or removed listener versions that are still draining, so the dump can say which version they were.
    retired: Vec<Retired>,
}

/// One response, as the ADS client applied it.
#[derive(Debug)]
pub struct Update<'a> {
    pub type_url: &'a str,
    /// `version_info` (state of the world) or `system_version_info` (delta).
    pub version: &'a str,
    pub resources: Vec<Received<'a>>,
    /// Delta `removed_resources`.
    pub removed: &'a [String],
    /// The rejections, one per entry, each `<name>: <why>` or `resources[<i>]: <why>` (the NACK's lines).
    pub errors: &'a [String],
}

#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// Known from a delta `Resource`; decoded from the resource otherwise.
    pub name: Option<&'a str>,
    pub any: &'a Any,
    /// Delta's per-resource version.
    pub version: Option<&'a str>,
}

/// The status of every xDS resource, shared by the ADS client (writer) and the admin endpoints (readers).
#[derive(Debug, Clone)]
pub struct XdsStatus {
    types: Arc<Mutex<BTreeMap<String, TypeState>>>,
    /// Types that have had at least one response answered (ACK or NACK): the server's initial fetch.
    answered: Arc<watch::Sender<BTreeSet<String>>>,
}

impl Default for XdsStatus {
    fn default() -> Self {
        XdsStatus { types: Arc::default(), answered: Arc::new(watch::channel(BTreeSet::new()).0) }
    }
}

/// Every xDS resource's first field is its name (`Listener.name`, `Cluster.name`, `RouteConfiguration.name`,
/// `ClusterLoadAssignment.cluster_name`); decoding only that skips the rest of the resource.
#[derive(Clone, PartialEq, prost::Message)]
struct Named {
    #[prost(string, tag = "1")]
    name: String,
}

/// The name of an xDS resource, from its bytes.
pub fn resource_name(any: &Any) -> Option<String> {
    Named::decode(any.value.as_slice()).ok().map(|n| n.name)
}

impl XdsStatus {
    /// Records an applied response. `current(name, any)` says what the managers now hold for an accepted resource
    /// (None when they hold nothing); `in_effect(name)` whether a wildcard resource is still held after the update.
    pub fn record(
        &self,
        update: &Update<'_>,
        current: impl Fn(&str, &Any) -> Option<Held>,
        in_effect: impl Fn(&str) -> bool,
    ) {
        let now = SystemTime::now();
        let names: Vec<Option<String>> =
            update.resources.iter().map(|r| r.name.map(str::to_string).or_else(|| resource_name(r.any))).collect();
        let errors = attribute(update.errors, &names);
        let mut types = self.types.lock().unwrap_or_else(|p| p.into_inner());
        let state = types.entry(update.type_url.to_string()).or_default();
        let retire = update.type_url == LISTENER;
        let mut in_response = std::collections::HashSet::new();
        for (i, (r, name)) in update.resources.iter().zip(&names).enumerate() {
            let Some(name) = name else { continue };
            if state.subscribed.as_ref().is_some_and(|s| !s.contains(name)) {
                // Envoy ignores resources of a named type that nobody asked for.
                continue;
            }
            in_response.insert(name.clone());
            let version = r.version.unwrap_or(update.version).to_string();
            let entry = state.resources.entry(name.clone()).or_insert_with(|| ResourceStatus {
                version: String::new(),
                last_updated: None,
                resource: None,
                status: ClientResourceStatus::Requested,
                error: None,
            });
            if let Some(why) = errors.get(&Owner::Name(name.clone())).or_else(|| errors.get(&Owner::Index(i))) {
                entry.status = ClientResourceStatus::Nacked;
                entry.error = Some(Failure { details: why.join("\n"), version, at: now, failed: Some(r.any.clone()) });
                continue;
            }
            entry.status = ClientResourceStatus::Acked;
            entry.error = None;
            let Some(held) = current(name, r.any) else { continue };
            if entry.resource.as_ref().is_some_and(|old| old.same(&held)) {
                continue;
            }
            if let Some(old) = entry.resource.replace(held)
                && retire
            {
                state.retired.push(Retired {
                    held: old,
                    version: entry.version.clone(),
                    last_updated: entry.last_updated,
                });
            }
            entry.version = version;
            entry.last_updated = Some(now);
        }
        for name in update.removed {
            if state.subscribed.is_some() {
                if let Some(entry) = state.resources.get_mut(name) {
                    entry.resource = None;
                    entry.error = None;
                    entry.status = ClientResourceStatus::DoesNotExist;
                    entry.last_updated = Some(now);
                }
            } else if let Some(entry) = state.resources.remove(name) {
                retire_entry(&mut state.retired, entry, retire);
            }
        }
        if state.subscribed.is_none() {
            // Wildcard types: whatever the managers no longer hold is gone, except rejected resources of this response,
            // which keep their failure on show until the control plane stops sending them.
            let gone: Vec<String> = state
                .resources
                .iter()
                .filter(|(name, e)| {
                    let rejected_now = e.error.is_some() && in_response.contains(*name);
                    let held = e.resource.is_some() && in_effect(name);
                    !(rejected_now || held)
                })
                .map(|(name, _)| name.clone())
                .collect();
            for name in gone {
                if let Some(entry) = state.resources.remove(&name) {
                    retire_entry(&mut state.retired, entry, retire);
                }
            }
        }
        if update.errors.is_empty() {
            state.version = update.version.to_string();
            state.last_updated = Some(now);
        }
        state.retired.retain(|r| r.held.alive_elsewhere());
        drop(types);
        self.answered.send_if_modified(|set| set.insert(update.type_url.to_string()));
    }

    /// The names a named type (RDS, EDS) is subscribed to now; resources no longer subscribed are forgotten.
    pub fn set_subscription(&self, type_url: &str, names: &BTreeSet<String>) {
        let mut types = self.types.lock().unwrap_or_else(|p| p.into_inner());
        let state = types.entry(type_url.to_string()).or_default();
        state.resources.retain(|name, _| names.contains(name));
        state.subscribed = Some(names.clone());
    }

    /// Every resource of a type, by name; for a named type, subscribed names not delivered yet are REQUESTED.
    pub fn resources(&self, type_url: &str) -> Vec<(String, ResourceStatus)> {
        let types = self.types.lock().unwrap_or_else(|p| p.into_inner());
        let Some(state) = types.get(type_url) else { return Vec::new() };
        let mut out: BTreeMap<String, ResourceStatus> = state.resources.clone();
        for name in state.subscribed.iter().flatten() {
            out.entry(name.clone()).or_insert_with(|| ResourceStatus {
                version: String::new(),
                last_updated: None,
                resource: None,
                status: ClientResourceStatus::Requested,
                error: None,
            });
        }
        out.into_iter().collect()
    }

    /// The version of the last response of a type accepted whole, and when it came.
    pub fn type_version(&self, type_url: &str) -> (String, Option<SystemTime>) {
        let types = self.types.lock().unwrap_or_else(|p| p.into_inner());
        types.get(type_url).map(|s| (s.version.clone(), s.last_updated)).unwrap_or_default()
    }

    /// The version and update time of one listener version (serving, warming or draining), found by identity.
    pub fn listener_version(&self, name: &str, proto: &Arc<Listener>) -> Option<(String, Option<SystemTime>)> {
        let types = self.types.lock().unwrap_or_else(|p| p.into_inner());
        let state = types.get(LISTENER)?;
        if let Some(e) = state.resources.get(name)
            && e.resource.as_ref().is_some_and(|h| h.is(proto))
        {
            return Some((e.version.clone(), e.last_updated));
        }
        state.retired.iter().find(|r| r.held.is(proto)).map(|r| (r.version.clone(), r.last_updated))
    }

    /// Resolves once a response of `type_url` has been answered (ACK or NACK).
    pub async fn answered(&self, type_url: &str) {
        let mut rx = self.answered.subscribe();
        let _ = rx.wait_for(|set| set.contains(type_url)).await;
    }
}

fn retire_entry(retired: &mut Vec<Retired>, entry: ResourceStatus, retire: bool) {
    if let (true, Some(held)) = (retire, entry.resource) {
        retired.push(Retired { held, version: entry.version, last_updated: entry.last_updated });
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Owner {
    Name(String),
    Index(usize),
}

/// Assigns each rejection line to its resource: `<name>: ...` (the longest name of the response that prefixes it,
/// since names may contain ": ") or `resources[<i>]: ...` for a resource that could not be named. The resource's
/// own part of the line is what is kept.
fn attribute(errors: &[String], names: &[Option<String>]) -> HashMap<Owner, Vec<String>> {
    let mut out: HashMap<Owner, Vec<String>> = HashMap::new();
    for e in errors {
        let by_name = names
            .iter()
            .flatten()
            .filter(|n| e.strip_prefix(n.as_str()).is_some_and(|rest| rest.starts_with(": ")))
            .max_by_key(|n| n.len());
        if let Some(name) = by_name {
            out.entry(Owner::Name(name.clone())).or_default().push(e[name.len() + 2..].to_string());
            continue;
        }
        let index = e
            .strip_prefix("resources[")
            .and_then(|rest| rest.split_once("]: "))
            .and_then(|(i, why)| i.parse::<usize>().ok().map(|i| (i, why)));
        if let Some((i, why)) = index {
            out.entry(Owner::Index(i)).or_default().push(why.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(name: &str, port: u32) -> Arc<Listener> {
        use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
        Arc::new(Listener {
            name: name.to_string(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })
    }

    fn any(l: &Listener) -> Any {
        Any { type_url: LISTENER.to_string(), value: l.encode_to_vec() }
    }

    fn update<'a>(version: &'a str, anys: &'a [Any], errors: &'a [String]) -> Update<'a> {
        Update {
            type_url: LISTENER,
            version,
            resources: anys.iter().map(|a| Received { name: None, any: a, version: None }).collect(),
            removed: &[],
            errors,
        }
    }

    #[test]
    fn rejection_lines_go_to_their_resource() {
        let names = [Some("a".to_string()), Some("a: b".to_string()), None];
        let errors = ["a: b: bad".to_string(), "a: worse".to_string(), "resources[2]: cannot decode".to_string()];
        let got = attribute(&errors, &names);
        assert_eq!(got.get(&Owner::Name("a: b".into())), Some(&vec!["bad".to_string()]));
        assert_eq!(got.get(&Owner::Name("a".into())), Some(&vec!["worse".to_string()]));
        assert_eq!(got.get(&Owner::Index(2)), Some(&vec!["cannot decode".to_string()]));
    }

    #[test]
    fn versions_stay_with_unchanged_resources_and_nacks_keep_the_last_good_one() {
        let status = XdsStatus::default();
        let (a1, b1) = (listener("a", 1), listener("b", 2));
        let held: Mutex<HashMap<String, Arc<Listener>>> =
            Mutex::new([("a".to_string(), a1.clone()), ("b".to_string(), b1.clone())].into());
        let current = |n: &str, _: &Any| held.lock().ok()?.get(n).cloned().map(Held::Listener);
        let in_effect = |n: &str| held.lock().is_ok_and(|h| h.contains_key(n));
        let anys = [any(&a1), any(&b1)];
        status.record(&update("1", &anys, &[]), current, in_effect);

        // v2 changes b and rejects a; a keeps version 1 and shows the failure.
        let a2 = listener("a", 11);
        let b2 = listener("b", 12);
        if let Ok(mut h) = held.lock() {
            h.insert("b".into(), b2.clone());
        }
        let anys = [any(&a2), any(&b2)];
        status.record(&update("2", &anys, &["a: cannot bind".to_string()]), current, in_effect);
        let got: HashMap<String, ResourceStatus> = status.resources(LISTENER).into_iter().collect();
        assert_eq!(got["a"].version, "1");
        assert_eq!(got["a"].status, ClientResourceStatus::Nacked);
        let failure = got["a"].error.clone().map(|f| (f.details, f.version));
        assert_eq!(failure, Some(("cannot bind".to_string(), "2".to_string())));
        assert_eq!((got["b"].version.as_str(), got["b"].status), ("2", ClientResourceStatus::Acked));
        assert_eq!(status.type_version(LISTENER).0, "1", "a NACKed response does not move the type's version");
        // The replaced b is retired while someone (a draining listener) still holds it.
        assert_eq!(status.listener_version("b", &b1).map(|v| v.0), Some("1".to_string()));

        // v3: a is gone.
        if let Ok(mut h) = held.lock() {
            h.remove("a");
        }
        let anys = [any(&b2)];
        status.record(&update("3", &anys, &[]), current, in_effect);
        let names: Vec<String> = status.resources(LISTENER).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(status.type_version(LISTENER).0, "3");
    }

    #[test]
    fn named_types_report_requested_and_ignore_unrequested() {
        use super::super::ROUTE;
        let status = XdsStatus::default();
        status.set_subscription(ROUTE, &["r1".to_string(), "r2".to_string()].into());
        let rc = |n: &str| Any {
            type_url: ROUTE.into(),
            value: envoy_types::pb::envoy::config::route::v3::RouteConfiguration {
                name: n.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        };
        let anys = [rc("r1"), rc("other")];
        let u = Update {
            type_url: ROUTE,
            version: "7",
            resources: anys.iter().map(|a| Received { name: None, any: a, version: None }).collect(),
            removed: &[],
            errors: &[],
        };
        status.record(&u, |_, a| Some(Held::Any(a.clone())), |_| true);
        let got: Vec<(String, ClientResourceStatus)> =
            status.resources(ROUTE).into_iter().map(|(n, s)| (n, s.status)).collect();
        assert_eq!(
            got,
            [("r1".to_string(), ClientResourceStatus::Acked), ("r2".to_string(), ClientResourceStatus::Requested)]
        );
    }
}
