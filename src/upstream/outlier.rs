//! Envoy's outlier detection for one cluster: what each host's results say (consecutive 5xx, gateway and
//! local-origin failures, judged inline on the worker that saw the result), the ejection itself (bounded by
//! `max_ejection_percent`, enforced by chance, lasting a backoff multiple of the base time), and the interval sweep
//! (hosts back to service, success rate and failure percentage over the last interval, backoff decay).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::cluster::{Cluster, Host, epoch_ms};
use crate::config::cluster::OutlierConfig;
use crate::stats::{Counter, Gauge, Store};

/// What an exchange with a host came to, as the filters report it (Envoy's `Outlier::Result` and response codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The host answered with this HTTP status (the connection to it worked).
    Status(u16),
    /// Connected, and that is all the filter can judge (tcp_proxy; Envoy's LOCAL_ORIGIN_CONNECT_SUCCESS_FINAL).
    Connected,
    /// The connection failed or was reset (LOCAL_ORIGIN_CONNECT_FAILED).
    ConnectFailed,
    /// No answer in time (LOCAL_ORIGIN_TIMEOUT).
    Timeout,
}

/// Why a host was found to be an outlier; names the `ejections_{detected,enforced}_<kind>` stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
    SuccessRate,
    LocalOriginSuccessRate,
    FailurePercentage,
    LocalOriginFailurePercentage,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Consecutive5xx,
        Kind::ConsecutiveGatewayFailure,
        Kind::ConsecutiveLocalOriginFailure,
        Kind::SuccessRate,
        Kind::LocalOriginSuccessRate,
        Kind::FailurePercentage,
        Kind::LocalOriginFailurePercentage,
    ];

    fn stat(self) -> &'static str {
        match self {
            Kind::Consecutive5xx => "consecutive_5xx",
            Kind::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            Kind::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
            Kind::SuccessRate => "success_rate",
            Kind::LocalOriginSuccessRate => "local_origin_success_rate",
            Kind::FailurePercentage => "failure_percentage",
            Kind::LocalOriginFailurePercentage => "local_origin_failure_percentage",
        }
    }

    fn enforcing(self, o: &OutlierConfig) -> u32 {
        match self {
            Kind::Consecutive5xx => o.enforcing_consecutive_5xx,
            Kind::ConsecutiveGatewayFailure => o.enforcing_consecutive_gateway_failure,
            Kind::ConsecutiveLocalOriginFailure => o.enforcing_consecutive_local_origin_failure,
            Kind::SuccessRate => o.enforcing_success_rate,
            Kind::LocalOriginSuccessRate => o.enforcing_local_origin_success_rate,
            Kind::FailurePercentage => o.enforcing_failure_percentage,
            Kind::LocalOriginFailurePercentage => o.enforcing_failure_percentage_local_origin,
        }
    }
}

/// `cluster.<name>.outlier_detection.*`, Envoy's names.
#[derive(Debug, Clone)]
pub struct OutlierStats {
    pub ejections_active: Gauge,
    pub ejections_enforced_total: Counter,
    pub ejections_overflow: Counter,
    detected: [Counter; 7],
    enforced: [Counter; 7],
}

impl OutlierStats {
    pub fn new(store: &Store, prefix: &str) -> Self {
        let c = |s: String| store.counter(&format!("{prefix}.outlier_detection.{s}"));
        OutlierStats {
            ejections_active: store.gauge(&format!("{prefix}.outlier_detection.ejections_active")),
            ejections_enforced_total: c("ejections_enforced_total".into()),
            ejections_overflow: c("ejections_overflow".into()),
            detected: Kind::ALL.map(|k| c(format!("ejections_detected_{}", k.stat()))),
            enforced: Kind::ALL.map(|k| c(format!("ejections_enforced_{}", k.stat()))),
        }
    }

    fn detected(&self, kind: Kind) -> &Counter {
        &self.detected[kind as usize]
    }

    fn enforced(&self, kind: Kind) -> &Counter {
        &self.enforced[kind as usize]
    }
}

/// One request counted in a success-rate bucket: the total in the high half, successes in the low half, so both move
/// in one atomic add and the sweep takes both in one swap.
const ONE_TOTAL: u64 = 1 << 32;

/// A host's outlier state, shared by every worker (atomics: results are counted where they happen).
#[derive(Debug)]
pub struct HostOutlier {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// This interval's answers (external origin), and in split mode its connection outcomes (local origin).
    external: AtomicU64,
    local: AtomicU64,
    /// Ejected until this many ms after [`epoch_ms`]'s epoch; 0 while in service.
    ejected_until_ms: AtomicU64,
    /// Envoy's ejection-time backoff: grows with each ejection, decays by one per interval in service.
    backoff: AtomicU32,
    /// When the host last came back to service (epoch ms); 0 if it never did.
    returned_at_ms: AtomicU64,
    /// The success rates (f64 bits) the last sweep judged, external and local origin, for `/clusters`; [`NO_RATE`]
    /// when the host had too few requests.
    rates: [AtomicU64; 2],
}

