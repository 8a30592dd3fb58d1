//! Resolution for STRICT_DNS and LOGICAL_DNS clusters: resolve every endpoint's name, filter by the cluster's
//! `dns_lookup_family`, and build the host set. The refresh loop lives in the cluster manager.

use std::net::SocketAddr;
use std::sync::Arc;

use super::cluster::{Host, HostSet};
use crate::config::cluster::{ClusterConfig, ClusterKind, DnsFamily, EndpointAddress};

/// Applies Envoy's lookup family rules to one name's answers.
pub fn filter_family(addrs: Vec<SocketAddr>, family: DnsFamily) -> Vec<SocketAddr> {
    let (v4, v6): (Vec<_>, Vec<_>) = addrs.into_iter().partition(SocketAddr::is_ipv4);
    match family {
        DnsFamily::V4Only => v4,
        DnsFamily::V6Only => v6,
        DnsFamily::Auto => {
            if v6.is_empty() {
                v4
            } else {
                v6
            }
        }
        DnsFamily::V4Preferred => {
            if v4.is_empty() {
                v6
            } else {
                v4
            }
        }
        DnsFamily::All => v4.into_iter().chain(v6).collect(),
    }
}

/// Resolves the cluster's endpoints. A name that fails to resolve contributes no host; the error is returned for
/// logging alongside whatever did resolve.
pub async fn resolve(config: &ClusterConfig) -> (HostSet, Vec<String>) {
    let mut hosts = Vec::new();
    let mut errors = Vec::new();
    for ep in &config.endpoints {
        let (host, port) = match &ep.address {
            EndpointAddress::Ip(a) => {
                hosts.push((Arc::new(Host::of(*a, ep, ep.hostname.clone(), config.locality_weighted)), ep.healthy));
                continue;
            }
            EndpointAddress::Dns { host, port } => (host.clone(), *port),
        };
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(found) => {
                let mut found = filter_family(found.collect(), config.dns_family);
                found.dedup();
                // LOGICAL_DNS connects to the first answer only.
                if config.kind == ClusterKind::LogicalDns {
                    found.truncate(1);
                }
                if found.is_empty() {
                    errors.push(format!("{host}: no address of the requested family"));
                }
                let hostname = if ep.hostname.is_empty() { host.clone() } else { ep.hostname.clone() };
                for a in found {
                    hosts.push((Arc::new(Host::of(a, ep, hostname.clone(), config.locality_weighted)), ep.healthy));
                }
            }
            Err(e) => errors.push(format!("{host}: {e}")),
        }
    }
    (HostSet::new(hosts), errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_family_rules() {
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap_or_else(|_| unreachable!());
        let v6: SocketAddr = "[::1]:80".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(filter_family(vec![v4, v6], DnsFamily::Auto), vec![v6]);
        assert_eq!(filter_family(vec![v4], DnsFamily::Auto), vec![v4]);
        assert_eq!(filter_family(vec![v4, v6], DnsFamily::V4Preferred), vec![v4]);
        assert_eq!(filter_family(vec![v6], DnsFamily::V4Preferred), vec![v6]);
        assert_eq!(filter_family(vec![v4, v6], DnsFamily::V4Only), vec![v4]);
        assert_eq!(filter_family(vec![v4, v6], DnsFamily::V6Only), vec![v6]);
        assert_eq!(filter_family(vec![v6, v4], DnsFamily::All), vec![v4, v6]);
    }
}
