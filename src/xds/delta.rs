//! Incremental (delta) xDS subscription state, IO-free: per type the version of every resource in effect, the
//! subscribed names and the last nonce; and the requests that start a stream, change a subscription, ACK or NACK.
//!
//! Envoy's delta rules kept here: the first request of a stream carries the node; a re-established stream
//! announces what it has in `initial_resource_versions` so the server sends only what differs; LDS and CDS
//! subscribe as wildcard (no names); ACK and NACK are told apart by `error_detail`, paired to the response by nonce.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::google::rpc::Status;

const INVALID_ARGUMENT: i32 = 3;

#[derive(Debug, Clone, Default)]
struct TypeState {
    /// Resource name → version of the resource in effect.
    versions: BTreeMap<String, String>,
    /// Subscribed names; empty for wildcard types.
    names: BTreeSet<String>,
}

#[derive(Debug, Clone)]
pub struct DeltaState {
    node: Node,
    order: Vec<String>,
    types: BTreeMap<String, TypeState>,
    node_sent: bool,
    /// Types whose subscription went out on the current stream.
    started: BTreeSet<String>,
}

impl DeltaState {
    pub fn new(node: Node) -> Self {
        DeltaState { node, order: Vec::new(), types: BTreeMap::new(), node_sent: false, started: BTreeSet::new() }
    }

    /// Subscribes to `names` of a type (wildcard when empty). Returns the request to send now: the first for the
    /// type on this stream, or one carrying only the names added and removed.
    pub fn subscribe(&mut self, type_url: &str, names: BTreeSet<String>) -> Option<DeltaDiscoveryRequest> {
        self.subscribe_inner(type_url, names)
    }

    /// Subscribes to a named type (EDS, RDS): nothing goes out while there are no names, because an empty first
    /// subscription is the legacy wildcard and would ask for every resource of the type.
    pub fn subscribe_named(&mut self, type_url: &str, names: BTreeSet<String>) -> Option<DeltaDiscoveryRequest> {
        if names.is_empty() && !self.order.iter().any(|t| t == type_url) {
            return None;
        }
        self.subscribe_inner(type_url, names)
    }

    fn subscribe_inner(&mut self, type_url: &str, names: BTreeSet<String>) -> Option<DeltaDiscoveryRequest> {
        if !self.order.iter().any(|t| t == type_url) {
            self.order.push(type_url.to_string());
        }
        let state = self.types.entry(type_url.to_string()).or_default();
        if self.started.contains(type_url) {
            let add: Vec<String> = names.difference(&state.names).cloned().collect();
            let drop: Vec<String> = state.names.difference(&names).cloned().collect();
            if add.is_empty() && drop.is_empty() {
                return None;
            }
            state.names = names;
            let mut req = self.request(type_url);
            req.resource_names_subscribe = add;
            req.resource_names_unsubscribe = drop;
            return Some(req);
        }
        state.names = names;
        Some(self.initial(type_url))
    }

    /// A new stream: each type is subscribed again, announcing the versions it holds.
    pub fn restart(&mut self) -> Vec<DeltaDiscoveryRequest> {
        self.node_sent = false;
        self.started.clear();
        let order = self.order.clone();
        order.iter().map(|t| self.initial(t)).collect()
    }

    /// The response was applied: `applied` (name, version) are in effect, `removed` are gone.
    pub fn ack(
        &mut self,
        resp: &DeltaDiscoveryResponse,
        applied: &[(String, String)],
        removed: &[String],
    ) -> DeltaDiscoveryRequest {
        self.record(&resp.type_url, applied, removed);
        let mut req = self.request(&resp.type_url);
        req.response_nonce = resp.nonce.clone();
        req
    }

    /// Part of the response was rejected: what did apply is recorded (Envoy's partial apply), the rest is not.
    pub fn nack(
        &mut self,
        resp: &DeltaDiscoveryResponse,
        applied: &[(String, String)],
        removed: &[String],
        message: String,
    ) -> DeltaDiscoveryRequest {
        self.record(&resp.type_url, applied, removed);
        let mut req = self.request(&resp.type_url);
        req.response_nonce = resp.nonce.clone();
        req.error_detail = Some(Status { code: INVALID_ARGUMENT, message, details: Vec::new() });
        req
    }

    #[cfg(test)]
    pub fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        self.types.get(type_url).map(|t| t.versions.clone()).unwrap_or_default()
    }

    fn record(&mut self, type_url: &str, applied: &[(String, String)], removed: &[String]) {
        let state = self.types.entry(type_url.to_string()).or_default();
        for (name, version) in applied {
            state.versions.insert(name.clone(), version.clone());
        }
        for name in removed {
            state.versions.remove(name);
        }
    }

    fn initial(&mut self, type_url: &str) -> DeltaDiscoveryRequest {
        self.started.insert(type_url.to_string());
        let mut req = self.request(type_url);
        if let Some(state) = self.types.get(type_url) {
            req.resource_names_subscribe = state.names.iter().cloned().collect();
            req.initial_resource_versions = state.versions.clone().into_iter().collect();
        }
        req
    }

    fn request(&mut self, type_url: &str) -> DeltaDiscoveryRequest {
        let node = if self.node_sent { None } else { Some(self.node.clone()) };
        self.node_sent = true;
        DeltaDiscoveryRequest { node, type_url: type_url.to_string(), ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn resp(type_url: &str, nonce: &str) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse { type_url: type_url.into(), nonce: nonce.into(), ..Default::default() }
    }

    #[test]
    fn restart_announces_what_is_held() {
        let mut s = DeltaState::new(Node::default());
        let first = s.subscribe("lds", BTreeSet::new());
        assert!(first.is_some_and(|r| r.node.is_some() && r.resource_names_subscribe.is_empty()));
        let _ = s.ack(&resp("lds", "n1"), &[("a".into(), "1".into()), ("b".into(), "1".into())], &[]);
        let _ = s.ack(&resp("lds", "n2"), &[("a".into(), "2".into())], &["b".into()]);
        let again = s.restart();
        assert_eq!(again.len(), 1);
        assert!(again[0].node.is_some());
        let held: BTreeMap<String, String> = again[0].initial_resource_versions.clone().into_iter().collect();
        assert_eq!(held, BTreeMap::from([("a".to_string(), "2".to_string())]));
    }

    #[test]
    fn subscription_changes_send_only_the_difference() {
        let mut s = DeltaState::new(Node::default());
        let first = s.subscribe("eds", set(&["a", "b"]));
        assert_eq!(first.map(|r| r.resource_names_subscribe), Some(vec!["a".to_string(), "b".to_string()]));
        assert!(s.subscribe("eds", set(&["a", "b"])).is_none());
        let change = s.subscribe("eds", set(&["b", "c"]));
        assert_eq!(
            change.map(|r| (r.resource_names_subscribe, r.resource_names_unsubscribe)),
            Some((vec!["c".to_string()], vec!["a".to_string()]))
        );
    }

    #[test]
    fn nack_records_the_partial_apply_and_carries_the_error() {
        let mut s = DeltaState::new(Node::default());
        let _ = s.subscribe("lds", BTreeSet::new());
        let nack = s.nack(&resp("lds", "n1"), &[("good".into(), "3".into())], &[], "bad: reason".into());
        assert_eq!(nack.response_nonce, "n1");
        assert_eq!(nack.error_detail.map(|d| (d.code, d.message)), Some((3, "bad: reason".to_string())));
        assert_eq!(s.versions("lds"), BTreeMap::from([("good".to_string(), "3".to_string())]));
    }
}
