//! The gRPC server: ADS, the management API, reflection and health on one port, plus the in-process test handle.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use envoy_types::pb::google::protobuf::Any;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, server::Router};

use crate::ads::AdsService;
use crate::clients::{Ack, ClientStatus, Clients, WaitError};
use crate::management::ManagementService;
use crate::pb;
use crate::store::{Store, StoreError};

/// Large enough for a 10,000-listener SotW response and for SetResource bodies; tonic's 4 MiB default is not.
const MAX_MESSAGE_SIZE: usize = 256 * 1024 * 1024;

/// The services `grpcurl list` shows; the descriptor pool holds every Envoy service, but only these are served.
const SERVED_SERVICES: &[&str] = &[
    "envoy.service.discovery.v3.AggregatedDiscoveryService",
    "envoy.service.secret.v3.SecretDiscoveryService",
    "xds_mock.v1.Management",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot listen on {}: {source}", path.display())]
    BindUnix { path: std::path::PathBuf, source: std::io::Error },
    #[error("internal: building gRPC reflection from the descriptor sets: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        // Ours first: the proxy's set may hold the same file, and the first registration of a file name wins.
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(xds_proxy::config::proto::descriptor_set_bytes())
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .include_reflection_service(false);
    for service in SERVED_SERVICES {
        builder = builder.with_service_name(*service);
    }
    builder
}

/// Every service of the mock, ready to serve.
pub fn router(store: Store, clients: Clients, shutdown: CancellationToken) -> Result<Router, ServeError> {
    let ads = AdsService::new(store.clone(), clients.clone(), shutdown);
    let sds = SecretDiscoveryServiceServer::new(ads.clone())
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let ads = AggregatedDiscoveryServiceServer::new(ads)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let management = pb::management_server::ManagementServer::new(ManagementService::new(store, clients))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    // The reporter is dropped: the mock is serving as soon as it listens, which is the default status of "".
    let (_reporter, health) = tonic_health::server::health_reporter();
    Ok(Server::builder()
        .add_service(ads)
        .add_service(sds)
        .add_service(management)
        .add_service(reflection_builder().build_v1()?)
        .add_service(reflection_builder().build_v1alpha()?)
        .add_service(health))
}

/// Serves on `listener` until `shutdown` is cancelled; ADS streams end at once then, so shutdown does not wait for
/// clients to hang up.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    clients: Clients,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let router = router(store, clients, shutdown.clone())?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    router.serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()).await?;
    Ok(())
}

/// Binds a Unix socket at `path`, removing a socket file a previous run left behind.
pub fn bind_uds(path: &std::path::Path) -> Result<tokio::net::UnixListener, ServeError> {
    let bind_error = |source| ServeError::BindUnix { path: path.to_path_buf(), source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path).map_err(bind_error)?;
        }
        _ => {}
    }
    tokio::net::UnixListener::bind(path).map_err(bind_error)
}

/// Serves every service on a bound Unix socket until `shutdown`, as Istio's pilot-agent serves SDS to its sidecar.
pub async fn serve_uds_listener(
    listener: tokio::net::UnixListener,
    store: Store,
    clients: Clients,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let router = router(store, clients, shutdown.clone())?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    router.serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()).await?;
    Ok(())
}

/// Starts mock servers for tests and tools.
#[derive(Debug)]
pub struct MockServer;

impl MockServer {
    /// Listens on `addr` (`127.0.0.1:0` picks a free port) with an empty store.
    pub async fn start(addr: SocketAddr) -> Result<MockHandle, ServeError> {
        MockServer::start_with_store(addr, Store::new()).await
    }

    /// Listens on `addr` serving `store`, which the caller may keep changing.
    pub async fn start_with_store(addr: SocketAddr, store: Store) -> Result<MockHandle, ServeError> {
        let listener = TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;
        let clients = Clients::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, store.clone(), clients.clone(), shutdown.clone()));
        Ok(MockHandle { addr, store, clients, shutdown, task: Some(task) })
    }

    /// As [`MockServer::start_with_store`], also serving on the Unix socket `uds` (same store, same client
    /// registry), as pilot-agent serves SDS.
    pub async fn start_with_uds(
        addr: SocketAddr,
        uds: &std::path::Path,
        store: Store,
    ) -> Result<MockHandle, ServeError> {
        let uds = bind_uds(uds)?;
        let handle = MockServer::start_with_store(addr, store).await?;
        let (store, clients, shutdown) = (handle.store.clone(), handle.clients.clone(), handle.shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_uds_listener(uds, store, clients, shutdown).await {
                tracing::warn!("Unix socket server stopped: {e}");
            }
        });
        Ok(handle)
    }
}

/// A running mock server. Dropping it stops the server.
#[derive(Debug)]
pub struct MockHandle {
    addr: SocketAddr,
    store: Store,
    clients: Clients,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl MockHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, for tonic clients.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Replaces the whole set of `type_url`; returns the new version (always a new one).
    pub fn set(&self, type_url: &str, resources: Vec<Any>) -> Result<String, StoreError> {
        self.store.set(type_url, resources)
    }

    /// Replaces every type at once, as a file reload does; returns the types that changed and their versions.
    pub fn set_all(&self, all: BTreeMap<String, Vec<Any>>) -> Result<Vec<(String, String)>, StoreError> {
        self.store.replace_all(all)
    }

    /// Adds or replaces one resource; returns the new version of its type.
    pub fn upsert(&self, type_url: &str, resource: Any) -> Result<String, StoreError> {
        self.store.upsert(type_url, resource).map(|(_, version)| version)
    }

    /// Removes one resource; returns the new version of its type.
    pub fn remove(&self, type_url: &str, name: &str) -> Result<String, StoreError> {
        self.store.remove(type_url, name)
    }

    /// Awaits the ACK (`Ok`) or NACK (`Err(WaitError::Nack)`, with the client's message) of `version` of `type_url`
    /// from `node_id`. An answer that arrived before the call counts.
    pub async fn wait_for(
        &self,
        node_id: &str,
        type_url: &str,
        version: &str,
        timeout: Duration,
    ) -> Result<Ack, WaitError> {
        self.clients.wait_for(node_id, type_url, version, timeout).await
    }

    /// Every node seen since start.
    pub fn clients(&self) -> Vec<ClientStatus> {
        self.clients.list()
    }

    /// The registry itself, to share with other tasks.
    pub fn client_registry(&self) -> &Clients {
        &self.clients
    }

    /// Stops the server: closes every ADS stream and waits for the server task.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
