//! The data listener: accept connections, serve HTTP on them, and drain on shutdown.
//!
//! Each accepted TCP connection is served by hyper's HTTP/1.1 server (or, over TLS with ALPN
//! `h2`, its HTTP/2 server) and calls [`Proxy::handle`] for every request. This file owns the
//! per-connection limits (header size, header-read timeout) and graceful shutdown. It must not
//! know about clusters or shards.
//!
//! hyper answers some malformed requests itself, before the router sees them: a request head it
//! cannot parse gets a bare 400, and one over the header limit a bare 431. The spec wants every
//! router error to carry its code and sentence, so [`RewriteErrors`] wraps the socket and swaps
//! those canned responses for the router's own. It recognises them exactly: hyper's canned
//! responses are a status line, `connection: close`, `content-length: 0` and `date`, with no
//! `via` header, and every response the router itself sends carries `via`.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Limits, MIN_HEADER_BYTES};
use crate::http::affine::{Affine, Drive};
use crate::http::error::RouterError;
use crate::http::timer::ConnectionTimer;
use crate::proxy::{ConnInfo, Proxy};

/// TLS on a data listener: the acceptor (certificates, ALPN, client-certificate checks) and how
/// long a client may take over its handshake.
#[derive(Clone)]
pub struct TlsAccept {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsAccept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAccept")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// What every connection of one listener shares. Limits are read from the current snapshot for
/// each new connection, so a reload applies to connections accepted after it.
#[derive(Clone)]
struct Shared {
    proxy: Proxy,
    /// This router's `Via` value, for rewritten hyper errors (it names the DC, which a reload
    /// cannot change).
    via: String,
}

/// Which worker serves a listener, with TLS or not, and how long its drain may take.
#[derive(Debug)]
pub struct On {
    pub worker: usize,
    pub tls: Option<TlsAccept>,
    pub drain_timeout: Duration,
}

/// Serve `listener` (over TLS if `on.tls` is set) until `shutdown` fires, then stop accepting
/// and give in-flight requests up to `on.drain_timeout` to finish.
pub async fn serve(listener: TcpListener, on: On, proxy: Proxy, shutdown: CancellationToken) {
    let On {
        worker,
        tls,
        drain_timeout,
    } = on;
    let graceful = GracefulShutdown::new();
    let snap = proxy.control().snapshot();
    let shared = Shared {
        via: snap.via.to_str().unwrap_or("").to_owned(),
        proxy,
    };
    drop(snap);
    let accepted = crate::metrics::worker_connections(worker);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        accepted.increment(1);
        let watcher = graceful.watcher();
        match &tls {
            None => {
                let conn = ConnInfo::new(remote, false, false);
                serve_http1(&shared, stream, conn, watcher);
            }
            Some(tls) => {
                let (shared, tls) = (shared.clone(), tls.clone());
                // The handshake runs in the connection's own task: a slow client must not hold
                // up the accept loop.
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream));
                    let stream = match handshake.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            crate::metrics::tls_handshake_failed();
                            tracing::debug!(error = %e, %remote, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            crate::metrics::tls_handshake_failed();
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                    let (_, session) = stream.get_ref();
                    // The verifier accepted the certificate if the client sent one.
                    let verified = session.peer_certificates().is_some_and(|c| !c.is_empty());
                    let conn = ConnInfo::new(remote, true, verified);
                    if session.alpn_protocol() == Some(b"h2") {
                        serve_http2(&shared, stream, conn, watcher);
                    } else {
                        serve_http1(&shared, stream, conn, watcher);
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain_timeout,
            "drain timeout: closing connections with requests in flight"
        );
    }
}

/// The per-connection service: the proxy, called straight from hyper. (The request id it sets
/// and returns was two tower-http layers; in the handler it costs less: docs/performance.md.)
macro_rules! service {
    ($proxy:expr, $conn:expr) => {{
        // One reference count per request, instead of cloning the proxy's handles and the
        // connection's facts into every request.
        let shared = std::sync::Arc::new(($proxy.clone(), $conn));
        hyper::service::service_fn(move |request| {
            let shared = shared.clone();
            // Boxed per request: hyper keeps room for one service future in every connection for
            // the connection's whole life, and the proxy's future is about 5 KiB; boxed, the
            // room is a pointer. Idle connections went from 27 to 21 KiB of RSS each
            // (docs/performance.md).
            Box::pin(async move {
                let (proxy, conn) = &*shared;
                Ok::<_, Infallible>(proxy.handle(request, conn).await)
            })
        })
    }};
}

/// Serve HTTP/1.1 on one connection (plain or TLS), with hyper's canned errors rewritten. The
/// connection's own upstream connection (`http::affine`) is driven in the same task.
fn serve_http1<S>(shared: &Shared, stream: S, mut conn: ConnInfo, watcher: Watcher)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = shared.proxy.control().snapshot().config.clone();
    let io = TokioIo::new(RewriteErrors::new(
        stream,
        shared.via.clone(),
        config.limits.max_header_bytes,
        config.route_headers,
    ));
    let affine = Affine::new();
    conn.affine = Some(affine.clone());
    let connection =
        builder(&config.limits).serve_connection(io, service!(shared.proxy, conn.clone()));
    let remote = conn.remote;
    let open = crate::metrics::OpenConnection::start(if conn.https { "https" } else { "http" });
    let connection = Drive::new(watcher.watch(connection), affine);
    tokio::spawn(async move {
        let _open = open;
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, %remote, "connection ended with an error");
        }
    });
}

