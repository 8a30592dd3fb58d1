//! State-of-the-world subscription state, IO-free: per type the last accepted version, the nonce of the last
//! response, and the subscribed names; and the requests that start a stream, change a subscription, ACK or NACK.
//!
//! Envoy's xDS protocol rules kept here: the first request of a stream carries the node; an ACK repeats the
//! response's version and nonce; a NACK carries the previous good version, the response's nonce and an
//! `error_detail`; LDS and CDS are wildcard (no names); a re-established stream starts with the last accepted
//! versions so an unchanged snapshot is not applied twice.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status;

/// gRPC's INVALID_ARGUMENT, the code Envoy NACKs with.
const INVALID_ARGUMENT: i32 = 3;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TypeState {
    /// Last version applied (ACKed); empty before the first.
    version: String,
    /// Nonce of the last response on the current stream.
    nonce: String,
    /// Subscribed names; empty for wildcard types.
    names: BTreeSet<String>,
}

#[derive(Debug, Clone)]
pub struct SotwState {
    node: Node,
    /// In subscription order: the order initial requests go out in (CDS before LDS, as Envoy does).
    order: Vec<String>,
    types: BTreeMap<String, TypeState>,
    node_sent: bool,
}

impl SotwState {
    pub fn new(node: Node) -> Self {
        SotwState { node, order: Vec::new(), types: BTreeMap::new(), node_sent: false }
    }

    /// Adds a type to the subscriptions (wildcard when `names` is empty). Returns the request to send now if the
    /// subscription is new or its names changed.
    pub fn subscribe(&mut self, type_url: &str, names: BTreeSet<String>) -> Option<DiscoveryRequest> {
        self.subscribe_as(type_url, names)
    }

    /// Subscribes to a named type (EDS, RDS): nothing goes out while there are no names, because an empty first
    /// request is the legacy wildcard and would ask for every resource of the type.
    pub fn subscribe_named(&mut self, type_url: &str, names: BTreeSet<String>) -> Option<DiscoveryRequest> {
        if names.is_empty() && !self.order.iter().any(|t| t == type_url) {
            return None;
        }
        self.subscribe_as(type_url, names)
    }

    fn subscribe_as(&mut self, type_url: &str, names: BTreeSet<String>) -> Option<DiscoveryRequest> {
        if !self.order.iter().any(|t| t == type_url) {
            self.order.push(type_url.to_string());
        }
        let state = self.types.entry(type_url.to_string()).or_default();
        if state.names == names && !state.nonce.is_empty() {
            return None;
        }
        state.names = names;
        let (version, nonce) = (state.version.clone(), state.nonce.clone());
        Some(self.request(type_url, version, nonce, None))
    }

    pub fn version(&self, type_url: &str) -> &str {
        self.types.get(type_url).map_or("", |t| t.version.as_str())
    }

    /// A new stream: the node goes out again, nonces from the old stream mean nothing, and each type is requested
    /// with the version last applied.
    pub fn restart(&mut self) -> Vec<DiscoveryRequest> {
        self.node_sent = false;
        for t in self.types.values_mut() {
            t.nonce.clear();
        }
        let order = self.order.clone();
        order
            .iter()
            .map(|type_url| {
                let version = self.version(type_url).to_string();
                self.request(type_url, version, String::new(), None)
            })
            .collect()
    }

    /// Records a response's nonce; call before applying it.
    pub fn received(&mut self, resp: &DiscoveryResponse) {
        self.types.entry(resp.type_url.clone()).or_default().nonce = resp.nonce.clone();
    }

    /// The response was applied: its version becomes current.
    pub fn ack(&mut self, resp: &DiscoveryResponse) -> DiscoveryRequest {
        let state = self.types.entry(resp.type_url.clone()).or_default();
        state.version = resp.version_info.clone();
        self.request(&resp.type_url, resp.version_info.clone(), resp.nonce.clone(), None)
    }

    /// The response was rejected (wholly or in part): the previous version stays current.
    pub fn nack(&mut self, resp: &DiscoveryResponse, message: String) -> DiscoveryRequest {
        let version = self.version(&resp.type_url).to_string();
        let detail = Status { code: INVALID_ARGUMENT, message, details: Vec::new() };
        self.request(&resp.type_url, version, resp.nonce.clone(), Some(detail))
    }

