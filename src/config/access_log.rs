//! Validated `access_log` lists (listener, tcp_proxy, HCM): file, stdout and stderr loggers with Envoy's text or
//! JSON formats. The destination is opened here, so a path that cannot be written is a config error naming it, as
//! in Envoy.

use envoy_types::pb::envoy::config::accesslog::v3 as alpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::access_loggers::file::v3 as file;
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3 as stream;

use super::listener::{data_source, decode_any, type_name};
use super::{ConfigError, join};
use crate::access_log::{
    AccessLog, CompareOp, Comparison, DEFAULT_FORMAT, Destination, LogFilter, LogFormat, RESPONSE_FLAG_CODES,
};

/// Lines dropped because a writer's queue was full, over every access log of the process.
pub static DROPPED: std::sync::LazyLock<crate::stats::Counter> = std::sync::LazyLock::new(Default::default);

pub fn access_logs(list: &[alpb::AccessLog], path: &str) -> Result<Vec<AccessLog>, ConfigError> {
    list.iter().enumerate().map(|(i, l)| access_log(l, &join(path, &format!("[{i}]")))).collect()
}

fn access_log(l: &alpb::AccessLog, path: &str) -> Result<AccessLog, ConfigError> {
    let filter = l.filter.as_ref().map(|f| log_filter(f, &join(path, "filter"))).transpose()?;
    let Some(alpb::access_log::ConfigType::TypedConfig(any)) = &l.config_type else {
        return Err(ConfigError::new(join(path, "typed_config"), "an access log needs a typed_config"));
    };
    let tpath = join(path, "typed_config");
    let (destination, format) = match type_name(&any.type_url) {
        "envoy.extensions.access_loggers.file.v3.FileAccessLog" => {
            let f: file::FileAccessLog = decode_any(any, &tpath)?;
            if f.path.is_empty() {
                return Err(ConfigError::new(join(&tpath, "path"), "a file access log needs a path"));
            }
            use file::file_access_log::AccessLogFormat as F;
            #[allow(deprecated)]
            let format = match &f.access_log_format {
                None => LogFormat::text(DEFAULT_FORMAT),
                Some(F::Format(s)) if s.is_empty() => LogFormat::text(DEFAULT_FORMAT),
                Some(F::Format(s)) => LogFormat::text(s),
                Some(F::JsonFormat(st)) => json(st, &join(&tpath, "json_format"))?,
                Some(F::TypedJsonFormat(st)) => json(st, &join(&tpath, "typed_json_format"))?,
                Some(F::LogFormat(sfs)) => substitution(sfs, &join(&tpath, "log_format"))?,
            }
            .map_err(|e| ConfigError::new(&tpath, e))?;
            (Destination::File(f.path.clone()), format)
        }
        name @ ("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
        | "envoy.extensions.access_loggers.stream.v3.StderrAccessLog") => {
            let stdout = name.ends_with("StdoutAccessLog");
            let sfs = if stdout {
                let s: stream::StdoutAccessLog = decode_any(any, &tpath)?;
                s.access_log_format.map(|stream::stdout_access_log::AccessLogFormat::LogFormat(f)| f)
            } else {
                let s: stream::StderrAccessLog = decode_any(any, &tpath)?;
                s.access_log_format.map(|stream::stderr_access_log::AccessLogFormat::LogFormat(f)| f)
            };
            let format = match &sfs {
                Some(f) => substitution(f, &join(&tpath, "log_format"))?,
                None => LogFormat::text(DEFAULT_FORMAT),
            }
            .map_err(|e| ConfigError::new(&tpath, e))?;
            (if stdout { Destination::Stdout } else { Destination::Stderr }, format)
        }
        other => return Err(ConfigError::new(&tpath, format!("access logger '{other}' is not supported"))),
    };
    let log = AccessLog::new(destination, format, DROPPED.clone()).map_err(|e| ConfigError::new(&tpath, e))?;
    Ok(match filter {
        Some(f) => log.with_filter(f),
        None => log,
    })
}

