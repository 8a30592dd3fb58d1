//! The one body type that flows through the proxy in both directions: a peer's streaming body passed on frame by
//! frame (never collected), or a local reply's bytes. A streamed body can carry the HCM's `stream_idle_timeout`:
//! no frame for that long ends the stream with an error, which resets it on both sides.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
pub enum ProxyBody {
    Empty,
    Bytes(Option<Bytes>),
    Stream(Incoming),
    /// A stream under an idle timeout.
    Idle(Box<IdleStream>),
}

#[derive(Debug)]
pub struct IdleStream {
    inner: Incoming,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

#[derive(Debug, thiserror::Error)]
#[error("stream idle timeout")]
pub struct StreamIdleTimeout;

impl ProxyBody {
    pub fn text(s: impl Into<Bytes>) -> Self {
        let b = s.into();
        if b.is_empty() { ProxyBody::Empty } else { ProxyBody::Bytes(Some(b)) }
    }

    /// A streamed body that fails once no frame arrived for `timeout` (None: no limit).
    pub fn stream(inner: Incoming, timeout: Option<Duration>) -> Self {
        match timeout {
            Some(timeout) => {
                ProxyBody::Idle(Box::new(IdleStream { inner, timeout, sleep: Box::pin(tokio::time::sleep(timeout)) }))
            }
            None => ProxyBody::Stream(inner),
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
            ProxyBody::Idle(idle) => match Pin::new(&mut idle.inner).poll_frame(cx) {
                Poll::Ready(frame) => {
                    let next = Instant::now() + idle.timeout;
                    idle.sleep.as_mut().reset(next);
                    Poll::Ready(frame.map(|f| f.map_err(Into::into)))
                }
                Poll::Pending => match idle.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(StreamIdleTimeout.into()))),
                    Poll::Pending => Poll::Pending,
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Bytes(b) => b.is_none(),
            ProxyBody::Stream(s) => s.is_end_stream(),
            ProxyBody::Idle(i) => i.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Bytes(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Stream(s) => s.size_hint(),
            ProxyBody::Idle(i) => i.inner.size_hint(),
        }
    }
}
