//! `/config_dump`: the running config as `envoy.admin.v3.ConfigDump`, in Envoy's order (bootstrap, clusters,
//! endpoints with `?include_eds`, listeners, scoped routes, routes, secrets), with Envoy's `?resource=`, `?mask=`
//! and `?name_regex=`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::admin::v3::{self as admin, ClientResourceStatus};
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::google::protobuf::{Timestamp, UInt32Value};
use prost::Message;
use prost_reflect::{DynamicMessage, ReflectMessage};
use regex::Regex;

use super::Context;
use super::json::{self, pack, timestamp};
use crate::config::cluster::ClusterKind;
use crate::config::proto;
use crate::xds::status::{Failure, Held, ResourceStatus};
use crate::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};

/// The query of one `/config_dump` request.
#[derive(Debug, Default)]
pub struct Params {
    pub resource: Option<String>,
    pub mask: Option<String>,
    pub name_regex: Option<Regex>,
    pub include_eds: bool,
}

/// A refused request: the status code and Envoy's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: u16,
    pub text: String,
}

impl Params {
    fn keep(&self, name: &str) -> bool {
        self.name_regex.as_ref().is_none_or(|r| r.is_match(name))
    }
}

type Part<'a> = Box<dyn Fn() -> Result<DynamicMessage, proto::ConvertError> + 'a>;

/// Builds the dump. The result is a `ConfigDump` ready for JSON.
pub fn dump(ctx: &Context, params: &Params) -> Result<admin::ConfigDump, Refused> {
    let mut parts: Vec<Part<'_>> = vec![
        Box::new(|| proto::to_dynamic(&bootstrap(ctx), "envoy.admin.v3.BootstrapConfigDump")),
        Box::new(|| proto::to_dynamic(&clusters(ctx, params), "envoy.admin.v3.ClustersConfigDump")),
    ];
    if params.include_eds {
        parts.push(Box::new(|| proto::to_dynamic(&endpoints(ctx, params), "envoy.admin.v3.EndpointsConfigDump")));
    }
    parts.push(Box::new(|| proto::to_dynamic(&listeners(ctx, params), "envoy.admin.v3.ListenersConfigDump")));
    parts.push(Box::new(|| {
        proto::to_dynamic(&admin::ScopedRoutesConfigDump::default(), "envoy.admin.v3.ScopedRoutesConfigDump")
    }));
    parts.push(Box::new(|| proto::to_dynamic(&routes(ctx, params), "envoy.admin.v3.RoutesConfigDump")));
    parts.push(Box::new(|| proto::to_dynamic(&secrets(ctx, params), "envoy.admin.v3.SecretsConfigDump")));
    let internal = |e: proto::ConvertError| Refused { code: 500, text: e.to_string() };

    let mask = params.mask.as_deref().map(json::mask_paths);
    let mut configs = Vec::new();
    if let Some(resource) = &params.resource {
        for build in &parts {
            let msg = build().map_err(internal)?;
            let desc = msg.descriptor();
            let Some(field) = desc.get_field_by_name(resource) else { continue };
            if !field.is_list() {
                return Err(Refused {
                    code: 400,
                    text: format!("{resource} is not a repeated field. Use ?mask={resource} to get only this field"),
                });
            }
            let items = msg.get_field(&field).as_list().map(<[_]>::to_vec).unwrap_or_default();
            for item in items {
                let Some(mut item) = item.as_message().cloned() else { continue };
                if let Some(paths) = &mask
                    && !json::trim_resource(&mut item, paths)
                {
                    return Err(Refused {
                        code: 400,
                        text: format!("FieldMask paths: \"{}\" could not be successfully used.", paths.join(",")),
                    });
                }
                configs.push(json::pack_dynamic(&item));
            }
            return Ok(admin::ConfigDump { configs });
        }
        return Err(Refused { code: 404, text: format!("{resource} not found in config dump") });
    }
    for build in &parts {
        let mut msg = build().map_err(internal)?;
        if let Some(paths) = &mask {
            // Each dump type has its own fields: a mask that does not fit one just leaves that one out.
            if !json::mask_is_valid(&msg.descriptor(), paths) {
                continue;
            }
            json::trim(&mut msg, paths);
        }
        configs.push(json::pack_dynamic(&msg));
    }
    if configs.is_empty()
        && let Some(m) = &params.mask
    {
        return Err(Refused {
            code: 400,
            text: format!("FieldMask {m} could not be successfully applied to any configs."),
        });
    }
    Ok(admin::ConfigDump { configs })
}

