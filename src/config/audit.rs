//! Rejects every field that is set in an Envoy message but that the proxy does not honour, so that
//! no part of a config is silently ignored. Driven by one policy table over prost-reflect, instead
//! of each conversion checking fields by hand; conversions then only judge the values they read.

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use prost_reflect::{DynamicMessage, MapKey, ReflectMessage, Value};

use super::proto;

/// A set field, or a message type, that the proxy does not honour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// Relative to the audited message: `filter_chains[0].transport_socket`,
    /// `metadata.filter_metadata["key"]`; empty for the audited message itself.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.reason) } else { write!(f, "{}: {}", self.path, self.reason) }
    }
}

/// What the proxy honours of one message type (or, in [`Policy::Fields`], of one field's contents).
#[derive(Debug, Clone, Copy)]
pub enum Policy {
    /// Every field, to any depth: the consumer reads the message as a whole.
    All,
    /// Only these fields (proto names); each set one is audited by its own type's policy.
    Only(&'static [&'static str]),
    /// Only these fields, each with the policy for its contents, overriding its type's policy.
    Fields(&'static [(&'static str, Policy)]),
    /// Audited elsewhere (e.g. listeners and clusters by their own conversion, so static and xDS
    /// resources pass the same check); not descended into.
    Skip,
}

/// The codec options honoured inside an upstream `HttpProtocolOptions` (explicit, downstream-following or auto).
const UPSTREAM_CODECS: &[(&str, Policy)] = &[
    ("http_protocol_options", Policy::Only(&[])),
    ("http2_protocol_options", Policy::Only(&["max_concurrent_streams"])),
];

