//! The one body type that flows through the proxy in both directions: a peer's streaming body passed on frame by
//! frame (never collected), or a local reply's bytes. A streamed body can carry the HCM's `stream_idle_timeout` (no
//! frame for that long ends the stream with an error, which resets it on both sides), for an upstream HTTP/1.1
//! response, the lease on its pooled connection, given back when the body has been read to the end, and what the
//! request holds for its stream's life (circuit-breaker slot, active gauge), released when the body ends.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::access_log::{self, AccessLog, Entry, Flag};
use crate::stats::{Counter, GaugeGuard, Histogram};
use crate::upstream::cluster::RequestSlot;
use crate::upstream::pool::Lease;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
pub enum ProxyBody {
    Empty,
    Bytes(Option<Bytes>),
    Stream(Incoming),
    Watched(Box<Watched>),
    /// A response whose access log line is written when it ends (or is abandoned).
    Logged(Box<Logged>),
    /// One attempt's view of a request body kept for retries.
    Replay(Box<Attempt>),
    /// A response body under the fault filter's `response_rate_limit`.
    Throttled(Box<Throttle>),
    /// A request body a mirror policy copies.
    Mirrored(Box<Tee>),
}

/// A request body passed on frame by frame while its frames are kept (up to the buffer limit) for the shadow
/// requests, which go out once the request is complete, as Envoy's router shadows it. Past the limit nothing is kept,
/// the shadows are abandoned and `retry_or_shadow_abandoned` counts it; a body that fails or is dropped unfinished
/// sends no shadow.
#[derive(Debug)]
pub struct Tee {
    inner: ProxyBody,
    /// The body's data frames as received (`Bytes` share them with the frames passed on), and their length. Frames
    /// under [`SHARE_MIN`] are copied into `tail` instead: a tiny shared frame would keep its whole read buffer
    /// alive, so a body of one-byte chunks would hold many times the limit.
    kept: Vec<Bytes>,
    tail: bytes::BytesMut,
    kept_len: usize,
    limit: usize,
    shadows: Vec<tokio::sync::oneshot::Sender<Option<Bytes>>>,
    abandoned: Counter,
}

/// The smallest data frame a [`Tee`] keeps shared rather than copied.
const SHARE_MIN: usize = 1024;

impl Tee {
    /// Wraps `inner`; each receiver gets the whole body when it has been read, or None if it outgrew `limit`.
    pub fn wrap(inner: ProxyBody, limit: u32, abandoned: Counter, shadows: usize) -> (ProxyBody, Vec<ShadowBody>) {
        let mut senders = Vec::with_capacity(shadows);
        let mut receivers = Vec::with_capacity(shadows);
        for _ in 0..shadows {
            let (tx, rx) = tokio::sync::oneshot::channel();
            senders.push(tx);
            receivers.push(ShadowBody(rx));
        }
        let tee = Tee {
            inner,
            kept: Vec::new(),
            tail: bytes::BytesMut::new(),
            kept_len: 0,
            limit: limit as usize,
            shadows: senders,
            abandoned,
        };
        (ProxyBody::Mirrored(Box::new(tee)), receivers)
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && !self.shadows.is_empty()
                {
                    if self.kept_len + data.len() > self.limit {
                        tracing::debug!(limit = self.limit, "request body exceeds the buffer limit: no shadow");
                        self.abandoned.inc();
                        for tx in self.shadows.drain(..) {
                            let _ = tx.send(None);
                        }
                        self.kept = Vec::new();
                        self.tail = bytes::BytesMut::new();
                    } else if data.len() < SHARE_MIN {
                        self.kept_len += data.len();
                        self.tail.extend_from_slice(data);
                    } else {
                        self.kept_len += data.len();
                        if !self.tail.is_empty() {
                            self.kept.push(self.tail.split().freeze());
                        }
                        self.kept.push(data.clone());
                    }
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Err(_))) => self.shadows.clear(),
            Poll::Pending => {}
        }
        polled
    }

    fn finish(&mut self) {
        if !self.tail.is_empty() {
            self.kept.push(self.tail.split().freeze());
        }
        // A body that came in one frame goes to the shadows as it is; only one in several frames is joined.
        let body = match std::mem::take(&mut self.kept).as_mut_slice() {
            [] => Bytes::new(),
            [one] => std::mem::take(one),
            several => several.concat().into(),
        };
        for tx in self.shadows.drain(..) {
            let _ = tx.send(Some(body.clone()));
        }
    }
}

