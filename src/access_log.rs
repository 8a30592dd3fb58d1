//! Access logs: Envoy's format strings (command operators such as `%START_TIME%`, `%REQ(X?Y):N%`,
//! `%RESPONSE_FLAGS%`) and `json_format`, rendered from one [`Entry`] per connection or request, and written off the
//! connection path: each file (or stdout/stderr) has one writer thread fed through a bounded queue, so a worker never
//! blocks on a disk; lines that find the queue full are dropped and counted.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

use crate::stats::Counter;

/// Envoy's default access log format.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
     %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
     %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \
     \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Lines a writer may have queued before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// Envoy's response flags, in the order Envoy prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// UH: no healthy upstream host.
    NoHealthyUpstream,
    /// UF: upstream connection failure.
    UpstreamConnectionFailure,
    /// UO: upstream overflow (circuit breaking).
    UpstreamOverflow,
    /// NR: no route (HTTP) or no filter chain (TCP).
    NoRoute,
    /// URX: upstream retry limit (HTTP) or connect attempts (TCP) exceeded.
    UpstreamRetryLimitExceeded,
    /// NC: no cluster.
    NoClusterFound,
    /// UT: upstream request timeout.
    UpstreamRequestTimeout,
    /// UC: upstream connection termination.
    UpstreamConnectionTermination,
    /// DC: downstream connection termination.
    DownstreamConnectionTermination,
    /// SI: stream idle timeout.
    StreamIdleTimeout,
    /// LH: the local health check failed (`/healthcheck/fail`).
    FailedLocalHealthCheck,
    /// DI: the fault filter delayed the request.
    DelayInjected,
    /// FI: the fault filter aborted the request.
    FaultInjected,
    /// DT: the stream outlived its max_stream_duration.
    DurationTimeout,
    /// UMSDR: the upstream request outlived the cluster's max_stream_duration.
    UpstreamMaxStreamDurationReached,
}

impl Flag {
    fn code(self) -> &'static str {
        match self {
            Flag::NoHealthyUpstream => "UH",
            Flag::UpstreamConnectionFailure => "UF",
            Flag::UpstreamOverflow => "UO",
            Flag::NoRoute => "NR",
            Flag::UpstreamRetryLimitExceeded => "URX",
            Flag::NoClusterFound => "NC",
            Flag::UpstreamRequestTimeout => "UT",
            Flag::UpstreamConnectionTermination => "UC",
            Flag::DownstreamConnectionTermination => "DC",
            Flag::StreamIdleTimeout => "SI",
            Flag::FailedLocalHealthCheck => "LH",
            Flag::DelayInjected => "DI",
            Flag::FaultInjected => "FI",
            Flag::DurationTimeout => "DT",
            Flag::UpstreamMaxStreamDurationReached => "UMSDR",
        }
    }
}

/// Everything a log line can say about one connection (TCP) or one request (HTTP).
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub start: Option<SystemTime>,
    pub duration: Duration,
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub downstream_direct_remote: Option<SocketAddr>,
    pub requested_server_name: Option<String>,
    pub filter_chain_name: Option<String>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<String>,
    pub upstream_local: Option<SocketAddr>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub flags: Vec<Flag>,
    pub response_code: Option<u16>,
    pub response_code_details: Option<String>,
    pub protocol: Option<&'static str>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub authority: Option<String>,
    pub request_headers: Option<HeaderMap>,
    pub response_headers: Option<HeaderMap>,
    pub route_name: Option<String>,
    pub connection_id: u64,
}

/// One piece of a format string.
#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Text(String),
    Op { op: Op, max_len: Option<usize> },
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    StartTime(Option<Vec<TimePart>>),
    Duration,
    DownstreamRemoteAddress { port: bool },
    DownstreamLocalAddress { port: bool },
    DownstreamDirectRemoteAddress { port: bool },
    RequestedServerName,
    FilterChainName,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    BytesReceived,
    BytesSent,
    ResponseFlags,
    ResponseCode,
    ResponseCodeDetails,
    Protocol,
    Req(String, Option<String>),
    Resp(String, Option<String>),
    RouteName,
    ConnectionId,
    Hostname,
}

#[derive(Debug, Clone, PartialEq)]
enum TimePart {
    Text(String),
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    /// `%E3S`-style: seconds with `n` fractional digits.
    SecondFraction(usize),
    EpochSeconds,
}