/// The single table of what is honoured, by proto type name. A message type reached through a
/// set field and missing here is rejected, so a new Envoy field or type can never be ignored
/// silently. Field names are proto (snake_case) names.
const POLICIES: &[(&str, Policy)] = {
    use Policy::{All, Fields, Only, Skip};
    &[
        // Well-known types: plain values, read whole.
        ("google.protobuf.Duration", All),
        ("google.protobuf.Timestamp", All),
        ("google.protobuf.BoolValue", All),
        ("google.protobuf.UInt32Value", All),
        ("google.protobuf.UInt64Value", All),
        ("google.protobuf.Int32Value", All),
        ("google.protobuf.Int64Value", All),
        ("google.protobuf.DoubleValue", All),
        ("google.protobuf.FloatValue", All),
        ("google.protobuf.StringValue", All),
        ("google.protobuf.BytesValue", All),
        ("google.protobuf.Struct", All),
        ("google.protobuf.Value", All),
        ("google.protobuf.ListValue", All),
        ("google.protobuf.Empty", All),
        // Bootstrap.
        (
            "envoy.config.bootstrap.v3.Bootstrap",
            Only(&["node", "admin", "static_resources", "dynamic_resources", "enable_worker_cpu_affinity"]),
        ),
        (
            "envoy.config.bootstrap.v3.Bootstrap.StaticResources",
            Fields(&[("listeners", Skip), ("clusters", Skip), ("secrets", Skip)]),
        ),
        ("envoy.config.bootstrap.v3.Bootstrap.DynamicResources", Only(&["lds_config", "cds_config", "ads_config"])),
        // Read whole by the xDS client, which judges the values.
        ("envoy.config.core.v3.ConfigSource", All),
        ("envoy.config.core.v3.ApiConfigSource", All),
        ("envoy.config.core.v3.Node", All),
        // access_log_path is accepted and ignored on purpose: the admin log is not an API surface.
        ("envoy.config.bootstrap.v3.Admin", Only(&["address", "access_log_path", "profile_path"])),
        // Addresses.
        // pipe: only as the endpoint of a gRPC config source's cluster; listeners and the admin refuse it.
        ("envoy.config.core.v3.Address", Only(&["socket_address", "pipe"])),
        ("envoy.config.core.v3.Pipe", Only(&["path", "mode"])),
        // protocol: the conversion accepts TCP only.
        ("envoy.config.core.v3.SocketAddress", Only(&["protocol", "address", "port_value", "ipv4_compat"])),
        // Listeners. Of the connection balancers only the CPU-locality one (exact balancing takes a lock per accept
        // across workers, which this design has no place for).
        ("envoy.config.listener.v3.Listener.ConnectionBalanceConfig", Only(&["cpu_locality_balance"])),
        ("envoy.config.listener.v3.Listener.ConnectionBalanceConfig.CpuLocalityBalance", All),
        (
            "envoy.config.listener.v3.Listener",
            Only(&[
                "name",
                "address",
                "filter_chains",
                "default_filter_chain",
                "use_original_dst",
                "bind_to_port",
                "enable_reuse_port",
                "connection_balance_config",
                "tcp_backlog_size",
                "freebind",
                "transparent",
                "socket_options",
                "per_connection_buffer_limit_bytes",
                "drain_type",
                "stat_prefix",
                "metadata",
                "listener_filters_timeout",
                "continue_on_listener_filters_timeout",
                "traffic_direction",
                "ignore_global_conn_limit",
                "listener_filters",
                "access_log",
            ]),
        ),
        // Listener filters; the conversion judges values (e.g. JA3 fingerprinting is refused when true).
        ("envoy.config.listener.v3.ListenerFilter", Only(&["name", "typed_config", "filter_disabled"])),
        ("envoy.config.listener.v3.ListenerFilterChainMatchPredicate", All),
        ("envoy.extensions.filters.listener.original_dst.v3.OriginalDst", All),
        ("envoy.extensions.filters.listener.http_inspector.v3.HttpInspector", All),
        (
            "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
            Only(&[
                "enable_ja3_fingerprinting",
                "enable_ja4_fingerprinting",
                "initial_read_buffer_size",
                "max_client_hello_size",
                "close_connection_on_client_hello_parsing_errors",
            ]),
        ),
        (
            "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol",
            Only(&["allow_requests_without_proxy_protocol", "disallowed_versions", "stat_prefix"]),
        ),
        // Istio's telemetry filters: the filter-chain conversion decides whether one is skipped or refused.
        ("envoy.tcp.metadataexchange.config.MetadataExchange", All),
        ("stats.PluginConfig", All),
        ("udpa.type.v1.TypedStruct", All),
        ("xds.type.v3.TypedStruct", All),
        ("envoy.extensions.filters.network.wasm.v3.Wasm", All),
        (
            "envoy.config.listener.v3.FilterChain",
            Only(&["name", "filter_chain_match", "filters", "transport_socket", "metadata"]),
        ),
        // The filter chain index decides which match fields it supports.
        ("envoy.config.listener.v3.FilterChainMatch", All),
        ("envoy.config.listener.v3.Filter", Only(&["name", "typed_config"])),
        // The conversion checks that the socket is raw_buffer.
        ("envoy.config.core.v3.TransportSocket", Only(&["name", "typed_config"])),
        ("envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer", All),
        // TLS: what the rustls contexts honour.
        (
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            Only(&["common_tls_context", "require_client_certificate"]),
        ),
        (
            "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
            Only(&[
                "tls_params",
                "tls_certificates",
                "tls_certificate_sds_secret_configs",
                "alpn_protocols",
                "validation_context",
                "validation_context_sds_secret_config",
                "combined_validation_context",
            ]),
        ),
        // The conversion judges the config source (ads, or a static secret when absent).
        ("envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig", Only(&["name", "sds_config"])),
        (
            "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext",
            Only(&["default_validation_context", "validation_context_sds_secret_config"]),
        ),
        // Secrets: static ones (audited as they are parsed) and SDS resources.
        ("envoy.extensions.transport_sockets.tls.v3.Secret", Only(&["name", "tls_certificate", "validation_context"])),
        (
            "envoy.extensions.transport_sockets.tls.v3.TlsParameters",
            Only(&["tls_minimum_protocol_version", "tls_maximum_protocol_version", "cipher_suites", "ecdh_curves"]),
        ),
        ("envoy.extensions.transport_sockets.tls.v3.TlsCertificate", Only(&["certificate_chain", "private_key"])),
        ("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", Only(&["common_tls_context", "sni"])),
        (
            "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
            Only(&["trusted_ca", "match_typed_subject_alt_names", "match_subject_alt_names"]),
        ),
        ("envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher", Only(&["san_type", "matcher"])),
        ("envoy.type.matcher.v3.StringMatcher", All),
        ("envoy.config.core.v3.SocketOption", All),
        ("envoy.config.core.v3.Metadata", All),
        // Network filters.
        (
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            Only(&[
                "stat_prefix",
                "cluster",
                "weighted_clusters",
                "idle_timeout",
                "max_downstream_connection_duration",
                "max_connect_attempts",
                "access_log",
                "hash_policy",
            ]),
        ),
        // The conversion takes source_ip and refuses the rest.
        ("envoy.type.v3.HashPolicy", All),
        ("envoy.type.v3.Percent", All),
        ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster", Only(&["clusters"])),
        (
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight",
            Only(&["name", "weight"]),
        ),
        ("envoy.extensions.filters.network.direct_response.v3.Config", Only(&["response"])),
        // HTTP connection manager. tracing is accepted and not acted on: Istio always sends it and no span leaves
        // this proxy (there is no tracer), which changes nothing on the wire. request_id_extension: the UUID
        // extension is what we do anyway. normalize_path and path_with_escaped_slashes_action: see the conversion.
        (
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            Only(&[
                "codec_type",
                "stat_prefix",
                "rds",
                "route_config",
                "http_filters",
                "tracing",
                "common_http_protocol_options",
                "http_protocol_options",
                "http2_protocol_options",
                "server_name",
                "server_header_transformation",
                "max_request_headers_kb",
                "stream_idle_timeout",
                "request_timeout",
                "drain_timeout",
                "use_remote_address",
                "xff_num_trusted_hops",
                "skip_xff_append",
                "internal_address_config",
                "via",
                "generate_request_id",
                "preserve_external_request_id",
                "always_set_request_id_in_response",
                "upgrade_configs",
                "proxy_100_continue",
                "normalize_path",
                "merge_slashes",
                "path_with_escaped_slashes_action",
                "request_id_extension",
                // Only meaningful with client certificates, which need TLS (not supported yet): nothing to forward.
                "forward_client_cert_details",
                "set_current_client_cert_details",
                "access_log",
            ]),
        ),
        // Access logs: the conversion refuses filters and formatter extensions it does not run.
        ("envoy.config.accesslog.v3.AccessLog", Only(&["name", "typed_config", "filter"])),
        ("envoy.config.accesslog.v3.AccessLogFilter", All),
        ("envoy.extensions.access_loggers.file.v3.FileAccessLog", All),
        ("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", All),
        ("envoy.extensions.access_loggers.stream.v3.StderrAccessLog", All),
        // The conversion checks the filter list (router last; skippable filters before it).
        ("envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter", Skip),
        ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.Tracing", Skip),
        // unix_sockets is refused: a request from a unix socket peer has no IP, and we never treat it as internal.
        (
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.InternalAddressConfig",
            Only(&["cidr_ranges"]),
        ),
        ("envoy.config.core.v3.CidrRange", All),
        ("envoy.extensions.filters.network.http_connection_manager.v3.RequestIDExtension", Skip),
        ("envoy.extensions.filters.network.http_connection_manager.v3.Rds", All),
        ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.UpgradeConfig", All),
        (
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.SetCurrentClientCertDetails",
            All,
        ),
        // The HCM's; a cluster's are audited by their own field list under HttpProtocolOptions below.
        (
            "envoy.config.core.v3.HttpProtocolOptions",
            Only(&["idle_timeout", "max_requests_per_connection", "max_stream_duration", "max_connection_duration"]),
        ),
        // Downstream (the HCM's http_protocol_options); upstream clusters allow none of its fields (UPSTREAM_CODECS).
        ("envoy.config.core.v3.Http1ProtocolOptions", Only(&["accept_http_10", "default_host_for_http_10"])),
        ("envoy.config.core.v3.Http2ProtocolOptions", Only(&[])),
        // Route configurations: the route table refuses the values it reads and does not honour (a path rewrite
        // policy, an unknown retry_on token…); these lists keep the fields it never reads from being ignored.
        // typed_per_filter_config: the route table reads it (the fault filter's per-route config; others refused).
        (
            "envoy.config.route.v3.RouteConfiguration",
            Only(&[
                "name",
                "typed_per_filter_config",
                "virtual_hosts",
                "request_headers_to_add",
                "request_headers_to_remove",
                "response_headers_to_add",
                "response_headers_to_remove",
                "most_specific_header_mutations_wins",
                "validate_clusters",
                "max_direct_response_body_size_bytes",
                "ignore_port_in_host_matching",
                "metadata",
                "vhds",
                "vhost_header",
                "ignore_path_parameters_in_path_matching",
            ]),
        ),
        (
            "envoy.config.route.v3.VirtualHost",
            Only(&[
                "name",
                "cors",
                "typed_per_filter_config",
                "domains",
                "routes",
                "matcher",
                "require_tls",
                "request_headers_to_add",
                "request_headers_to_remove",
                "response_headers_to_add",
                "response_headers_to_remove",
                "retry_policy",
                "include_request_attempt_count",
                "request_mirror_policies",
                "metadata",
            ]),
        ),
        (
            "envoy.config.route.v3.Route",
            Only(&[
                "name",
                "typed_per_filter_config",
                "match",
                "route",
                "redirect",
                "direct_response",
                "filter_action",
                "non_forwarding_action",
                "metadata",
                "decorator",
                "request_headers_to_add",
                "request_headers_to_remove",
                "response_headers_to_add",
                "response_headers_to_remove",
            ]),
        ),
        ("envoy.config.route.v3.RouteMatch", All),
        // Per-route filter configs, read whole by the route table (fault::per_filter_configs).
        ("envoy.config.route.v3.FilterConfig", All),
        ("envoy.extensions.filters.http.fault.v3.HTTPFault", All),
        // CORS policies (a route's or virtual host's `cors`, or a per-filter config), read whole by cors.rs.
        ("envoy.config.route.v3.CorsPolicy", All),
        // Read whole by the route table, which refuses what it does not honour (regex_rewrite, cookie ttl, filter
        // state).
        ("envoy.config.route.v3.RouteAction.HashPolicy", All),
        ("envoy.extensions.filters.http.cors.v3.CorsPolicy", All),
        (
            "envoy.config.route.v3.RouteAction",
            Only(&[
                "cluster",
                "hash_policy",
                "cors",
                "cluster_header",
                "weighted_clusters",
                "cluster_specifier_plugin",
                "inline_cluster_specifier_plugin",
                "cluster_not_found_response_code",
                "metadata_match",
                "prefix_rewrite",
                "regex_rewrite",
                "path_rewrite_policy",
                "host_rewrite_literal",
                "auto_host_rewrite",
                "host_rewrite_header",
                "host_rewrite_path_regex",
                "append_x_forwarded_host",
                "timeout",
                "idle_timeout",
                "retry_policy",
                "retry_policy_typed_config",
                "max_grpc_timeout",
                "grpc_timeout_offset",
                "max_stream_duration",
                "request_mirror_policies",
            ]),
        ),
        ("envoy.config.route.v3.RouteAction.MaxStreamDuration", All),
        // Read whole by the route table, which refuses request_headers_mutations. trace_sampled has no effect: no
        // span leaves this proxy.
        ("envoy.config.route.v3.RouteAction.RequestMirrorPolicy", All),
        ("envoy.config.route.v3.RetryPolicy", All),
        ("envoy.config.route.v3.WeightedCluster", All),
        ("envoy.config.route.v3.RedirectAction", All),
        ("envoy.config.route.v3.DirectResponseAction", All),
        ("envoy.config.route.v3.Decorator", All),
        ("envoy.config.core.v3.HeaderValueOption", All),
        ("envoy.config.core.v3.DataSource", Only(&["filename", "inline_bytes", "inline_string"])),
        // Clusters and endpoints; the conversion may still reject values (e.g. a cluster type).
        (
            "envoy.config.cluster.v3.Cluster",
            Only(&[
                "name",
                "type",
                "connect_timeout",
                "lb_policy",
                "load_assignment",
                "eds_cluster_config",
                "dns_refresh_rate",
                "dns_jitter",
                "typed_dns_resolver_config",
                "respect_dns_ttl",
                "max_requests_per_connection",
                "dns_lookup_family",
                "circuit_breakers",
                "per_connection_buffer_limit_bytes",
                "metadata",
                "alt_stat_name",
                // HTTP protocol options: the ADS stream is HTTP/2 whatever they say, and tcp_proxy does not use them
                // (in Envoy either); the HTTP issue honours them for HTTP upstreams.
                "typed_extension_protocol_options",
                "transport_socket",
                "outlier_detection",
                "transport_socket_matches",
                "upstream_connection_options",
                "upstream_bind_config",
                "filters",
                // ORIGINAL_DST hosts are made per connection and never cached, so there is nothing to clean up.
                "cleanup_interval",
                "common_lb_config",
                "ring_hash_lb_config",
                "maglev_lb_config",
                "round_robin_lb_config",
                "least_request_lb_config",
            ]),
        ),
        // Every detector runs. `monitors` (extensions) is refused by the conversion; without active health
        // checking, successful_active_health_check_uneject_host has nothing to act on.
        ("envoy.config.cluster.v3.OutlierDetection", All),
        ("envoy.config.cluster.v3.Cluster.TransportSocketMatch", All),
        ("envoy.config.cluster.v3.UpstreamConnectionOptions", Only(&["tcp_keepalive"])),
        ("envoy.config.core.v3.TcpKeepalive", All),
        ("envoy.config.core.v3.BindConfig", Only(&["source_address"])),
        // An extension's contents are audited by their own type (its policy below, or refused).
        ("envoy.config.core.v3.TypedExtensionConfig", Only(&["name", "typed_config"])),
        // The cluster conversion refuses every field but udp_max_queries (names go to the system resolver).
        ("envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig", All),
        // The conversion skips Istio's telemetry filters and refuses any other.
        ("envoy.config.cluster.v3.Filter", Only(&["name", "typed_config"])),
        (
            "envoy.config.cluster.v3.Cluster.CommonLbConfig",
            Only(&["locality_weighted_lb_config", "healthy_panic_threshold"]),
        ),
        ("envoy.config.cluster.v3.Cluster.CommonLbConfig.LocalityWeightedLbConfig", All),
        ("envoy.config.cluster.v3.Cluster.RingHashLbConfig", All),
        ("envoy.config.cluster.v3.Cluster.MaglevLbConfig", All),
        ("envoy.config.cluster.v3.Cluster.RoundRobinLbConfig", All),
        ("envoy.config.cluster.v3.Cluster.LeastRequestLbConfig", All),
        ("envoy.config.cluster.v3.Cluster.EdsClusterConfig", All),
        // The upstream protocol choice and the pool's limits. Of the codecs' own options only HTTP/2's
        // max_concurrent_streams (Istio sends it; the conversion judges the value); the rest, upstream HTTP filters,
        // header validation and the response-code outlier matcher are refused.
        (
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            Fields(&[
                (
                    "common_http_protocol_options",
                    Only(&[
                        "idle_timeout",
                        "max_requests_per_connection",
                        "max_connection_duration",
                        "max_stream_duration",
                    ]),
                ),
                (
                    "upstream_http_protocol_options",
                    Only(&["auto_sni", "auto_san_validation", "override_auto_sni_header"]),
                ),
                ("explicit_http_config", Fields(UPSTREAM_CODECS)),
                ("use_downstream_protocol_config", Fields(UPSTREAM_CODECS)),
                ("auto_config", Fields(UPSTREAM_CODECS)),
            ]),
        ),
        ("envoy.config.cluster.v3.CircuitBreakers", Only(&["thresholds"])),
        // max_pending_requests, max_requests and max_retries are honoured by the HTTP path.
        (
            "envoy.config.cluster.v3.CircuitBreakers.Thresholds",
            Only(&[
                "priority",
                "max_connections",
                "max_pending_requests",
                "max_requests",
                "max_retries",
                "track_remaining",
            ]),
        ),
        ("envoy.config.endpoint.v3.ClusterLoadAssignment", Only(&["cluster_name", "endpoints"])),
        (
            "envoy.config.endpoint.v3.LocalityLbEndpoints",
            Only(&["locality", "lb_endpoints", "load_balancing_weight", "priority", "metadata"]),
        ),
        ("envoy.config.core.v3.Locality", All),
        (
            "envoy.config.endpoint.v3.LbEndpoint",
            Only(&["endpoint", "health_status", "load_balancing_weight", "metadata"]),
        ),
        ("envoy.config.endpoint.v3.Endpoint", Only(&["address", "hostname"])),
    ]
};

