//! The one body type the router sends and returns.
//!
//! Requests and responses either stream straight through from hyper ([`Body::Incoming`]), were
//! buffered by the router ([`Body::Full`], for bodies it had to read or may retry), or were
//! partly buffered before the router learned they are too big to keep ([`Body::Prefixed`]). An
//! enum instead of a boxed trait object keeps the request path free of per-request boxing.
//!
//! This file must not decide when to buffer; `forward.rs` and `proxy.rs` do.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

#[derive(Debug)]
pub enum Body {
    /// Bytes the router holds; `None` once sent.
    Full(Option<Bytes>),
    /// Streamed from a client or upstream as it arrives.
    Incoming(Incoming),
    /// The first bytes were read into memory, the rest still streams.
    Prefixed {
        prefix: Option<Bytes>,
        rest: Incoming,
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
}

impl From<Incoming> for Body {
    fn from(body: Incoming) -> Self {
        Self::Incoming(body)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Incoming(body) => Pin::new(body).poll_frame(cx),
            Self::Prefixed { prefix, rest } => match prefix.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Incoming(body) => body.is_end_stream(),
            Self::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Incoming(body) => body.size_hint(),
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
