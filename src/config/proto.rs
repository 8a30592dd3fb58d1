//! Envoy config text (JSON/YAML) to and from envoy-types structs, through the descriptor set that
//! build.rs compiles from Envoy's protos: the one place that knows Envoy's proto JSON mapping.
//!
//! Parsing goes text → `serde_json::Value` → [`DynamicMessage`] (prost-reflect's proto3 JSON
//! mapping, so snake_case and lowerCamelCase names, `@type` Anys, `"1s"` durations, 64-bit integers as
//! strings and enums by name all work as in Envoy) → envoy-types struct by re-encoding.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, ReflectMessage, SerializeOptions};
use serde::de::DeserializeSeed;
use serde_json::Value as Json;
use serde_path_to_error::Segment;

const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";
const ANY: &str = "google.protobuf.Any";
/// Where the overlay text comes from, as named in errors (Envoy's flag name).
const CONFIG_YAML_FLAG: &str = "--config-yaml";

static DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

/// The decoded pool, plus the decode error if the embedded bytes were bad. The bytes come from our
/// own build script, which already validated them with the same prost-reflect, so the error is
/// unreachable in practice; it is kept rather than panicking and surfaces on the first lookup.
static POOL: OnceLock<(DescriptorPool, Option<String>)> = OnceLock::new();

fn pool_state() -> &'static (DescriptorPool, Option<String>) {
    POOL.get_or_init(|| match DescriptorPool::decode(DESCRIPTOR_SET) {
        Ok(pool) => (pool, None),
        Err(err) => (DescriptorPool::new(), Some(err.to_string())),
    })
}

/// Every Envoy API message (all of data-plane-api), their imports, `google.rpc.Status` and our own
/// protos. Decoded once on first use.
pub fn pool() -> &'static DescriptorPool {
    &pool_state().0
}

/// The encoded `FileDescriptorSet` behind [`pool`], as served by gRPC reflection.
pub fn descriptor_set_bytes() -> &'static [u8] {
    DESCRIPTOR_SET
}

/// Looks up a message type, explaining an empty pool if that is why it is missing.
pub fn message_descriptor(full_name: &str) -> Result<MessageDescriptor, ConvertError> {
    let (pool, decode_error) = pool_state();
    pool.get_message_by_name(full_name)
        .ok_or_else(|| ConvertError::UnknownMessage { name: full_name.to_owned(), pool_error: decode_error.clone() })
}

/// Text format of a config source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    /// Envoy's rule: `.json` is JSON, `.yaml`/`.yml` is YAML; anything else is read as YAML, which
    /// accepts JSON too.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|ext| ext.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Yaml,
        }
    }
}

/// Config text that does not fit the message schema (or is not valid JSON/YAML at all).
///
/// `path` names the offending field as written by the user (`listeners[0].address.port_vlue`,
/// map keys as `["key"]`); it is empty when the parser's own line/column is the only location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    path: String,
    message: String,
}

impl ParseError {
    fn new(path: String, message: impl fmt::Display) -> Self {
        // One-line messages: they end up in NACK error_detail and single log lines.
        let message = message.to_string().replace('\n', " ");
        ParseError { path, message }
    }

    /// Field path of the failure, empty when only the parser's line/column locates it.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What is wrong at [`path`](Self::path).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

/// Failures moving an already valid message between representations. None of these is the
/// user's fault except [`ConvertError::Json`] for an Any whose type is not in the pool.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("internal: message type {name} is not in the embedded Envoy descriptors{}",
        pool_error.as_ref().map(|e| format!(" (descriptor set failed to decode: {e})")).unwrap_or_default())]
    UnknownMessage { name: String, pool_error: Option<String> },
    #[error("internal: {name} does not round-trip between envoy-types and its descriptor: {source}")]
    Decode { name: String, source: prost::DecodeError },
    #[error("{name} cannot be written as JSON: {source}")]
    Json { name: String, source: serde_json::Error },
}

/// Why a bootstrap could not be loaded; the Display is one line naming the source at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("at least one of --config-path or --config-yaml must be set")]
    NoConfig,
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// `origin` is the file path or `--config-yaml`.
    #[error("{origin}: {source}")]
    Parse { origin: String, source: ParseError },
    #[error("{origin}: {source}")]
    Convert { origin: String, source: ConvertError },
}

