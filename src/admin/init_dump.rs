//! `/init_dump`: Envoy's `envoy.admin.v3.UnreadyTargetsDumps`, what each warming listener still waits for, named as
//! Envoy names its init managers and targets.

use envoy_types::pb::envoy::admin::v3::UnreadyTargetsDumps;
use envoy_types::pb::envoy::admin::v3::unready_targets_dumps::UnreadyTargetsDump;
use prost::Message;

use crate::listener::Listener;
use crate::listener::filter_chain::NetworkFilter;
use crate::upstream::ClusterSet;

/// One dump per warming listener (Envoy's only component, `mask=listener`; any other mask dumps nothing).
pub fn dump(warming: &[std::sync::Arc<Listener>], clusters: &ClusterSet, mask: Option<&str>) -> UnreadyTargetsDumps {
    if mask.is_some_and(|m| m != "listener") {
        return UnreadyTargetsDumps::default();
    }
    let unready_targets_dumps = warming
        .iter()
        .map(|l| {
            let config = l.config();
            UnreadyTargetsDump {
                name: format!("Listener-local-init-manager {} {}", config.name, fnv1a(&config.proto.encode_to_vec())),
                target_names: unready_targets(l, clusters),
            }
        })
        .collect();
    UnreadyTargetsDumps { unready_targets_dumps }
}

/// Envoy's target for an RDS subscription is `RdsRouteConfigSubscription init <name>`. A tcp_proxy cluster that does
/// not exist yet holds our listeners too (Envoy has no such target): `Cluster <name>`.
fn unready_targets(listener: &Listener, clusters: &ClusterSet) -> Vec<String> {
    let mut targets = Vec::new();
    let mut add = |t: String| {
        if !targets.contains(&t) {
            targets.push(t);
        }
    };
    for chain in listener.chains().all() {
        match &chain.filter {
            NetworkFilter::Http(hcm) => {
                if let Some(name) = hcm.config.rds_name()
                    && hcm.route_table().is_none()
                {
                    add(format!("RdsRouteConfigSubscription init {name}"));
                }
            }
            NetworkFilter::TcpProxy(tp) => {
                for (name, _) in &tp.config.clusters {
                    if clusters.get(name).is_none() {
                        add(format!("Cluster {name}"));
                    }
                }
            }
            NetworkFilter::DirectResponse(_) => {}
        }
    }
    targets
}

/// A stable hash of the listener's config for the init manager's name (Envoy uses xxHash64 of the same bytes; the
/// number only tells versions of a listener apart).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}
