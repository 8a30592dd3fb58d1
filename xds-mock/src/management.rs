//! The `xds_mock.v1.Management` gRPC service: change resources at runtime and read what clients did with them.

use std::time::SystemTime;

use tonic::{Request, Response, Status};

use crate::clients::{ClientStatus, Clients};
use crate::pb;
use crate::pb::management_server::Management;
use crate::resource::{ResourceError, parse_resource, to_json};
use crate::store::{Store, StoreError};
use crate::types::resolve_type;

#[derive(Debug, Clone)]
pub struct ManagementService {
    store: Store,
    clients: Clients,
}

impl ManagementService {
    pub fn new(store: Store, clients: Clients) -> Self {
        ManagementService { store, clients }
    }
}

fn resolve(text: &str) -> Result<String, Status> {
    resolve_type(text).map_err(|err| Status::invalid_argument(err.to_string()))
}

fn store_status(err: StoreError) -> Status {
    match err {
        StoreError::NotFound { .. } => Status::not_found(err.to_string()),
        _ => Status::invalid_argument(err.to_string()),
    }
}

fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(at)
}

fn client_proto(client: ClientStatus) -> pb::Client {
    pb::Client {
        node_id: client.node_id,
        node_cluster: client.node.cluster,
        connected_since: Some(timestamp(client.connected_since)),
        active_streams: client.active_streams,
        types: client
            .types
            .into_iter()
            .map(|(type_url, status)| pb::TypeStatus {
                type_url,
                last_sent_version: status.last_sent_version.unwrap_or_default(),
                last_acked_version: status.last_acked_version.unwrap_or_default(),
                last_nack: status.last_nack.map(|nack| pb::Nack {
                    version: nack.version,
                    nonce: nack.nonce,
                    message: nack.message,
                    code: nack.code,
                    at: Some(timestamp(nack.at)),
                }),
                protocol: status.protocol.map(|p| p.as_str().to_owned()).unwrap_or_default(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl Management for ManagementService {
    async fn set_resource(
        &self,
        request: Request<pb::SetResourceRequest>,
    ) -> Result<Response<pb::SetResourceResponse>, Status> {
        let request = request.into_inner();
        let type_url = if request.r#type.is_empty() { None } else { Some(resolve(&request.r#type)?) };
        let value: serde_json::Value = serde_json::from_str(&request.resource_json)
            .map_err(|err| Status::invalid_argument(format!("resource_json: {err}")))?;
        let any = parse_resource(type_url.as_deref(), &value)
            .map_err(|err: ResourceError| Status::invalid_argument(format!("resource_json: {err}")))?;
        let type_url = any.type_url.clone();
        let (name, version) = self.store.upsert(&type_url, any).map_err(store_status)?;
        tracing::info!(type_url, name, version, "resource set through the management API");
        Ok(Response::new(pb::SetResourceResponse { type_url, name, version }))
    }

    async fn remove_resource(
        &self,
        request: Request<pb::RemoveResourceRequest>,
    ) -> Result<Response<pb::RemoveResourceResponse>, Status> {
        let request = request.into_inner();
        let type_url = resolve(&request.r#type)?;
        let version = self.store.remove(&type_url, &request.name).map_err(store_status)?;
        tracing::info!(type_url, name = request.name, version, "resource removed through the management API");
        Ok(Response::new(pb::RemoveResourceResponse { type_url, version }))
    }

    async fn list_resources(
        &self,
        request: Request<pb::ListResourcesRequest>,
    ) -> Result<Response<pb::ListResourcesResponse>, Status> {
        let request = request.into_inner();
        let only = if request.r#type.is_empty() { None } else { Some(resolve(&request.r#type)?) };
        let snapshot = self.store.snapshot();
        let types = snapshot
            .types()
            .filter(|(type_url, _)| only.as_ref().is_none_or(|only| only == *type_url))
            .map(|(type_url, snapshot)| pb::TypeResources {
                type_url: type_url.clone(),
                version: snapshot.version_string(),
                resources: snapshot
                    .resources
                    .values()
                    .map(|r| pb::ResourceInfo {
                        name: r.name.clone(),
                        version: r.version.clone(),
                        json: if request.include_json {
                            to_json(&r.any).map(|json| json.to_string()).unwrap_or_default()
                        } else {
                            String::new()
                        },
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListResourcesResponse { types }))
    }

    async fn list_clients(
        &self,
        _request: Request<pb::ListClientsRequest>,
    ) -> Result<Response<pb::ListClientsResponse>, Status> {
        let clients = self.clients.list().into_iter().map(client_proto).collect();
        Ok(Response::new(pb::ListClientsResponse { clients }))
    }
}