/// Parses Envoy config text into a message of type `message_full_name`.
///
/// Unknown fields, unknown `@type`s and unknown enum names are errors, as in Envoy.
pub fn parse_dynamic(text: &str, format: Format, message_full_name: &str) -> Result<DynamicMessage, ParseError> {
    let desc = message_descriptor(message_full_name).map_err(|err| ParseError::new(String::new(), err))?;
    // Through a `serde_json::Value` so that the same tree can be consulted afterwards to describe
    // an error (the `@type` of the Any an error is in, the offending value).
    let mut tree: Json = match format {
        Format::Json => serde_json::from_str(text).map_err(|e| ParseError::new(String::new(), e))?,
        Format::Yaml => serde_yaml_ng::from_str(text).map_err(|e| ParseError::new(String::new(), e))?,
    };
    hoist_type_keys(&mut tree);

    let mut track = serde_path_to_error::Track::new();
    let result = {
        let deserializer = serde_path_to_error::Deserializer::new(&tree, &mut track);
        desc.clone().deserialize(deserializer)
    };
    result.map_err(|err| describe_error(&desc, &tree, track.path(), &err.to_string()))
}

/// prost-reflect buffers every key an Any has before `@type` in a side map and deserializes the
/// buffer without path tracking, so an error there would only be located at the Any itself.
/// Putting `@type` first in every object makes it stream the whole Any through the tracked
/// deserializer. (`serde_json`'s default sorted map already orders `@` before letters; the explicit
/// move keeps that true if some dependency turns on `preserve_order`.)
fn hoist_type_keys(value: &mut Json) {
    match value {
        Json::Object(map) => {
            if let Some(type_url) = map.remove("@type") {
                let rest = std::mem::take(map);
                map.insert("@type".to_owned(), type_url);
                map.extend(rest);
            }
            map.values_mut().for_each(hoist_type_keys);
        }
        Json::Array(items) => items.iter_mut().for_each(hoist_type_keys),
        _ => {}
    }
}

/// Where the path walk is: what the next path segment indexes into.
enum Position {
    Message(MessageDescriptor),
    /// A map field: the next segment is a key, then values of this kind.
    MapOf(Kind),
    /// A repeated field: the next segment is an index, then elements of this kind.
    ListOf(Kind),
    /// Free-form JSON (google.protobuf.Struct/Value/ListValue): keys are map keys.
    Json,
    /// Nothing known (a scalar, or a path the schema does not explain).
    Opaque,
}

fn position_of(kind: &Kind) -> Position {
    match kind {
        Kind::Message(desc) => match desc.full_name() {
            "google.protobuf.Struct" | "google.protobuf.Value" | "google.protobuf.ListValue" => Position::Json,
            _ => Position::Message(desc.clone()),
        },
        _ => Position::Opaque,
    }
}

fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => "int32".into(),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => "int64".into(),
        Kind::Uint32 | Kind::Fixed32 => "uint32".into(),
        Kind::Uint64 | Kind::Fixed64 => "uint64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes (base64)".into(),
        Kind::Message(desc) => desc.full_name().to_owned(),
        Kind::Enum(desc) => format!("enum {}", desc.full_name()),
    }
}

/// A path segment in our own terms, so a key can be appended to serde_path_to_error's path.
enum Step {
    Key(String),
    Index(usize),
    Unknown,
}