fn ts(t: Option<SystemTime>) -> Option<Timestamp> {
    t.map(timestamp)
}

fn failure(f: &Failure) -> admin::UpdateFailureState {
    admin::UpdateFailureState {
        failed_configuration: f.failed.clone(),
        last_update_attempt: Some(timestamp(f.at)),
        details: f.details.clone(),
        version_info: f.version.clone(),
    }
}

fn bootstrap(ctx: &Context) -> admin::BootstrapConfigDump {
    admin::BootstrapConfigDump {
        bootstrap: Some((*ctx.bootstrap.proto).clone()),
        last_updated: Some(timestamp(ctx.lifecycle.started())),
    }
}

fn statuses(ctx: &Context, type_url: &str) -> BTreeMap<String, ResourceStatus> {
    ctx.status.resources(type_url).into_iter().collect()
}

fn clusters(ctx: &Context, params: &Params) -> admin::ClustersConfigDump {
    use admin::clusters_config_dump::{DynamicCluster, StaticCluster};
    let all: Vec<Arc<crate::upstream::cluster::Cluster>> = {
        let cm = ctx.cluster_manager();
        cm.names().iter().filter(|n| params.keep(n)).filter_map(|n| cm.get(n)).collect()
    };
    let status = statuses(ctx, CLUSTER);
    let started = Some(timestamp(ctx.lifecycle.started()));
    let mut dump = admin::ClustersConfigDump { version_info: ctx.status.type_version(CLUSTER).0, ..Default::default() };
    for c in all {
        let any = pack(&*c.config.proto);
        if ctx.is_static_cluster(c.name()) {
            dump.static_clusters.push(StaticCluster { cluster: Some(any), last_updated: started });
            continue;
        }
        let st = status.get(c.name());
        dump.dynamic_active_clusters.push(DynamicCluster {
            version_info: st.map(|s| s.version.clone()).unwrap_or_default(),
            cluster: Some(any),
            last_updated: st.and_then(|s| ts(s.last_updated)),
            error_state: st.and_then(|s| s.error.as_ref()).map(failure),
            client_status: st.map_or(ClientResourceStatus::Acked, |s| s.status) as i32,
        });
    }
    dump
}

fn listeners(ctx: &Context, params: &Params) -> admin::ListenersConfigDump {
    use admin::listeners_config_dump::{DynamicListener, DynamicListenerState, StaticListener};
    let (active, warming, draining, statics) = {
        let lm = ctx.listener_manager();
        let active = lm.active_listeners();
        let statics: std::collections::HashSet<String> =
            active.iter().map(|l| l.name().to_string()).filter(|n| lm.is_static(n)).collect();
        (active, lm.warming_listeners(), lm.draining_listeners(), statics)
    };
    let started = Some(timestamp(ctx.lifecycle.started()));
    let state = |name: &str, proto: &Arc<lpb::Listener>| {
        let (version_info, last_updated) = ctx.status.listener_version(name, proto).unwrap_or_default();
        DynamicListenerState { version_info, listener: Some(pack(&**proto)), last_updated: ts(last_updated) }
    };
    let mut dump =
        admin::ListenersConfigDump { version_info: ctx.status.type_version(LISTENER).0, ..Default::default() };
    let mut dynamic: BTreeMap<String, DynamicListener> = BTreeMap::new();
    let entry = |dynamic: &mut BTreeMap<String, DynamicListener>, name: &str| {
        dynamic
            .entry(name.to_string())
            .or_insert_with(|| DynamicListener { name: name.to_string(), ..Default::default() });
    };
    for l in active.iter().filter(|l| params.keep(l.name())) {
        if statics.contains(l.name()) {
            dump.static_listeners
                .push(StaticListener { listener: Some(pack(&*l.config().proto)), last_updated: started });
            continue;
        }
        entry(&mut dynamic, l.name());
        if let Some(d) = dynamic.get_mut(l.name()) {
            d.active_state = Some(state(l.name(), &l.config().proto));
        }
    }
    for l in warming.iter().filter(|l| params.keep(l.name())) {
        entry(&mut dynamic, l.name());
        if let Some(d) = dynamic.get_mut(l.name()) {
            d.warming_state = Some(state(l.name(), &l.config().proto));
        }
    }
    for c in draining.iter().filter(|c| params.keep(&c.name)) {
        entry(&mut dynamic, &c.name);
        if let Some(d) = dynamic.get_mut(&c.name) {
            d.draining_state = Some(state(&c.name, &c.proto));
        }
    }
    for (name, st) in statuses(ctx, LISTENER) {
        if !params.keep(&name) || statics.contains(&name) {
            continue;
        }
        if st.error.is_some() || dynamic.contains_key(&name) {
            entry(&mut dynamic, &name);
        }
        if let Some(d) = dynamic.get_mut(&name) {
            d.error_state = st.error.as_ref().map(failure);
            d.client_status = st.status as i32;
        }
    }
    dump.dynamic_listeners = dynamic.into_values().collect();
    dump
}

