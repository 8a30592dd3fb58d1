//! State-of-the-world subscription state of one type on one stream, as plain data: what the client asked for, what
//! was last sent, and whether a request is an ACK, a NACK or stale. No IO, so the protocol rules are unit-tested.

use std::collections::{BTreeSet, VecDeque};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use crate::store::TypeSnapshot;
use crate::types::is_wildcard_type;

/// Responses remembered per type, so that the answer to an older response (which crossed a newer push on the
/// wire) is still recorded as that version's ACK or NACK.
const RECENT_RESPONSES: usize = 16;

/// What a request meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// The first request for the type on this stream.
    Initial,
    /// Accepts the response sent with `nonce`, which carried `version`.
    Ack { version: String, nonce: String },
    /// Rejects the response sent with `nonce`, which carried `version`.
    Nack { version: String, nonce: String, message: String, code: i32 },
    /// A request before any response was sent (a subscription change while the type was not served yet).
    Update,
    /// A nonce we do not know (or no longer remember): ignored, as the protocol says.
    Stale,
}

#[derive(Debug, Default)]
pub struct SotwState {
    wildcard: bool,
    names: BTreeSet<String>,
    sent_version: Option<u64>,
    sent_nonce: Option<String>,
    /// `(nonce, version)` of recent responses, newest last.
    recent: VecDeque<(String, u64)>,
    /// Set by a subscription change or the first request; cleared by the next response.
    must_send: bool,
    seen_request: bool,
}

impl SotwState {
    /// Applies a request for this state's type.
    pub fn on_request(&mut self, request: &DiscoveryRequest) -> RequestKind {
        if !self.seen_request {
            self.seen_request = true;
            self.set_subscription(request, true);
            self.must_send = true;
            return RequestKind::Initial;
        }
        let answered = self.recent.iter().find(|(nonce, _)| *nonce == request.response_nonce);
        let kind = match answered {
            Some((nonce, version)) => match &request.error_detail {
                Some(status) => RequestKind::Nack {
                    version: version.to_string(),
                    nonce: nonce.clone(),
                    message: status.message.clone(),
                    code: status.code,
                },
                None => RequestKind::Ack { version: version.to_string(), nonce: nonce.clone() },
            },
            None if request.response_nonce.is_empty() && self.sent_nonce.is_none() => RequestKind::Update,
            None => RequestKind::Stale,
        };
        // Only an answer to the newest response states the current subscription; an older one was sent before the
        // client saw the newest, and it will answer that one with its subscription as it is now.
        if request.response_nonce == self.sent_nonce.as_deref().unwrap_or_default() {
            self.set_subscription(request, false);
        }
        kind
    }

    fn set_subscription(&mut self, request: &DiscoveryRequest, first: bool) {
        let names: BTreeSet<String> = request.resource_names.iter().filter(|n| *n != "*").cloned().collect();
        // LDS/CDS with no names is the legacy wildcard; "*" is the explicit one for any type.
        let wildcard = request.resource_names.iter().any(|n| n == "*")
            || (request.resource_names.is_empty() && is_wildcard_type(&request.type_url));
        if !first && (wildcard != self.wildcard || names != self.names) {
            self.must_send = true;
        }
        self.wildcard = wildcard;
        self.names = names;
    }