/// Renders the user-facing path and a one-line message for a deserialization failure.
fn describe_error(root: &MessageDescriptor, tree: &Json, path: serde_path_to_error::Path, message: &str) -> ParseError {
    let mut steps: Vec<Step> = path
        .iter()
        .map(|segment| match segment {
            Segment::Seq { index } => Step::Index(*index),
            Segment::Map { key } | Segment::Enum { variant: key } => Step::Key(key.clone()),
            Segment::Unknown => Step::Unknown,
        })
        .collect();

    // prost-reflect reports an unknown key after reading it but before reading its value, so the
    // tracked path stops at the enclosing message; the key only survives in the message text.
    let unknown_key = message.strip_prefix("unrecognized field name '").and_then(|rest| rest.strip_suffix('\''));
    if let Some(key) = unknown_key {
        steps.push(Step::Key(key.to_owned()));
        let (rendered, _, _) = render_path(root, tree, &steps);
        return ParseError::new(rendered, "unknown field");
    }

    let (rendered, value, kind) = render_path(root, tree, &steps);
    if message.starts_with("message '") && message.ends_with("' not found") {
        let type_url = value.and_then(|v| v.get("@type")).and_then(Json::as_str).unwrap_or_default();
        return ParseError::new(rendered, format!("unknown type {type_url}"));
    }
    // prost-reflect's scalar visitors report bare parse errors ("invalid digit found in string");
    // add the value and the expected type so the operator sees what was wrong with what.
    let is_scalar = matches!(value, Some(Json::String(_) | Json::Number(_) | Json::Bool(_)));
    let already_described = message.starts_with("invalid type") || message.starts_with("invalid value");
    match (value, kind) {
        (Some(value), Some(Kind::Enum(desc))) if is_scalar => {
            let names: Vec<String> = desc.values().map(|v| v.name().to_owned()).take(12).collect();
            ParseError::new(rendered, format!("unknown enum value {value}, expected one of {}", names.join(", ")))
        }
        (Some(value), Some(kind)) if is_scalar && !already_described => {
            ParseError::new(rendered, format!("invalid value {value}, expected {}: {message}", kind_name(&kind)))
        }
        _ => ParseError::new(rendered, message),
    }
}

/// Walks `steps` through the schema and the parsed tree together. Returns the rendered path, the
/// JSON value at the end of it, and the proto kind expected there (when known).
fn render_path<'t>(
    root: &MessageDescriptor,
    tree: &'t Json,
    steps: &[Step],
) -> (String, Option<&'t Json>, Option<Kind>) {
    let mut out = String::new();
    let mut position = Position::Message(root.clone());
    let mut cursor = Some(tree);
    let mut kind = None;
    for step in steps {
        match step {
            Step::Index(index) => {
                out.push_str(&format!("[{index}]"));
                cursor = cursor.and_then(|v| v.get(index));
                position = match position {
                    Position::ListOf(element) => {
                        let next = position_of(&element);
                        kind = Some(element);
                        next
                    }
                    Position::Json => Position::Json,
                    _ => Position::Opaque,
                };
            }
            Step::Key(key) => {
                step_into_key(&mut out, &mut position, &mut kind, cursor, key);
                cursor = cursor.and_then(|v| v.get(key));
            }
            Step::Unknown => {
                out.push_str(if out.is_empty() { "?" } else { ".?" });
                cursor = None;
                position = Position::Opaque;
            }
        }
    }
    (out, cursor, kind)
}

/// Appends one object key to the rendered path and moves `position` into it. `cursor` is the JSON
/// object holding the key (needed to find the `@type` of an Any).
fn step_into_key(out: &mut String, position: &mut Position, kind: &mut Option<Kind>, cursor: Option<&Json>, key: &str) {
    let dotted = |out: &mut String| {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(key);
    };
    let bracketed = |out: &mut String| out.push_str(&format!("[\"{key}\"]"));

    // An Any's fields are those of the message its `@type` names.
    let in_any = matches!(&*position, Position::Message(desc) if desc.full_name() == ANY);
    if in_any && key != "@type" {
        let inner = cursor
            .and_then(|v| v.get("@type"))
            .and_then(Json::as_str)
            .and_then(|url| url.rsplit_once('/'))
            .and_then(|(_, name)| pool().get_message_by_name(name));
        *position = match inner {
            Some(inner) => Position::Message(inner),
            None => Position::Opaque,
        };
    }

    match std::mem::replace(position, Position::Opaque) {
        Position::Message(desc) => {
            dotted(out);
            let field = desc.get_field_by_json_name(key).or_else(|| desc.get_field_by_name(key));
            if let Some(field) = field {
                let field_kind = field.kind();
                *position = if field.is_map() {
                    match &field_kind {
                        Kind::Message(entry) => Position::MapOf(entry.map_entry_value_field().kind()),
                        _ => Position::Opaque,
                    }
                } else if field.is_list() {
                    Position::ListOf(field_kind.clone())
                } else {
                    position_of(&field_kind)
                };
                *kind = Some(field_kind);
            } else {
                *kind = None;
            }
        }
        Position::MapOf(value_kind) => {
            bracketed(out);
            *position = position_of(&value_kind);
            *kind = Some(value_kind);
        }
        Position::Json => {
            bracketed(out);
            *position = Position::Json;
            *kind = None;
        }
        Position::ListOf(_) | Position::Opaque => {
            dotted(out);
            *kind = None;
        }
    }
}

