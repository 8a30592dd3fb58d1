//! Envoy-format JSON to and from `Any` resources, through the proxy's descriptor pool (so every Envoy type and the
//! Istio-only ones parse exactly as the proxy parses them).

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost_reflect::{DynamicMessage, SerializeOptions};
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
        return Ok(any);
    }
    let type_url = type_url.ok_or(ResourceError::NoType)?;
    let message = parse_dynamic(&text, Format::Json, message_name(type_url))?;
    Ok(Any { type_url: type_url.to_owned(), value: message.encode_to_vec() })
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