/// A shadow request's body: the whole request body once it is complete (see [`Tee`]).
#[derive(Debug)]
pub struct ShadowBody(tokio::sync::oneshot::Receiver<Option<Bytes>>);

impl ShadowBody {
    /// The body, or None when there will be none to send (too large, or the request failed).
    pub async fn wait(self) -> Option<Bytes> {
        self.0.await.ok().flatten()
    }
}

impl Watched {
    /// A max_stream_duration (the stream's or the upstream request's) ran out: counted, its hold released as a
    /// reset, the body failed with which one it was.
    fn expire(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let cause = match self.deadline.take() {
            Some((_, expired, cause)) => {
                expired.inc();
                cause
            }
            None => DurationTimeout::Stream,
        };
        self.hold.reset(false);
        Poll::Ready(Some(Err(cause.into())))
    }
}

/// Envoy's StreamRateLimiter for the fault filter's `response_rate_limit`: a token bucket refilled 16 times a second
/// with a sixteenth of the limit, starting with one refill's worth; data frames go out as the tokens allow, split
/// where a frame is larger than what is left. Other frames (trailers) pass in order.
#[derive(Debug)]
pub struct Throttle {
    inner: ProxyBody,
    per_tick: usize,
    tokens: usize,
    tick: Pin<Box<Sleep>>,
    pending: Option<Bytes>,
    _active: super::fault::ActiveFault,
}

/// The refill period: Envoy's 1/16 s.
const THROTTLE_TICK: Duration = Duration::from_micros(62_500);

impl Throttle {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.pending.is_none() {
                match Pin::new(&mut self.inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) if data.is_empty() => continue,
                        Ok(data) => self.pending = Some(data),
                        Err(other) => return Poll::Ready(Some(Ok(other))),
                    },
                    other => return other,
                }
            }
            if self.tokens == 0 {
                match self.tick.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.tokens = self.per_tick;
                        let next = self.tick.deadline() + THROTTLE_TICK;
                        self.tick.as_mut().reset(next.max(Instant::now()));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            let Some(data) = self.pending.as_mut() else { continue };
            let chunk = if data.len() <= self.tokens {
                self.pending.take().unwrap_or_default()
            } else {
                data.split_to(self.tokens)
            };
            self.tokens -= chunk.len();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
    }
}

/// A request body kept for retries while it streams to the first attempt: Envoy buffers a request body for retries
/// up to the downstream connection's buffer limit (`per_connection_buffer_limit_bytes`) and, past it, stops retrying
/// (`retry_or_shadow_abandoned`), not the request. Each attempt replays what was kept, then reads on from the
/// downstream; an attempt superseded by a retry fails if it is polled again, so only one attempt reads the downstream.
/// The data is kept as received (`Bytes` share it), never copied.
#[derive(Debug, Clone)]
pub struct Replay {
    shared: Arc<Mutex<Kept>>,
}

#[derive(Debug)]
struct Kept {
    /// The downstream body, with its idle timeout and progress count.
    source: ProxyBody,
    chunks: Vec<Chunk>,
    bytes: usize,
    limit: usize,
    /// Past the limit: nothing is kept any more and no attempt can follow.
    overflowed: bool,
    /// The downstream body has been read to its end.
    ended: bool,
    /// The attempt allowed to read on.
    current: u32,
    abandoned: Counter,
}