/// The inline route configuration of every HTTP connection manager of a listener.
fn inline_routes(l: &lpb::Listener) -> Vec<envoy_types::pb::envoy::config::route::v3::RouteConfiguration> {
    use hcm::http_connection_manager::RouteSpecifier;
    use lpb::filter::ConfigType;
    const HCM: &str =
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    l.filter_chains
        .iter()
        .chain(l.default_filter_chain.iter())
        .flat_map(|c| &c.filters)
        .filter_map(|f| match &f.config_type {
            Some(ConfigType::TypedConfig(any)) if any.type_url == HCM => {
                hcm::HttpConnectionManager::decode(any.value.as_slice()).ok()
            }
            _ => None,
        })
        .filter_map(|h| match h.route_specifier {
            Some(RouteSpecifier::RouteConfig(rc)) => Some(rc),
            _ => None,
        })
        .collect()
}

fn routes(ctx: &Context, params: &Params) -> admin::RoutesConfigDump {
    use admin::routes_config_dump::{DynamicRouteConfig, StaticRouteConfig};
    let listeners = ctx.listener_manager().active_listeners();
    let mut dump = admin::RoutesConfigDump::default();
    for l in &listeners {
        let last_updated = ctx
            .status
            .listener_version(l.name(), &l.config().proto)
            .and_then(|(_, t)| t)
            .unwrap_or_else(|| ctx.lifecycle.started());
        for rc in inline_routes(&l.config().proto).into_iter().filter(|rc| params.keep(&rc.name)) {
            dump.static_route_configs
                .push(StaticRouteConfig { route_config: Some(pack(&rc)), last_updated: Some(timestamp(last_updated)) });
        }
    }
    for (name, st) in statuses(ctx, ROUTE) {
        if !params.keep(&name) || (st.resource.is_none() && st.error.is_none()) {
            continue;
        }
        dump.dynamic_route_configs.push(DynamicRouteConfig {
            version_info: st.version.clone(),
            route_config: st.resource.as_ref().map(Held::to_any),
            last_updated: ts(st.last_updated),
            error_state: st.error.as_ref().map(failure),
            client_status: st.status as i32,
        });
    }
    dump
}