/// Envoy's `AccessLogFilter`. The filters that need what this proxy does not have (runtime, tracing, metadata,
/// gRPC status, extensions such as CEL) are refused with their path.
fn log_filter(f: &alpb::AccessLogFilter, path: &str) -> Result<LogFilter, ConfigError> {
    use alpb::access_log_filter::FilterSpecifier as F;
    let comparison = |c: Option<&alpb::ComparisonFilter>, at: &str| -> Result<Comparison, ConfigError> {
        let c = c.ok_or_else(|| ConfigError::new(join(path, at), "a comparison is required"))?;
        let op = match alpb::comparison_filter::Op::try_from(c.op) {
            Ok(alpb::comparison_filter::Op::Eq) => CompareOp::Eq,
            Ok(alpb::comparison_filter::Op::Ge) => CompareOp::Ge,
            Ok(alpb::comparison_filter::Op::Le) => CompareOp::Le,
            Ok(alpb::comparison_filter::Op::Ne) => CompareOp::Ne,
            Err(_) => return Err(ConfigError::new(join(path, &format!("{at}.op")), format!("unknown op {}", c.op))),
        };
        let value = c
            .value
            .as_ref()
            .ok_or_else(|| ConfigError::new(join(path, &format!("{at}.value")), "a comparison needs a value"))?;
        if !value.runtime_key.is_empty() {
            // No runtime here: the default is what Envoy uses when the key is absent.
            tracing::debug!(key = %value.runtime_key, "access log filter runtime_key: the default_value applies");
        }
        Ok(Comparison { op, value: u64::from(value.default_value) })
    };
    let list = |filters: &[alpb::AccessLogFilter], at: &str| -> Result<Vec<LogFilter>, ConfigError> {
        filters.iter().enumerate().map(|(i, f)| log_filter(f, &join(path, &format!("{at}.filters[{i}]")))).collect()
    };
    Ok(match &f.filter_specifier {
        Some(F::StatusCodeFilter(s)) => {
            LogFilter::Status(comparison(s.comparison.as_ref(), "status_code_filter.comparison")?)
        }
        Some(F::DurationFilter(d)) => {
            LogFilter::Duration(comparison(d.comparison.as_ref(), "duration_filter.comparison")?)
        }
        Some(F::ResponseFlagFilter(r)) => {
            for (i, flag) in r.flags.iter().enumerate() {
                if !RESPONSE_FLAG_CODES.contains(&flag.as_str()) {
                    return Err(ConfigError::new(
                        join(path, &format!("response_flag_filter.flags[{i}]")),
                        format!("unknown response flag \"{flag}\""),
                    ));
                }
            }
            LogFilter::Flags(r.flags.clone())
        }
        Some(F::HeaderFilter(h)) => {
            let matcher = h
                .header
                .as_ref()
                .ok_or_else(|| ConfigError::new(join(path, "header_filter.header"), "a header matcher is required"))?;
            LogFilter::Header(crate::network::http::route::HeaderMatchers::new(
                std::slice::from_ref(matcher),
                &join(path, "header_filter.header"),
            )?)
        }
        Some(F::AndFilter(a)) => LogFilter::And(list(&a.filters, "and_filter")?),
        Some(F::OrFilter(o)) => LogFilter::Or(list(&o.filters, "or_filter")?),
        Some(other) => {
            let name = match other {
                F::NotHealthCheckFilter(_) => "not_health_check_filter",
                F::TraceableFilter(_) => "traceable_filter",
                F::RuntimeFilter(_) => "runtime_filter",
                F::GrpcStatusFilter(_) => "grpc_status_filter",
                F::ExtensionFilter(_) => "extension_filter",
                F::MetadataFilter(_) => "metadata_filter",
                F::LogTypeFilter(_) => "log_type_filter",
                _ => "filter",
            };
            return Err(ConfigError::new(join(path, name), "this access log filter is not supported"));
        }
        None => return Err(ConfigError::new(path, "an access log filter needs one of its filters")),
    })
}

fn substitution(f: &core::SubstitutionFormatString, path: &str) -> Result<Result<LogFormat, String>, ConfigError> {
    use core::substitution_format_string::Format;
    if !f.formatters.is_empty() {
        return Err(ConfigError::new(join(path, "formatters"), "formatter extensions are not supported"));
    }
    if f.omit_empty_values {
        return Err(ConfigError::new(join(path, "omit_empty_values"), "omit_empty_values is not supported"));
    }
    #[allow(deprecated)]
    Ok(match &f.format {
        Some(Format::TextFormat(s)) => LogFormat::text(s),
        Some(Format::TextFormatSource(ds)) => {
            let bytes = data_source(Some(ds), &join(path, "text_format_source"))?;
            LogFormat::text(&String::from_utf8_lossy(&bytes))
        }
        Some(Format::JsonFormat(st)) => return json(st, &join(path, "json_format")),
        None => LogFormat::text(DEFAULT_FORMAT),
    })
}

fn json(st: &envoy_types::pb::google::protobuf::Struct, path: &str) -> Result<Result<LogFormat, String>, ConfigError> {
    match super::proto::to_json_value(st, "google.protobuf.Struct") {
        Ok(serde_json::Value::Object(m)) => Ok(LogFormat::json(m)),
        Ok(_) => Err(ConfigError::new(path, "json_format must be an object")),
        Err(e) => Err(ConfigError::new(path, e.to_string())),
    }
}
