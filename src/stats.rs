//! Counters, gauges and histograms with Envoy's names (`listener.<addr>.downstream_cx_total`,
//! `cluster.<name>.upstream_rq_time`, `listener_manager.*`), cheap on the connection path.
//!
//! Every metric has one slot per shard: shard 0 for the main thread, one per worker. A worker only writes its own
//! shard, which lives in that shard's own slab of memory, so two workers never contend for a cache line; a read sums
//! the shards. Registration takes a lock on the control path; the connection path only touches the slots it was
//! handed.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Slots per slab chunk; chunks never move once allocated, so a slot's address is stable.
const CHUNK: usize = 1024;
/// Chunks per shard: room for 4 million slots.
const CHUNKS: usize = 4096;
/// Shards a store can have: the main thread and up to this many minus one workers (more workers share shard 0).
pub(crate) const MAX_SHARDS: usize = 65;

/// Envoy's default histogram bucket bounds (milliseconds for time histograms).
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The shard the current thread writes to.
pub(crate) fn thread_shard() -> usize {
    SHARD.with(Cell::get)
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

    /// The slot if its chunk exists: reading never allocates.
    fn peek(&self, idx: usize) -> Option<&AtomicU64> {
        self.chunks.get(idx / CHUNK)?.get()?.get(idx % CHUNK)
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

    fn marked(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<usize>> {
        self.marked.lock().unwrap_or_else(|p| p.into_inner())
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
            .filter_map(|s| s.peek(idx))
            .map(|a| a.load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }

    fn reset(&self, idx: usize) {
        for s in self.shards.iter().filter_map(|s| s.get()) {
            if let Some(a) = s.peek(idx) {
                a.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// Every store's slots: one process-wide table, so a metric handle is just a slot number (4 bytes; a proxy with
/// 10,000 listeners holds a lot of them).
static SLABS: std::sync::LazyLock<Slabs> = std::sync::LazyLock::new(Slabs::new);

fn allocate(n: usize) -> u32 {
    u32::try_from(SLABS.allocate(n)).unwrap_or(u32::MAX)
}

#[derive(Debug, Clone)]
pub struct Counter(u32);

impl Default for Counter {
    /// A counter of its own, not registered under any name (yet).
    fn default() -> Self {
        Counter(allocate(1))
    }
}

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        if let Some(a) = SLABS.mine(self.0 as usize) {
            a.fetch_add(n, Ordering::Relaxed);
        }
    }
    pub fn value(&self) -> u64 {
        SLABS.sum(self.0 as usize)
    }
    fn reset(&self) {
        SLABS.reset(self.0 as usize);
    }
}

/// A gauge: increments and decrements land in the writer's shard (they sum across shards, in two's complement);
/// `set` is for the control path, which owns the gauges it sets.
#[derive(Debug, Clone)]
pub struct Gauge(u32);

impl Default for Gauge {
    fn default() -> Self {
        Gauge(allocate(1))
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
        if let Some(a) = SLABS.mine(self.0 as usize) {
            a.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    pub fn set(&self, v: i64) {
        let current = self.value();
        self.add(v.wrapping_sub(current));
        SLABS.mark(self.0 as usize);
    }
    pub fn value(&self) -> i64 {
        SLABS.sum(self.0 as usize) as i64
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
    base: u32,
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
    const BOUNDS: &'static [f64] = DEFAULT_BUCKETS;

    pub fn record(&self, value: f64) {
        let n = Self::BOUNDS.len();
        let bucket = Self::BOUNDS.iter().position(|b| value <= *b).unwrap_or(n);
        let base = self.base as usize;
        for (idx, add) in [(base + bucket, 1), (base + n + 1, 1), (base + n + 2, (value * 1000.0) as u64)] {
            if let Some(a) = SLABS.mine(idx) {
                a.fetch_add(add, Ordering::Relaxed);
            }
        }
    }

    pub fn value(&self) -> HistogramValue {
        let n = Self::BOUNDS.len();
        let base = self.base as usize;
        let mut cumulative = 0;
        let buckets = Self::BOUNDS
            .iter()
            .enumerate()
            .map(|(i, b)| {
                cumulative += SLABS.sum(base + i);
                (*b, cumulative)
            })
            .collect();
        HistogramValue { buckets, count: SLABS.sum(base + n + 1), sum: SLABS.sum(base + n + 2) as f64 / 1000.0 }
    }

    fn reset(&self) {
        for i in 0..Self::BOUNDS.len() + 3 {
            SLABS.reset(self.base as usize + i);
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
#[derive(Debug, Clone, Default)]
pub struct Store {
    metrics: Arc<Mutex<BTreeMap<String, Metric>>>,
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
            Some(_) => Gauge::default(),
            None => {
                let g = Gauge::default();
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
                let h = Histogram { base: allocate(DEFAULT_BUCKETS.len() + 3) };
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
        let marked = SLABS.marked();
        m.iter()
            .map(|(name, metric)| {
                let value = value(metric);
                let nonzero = match &value {
                    Value::Counter(c) => *c > 0,
                    Value::Gauge(g) => *g != 0,
                    Value::Histogram(h) => h.count > 0,
                };
                let used = nonzero || marked.contains(&slot_of(metric));
                Stat { name: name.clone(), value, used }
            })
            .collect()
    }

    /// Zeroes every counter (Envoy's /reset_counters); gauges keep their values. What had counted stays "used".
    pub fn reset_counters(&self) {
        let m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        for metric in m.values() {
            match metric {
                Metric::Counter(c) => {
                    if c.value() > 0 {
                        SLABS.mark(slot_of(metric));
                    }
                    c.reset();
                }
                Metric::Histogram(h) => {
                    if h.value().count > 0 {
                        SLABS.mark(slot_of(metric));
                    }
                    h.reset();
                }
                Metric::Gauge(_) => {}
            }
        }
    }
}

/// The slot that stands for a metric in [`Slabs::marked`].
fn slot_of(metric: &Metric) -> usize {
    match metric {
        Metric::Counter(c) => c.0 as usize,
        Metric::Gauge(g) => g.0 as usize,
        Metric::Histogram(h) => h.base as usize,
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
