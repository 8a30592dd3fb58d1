//! `/stats` and `/stats/prometheus` output in Envoy's formats: text (`name: value`), JSON
//! (`{"stats":[{"name":..,"value":..}]}`) and Prometheus (Envoy's default tag extraction, `envoy_` names, one
//! `# TYPE` line per family). Histograms render in all three formats already; the store supplies none yet.

use std::fmt::Write as _;
use std::sync::OnceLock;

use regex::Regex;
use serde_json::{Value as Json, json};

use crate::stats::{Stat, Value};

/// Envoy's default histogram buckets (ms), used when a histogram carries its own counts per bound.
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Envoy's supported quantiles, in percent.
const QUANTILES: &[f64] = &[0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0];

/// A histogram as the admin renders it: cumulative counts per upper bound (values above the last bound count only
/// in `count`).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub name: String,
    /// (upper bound, samples ≤ bound), bounds ascending.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn used(&self) -> bool {
        self.count > 0
    }

    /// A quantile (0..=1) estimated from the buckets by linear interpolation inside the bucket that holds it.
    fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        let target = q * self.count as f64;
        let mut lower = (0.0, 0u64);
        for &(bound, cumulative) in &self.buckets {
            if cumulative as f64 >= target && cumulative > lower.1 {
                let in_bucket = (cumulative - lower.1) as f64;
                let frac = ((target - lower.1 as f64) / in_bucket).clamp(0.0, 1.0);
                return lower.0 + (bound - lower.0) * frac;
            }
            lower = (bound, cumulative);
        }
        // Past the last bound: the last bound is the best we know.
        lower.0
    }
}

/// Everything `/stats` can show.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub stats: Vec<Stat>,
    pub histograms: Vec<Histogram>,
}

/// Envoy's `type` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    All,
    Counters,
    Gauges,
    Histograms,
}

/// What `?usedonly`, `?filter=` and `?type=` select.
#[derive(Debug, Clone)]
pub struct Select {
    pub used_only: bool,
    pub filter: Option<Regex>,
    pub kind: Kind,
}

impl Select {
    fn name_ok(&self, name: &str) -> bool {
        self.filter.as_ref().is_none_or(|r| r.is_match(name))
    }

    fn stat(&self, s: &Stat) -> bool {
        let kind_ok = matches!(
            (self.kind, s.value),
            (Kind::All, _) | (Kind::Counters, Value::Counter(_)) | (Kind::Gauges, Value::Gauge(_))
        );
        kind_ok && (!self.used_only || s.used) && self.name_ok(&s.name)
    }

    fn histogram(&self, h: &Histogram) -> bool {
        matches!(self.kind, Kind::All | Kind::Histograms) && (!self.used_only || h.used()) && self.name_ok(&h.name)
    }
}

fn number(v: Value) -> String {
    match v {
        Value::Counter(c) => c.to_string(),
        Value::Gauge(g) => g.to_string(),
    }
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() { "nan".to_string() } else { format!("{v}") }
}

/// `name: value` lines sorted by name, then histograms with their quantile summary (`P50(interval,cumulative)`;
/// there are no intervals yet, so the interval value is `nan`, as Envoy prints before the first interval).
pub fn text(s: &Snapshot, sel: &Select) -> String {
    let mut out = String::new();
    for st in s.stats.iter().filter(|st| sel.stat(st)) {
        let _ = writeln!(out, "{}: {}", st.name, number(st.value));
    }
    let mut hs: Vec<&Histogram> = s.histograms.iter().filter(|h| sel.histogram(h)).collect();
    hs.sort_by(|a, b| a.name.cmp(&b.name));
    for h in hs {
        if !h.used() {
            let _ = writeln!(out, "{}: No recorded values", h.name);
            continue;
        }
        let summary: Vec<String> =
            QUANTILES.iter().map(|q| format!("P{}(nan,{})", q, fmt_f64(h.quantile(q / 100.0)))).collect();
        let _ = writeln!(out, "{}: {}", h.name, summary.join(" "));
    }
    out
}

