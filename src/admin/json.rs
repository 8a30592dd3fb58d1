//! Admin JSON as Envoy prints it: protobuf JSON with the proto field names (`version_info`, not `versionInfo`),
//! `@type` Anys expanded through the embedded descriptors, pretty-printed with Envoy's one-space indent; and
//! FieldMask trimming for `/config_dump?mask=`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use envoy_types::pb::google::protobuf::{Any, Timestamp};
use prost::Message;
use prost_reflect::{DynamicMessage, Kind, MessageDescriptor, ReflectMessage, SerializeOptions, Value};
use serde_json::Value as Json;

use crate::config::proto::{self, ConvertError};

/// A reflected message as JSON with Envoy's options (proto field names; defaults printed only when asked).
pub fn dynamic_json(msg: &DynamicMessage, always_print_primitive_fields: bool) -> Result<Json, ConvertError> {
    let options =
        SerializeOptions::new().use_proto_field_name(true).skip_default_fields(!always_print_primitive_fields);
    msg.serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|source| ConvertError::Json { name: msg.descriptor().full_name().to_string(), source })
}

/// An envoy-types message as Envoy's pretty admin JSON text, fields in proto order.
pub fn message_text<T: Message>(
    msg: &T,
    full_name: &str,
    always_print_primitive_fields: bool,
) -> Result<String, ConvertError> {
    let msg = proto::to_dynamic(msg, full_name)?;
    let options =
        SerializeOptions::new().use_proto_field_name(true).skip_default_fields(!always_print_primitive_fields);
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(b" "));
    msg.serialize_with_options(&mut ser, &options)
        .map_err(|source| ConvertError::Json { name: full_name.to_string(), source })?;
    let mut text = String::from_utf8(out).unwrap_or_default();
    text.push('\n');
    Ok(text)
}

/// A timestamp as Envoy's dumps carry it: millisecond precision.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: since.as_secs() as i64, nanos: (since.subsec_millis() * 1_000_000) as i32 }
}

/// A `std` duration as a protobuf one.
pub fn duration(d: std::time::Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// Packs a message into an `Any` with its type URL.
pub fn pack<T: prost::Name>(msg: &T) -> Any {
    Any { type_url: T::type_url(), value: msg.encode_to_vec() }
}

pub fn pack_dynamic(msg: &DynamicMessage) -> Any {
    Any { type_url: format!("type.googleapis.com/{}", msg.descriptor().full_name()), value: msg.encode_to_vec() }
}

/// The paths of a FieldMask as written in a query (`a.b,c`).
pub fn mask_paths(mask: &str) -> Vec<String> {
    mask.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_string).collect()
}

/// A FieldMask as a tree of field names; a node with no children keeps its whole field.
#[derive(Debug, Default)]
struct MaskNode(BTreeMap<String, MaskNode>);

impl MaskNode {
    fn build(paths: &[String]) -> Self {
        let mut root = MaskNode::default();
        for path in paths {
            let mut node = &mut root;
            let mut whole = false;
            for seg in path.split('.') {
                if whole {
                    break;
                }
                let had = node.0.contains_key(seg);
                let child = node.0.entry(seg.to_string()).or_default();
                // An existing leaf already keeps the whole field: a deeper path adds nothing.
                whole = had && child.0.is_empty();
                node = child;
            }
            if !whole {
                // This path ends here: keep the whole field even if a longer path named part of it.
                node.0.clear();
            }
        }
        root
    }
}

/// Whether every path names a field, through singular message fields only (protobuf's FieldMaskUtil rule: masks do
/// not index repeated fields).
pub fn mask_is_valid(desc: &MessageDescriptor, paths: &[String]) -> bool {
    paths.iter().all(|path| {
        let mut desc = desc.clone();
        let segs: Vec<&str> = path.split('.').collect();
        for (i, seg) in segs.iter().enumerate() {
            let Some(field) = desc.get_field_by_name(seg) else { return false };
            if i + 1 == segs.len() {
                return true;
            }
            match field.kind() {
                Kind::Message(m) if !field.is_list() && !field.is_map() => desc = m,
                _ => return false,
            }
        }
        false
    })
}

/// Keeps only the fields the mask names (protobuf's `FieldMaskUtil::TrimMessage`).
pub fn trim(msg: &mut DynamicMessage, paths: &[String]) {
    trim_node(msg, &MaskNode::build(paths));
}