    fn request(&mut self, type_url: &str, version: String, nonce: String, error: Option<Status>) -> DiscoveryRequest {
        let node = if self.node_sent { None } else { Some(self.node.clone()) };
        self.node_sent = true;
        let names = self.types.get(type_url).map(|t| t.names.iter().cloned().collect()).unwrap_or_default();
        DiscoveryRequest {
            version_info: version,
            node,
            resource_names: names,
            type_url: type_url.to_string(),
            response_nonce: nonce,
            error_detail: error,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node { id: "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local".into(), ..Default::default() }
    }

    fn resp(type_url: &str, version: &str, nonce: &str) -> DiscoveryResponse {
        DiscoveryResponse {
            type_url: type_url.into(),
            version_info: version.into(),
            nonce: nonce.into(),
            ..Default::default()
        }
    }

    #[test]
    fn node_only_on_the_first_request_of_a_stream() {
        let mut s = SotwState::new(node());
        let first = s.subscribe("cds", BTreeSet::new());
        let second = s.subscribe("lds", BTreeSet::new());
        assert!(first.is_some_and(|r| r.node.is_some()));
        assert!(second.is_some_and(|r| r.node.is_none()));
        let again = s.restart();
        assert_eq!(again.iter().map(|r| r.type_url.as_str()).collect::<Vec<_>>(), ["cds", "lds"]);
        assert!(again[0].node.is_some() && again[1].node.is_none());
    }

    #[test]
    fn ack_carries_version_and_nonce_and_nack_keeps_the_previous_version() {
        let mut s = SotwState::new(node());
        let _ = s.subscribe("lds", BTreeSet::new());
        let r1 = resp("lds", "v1", "n1");
        s.received(&r1);
        let ack = s.ack(&r1);
        assert_eq!((ack.version_info.as_str(), ack.response_nonce.as_str()), ("v1", "n1"));
        assert!(ack.error_detail.is_none());

        let r2 = resp("lds", "v2", "n2");
        s.received(&r2);
        let nack = s.nack(&r2, "l: cannot bind".into());
        assert_eq!((nack.version_info.as_str(), nack.response_nonce.as_str()), ("v1", "n2"));
        assert_eq!(nack.error_detail.map(|d| (d.code, d.message)), Some((3, "l: cannot bind".to_string())));
        assert_eq!(s.version("lds"), "v1");
    }

    #[test]
    fn restart_requests_the_last_accepted_versions_without_nonces() {
        let mut s = SotwState::new(node());
        let _ = s.subscribe("cds", BTreeSet::new());
        let r = resp("cds", "7", "abc");
        s.received(&r);
        let _ = s.ack(&r);
        let again = s.restart();
        assert_eq!(again[0].version_info, "7");
        assert_eq!(again[0].response_nonce, "");
    }

    #[test]
    fn a_named_type_sends_nothing_until_it_has_names() {
        let mut s = SotwState::new(node());
        assert!(s.subscribe_named("eds", BTreeSet::new()).is_none(), "an empty first request would be a wildcard");
        assert_eq!(s.restart().len(), 0);
        let first = s.subscribe_named("eds", ["a".to_string()].into());
        assert_eq!(first.map(|r| r.resource_names), Some(vec!["a".to_string()]));
    }

    #[test]
    fn named_subscriptions_change_only_when_the_names_do() {
        let mut s = SotwState::new(node());
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let first = s.subscribe("eds", names(&["a", "b"]));
        assert_eq!(first.map(|r| r.resource_names), Some(vec!["a".to_string(), "b".to_string()]));
        let r = resp("eds", "1", "n");
        s.received(&r);
        let _ = s.ack(&r);
        assert!(s.subscribe("eds", names(&["a", "b"])).is_none(), "unchanged");
        let changed = s.subscribe("eds", names(&["a"]));
        assert_eq!(
            changed.map(|r| (r.resource_names, r.version_info, r.response_nonce)),
            Some((vec!["a".to_string()], "1".to_string(), "n".to_string()))
        );
    }
}