/// The policy for a message type, `None` when the proxy honours nothing of it.
fn policy(full_name: &str) -> Option<Policy> {
    static BY_NAME: OnceLock<HashMap<&'static str, Policy>> = OnceLock::new();
    BY_NAME.get_or_init(|| POLICIES.iter().copied().collect()).get(full_name).copied()
}

/// Checks every set field of `msg` (of proto type `full_name`) against the policy table, looking
/// inside `google.protobuf.Any` fields by their type URL. Returns every rejection, not just the
/// first, so one NACK can list them all.
pub fn audit<T: prost::Message>(msg: &T, full_name: &str) -> Result<(), Vec<Unsupported>> {
    let dynamic = proto::to_dynamic(msg, full_name)
        .map_err(|err| vec![Unsupported { path: String::new(), reason: err.to_string() }])?;
    let mut found = Vec::new();
    audit_message(&dynamic, &mut String::new(), None, &mut found);
    if found.is_empty() { Ok(()) } else { Err(found) }
}

/// Whether a field counts as set, with protobuf presence: proto3 scalars when non-default,
/// messages when present, repeated and map fields when non-empty. This is exactly the set of
/// fields `DynamicMessage::fields()` yields, which the walk relies on.
#[cfg(test)]
pub fn is_set(msg: &DynamicMessage, field_name: &str) -> bool {
    msg.descriptor().get_field_by_name(field_name).is_some_and(|field| msg.has_field(&field))
}