/// Re-encodes a parsed message as the matching envoy-types struct.
pub fn decode<T: Message + Default>(msg: &DynamicMessage) -> Result<T, ConvertError> {
    msg.transcode_to::<T>()
        .map_err(|source| ConvertError::Decode { name: msg.descriptor().full_name().to_owned(), source })
}

/// The reflective view of an envoy-types struct; `full_name` is its proto type name.
pub fn to_dynamic<T: Message>(msg: &T, full_name: &str) -> Result<DynamicMessage, ConvertError> {
    let mut dynamic = DynamicMessage::new(message_descriptor(full_name)?);
    dynamic.transcode_from(msg).map_err(|source| ConvertError::Decode { name: full_name.to_owned(), source })?;
    Ok(dynamic)
}

/// Envoy's config_dump JSON: lowerCamelCase names, `@type` Anys, default-valued fields omitted,
/// 64-bit integers as strings.
pub fn to_json_value<T: Message>(msg: &T, full_name: &str) -> Result<Json, ConvertError> {
    let dynamic = to_dynamic(msg, full_name)?;
    let options = SerializeOptions::new().use_proto_field_name(false).skip_default_fields(true);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|source| ConvertError::Json { name: full_name.to_owned(), source })
}

/// Loads the bootstrap as Envoy does: the file at `path` (format by extension), then the
/// `--config-yaml` text merged over it with protobuf MergeFrom semantics (scalars replaced,
/// messages merged, repeated fields appended).
pub fn load_bootstrap(path: Option<&Path>, yaml_overlay: Option<&str>) -> Result<Bootstrap, LoadError> {
    let base = match path {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
            let parsed = parse_dynamic(&text, Format::from_path(path), BOOTSTRAP)
                .map_err(|source| LoadError::Parse { origin: path.display().to_string(), source })?;
            Some((path.display().to_string(), parsed))
        }
        None => None,
    };
    let overlay = match yaml_overlay {
        Some(text) => Some(
            parse_dynamic(text, Format::Yaml, BOOTSTRAP)
                .map_err(|source| LoadError::Parse { origin: CONFIG_YAML_FLAG.to_owned(), source })?,
        ),
        None => None,
    };

    let (origin, merged) = match (base, overlay) {
        (None, None) => return Err(LoadError::NoConfig),
        (Some((origin, base)), None) => (origin, base),
        (None, Some(overlay)) => (CONFIG_YAML_FLAG.to_owned(), overlay),
        (Some((_, mut base)), Some(overlay)) => {
            // Merging the encoded overlay is exactly protobuf's MergeFrom, oneofs included.
            base.merge(overlay.encode_to_vec().as_slice()).map_err(|source| LoadError::Convert {
                origin: CONFIG_YAML_FLAG.to_owned(),
                source: ConvertError::Decode { name: BOOTSTRAP.to_owned(), source },
            })?;
            (CONFIG_YAML_FLAG.to_owned(), base)
        }
    };
    decode(&merged).map_err(|source| LoadError::Convert { origin, source })
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
    use envoy_types::pb::envoy::config::core::v3::address;
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
    use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::core::v3::{Address, api_config_source::ApiType};
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;

    pub(crate) const BOOTSTRAP_YAML: &str = r#"
