//! `[limits] max_upstream_connections`: the most connections the router holds open to one
//! upstream (the local Loom, each peer router), pooled and connection-owned together.
//!
//! Each upstream has a semaphore with that many permits, and every open connection holds one
//! until it closes. The shared pool's connector waits for a permit (up to the connect timeout),
//! so a burst past the bound queues for a connection to come free, as nginx's `max_conns` does.
//! A client connection takes a permit for a connection of its own only while more than a
//! quarter of them are free ([`Bound::own`]): 10,000 idle keep-alive clients cannot take every
//! connection and starve the pool that everyone else falls back to.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http::error::BoxError;

/// The permits of every upstream, created on first use.
#[derive(Debug)]
pub struct Bound {
    per_upstream: usize,
    upstreams: DashMap<Upstream, Arc<Semaphore>>,
}

/// An upstream: the scheme and authority its connections are opened to. The bound counts
/// connections by it, and a client connection's owned connections are found by it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Upstream {
    scheme: Option<http::uri::Scheme>,
    authority: Option<http::uri::Authority>,
    /// The authority as the `Host` its requests carry, made once.
    host: Option<http::HeaderValue>,
}

impl Upstream {
    pub(crate) fn of(uri: &http::Uri) -> Self {
        let authority = uri.authority().cloned();
        Self {
            scheme: uri.scheme().cloned(),
            host: authority
                .as_ref()
                .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok()),
            authority,
        }
    }

    pub(crate) fn host(&self) -> Option<&http::HeaderValue> {
        self.host.as_ref()
    }

    pub(crate) fn is(&self, uri: &http::Uri) -> bool {
        self.authority.as_ref() == uri.authority() && self.scheme.as_ref() == uri.scheme()
    }
}

/// The pool's connector waited a whole connect timeout for a connection to come free.
#[derive(Debug, thiserror::Error)]
#[error("all {0} connections to this upstream are in use (limits.max_upstream_connections)")]
pub struct LimitReached(usize);

impl Bound {
    pub fn new(per_upstream: usize) -> Self {
        Self {
            per_upstream,
            upstreams: DashMap::new(),
        }
    }

    fn semaphore(&self, uri: &Uri) -> Arc<Semaphore> {
        let key = Upstream::of(uri);
        if let Some(found) = self.upstreams.get(&key) {
            return found.clone();
        }
        self.upstreams
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_upstream)))
            .clone()
    }

    /// A permit for a connection a client connection will own, if more than a quarter of the
    /// upstream's permits are free.
    pub fn own(&self, uri: &Uri) -> Option<OwnedSemaphorePermit> {
        let semaphore = self.semaphore(uri);
        let kept_for_pool = (self.per_upstream / 4).max(1);
        if semaphore.available_permits() <= kept_for_pool {
            return None;
        }
        semaphore.try_acquire_owned().ok()
    }

    /// Connections open to `uri` now.
    #[cfg(test)]
    fn open(&self, uri: &Uri) -> usize {
        self.per_upstream - self.semaphore(uri).available_permits()
    }
}

/// A connector that takes a permit before it connects, and a connection that holds it.
#[derive(Debug, Clone)]
pub struct Bounded<C> {
    pub(crate) inner: C,
    pub(crate) bound: Arc<Bound>,
    /// How long a new connection may wait for a permit.
    pub(crate) wait: Duration,
}

impl<C> tower::Service<Uri> for Bounded<C>
where
    C: tower::Service<Uri> + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = Counted<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let semaphore = self.bound.semaphore(&uri);
        let (wait, limit) = (self.wait, self.bound.per_upstream);
        // Connectors do nothing until polled: the connection starts once the permit is held.
        let connect = self.inner.call(uri);
        Box::pin(async move {
            // (The semaphore is never closed; were it, it would count as full.)
            let Ok(Ok(permit)) = tokio::time::timeout(wait, semaphore.acquire_owned()).await else {
                return Err(LimitReached(limit).into());
            };
            let io = connect.await.map_err(Into::into)?;
            Ok(Counted {
                io,
                _permit: permit,
            })
        })
    }
}

/// A connection that gives its permit back when it closes.
#[derive(Debug)]
pub struct Counted<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
}

impl<T: Connection> Connection for Counted<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl<T: Read + Unpin> Read for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_connections_leave_a_quarter_to_the_pool() {
        let bound = Bound::new(8);
        let loom: Uri = "http://127.0.0.1:1".parse().unwrap_or_default();
        let owned: Vec<_> = std::iter::from_fn(|| bound.own(&loom)).collect();
        assert_eq!(owned.len(), 6, "8 permits, 2 kept for the pool");
        assert_eq!(bound.open(&loom), 6);
        // Each upstream counts on its own.
        let peer: Uri = "https://127.0.0.1:2".parse().unwrap_or_default();
        assert!(bound.own(&peer).is_some());
        drop(owned);
        assert_eq!(bound.open(&loom), 0);
    }

    #[test]
    fn a_bound_of_one_is_the_pools_alone() {
        let bound = Bound::new(1);
        let loom: Uri = "http://127.0.0.1:1".parse().unwrap_or_default();
        assert!(bound.own(&loom).is_none());
    }
}
