//! The snapshot store: every served resource, per type URL and name, with a version per type and per resource.
//!
//! Writers build a complete new [`Snapshot`] and publish it through a `tokio::sync::watch` channel; every ADS
//! stream holds a receiver and reconciles what it sent against the newest snapshot on `changed()`. Snapshots are
//! immutable and shared by `Arc`, so a stream never holds a lock while it sends.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use tokio::sync::watch;

use crate::types::resource_name;

/// One served resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub name: String,
    /// Per-resource version for delta xDS: a hash of the encoded bytes, so it changes exactly when the content
    /// does and is the same across restarts of the mock (clients resync with `initial_resource_versions`).
    pub version: String,
    pub any: Any,
}

/// Every resource of one type and the type's version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeSnapshot {
    /// Bumped by one on every change of the type; sent as `version_info` (SotW) and `system_version_info`
    /// (delta). Never reused within a run, even when the type is emptied.
    pub version: u64,
    pub resources: BTreeMap<String, Arc<Resource>>,
}

impl TypeSnapshot {
    /// The version as it appears on the wire.
    pub fn version_string(&self) -> String {
        self.version.to_string()
    }
}

/// Every type the store has been given, even empty ones (an empty type is served as "no resources"; a type never
/// set is not answered at all, as a control plane that does not know it yet).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    types: BTreeMap<String, Arc<TypeSnapshot>>,
}

impl Snapshot {
    pub fn get(&self, type_url: &str) -> Option<&Arc<TypeSnapshot>> {
        self.types.get(type_url)
    }

    /// Type URLs with their snapshots, sorted by type URL.
    pub fn types(&self) -> impl Iterator<Item = (&String, &Arc<TypeSnapshot>)> {
        self.types.iter()
    }
}

/// Why a change was refused; the store is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("resource of type {found} given for type {expected}")]
    TypeMismatch { expected: String, found: String },
    #[error("a {type_url} without a name (or with bytes that do not decode)")]
    NoName { type_url: String },
    #[error("duplicate {type_url} name {name:?}")]
    DuplicateName { type_url: String, name: String },
    #[error("no {type_url} named {name:?}")]
    NotFound { type_url: String, name: String },
}

/// The shared, cloneable handle to the snapshot store.
#[derive(Debug, Clone)]
pub struct Store {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Store { tx: Arc::new(watch::Sender::new(Arc::new(Snapshot::default()))) }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver that wakes on every published change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Replaces every resource of `type_url` with `resources` and returns the new type version. Always bumps the
    /// version, even when nothing changed, so a test can await the ACK of the set it just made.
    pub fn set(&self, type_url: &str, resources: Vec<Any>) -> Result<String, StoreError> {
        let resources = index(type_url, resources)?;
        Ok(self.update(|types| Ok(vec![put_type(types, type_url, resources)]))?.remove(0))
    }

    /// Adds or replaces one resource by name; returns its name and the new type version.
    pub fn upsert(&self, type_url: &str, any: Any) -> Result<(String, String), StoreError> {
        let resource = make_resource(type_url, any)?;
        let name = resource.name.clone();
        let version = self.update(|types| {
            let mut resources = types.get(type_url).map(|t| t.resources.clone()).unwrap_or_default();
            resources.insert(resource.name.clone(), Arc::new(resource));
            Ok(vec![put_type(types, type_url, resources)])
        })?;
        Ok((name, version.into_iter().next().unwrap_or_default()))
    }

    /// Removes one resource; returns the new type version.
    pub fn remove(&self, type_url: &str, name: &str) -> Result<String, StoreError> {
        let version = self.update(|types| {
            let mut resources = types.get(type_url).map(|t| t.resources.clone()).unwrap_or_default();
            if resources.remove(name).is_none() {
                return Err(StoreError::NotFound { type_url: type_url.to_owned(), name: name.to_owned() });
            }
            Ok(vec![put_type(types, type_url, resources)])
        })?;
        Ok(version.into_iter().next().unwrap_or_default())
    }

    /// Makes the store hold exactly `all` (a whole file's worth): types whose resources differ get a new version,
    /// identical types keep theirs (so a file touch without an edit pushes nothing), types missing from `all` are
    /// emptied. Returns the `(type URL, new version)` of every type that changed.
    pub fn replace_all(&self, all: BTreeMap<String, Vec<Any>>) -> Result<Vec<(String, String)>, StoreError> {
        let mut indexed = BTreeMap::new();
        for (type_url, resources) in all {
            let resources = index(&type_url, resources)?;
            indexed.insert(type_url, resources);
        }
        let mut changed = Vec::new();
        self.update(|types| {
            let gone: Vec<String> = types.keys().filter(|t| !indexed.contains_key(*t)).cloned().collect();
            for type_url in gone {
                if types.get(&type_url).is_some_and(|t| !t.resources.is_empty()) {
                    changed.push((type_url.clone(), put_type(types, &type_url, BTreeMap::new())));
                }
            }
            for (type_url, resources) in indexed {
                if types.get(&type_url).is_none_or(|t| t.resources != resources) {
                    changed.push((type_url.clone(), put_type(types, &type_url, resources)));
                }
            }
            Ok(changed.iter().map(|(_, version)| version.clone()).collect())
        })?;
        Ok(changed)
    }