node:
  id: node-1
  cluster: test-cluster
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: 9901 }
static_resources:
  listeners:
  - name: listener_0
    address:
      socket_address: { address: 127.0.0.1, port_value: 10000 }
    socket_options:
    - level: 1
      name: 15
      int_value: "1"
    - level: 6
      name: 1
      int_value: 1
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: service
          idle_timeout: 0.5s
  clusters:
  - name: service
    type: STATIC
    connect_timeout: 1s
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: service
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: 8080 }
  - name: xds_cluster
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}
    load_assignment:
      cluster_name: xds_cluster
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: 18000 }
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services:
    - envoy_grpc:
        cluster_name: xds_cluster
  lds_config:
    ads: {}
    resource_api_version: V3
  cds_config:
    ads: {}
    resource_api_version: V3
"#;

    fn bootstrap(text: &str, format: Format) -> Result<Bootstrap, ParseError> {
        let msg = parse_dynamic(text, format, BOOTSTRAP)?;
        Ok(decode(&msg).expect("decodes"))
    }

    fn parse_err(text: &str) -> String {
        parse_dynamic(text, Format::Yaml, BOOTSTRAP).expect_err("must fail").to_string()
    }

    fn port(address: &Option<Address>) -> Option<u32> {
        match address.as_ref()?.address.as_ref()? {
            address::Address::SocketAddress(sa) => match sa.port_specifier {
                Some(PortSpecifier::PortValue(port)) => Some(port),
                _ => None,
            },
            _ => None,
        }
    }

    /// Renames every snake_case key to lowerCamelCase, as protobuf's JSON printer would.
    fn camel_case_keys(value: &mut Json) {
        match value {
            Json::Object(map) => {
                let old = std::mem::take(map);
                for (key, mut value) in old {
                    camel_case_keys(&mut value);
                    let mut camel = String::new();
                    let mut upper = false;
                    for c in key.chars() {
                        if c == '_' {
                            upper = true;
                        } else if upper {
                            camel.push(c.to_ascii_uppercase());
                            upper = false;
                        } else {
                            camel.push(c);
                        }
                    }
                    map.insert(camel, value);
                }
            }
            Json::Array(items) => items.iter_mut().for_each(camel_case_keys),
            _ => {}
        }
    }

    #[test]
    fn embedded_pool_decodes_and_resolves_envoy_types() {
        assert!(pool_state().1.is_none(), "{:?}", pool_state().1);
        for name in [
            BOOTSTRAP,
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            // Needed build.rs's re-resolution fallback to compile.
            "envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            "google.rpc.Status",
        ] {
            let found = pool().get_message_by_name(name).is_some() || pool().get_service_by_name(name).is_some();
            assert!(found, "{name} missing from the pool");
        }
        assert!(!descriptor_set_bytes().is_empty());
    }

    #[test]
    fn parses_realistic_bootstrap() {
        let b = bootstrap(BOOTSTRAP_YAML, Format::Yaml).expect("parses");
        assert_eq!(b.node.as_ref().map(|n| n.id.as_str()), Some("node-1"));
        assert_eq!(port(&b.admin.as_ref().expect("admin").address), Some(9901));

        let statics = b.static_resources.as_ref().expect("static_resources");
        let listener = &statics.listeners[0];
        assert_eq!(port(&listener.address), Some(10000));
        // 64-bit integers as string or number.
        let ints: Vec<_> = listener.socket_options.iter().map(|o| o.value.clone()).collect();
        assert_eq!(ints.len(), 2);
        let filter = &listener.filter_chains[0].filters[0];
        let any = match &filter.config_type {
            Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any)) => any,
            other => panic!("unexpected {other:?}"),
        };
        assert!(any.type_url.ends_with("tcp_proxy.v3.TcpProxy"));
        let tcp = TcpProxy::decode(any.value.as_slice()).expect("tcp proxy");
        assert_eq!(tcp.stat_prefix, "tcp");
        let idle = tcp.idle_timeout.expect("idle_timeout");
        assert_eq!((idle.seconds, idle.nanos), (0, 500_000_000));

        let cluster = &statics.clusters[0];
        assert_eq!(cluster.cluster_discovery_type, Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)));
        assert_eq!(cluster.connect_timeout.as_ref().map(|d| d.seconds), Some(1));

        let dynamic = b.dynamic_resources.as_ref().expect("dynamic_resources");
        let ads = dynamic.ads_config.as_ref().expect("ads_config");
        assert_eq!(ads.api_type, ApiType::Grpc as i32);
        match &ads.grpc_services[0].target_specifier {
            Some(TargetSpecifier::EnvoyGrpc(g)) => assert_eq!(g.cluster_name, "xds_cluster"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            dynamic.lds_config.as_ref().and_then(|c| c.config_source_specifier.as_ref()),
            Some(ConfigSourceSpecifier::Ads(_))
        ));
    }

    #[test]
    fn camel_case_and_json_parse_to_the_same_bootstrap() {
        let snake = bootstrap(BOOTSTRAP_YAML, Format::Yaml).expect("snake_case");
        let mut tree: Json = serde_yaml_ng::from_str(BOOTSTRAP_YAML).expect("yaml");
        let json = serde_json::to_string_pretty(&tree).expect("json");
        assert_eq!(bootstrap(&json, Format::Json).expect("json parses"), snake);

        camel_case_keys(&mut tree);
        let camel_yaml = serde_yaml_ng::to_string(&tree).expect("yaml");
        assert!(camel_yaml.contains("portValue"));
        assert_eq!(bootstrap(&camel_yaml, Format::Yaml).expect("camelCase"), snake);
    }

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(Format::from_path(Path::new("/a/b.json")), Format::Json);
        assert_eq!(Format::from_path(Path::new("b.yaml")), Format::Yaml);
        assert_eq!(Format::from_path(Path::new("b.yml")), Format::Yaml);
        assert_eq!(Format::from_path(Path::new("bootstrap")), Format::Yaml);
    }

    #[test]
    fn unknown_field_at_depth_names_the_key() {
        let text = BOOTSTRAP_YAML.replace("port_value: 10000", "port_vlue: 10000");
        assert_eq!(parse_err(&text), "static_resources.listeners[0].address.socket_address.port_vlue: unknown field");
    }

    #[test]
    fn unknown_field_inside_typed_config_names_the_key() {
        let text = BOOTSTRAP_YAML.replace("stat_prefix: tcp", "stat_prefx: tcp");
        assert_eq!(
            parse_err(&text),
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.stat_prefx: \
             unknown field"
        );
    }

    #[test]
    fn typed_config_errors_keep_their_path_when_type_comes_last() {
        let text = r#"{"name": "x", "typed_config": {"cluster": 7,
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"}}"#;
        let err =
            parse_dynamic(text, Format::Json, "envoy.config.listener.v3.Filter").expect_err("cluster is a string");
        assert_eq!(err.path(), "typed_config.cluster");
        assert_eq!(err.to_string(), "typed_config.cluster: invalid type: integer `7`, expected a string");
    }

    #[test]
    fn wrong_type_names_value_and_expected_type() {
        let text = BOOTSTRAP_YAML.replace("port_value: 10000", "port_value: abc");
        assert_eq!(
            parse_err(&text),
            "static_resources.listeners[0].address.socket_address.port_value: invalid value \
             \"abc\", expected uint32: invalid digit found in string"
        );
        let text = BOOTSTRAP_YAML.replace("connect_timeout: 1s", "connect_timeout: 1 minute");
        let err = parse_err(&text);
        assert!(
            err.starts_with(
                "static_resources.clusters[0].connect_timeout: invalid value \"1 minute\", \
                 expected google.protobuf.Duration: "
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_enum_value_lists_the_names() {
        let text = BOOTSTRAP_YAML.replace("type: STATIC", "type: STATIK");
        let err = parse_err(&text);
        assert!(
            err.starts_with(
                "static_resources.clusters[0].type: unknown enum value \"STATIK\", expected one \
                 of STATIC, STRICT_DNS"
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_type_url_is_reported_at_the_any() {
        let text = BOOTSTRAP_YAML.replace(
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "envoy.extensions.filters.network.nope.v3.Nope",
        );
        assert_eq!(
            parse_err(&text),
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config: unknown \
             type type.googleapis.com/envoy.extensions.filters.network.nope.v3.Nope"
        );
    }

    #[test]
    fn map_keys_are_bracketed_in_paths() {
        let text = r#"
filter_metadata:
  envoy.lb: { canary: true }
typed_filter_metadata:
  my.filter:
    "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
    bogus: 1
"#;
        let err = parse_dynamic(text, Format::Yaml, "envoy.config.core.v3.Metadata").expect_err("bogus field");
        assert_eq!(err.to_string(), "typed_filter_metadata[\"my.filter\"].bogus: unknown field");
    }

    #[test]
    fn syntax_errors_keep_the_parser_location_on_one_line() {
        let err = parse_err("node: {id: [\n");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("line"), "{err}");
        let err = parse_dynamic("{\"node\": ", Format::Json, BOOTSTRAP).expect_err("eof");
        assert_eq!(err.path(), "");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn unknown_root_message_is_an_internal_error() {
        let err = parse_dynamic("{}", Format::Json, "envoy.Nope").expect_err("no such type");
        assert_eq!(err.to_string(), "internal: message type envoy.Nope is not in the embedded Envoy descriptors");
    }

    #[test]
    fn to_json_value_uses_envoy_config_dump_style() {
        let b = bootstrap(BOOTSTRAP_YAML, Format::Yaml).expect("parses");
        let json = to_json_value(&b, BOOTSTRAP).expect("serializes");
        let listener = &json["staticResources"]["listeners"][0];
        assert_eq!(listener["address"]["socketAddress"]["portValue"], 10000);
        let typed = &listener["filterChains"][0]["filters"][0]["typedConfig"];
        assert_eq!(typed["@type"], "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy");
        assert_eq!(typed["idleTimeout"], "0.500s");
        // int64 as a string, as protobuf's JSON mapping requires.
        assert_eq!(listener["socketOptions"][0]["intValue"], "1");
        // Default-valued fields are left out.
        assert!(listener.get("bindToPort").is_none());
        // And it reads back to the same message.
        let text = serde_json::to_string(&json).expect("text");
        assert_eq!(bootstrap(&text, Format::Json).expect("round trip"), b);
    }

    fn write_temp(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn overlay_merges_with_merge_from_semantics() {
        let (_dir, path) = write_temp("bootstrap.yaml", BOOTSTRAP_YAML);
        let overlay = r#"
node: { id: node-2 }
static_resources:
  clusters:
  - name: extra
    type: STATIC
    connect_timeout: 2s
"#;
        let b = load_bootstrap(Some(&path), Some(overlay)).expect("loads");
        let node = b.node.as_ref().expect("node");
        // Scalar replaced, sibling scalar kept (messages merge recursively).
        assert_eq!(node.id, "node-2");
        assert_eq!(node.cluster, "test-cluster");
        // Repeated field appended.
        let names: Vec<_> =
            b.static_resources.as_ref().expect("static_resources").clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["service", "xds_cluster", "extra"]);
    }

    #[test]
    fn load_bootstrap_reads_json_files_and_overlay_alone() {
        let tree: Json = serde_yaml_ng::from_str(BOOTSTRAP_YAML).expect("yaml");
        let (_dir, path) = write_temp("bootstrap.json", &tree.to_string());
        let from_json = load_bootstrap(Some(&path), None).expect("json file");
        let from_flag = load_bootstrap(None, Some(BOOTSTRAP_YAML)).expect("flag only");
        assert_eq!(from_json, from_flag);
    }

    #[test]
    fn load_errors_name_their_source() {
        assert_eq!(
            load_bootstrap(None, None).expect_err("nothing").to_string(),
            "at least one of --config-path or --config-yaml must be set"
        );

        let missing = Path::new("/nonexistent/bootstrap.yaml");
        assert_eq!(
            load_bootstrap(Some(missing), None).expect_err("missing").to_string(),
            "/nonexistent/bootstrap.yaml: No such file or directory (os error 2)"
        );

        let text = BOOTSTRAP_YAML.replace("port_value: 9901", "port_vlue: 9901");
        let (_dir, path) = write_temp("bad.yaml", &text);
        assert_eq!(
            load_bootstrap(Some(&path), None).expect_err("bad file").to_string(),
            format!("{}: admin.address.socket_address.port_vlue: unknown field", path.display())
        );

        assert_eq!(
            load_bootstrap(None, Some("admin: {address: {pipe: {path: 7}}}")).expect_err("bad overlay").to_string(),
            "--config-yaml: admin.address.pipe.path: invalid type: integer `7`, expected a string"
        );
    }

    /// Finds the shared Istio fixture next to the workspace (CI lays shared/ beside the clone).
    fn istio_fixture() -> String {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let candidates = [
            manifest.join("../shared/fixtures/istio-1.14-sidecar-config-dump.yaml"),
            manifest.join("tests/fixtures/istio-1.14-sidecar-config-dump.yaml"),
        ];
        candidates
            .iter()
            .find_map(|path| std::fs::read_to_string(path).ok())
            .unwrap_or_else(|| panic!("Istio fixture not found in {candidates:?}"))
    }

    /// The listener and cluster Anys of a ConfigDump: static, and dynamic in every state.
    fn istio_resources(dump: &Json) -> Vec<(String, Json)> {
        let mut found = Vec::new();
        let configs = dump["configs"].as_array().expect("configs");
        for config in configs {
            for section in
                ["static_listeners", "static_clusters", "dynamic_active_clusters", "dynamic_warming_clusters"]
            {
                for (i, entry) in config[section].as_array().into_iter().flatten().enumerate() {
                    let any = entry.get("listener").or_else(|| entry.get("cluster"));
                    if let Some(any) = any {
                        found.push((format!("{section}[{i}]"), any.clone()));
                    }
                }
            }
            for (i, entry) in config["dynamic_listeners"].as_array().into_iter().flatten().enumerate() {
                for state in ["active_state", "warming_state", "draining_state"] {
                    if let Some(any) = entry.get(state).and_then(|s| s.get("listener")) {
                        found.push((format!("dynamic_listeners[{i}].{state}"), any.clone()));
                    }
                }
            }
        }
        found
    }

    /// Replaces every Any whose type is not in the pool by an empty one, collecting the type URLs,
    /// so the rest of each resource is still checked.
    fn stub_unknown_anys(value: &mut Json, unknown: &mut std::collections::BTreeSet<String>) {
        match value {
            Json::Object(map) => {
                let type_url = map.get("@type").and_then(Json::as_str).map(str::to_owned);
                if let Some(url) = type_url {
                    let name = url.rsplit_once('/').map_or(url.as_str(), |(_, name)| name);
                    if pool().get_message_by_name(name).is_none() {
                        unknown.insert(url.clone());
                        *value = serde_json::json!({
                            "@type": "type.googleapis.com/google.protobuf.Empty", "value": {}
                        });
                        return;
                    }
                }
                map.values_mut().for_each(|v| stub_unknown_anys(v, unknown));
            }
            Json::Array(items) => items.iter_mut().for_each(|v| stub_unknown_anys(v, unknown)),
            _ => {}
        }
    }

    #[test]
    fn istio_sidecar_listeners_and_clusters_parse() {
        let mut dump: Json = serde_yaml_ng::from_str(&istio_fixture()).expect("fixture is YAML");
        let mut unknown = std::collections::BTreeSet::new();
        stub_unknown_anys(&mut dump, &mut unknown);
        // Istio's own types (TypedStruct, MetadataExchange, the alpn filter) come from our proto/ folder.
        assert!(unknown.is_empty(), "types missing from the pool: {unknown:?}");

        let resources = istio_resources(&dump);
        let is_listener =
            |r: &Json| r["@type"].as_str() == Some("type.googleapis.com/envoy.config.listener.v3.Listener");
        let listeners = resources.iter().filter(|(_, r)| is_listener(r)).count();
        assert_eq!((listeners, resources.len() - listeners), (37, 55));

        let failures: Vec<String> = resources
            .iter()
            .filter_map(|(at, resource)| {
                let text = serde_json::to_string(resource).expect("json");
                let parsed = parse_dynamic(&text, Format::Json, ANY).err()?;
                Some(format!("{at}: {parsed}"))
            })
            .collect();
        assert!(failures.is_empty(), "{failures:#?}");

        // The whole dump too: bootstrap, routes, endpoints and secrets included.
        let text = serde_json::to_string(&dump).expect("json");
        parse_dynamic(&text, Format::Json, "envoy.admin.v3.ConfigDump").expect("config dump");
    }
}