/// Audits one message reached at `path`. `context` is the policy the parent gave this field's
/// contents, which takes precedence over the type's own.
fn audit_message(msg: &DynamicMessage, path: &mut String, context: Option<Policy>, found: &mut Vec<Unsupported>) {
    let desc = msg.descriptor();
    if desc.full_name() == "google.protobuf.Any" {
        audit_any(msg, path, context, found);
        return;
    }
    let Some(policy) = context.or_else(|| policy(desc.full_name())) else {
        found.push(Unsupported { path: path.clone(), reason: format!("{} is not supported", desc.full_name()) });
        return;
    };
    for (field, value) in msg.fields() {
        // Some(context) when the field is honoured; context overrides the field type's policy.
        let honoured = match policy {
            // Nothing below is read field by field here.
            Policy::All | Policy::Skip => return,
            Policy::Only(names) => names.contains(&field.name()).then_some(None),
            Policy::Fields(fields) => fields.iter().find(|(name, _)| *name == field.name()).map(|(_, p)| Some(*p)),
        };
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(field.name());
        match honoured {
            None => found.push(Unsupported { path: path.clone(), reason: "not supported".to_owned() }),
            Some(context) => audit_value(value, path, context, found),
        }
        path.truncate(len);
    }
}

/// Descends into a field's value: messages, elements of repeated fields, values of map fields.
fn audit_value(value: &Value, path: &mut String, context: Option<Policy>, found: &mut Vec<Unsupported>) {
    match value {
        Value::Message(msg) => audit_message(msg, path, context, found),
        Value::List(items) => {
            for (index, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{index}]"));
                audit_value(item, path, context, found);
                path.truncate(len);
            }
        }
        Value::Map(entries) => {
            // Sorted so the rejections come out in a stable order.
            let mut entries: Vec<(&MapKey, &Value)> = entries.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            for (key, item) in entries {
                let len = path.len();
                path.push_str(&format!("[{}]", map_key_text(key)));
                audit_value(item, path, context, found);
                path.truncate(len);
            }
        }
        // Scalars and enums: their values are for the conversion to judge.
        _ => {}
    }
}