/// Envoy's "no success rate" (-1) as stored f64 bits.
const NO_RATE: u64 = 0xbff0_0000_0000_0000;

impl Default for HostOutlier {
    fn default() -> Self {
        HostOutlier {
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_local: AtomicU32::new(0),
            external: AtomicU64::new(0),
            local: AtomicU64::new(0),
            ejected_until_ms: AtomicU64::new(0),
            backoff: AtomicU32::new(0),
            returned_at_ms: AtomicU64::new(0),
            rates: [AtomicU64::new(NO_RATE), AtomicU64::new(NO_RATE)],
        }
    }
}

/// A cluster's last success-rate average and ejection threshold per origin (external, local), for `/clusters`.
#[derive(Debug)]
pub struct Thresholds([[AtomicU64; 2]; 2]);

impl Default for Thresholds {
    fn default() -> Self {
        let none = || [AtomicU64::new(NO_RATE), AtomicU64::new(NO_RATE)];
        Thresholds([none(), none()])
    }
}

impl Thresholds {
    /// (average, ejection threshold) of `origin` (0 external, 1 local); -1 where the last sweep computed none.
    pub fn get(&self, origin: usize) -> (f64, f64) {
        let get = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        self.0.get(origin).map_or((-1.0, -1.0), |[mean, threshold]| (get(mean), get(threshold)))
    }

    fn set(&self, origin: usize, mean: f64, threshold: f64) {
        if let Some([m, t]) = self.0.get(origin) {
            m.store(mean.to_bits(), Ordering::Relaxed);
            t.store(threshold.to_bits(), Ordering::Relaxed);
        }
    }
}

