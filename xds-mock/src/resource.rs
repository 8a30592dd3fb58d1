//! Envoy-format JSON to and from `Any` resources, through the proxy's descriptor pool (so every Envoy type and the
//! Istio-only ones parse exactly as the proxy parses them).

use std::collections::BTreeMap;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};
use prost_reflect::{DynamicMessage, Kind, MessageDescriptor, SerializeOptions};
use xds_proxy::config::proto::{Format, ParseError, decode, parse_dynamic, pool};

use crate::types::{TYPE_URL_PREFIX, message_name};

const ANY: &str = "google.protobuf.Any";

/// Why resource text was refused; one line, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("{0}")]
    Convert(String),
    #[error("\"@type\" is {found} but the resource was given as {expected}")]
    TypeMismatch { expected: String, found: String },
    #[error("no type given and no \"@type\" in the resource")]
    NoType,
}

/// Parses one resource given as a JSON/YAML value. With `@type` it is read as a `google.protobuf.Any` (and must
/// match `type_url` when one is given); without, as a message of `type_url`.
pub fn parse_resource(type_url: Option<&str>, value: &serde_json::Value) -> Result<Any, ResourceError> {
    let text = value.to_string();
    if value.get("@type").is_some() {
        let any: Any =
            decode(&parse_dynamic(&text, Format::Json, ANY)?).map_err(|err| ResourceError::Convert(err.to_string()))?;
        if let Some(expected) = type_url.filter(|t| *t != any.type_url) {
            return Err(ResourceError::TypeMismatch { expected: expected.to_owned(), found: any.type_url });
        }
        return Ok(canonical_any(any));
    }
    let type_url = type_url.ok_or(ResourceError::NoType)?;
    let message = parse_dynamic(&text, Format::Json, message_name(type_url))?;
    Ok(canonical_any(Any { type_url: type_url.to_owned(), value: message.encode_to_vec() }))
}

/// `any` with its value in canonical encoding (see [`canonical_bytes`]); unchanged when its type is unknown.
pub fn canonical_any(any: Any) -> Any {
    let name = message_name(&any.type_url);
    match pool().get_message_by_name(name) {
        Some(descriptor) => Any { value: canonical_bytes(&descriptor, &any.value), type_url: any.type_url },
        None => any,
    }
}

/// Re-encodes `bytes` (a message of type `descriptor`) with every map's entries sorted, inside nested messages and
/// inside `Any`s of known types too. Protobuf encoders write maps in hash order, which differs from one parse to
/// the next (Istio's configs are full of `Struct`s); sorted, the same text always gives the same bytes, so the
/// per-resource versions and a client's "unchanged" checks are stable across reloads. Bytes that do not decode
/// as the type are returned as they are.
pub fn canonical_bytes(descriptor: &MessageDescriptor, bytes: &[u8]) -> Vec<u8> {
    canonicalize(descriptor, bytes).unwrap_or_else(|| bytes.to_vec())
}

