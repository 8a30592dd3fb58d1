//! Counters and gauges with Envoy's names (`listener.<addr>.downstream_cx_total`, `cluster.<name>.upstream_cx_*`,
//! `listener_manager.*`). Registration takes a lock on the control path; the connection path only touches the
//! atomics it was handed, so no lock is ever taken per connection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn value(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
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
    Counter(Counter),
    Gauge(Gauge),
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

impl Store {
    pub fn counter(&self, name: &str) -> Counter {
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(name) {
            Some(Metric::Counter(c)) => c.clone(),
            // A name used as both kinds is a programming error; a fresh unregistered counter keeps it harmless.
            Some(Metric::Gauge(_)) => Counter::default(),
            None => {
                let c = Counter::default();
                m.insert(name.to_string(), Metric::Counter(c.clone()));
                c
            }
        }
    }

    /// Registers a counter that lives outside any store (a process-wide one) under `name`.
    pub fn register_counter(&self, name: &str, counter: &Counter) {
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(name.to_string(), Metric::Counter(counter.clone()));
    }

    pub fn gauge(&self, name: &str) -> Gauge {
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(name) {
            Some(Metric::Gauge(g)) => g.clone(),
            Some(Metric::Counter(_)) => Gauge::default(),
            None => {
                let g = Gauge::default();
                m.insert(name.to_string(), Metric::Gauge(g.clone()));
                g
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        let m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.get(name).map(|metric| match metric {
            Metric::Counter(c) => Value::Counter(c.value()),
            Metric::Gauge(g) => Value::Gauge(g.value()),
        })
    }

    /// Every metric, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, Value)> {
        let m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .map(|(k, metric)| {
                let v = match metric {
                    Metric::Counter(c) => Value::Counter(c.value()),
                    Metric::Gauge(g) => Value::Gauge(g.value()),
                };
                (k.clone(), v)
            })
            .collect()
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
}
