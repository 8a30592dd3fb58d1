//! The xDS resource types: their type URLs, the short names people type for them, and where each keeps its name.

use prost::encoding::{WireType, decode_key, decode_varint};
use xds_proxy::config::proto::pool;

/// Prefix of every type URL we serve; the rest is the proto message name.
pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";
/// LDS.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// CDS.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// EDS.
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// RDS.
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// SDS.
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// A type name that is neither a known short name nor a message of the descriptor pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown resource type {0:?} (use a type URL, a message name, or listener/cluster/endpoint/route/secret)")]
pub struct UnknownType(pub String);

/// Turns what a user typed — a type URL, a message name or a short name (`listener`, `lds`, `clusters`, ...) —
/// into a type URL whose message is in the descriptor pool.
pub fn resolve_type(text: &str) -> Result<String, UnknownType> {
    let short = match text.to_ascii_lowercase().as_str() {
        "listener" | "listeners" | "lds" => Some(LISTENER),
        "cluster" | "clusters" | "cds" => Some(CLUSTER),
        "endpoint" | "endpoints" | "eds" | "cluster_load_assignment" | "clusterloadassignment" => Some(ENDPOINT),
        "route" | "routes" | "rds" | "route_configuration" | "routeconfiguration" => Some(ROUTE),
        "secret" | "secrets" | "sds" => Some(SECRET),
        _ => None,
    };
    if let Some(type_url) = short {
        return Ok(type_url.to_owned());
    }
    let type_url = if text.contains('/') { text.to_owned() } else { format!("{TYPE_URL_PREFIX}{text}") };
    if pool().get_message_by_name(message_name(&type_url)).is_some() {
        Ok(type_url)
    } else {
        Err(UnknownType(text.to_owned()))
    }
}

/// The proto message name of a type URL (everything after the last `/`).
pub fn message_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// Whether clients subscribe to this type as a whole (LDS, CDS) rather than by resource name, so that an empty
/// subscription on the first request means "everything" (the legacy wildcard of the xDS protocol).
pub fn is_wildcard_type(type_url: &str) -> bool {
    type_url == LISTENER || type_url == CLUSTER
}

/// The field number holding a resource's name: `cluster_name` for a ClusterLoadAssignment, `name` for every other
/// resource type that has one.
fn name_field_number(type_url: &str) -> Option<u32> {
    let message = pool().get_message_by_name(message_name(type_url))?;
    let field = message.get_field_by_name("name").or_else(|| message.get_field_by_name("cluster_name"))?;
    Some(field.number())
}

/// Reads a resource's name straight from its encoded bytes, without decoding the rest: a 10,000-listener set is
/// named in microseconds, and resources with types unknown to Rust (Istio's) are handled the same way.
pub fn resource_name(type_url: &str, value: &[u8]) -> Option<String> {
    scan_string_field(value, name_field_number(type_url)?)
}

/// The last occurrence of a top-level length-delimited field (protobuf's "last one wins" for scalars).
fn scan_string_field(mut buf: &[u8], number: u32) -> Option<String> {
    let mut found = None;
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf).ok()?;
        match wire_type {
            WireType::Varint => {
                decode_varint(&mut buf).ok()?;
            }
            WireType::SixtyFourBit => buf = buf.get(8..)?,
            WireType::ThirtyTwoBit => buf = buf.get(4..)?,
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                let field = buf.get(..len)?;
                if tag == number {
                    found = Some(String::from_utf8(field.to_vec()).ok()?);
                }
                buf = buf.get(len..)?;
            }
            // Groups are long deprecated and absent from Envoy's API; scanning past them is not worth the code.
            WireType::StartGroup | WireType::EndGroup => return None,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use prost::Message;

    #[test]
    fn resolves_short_names_and_message_names() {
        assert_eq!(resolve_type("listener").unwrap(), LISTENER);
        assert_eq!(resolve_type("EDS").unwrap(), ENDPOINT);
        assert_eq!(resolve_type("envoy.config.cluster.v3.Cluster").unwrap(), CLUSTER);
        assert_eq!(resolve_type(ROUTE).unwrap(), ROUTE);
        assert!(resolve_type("lisener").is_err());
    }

    #[test]
    fn reads_names_from_bytes() {
        let listener = Listener { name: "l1".into(), stat_prefix: "x".into(), ..Default::default() };
        assert_eq!(resource_name(LISTENER, &listener.encode_to_vec()).as_deref(), Some("l1"));
        let cla = ClusterLoadAssignment { cluster_name: "c1".into(), ..Default::default() };
        assert_eq!(resource_name(ENDPOINT, &cla.encode_to_vec()).as_deref(), Some("c1"));
        assert_eq!(resource_name(LISTENER, &[0xff]), None);
    }
}
