//! The one body type the router sends and returns, and the client body's stall timer.
//!
//! Requests and responses either stream straight through from hyper ([`Body::Incoming`], an
//! upstream's response or an empty request body), stream from a client under a stall timer
//! ([`Body::Client`]), were buffered by the router ([`Body::Full`], for bodies it had to read or
//! may retry), or were partly buffered before the router learned they are too big to keep
//! ([`Body::Prefixed`]). An enum instead of a boxed trait object keeps the request path free of
//! per-request boxing.
//!
//! A client that declares a body and then stops sending it is the client's fault, not Loom's:
//! [`ClientBody`] fails with [`ClientTimeout`] after `[limits] body_read_timeout` without a byte
//! (nginx's `client_body_timeout`), and tells the proxy, through [`BodyProgress`], whether a
//! deadline found the router waiting on the client. Both become 408 `client_timeout`.
//!
//! This file must not decide when to buffer; `http/forward.rs` and `proxy/` do (`client.rs`
//! reads a node body, `peer.rs` keeps a write for a retry).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// The error a body (and a transport carrying one) fails with. Defined here, the lowest layer
/// that needs it, so that bodies depend on nothing else in the crate.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
pub enum Body {
    /// Bytes the router holds; `None` once sent.
    Full(Option<Bytes>),
    /// Streamed from an upstream as it arrives (or a request body that is empty).
    Incoming(Incoming),
    /// Streamed from a client as it arrives, under the stall timer. Boxed: only requests with
    /// a body pay for the timer's state, and every `Body` moved on the request path (reads
    /// included) stays as small as hyper's own (callgrind: 364 more instructions of copying
    /// per proxied read with it inline).
    Client(Box<ClientBody>),
    /// The first bytes of a client body were read into memory, the rest still streams.
    Prefixed {
        prefix: Option<Bytes>,
        rest: Box<ClientBody>,
    },
}

impl Body {
    pub fn empty() -> Self {
        Self::Full(None)
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Self::Full(None)
        } else {
            Self::Full(Some(bytes))
        }
    }

    /// A client's request body: streamed under a stall timer of `stall`, unless it is empty.
    pub fn from_client(body: Incoming, stall: Duration) -> Self {
        if http_body::Body::is_end_stream(&body) {
            // Nothing to wait for: no timer, no allocation.
            Self::Incoming(body)
        } else {
            Self::Client(Box::new(ClientBody::new(body, stall)))
        }
    }

    /// How far the client has sent this body, if it still streams from the client.
    pub fn progress(&self) -> Option<BodyProgress> {
        match self {
            Self::Client(body) | Self::Prefixed { rest: body, .. } => Some(body.progress()),
            Self::Full(_) | Self::Incoming(_) => None,
        }
    }
}

impl From<Incoming> for Body {
    fn from(body: Incoming) -> Self {
        Self::Incoming(body)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Incoming(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Client(body) => Pin::new(body.as_mut()).poll_frame(cx),
            Self::Prefixed { prefix, rest } => match prefix.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Pin::new(rest.as_mut()).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Incoming(body) => body.is_end_stream(),
            Self::Client(body) => body.is_end_stream(),
            Self::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Incoming(body) => body.size_hint(),
            Self::Client(body) => body.size_hint(),
            Self::Prefixed { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + extra);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

/// The client sent none of its declared body's remaining bytes for this long.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the client sent no body bytes for {0:?}")]
pub struct ClientTimeout(pub Duration);

/// The [`ClientTimeout`] an error is, or has in its source chain: how long the client stalled.
pub fn client_timeout(error: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(ClientTimeout(after)) = e.downcast_ref::<ClientTimeout>() {
            return Some(*after);
        }
        next = e.source();
    }
    None
}

/// Where a client body stands, shared between the body (polled inside hyper's client) and the
/// proxy (which learns why a deadline passed).
const FLOWING: u8 = 0;
const WAITING_ON_CLIENT: u8 = 1;
const COMPLETE: u8 = 2;

/// A client's request body with a stall timer. The timer runs only while the router is waiting
/// for the client's next bytes, never while the upstream is slow to take them.
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    stall: Duration,
    /// Armed while waiting on the client; boxed because `Sleep` is not `Unpin`. Created on the
    /// first wait, so a body that arrives with its head costs no timer.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    state: Arc<AtomicU8>,
}

/// A view of a [`ClientBody`]'s progress that outlives handing the body to hyper.
#[derive(Debug, Clone)]
pub struct BodyProgress(Arc<AtomicU8>);

impl BodyProgress {
    /// The router was waiting for the client's next bytes, which had not come.
    pub fn waiting_on_client(&self) -> bool {
        self.0.load(Ordering::Relaxed) == WAITING_ON_CLIENT
    }
}

impl ClientBody {
    pub fn new(inner: Incoming, stall: Duration) -> Self {
        Self {
            inner,
            stall,
            timer: None,
            armed: false,
            state: Arc::new(AtomicU8::new(FLOWING)),
        }
    }

    pub fn progress(&self) -> BodyProgress {
        BodyProgress(self.state.clone())
    }

    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Relaxed);
    }

    /// Start the stall timer if it is not running; `Ready` once it has run out.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = Instant::now() + self.stall;
        let timer = match &mut self.timer {
            Some(timer) if self.armed => timer,
            Some(timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        timer.as_mut().poll(cx)
    }
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                this.set(if this.inner.is_end_stream() {
                    COMPLETE
                } else {
                    FLOWING
                });
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.set(FLOWING);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.set(COMPLETE);
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.set(WAITING_ON_CLIENT);
                match this.poll_stall(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(ClientTimeout(this.stall))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
