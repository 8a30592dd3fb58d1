//! `/stats` and `/stats/prometheus` output in Envoy's formats: text (`name: value`, histograms as quantile
//! summaries), JSON (`{"stats":[{"name":..,"value":..}]}`) and Prometheus (Envoy's default tag extraction, `envoy_`
//! names, one `# TYPE` line per family, histograms with cumulative buckets).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::OnceLock;

use regex::Regex;
use serde_json::{Value as Json, json};

use crate::stats::{HistogramValue, Stat, Value};

/// Envoy's supported quantiles, in percent.
const QUANTILES: &[f64] = &[0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0];

/// A quantile (0..=1) estimated from cumulative buckets by linear interpolation inside the bucket that holds it.
fn quantile(h: &HistogramValue, q: f64) -> f64 {
    if h.count == 0 {
        return f64::NAN;
    }
    let target = q * h.count as f64;
    let mut lower = (0.0, 0u64);
    for &(bound, cumulative) in &h.buckets {
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
    fn keeps(&self, s: &Stat) -> bool {
        let kind_ok = matches!(
            (self.kind, &s.value),
            (Kind::All, _)
                | (Kind::Counters, Value::Counter(_))
                | (Kind::Gauges, Value::Gauge(_))
                | (Kind::Histograms, Value::Histogram(_))
        );
        kind_ok && (!self.used_only || s.used) && self.filter.as_ref().is_none_or(|r| r.is_match(&s.name))
    }
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() { "nan".to_string() } else { format!("{v}") }
}

/// Envoy's text: counters and gauges as `name: value` sorted by name, then histograms with their quantile summary
/// (`P50(interval,cumulative)`; there are no intervals, so the interval value is `nan`, as Envoy prints before its
/// first interval) or `No recorded values`.
pub fn text(stats: &[Stat], sel: &Select) -> String {
    let mut out = String::new();
    let mut histograms = Vec::new();
    for st in stats.iter().filter(|st| sel.keeps(st)) {
        match &st.value {
            Value::Counter(c) => {
                let _ = writeln!(out, "{}: {c}", st.name);
            }
            Value::Gauge(g) => {
                let _ = writeln!(out, "{}: {g}", st.name);
            }
            Value::Histogram(h) => histograms.push((&st.name, h)),
        }
    }
    for (name, h) in histograms {
        if h.count == 0 {
            let _ = writeln!(out, "{name}: No recorded values");
            continue;
        }
        let summary: Vec<String> =
            QUANTILES.iter().map(|q| format!("P{q}(nan,{})", fmt_f64(quantile(h, q / 100.0)))).collect();
        let _ = writeln!(out, "{name}: {}", summary.join(" "));
    }
    out
}

/// Envoy's JSON: `{"stats":[{"name":..,"value":..}, …, {"histograms":{"supported_quantiles":[..],
/// "computed_quantiles":[{"name":..,"values":[{"interval":..,"cumulative":..}]}]}}]}`.
pub fn json(stats: &[Stat], sel: &Select) -> Json {
    let mut out = Vec::new();
    let mut computed = Vec::new();
    for st in stats.iter().filter(|st| sel.keeps(st)) {
        match &st.value {
            Value::Counter(c) => out.push(json!({"name": st.name, "value": c})),
            Value::Gauge(g) => out.push(json!({"name": st.name, "value": g})),
            Value::Histogram(h) => {
                let values: Vec<Json> = QUANTILES
                    .iter()
                    .map(|q| json!({"interval": Json::Null, "cumulative": finite(quantile(h, q / 100.0))}))
                    .collect();
                computed.push(json!({"name": st.name, "values": values}));
            }
        }
    }
    if !computed.is_empty() {
        out.push(json!({"histograms": {"supported_quantiles": QUANTILES, "computed_quantiles": computed}}));
    }
    json!({ "stats": out })
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
pub fn prometheus(stats: &[Stat], sel: &Select) -> String {
    let mut out = String::new();
    for kind in ["counter", "gauge", "histogram"] {
        let mut families: BTreeMap<String, Vec<(&str, String, &Value)>> = BTreeMap::new();
        for st in stats.iter().filter(|st| sel.keeps(st)) {
            let this = match st.value {
                Value::Counter(_) => "counter",
                Value::Gauge(_) => "gauge",
                Value::Histogram(_) => "histogram",
            };
            if this != kind {
                continue;
            }
            let (extracted, tags) = extract_tags(&st.name);
            families.entry(extracted).or_default().push((&st.name, labels(&tags), &st.value));
        }
        for (family, mut members) in families {
            let metric = format!("envoy_{}", sanitize(&family));
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            members.sort_by(|a, b| a.0.cmp(b.0));
            for (_, labels, value) in members {
                match value {
                    Value::Counter(c) => {
                        let _ = writeln!(out, "{metric}{} {c}", braces(&labels));
                    }
                    Value::Gauge(g) => {
                        let _ = writeln!(out, "{metric}{} {g}", braces(&labels));
                    }
                    Value::Histogram(h) => {
                        let sep = if labels.is_empty() { "" } else { "," };
                        for (bound, cumulative) in &h.buckets {
                            let _ = writeln!(out, "{metric}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
                        }
                        let _ = writeln!(out, "{metric}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
                        let _ = writeln!(out, "{metric}_sum{} {}", braces(&labels), h.sum);
                        let _ = writeln!(out, "{metric}_count{} {}", braces(&labels), h.count);
                    }
                }
            }
            out.push('\n');
        }
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
        let s = vec![
            stat("listener_manager.workers_started", Value::Gauge(1), true),
            stat("server.state", Value::Gauge(0), true),
            stat("server.unused", Value::Counter(0), false),
        ];
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
        let h = HistogramValue { buckets: vec![(1.0, 0), (10.0, 4), (100.0, 4)], sum: 20.0, count: 4 };
        let unused = HistogramValue { buckets: vec![(1.0, 0)], sum: 0.0, count: 0 };
        let s = vec![
            stat("cluster.b.upstream_cx_length_ms", Value::Histogram(unused), false),
            stat("cluster.b.upstream_rq_time", Value::Histogram(h), true),
            stat("server.state", Value::Gauge(0), true),
        ];
        let t = text(&s, &all());
        assert!(t.starts_with("server.state: 0\ncluster.b.upstream_cx_length_ms: No recorded values\n"), "{t}");
        assert!(t.contains("cluster.b.upstream_rq_time: P0(nan,1) P25(nan,3.25) P50(nan,5.5)"), "{t}");
        let p = prometheus(&s, &all());
        assert!(p.contains("# TYPE envoy_cluster_upstream_rq_time histogram\n"), "{p}");
        assert!(p.contains("envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"b\",le=\"10\"} 4\n"), "{p}");
        assert!(p.contains("envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"b\",le=\"+Inf\"} 4\n"), "{p}");
        assert!(p.contains("envoy_cluster_upstream_rq_time_sum{envoy_cluster_name=\"b\"} 20\n"), "{p}");
        assert!(p.find("# TYPE envoy_server_state gauge") < p.find("histogram"), "gauges before histograms");
        let j = json(&s, &all());
        assert_eq!(j["stats"][1]["histograms"]["computed_quantiles"][1]["name"], "cluster.b.upstream_rq_time");
        let only = Select { used_only: false, filter: None, kind: Kind::Histograms };
        assert!(!text(&s, &only).contains("server.state"));
    }

    #[test]
    fn prometheus_groups_by_family() {
        let s = vec![
            stat("cluster.a.upstream_cx_total", Value::Counter(3), true),
            stat("cluster.b.upstream_cx_total", Value::Counter(5), true),
            stat("server.state", Value::Gauge(0), true),
        ];
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