/// A parsed format: text, or JSON whose string leaves are formats.
#[derive(Debug, Clone)]
pub struct LogFormat(FormatKind);

#[derive(Debug, Clone)]
enum FormatKind {
    Text(Vec<Segment>),
    Json(serde_json::Map<String, serde_json::Value>, Arc<HashMap<String, Vec<Segment>>>),
}

impl LogFormat {
    pub fn text(format: &str) -> Result<LogFormat, String> {
        Ok(LogFormat(FormatKind::Text(parse(format)?)))
    }

    /// Envoy's `json_format`: every string value is a format; a value that is exactly one numeric operator
    /// (`%RESPONSE_CODE%`, `%BYTES_SENT%`…) renders as a JSON number.
    pub fn json(template: serde_json::Map<String, serde_json::Value>) -> Result<LogFormat, String> {
        let mut parsed = HashMap::new();
        collect_json(&serde_json::Value::Object(template.clone()), &mut parsed)?;
        Ok(LogFormat(FormatKind::Json(template, Arc::new(parsed))))
    }

    pub fn render(&self, e: &Entry) -> String {
        match &self.0 {
            FormatKind::Text(segments) => render_segments(segments, e),
            FormatKind::Json(template, parsed) => {
                let mut line = render_json(&serde_json::Value::Object(template.clone()), parsed, e).to_string();
                line.push('\n');
                line
            }
        }
    }
}

fn collect_json(v: &serde_json::Value, out: &mut HashMap<String, Vec<Segment>>) -> Result<(), String> {
    match v {
        serde_json::Value::String(s) => {
            out.insert(s.clone(), parse(s)?);
        }
        serde_json::Value::Object(m) => m.values().try_for_each(|v| collect_json(v, out))?,
        serde_json::Value::Array(a) => a.iter().try_for_each(|v| collect_json(v, out))?,
        _ => {}
    }
    Ok(())
}

fn render_json(v: &serde_json::Value, parsed: &HashMap<String, Vec<Segment>>, e: &Entry) -> serde_json::Value {
    match v {
        serde_json::Value::String(s) => {
            let Some(segments) = parsed.get(s) else { return v.clone() };
            if let [Segment::Op { op, .. }] = segments.as_slice()
                && let Some(n) = numeric(op, e)
            {
                return serde_json::Value::from(n);
            }
            let text = render_segments(segments, e);
            // Envoy writes a missing value as null in JSON rather than "-".
            if text == "-" { serde_json::Value::Null } else { serde_json::Value::String(text) }
        }
        serde_json::Value::Object(m) => {
            serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), render_json(v, parsed, e))).collect())
        }
        serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(|v| render_json(v, parsed, e)).collect()),
        other => other.clone(),
    }
}

fn numeric(op: &Op, e: &Entry) -> Option<u64> {
    match op {
        Op::ResponseCode => Some(e.response_code.map_or(0, u64::from)),
        Op::BytesReceived => Some(e.bytes_received),
        Op::BytesSent => Some(e.bytes_sent),
        Op::Duration => Some(e.duration.as_millis() as u64),
        Op::ConnectionId => Some(e.connection_id),
        _ => None,
    }
}

/// Parses an Envoy format string; unknown operators are an error (Envoy refuses them too).
fn parse(format: &str) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = format;
    while let Some(i) = rest.find('%') {
        text.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            text.push('%');
            rest = r;
            continue;
        }
        let end = operator_end(rest).ok_or_else(|| format!("unterminated command operator in '{format}'"))?;
        let (op, max_len) = parse_op(&rest[..end])?;
        if !text.is_empty() {
            out.push(Segment::Text(std::mem::take(&mut text)));
        }
        out.push(Segment::Op { op, max_len });
        rest = &rest[end + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        out.push(Segment::Text(text));
    }
    Ok(out)
}