impl HostOutlier {
    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) != 0
    }

    /// The success rates of the last sweep, (external, local origin) in percent; -1 where there was too little
    /// traffic (Envoy's `/clusters` values).
    pub fn success_rates(&self) -> (f64, f64) {
        let get = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        (get(&self.rates[0]), get(&self.rates[1]))
    }

    /// Forgets every judgement: a cluster version without outlier detection takes over the host.
    pub fn forget(&self) {
        self.inherit(&HostOutlier::default());
        for r in &self.rates {
            r.store(NO_RATE, Ordering::Relaxed);
        }
    }

    /// Carries a host's state over to its successor object after an EDS update or DNS refresh.
    pub fn inherit(&self, prior: &HostOutlier) {
        for (to, from) in [
            (&self.consecutive_5xx, &prior.consecutive_5xx),
            (&self.consecutive_gateway, &prior.consecutive_gateway),
            (&self.consecutive_local, &prior.consecutive_local),
            (&self.backoff, &prior.backoff),
        ] {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        for (to, from) in [
            (&self.external, &prior.external),
            (&self.local, &prior.local),
            (&self.ejected_until_ms, &prior.ejected_until_ms),
            (&self.returned_at_ms, &prior.returned_at_ms),
        ] {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Counts one more in a row; true exactly when the count reaches `threshold` (Envoy compares for equality, so
    /// a run that goes on past the threshold without an ejection does not fire again, and 0 never fires).
    fn one_more(counter: &AtomicU32, threshold: u32) -> bool {
        counter.fetch_add(1, Ordering::Relaxed).wrapping_add(1) == threshold
    }

    fn clear(counter: &AtomicU32) {
        // Most results are successes on a host with no failure run: skip the write so the cache line stays shared.
        if counter.load(Ordering::Relaxed) != 0 {
            counter.store(0, Ordering::Relaxed);
        }
    }

    fn count(bucket: &AtomicU64, success: bool) {
        bucket.fetch_add(ONE_TOTAL | u64::from(success), Ordering::Relaxed);
    }

    /// Takes the interval's bucket: (requests, success rate in percent), None without requests.
    fn take(bucket: &AtomicU64) -> Option<(u64, f64)> {
        let v = bucket.swap(0, Ordering::Relaxed);
        let (total, ok) = (v >> 32, v & 0xffff_ffff);
        (total > 0).then(|| (total, ok.min(total) as f64 * 100.0 / total as f64))
    }
}

/// Notes a result for `host` (Envoy's putHttpResponseCode / putResult), ejecting it when a consecutive detector
/// fires.
pub fn report(c: &Cluster, o: &OutlierConfig, host: &Host, outcome: Outcome) {
    let m = &host.outlier;
    if o.split_external_local_origin_errors {
        match outcome {
            Outcome::Status(code) => {
                local_success(m);
                answer(c, o, host, code);
            }
            Outcome::Connected => local_success(m),
            Outcome::ConnectFailed | Outcome::Timeout => {
                HostOutlier::count(&m.local, false);
                if HostOutlier::one_more(&m.consecutive_local, o.consecutive_local_origin_failure) {
                    consecutive(c, o, host, Kind::ConsecutiveLocalOriginFailure, &m.consecutive_local);
                }
            }
        }
        return;
    }
    // Not split: a local-origin result counts as the answer Envoy maps it to.
    let code = match outcome {
        Outcome::Status(code) => code,
        Outcome::Connected => 200,
        Outcome::ConnectFailed => 503,
        Outcome::Timeout => 504,
    };
    answer(c, o, host, code);
}

fn local_success(m: &HostOutlier) {
    HostOutlier::count(&m.local, true);
    HostOutlier::clear(&m.consecutive_local);
}

fn answer(c: &Cluster, o: &OutlierConfig, host: &Host, code: u16) {
    let m = &host.outlier;
    let five_xx = (500..600).contains(&code);
    HostOutlier::count(&m.external, !five_xx);
    if !five_xx {
        HostOutlier::clear(&m.consecutive_5xx);
        HostOutlier::clear(&m.consecutive_gateway);
        return;
    }
    if matches!(code, 502..=504) {
        if HostOutlier::one_more(&m.consecutive_gateway, o.consecutive_gateway_failure) {
            consecutive(c, o, host, Kind::ConsecutiveGatewayFailure, &m.consecutive_gateway);
        }
    } else {
        HostOutlier::clear(&m.consecutive_gateway);
    }
    if HostOutlier::one_more(&m.consecutive_5xx, o.consecutive_5xx) {
        consecutive(c, o, host, Kind::Consecutive5xx, &m.consecutive_5xx);
    }
}

/// A consecutive detector fired. As in Envoy, a host already ejected is left alone, and the run's counter starts
/// again whether or not the ejection was enforced.
fn consecutive(c: &Cluster, o: &OutlierConfig, host: &Host, kind: Kind, run: &AtomicU32) {
    if host.outlier.is_ejected() {
        return;
    }
    c.stats.outlier.detected(kind).inc();
    eject(c, o, host, kind);
    run.store(0, Ordering::Relaxed);
}

/// Envoy's ejectHost: within max_ejection_percent (or the first ejection with always_eject_one_host), and with the
/// detector's enforcing chance, the host leaves load balancing for min(base × backoff, max) plus jitter.
fn eject(c: &Cluster, o: &OutlierConfig, host: &Host, kind: Kind) {
    let _decide = c.ejecting.lock().unwrap_or_else(|p| p.into_inner());
    // A request may still hold a host object an EDS update or DNS refresh has since replaced (its successor carries
    // the state on): only the current set's hosts are ejected and counted.
    if !c.hosts().hosts.iter().any(|h| std::ptr::eq(h.as_ref(), host)) {
        return;
    }
    let stats = &c.stats.outlier;
    let total = c.hosts().total;
    let active = u64::from(c.ejected.load(Ordering::Relaxed));
    let within = (active + 1) * 100 <= u64::from(o.max_ejection_percent) * total.max(1) as u64;
    if !(within || (o.always_eject_one_host && active == 0)) {
        stats.ejections_overflow.inc();
        return;
    }
    if rand::random_range(0..100) >= kind.enforcing(o) {
        return;
    }
    let m = &host.outlier;
    let base = o.base_ejection_time;
    let mut backoff = m.backoff.load(Ordering::Relaxed);
    if base.saturating_mul(backoff) < o.max_ejection_time.saturating_add(base) {
        backoff = backoff.saturating_add(1);
    }
    let jitter = rand::random_range(0..=u64::try_from(o.max_ejection_time_jitter.as_millis()).unwrap_or(u64::MAX));
    let length = base.saturating_mul(backoff).min(o.max_ejection_time);
    let length_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX);
    let until = epoch_ms().saturating_add(length_ms).saturating_add(jitter).max(1);
    if m.ejected_until_ms.compare_exchange(0, until, Ordering::Relaxed, Ordering::Relaxed).is_err() {
        return;
    }
    m.backoff.store(backoff, Ordering::Relaxed);
    c.ejected.fetch_add(1, Ordering::Relaxed);
    stats.ejections_active.inc();
    stats.ejections_enforced_total.inc();
    stats.enforced(kind).inc();
    tracing::info!(cluster = %c.name(), host = %host.address, "outlier detection: ejected for {length:?} ({})", kind.stat());
}

/// Envoy's interval sweep, in its order: hosts whose ejection is over come back (with their failure runs cleared),
/// the interval's buckets are taken, success rate and failure percentage eject, and the backoff of hosts that stayed
/// in service a whole interval decays.
pub fn sweep(c: &Cluster, o: &OutlierConfig) {
    let now = epoch_ms();
    let set = c.hosts();
    let (hosts, total) = (&set.hosts, set.total);
    let returning = c.ejecting.lock().unwrap_or_else(|p| p.into_inner());
    for h in hosts.iter() {
        let m = &h.outlier;
        let until = m.ejected_until_ms.load(Ordering::Relaxed);
        if until != 0 && until <= now {
            for run in [&m.consecutive_5xx, &m.consecutive_gateway, &m.consecutive_local] {
                run.store(0, Ordering::Relaxed);
            }
            m.returned_at_ms.store(now, Ordering::Relaxed);
            m.ejected_until_ms.store(0, Ordering::Relaxed);
            tracing::info!(cluster = %c.name(), host = %h.address, "outlier detection: host returned to service");
        }
    }
    count_ejected(c, hosts);
    drop(returning);

    let mut external = Vec::with_capacity(hosts.len());
    let mut local = Vec::with_capacity(hosts.len());
    for h in hosts.iter() {
        for r in &h.outlier.rates {
            r.store(NO_RATE, Ordering::Relaxed);
        }
        let (e, l) = (HostOutlier::take(&h.outlier.external), HostOutlier::take(&h.outlier.local));
        if !h.outlier.is_ejected() {
            external.extend(e.map(|(n, rate)| (h, n, rate)));
            local.extend(l.map(|(n, rate)| (h, n, rate)));
        }
    }
    rates(c, o, total, &external, 0, Kind::SuccessRate, Kind::FailurePercentage);
    rates(c, o, total, &local, 1, Kind::LocalOriginSuccessRate, Kind::LocalOriginFailurePercentage);

    let interval = o.interval.as_millis() as u64;
    for h in hosts.iter() {
        let m = &h.outlier;
        let back = m.returned_at_ms.load(Ordering::Relaxed);
        if !m.is_ejected() && back != 0 && now.saturating_sub(back) >= interval {
            let b = m.backoff.load(Ordering::Relaxed);
            if b > 0 {
                m.backoff.store(b - 1, Ordering::Relaxed);
            }
        }
    }
}

/// Sets the cluster's ejection count (and the gauge) from the hosts themselves, after a host set change.
pub fn recount(c: &Cluster, hosts: &[Arc<Host>]) {
    let _counting = c.ejecting.lock().unwrap_or_else(|p| p.into_inner());
    count_ejected(c, hosts);
}

/// The count itself; the caller holds the cluster's `ejecting` lock.
fn count_ejected(c: &Cluster, hosts: &[Arc<Host>]) {
    let still = hosts.iter().filter(|h| h.outlier.is_ejected()).count() as u32;
    c.ejected.store(still, Ordering::Relaxed);
    c.stats.outlier.ejections_active.set(i64::from(still));
}

/// Envoy's processSuccessRateEjections over one origin's samples (host, requests, success %): hosts with enough
/// requests, when enough hosts have them, are compared with mean − factor × stdev of their success rates, and with
/// the flat failure percentage threshold.
fn rates(
    c: &Cluster,
    o: &OutlierConfig,
    total: usize,
    samples: &[(&Arc<Host>, u64, f64)],
    origin: usize,
    success_rate: Kind,
    failure_percentage: Kind,
) {
    c.outlier_thresholds.set(origin, -1.0, -1.0);
    let (sr_hosts, fp_hosts) = (o.success_rate_minimum_hosts as usize, o.failure_percentage_minimum_hosts as usize);
    if total < sr_hosts && total < fp_hosts {
        return;
    }
    let shown = o.success_rate_request_volume.min(o.failure_percentage_request_volume);
    for (h, n, rate) in samples {
        if *n >= u64::from(shown) {
            h.outlier.rates[origin].store(rate.to_bits(), Ordering::Relaxed);
        }
    }
    let valid = |volume: u32| samples.iter().filter(move |(_, n, _)| *n >= u64::from(volume));
    let sr: Vec<_> = valid(o.success_rate_request_volume).collect();
    if !sr.is_empty() && sr.len() >= sr_hosts {
        let mean = sr.iter().map(|(_, _, r)| r).sum::<f64>() / sr.len() as f64;
        let variance = sr.iter().map(|(_, _, r)| (r - mean).powi(2)).sum::<f64>() / sr.len() as f64;
        let threshold = mean - f64::from(o.success_rate_stdev_factor) / 1000.0 * variance.sqrt();
        c.outlier_thresholds.set(origin, mean, threshold);
        for (h, _, rate) in &sr {
            if *rate < threshold {
                flagged(c, o, h, success_rate);
            }
        }
    }
    let fp: Vec<_> = valid(o.failure_percentage_request_volume).collect();
    if !fp.is_empty() && fp.len() >= fp_hosts {
        for (h, _, rate) in fp {
            if 100.0 - rate >= f64::from(o.failure_percentage_threshold) {
                flagged(c, o, h, failure_percentage);
            }
        }
    }
}

/// A sweep detector found `host`: counted as detected even if an earlier detector of this sweep ejected it.
fn flagged(c: &Cluster, o: &OutlierConfig, host: &Host, kind: Kind) {
    c.stats.outlier.detected(kind).inc();
    if !host.outlier.is_ejected() {
        eject(c, o, host, kind);
    }
}

/// For tests here and in the admin handlers: a STATIC cluster of `hosts` endpoints (127.0.0.1, ports 1…) with
/// these `outlier_detection` fields (and any further cluster fields in `extra`).
#[cfg(test)]
pub(crate) fn test_cluster(hosts: u16, outlier: &str, extra: &str) -> Cluster {
    use crate::config::cluster::ClusterConfig;
    use crate::config::proto::{self, Format};
    use crate::upstream::cluster::HostSet;
    let eps: Vec<String> = (1..=hosts)
        .map(|p| {
            format!("{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }} }}")
        })
        .collect();
    let yaml = format!(
        "name: c\n{extra}\noutlier_detection: {{ {outlier} }}\nload_assignment: {{ cluster_name: c, endpoints: [ {{ lb_endpoints: [ {} ] }} ] }}",
        eps.join(", ")
    );
    let msg =
        proto::parse_dynamic(&yaml, Format::Yaml, "envoy.config.cluster.v3.Cluster").unwrap_or_else(|e| panic!("{e}"));
    let cfg = ClusterConfig::try_from(
        proto::decode::<envoy_types::pb::envoy::config::cluster::v3::Cluster>(&msg).unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let hosts = HostSet::from_endpoints(&cfg.endpoints, false);
    Cluster::new(Arc::new(cfg), hosts, &Store::default())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::upstream::cluster::HostSet;

    fn host(c: &Cluster, port: u16) -> Arc<Host> {
        c.hosts().hosts.iter().find(|h| h.address.port() == port).cloned().unwrap_or_else(|| panic!("no host {port}"))
    }

    fn times(c: &Cluster, h: &Host, n: usize, outcome: Outcome) {
        for _ in 0..n {
            c.report(h, outcome);
        }
    }

    fn stat(c: &Cluster, kind: Kind) -> (u64, u64) {
        (c.stats.outlier.detected(kind).value(), c.stats.outlier.enforced(kind).value())
    }

    #[test]
    fn consecutive_5xx_counts_a_run_and_survives_a_host_set_update() {
        let c = test_cluster(2, "consecutive_5xx: 2, max_ejection_percent: 50", "");
        let first = host(&c, 1);
        c.report(&first, Outcome::Status(500));
        c.report(&first, Outcome::Status(200));
        c.report(&first, Outcome::Status(500));
        assert!(!first.is_ejected(), "a success in between starts the count again");
        c.report(&first, Outcome::Status(500));
        assert!(first.is_ejected());
        assert_eq!(stat(&c, Kind::Consecutive5xx), (1, 1));
        let ports: Vec<u16> = (0..4).filter_map(|_| c.choose(None)).map(|h| h.address.port()).collect();
        assert_eq!(ports, vec![2, 2, 2, 2]);

        c.set_hosts(HostSet::from_endpoints(&c.config.endpoints, false));
        assert!(host(&c, 1).is_ejected(), "the same address stays ejected");
        assert_eq!(c.stats.outlier.ejections_active.value(), 1);
        // A second ejection would be 100% of the cluster, over max_ejection_percent.
        times(&c, &host(&c, 2), 2, Outcome::Status(503));
        assert!(!host(&c, 2).is_ejected());
        assert_eq!(c.stats.outlier.ejections_overflow.value(), 1);
    }

    /// A CDS update of the cluster keeps its hosts, and with them their ejections: the new version balances around
    /// an ejected host at once, not only after its first sweep.
    #[test]
    fn an_updated_cluster_keeps_its_ejections() {
        let c = test_cluster(2, "consecutive_5xx: 1, max_ejection_percent: 50", "");
        c.report(&host(&c, 1), Outcome::Status(500));
        let updated = Cluster::with_hosts(c.config.clone(), c.hosts(), &Store::default());
        assert_eq!(updated.stats.outlier.ejections_active.value(), 1);
        assert!((0..10).filter_map(|_| updated.choose(None)).all(|h| h.address.port() == 2));
    }

    /// Envoy's always_eject_one_host (default false): without it, one host of two is 50%, over the default 10%.
    #[test]
    fn max_ejection_percent_holds_unless_always_eject_one_host() {
        let c = test_cluster(2, "consecutive_5xx: 2", "");
        times(&c, &host(&c, 1), 2, Outcome::Status(500));
        assert!(!host(&c, 1).is_ejected());
        assert_eq!(c.stats.outlier.ejections_overflow.value(), 1);
        assert_eq!(stat(&c, Kind::Consecutive5xx), (1, 0));

        let c = test_cluster(2, "consecutive_5xx: 2, always_eject_one_host: true", "");
        times(&c, &host(&c, 1), 2, Outcome::Status(500));
        assert!(host(&c, 1).is_ejected());
        times(&c, &host(&c, 2), 2, Outcome::Status(500));
        assert!(!host(&c, 2).is_ejected(), "only the first ejection ignores the percentage");
    }

    /// What Istio sends for a DestinationRule's consecutiveGatewayErrors: only 502, 503 and 504 (and connect
    /// failures and timeouts, mapped to 503 and 504) count, and any other answer ends the run.
    #[test]
    fn consecutive_gateway_failure_counts_only_gateway_errors() {
        let c = test_cluster(
            2,
            "consecutive_gateway_failure: 3, enforcing_consecutive_gateway_failure: 100, enforcing_consecutive_5xx: 0, \
             max_ejection_percent: 100",
            "",
        );
        let h = host(&c, 1);
        c.report(&h, Outcome::Status(502));
        c.report(&h, Outcome::Status(504));
        c.report(&h, Outcome::Status(500));
        c.report(&h, Outcome::Status(503));
        c.report(&h, Outcome::ConnectFailed);
        assert!(!h.is_ejected(), "a 500 ends a run of gateway errors");
        c.report(&h, Outcome::Timeout);
        assert!(h.is_ejected());
        assert_eq!(stat(&c, Kind::ConsecutiveGatewayFailure), (1, 1));
        // Six 5xx in a row also reached consecutive_5xx (5): detected, but enforcing 0 never ejects for it.
        assert_eq!(stat(&c, Kind::Consecutive5xx), (1, 0));
        // The default enforcing_consecutive_gateway_failure is 0: detected, never enforced.
        let c = test_cluster(2, "consecutive_gateway_failure: 2, max_ejection_percent: 100", "");
        times(&c, &host(&c, 1), 2, Outcome::Status(503));
        assert!(!host(&c, 1).is_ejected());
        assert_eq!(stat(&c, Kind::ConsecutiveGatewayFailure), (1, 0));
    }

    #[test]
    fn split_mode_counts_local_origin_failures_apart_from_answers() {
        let c = test_cluster(
            2,
            "split_external_local_origin_errors: true, consecutive_local_origin_failure: 3, consecutive_5xx: 3, \
             max_ejection_percent: 100",
            "",
        );
        let h = host(&c, 1);
        times(&c, &h, 2, Outcome::ConnectFailed);
        c.report(&h, Outcome::Status(500));
        c.report(&h, Outcome::Timeout);
        assert!(!h.is_ejected(), "an answer proves the connection worked: the local run starts again");
        times(&c, &h, 2, Outcome::ConnectFailed);
        assert!(h.is_ejected());
        assert_eq!(stat(&c, Kind::ConsecutiveLocalOriginFailure), (1, 1));
        assert_eq!(stat(&c, Kind::Consecutive5xx), (0, 0), "connect failures are not 5xx in split mode");

        let h = host(&c, 2);
        times(&c, &h, 2, Outcome::Status(500));
        c.report(&h, Outcome::ConnectFailed);
        c.report(&h, Outcome::Status(500));
        assert!(h.is_ejected(), "a connect failure does not end a run of 5xx answers");
        assert_eq!(stat(&c, Kind::Consecutive5xx), (1, 1));
    }

    /// 100 answers with `fails` (a divisor of 100) 500s spread evenly among them, so no consecutive detector fires.
    fn hundred(c: &Cluster, port: u16, fails: usize) {
        let h = host(c, port);
        let every = 100 / fails.max(1);
        for i in 0..100 {
            c.report(&h, Outcome::Status(if fails > 0 && i % every == 0 { 500 } else { 200 }));
        }
    }

    /// Envoy's worked example: success rates 50, 100, 100, 100, 100 give a mean of 90, a stdev of 20 and (factor
    /// 1.9) a threshold of 52: the host at 50% is ejected at the sweep. Rates 90, 100, 100, 95, 95 (mean 96, stdev
    /// 3.7, threshold 88.9) eject none.
    #[test]
    fn success_rate_ejects_the_host_below_mean_minus_stdev_factor() {
        let c = test_cluster(5, "max_ejection_percent: 20", "");
        for (port, fails) in [(1, 10), (2, 0), (3, 0), (4, 5), (5, 5)] {
            hundred(&c, port, fails);
        }
        c.outlier_sweep();
        assert_eq!(stat(&c, Kind::SuccessRate), (0, 0));

        for (port, fails) in [(1, 50), (2, 0), (3, 0), (4, 0), (5, 0)] {
            hundred(&c, port, fails);
        }
        c.outlier_sweep();
        assert!(host(&c, 1).is_ejected());
        assert_eq!(stat(&c, Kind::SuccessRate), (1, 1));
        assert_eq!(c.outlier_thresholds.get(0), (90.0, 52.0), "mean 90, stdev 20");
        assert_eq!(host(&c, 1).success_rates(), (50.0, -1.0), "no local-origin rates unless split");
        assert!((2..=5).all(|p| !host(&c, p).is_ejected()));
    }

    #[test]
    fn success_rate_needs_request_volume_and_minimum_hosts() {
        let c = test_cluster(5, "max_ejection_percent: 100", "");
        for port in 2..=5 {
            times(&c, &host(&c, port), 99, Outcome::Status(200));
        }
        for _ in 0..33 {
            c.report(&host(&c, 1), Outcome::Status(500));
            times(&c, &host(&c, 1), 2, Outcome::Status(200));
        }
        c.outlier_sweep();
        assert_eq!(stat(&c, Kind::SuccessRate), (0, 0), "under success_rate_request_volume (100)");

        let c = test_cluster(4, "max_ejection_percent: 100", "");
        for (port, fails) in [(1, 50), (2, 0), (3, 0), (4, 0)] {
            hundred(&c, port, fails);
        }
        c.outlier_sweep();
        assert_eq!(stat(&c, Kind::SuccessRate), (0, 0), "fewer than success_rate_minimum_hosts (5)");
    }

    #[test]
    fn failure_percentage_ejects_over_a_flat_threshold() {
        let c = test_cluster(
            3,
            "enforcing_success_rate: 0, enforcing_failure_percentage: 100, failure_percentage_threshold: 50, \
             failure_percentage_minimum_hosts: 3, failure_percentage_request_volume: 10, consecutive_5xx: 100, \
             max_ejection_percent: 100",
            "",
        );
        for _ in 0..10 {
            for _ in 0..3 {
                c.report(&host(&c, 1), Outcome::Status(503));
            }
            c.report(&host(&c, 1), Outcome::Status(200));
            c.report(&host(&c, 2), Outcome::Status(500));
            c.report(&host(&c, 2), Outcome::Status(200));
            c.report(&host(&c, 3), Outcome::Status(200));
        }
        c.outlier_sweep();
        assert!(host(&c, 1).is_ejected(), "75% failures");
        assert!(host(&c, 2).is_ejected(), "50% failures: at the threshold counts");
        assert!(!host(&c, 3).is_ejected());
        assert_eq!(stat(&c, Kind::FailurePercentage), (2, 2));
        assert_eq!(c.stats.outlier.ejections_active.value(), 2);
        c.outlier_sweep();
        assert_eq!(stat(&c, Kind::FailurePercentage), (2, 2), "each interval starts a new bucket");
    }

    /// Envoy's backoff: each ejection lasts base × backoff (growing by one per ejection), and the backoff decays by
    /// one for each interval the host stays in service after coming back.
    #[test]
    fn ejection_time_backs_off_and_decays() {
        let c = test_cluster(
            1,
            "consecutive_5xx: 1, base_ejection_time: 0.001s, interval: 0.001s, always_eject_one_host: true",
            "",
        );
        let h = host(&c, 1);
        let backoff = || h.outlier.backoff.load(Ordering::Relaxed);
        c.report(&h, Outcome::Status(500));
        assert!(h.is_ejected());
        assert_eq!(backoff(), 1);
        std::thread::sleep(Duration::from_millis(10));
        c.outlier_sweep();
        assert!(!h.is_ejected(), "returned once base_ejection_time passed");
        assert_eq!(c.stats.outlier.ejections_active.value(), 0);
        c.report(&h, Outcome::Status(500));
        assert_eq!(backoff(), 2, "ejected again before the backoff decayed");
        std::thread::sleep(Duration::from_millis(10));
        c.outlier_sweep();
        assert!(!h.is_ejected());
        assert_eq!(backoff(), 2, "back for less than an interval");
        std::thread::sleep(Duration::from_millis(10));
        c.outlier_sweep();
        assert_eq!(backoff(), 1);
    }

    #[test]
    fn an_ejection_that_is_not_over_stays_at_the_sweep() {
        let c = test_cluster(2, "consecutive_5xx: 1, base_ejection_time: 60s, max_ejection_percent: 50", "");
        c.report(&host(&c, 1), Outcome::Status(500));
        c.outlier_sweep();
        assert!(host(&c, 1).is_ejected());
        assert_eq!(c.stats.outlier.ejections_active.value(), 1);
    }

    /// Istio's locality failover (outlier detection with priorities by locality): as P0 hosts are ejected, Envoy's
    /// priority load moves traffic to P1 (P0 keeps min(100, 1.4 × in service / all) percent), and with all of P0
    /// ejected P1 takes everything, even at Istio's panic threshold 0. Nothing left at all: no host.
    #[test]
    fn ejections_move_traffic_to_the_next_priority() {
        use crate::config::cluster::ClusterConfig;
        use crate::config::proto::{self, Format};
        let group = |priority: u16, ports: std::ops::RangeInclusive<u16>| {
            let eps: Vec<String> = ports
                .map(|p| {
                    format!(
                        "{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }} }}"
                    )
                })
                .collect();
            format!("{{ priority: {priority}, lb_endpoints: [ {} ] }}", eps.join(", "))
        };
        for policy in ["ROUND_ROBIN", "LEAST_REQUEST", "RING_HASH", "RANDOM"] {
            let yaml = format!(
                "name: c\nlb_policy: {policy}\ncommon_lb_config: {{ healthy_panic_threshold: {{ value: 0 }} }}\n\
                 outlier_detection: {{ consecutive_5xx: 1, max_ejection_percent: 100 }}\n\
                 load_assignment: {{ cluster_name: c, endpoints: [ {}, {} ] }}",
                group(0, 1..=4),
                group(1, 5..=8)
            );
            let msg = proto::parse_dynamic(&yaml, Format::Yaml, "envoy.config.cluster.v3.Cluster")
                .unwrap_or_else(|e| panic!("{e}"));
            let cfg = ClusterConfig::try_from(
                proto::decode::<envoy_types::pb::envoy::config::cluster::v3::Cluster>(&msg)
                    .unwrap_or_else(|e| panic!("{e}")),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let hosts = HostSet::from_endpoints(&cfg.endpoints, false);
            let c = Cluster::new(Arc::new(cfg), hosts, &Store::default());
            assert!(c.hosts().has_priorities());
            // Share of 2000 picks (hashed ones with spread hashes) that went to P1.
            let p1_share = |c: &Cluster| {
                let picks: Vec<u16> = (0..2000u64)
                    .filter_map(|n| {
                        let hash = (policy == "RING_HASH").then(|| n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                        c.choose_hashed(None, hash)
                    })
                    .map(|h| h.address.port())
                    .collect();
                assert!(picks.iter().all(|p| !host(c, *p).is_ejected()), "{policy}: an ejected host was picked");
                picks.iter().filter(|p| **p >= 5).count() as f64 / picks.len().max(1) as f64
            };
            assert_eq!(p1_share(&c), 0.0, "{policy}: a healthy P0 takes everything");
            c.report(&host(&c, 1), Outcome::Status(500));
            assert_eq!(p1_share(&c), 0.0, "{policy}: 3 of 4 (105%) is still fully healthy");
            c.report(&host(&c, 2), Outcome::Status(500));
            let share = p1_share(&c);
            assert!((0.2..0.4).contains(&share), "{policy}: 2 of 4 in service keeps 70% on P0, got {share}");
            for p in [3, 4] {
                c.report(&host(&c, p), Outcome::Status(500));
            }
            assert_eq!(p1_share(&c), 1.0, "{policy}: P0 all ejected, P1 takes it all");
            for p in 5..=8 {
                c.report(&host(&c, p), Outcome::Status(500));
            }
            assert!(c.choose_hashed(None, Some(3)).is_none() && c.choose(None).is_none(), "{policy}: nothing left");
        }
    }

    /// healthy_panic_threshold: Istio sends 0 with every outlier_detection (its minHealthPercent), so an all-ejected
    /// cluster has no host; at Envoy's default 50 the balancer panics and uses them all.
    #[test]
    fn panic_threshold_decides_what_an_all_ejected_cluster_does() {
        for (extra, expect_host) in [("common_lb_config: { healthy_panic_threshold: { value: 0 } }", false), ("", true)]
        {
            for policy in ["", "lb_policy: RING_HASH"] {
                let c = test_cluster(2, "consecutive_5xx: 1, max_ejection_percent: 100", &format!("{extra}\n{policy}"));
                c.report(&host(&c, 1), Outcome::Status(500));
                assert_eq!(
                    (0..20).filter_map(|n| c.choose_hashed(None, Some(n))).map(|h| h.address.port()).max(),
                    Some(2),
                    "{extra} {policy}: one host left in service takes everything"
                );
                c.report(&host(&c, 2), Outcome::Status(500));
                assert_eq!(c.choose_hashed(None, Some(7)).is_some(), expect_host, "{extra} {policy}");
                assert_eq!(c.choose(None).is_some(), expect_host, "{extra} {policy}");
            }
        }
    }
}