/// String keys quoted (they may contain dots), others bare.
fn map_key_text(key: &MapKey) -> String {
    match key {
        MapKey::Bool(v) => v.to_string(),
        MapKey::I32(v) => v.to_string(),
        MapKey::I64(v) => v.to_string(),
        MapKey::U32(v) => v.to_string(),
        MapKey::U64(v) => v.to_string(),
        MapKey::String(v) => format!("{v:?}"),
    }
}

/// An Any is audited as the message its type URL names, at the Any's own path.
fn audit_any(any: &DynamicMessage, path: &mut String, context: Option<Policy>, found: &mut Vec<Unsupported>) {
    if matches!(context, Some(Policy::All | Policy::Skip)) {
        return;
    }
    let type_url = match any.get_field_by_name("type_url").as_deref() {
        Some(Value::String(url)) => url.clone(),
        _ => String::new(),
    };
    let bytes = match any.get_field_by_name("value").as_deref() {
        Some(Value::Bytes(bytes)) => bytes.clone(),
        _ => Default::default(),
    };
    let inner_desc = type_url.rsplit_once('/').and_then(|(_, name)| proto::pool().get_message_by_name(name));
    let Some(inner_desc) = inner_desc else {
        found.push(Unsupported { path: path.clone(), reason: format!("unknown type {type_url}") });
        return;
    };
    match DynamicMessage::decode(inner_desc, bytes) {
        Ok(inner) => audit_message(&inner, path, context, found),
        Err(err) => found.push(Unsupported { path: path.clone(), reason: format!("invalid {type_url}: {err}") }),
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
    use envoy_types::pb::google::protobuf::Any;
    use prost_reflect::ReflectMessage;
    use proto::{Format, decode, parse_dynamic};

    const LISTENER: &str = "envoy.config.listener.v3.Listener";
    const CLUSTER: &str = "envoy.config.cluster.v3.Cluster";
    const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";

    const TCP_LISTENER: &str = r#"
name: listener_0
address:
  socket_address: { address: 127.0.0.1, port_value: 10000 }
bind_to_port: true
per_connection_buffer_limit_bytes: 32768
metadata:
  filter_metadata:
    some.filter: { anything: [1, 2] }
filter_chains:
- name: plain
  filter_chain_match: { destination_port: 10000, server_names: [a.example] }
  transport_socket:
    name: envoy.transport_sockets.raw_buffer
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: tcp
      weighted_clusters:
        clusters:
        - { name: a, weight: 1 }
        - { name: b, weight: 3 }
      idle_timeout: 10s
      max_connect_attempts: 2
"#;

    const STATIC_CLUSTER: &str = r#"
name: service
type: STATIC
connect_timeout: 1s
lb_policy: ROUND_ROBIN
circuit_breakers:
  thresholds:
  - { priority: DEFAULT, max_connections: 100, max_retries: 3 }
load_assignment:
  cluster_name: service
  endpoints:
  - locality: { zone: z1 }
    lb_endpoints:
    - endpoint:
        address:
          socket_address: { address: 127.0.0.1, port_value: 8080 }
      load_balancing_weight: 2
"#;

    fn parse<T: prost::Message + Default>(yaml: &str, full_name: &str) -> T {
        decode(&parse_dynamic(yaml, Format::Yaml, full_name).expect("parses")).expect("decodes")
    }

    fn audit_errors<T: prost::Message>(msg: &T, full_name: &str) -> Vec<String> {
        match audit(msg, full_name) {
            Ok(()) => Vec::new(),
            Err(found) => found.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn policy_table_names_real_types_and_fields() {
        let pool = proto::pool();
        let mut seen = std::collections::HashSet::new();
        for (name, policy) in POLICIES {
            assert!(seen.insert(name), "{name} listed twice");
            let desc = pool.get_message_by_name(name).unwrap_or_else(|| panic!("{name} is not a message type"));
            let fields: Vec<&str> = match policy {
                Policy::Only(fields) => fields.to_vec(),
                Policy::Fields(fields) => fields.iter().map(|(field, _)| *field).collect(),
                Policy::All | Policy::Skip => Vec::new(),
            };
            for field in fields {
                assert!(desc.get_field_by_name(field).is_some(), "{name} has no field {field}");
            }
        }
    }

    #[test]
    fn honoured_listener_and_cluster_pass() {
        let listener: Listener = parse(TCP_LISTENER, LISTENER);
        assert_eq!(audit_errors(&listener, LISTENER), Vec::<String>::new());
        let cluster: Cluster = parse(STATIC_CLUSTER, CLUSTER);
        assert_eq!(audit_errors(&cluster, CLUSTER), Vec::<String>::new());
    }

    #[test]
    fn bootstrap_passes_and_leaves_listeners_and_clusters_to_their_own_audit() {
        let text = r#"
node: { id: n, cluster: c, metadata: { k: v } }
admin:
  access_log_path: /dev/null
  address: { socket_address: { address: 127.0.0.1, port_value: 9901 } }
static_resources:
  listeners:
  - listener_filters:
    - name: envoy.filters.listener.tls_inspector
  clusters:
  - name: xds
    health_checks: [{ timeout: 1s }]
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{ envoy_grpc: { cluster_name: xds } }]
  lds_config: { ads: {}, resource_api_version: V3 }
  cds_config: { ads: {}, resource_api_version: V3 }
"#;
        let bootstrap: Bootstrap = parse(text, BOOTSTRAP);
        assert_eq!(audit_errors(&bootstrap, BOOTSTRAP), Vec::<String>::new());
    }

    #[test]
    fn bootstrap_rejects_unhonoured_fields() {
        let text = r#"
static_resources:
  secrets: [{ name: s, session_ticket_keys: {} }]
admin:
  address: { pipe: { path: /tmp/admin.sock } }
stats_flush_interval: 5s
"#;
        let bootstrap: Bootstrap = parse(text, BOOTSTRAP);
        assert_eq!(
            audit_errors(&bootstrap, BOOTSTRAP),
            // Secrets are audited as they are parsed; a pipe admin address is refused by the bootstrap conversion
            // (pipe addresses pass the audit for gRPC config source clusters).
            ["stats_flush_interval: not supported"]
        );
    }

    #[test]
    fn set_unsupported_listener_field_is_rejected() {
        let text = format!("{TCP_LISTENER}tcp_fast_open_queue_length: 10\n");
        let listener: Listener = parse(&text, LISTENER);
        assert_eq!(audit_errors(&listener, LISTENER), ["tcp_fast_open_queue_length: not supported"]);
    }

    #[test]
    fn set_unsupported_cluster_field_is_rejected() {
        let text = format!("{STATIC_CLUSTER}health_checks:\n- timeout: 1s\n  interval: 5s\n  tcp_health_check: {{}}\n");
        let cluster: Cluster = parse(&text, CLUSTER);
        assert_eq!(audit_errors(&cluster, CLUSTER), ["health_checks: not supported"]);
    }

    #[test]
    fn an_unsupported_transport_socket_type_is_rejected() {
        let text = TCP_LISTENER
            .replace("envoy.transport_sockets.raw_buffer", "envoy.transport_sockets.alts")
            .replace("transport_sockets.raw_buffer.v3.RawBuffer", "transport_sockets.alts.v3.Alts");
        let listener: Listener = parse(&text, LISTENER);
        assert_eq!(
            audit_errors(&listener, LISTENER),
            ["filter_chains[0].transport_socket.typed_config: envoy.extensions.transport_sockets.alts.v3.Alts is not \
                 supported"]
        );
    }

    #[test]
    fn unsupported_network_filter_and_filter_fields_are_rejected() {
        let text = TCP_LISTENER
            .replace("      idle_timeout: 10s\n", "      idle_timeout: 10s\n      downstream_idle_timeout: 5s\n")
            + r#"- name: http
  filters:
  - name: envoy.filters.network.rbac
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
      stat_prefix: http
"#;
        let listener: Listener = parse(&text, LISTENER);
        assert_eq!(
            audit_errors(&listener, LISTENER),
            [
                "filter_chains[0].filters[0].typed_config.downstream_idle_timeout: not supported",
                "filter_chains[1].filters[0].typed_config: envoy.extensions.filters.network.rbac.v3.RBAC is not \
                 supported",
            ]
        );
    }

    #[test]
    fn unknown_any_type_is_rejected_at_its_path() {
        let mut listener: Listener = parse(TCP_LISTENER, LISTENER);
        let filter = &mut listener.filter_chains[0].filters[0];
        filter.config_type = Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/istio.Custom".into(),
            value: vec![],
        }));
        assert_eq!(
            audit_errors(&listener, LISTENER),
            ["filter_chains[0].filters[0].typed_config: unknown type type.googleapis.com/istio.Custom"]
        );
    }

    #[test]
    fn map_entries_are_walked_with_quoted_keys() {
        let yaml = r#"
typed_filter_metadata:
  my.filter:
    "@type": type.googleapis.com/envoy.config.core.v3.Http3ProtocolOptions
"#;
        let metadata = parse_dynamic(yaml, Format::Yaml, "envoy.config.core.v3.Metadata").expect("parses");
        let mut found = Vec::new();
        audit_message(&metadata, &mut String::new(), Some(Policy::Only(&["typed_filter_metadata"])), &mut found);
        assert_eq!(
            found,
            [Unsupported {
                path: "typed_filter_metadata[\"my.filter\"]".into(),
                reason: "envoy.config.core.v3.Http3ProtocolOptions is not supported".into(),
            }]
        );
    }

    #[test]
    fn set_means_protobuf_presence() {
        let yaml = r#"
name: ""
stat_prefix: ""
continue_on_listener_filters_timeout: false
bind_to_port: false
filter_chains: []
freebind: true
"#;
        let dynamic = parse_dynamic(yaml, Format::Yaml, LISTENER).expect("parses");
        let listener: Listener = decode(&dynamic).expect("decodes");
        let reflected = proto::to_dynamic(&listener, LISTENER).expect("reflects");
        for msg in [&dynamic, &reflected] {
            let mut set: Vec<String> = msg.fields().map(|(f, _)| f.name().to_owned()).collect();
            set.sort();
            // Defaults of proto3 scalars and empty lists are unset; present wrappers are set even
            // when they hold the default.
            assert_eq!(set, ["bind_to_port", "freebind"], "{}", msg.descriptor().name());
            assert!(is_set(msg, "bind_to_port"));
            assert!(!is_set(msg, "stat_prefix"));
            assert!(!is_set(msg, "filter_chains"));
            assert!(!is_set(msg, "no_such_field"));
        }
    }

    #[test]
    fn root_type_without_policy_is_reported_without_a_path() {
        const API_LISTENER: &str = "envoy.config.listener.v3.ApiListener";
        let api: ApiListener =
            parse("api_listener: { \"@type\": type.googleapis.com/google.protobuf.Empty, value: {} }", API_LISTENER);
        assert_eq!(audit_errors(&api, API_LISTENER), ["envoy.config.listener.v3.ApiListener is not supported"]);
    }
}
