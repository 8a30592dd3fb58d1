//! Incremental (delta) subscription state of one type on one stream, as plain data: the subscription, what the
//! client holds (name → version, seeded from `initial_resource_versions`), and the nonces awaiting an answer.
//! No IO, so the protocol rules are unit-tested.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};

use crate::store::TypeSnapshot;
use crate::types::is_wildcard_type;

/// Responses a client may leave unanswered before the oldest is forgotten (an answer to it is then stale).
const MAX_PENDING: usize = 16;

/// What a request meant for ACK bookkeeping; subscription changes are applied whatever the kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    Initial,
    Ack {
        version: String,
        nonce: String,
    },
    Nack {
        version: String,
        nonce: String,
        message: String,
        code: i32,
    },
    /// No nonce: a pure subscription change.
    Update,
    /// A nonce we did not send, or one already answered.
    Stale,
}

#[derive(Debug, Default)]
pub struct DeltaState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client has, as far as we know: what it told us on (re)connect plus everything sent since.
    known: BTreeMap<String, String>,
    /// Sent nonces not yet answered, with the type version each carried; oldest first.
    pending: VecDeque<(String, u64)>,
    seen_request: bool,
    /// A fresh client (no `initial_resource_versions`) gets a first response even when it is empty, so that it
    /// can finish initialising instead of waiting for its fetch timeout.
    must_send: bool,
}

impl DeltaState {
    pub fn on_request(&mut self, request: &DeltaDiscoveryRequest) -> RequestKind {
        let kind = if !self.seen_request {
            self.seen_request = true;
            self.known = request.initial_resource_versions.clone().into_iter().collect();
            self.must_send = self.known.is_empty();
            // LDS/CDS subscribing to nothing on the first request is the legacy wildcard.
            self.wildcard = request.resource_names_subscribe.is_empty() && is_wildcard_type(&request.type_url);
            RequestKind::Initial
        } else if request.response_nonce.is_empty() {
            RequestKind::Update
        } else {
            match self.pending.iter().position(|(nonce, _)| *nonce == request.response_nonce) {
                None => RequestKind::Stale,
                Some(index) => {
                    // Answering a response implicitly settles every older one.
                    let (nonce, version) = self.pending.drain(..=index).next_back().unwrap_or_default();
                    match &request.error_detail {
                        Some(status) => RequestKind::Nack {
                            version: version.to_string(),
                            nonce,
                            message: status.message.clone(),
                            code: status.code,
                        },
                        None => RequestKind::Ack { version: version.to_string(), nonce },
                    }
                }
            }
        };
        for name in &request.resource_names_subscribe {
            if name == "*" {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(name);
                // The client drops it itself; if it subscribes again it must get it again.
                self.known.remove(name);
            }
        }
        kind
    }

