//! Counters and gauges with Envoy's names (`listener.<addr>.downstream_cx_total`, `cluster.<name>.upstream_cx_*`,
//! `listener_manager.*`). Registration takes a lock on the control path; the connection path only touches the
//! atomics it was handed, so no lock is ever taken per connection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn value(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Gauge(Arc<GaugeCell>);

#[derive(Debug, Default)]
struct GaugeCell {
    value: AtomicI64,
    /// Written at least once: `/stats?usedonly` shows a gauge set to 0 (`server.state: 0` is what Istio's readiness
    /// probe waits for), so "used" cannot be read off the value as it is for counters.
    used: AtomicBool,
}

impl Gauge {
    pub fn inc(&self) {
        self.0.value.fetch_add(1, Ordering::Relaxed);
        self.mark_used();
    }
    pub fn dec(&self) {
        self.0.value.fetch_sub(1, Ordering::Relaxed);
        self.mark_used();
    }
    pub fn set(&self, v: i64) {
        self.0.value.store(v, Ordering::Relaxed);
        self.mark_used();
    }
    pub fn value(&self) -> i64 {
        self.0.value.load(Ordering::Relaxed)
    }
    pub fn used(&self) -> bool {
        self.0.used.load(Ordering::Relaxed)
    }
    fn mark_used(&self) {
        // A load first: after the first write the flag's cache line is only ever read, never contended.
        if !self.0.used.load(Ordering::Relaxed) {
            self.0.used.store(true, Ordering::Relaxed);
        }
    }
}

/// A gauge held up for as long as the guard lives (active connections).
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(g: &Gauge) -> Self {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug, Clone)]
enum Metric {
    /// `reset_at` is the raw value at the last `/reset_counters`: reported values start from there, so a reset never
    /// writes to an atomic the connection path increments.
    Counter {
        counter: Counter,
        reset_at: u64,
    },
    Gauge(Gauge),
}

impl Metric {
    fn stat(&self) -> (Value, bool) {
        match self {
            Metric::Counter { counter, reset_at } => {
                let raw = counter.value();
                (Value::Counter(raw.saturating_sub(*reset_at)), raw > 0)
            }
            Metric::Gauge(g) => (Value::Gauge(g.value()), g.used()),
        }
    }
}

/// The process's stats. Asking twice for the same name returns the same metric, so a listener that is replaced
/// by an update keeps counting where the old one left off, as in Envoy.
#[derive(Debug, Clone, Default)]
pub struct Store {
    metrics: Arc<Mutex<BTreeMap<String, Metric>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    Counter(u64),
    Gauge(i64),
}

/// One metric as the admin endpoints show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub name: String,
    pub value: Value,
    /// Envoy's "used": a counter that was ever incremented, a gauge that was ever written (`?usedonly`).
    pub used: bool,
}

impl Store {
    pub fn counter(&self, name: &str) -> Counter {
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(name) {
            Some(Metric::Counter { counter, .. }) => counter.clone(),
            // A name used as both kinds is a programming error; a fresh unregistered counter keeps it harmless.
            Some(Metric::Gauge(_)) => Counter::default(),
            None => {
                let c = Counter::default();
                m.insert(name.to_string(), Metric::Counter { counter: c.clone(), reset_at: 0 });
                c
            }
        }
    }

    pub fn gauge(&self, name: &str) -> Gauge {
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(name) {
            Some(Metric::Gauge(g)) => g.clone(),
            Some(Metric::Counter { .. }) => Gauge::default(),
            None => {
                let g = Gauge::default();
                m.insert(name.to_string(), Metric::Gauge(g.clone()));
                g
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        let m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.get(name).map(|metric| metric.stat().0)
    }

    /// Every metric, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, Value)> {
        self.stats().into_iter().map(|s| (s.name, s.value)).collect()
    }

    /// Every metric with its "used" flag, sorted by name.
    pub fn stats(&self) -> Vec<Stat> {
        let m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .map(|(name, metric)| {
                let (value, used) = metric.stat();
                Stat { name: name.clone(), value, used }
            })
            .collect()
    }

    /// Envoy's `/reset_counters`: every counter reads 0 from now on (and stays "used" if it was).
    pub fn reset_counters(&self) {
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        for metric in m.values_mut() {
            if let Metric::Counter { counter, reset_at } = metric {
                *reset_at = counter.value();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_metric() {
        let s = Store::default();
        s.counter("listener.a.downstream_cx_total").inc();
        s.counter("listener.a.downstream_cx_total").add(2);
        assert_eq!(s.get("listener.a.downstream_cx_total"), Some(Value::Counter(3)));
        let g = s.gauge("listener.a.downstream_cx_active");
        {
            let _held = GaugeGuard::new(&g);
            assert_eq!(s.get("listener.a.downstream_cx_active"), Some(Value::Gauge(1)));
        }
        assert_eq!(s.get("listener.a.downstream_cx_active"), Some(Value::Gauge(0)));
    }

    #[test]
    fn used_and_reset() {
        let s = Store::default();
        s.counter("never");
        s.counter("once").inc();
        s.gauge("untouched");
        s.gauge("set_to_zero").set(0);
        let used: Vec<(String, bool)> = s.stats().into_iter().map(|st| (st.name, st.used)).collect();
        assert_eq!(
            used,
            [("never", false), ("once", true), ("set_to_zero", true), ("untouched", false)]
                .map(|(n, u)| (n.to_string(), u))
        );
        s.reset_counters();
        assert_eq!(s.get("once"), Some(Value::Counter(0)));
        s.counter("once").add(2);
        assert_eq!(s.get("once"), Some(Value::Counter(2)));
        assert!(s.stats().iter().any(|st| st.name == "once" && st.used));
    }
}