/// Envoy's secrets dump: static secrets, then per SDS subscription the active (delivered) and warming (asked for,
/// not delivered) secrets; private keys redacted as Envoy redacts them.
fn secrets(ctx: &Context, params: &Params) -> admin::SecretsConfigDump {
    use crate::secret::SecretSource;
    use admin::secrets_config_dump::{DynamicSecret, StaticSecret};
    let slots = ctx.listener_manager().secrets().all();
    let status = statuses(ctx, SECRET);
    let started = Some(timestamp(ctx.lifecycle.started()));
    let mut dump = admin::SecretsConfigDump::default();
    for slot in slots.iter().filter(|s| params.keep(&s.name)) {
        let current = slot.current();
        if slot.source == SecretSource::Static {
            dump.static_secrets.push(StaticSecret {
                name: slot.name.clone(),
                last_updated: started,
                secret: current.map(|s| pack(&s.redacted)),
            });
            continue;
        }
        let st = status.get(&slot.name);
        let entry = DynamicSecret {
            name: slot.name.clone(),
            version_info: current.as_ref().map(|s| s.version.clone()).unwrap_or_default(),
            last_updated: current.as_ref().map(|s| timestamp(s.last_updated)),
            secret: Some(match &current {
                Some(s) => pack(&s.redacted),
                None => pack(&envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret {
                    name: slot.name.clone(),
                    r#type: None,
                }),
            }),
            error_state: st.and_then(|s| s.error.as_ref()).map(failure),
            client_status: st.map_or(ClientResourceStatus::Requested, |s| s.status) as i32,
        };
        if current.is_some() {
            dump.dynamic_active_secrets.push(entry);
        } else {
            dump.dynamic_warming_secrets.push(entry);
        }
    }
    dump
}

fn endpoints(ctx: &Context, params: &Params) -> admin::EndpointsConfigDump {
    use admin::endpoints_config_dump::{DynamicEndpointConfig, StaticEndpointConfig};
    let all: Vec<Arc<crate::upstream::cluster::Cluster>> = {
        let cm = ctx.cluster_manager();
        cm.names().iter().filter_map(|n| cm.get(n)).collect()
    };
    let eds = statuses(ctx, ENDPOINT);
    let started = Some(timestamp(ctx.lifecycle.started()));
    let mut dump = admin::EndpointsConfigDump::default();
    for c in all {
        let (name, from_eds) = match &c.config.kind {
            ClusterKind::Eds { service_name } => (service_name.clone(), eds.get(service_name)),
            _ => (c.name().to_string(), None),
        };
        if !params.keep(&name) {
            continue;
        }
        let la = match from_eds.and_then(|s| s.resource.as_ref()) {
            Some(held) => held.to_any(),
            None => pack(&live_assignment(&name, &c)),
        };
        if ctx.is_static_cluster(c.name()) {
            dump.static_endpoint_configs
                .push(StaticEndpointConfig { endpoint_config: Some(la), last_updated: started });
        } else {
            dump.dynamic_endpoint_configs.push(DynamicEndpointConfig {
                version_info: from_eds.map(|s| s.version.clone()).unwrap_or_default(),
                endpoint_config: Some(la),
                last_updated: from_eds.and_then(|s| ts(s.last_updated)),
                error_state: from_eds.and_then(|s| s.error.as_ref()).map(failure),
                client_status: from_eds.map_or(ClientResourceStatus::Acked, |s| s.status) as i32,
            });
        }
    }
    dump
}

/// A cluster's hosts as a load assignment, as Envoy dumps non-EDS clusters (from its live host set).
fn live_assignment(name: &str, c: &crate::upstream::cluster::Cluster) -> epb::ClusterLoadAssignment {
    use epb::lb_endpoint::HostIdentifier;
    let hosts = c.hosts();
    let lb_endpoints: Vec<epb::LbEndpoint> = hosts
        .hosts
        .iter()
        .map(|h| epb::LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(epb::Endpoint {
                address: Some(super::clusters::socket_address(h.address)),
                hostname: h.hostname.clone(),
                ..Default::default()
            })),
            health_status: envoy_types::pb::envoy::config::core::v3::HealthStatus::Healthy as i32,
            load_balancing_weight: Some(UInt32Value { value: h.weight }),
            ..Default::default()
        })
        .collect();
    let endpoints = if lb_endpoints.is_empty() {
        Vec::new()
    } else {
        vec![epb::LocalityLbEndpoints { lb_endpoints, ..Default::default() }]
    };
    epb::ClusterLoadAssignment { cluster_name: name.to_string(), endpoints, ..Default::default() }
}
