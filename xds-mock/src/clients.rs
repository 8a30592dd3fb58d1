//! What every connected node did: its streams, and per type the last version sent, ACKed and NACKed. Feeds
//! `ListClients` and the test handle's `wait_for`, which is woken through a `watch` channel on every record.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::watch;

/// How many ACK/NACK outcomes are remembered per node and type, for `wait_for` on a version that is no longer the
/// last one (a test that pushes twice and then awaits the first).
const OUTCOME_HISTORY: usize = 64;

/// Which ADS flavour a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Sotw,
    Delta,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Sotw => "SOTW",
            Protocol::Delta => "DELTA",
        }
    }
}

/// A client accepted the response carrying `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub node_id: String,
    pub type_url: String,
    pub version: String,
    pub nonce: String,
    pub at: SystemTime,
}

/// A client rejected the response carrying `version` (the one sent with `nonce`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    pub node_id: String,
    pub type_url: String,
    pub version: String,
    pub nonce: String,
    /// `error_detail.message` from the request: the client's list of rejected resources.
    pub message: String,
    /// `error_detail.code` (Envoy sends INVALID_ARGUMENT, 3).
    pub code: i32,
    pub at: SystemTime,
}

/// Per node and type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeStatus {
    pub last_sent_version: Option<String>,
    pub last_acked_version: Option<String>,
    pub last_nack: Option<Nack>,
    pub protocol: Option<Protocol>,
    /// Latest last; one entry per ACK or NACK.
    outcomes: VecDeque<Result<Ack, Nack>>,
}

/// One node id (all its streams share the record).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientStatus {
    pub node_id: String,
    /// The `node` of the node's latest stream, verbatim.
    pub node: Node,
    /// When the first stream of this node id was opened.
    pub connected_since: SystemTime,
    /// Streams open now; the record outlives them so a test can read a NACK after the client is gone.
    pub active_streams: u32,
    pub types: BTreeMap<String, TypeStatus>,
}

/// Why `wait_for` returned no ACK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    #[error("node {node_id:?} NACKed {} version {}: {}", .0.type_url, .0.version, .0.message, node_id = .0.node_id)]
    Nack(Box<Nack>),
    #[error("node {node_id:?} neither ACKed nor NACKed {type_url} version {version} within {timeout:?}")]
    Timeout { node_id: String, type_url: String, version: String, timeout: Duration },
}

/// The shared registry of clients.
#[derive(Debug, Clone)]
pub struct Clients {
    inner: Arc<Mutex<HashMap<String, ClientStatus>>>,
    /// Bumped after every change so waiters re-check.
    changed: Arc<watch::Sender<u64>>,
}

impl Default for Clients {
    fn default() -> Self {
        Clients::new()
    }
}

impl Clients {
    pub fn new() -> Self {
        Clients { inner: Arc::default(), changed: Arc::new(watch::Sender::new(0)) }
    }

    /// Every node seen since start, sorted by node id.
    pub fn list(&self) -> Vec<ClientStatus> {
        let mut all: Vec<_> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        all
    }

    pub fn get(&self, node_id: &str) -> Option<ClientStatus> {
        self.lock().get(node_id).cloned()
    }

    /// Awaits the ACK or NACK of `version` of `type_url` from `node_id`; an outcome recorded before the call
    /// counts, so there is no race with a client faster than the test.
    pub async fn wait_for(
        &self,
        node_id: &str,
        type_url: &str,
        version: &str,
        timeout: Duration,
    ) -> Result<Ack, WaitError> {
        let mut changed = self.changed.subscribe();
        let wait = async {
            loop {
                changed.borrow_and_update();
                if let Some(outcome) = self.outcome(node_id, type_url, version) {
                    return outcome.map_err(|nack| WaitError::Nack(Box::new(nack)));
                }
                if changed.changed().await.is_err() {
                    // The registry is gone with the server: nothing will ever arrive.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or_else(|_| {
            Err(WaitError::Timeout {
                node_id: node_id.to_owned(),
                type_url: type_url.to_owned(),
                version: version.to_owned(),
                timeout,
            })
        })
    }

    fn outcome(&self, node_id: &str, type_url: &str, version: &str) -> Option<Result<Ack, Nack>> {
        let clients = self.lock();
        let status = clients.get(node_id)?.types.get(type_url)?;
        status
            .outcomes
            .iter()
            .rev()
            .find(|outcome| match outcome {
                Ok(ack) => ack.version == version,
                Err(nack) => nack.version == version,
            })
            .cloned()
    }

    /// Records a new stream of `node`; the returned guard counts it as closed when dropped.
    pub(crate) fn stream_opened(&self, node: &Node) -> StreamGuard {
        self.modify(|clients| {
            let client = clients.entry(node.id.clone()).or_insert_with(|| ClientStatus {
                node_id: node.id.clone(),
                node: node.clone(),
                connected_since: SystemTime::now(),
                active_streams: 0,
                types: BTreeMap::new(),
            });
            client.node = node.clone();
            client.active_streams += 1;
        });
        StreamGuard { clients: self.clone(), node_id: node.id.clone() }
    }

    pub(crate) fn sent(&self, node_id: &str, type_url: &str, version: &str, protocol: Protocol) {
        self.modify(|clients| {
            if let Some(status) = type_status(clients, node_id, type_url) {
                status.last_sent_version = Some(version.to_owned());
                status.protocol = Some(protocol);
            }
        });
    }

    pub(crate) fn acked(&self, node_id: &str, type_url: &str, version: &str, nonce: &str) {
        let ack = Ack {
            node_id: node_id.to_owned(),
            type_url: type_url.to_owned(),
            version: version.to_owned(),
            nonce: nonce.to_owned(),
            at: SystemTime::now(),
        };
        self.modify(|clients| {
            if let Some(status) = type_status(clients, node_id, type_url) {
                status.last_acked_version = Some(version.to_owned());
                push_outcome(status, Ok(ack));
            }
        });
    }

    pub(crate) fn nacked(&self, nack: Nack) {
        self.modify(|clients| {
            if let Some(status) = type_status(clients, &nack.node_id, &nack.type_url) {
                status.last_nack = Some(nack.clone());
                push_outcome(status, Err(nack));
            }
        });
    }

    fn modify(&self, change: impl FnOnce(&mut HashMap<String, ClientStatus>)) {
        change(&mut self.lock());
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A panic while holding the lock leaves plain data behind, still worth reading.
    fn lock(&self) -> MutexGuard<'_, HashMap<String, ClientStatus>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn type_status<'a>(
    clients: &'a mut HashMap<String, ClientStatus>,
    node_id: &str,
    type_url: &str,
) -> Option<&'a mut TypeStatus> {
    Some(clients.get_mut(node_id)?.types.entry(type_url.to_owned()).or_default())
}

fn push_outcome(status: &mut TypeStatus, outcome: Result<Ack, Nack>) {
    if status.outcomes.len() == OUTCOME_HISTORY {
        status.outcomes.pop_front();
    }
    status.outcomes.push_back(outcome);
}

/// Counts an open stream; closes it in the registry when dropped (however the stream task ends).
#[derive(Debug)]
pub(crate) struct StreamGuard {
    clients: Clients,
    node_id: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let node_id = std::mem::take(&mut self.node_id);
        self.clients.modify(|clients| {
            if let Some(client) = clients.get_mut(&node_id) {
                client.active_streams = client.active_streams.saturating_sub(1);
            }
        });
    }
}