/// Where an operator's closing `%` is: START_TIME's argument may itself contain `%` (strftime), inside parentheses.
fn operator_end(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            '%' if depth == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_op(s: &str) -> Result<(Op, Option<usize>), String> {
    let (name, arg, tail) = match s.find('(') {
        Some(open) => {
            let close = s.rfind(')').ok_or_else(|| format!("missing ')' in %{s}%"))?;
            (&s[..open], Some(&s[open + 1..close]), &s[close + 1..])
        }
        None => match s.find(':') {
            Some(c) => (&s[..c], None, &s[c..]),
            None => (s, None, ""),
        },
    };
    let max_len = match tail.strip_prefix(':') {
        Some(n) => Some(n.parse::<usize>().map_err(|_| format!("bad length in %{s}%"))?),
        None if tail.is_empty() => None,
        None => return Err(format!("unexpected '{tail}' in %{s}%")),
    };
    let header = |arg: Option<&str>| -> Result<(String, Option<String>), String> {
        let arg = arg.ok_or_else(|| format!("%{name}% needs a header name"))?;
        let (main, alt) = match arg.split_once('?') {
            Some((m, a)) => (m, Some(a.to_ascii_lowercase())),
            None => (arg, None),
        };
        Ok((main.to_ascii_lowercase(), alt))
    };
    let op = match name {
        "START_TIME" => Op::StartTime(arg.map(parse_time_format).transpose()?),
        "DURATION" => Op::Duration,
        "DOWNSTREAM_REMOTE_ADDRESS" => Op::DownstreamRemoteAddress { port: true },
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Op::DownstreamRemoteAddress { port: false },
        "DOWNSTREAM_LOCAL_ADDRESS" => Op::DownstreamLocalAddress { port: true },
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Op::DownstreamLocalAddress { port: false },
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => Op::DownstreamDirectRemoteAddress { port: true },
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => Op::DownstreamDirectRemoteAddress { port: false },
        "REQUESTED_SERVER_NAME" => Op::RequestedServerName,
        "FILTER_CHAIN_NAME" => Op::FilterChainName,
        "UPSTREAM_HOST" => Op::UpstreamHost,
        "UPSTREAM_CLUSTER" => Op::UpstreamCluster,
        "UPSTREAM_LOCAL_ADDRESS" => Op::UpstreamLocalAddress,
        "BYTES_RECEIVED" => Op::BytesReceived,
        "BYTES_SENT" => Op::BytesSent,
        "RESPONSE_FLAGS" => Op::ResponseFlags,
        "RESPONSE_CODE" => Op::ResponseCode,
        "RESPONSE_CODE_DETAILS" => Op::ResponseCodeDetails,
        "PROTOCOL" => Op::Protocol,
        "REQ" => {
            let (h, alt) = header(arg)?;
            Op::Req(h, alt)
        }
        "RESP" => {
            let (h, alt) = header(arg)?;
            Op::Resp(h, alt)
        }
        "ROUTE_NAME" => Op::RouteName,
        "CONNECTION_ID" => Op::ConnectionId,
        "HOSTNAME" => Op::Hostname,
        other => return Err(format!("command operator %{other}% is not supported")),
    };
    Ok((op, max_len))
}

fn parse_time_format(f: &str) -> Result<Vec<TimePart>, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut chars = f.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            text.push(c);
            continue;
        }
        let spec = chars.next().ok_or("a START_TIME format ends in '%'")?;
        let part = match spec {
            'Y' => TimePart::Year,
            'm' => TimePart::Month,
            'd' => TimePart::Day,
            'H' => TimePart::Hour,
            'M' => TimePart::Minute,
            'S' => TimePart::Second,
            's' => TimePart::EpochSeconds,
            'E' => {
                let digits = chars.next().and_then(|d| d.to_digit(10)).ok_or("expected %E<n>S")?;
                if chars.next() != Some('S') {
                    return Err("expected %E<n>S".into());
                }
                TimePart::SecondFraction(digits as usize)
            }
            '%' => {
                text.push('%');
                continue;
            }
            other => return Err(format!("START_TIME specifier %{other} is not supported")),
        };
        if !text.is_empty() {
            parts.push(TimePart::Text(std::mem::take(&mut text)));
        }
        parts.push(part);
    }
    if !text.is_empty() {
        parts.push(TimePart::Text(text));
    }
    Ok(parts)
}

fn render_segments(segments: &[Segment], e: &Entry) -> String {
    let mut out = String::with_capacity(256);
    for s in segments {
        match s {
            Segment::Text(t) => out.push_str(t),
            Segment::Op { op, max_len } => {
                let start = out.len();
                render_op(op, e, &mut out);
                if out.len() == start {
                    out.push('-');
                } else if let Some(max) = max_len {
                    let mut cut = start + max;
                    while cut < out.len() && !out.is_char_boundary(cut) {
                        cut += 1;
                    }
                    out.truncate(cut.min(out.len()));
                }
            }
        }
    }
    out
}