fn canonicalize(descriptor: &MessageDescriptor, mut buf: &[u8]) -> Option<Vec<u8>> {
    // An Any's value is re-encoded by the type its type_url names; find that first (it may come after the value).
    let any_type = if descriptor.full_name() == "google.protobuf.Any" { any_type_url(buf) } else { None };
    let mut out = Vec::with_capacity(buf.len());
    // Map entries are gathered per field and written, sorted, where the field first appeared.
    let mut maps: BTreeMap<u32, Vec<Vec<u8>>> = BTreeMap::new();
    let mut map_positions: Vec<(usize, u32)> = Vec::new();
    while !buf.is_empty() {
        let field_start = buf;
        let (number, wire_type) = decode_key(&mut buf).ok()?;
        match wire_type {
            WireType::Varint => {
                decode_varint(&mut buf).ok()?;
            }
            WireType::SixtyFourBit => buf = buf.get(8..)?,
            WireType::ThirtyTwoBit => buf = buf.get(4..)?,
            WireType::StartGroup | WireType::EndGroup => return None,
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                let payload = buf.get(..len)?;
                buf = buf.get(len..)?;
                let nested = match (descriptor.get_field(number).map(|f| (f.is_map(), f.kind())), &any_type) {
                    (Some((is_map, Kind::Message(message))), _) => Some((is_map, canonicalize(&message, payload)?)),
                    (None | Some(_), Some(any_type)) if number == 2 => match pool().get_message_by_name(any_type) {
                        Some(message) => Some((false, canonicalize(&message, payload)?)),
                        None => None,
                    },
                    _ => None,
                };
                match nested {
                    Some((true, entry)) => {
                        let entries = maps.entry(number).or_default();
                        if entries.is_empty() {
                            map_positions.push((out.len(), number));
                        }
                        entries.push(entry);
                    }
                    Some((false, payload)) => {
                        encode_key(number, WireType::LengthDelimited, &mut out);
                        encode_varint(payload.len() as u64, &mut out);
                        out.extend_from_slice(&payload);
                    }
                    None => out.extend_from_slice(field_start.get(..field_start.len() - buf.len())?),
                }
                continue;
            }
        }
        out.extend_from_slice(field_start.get(..field_start.len() - buf.len())?);
    }
    if map_positions.is_empty() {
        return Some(out);
    }
    // Insert the sorted map fields at their first positions, back to front so earlier offsets stay valid.
    for (position, number) in map_positions.into_iter().rev() {
        let mut entries = maps.remove(&number).unwrap_or_default();
        entries.sort();
        let mut encoded = Vec::new();
        for entry in entries {
            encode_key(number, WireType::LengthDelimited, &mut encoded);
            encode_varint(entry.len() as u64, &mut encoded);
            encoded.extend_from_slice(&entry);
        }
        out.splice(position..position, encoded);
    }
    Some(out)
}

/// The message name of an encoded Any's type_url (field 1).
fn any_type_url(mut buf: &[u8]) -> Option<String> {
    let mut found = None;
    while !buf.is_empty() {
        let (number, wire_type) = decode_key(&mut buf).ok()?;
        match wire_type {
            WireType::Varint => {
                decode_varint(&mut buf).ok()?;
            }
            WireType::SixtyFourBit => buf = buf.get(8..)?,
            WireType::ThirtyTwoBit => buf = buf.get(4..)?,
            WireType::StartGroup | WireType::EndGroup => return None,
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                let payload = buf.get(..len)?;
                buf = buf.get(len..)?;
                if number == 1 {
                    found = Some(message_name(std::str::from_utf8(payload).ok()?).to_owned());
                }
            }
        }
    }
    found
}

/// Envoy JSON of a resource (snake_case field names, defaults omitted), for listing; `None` when its type is not
/// in the pool or its bytes do not decode.
pub fn to_json(any: &Any) -> Option<serde_json::Value> {
    let name = any.type_url.strip_prefix(TYPE_URL_PREFIX).unwrap_or(message_name(&any.type_url));
    let descriptor = pool().get_message_by_name(name)?;
    let message = DynamicMessage::decode(descriptor, any.value.as_slice()).ok()?;
    let options = SerializeOptions::new().use_proto_field_name(true).skip_default_fields(true);
    message.serialize_with_options(serde_json::value::Serializer, &options).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::types::CLUSTER;

    /// Maps come out of the encoder in hash order; canonical bytes do not depend on it.
    #[test]
    fn same_text_same_bytes() {
        let keys: serde_json::Map<String, serde_json::Value> =
            (0..32).map(|i| (format!("key{i}"), serde_json::Value::from(i))).collect();
        let cluster = serde_json::json!({
            "name": "c",
            "metadata": {"filter_metadata": {"a": keys.clone(), "b": keys.clone(), "c": keys}},
            "typed_extension_protocol_options": {
                "x": {"@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "type_url": "t", "value": {"k1": 1, "k2": 2, "k3": 3}}
            }
        });
        let first = parse_resource(Some(CLUSTER), &cluster).unwrap();
        for _ in 0..8 {
            assert_eq!(parse_resource(Some(CLUSTER), &cluster).unwrap(), first);
        }
        assert_eq!(to_json(&first).unwrap()["metadata"]["filter_metadata"]["b"]["key31"], 31.0);
    }

    #[test]
    fn unknown_bytes_are_kept() {
        let any = Any { type_url: CLUSTER.into(), value: vec![0xff, 0x01] };
        assert_eq!(canonical_any(any.clone()), any);
    }
}