/// Serve HTTP/2 on one TLS connection (ALPN `h2`).
fn serve_http2<S>(shared: &Shared, stream: S, conn: ConnInfo, watcher: Watcher)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.proxy.control().snapshot().config.limits.clone();
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(limits.idle_timeout / 2))
        .keep_alive_timeout(limits.idle_timeout / 2);
    let connection =
        h2.serve_connection(TokioIo::new(stream), service!(shared.proxy, conn.clone()));
    let remote = conn.remote;
    let open = crate::metrics::OpenConnection::start("https");
    tokio::spawn(async move {
        let _open = open;
        if let Err(e) = watcher.watch(connection).await {
            tracing::debug!(error = %e, %remote, "h2 connection ended with an error");
        }
    });
}

/// HTTP/1.1 on plain connections. (hyper-util's auto builder does not expose hyper's
/// `max_header_size`, which is what turns an oversized head into a 431.)
fn builder(limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        // One timer entry per connection for every head it waits for (`http/timer.rs`).
        .timer(ConnectionTimer::new())
        .keep_alive(true)
        // hyper's idle keep-alive wait and a slow request head share this timer: hyper starts it
        // when it begins waiting for the next request head. hyper also counts more than 100
        // header fields as too large (431), as HAProxy's default tune.http.maxhdr does.
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES) + MIN_HEADER_BYTES)
        // One buffer, one write(2): the head and a small body are copied together rather than
        // gathered, which callgrind finds cheaper for Loom's small answers (docs/performance.md).
        .writev(false);
    builder
}

/// A socket that replaces hyper's canned parse-error responses with the router's own.
#[derive(Debug)]
pub struct RewriteErrors<T> {
    inner: T,
    /// This router's `Via` value, for the replacement response.
    via: String,
    /// `max_header_bytes`, named in the 431 sentence.
    header_limit: usize,
    /// `[response] route_headers`.
    route_headers: bool,
    /// A replacement being written: bytes, how far we got, and the length of the canned
    /// response it stands for (what hyper is told was written).
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<T> RewriteErrors<T> {
    pub fn new(inner: T, via: String, header_limit: usize, route_headers: bool) -> Self {
        Self {
            inner,
            via,
            header_limit,
            route_headers,
            pending: None,
        }
    }
}

/// The router error a canned hyper response stands for, if `buf` is one.
fn canned_error(buf: &[u8]) -> Option<RouterError> {
    // Canned responses are tiny; anything big is a real response.
    if buf.len() > 256 || !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let error = if buf.starts_with(b"HTTP/1.1 400 Bad Request\r\n") {
        RouterError::BadRequest
    } else if buf.starts_with(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        || buf.starts_with(b"HTTP/1.1 414 URI Too Long\r\n")
    {
        RouterError::HeadersTooLarge { limit: 0 }
    } else {
        return None;
    };
    let text = std::str::from_utf8(buf).ok()?;
    let mut lines = text.split("\r\n").skip(1).filter(|l| !l.is_empty());
    let only_canned = lines
        .all(|l| l == "content-length: 0" || l == "connection: close" || l.starts_with("date: "));
    only_canned.then_some(error)
}

impl<T: AsyncWrite + Unpin> RewriteErrors<T> {
    /// Write the pending replacement; `Ready(Ok(n))` with the canned length once done.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some((bytes, written, canned_len)) = &mut self.pending {
            if *written == bytes.len() {
                let n = *canned_len;
                self.pending = None;
                return Poll::Ready(Ok(n));
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(0))
    }

    fn start_rewrite(&mut self, error: &RouterError, canned_len: usize) {
        let error = match error {
            RouterError::HeadersTooLarge { .. } => RouterError::HeadersTooLarge {
                limit: self.header_limit,
            },
            _ => RouterError::BadRequest,
        };
        crate::metrics::client_error(error.code());
        self.pending = Some((
            error.raw_http1(&self.via, self.route_headers),
            0,
            canned_len,
        ));
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for RewriteErrors<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for RewriteErrors<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.is_none() {
            match canned_error(buf) {
                Some(error) => this.start_rewrite(&error, buf.len()),
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
            }
        }
        this.poll_pending(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.is_none() {
            let mut non_empty = bufs.iter().filter(|b| !b.is_empty());
            let canned = match (non_empty.next(), non_empty.next()) {
                (Some(only), None) => canned_error(only).map(|e| (e, only.len())),
                _ => None,
            };
            match canned {
                Some((error, len)) => this.start_rewrite(&error, len),
                None => return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
            }
        }
        this.poll_pending(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_canned_responses_are_recognised() {
        let canned = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Thu, 26 Nov 2026 07:00:00 GMT\r\n\r\n";
        assert!(matches!(
            canned_error(canned),
            Some(RouterError::BadRequest)
        ));
        let canned = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Thu, 26 Nov 2026 07:00:00 GMT\r\n\r\n";
        assert!(matches!(
            canned_error(canned),
            Some(RouterError::HeadersTooLarge { .. })
        ));
    }

    #[test]
    fn real_responses_are_left_alone() {
        // A Loom 400 passed through always has the router's via header.
        let real = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nvia: 1.1 loom-router-a\r\ndate: x\r\n\r\n";
        assert!(canned_error(real).is_none());
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\nabc";
        assert!(canned_error(with_body).is_none());
        assert!(canned_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
    }
}