fn addr(out: &mut String, a: Option<SocketAddr>, port: bool) {
    if let Some(a) = a {
        if port {
            let _ = write!(out, "{a}");
        } else {
            let _ = write!(out, "{}", a.ip());
        }
    }
}

fn render_op(op: &Op, e: &Entry, out: &mut String) {
    match op {
        Op::StartTime(format) => {
            if let Some(start) = e.start {
                format_time(start, format.as_deref(), out);
            }
        }
        Op::Duration => {
            let _ = write!(out, "{}", e.duration.as_millis());
        }
        Op::DownstreamRemoteAddress { port } => addr(out, e.downstream_remote, *port),
        Op::DownstreamLocalAddress { port } => addr(out, e.downstream_local, *port),
        Op::DownstreamDirectRemoteAddress { port } => addr(out, e.downstream_direct_remote, *port),
        Op::RequestedServerName => out.push_str(e.requested_server_name.as_deref().unwrap_or("")),
        Op::FilterChainName => out.push_str(e.filter_chain_name.as_deref().unwrap_or("")),
        Op::UpstreamHost => addr(out, e.upstream_host, true),
        Op::UpstreamCluster => out.push_str(e.upstream_cluster.as_deref().unwrap_or("")),
        Op::UpstreamLocalAddress => addr(out, e.upstream_local, true),
        Op::BytesReceived => {
            let _ = write!(out, "{}", e.bytes_received);
        }
        Op::BytesSent => {
            let _ = write!(out, "{}", e.bytes_sent);
        }
        Op::ResponseFlags => {
            let codes: Vec<&str> = e.flags.iter().map(|f| f.code()).collect();
            out.push_str(&codes.join(","));
        }
        Op::ResponseCode => {
            let _ = write!(out, "{}", e.response_code.unwrap_or(0));
        }
        Op::ResponseCodeDetails => out.push_str(e.response_code_details.as_deref().unwrap_or("")),
        Op::Protocol => out.push_str(e.protocol.unwrap_or("")),
        Op::Req(name, alt) => {
            let value = request_header(e, name).or_else(|| alt.as_deref().and_then(|a| request_header(e, a)));
            out.push_str(value.as_deref().unwrap_or(""));
        }
        Op::Resp(name, alt) => {
            let get = |n: &str| e.response_headers.as_ref().and_then(|h| h.get(n)).and_then(|v| v.to_str().ok());
            out.push_str(get(name).or_else(|| alt.as_deref().and_then(get)).unwrap_or(""));
        }
        Op::RouteName => out.push_str(e.route_name.as_deref().unwrap_or("")),
        Op::ConnectionId => {
            let _ = write!(out, "{}", e.connection_id);
        }
        Op::Hostname => out.push_str(hostname()),
    }
}

/// A request header by lower-case name, with HTTP/2's pseudo-headers answered from the request line.
fn request_header(e: &Entry, name: &str) -> Option<String> {
    match name {
        ":method" => e.method.clone(),
        ":path" => e.path.clone(),
        ":authority" => e.authority.clone(),
        _ => e.request_headers.as_ref()?.get(name)?.to_str().ok().map(str::to_string),
    }
}

fn hostname() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
    })
}

