//! `/clusters`: each cluster's circuit breakers and hosts in Envoy's text format
//! (`<cluster>::<host>:<port>::<stat>::<value>`) or as `envoy.admin.v3.Clusters` JSON.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::admin::v3 as admin;
use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
use envoy_types::pb::envoy::config::core::v3::{self as core, HealthStatus, RoutingPriority};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::google::protobuf::UInt32Value;

use crate::upstream::cluster::Cluster;

/// Envoy's defaults for the HIGH priority circuit breakers, which this proxy does not use but Envoy always prints.
const HIGH_DEFAULTS: Limits = (1024, 1024, 1024, 3);

/// One cluster as the handler needs it.
pub struct Entry {
    pub cluster: Arc<Cluster>,
    pub added_via_api: bool,
    /// Priority and locality of each endpoint address, from the cluster's load assignment (static or EDS).
    pub placement: HashMap<SocketAddr, (u32, core::Locality)>,
}

/// Where each endpoint of a load assignment sits: its priority and locality, by address.
pub fn placement(la: &ClusterLoadAssignment) -> HashMap<SocketAddr, (u32, core::Locality)> {
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let mut out = HashMap::new();
    for group in &la.endpoints {
        let locality = group.locality.clone().unwrap_or_default();
        for lb in &group.lb_endpoints {
            let Some(HostIdentifier::Endpoint(ep)) = &lb.host_identifier else { continue };
            let Some(core::address::Address::SocketAddress(sa)) = ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                continue;
            };
            let (Ok(ip), Some(core::socket_address::PortSpecifier::PortValue(port))) =
                (sa.address.parse::<std::net::IpAddr>(), sa.port_specifier.as_ref())
            else {
                continue;
            };
            let Ok(port) = u16::try_from(*port) else { continue };
            out.insert(SocketAddr::new(ip, port), (group.priority, locality.clone()));
        }
    }
    out
}

/// Circuit breaker limits: (max_connections, max_pending_requests, max_requests, max_retries).
type Limits = (u32, u32, u32, u32);