    /// The response due now, if any: after the first request, a subscription change or a new type version. It
    /// carries the full set (wildcard) or every subscribed resource that exists.
    pub fn response(
        &mut self,
        type_url: &str,
        snapshot: Option<&TypeSnapshot>,
        nonce: String,
    ) -> Option<DiscoveryResponse> {
        let snapshot = snapshot?;
        if !self.must_send && self.sent_version == Some(snapshot.version) {
            return None;
        }
        self.must_send = false;
        if !self.wildcard && self.names.is_empty() {
            // Subscribed to nothing: there is nothing to tell, and an empty response would not mean "deleted".
            return None;
        }
        let resources = snapshot
            .resources
            .values()
            .filter(|r| self.wildcard || self.names.contains(&r.name))
            .map(|r| r.any.clone())
            .collect();
        self.sent_version = Some(snapshot.version);
        self.sent_nonce = Some(nonce.clone());
        if self.recent.len() == RECENT_RESPONSES {
            self.recent.pop_front();
        }
        self.recent.push_back((nonce.clone(), snapshot.version));
        Some(DiscoveryResponse {
            version_info: snapshot.version.to_string(),
            resources,
            type_url: type_url.to_owned(),
            nonce,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::store::Resource;
    use crate::types::{ENDPOINT, LISTENER};
    use envoy_types::pb::google::protobuf::Any;
    use envoy_types::pb::google::rpc::Status;

    fn snapshot(version: u64, names: &[&str]) -> TypeSnapshot {
        let resources: BTreeMap<_, _> = names
            .iter()
            .map(|n| {
                let r = Resource { name: (*n).into(), version: "h".into(), any: Any::default() };
                ((*n).to_owned(), Arc::new(r))
            })
            .collect();
        TypeSnapshot { version, resources }
    }

    fn request(type_url: &str, names: &[&str], nonce: &str, error: Option<&str>) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.into(),
            resource_names: names.iter().map(|n| (*n).into()).collect(),
            response_nonce: nonce.into(),
            error_detail: error.map(|m| Status { code: 3, message: m.into(), details: vec![] }),
            ..Default::default()
        }
    }

    #[test]
    fn wildcard_ack_nack_and_no_resend() {
        let mut state = SotwState::default();
        let snap = snapshot(1, &["a", "b"]);
        assert_eq!(state.on_request(&request(LISTENER, &[], "", None)), RequestKind::Initial);
        let response = state.response(LISTENER, Some(&snap), "n1".into()).unwrap();
        assert_eq!((response.version_info.as_str(), response.resources.len()), ("1", 2));
        let ack = state.on_request(&request(LISTENER, &[], "n1", None));
        assert_eq!(ack, RequestKind::Ack { version: "1".into(), nonce: "n1".into() });
        assert!(state.response(LISTENER, Some(&snap), "n2".into()).is_none());

        let snap2 = snapshot(2, &["a"]);
        assert_eq!(state.response(LISTENER, Some(&snap2), "n3".into()).unwrap().resources.len(), 1);
        // The late ACK of the first response still counts for its version.
        let late = state.on_request(&request(LISTENER, &[], "n1", None));
        assert_eq!(late, RequestKind::Ack { version: "1".into(), nonce: "n1".into() });
        assert_eq!(state.on_request(&request(LISTENER, &[], "n0", None)), RequestKind::Stale);
        let nack = state.on_request(&request(LISTENER, &[], "n3", Some("bad")));
        assert!(
            matches!(nack, RequestKind::Nack { ref version, ref message, .. } if version == "2" && message == "bad")
        );
        assert!(state.response(LISTENER, Some(&snap2), "n4".into()).is_none());
    }

    #[test]
    fn named_subscription_changes_resend() {
        let mut state = SotwState::default();
        let snap = snapshot(1, &["a", "b", "c"]);
        state.on_request(&request(ENDPOINT, &["a", "x"], "", None));
        let response = state.response(ENDPOINT, Some(&snap), "n1".into()).unwrap();
        assert_eq!(response.resources.len(), 1);
        state.on_request(&request(ENDPOINT, &["a", "x"], "n1", None));
        assert!(state.response(ENDPOINT, Some(&snap), "n2".into()).is_none());
        state.on_request(&request(ENDPOINT, &["a", "b"], "n1", None));
        assert_eq!(state.response(ENDPOINT, Some(&snap), "n3".into()).unwrap().resources.len(), 2);
    }

    #[test]
    fn unset_type_and_empty_named_subscription_send_nothing() {
        let mut state = SotwState::default();
        state.on_request(&request(ENDPOINT, &[], "", None));
        assert!(state.response(ENDPOINT, None, "n1".into()).is_none());
        assert!(state.response(ENDPOINT, Some(&snapshot(1, &["a"])), "n1".into()).is_none());
    }
}
