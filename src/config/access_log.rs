//! Validated `access_log` lists (listener, tcp_proxy, HCM): file, stdout and stderr loggers with Envoy's text or
//! JSON formats. The destination is opened here, so a path that cannot be written is a config error naming it, as
//! in Envoy.

use envoy_types::pb::envoy::config::accesslog::v3 as alpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::access_loggers::file::v3 as file;
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3 as stream;

use super::listener::{data_source, decode_any, type_name};
use super::{ConfigError, join};
use crate::access_log::{AccessLog, DEFAULT_FORMAT, Destination, LogFormat};

/// Lines dropped because a writer's queue was full, over every access log of the process.
pub static DROPPED: std::sync::LazyLock<crate::stats::Counter> = std::sync::LazyLock::new(Default::default);

pub fn access_logs(list: &[alpb::AccessLog], path: &str) -> Result<Vec<AccessLog>, ConfigError> {
    list.iter().enumerate().map(|(i, l)| access_log(l, &join(path, &format!("[{i}]")))).collect()
}

fn access_log(l: &alpb::AccessLog, path: &str) -> Result<AccessLog, ConfigError> {
    if l.filter.is_some() {
        return Err(ConfigError::new(join(path, "filter"), "access log filters are not supported"));
    }
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
    AccessLog::new(destination, format, DROPPED.clone()).map_err(|e| ConfigError::new(&tpath, e))
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