/// Envoy's JSON: `{"stats":[{"name":..,"value":..}, …, {"histograms":{"supported_quantiles":[..],
/// "computed_quantiles":[{"name":..,"values":[{"interval":..,"cumulative":..}]}]}}]}`.
pub fn json(s: &Snapshot, sel: &Select) -> Json {
    let mut stats: Vec<Json> = s
        .stats
        .iter()
        .filter(|st| sel.stat(st))
        .map(|st| json!({"name": st.name, "value": number_json(st.value)}))
        .collect();
    let mut hs: Vec<&Histogram> = s.histograms.iter().filter(|h| sel.histogram(h)).collect();
    hs.sort_by(|a, b| a.name.cmp(&b.name));
    if !hs.is_empty() {
        let computed: Vec<Json> = hs
            .iter()
            .map(|h| {
                let values: Vec<Json> = QUANTILES
                    .iter()
                    .map(|q| json!({"interval": Json::Null, "cumulative": finite(h.quantile(q / 100.0))}))
                    .collect();
                json!({"name": h.name, "values": values})
            })
            .collect();
        stats.push(json!({"histograms": {"supported_quantiles": QUANTILES, "computed_quantiles": computed}}));
    }
    json!({ "stats": stats })
}

fn number_json(v: Value) -> Json {
    match v {
        Value::Counter(c) => json!(c),
        Value::Gauge(g) => json!(g),
    }
}

fn finite(v: f64) -> Json {
    if v.is_finite() { json!(v) } else { Json::Null }
}

/// One of Envoy's default tag extractors: the first capture group is cut out of the name, the second (or the first,
/// when there is one) is the tag's value.
struct TagRule {
    name: &'static str,
    regex: Regex,
}

