//! Counters, gauges and histograms with Envoy's names (`listener.<addr>.downstream_cx_total`,
//! `cluster.<name>.upstream_rq_time`, `listener_manager.*`), cheap on the connection path.
//!
//! Every metric has one slot per shard: shard 0 for the main thread, one per worker. A worker only writes its own
//! shard, which lives in that shard's own slab of memory, so two workers never contend for a cache line; a read sums
//! the shards. Registration takes a lock on the control path; the connection path only touches the slots it was
//! handed.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Slots per slab chunk; chunks never move once allocated, so a slot's address is stable.
const CHUNK: usize = 1024;
/// Chunks per shard: room for 4 million slots.
const CHUNKS: usize = 4096;
/// Shards a store can have: the main thread and up to this many minus one workers (more workers share shard 0).
const MAX_SHARDS: usize = 65;

/// Envoy's default histogram bucket bounds (milliseconds for time histograms).
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes the current thread write to `shard` (a worker passes its index + 1).
pub fn set_thread_shard(shard: usize) {
    SHARD.with(|s| s.set(if shard < MAX_SHARDS { shard } else { 0 }));
}

/// One shard's slots.
struct Slab {
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl Slab {
    fn new() -> Self {
        Slab { chunks: (0..CHUNKS).map(|_| OnceLock::new()).collect() }
    }

    fn slot(&self, idx: usize) -> Option<&AtomicU64> {
        let chunk = self.chunks.get(idx / CHUNK)?.get_or_init(|| (0..CHUNK).map(|_| AtomicU64::new(0)).collect());
        chunk.get(idx % CHUNK)
    }
}

struct Slabs {
    shards: Box<[OnceLock<Slab>]>,
    next: Mutex<usize>,
    /// Slots that count as "used" (`/stats?usedonly`) whatever their value: gauges written with `set` (Istio's
    /// readiness probe waits for `server.state: 0`), and counters that had counted before a `/reset_counters`.
    /// Only the control path writes here.
    marked: Mutex<std::collections::HashSet<usize>>,
}

impl std::fmt::Debug for Slabs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slabs").finish_non_exhaustive()
    }
}

impl Slabs {
    fn new() -> Self {
        Slabs {
            shards: (0..MAX_SHARDS).map(|_| OnceLock::new()).collect(),
            next: Mutex::new(0),
            marked: Mutex::default(),
        }
    }

    fn mark(&self, idx: usize) {
        self.marked.lock().unwrap_or_else(|p| p.into_inner()).insert(idx);
    }

    fn marked(&self, idx: usize) -> bool {
        self.marked.lock().unwrap_or_else(|p| p.into_inner()).contains(&idx)
    }

    fn allocate(&self, n: usize) -> usize {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let idx = *next;
        *next += n;
        idx
    }

    /// The calling thread's slot for `idx`.
    fn mine(&self, idx: usize) -> Option<&AtomicU64> {
        let shard = SHARD.with(Cell::get);
        self.shards.get(shard)?.get_or_init(Slab::new).slot(idx)
    }