    /// Applies `change` to a copy of the type map and publishes it, or publishes nothing when `change` fails or
    /// returns no new version (it reports one per type it changed). The watch channel's lock serialises writers, so
    /// concurrent changes never lose one another.
    fn update<F>(&self, change: F) -> Result<Vec<String>, StoreError>
    where
        F: FnOnce(&mut BTreeMap<String, Arc<TypeSnapshot>>) -> Result<Vec<String>, StoreError>,
    {
        let mut result = Ok(Vec::new());
        self.tx.send_if_modified(|snapshot| {
            let mut types = snapshot.types.clone();
            result = change(&mut types);
            // Versions, not a deep comparison: a one-listener change in a 10,000-listener set costs no 10,000 compares.
            let modified = result.as_ref().is_ok_and(|versions| !versions.is_empty());
            if modified {
                *snapshot = Arc::new(Snapshot { types });
            }
            modified
        });
        result
    }
}

/// Stores `resources` as the new content of `type_url` with the next version; returns that version.
fn put_type(
    types: &mut BTreeMap<String, Arc<TypeSnapshot>>,
    type_url: &str,
    resources: BTreeMap<String, Arc<Resource>>,
) -> String {
    let version = types.get(type_url).map_or(0, |t| t.version) + 1;
    types.insert(type_url.to_owned(), Arc::new(TypeSnapshot { version, resources }));
    version.to_string()
}

fn index(type_url: &str, resources: Vec<Any>) -> Result<BTreeMap<String, Arc<Resource>>, StoreError> {
    let mut by_name = BTreeMap::new();
    for any in resources {
        let resource = make_resource(type_url, any)?;
        let name = resource.name.clone();
        if by_name.insert(name.clone(), Arc::new(resource)).is_some() {
            return Err(StoreError::DuplicateName { type_url: type_url.to_owned(), name });
        }
    }
    Ok(by_name)
}

fn make_resource(type_url: &str, any: Any) -> Result<Resource, StoreError> {
    if any.type_url != type_url {
        return Err(StoreError::TypeMismatch { expected: type_url.to_owned(), found: any.type_url });
    }
    let name =
        resource_name(type_url, &any.value).ok_or_else(|| StoreError::NoName { type_url: type_url.to_owned() })?;
    Ok(Resource { name, version: content_version(&any.value), any })
}

/// FNV-1a, 64 bits, as 16 hex digits: stable across builds and platforms (std's hasher is not promised to be),
/// which matters because clients send these back after a reconnect to a restarted mock.
fn content_version(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::types::LISTENER;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use prost::Message;

    fn listener(name: &str, stat_prefix: &str) -> Any {
        let l = Listener { name: name.into(), stat_prefix: stat_prefix.into(), ..Default::default() };
        Any { type_url: LISTENER.into(), value: l.encode_to_vec() }
    }

    #[test]
    fn versions_bump_per_type() {
        let store = Store::new();
        assert_eq!(store.set(LISTENER, vec![listener("a", "x")]).unwrap(), "1");
        assert_eq!(store.set(LISTENER, vec![listener("a", "x")]).unwrap(), "2");
        let (name, version) = store.upsert(LISTENER, listener("b", "x")).unwrap();
        assert_eq!((name.as_str(), version.as_str()), ("b", "3"));
        assert_eq!(store.remove(LISTENER, "a").unwrap(), "4");
        assert!(matches!(store.remove(LISTENER, "a"), Err(StoreError::NotFound { .. })));
        let snapshot = store.snapshot();
        let names: Vec<_> = snapshot.get(LISTENER).unwrap().resources.keys().cloned().collect();
        assert_eq!(names, ["b"]);
    }

    #[test]
    fn rejects_duplicates_and_wrong_types() {
        let store = Store::new();
        let err = store.set(LISTENER, vec![listener("a", "x"), listener("a", "y")]).unwrap_err();
        assert!(matches!(err, StoreError::DuplicateName { .. }));
        assert!(store.set(crate::types::CLUSTER, vec![listener("a", "x")]).is_err());
        assert!(store.snapshot().get(LISTENER).is_none());
    }

    #[test]
    fn replace_all_bumps_only_changed_types() {
        let store = Store::new();
        let first = BTreeMap::from([(LISTENER.to_owned(), vec![listener("a", "x")])]);
        assert_eq!(store.replace_all(first.clone()).unwrap(), [(LISTENER.to_owned(), "1".to_owned())]);
        assert!(store.replace_all(first).unwrap().is_empty());
        let version_a = store.snapshot().get(LISTENER).unwrap().resources["a"].version.clone();
        let second = BTreeMap::from([(LISTENER.to_owned(), vec![listener("a", "changed")])]);
        assert_eq!(store.replace_all(second).unwrap(), [(LISTENER.to_owned(), "2".to_owned())]);
        assert_ne!(store.snapshot().get(LISTENER).unwrap().resources["a"].version, version_a);
        assert_eq!(store.replace_all(BTreeMap::new()).unwrap(), [(LISTENER.to_owned(), "3".to_owned())]);
    }
}