/// UTC time; the default is Envoy's `%Y-%m-%dT%H:%M:%E3SZ`.
fn format_time(t: SystemTime, format: Option<&[TimePart]>, out: &mut String) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let (h, m, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    let default = [
        TimePart::Year,
        TimePart::Text("-".into()),
        TimePart::Month,
        TimePart::Text("-".into()),
        TimePart::Day,
        TimePart::Text("T".into()),
        TimePart::Hour,
        TimePart::Text(":".into()),
        TimePart::Minute,
        TimePart::Text(":".into()),
        TimePart::SecondFraction(3),
        TimePart::Text("Z".into()),
    ];
    for part in format.unwrap_or(&default) {
        let _ = match part {
            TimePart::Text(t) => out.write_str(t),
            TimePart::Year => write!(out, "{year:04}"),
            TimePart::Month => write!(out, "{month:02}"),
            TimePart::Day => write!(out, "{day:02}"),
            TimePart::Hour => write!(out, "{h:02}"),
            TimePart::Minute => write!(out, "{m:02}"),
            TimePart::Second => write!(out, "{s:02}"),
            TimePart::SecondFraction(0) => write!(out, "{s:02}"),
            TimePart::SecondFraction(n) => {
                let nanos = format!("{:09}", since.subsec_nanos());
                write!(out, "{s:02}.{}", &nanos[..(*n).min(9)])
            }
            TimePart::EpochSeconds => write!(out, "{secs}"),
        };
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    File(String),
    Stdout,
    Stderr,
}

/// A queue into one destination's writer thread.
#[derive(Debug)]
struct Writer {
    tx: SyncSender<String>,
}

/// One configured access log: where it writes, what a line looks like, and which entries it writes.
#[derive(Debug, Clone)]
pub struct AccessLog {
    writer: Arc<Writer>,
    format: Arc<LogFormat>,
    filter: Option<Arc<LogFilter>>,
    dropped: Counter,
}

/// Envoy's access log `filter`: whether an entry is written.
#[derive(Debug)]
pub enum LogFilter {
    /// `status_code_filter`: the response code (0 when there was none).
    Status(Comparison),
    /// `duration_filter`: the entry's duration in milliseconds.
    Duration(Comparison),
    /// `response_flag_filter`: any of these flag codes; empty, any flag at all.
    Flags(Vec<String>),
    /// `header_filter`: the request's headers match.
    Header(crate::network::http::route::HeaderMatchers),
    And(Vec<LogFilter>),
    Or(Vec<LogFilter>),
}

/// `ComparisonFilter`: `op` against `value`.
#[derive(Debug, Clone, Copy)]
pub struct Comparison {
    pub op: CompareOp,
    pub value: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Ge,
    Le,
    Ne,
}

impl Comparison {
    fn holds(self, actual: u64) -> bool {
        match self.op {
            CompareOp::Eq => actual == self.value,
            CompareOp::Ge => actual >= self.value,
            CompareOp::Le => actual <= self.value,
            CompareOp::Ne => actual != self.value,
        }
    }
}

impl LogFilter {
    pub fn admits(&self, e: &Entry) -> bool {
        match self {
            LogFilter::Status(c) => c.holds(u64::from(e.response_code.unwrap_or(0))),
            LogFilter::Duration(c) => c.holds(u64::try_from(e.duration.as_millis()).unwrap_or(u64::MAX)),
            LogFilter::Flags(codes) if codes.is_empty() => !e.flags.is_empty(),
            LogFilter::Flags(codes) => e.flags.iter().any(|f| codes.iter().any(|c| c == f.code())),
            LogFilter::Header(m) => {
                let empty = HeaderMap::new();
                let uri: http::Uri = e.path.as_deref().and_then(|p| p.parse().ok()).unwrap_or_default();
                let method: http::Method = e.method.as_deref().and_then(|m| m.parse().ok()).unwrap_or_default();
                let head = crate::network::http::route::RequestHead {
                    method: &method,
                    uri: &uri,
                    authority: e.authority.as_deref().unwrap_or(""),
                    headers: e.request_headers.as_ref().unwrap_or(&empty),
                };
                m.matches(&head)
            }
            LogFilter::And(all) => all.iter().all(|f| f.admits(e)),
            LogFilter::Or(any) => any.iter().any(|f| f.admits(e)),
        }
    }
}

/// Every response flag code Envoy's `response_flag_filter` accepts (its proto's list).
pub const RESPONSE_FLAG_CODES: &[&str] = &[
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC", "URX", "SI", "IH",
    "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR", "UDO",
];

impl AccessLog {
    /// Opens (or shares) the destination's writer; a file that cannot be opened is an error, as in Envoy.
    pub fn new(destination: Destination, format: LogFormat, dropped: Counter) -> Result<AccessLog, String> {
        Ok(AccessLog { writer: writer(destination)?, format: Arc::new(format), filter: None, dropped })
    }

    /// Writes only the entries `filter` admits.
    pub fn with_filter(mut self, filter: LogFilter) -> AccessLog {
        self.filter = Some(Arc::new(filter));
        self
    }

    /// Renders and queues one line, if the filter admits the entry; never blocks.
    pub fn log(&self, e: &Entry) {
        if self.filter.as_ref().is_some_and(|f| !f.admits(e)) {
            return;
        }
        let line = self.format.render(e);
        match self.writer.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Logs an entry to every configured log.
pub fn log_all(logs: &[AccessLog], e: &Entry) {
    for l in logs {
        l.log(e);
    }
}

fn writer(destination: Destination) -> Result<Arc<Writer>, String> {
    static WRITERS: OnceLock<Mutex<HashMap<Destination, Arc<Writer>>>> = OnceLock::new();
    let mut writers = WRITERS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = writers.get(&destination) {
        return Ok(w.clone());
    }
    let mut sink: Box<dyn std::io::Write + Send> = match &destination {
        Destination::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open access log {path}: {e}"))?,
        ),
        Destination::Stdout => Box::new(std::io::stdout()),
        Destination::Stderr => Box::new(std::io::stderr()),
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<String>(QUEUE);
    std::thread::Builder::new()
        .name("access_log".into())
        .spawn(move || {
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Ok(line) = rx.recv() {
                buf.extend_from_slice(line.as_bytes());
                // Batch whatever else is queued into one write.
                while let Ok(more) = rx.try_recv() {
                    buf.extend_from_slice(more.as_bytes());
                    if buf.len() >= 64 * 1024 {
                        break;
                    }
                }
                let _ = sink.write_all(&buf);
                let _ = sink.flush();
                buf.clear();
            }
        })
        .map_err(|e| format!("cannot start the access log writer: {e}"))?;
    let w = Arc::new(Writer { tx });
    writers.insert(destination, w.clone());
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut req = HeaderMap::new();
        req.insert("user-agent", http::HeaderValue::from_static("curl/8"));
        req.insert("x-request-id", http::HeaderValue::from_static("rid"));
        let mut resp = HeaderMap::new();
        resp.insert("x-envoy-upstream-service-time", http::HeaderValue::from_static("3"));
        Entry {
            start: Some(UNIX_EPOCH + Duration::from_millis(1_795_650_000_123)),
            duration: Duration::from_millis(7),
            downstream_remote: Some("10.0.0.1:5555".parse().unwrap_or_else(|e| panic!("{e}"))),
            upstream_host: Some("10.0.0.2:8080".parse().unwrap_or_else(|e| panic!("{e}"))),
            bytes_received: 10,
            bytes_sent: 20,
            flags: vec![Flag::UpstreamConnectionFailure, Flag::UpstreamRetryLimitExceeded],
            response_code: Some(503),
            protocol: Some("HTTP/1.1"),
            method: Some("GET".into()),
            path: Some("/a".into()),
            authority: Some("svc".into()),
            request_headers: Some(req),
            response_headers: Some(resp),
            filter_chain_name: Some("chain-a".into()),
            ..Entry::default()
        }
    }

    #[test]
    fn envoys_default_format() {
        let f = LogFormat::text(DEFAULT_FORMAT).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            f.render(&entry()),
            "[2026-11-25T23:40:00.123Z] \"GET /a HTTP/1.1\" 503 UF,URX 10 20 7 3 \"-\" \"curl/8\" \"rid\" \"svc\" \
             \"10.0.0.2:8080\"\n"
        );
    }

    #[test]
    fn operators_alternatives_lengths_and_escapes() {
        let f = LogFormat::text(
            "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %REQ(X-MISSING?USER-AGENT):3% %FILTER_CHAIN_NAME% 100%% \
             %START_TIME(%s)% %UPSTREAM_CLUSTER%\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.render(&entry()), "10.0.0.1 cur chain-a 100% 1795650000 -\n");
        assert!(LogFormat::text("%NOT_AN_OPERATOR%").is_err());
        assert!(LogFormat::text("%START_TIME").is_err());
    }

    #[test]
    fn json_format_types_numbers_and_nulls() {
        let template = serde_json::json!({"code": "%RESPONSE_CODE%", "up": "%UPSTREAM_HOST%", "cluster": "%UPSTREAM_CLUSTER%",
            "line": "%REQ(:METHOD)% %REQ(:PATH)%"});
        let serde_json::Value::Object(map) = template else { panic!() };
        let f = LogFormat::json(map).unwrap_or_else(|e| panic!("{e}"));
        let v: serde_json::Value = serde_json::from_str(f.render(&entry()).trim()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v["code"], 503);
        assert_eq!(v["up"], "10.0.0.2:8080");
        assert!(v["cluster"].is_null());
        assert_eq!(v["line"], "GET /a");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