#[derive(Debug)]
enum Chunk {
    Data(Bytes),
    Trailers(http::HeaderMap),
}

/// One attempt's request body (see [`Replay`]).
#[derive(Debug)]
pub struct Attempt {
    shared: Arc<Mutex<Kept>>,
    attempt: u32,
    /// The next kept chunk to send.
    next: usize,
    /// Set once this attempt sent the body to its end: its connection may then be reused.
    sent: Arc<Progress>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body superseded by a retry")]
struct Superseded;

impl Replay {
    pub fn new(source: ProxyBody, limit: u32, abandoned: Counter) -> Self {
        let kept = Kept {
            source,
            chunks: Vec::new(),
            bytes: 0,
            limit: limit as usize,
            overflowed: false,
            ended: false,
            current: 0,
            abandoned,
        };
        Replay { shared: Arc::new(Mutex::new(kept)) }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether another attempt can still be made with the whole body.
    pub fn replayable(&self) -> bool {
        !self.kept().overflowed
    }

    /// The body for the next attempt (earlier attempts' bodies stop), and its sent-to-the-end progress.
    pub fn attempt(&self) -> (ProxyBody, Arc<Progress>) {
        let mut kept = self.kept();
        kept.current += 1;
        let sent = Arc::new(Progress::default());
        let attempt = Attempt { shared: self.shared.clone(), attempt: kept.current, next: 0, sent: sent.clone() };
        (ProxyBody::Replay(Box::new(attempt)), sent)
    }
}

impl Kept {
    /// Keeps a frame read from the downstream; false once the body outgrew the limit.
    fn keep(&mut self, frame: &Frame<Bytes>) -> bool {
        if self.overflowed {
            return false;
        }
        let len = frame.data_ref().map_or(0, Bytes::len);
        if self.bytes + len > self.limit {
            tracing::debug!(limit = self.limit, "request body exceeds the buffer limit: giving up on retries");
            self.abandoned.inc();
            self.overflowed = true;
            self.chunks = Vec::new();
            return false;
        }
        let chunk = match (frame.data_ref(), frame.trailers_ref()) {
            (Some(d), _) => Chunk::Data(d.clone()),
            (None, Some(t)) => Chunk::Trailers(t.clone()),
            (None, None) => return false,
        };
        self.bytes += len;
        self.chunks.push(chunk);
        true
    }
}

impl Attempt {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut guard = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let kept = &mut *guard;
        if kept.current != self.attempt {
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        if !kept.overflowed && self.next < kept.chunks.len() {
            let frame = match &kept.chunks[self.next] {
                Chunk::Data(d) => Frame::data(d.clone()),
                Chunk::Trailers(t) => Frame::trailers(t.clone()),
            };
            self.next += 1;
            if kept.ended && self.next == kept.chunks.len() {
                self.sent.set_done();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if kept.ended {
            self.sent.set_done();
            return Poll::Ready(None);
        }
        match Pin::new(&mut kept.source).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if kept.keep(&frame) {
                    self.next += 1;
                }
                if kept.source.is_end_stream() {
                    kept.ended = true;
                    self.sent.set_done();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                kept.ended = true;
                self.sent.set_done();
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        let kept = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        kept.current == self.attempt && kept.ended && (kept.overflowed || self.next >= kept.chunks.len())
    }

    fn size_hint(&self) -> SizeHint {
        let kept = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let rest = kept.source.size_hint();
        let replayed = if kept.overflowed { 0 } else { kept.bytes.saturating_sub(self.sent_so_far(&kept)) as u64 };
        match rest.exact() {
            Some(n) => SizeHint::with_exact(n + replayed),
            None => {
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + replayed);
                hint
            }
        }
    }

    /// Bytes of the kept chunks this attempt has already sent.
    fn sent_so_far(&self, kept: &Kept) -> usize {
        kept.chunks.iter().take(self.next).map(|c| if let Chunk::Data(d) = c { d.len() } else { 0 }).sum()
    }
}

/// A response body that counts what it sent and logs its request when it is done.
#[derive(Debug)]
pub struct Logged {
    inner: ProxyBody,
    sent: u64,
    ended: bool,
    began: Instant,
    entry: Option<Entry>,
    logs: Arc<[AccessLog]>,
    /// The flag of the duration limit that ended the body, if one did.
    cut: Option<Flag>,
}

impl Logged {
    pub fn wrap(inner: ProxyBody, entry: Entry, began: Instant, logs: Arc<[AccessLog]>) -> ProxyBody {
        ProxyBody::Logged(Box::new(Logged { inner, sent: 0, ended: false, began, entry: Some(entry), logs, cut: None }))
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(mut e) = self.entry.take() {
            e.duration = self.began.elapsed();
            e.bytes_sent = self.sent;
            // A duration limit that cut the body is the proxy's own reset, not the client's going away.
            if let Some(flag) = self.cut {
                e.flags.push(flag);
            } else if !self.ended && !self.inner.is_end_stream() {
                e.flags.push(Flag::DownstreamConnectionTermination);
            }
            access_log::log_all(&self.logs, &e);
        }
    }
}

/// A streamed body with an idle timeout, a connection lease, a progress count and/or what its stream holds.
#[derive(Debug)]
pub struct Watched {
    inner: Incoming,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    /// When a max_stream_duration (the stream's or the upstream request's) ends the body, and the counter it bumps.
    deadline: Option<(Pin<Box<Sleep>>, Counter, DurationTimeout)>,
    lease: Option<Lease>,
    count: Option<Arc<Progress>>,
    hold: StreamHold,
}

/// What a request holds for as long as its stream lives, which in Envoy ends when the response is complete or the
/// stream is reset, not when the response headers go out: the `max_requests` circuit-breaker slot and the
/// `downstream_rq_active` gauge. Also when the upstream request began, for `upstream_rq_time`, which Envoy records
/// when the upstream response is complete.
#[derive(Debug, Default)]
pub struct StreamHold {
    pub slot: Option<RequestSlot>,
    pub active: Option<GaugeGuard>,
    /// The request counted in flight on its downstream connection (for its idle timeout and drain).
    pub(super) request: Option<super::ActiveRequest>,
    pub timing: Option<(Histogram, Instant)>,
    /// `downstream_rq_rx_reset`, counted if the stream is dropped before its response is complete.
    pub downstream_rx_reset: Option<CountOnDrop>,
    /// `downstream_rq_tx_reset`, counted if we end the response early.
    pub downstream_tx_reset: Option<Counter>,
    /// The cluster's `upstream_rq_tx_reset`, counted if the upstream response is still streaming when the stream
    /// is dropped or timed out (we reset the upstream request then).
    pub upstream_tx_reset: Option<CountOnDrop>,
}

impl StreamHold {
    fn is_empty(&self) -> bool {
        self.slot.is_none()
            && self.active.is_none()
            && self.request.is_none()
            && self.timing.is_none()
            && self.downstream_rx_reset.is_none()
            && self.upstream_tx_reset.is_none()
    }

    fn merge(&mut self, other: StreamHold) {
        fn keep<T>(mine: &mut Option<T>, theirs: Option<T>, retire: impl FnOnce(T)) {
            if let Some(t) = theirs
                && let Some(old) = mine.replace(t)
            {
                retire(old);
            }
        }
        keep(&mut self.slot, other.slot, drop);
        keep(&mut self.active, other.active, drop);
        keep(&mut self.request, other.request, drop);
        keep(&mut self.timing, other.timing, drop);
        keep(&mut self.downstream_rx_reset, other.downstream_rx_reset, CountOnDrop::disarm);
        keep(&mut self.downstream_tx_reset, other.downstream_tx_reset, drop);
        keep(&mut self.upstream_tx_reset, other.upstream_tx_reset, CountOnDrop::disarm);
    }

    /// The response is complete (for an upgrade: its tunnel closed): the request's time is recorded and what it held
    /// is released.
    pub(super) fn complete(&mut self) {
        self.record_time();
        if let Some(g) = self.downstream_rx_reset.take() {
            g.disarm();
        }
        if let Some(g) = self.upstream_tx_reset.take() {
            g.disarm();
        }
        *self = StreamHold::default();
    }

    /// Records `upstream_rq_time` now (once: later calls and `complete` record nothing more).
    pub(super) fn record_time(&mut self) {
        if let Some((histogram, since)) = self.timing.take() {
            histogram.record(since.elapsed().as_secs_f64() * 1000.0);
        }
    }

    /// We end the stream early: released without a time (Envoy records none for an incomplete response), counted
    /// as a reset we sent downstream, and upstream too unless the upstream is what failed.
    pub(super) fn reset(&mut self, upstream_failed: bool) {
        if let Some(g) = self.downstream_rx_reset.take() {
            g.disarm();
        }
        if let Some(c) = self.downstream_tx_reset.take() {
            c.inc();
        }
        if upstream_failed && let Some(g) = self.upstream_tx_reset.take() {
            g.disarm();
        }
        *self = StreamHold::default();
    }
}

/// A counter bumped if this is dropped still armed: a stream or upstream request that ended unfinished.
#[derive(Debug)]
pub struct CountOnDrop(Option<Counter>);

impl CountOnDrop {
    pub fn new(counter: &Counter) -> Self {
        CountOnDrop(Some(counter.clone()))
    }

    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.inc();
        }
    }
}

/// How far a request body has been forwarded: for BYTES_RECEIVED and for `request_timeout`, which stops counting
/// once the last byte went upstream.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    pub done: std::sync::atomic::AtomicBool,
    finished: tokio::sync::Notify,
    /// When the body was complete: where Envoy's `upstream_rq_time` starts.
    finished_at: std::sync::OnceLock<Instant>,
}

impl Progress {
    fn set_done(&self) {
        let _ = self.finished_at.set(Instant::now());
        self.done.store(true, Ordering::Relaxed);
        self.finished.notify_waiters();
    }

