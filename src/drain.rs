//! One drain primitive for the process, each listener and each filter chain: a trigger that moves every holder of
//! a [`DrainWatch`] from serving to draining (graceful: protocol-aware filters close when they can) and then to
//! closed (forced: everyone closes now), and that can wait until every holder is gone.
//!
//! A connection holds a watch for its whole life, so "all watches dropped" means "all connections closed"; the
//! trigger needs no registry of connections.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainStrategy {
    /// Envoy's default: the chance that a protocol-aware filter closes grows over the drain time.
    Gradual,
    /// Every protocol-aware filter closes as soon as it can.
    Immediate,
}

/// When a drain may end before its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// As soon as every holder is gone.
    Empty,
    /// Not before the deadline, so that late arrivals are drained too.
    Deadline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    Draining { started: Instant, deadline: Instant, strategy: DrainStrategy },
    Closed,
}

/// The drain's owner. Dropping it without draining is allowed; watches then see nothing change.
#[derive(Debug)]
pub struct DrainTrigger {
    tx: watch::Sender<Phase>,
}

/// Held by everything the drain must wait for.
#[derive(Debug, Clone)]
pub struct DrainWatch {
    rx: watch::Receiver<Phase>,
}

impl Default for DrainTrigger {
    fn default() -> Self {
        Self::new()
    }
}

impl DrainTrigger {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Phase::Serving);
        DrainTrigger { tx }
    }

    pub fn watch(&self) -> DrainWatch {
        DrainWatch { rx: self.tx.subscribe() }
    }
    pub fn phase(&self) -> Phase {
        *self.tx.borrow()
    }

    /// Starts the graceful phase without waiting (a later [`DrainTrigger::drain`] keeps the first deadline).
    pub fn start(&self, drain_time: Duration, strategy: DrainStrategy) {
        let now = Instant::now();
        // A huge --drain-time-s means "wait a very long time", not an overflow.
        let deadline = now.checked_add(drain_time).unwrap_or(now + Duration::from_secs(100 * 365 * 86_400));
        self.tx.send_if_modified(|p| {
            if *p == Phase::Serving {
                *p = Phase::Draining { started: now, deadline, strategy };
                true
            } else {
                false
            }
        });
    }

    /// Forces every holder to close now.
    pub fn close(&self) {
        self.tx.send_if_modified(|p| {
            let changed = *p != Phase::Closed;
            *p = Phase::Closed;
            changed
        });
    }

    /// Drains: graceful until `drain_time` has passed, then forced. With `Until::Empty` it ends as soon as every
    /// holder left (process shutdown); with `Until::Deadline` it stays graceful until the deadline even when empty,
    /// because a connection accepted by an old accept loop an instant before the update may still pick this chain
    /// (Envoy also keeps a drained listener for the whole drain time). Returns once every holder is gone or
    /// `force_grace` after the forced close, whichever is first; the result says whether all holders left.
    pub async fn drain(
        &self,
        drain_time: Duration,
        strategy: DrainStrategy,
        force_grace: Duration,
        until: Until,
    ) -> bool {
        self.start(drain_time, strategy);
        let deadline = match self.phase() {
            Phase::Draining { deadline, .. } => deadline,
            Phase::Serving | Phase::Closed => Instant::now(),
        };
        if tokio::time::timeout_at(deadline, self.tx.closed()).await.is_ok() {
            if until == Until::Empty {
                // Nobody will arrive later (the process is going): anyone who does closes at once.
                self.close();
                return true;
            }
            tokio::time::sleep_until(deadline).await;
        }
        self.close();
        tokio::time::timeout(force_grace, self.tx.closed()).await.is_ok()
    }
}

impl DrainWatch {
    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }

    /// Resolves once draining has begun (or the trigger is gone, which also means nobody will serve this).
    pub async fn draining(&mut self) {
        let _ = self.rx.wait_for(|p| *p != Phase::Serving).await;
    }

    /// Resolves once the drain is forced; the holder must close now.
    pub async fn closed(&mut self) {
        let _ = self.rx.wait_for(|p| *p == Phase::Closed).await;
    }

    /// Whether a protocol-aware filter should close its connection now (Envoy's `drainClose()`): never while
    /// serving, always when immediate or forced, and with a probability that grows linearly over the drain time
    /// when gradual.
    pub fn should_close(&self, now: Instant, roll: f64) -> bool {
        match self.phase() {
            Phase::Serving => false,
            Phase::Closed => true,
            Phase::Draining { strategy: DrainStrategy::Immediate, .. } => true,
            Phase::Draining { started, deadline, strategy: DrainStrategy::Gradual } => {
                let total = deadline.saturating_duration_since(started).as_secs_f64();
                if total <= 0.0 {
                    return true;
                }
                let elapsed = now.saturating_duration_since(started).as_secs_f64();
                roll < elapsed / total
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_returns_when_the_last_holder_leaves() {
        let t = DrainTrigger::new();
        let mut w = t.watch();
        let holder = tokio::spawn(async move {
            w.draining().await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        });
        let start = Instant::now();
        assert!(
            t.drain(Duration::from_secs(600), DrainStrategy::Immediate, Duration::from_secs(1), Until::Empty).await
        );
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert!(holder.await.is_ok());
        assert_eq!(t.phase(), Phase::Closed, "a late arrival closes at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_listener_drain_lasts_until_its_deadline_and_then_closes_late_arrivals() {
        let t = DrainTrigger::new();
        let start = Instant::now();
        assert!(
            t.drain(Duration::from_secs(5), DrainStrategy::Immediate, Duration::from_secs(1), Until::Deadline).await
        );
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(t.phase(), Phase::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_forces_close_at_the_deadline() {
        let t = DrainTrigger::new();
        let mut w = t.watch();
        let holder = tokio::spawn(async move {
            w.closed().await;
            Instant::now()
        });
        let start = Instant::now();
        assert!(t.drain(Duration::from_secs(10), DrainStrategy::Gradual, Duration::from_secs(1), Until::Empty).await);
        let closed_at = holder.await.ok();
        assert_eq!(closed_at.map(|c| c - start), Some(Duration::from_secs(10)));
        assert_eq!(t.phase(), Phase::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_that_ignores_the_close_is_reported() {
        let t = DrainTrigger::new();
        let _stuck = t.watch();
        assert!(!t.drain(Duration::from_secs(1), DrainStrategy::Immediate, Duration::from_secs(1), Until::Empty).await);
    }

    #[tokio::test(start_paused = true)]
    async fn gradual_close_probability_grows_over_the_drain_time() {
        let t = DrainTrigger::new();
        let w = t.watch();
        let now = Instant::now();
        assert!(!w.should_close(now, 0.0));
        t.start(Duration::from_secs(100), DrainStrategy::Gradual);
        assert!(!w.should_close(now + Duration::from_secs(25), 0.3));
        assert!(w.should_close(now + Duration::from_secs(25), 0.2));
        assert!(w.should_close(now + Duration::from_secs(100), 0.99));
        t.close();
        assert!(w.should_close(now, 0.99));
    }
}