fn thresholds(c: &Cluster) -> [(&'static str, RoutingPriority, Limits); 2] {
    let http = &c.config.http;
    [
        (
            "default",
            RoutingPriority::Default,
            (c.config.max_connections, http.max_pending_requests, http.max_requests, http.max_retries),
        ),
        ("high", RoutingPriority::High, HIGH_DEFAULTS),
    ]
}

/// Envoy's text: breakers, `added_via_api`, outlier detection's success-rate thresholds, then per host its stats and
/// attributes. Hosts are the ones traffic may go to (healthy, of the priority in use), so their health flags read
/// `healthy` unless outlier detection ejected them (`/failed_outlier_check`).
pub fn text(clusters: &[Entry]) -> String {
    let mut out = String::new();
    for e in clusters {
        let c = &e.cluster;
        let name = c.name();
        for (prio, _, (cx, pending, rq, retries)) in thresholds(c) {
            let _ = writeln!(out, "{name}::{prio}_priority::max_connections::{cx}");
            let _ = writeln!(out, "{name}::{prio}_priority::max_pending_requests::{pending}");
            let _ = writeln!(out, "{name}::{prio}_priority::max_requests::{rq}");
            let _ = writeln!(out, "{name}::{prio}_priority::max_retries::{retries}");
        }
        let _ = writeln!(out, "{name}::added_via_api::{}", e.added_via_api);
        if c.config.outlier.is_some() {
            for (origin, prefix) in [(0, ""), (1, "local_origin_")] {
                let (average, threshold) = c.outlier_thresholds.get(origin);
                let _ = writeln!(out, "{name}::outlier::{prefix}success_rate_average::{average}");
                let _ = writeln!(out, "{name}::outlier::{prefix}success_rate_ejection_threshold::{threshold}");
            }
        }
        for host in &c.hosts().hosts {
            let addr = host.address;
            let (priority, locality) = e.placement.get(&addr).cloned().unwrap_or_default();
            let _ = writeln!(out, "{name}::{addr}::cx_active::{}", host.active());
            let _ = writeln!(out, "{name}::{addr}::hostname::{}", host.hostname);
            let flags = if host.is_ejected() { "/failed_outlier_check" } else { "healthy" };
            let _ = writeln!(out, "{name}::{addr}::health_flags::{flags}");
            let _ = writeln!(out, "{name}::{addr}::weight::{}", host.weight);
            let _ = writeln!(out, "{name}::{addr}::region::{}", locality.region);
            let _ = writeln!(out, "{name}::{addr}::zone::{}", locality.zone);
            let _ = writeln!(out, "{name}::{addr}::sub_zone::{}", locality.sub_zone);
            let _ = writeln!(out, "{name}::{addr}::canary::false");
            let _ = writeln!(out, "{name}::{addr}::priority::{priority}");
            let (rate, local_rate) = host.success_rates();
            let _ = writeln!(out, "{name}::{addr}::success_rate::{rate}");
            let _ = writeln!(out, "{name}::{addr}::local_origin_success_rate::{local_rate}");
        }
    }
    out
}

/// `envoy.admin.v3.Clusters`.
pub fn json(clusters: &[Entry]) -> admin::Clusters {
    let cluster_statuses = clusters
        .iter()
        .map(|e| {
            let c = &e.cluster;
            let circuit_breakers = envoy_types::pb::envoy::config::cluster::v3::CircuitBreakers {
                thresholds: thresholds(c)
                    .into_iter()
                    .map(|(_, priority, (cx, pending, rq, retries))| Thresholds {
                        priority: priority as i32,
                        max_connections: Some(UInt32Value { value: cx }),
                        max_pending_requests: Some(UInt32Value { value: pending }),
                        max_requests: Some(UInt32Value { value: rq }),
                        max_retries: Some(UInt32Value { value: retries }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            let host_statuses = c
                .hosts()
                .hosts
                .iter()
                .map(|h| admin::HostStatus {
                    locality: e.placement.get(&h.address).map(|(_, l)| l.clone()),
                    priority: e.placement.get(&h.address).map_or(0, |(p, _)| *p),
                    address: Some(socket_address(h.address)),
                    hostname: h.hostname.clone(),
                    stats: vec![admin::SimpleMetric {
                        r#type: admin::simple_metric::Type::Gauge as i32,
                        value: u64::from(h.active()),
                        name: "cx_active".to_string(),
                    }],
                    health_status: Some(admin::HostHealthStatus {
                        eds_health_status: HealthStatus::Healthy as i32,
                        failed_outlier_check: h.is_ejected(),
                        ..Default::default()
                    }),
                    success_rate: percent(h.success_rates().0),
                    local_origin_success_rate: percent(h.success_rates().1),
                    weight: h.weight,
                })
                .collect();
            let ((_, threshold), (_, local_threshold)) = (c.outlier_thresholds.get(0), c.outlier_thresholds.get(1));
            admin::ClusterStatus {
                name: c.name().to_string(),
                added_via_api: e.added_via_api,
                success_rate_ejection_threshold: percent(threshold),
                local_origin_success_rate_ejection_threshold: percent(local_threshold),
                host_statuses,
                circuit_breakers: Some(circuit_breakers),
                ..Default::default()
            }
        })
        .collect();
    admin::Clusters { cluster_statuses }
}

/// Envoy leaves a success rate out of the JSON when there is none (-1).
fn percent(v: f64) -> Option<envoy_types::pb::envoy::r#type::v3::Percent> {
    (v >= 0.0).then_some(envoy_types::pb::envoy::r#type::v3::Percent { value: v })
}

pub fn socket_address(a: std::net::SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(a.port()))),
            ..Default::default()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::outlier::{Outcome, test_cluster};

    /// Envoy's `/clusters` shows an ejected host's `/failed_outlier_check` flag, each host's success rate from the
    /// last sweep (-1 without enough requests) and the cluster's success-rate average and ejection threshold.
    #[test]
    fn clusters_show_outlier_ejections_and_success_rates() {
        let c = Arc::new(test_cluster(
            2,
            "consecutive_5xx: 3, max_ejection_percent: 50, success_rate_minimum_hosts: 2, \
             success_rate_request_volume: 4, success_rate_stdev_factor: 1000",
            "",
        ));
        let hosts = c.hosts();
        for _ in 0..4 {
            c.report(&hosts.hosts[0], Outcome::Status(200));
            c.report(&hosts.hosts[1], Outcome::Status(200));
            c.report(&hosts.hosts[1], Outcome::Status(503));
        }
        // Rates 100 and 50: mean 75, stdev 25, threshold 50 (not below it: nobody ejected by success rate).
        c.outlier_sweep();
        for _ in 0..3 {
            c.report(&hosts.hosts[1], Outcome::Status(503));
        }
        let entry = Entry { cluster: c.clone(), added_via_api: true, placement: HashMap::new() };
        let out = text(std::slice::from_ref(&entry));
        for line in [
            "c::outlier::success_rate_average::75",
            "c::outlier::success_rate_ejection_threshold::50",
            "c::outlier::local_origin_success_rate_ejection_threshold::-1",
            "c::127.0.0.1:1::health_flags::healthy",
            "c::127.0.0.1:1::success_rate::100",
            "c::127.0.0.1:2::health_flags::/failed_outlier_check",
            "c::127.0.0.1:2::success_rate::50",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from:\n{out}");
        }
        let status = &json(&[entry]).cluster_statuses[0];
        assert_eq!(status.success_rate_ejection_threshold.as_ref().map(|p| p.value), Some(50.0));
        assert_eq!(status.local_origin_success_rate_ejection_threshold, None);
        let ejected = &status.host_statuses[1];
        assert!(ejected.health_status.as_ref().is_some_and(|h| h.failed_outlier_check));
        assert_eq!(ejected.success_rate.as_ref().map(|p| p.value), Some(50.0));
    }
}