fn trim_node(msg: &mut DynamicMessage, node: &MaskNode) {
    let fields: Vec<_> = msg.fields().map(|(f, _)| f).collect();
    for field in fields {
        match node.0.get(field.name()) {
            None => msg.clear_field(&field),
            Some(child) if child.0.is_empty() => {}
            Some(child) => {
                if let Value::Message(inner) = msg.get_field_mut(&field) {
                    trim_node(inner, child);
                }
            }
        }
    }
}

/// Envoy's mask for one config dump resource: a path through the resource's single Any field (`cluster.name`) masks
/// inside the packed resource, the rest masks the resource message itself. False when the mask does not fit.
pub fn trim_resource(msg: &mut DynamicMessage, paths: &[String]) -> bool {
    let desc = msg.descriptor();
    let mut outer = Vec::new();
    let mut inner = Vec::new();
    let mut any_field = None;
    for path in paths {
        let (first, rest) = path.split_once('.').unwrap_or((path.as_str(), ""));
        let field = desc.get_field_by_name(first);
        let is_any = field.as_ref().is_some_and(|f| {
            !f.is_list() && matches!(f.kind(), Kind::Message(m) if m.full_name() == "google.protobuf.Any")
        });
        if is_any {
            if any_field.as_ref().is_some_and(|f: &prost_reflect::FieldDescriptor| f.name() != first) {
                return false;
            }
            any_field = field;
            outer.push(first.to_string());
            if !rest.is_empty() {
                inner.push(rest.to_string());
            }
        } else {
            outer.push(path.clone());
        }
    }
    if let Some(field) = any_field
        && !inner.is_empty()
        && msg.has_field(&field)
    {
        let Value::Message(any_msg) = msg.get_field(&field).into_owned() else { return false };
        let Ok(any) = any_msg.transcode_to::<Any>() else { return false };
        let Some(type_name) = any.type_url.rsplit('/').next() else { return false };
        let Ok(inner_desc) = proto::message_descriptor(type_name) else { return false };
        let Ok(mut resource) = DynamicMessage::decode(inner_desc.clone(), any.value.as_slice()) else { return false };
        if !mask_is_valid(&inner_desc, &inner) {
            return false;
        }
        trim(&mut resource, &inner);
        let repacked = Any { type_url: any.type_url, value: resource.encode_to_vec() };
        let mut any_value = DynamicMessage::new(any_msg.descriptor());
        if any_value.transcode_from(&repacked).is_err() {
            return false;
        }
        msg.set_field(&field, Value::Message(any_value));
    }
    if !mask_is_valid(&desc, &outer) {
        return false;
    }
    trim(msg, &outer);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::admin::v3::ServerInfo;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    #[test]
    fn proto_field_names_and_one_space_indent() {
        let info = ServerInfo { version: "x".into(), hot_restart_version: "disabled".into(), ..Default::default() };
        let text = message_text(&info, "envoy.admin.v3.ServerInfo", true).unwrap();
        assert!(text.contains("\n \"hot_restart_version\": \"disabled\""), "{text}");
        assert!(text.contains("\"state\": \"LIVE\""), "primitive fields always printed: {text}");
    }

    #[test]
    fn masks_trim_and_reach_into_the_packed_resource() {
        use envoy_types::pb::envoy::admin::v3::clusters_config_dump::DynamicCluster;
        let cluster = Cluster { name: "c".into(), alt_stat_name: "alt".into(), ..Default::default() };
        let dc = DynamicCluster { version_info: "3".into(), cluster: Some(pack(&cluster)), ..Default::default() };
        let mut msg = proto::to_dynamic(&dc, "envoy.admin.v3.ClustersConfigDump.DynamicCluster").unwrap_or_else(|e| {
            panic!("{e}");
        });
        assert!(trim_resource(&mut msg, &mask_paths("cluster.name")));
        let json = dynamic_json(&msg, false).unwrap_or_default();
        assert_eq!(
            json,
            serde_json::json!({"cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "c"}})
        );
        assert!(!trim_resource(&mut msg, &mask_paths("no_such_field")));
    }

    #[test]
    fn a_mask_keeps_named_paths_only() {
        let info = ServerInfo { version: "v".into(), hot_restart_version: "h".into(), ..Default::default() };
        let mut msg = proto::to_dynamic(&info, "envoy.admin.v3.ServerInfo").unwrap_or_else(|e| panic!("{e}"));
        let desc = msg.descriptor();
        assert!(mask_is_valid(&desc, &mask_paths("version,node.id")));
        assert!(!mask_is_valid(&desc, &mask_paths("version.x")));
        trim(&mut msg, &mask_paths("version"));
        assert_eq!(dynamic_json(&msg, false).unwrap_or_default(), serde_json::json!({"version": "v"}));
    }
}