/// Envoy's default tag specifiers (source/common/config/well_known_names.cc) for the stats this proxy has, in
/// Envoy's order. Envoy's `(?=\.)` look-aheads are written as an optional `\.`-led group, which matches the same
/// names without look-around.
fn tag_rules() -> &'static [TagRule] {
    static RULES: OnceLock<Vec<TagRule>> = OnceLock::new();
    RULES.get_or_init(|| {
        [
            ("envoy.response_code", r"_rq(_(\d{3}))$"),
            ("envoy.response_code_class", r"_rq_(\d)xx$"),
            ("envoy.http_user_agent", r"^http(?:\..*?)?\.user_agent\.((.*?)\.)\w+?$"),
            ("envoy.virtual_cluster", r"^vhost(?:\..*?)?\.vcluster\.((.*?)\.)\w+?$"),
            ("envoy.ssl_cipher", r"^listener(?:\..*?)?\.ssl\.cipher(\.(.*?))$"),
            ("cipher_suite", r"^cluster(?:\..*?)?\.ssl\.ciphers(\.(.*?))$"),
            ("envoy.tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
            ("envoy.cluster_name", r"^cluster\.(([^\.]+)\.).*"),
            ("envoy.http_conn_manager_prefix", r"^listener(?:\..*?)?\.http\.((.*?)\.)"),
            ("envoy.http_conn_manager_prefix", r"^http\.((.*?)\.)"),
            ("envoy.listener_address", r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"),
            ("envoy.virtual_host", r"^vhost\.((.*?)\.)"),
            ("envoy.rds_route_config", r"^http(?:\..*?)?\.rds\.((.*?)\.)\w+?$"),
            ("envoy.worker_id", r"^listener_manager\.((worker_\d+)\.)"),
        ]
        .into_iter()
        .filter_map(|(name, re)| Regex::new(re).ok().map(|regex| TagRule { name, regex }))
        .collect()
    })
}

/// A stat name split into Envoy's tag-extracted name and its tags, in extraction order.
pub fn extract_tags(name: &str) -> (String, Vec<(&'static str, String)>) {
    let mut cut: Vec<(usize, usize)> = Vec::new();
    let mut tags = Vec::new();
    for rule in tag_rules() {
        if tags.iter().any(|(n, _)| *n == rule.name) {
            continue;
        }
        let Some(caps) = rule.regex.captures(name) else { continue };
        let Some(remove) = caps.get(1) else { continue };
        let value = caps.get(2).unwrap_or(remove);
        // Overlapping cuts would be two tags claiming the same text: the first one wins.
        if cut.iter().any(|&(s, e)| remove.start() < e && s < remove.end()) {
            continue;
        }
        cut.push((remove.start(), remove.end()));
        tags.push((rule.name, value.as_str().to_string()));
    }
    cut.sort_unstable();
    let mut extracted = String::with_capacity(name.len());
    let mut at = 0;
    for (s, e) in cut {
        extracted.push_str(&name[at..s]);
        at = e;
    }
    extracted.push_str(&name[at..]);
    (extracted, tags)
}

/// Prometheus metric names allow `[a-zA-Z0-9_]` only (Envoy's `sanitizeName`).
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(tags: &[(&'static str, String)]) -> String {
    tags.iter().map(|(k, v)| format!("{}=\"{}\"", sanitize(k), escape_label(v))).collect::<Vec<_>>().join(",")
}

/// `{labels}`, or nothing for a metric without tags: Envoy prints `{}` there, which Prometheus reads the same way
/// as no braces, but stricter parsers refuse.
fn braces(labels: &str) -> String {
    if labels.is_empty() { String::new() } else { format!("{{{labels}}}") }
}

/// Envoy's Prometheus exposition: counters, then gauges, then histograms; within each, families sorted by their
/// tag-extracted name, each with one `# TYPE` line and a blank line after it.
pub fn prometheus(s: &Snapshot, sel: &Select) -> String {
    use std::collections::BTreeMap;
    let mut out = String::new();
    for (kind, wanted) in [("counter", Kind::Counters), ("gauge", Kind::Gauges)] {
        let mut families: BTreeMap<String, Vec<(String, String, Value)>> = BTreeMap::new();
        for st in s.stats.iter().filter(|st| sel.stat(st)) {
            let is_kind =
                matches!((wanted, st.value), (Kind::Counters, Value::Counter(_)) | (Kind::Gauges, Value::Gauge(_)));
            if !is_kind {
                continue;
            }
            let (extracted, tags) = extract_tags(&st.name);
            families.entry(extracted).or_default().push((st.name.clone(), labels(&tags), st.value));
        }
        for (family, mut members) in families {
            let metric = format!("envoy_{}", sanitize(&family));
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            members.sort_by(|a, b| a.0.cmp(&b.0));
            for (_, labels, value) in members {
                let _ = writeln!(out, "{metric}{} {}", braces(&labels), number(value));
            }
            out.push('\n');
        }
    }
    let mut families: BTreeMap<String, Vec<(&Histogram, String)>> = BTreeMap::new();
    for h in s.histograms.iter().filter(|h| sel.histogram(h)) {
        let (extracted, tags) = extract_tags(&h.name);
        families.entry(extracted).or_default().push((h, labels(&tags)));
    }
    for (family, mut members) in families {
        let metric = format!("envoy_{}", sanitize(&family));
        let _ = writeln!(out, "# TYPE {metric} histogram");
        members.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        for (h, labels) in members {
            let sep = if labels.is_empty() { "" } else { "," };
            for (bound, cumulative) in &h.buckets {
                let _ = writeln!(out, "{metric}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{metric}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{metric}_sum{} {}", braces(&labels), h.sum);
            let _ = writeln!(out, "{metric}_count{} {}", braces(&labels), h.count);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(name: &str, value: Value, used: bool) -> Stat {
        Stat { name: name.to_string(), value, used }
    }

    fn all() -> Select {
        Select { used_only: false, filter: None, kind: Kind::All }
    }

    #[test]
    fn envoy_default_tags() {
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
        let cases: &[Case<'_>] = &[
            (
                "cluster.backend.upstream_rq_200",
                "cluster.upstream_rq",
                &[("envoy.response_code", "200"), ("envoy.cluster_name", "backend")],
            ),
            (
                "cluster.backend.upstream_rq_2xx",
                "cluster.upstream_rq_xx",
                &[("envoy.response_code_class", "2"), ("envoy.cluster_name", "backend")],
            ),
            (
                "listener.127.0.0.1_15006.downstream_cx_total",
                "listener.downstream_cx_total",
                &[("envoy.listener_address", "127.0.0.1_15006")],
            ),
            (
                "listener.[__1]_80.downstream_cx_total",
                "listener.downstream_cx_total",
                &[("envoy.listener_address", "[__1]_80")],
            ),
            ("listener.virtualInbound.downstream_cx_total", "listener.virtualInbound.downstream_cx_total", &[]),
            (
                "tcp.inbound_8080.downstream_cx_total",
                "tcp.downstream_cx_total",
                &[("envoy.tcp_prefix", "inbound_8080")],
            ),
            (
                "http.ingress_http.downstream_rq_total",
                "http.downstream_rq_total",
                &[("envoy.http_conn_manager_prefix", "ingress_http")],
            ),
            (
                "http.ingress.rds.my_routes.config_reload",
                "http.rds.config_reload",
                &[("envoy.http_conn_manager_prefix", "ingress"), ("envoy.rds_route_config", "my_routes")],
            ),
            ("server.state", "server.state", &[]),
        ];
        for (name, extracted, tags) in cases {
            let (e, t) = extract_tags(name);
            let t: Vec<(&str, &str)> = t.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!((e.as_str(), t.as_slice()), (*extracted, *tags), "{name}");
        }
    }

    #[test]
    fn text_and_json_select_used_and_filtered() {
        let s = Snapshot {
            stats: vec![
                stat("listener_manager.workers_started", Value::Gauge(1), true),
                stat("server.state", Value::Gauge(0), true),
                stat("server.unused", Value::Counter(0), false),
            ],
            histograms: vec![],
        };
        let sel = Select {
            used_only: true,
            filter: Regex::new(r"^(server\.state|listener_manager\.workers_started)").ok(),
            kind: Kind::All,
        };
        assert_eq!(text(&s, &sel), "listener_manager.workers_started: 1\nserver.state: 0\n");
        assert_eq!(
            json(&s, &sel),
            json!({"stats": [{"name": "listener_manager.workers_started", "value": 1}, {"name": "server.state", "value": 0}]})
        );
    }

    #[test]
    fn histograms_in_all_formats() {
        let h = Histogram {
            name: "cluster.b.upstream_rq_time".into(),
            buckets: vec![(1.0, 0), (10.0, 4), (100.0, 4)],
            sum: 20.0,
            count: 4,
        };
        let unused = Histogram { name: "cluster.b.upstream_cx_length_ms".into(), buckets: vec![], sum: 0.0, count: 0 };
        let s = Snapshot { stats: vec![], histograms: vec![h, unused] };
        let t = text(&s, &all());
        assert!(t.starts_with("cluster.b.upstream_cx_length_ms: No recorded values\n"), "{t}");
        assert!(t.contains("cluster.b.upstream_rq_time: P0(nan,1) P25(nan,3.25) P50(nan,5.5)"), "{t}");
        let p = prometheus(&s, &all());
        assert!(p.contains("# TYPE envoy_cluster_upstream_rq_time histogram\n"), "{p}");
        assert!(p.contains("envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"b\",le=\"10\"} 4\n"), "{p}");
        assert!(p.contains("envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"b\",le=\"+Inf\"} 4\n"), "{p}");
        assert!(p.contains("envoy_cluster_upstream_rq_time_sum{envoy_cluster_name=\"b\"} 20\n"), "{p}");
        let j = json(&s, &all());
        assert_eq!(j["stats"][0]["histograms"]["computed_quantiles"][1]["name"], "cluster.b.upstream_rq_time");
    }

    #[test]
    fn prometheus_groups_by_family() {
        let s = Snapshot {
            stats: vec![
                stat("cluster.a.upstream_cx_total", Value::Counter(3), true),
                stat("cluster.b.upstream_cx_total", Value::Counter(5), true),
                stat("server.state", Value::Gauge(0), true),
            ],
            histograms: vec![],
        };
        assert_eq!(
            prometheus(&s, &all()),
            "# TYPE envoy_cluster_upstream_cx_total counter\n\
             envoy_cluster_upstream_cx_total{envoy_cluster_name=\"a\"} 3\n\
             envoy_cluster_upstream_cx_total{envoy_cluster_name=\"b\"} 5\n\n\
             # TYPE envoy_server_state gauge\n\
             envoy_server_state 0\n\n"
        );
    }
}