    /// The response due now, if any: changed or new resources in scope, and `removed_resources` for those the client
    /// holds that no longer exist.
    pub fn response(
        &mut self,
        type_url: &str,
        snapshot: Option<&TypeSnapshot>,
        nonce: String,
    ) -> Option<DeltaDiscoveryResponse> {
        let snapshot = snapshot?;
        let in_scope = |name: &str| self.wildcard || self.names.contains(name);
        let resources: Vec<Resource> = snapshot
            .resources
            .values()
            .filter(|r| in_scope(&r.name) && self.known.get(&r.name) != Some(&r.version))
            .map(|r| Resource {
                name: r.name.clone(),
                version: r.version.clone(),
                resource: Some(r.any.clone()),
                ..Default::default()
            })
            .collect();
        let removed_resources: Vec<String> = self
            .known
            .keys()
            .filter(|name| in_scope(name) && !snapshot.resources.contains_key(*name))
            .cloned()
            .collect();
        if resources.is_empty() && removed_resources.is_empty() && !self.must_send {
            return None;
        }
        self.must_send = false;
        for resource in &resources {
            self.known.insert(resource.name.clone(), resource.version.clone());
        }
        for name in &removed_resources {
            self.known.remove(name);
        }
        if self.pending.len() == MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back((nonce.clone(), snapshot.version));
        Some(DeltaDiscoveryResponse {
            system_version_info: snapshot.version.to_string(),
            resources,
            type_url: type_url.to_owned(),
            removed_resources,
            nonce,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::store::Resource as Stored;
    use crate::types::{CLUSTER, ENDPOINT};
    use envoy_types::pb::google::protobuf::Any;

    fn snapshot(version: u64, resources: &[(&str, &str)]) -> TypeSnapshot {
        let resources = resources
            .iter()
            .map(|(n, v)| {
                let r = Stored { name: (*n).into(), version: (*v).into(), any: Any::default() };
                ((*n).to_owned(), Arc::new(r))
            })
            .collect();
        TypeSnapshot { version, resources }
    }

    fn request(type_url: &str, subscribe: &[&str], unsubscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: subscribe.iter().map(|n| (*n).into()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|n| (*n).into()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
        response.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn wildcard_sends_changes_and_removals() {
        let mut state = DeltaState::default();
        assert_eq!(state.on_request(&request(CLUSTER, &[], &[], "")), RequestKind::Initial);
        let first = state.response(CLUSTER, Some(&snapshot(1, &[("a", "1"), ("b", "1")])), "n1".into()).unwrap();
        assert_eq!(names(&first), ["a", "b"]);
        assert_eq!(
            state.on_request(&request(CLUSTER, &[], &[], "n1")),
            RequestKind::Ack { version: "1".into(), nonce: "n1".into() }
        );
        let second = state.response(CLUSTER, Some(&snapshot(2, &[("a", "2")])), "n2".into()).unwrap();
        assert_eq!((names(&second), second.removed_resources.clone()), (vec!["a"], vec!["b".to_owned()]));
        assert!(state.response(CLUSTER, Some(&snapshot(3, &[("a", "2")])), "n3".into()).is_none());
        assert_eq!(state.on_request(&request(CLUSTER, &[], &[], "n1")), RequestKind::Stale);
    }

    #[test]
    fn resync_sends_only_differences() {
        let mut state = DeltaState::default();
        let mut initial = request(CLUSTER, &[], &[], "");
        initial.initial_resource_versions = HashMap::from([("a".into(), "1".into()), ("gone".into(), "1".into())]);
        state.on_request(&initial);
        let response = state.response(CLUSTER, Some(&snapshot(5, &[("a", "1"), ("b", "1")])), "n1".into()).unwrap();
        assert_eq!((names(&response), response.removed_resources.clone()), (vec!["b"], vec!["gone".to_owned()]));

        let mut unchanged = DeltaState::default();
        let mut initial = request(CLUSTER, &[], &[], "");
        initial.initial_resource_versions = HashMap::from([("a".into(), "1".into())]);
        unchanged.on_request(&initial);
        assert!(unchanged.response(CLUSTER, Some(&snapshot(5, &[("a", "1")])), "n1".into()).is_none());
    }

    #[test]
    fn named_subscribe_and_unsubscribe() {
        let mut state = DeltaState::default();
        state.on_request(&request(ENDPOINT, &["a"], &[], ""));
        let snap = snapshot(1, &[("a", "1"), ("b", "1")]);
        assert_eq!(names(&state.response(ENDPOINT, Some(&snap), "n1".into()).unwrap()), ["a"]);
        state.on_request(&request(ENDPOINT, &["b"], &["a"], ""));
        let response = state.response(ENDPOINT, Some(&snap), "n2".into()).unwrap();
        assert_eq!((names(&response), response.removed_resources.len()), (vec!["b"], 0));
        let nack = state.on_request(&DeltaDiscoveryRequest {
            error_detail: Some(envoy_types::pb::google::rpc::Status { code: 3, message: "no".into(), details: vec![] }),
            ..request(ENDPOINT, &[], &[], "n2")
        });
        assert!(matches!(nack, RequestKind::Nack { ref version, .. } if version == "1"));
    }
}