    /// When the whole body had been forwarded, if it has.
    pub fn finished_at(&self) -> Option<Instant> {
        self.finished_at.get().copied()
    }

    /// Resolves once the whole request body has been forwarded.
    pub async fn finished(&self) {
        loop {
            let notified = self.finished.notified();
            if self.done.load(Ordering::Relaxed) {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("stream idle timeout")]
pub struct StreamIdleTimeout;

/// Which max_stream_duration ended a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DurationTimeout {
    /// The stream's (route or connection manager).
    #[error("downstream duration timeout")]
    Stream,
    /// The upstream request's (cluster, or `x-envoy-upstream-stream-duration-ms`).
    #[error("upstream max stream duration reached")]
    Upstream,
}

impl DurationTimeout {
    /// The access log flag Envoy sets for it.
    pub fn flag(self) -> Flag {
        match self {
            DurationTimeout::Stream => Flag::DurationTimeout,
            DurationTimeout::Upstream => Flag::UpstreamMaxStreamDurationReached,
        }
    }
}

impl ProxyBody {
    pub fn text(s: impl Into<Bytes>) -> Self {
        let b = s.into();
        if b.is_empty() { ProxyBody::Empty } else { ProxyBody::Bytes(Some(b)) }
    }

    /// A streamed body that fails once no frame arrived for `idle` (None: no limit) and that gives `lease` back when
    /// it has been read to the end.
    pub fn stream(inner: Incoming, idle: Option<Duration>, lease: Option<Lease>, count: Option<Arc<Progress>>) -> Self {
        if inner.is_end_stream() {
            if let Some(c) = &count {
                c.set_done();
            }
            // Nothing to read (a bodiless response): the connection is free now.
            if let Some(l) = lease {
                l.give_back();
            }
            return ProxyBody::Stream(inner);
        }
        if idle.is_none() && lease.is_none() && count.is_none() {
            return ProxyBody::Stream(inner);
        }
        let idle = idle.map(|t| (t, Box::pin(tokio::time::sleep(t))));
        ProxyBody::Watched(Box::new(Watched { inner, idle, deadline: None, lease, count, hold: StreamHold::default() }))
    }

    /// This (response) body at most `kbps` KiB/s (the fault filter's `response_rate_limit`); `active` counts the fault
    /// until the body is done.
    pub fn throttle(&mut self, kbps: u64, active: super::fault::ActiveFault) {
        let inner = std::mem::replace(self, ProxyBody::Empty);
        let per_tick = usize::try_from(kbps.saturating_mul(1024) / 16).unwrap_or(usize::MAX).max(1);
        *self = ProxyBody::Throttled(Box::new(Throttle {
            inner,
            per_tick,
            tokens: per_tick,
            tick: Box::pin(tokio::time::sleep(THROTTLE_TICK)),
            pending: None,
            _active: active,
        }));
    }

    /// Ends this (response) body with an error at `at`, counting `expired`, if it is still streaming then: the rest
    /// of Envoy's max_stream_duration once the response has begun (the stream is reset). Of two deadlines (the
    /// stream's and the upstream request's) the earlier stands.
    pub fn deadline(&mut self, at: Instant, expired: Counter, cause: DurationTimeout) {
        match self {
            ProxyBody::Watched(w) => {
                if w.deadline.as_ref().is_none_or(|(d, ..)| at < d.deadline()) {
                    w.deadline = Some((Box::pin(tokio::time::sleep_until(at)), expired, cause));
                }
            }
            ProxyBody::Logged(l) => l.inner.deadline(at, expired, cause),
            ProxyBody::Throttled(t) => t.inner.deadline(at, expired, cause),
            ProxyBody::Stream(s) if !s.is_end_stream() => {
                let ProxyBody::Stream(inner) = std::mem::replace(self, ProxyBody::Empty) else { return };
                *self = ProxyBody::Watched(Box::new(Watched {
                    inner,
                    idle: None,
                    deadline: Some((Box::pin(tokio::time::sleep_until(at)), expired, cause)),
                    lease: None,
                    count: None,
                    hold: StreamHold::default(),
                }));
            }
            ProxyBody::Stream(_)
            | ProxyBody::Empty
            | ProxyBody::Bytes(_)
            | ProxyBody::Replay(_)
            | ProxyBody::Mirrored(_) => {}
        }
    }

    /// Keeps `hold` until this (response) body has been sent to its end, or released when it is dropped unfinished.
    /// A body already complete (a local reply, a bodiless response) completes it now.
    pub fn hold(&mut self, hold: StreamHold) {
        if hold.is_empty() {
            return;
        }
        match self {
            ProxyBody::Watched(w) => w.hold.merge(hold),
            ProxyBody::Logged(l) => l.inner.hold(hold),
            ProxyBody::Throttled(t) => t.inner.hold(hold),
            ProxyBody::Stream(s) if !s.is_end_stream() => {
                // Rare (no stream_idle_timeout and no pooled connection to give back): only then does holding cost
                // a box of its own.
                let ProxyBody::Stream(inner) = std::mem::replace(self, ProxyBody::Empty) else { return };
                *self = ProxyBody::Watched(Box::new(Watched {
                    inner,
                    idle: None,
                    deadline: None,
                    lease: None,
                    count: None,
                    hold,
                }));
            }
            ProxyBody::Stream(_)
            | ProxyBody::Empty
            | ProxyBody::Bytes(_)
            | ProxyBody::Replay(_)
            | ProxyBody::Mirrored(_) => {
                let mut hold = hold;
                hold.complete();
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Bytes(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream(s) => Pin::new(s).poll_frame(cx).map_err(Into::into),
            ProxyBody::Replay(a) => a.poll_frame(cx),
            ProxyBody::Throttled(t) => t.poll_frame(cx),
            ProxyBody::Mirrored(t) => t.poll_frame(cx),
            ProxyBody::Logged(l) => {
                let polled = Pin::new(&mut l.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(f))) => {
                        l.sent += f.data_ref().map_or(0, |d| d.len() as u64);
                        l.ended = l.inner.is_end_stream();
                    }
                    Poll::Ready(None) => l.ended = true,
                    Poll::Ready(Some(Err(e))) => {
                        l.cut = e.downcast_ref::<DurationTimeout>().map(|d| d.flag());
                    }
                    Poll::Pending => {}
                }
                polled
            }
            ProxyBody::Watched(w) => match Pin::new(&mut w.inner).poll_frame(cx) {
                // A body that never waits still ends at its deadline.
                Poll::Ready(Some(Ok(_)))
                    if w.deadline.as_ref().is_some_and(|(at, ..)| at.deadline() <= Instant::now()) =>
                {
                    w.expire()
                }
                Poll::Ready(frame) => {
                    if let Some((timeout, sleep)) = &mut w.idle {
                        sleep.as_mut().reset(Instant::now() + *timeout);
                    }
                    let failed = matches!(frame, Some(Err(_)));
                    if let (Some(count), Some(Ok(f))) = (&w.count, &frame)
                        && let Some(d) = f.data_ref()
                    {
                        count.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                    if let Some(count) = &w.count
                        && !failed
                        && (frame.is_none() || w.inner.is_end_stream())
                    {
                        count.set_done();
                    }
                    // hyper stops polling once a body says it has ended, so the lease goes back with the last frame.
                    let ended = frame.is_none() || w.inner.is_end_stream();
                    if !failed
                        && ended
                        && let Some(l) = w.lease.take()
                    {
                        l.give_back();
                    }
                    if failed {
                        w.hold.reset(true);
                    } else if ended {
                        w.hold.complete();
                    }
                    Poll::Ready(frame.map(|f| f.map_err(Into::into)))
                }
                Poll::Pending => match &mut w.idle {
                    _ if w.deadline.as_mut().is_some_and(|(at, ..)| at.as_mut().poll(cx).is_ready()) => w.expire(),
                    Some((_, sleep)) => match sleep.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            w.hold.reset(false);
                            Poll::Ready(Some(Err(StreamIdleTimeout.into())))
                        }
                        Poll::Pending => Poll::Pending,
                    },
                    None => Poll::Pending,
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Bytes(b) => b.is_none(),
            ProxyBody::Stream(s) => s.is_end_stream(),
            ProxyBody::Watched(w) => w.inner.is_end_stream(),
            ProxyBody::Logged(l) => l.inner.is_end_stream(),
            ProxyBody::Replay(a) => a.is_end_stream(),
            ProxyBody::Throttled(t) => t.pending.is_none() && t.inner.is_end_stream(),
            ProxyBody::Mirrored(t) => t.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Bytes(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Stream(s) => s.size_hint(),
            ProxyBody::Watched(w) => w.inner.size_hint(),
            ProxyBody::Logged(l) => l.inner.size_hint(),
            ProxyBody::Replay(a) => a.size_hint(),
            ProxyBody::Mirrored(t) => t.inner.size_hint(),
            ProxyBody::Throttled(t) => {
                let inner = t.inner.size_hint();
                let pending = t.pending.as_ref().map_or(0, |p| p.len() as u64);
                // Upper first: a fresh hint's lower bound is 0, so neither call can cross the other.
                let mut hint = SizeHint::new();
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(pending));
                }
                hint.set_lower(inner.lower().saturating_add(pending));
                hint
            }
        }
    }
}