    fn sum(&self, idx: usize) -> u64 {
        self.shards
            .iter()
            .filter_map(|s| s.get())
            .filter_map(|s| s.slot(idx))
            .map(|a| a.load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }

    fn reset(&self, idx: usize) {
        for s in self.shards.iter().filter_map(|s| s.get()) {
            if let Some(a) = s.slot(idx) {
                a.store(0, Ordering::Relaxed);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Cells {
    /// Not registered anywhere (a default counter, a process-wide one registered later by name).
    Own(Arc<AtomicU64>),
    Sharded(Arc<Slabs>, usize),
}

impl Default for Cells {
    fn default() -> Self {
        Cells::Own(Arc::new(AtomicU64::new(0)))
    }
}

impl Cells {
    fn add(&self, n: u64) {
        match self {
            Cells::Own(a) => {
                a.fetch_add(n, Ordering::Relaxed);
            }
            Cells::Sharded(slabs, idx) => {
                if let Some(a) = slabs.mine(*idx) {
                    a.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }

    fn sum(&self) -> u64 {
        match self {
            Cells::Own(a) => a.load(Ordering::Relaxed),
            Cells::Sharded(slabs, idx) => slabs.sum(*idx),
        }
    }

    fn reset(&self) {
        match self {
            Cells::Own(a) => a.store(0, Ordering::Relaxed),
            Cells::Sharded(slabs, idx) => slabs.reset(*idx),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Counter(Cells);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.add(n);
    }
    pub fn value(&self) -> u64 {
        self.0.sum()
    }
}

/// A gauge: increments and decrements land in the writer's shard (they sum across shards); `set` is for the control
/// path, which owns the gauges it sets.
#[derive(Debug, Clone)]
pub struct Gauge(GaugeCells);

#[derive(Debug, Clone)]
enum GaugeCells {
    Own(Arc<AtomicI64>),
    Sharded(Arc<Slabs>, usize),
}

impl Default for Gauge {
    fn default() -> Self {
        Gauge(GaugeCells::Own(Arc::new(AtomicI64::new(0))))
    }
}

impl Gauge {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn dec(&self) {
        self.add(-1);
    }
    fn add(&self, n: i64) {
        match &self.0 {
            GaugeCells::Own(a) => {
                a.fetch_add(n, Ordering::Relaxed);
            }
            GaugeCells::Sharded(slabs, idx) => {
                if let Some(a) = slabs.mine(*idx) {
                    // Two's complement: shards hold wrapping sums whose total is the gauge.
                    a.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    }
    pub fn set(&self, v: i64) {
        let current = self.value();
        self.add(v.wrapping_sub(current));
        if let GaugeCells::Sharded(slabs, idx) = &self.0 {
            slabs.mark(*idx);
        }
    }
    pub fn value(&self) -> i64 {
        match &self.0 {
            GaugeCells::Own(a) => a.load(Ordering::Relaxed),
            GaugeCells::Sharded(slabs, idx) => slabs.sum(*idx) as i64,
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

/// A histogram with fixed bucket bounds: one sharded count per bucket (values ≤ the bound) plus overflow, the sample
/// count and the sum (in thousandths, so sub-unit values keep some precision).
#[derive(Debug, Clone)]
pub struct Histogram {
    slabs: Arc<Slabs>,
    base: usize,
    bounds: &'static [f64],
}

/// A histogram's totals at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramValue {
    /// `(upper bound, samples ≤ bound)`, cumulative as Prometheus wants them.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn record(&self, value: f64) {
        let bucket = self.bounds.iter().position(|b| value <= *b).unwrap_or(self.bounds.len());
        let n = self.bounds.len();
        for (idx, add) in
            [(self.base + bucket, 1), (self.base + n + 1, 1), (self.base + n + 2, (value * 1000.0) as u64)]
        {
            if let Some(a) = self.slabs.mine(idx) {
                a.fetch_add(add, Ordering::Relaxed);
            }
        }
    }

    pub fn value(&self) -> HistogramValue {
        let n = self.bounds.len();
        let mut cumulative = 0;
        let buckets = self
            .bounds
            .iter()
            .enumerate()
            .map(|(i, b)| {
                cumulative += self.slabs.sum(self.base + i);
                (*b, cumulative)
            })
            .collect();
        HistogramValue {
            buckets,
            count: self.slabs.sum(self.base + n + 1),
            sum: self.slabs.sum(self.base + n + 2) as f64 / 1000.0,
        }
    }

    fn reset(&self) {
        for i in 0..self.bounds.len() + 3 {
            self.slabs.reset(self.base + i);
        }
    }
}

#[derive(Debug, Clone)]
enum Metric {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

/// The process's stats. Asking twice for the same name returns the same metric, so a listener that is replaced
/// by an update keeps counting where the old one left off, as in Envoy.
#[derive(Debug, Clone)]
pub struct Store {
    metrics: Arc<Mutex<BTreeMap<String, Metric>>>,
    slabs: Arc<Slabs>,
}

impl Default for Store {
    fn default() -> Self {
        Store { metrics: Arc::default(), slabs: Arc::new(Slabs::new()) }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Counter(u64),
    Gauge(i64),
    Histogram(HistogramValue),
}

/// One metric as the admin endpoints show it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stat {
    pub name: String,
    pub value: Value,
    /// Envoy's "used": a counter or histogram that ever counted, a gauge that was ever written (`?usedonly`).
    pub used: bool,
}

impl Store {
    pub fn counter(&self, name: &str) -> Counter {
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(name) {
            Some(Metric::Counter(c)) => c.clone(),
            // A name used as two kinds is a programming error; a fresh unregistered metric keeps it harmless.
            Some(_) => Counter::default(),
            None => {
                let c = Counter(Cells::Sharded(self.slabs.clone(), self.slabs.allocate(1)));
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
            Some(_) => Gauge::default(),
            None => {
                let g = Gauge(GaugeCells::Sharded(self.slabs.clone(), self.slabs.allocate(1)));
                m.insert(name.to_string(), Metric::Gauge(g.clone()));
                g
            }
        }
    }

    /// A histogram with Envoy's default buckets.
    pub fn histogram(&self, name: &str) -> Histogram {
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(name) {
            Some(Metric::Histogram(h)) => h.clone(),
            existing => {
                let bounds = DEFAULT_BUCKETS;
                let h = Histogram { slabs: self.slabs.clone(), base: self.slabs.allocate(bounds.len() + 3), bounds };
                if existing.is_none() {
                    m.insert(name.to_string(), Metric::Histogram(h.clone()));
                }
                h
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        let m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.get(name).map(value)
    }

    /// Every metric, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, Value)> {
        let m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, metric)| (k.clone(), value(metric))).collect()
    }

    /// Every metric with its "used" flag, sorted by name.
    pub fn stats(&self) -> Vec<Stat> {
        let m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .map(|(name, metric)| {
                let value = value(metric);
                let nonzero = match &value {
                    Value::Counter(c) => *c > 0,
                    Value::Gauge(g) => *g != 0,
                    Value::Histogram(h) => h.count > 0,
                };
                let used = nonzero || self.slot_of(metric).is_some_and(|idx| self.slabs.marked(idx));
                Stat { name: name.clone(), value, used }
            })
            .collect()
    }

    /// The slot that stands for a metric in [`Slabs::marked`], if it lives in this store's slabs.
    fn slot_of(&self, metric: &Metric) -> Option<usize> {
        match metric {
            Metric::Counter(Counter(Cells::Sharded(_, idx))) => Some(*idx),
            Metric::Gauge(Gauge(GaugeCells::Sharded(_, idx))) => Some(*idx),
            Metric::Histogram(h) => Some(h.base),
            _ => None,
        }
    }

    /// Zeroes every counter (Envoy's /reset_counters); gauges keep their values. What had counted stays "used".
    pub fn reset_counters(&self) {
        let m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        for metric in m.values() {
            let counted = match metric {
                Metric::Counter(c) => c.value() > 0,
                Metric::Histogram(h) => h.value().count > 0,
                Metric::Gauge(_) => false,
            };
            if counted && let Some(idx) = self.slot_of(metric) {
                self.slabs.mark(idx);
            }
            match metric {
                Metric::Counter(c) => c.0.reset(),
                Metric::Histogram(h) => h.reset(),
                Metric::Gauge(_) => {}
            }
        }
    }
}

fn value(metric: &Metric) -> Value {
    match metric {
        Metric::Counter(c) => Value::Counter(c.value()),
        Metric::Gauge(g) => Value::Gauge(g.value()),
        Metric::Histogram(h) => Value::Histogram(h.value()),
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
    fn shards_sum_across_threads_and_gauges_balance() {
        let s = Store::default();
        let c = s.counter("c");
        let g = s.gauge("g");
        let threads: Vec<_> = (1..=4)
            .map(|shard| {
                let (c, g) = (c.clone(), g.clone());
                std::thread::spawn(move || {
                    set_thread_shard(shard);
                    for _ in 0..1000 {
                        c.inc();
                        g.inc();
                    }
                    // A gauge raised on one worker and lowered on another still sums right.
                    g.dec();
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        g.set(10);
        assert_eq!(c.value(), 4000);
        assert_eq!(g.value(), 10);
        s.reset_counters();
        assert_eq!(c.value(), 0);
        assert_eq!(g.value(), 10, "reset_counters leaves gauges alone");
    }

    #[test]
    fn used_survives_reset_and_gauges_set_to_zero() {
        let s = Store::default();
        s.counter("never");
        s.counter("once").inc();
        s.gauge("untouched");
        s.gauge("set_to_zero").set(0);
        let used = |s: &Store| s.stats().into_iter().map(|st| (st.name, st.used)).collect::<Vec<_>>();
        let expect = [("never", false), ("once", true), ("set_to_zero", true), ("untouched", false)];
        assert_eq!(used(&s), expect.map(|(n, u)| (n.to_string(), u)));
        s.reset_counters();
        assert_eq!(s.get("once"), Some(Value::Counter(0)));
        assert_eq!(used(&s), expect.map(|(n, u)| (n.to_string(), u)), "a reset counter stays used");
    }

    #[test]
    fn histograms_count_cumulative_buckets() {
        let s = Store::default();
        let h = s.histogram("cluster.c.upstream_rq_time");
        for v in [0.2, 3.0, 3.0, 70.0, 9_999_999.0] {
            h.record(v);
        }
        let v = h.value();
        assert_eq!(v.count, 5);
        assert!((v.sum - 10_000_075.2).abs() < 0.01, "{}", v.sum);
        let at = |bound: f64| v.buckets.iter().find(|(b, _)| *b == bound).map(|(_, n)| *n);
        assert_eq!(at(0.5), Some(1));
        assert_eq!(at(5.0), Some(3));
        assert_eq!(at(100.0), Some(4));
        assert_eq!(at(3_600_000.0), Some(4), "the overflow sample is only in the count");
    }
}
