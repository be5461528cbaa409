//! Forwarding: the I/O of sending a request to the local Loom or a peer router.
//!
//! One pooled keep-alive client (hyper-util's legacy `Client`) is built at start-up and shared by
//! every request and every health probe; a keep-alive client connection sends its requests to
//! the local Loom and to peer routers over upstream connections of its own (`affine.rs`), and
//! every upstream's connections are bounded (`bound.rs`). This file owns timeouts, the mapping of transport
//! failures to [`UpstreamKind`], and reading bodies into memory when the router has to. It must
//! not decide *where* a request goes: `proxy/` does that from the ownership table.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::OwnedSemaphorePermit;

use crate::http::affine::{Affine, Owned};
use crate::http::body::{Body, BodyProgress, ClientBody};
use crate::http::bound::{Bound, Bounded, Upstream};
use crate::http::error::{BoxError, SendError, UpstreamKind};
use crate::http::timer::within;

/// Idle pooled connections kept per upstream host. Enough for a burst of concurrent writes to
/// one peer without reconnecting; the rest are closed when they go idle.
const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// Plain HTTP, or rustls for `https://` upstreams, on one pooled connector that counts its
/// connections against `max_upstream_connections`.
type Connector = Bounded<hyper_rustls::HttpsConnector<HttpConnector>>;

/// The upstream client: the shared pool, and connections owned by client connections.
#[derive(Debug, Clone)]
pub struct Forwarder {
    /// Cloning shares the pool; every pooled request and probe goes through this one client.
    client: Client<Connector, Body>,
    /// For the pool of each request worker ([`Self::for_worker`]).
    connector: Connector,
    idle_timeout: Duration,
    bound: Arc<Bound>,
}

impl Forwarder {
    /// `tls` is used toward `https://` upstreams (`http/tls.rs`: peer routers and the Loom);
    /// `max_connections` bounds the connections to each upstream (`http/bound.rs`).
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        tls: Arc<rustls::ClientConfig>,
        max_connections: usize,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        // The TLS wrapper below decides the scheme; the inner connector must accept both.
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let bound = Arc::new(Bound::new(max_connections));
        let connector = Bounded {
            inner: connector,
            bound: bound.clone(),
            wait: connect_timeout,
        };
        Self {
            client: pool(connector.clone(), idle_timeout),
            connector,
            idle_timeout,
            bound,
        }
    }

    /// The same client with a pool of its own, for one request worker: its pooled connections
    /// are driven on the worker's runtime, and never wake another worker's thread. The bound on
    /// connections stays shared.
    #[must_use]
    pub fn for_worker(&self) -> Self {
        Self {
            client: pool(self.connector.clone(), self.idle_timeout),
            ..self.clone()
        }
    }

    /// Send a request through the shared pool and wait for the response head, at most
    /// `timeout`.
    pub async fn send(
        &self,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        let progress = request.body().progress();
        let deadline = Box::pin(tokio::time::sleep(timeout));
        let sent = within(deadline, self.pooled(request)).await;
        settle(sent, progress, timeout)
    }

    /// Send a request over the client connection's own connection to the request's upstream
    /// (the local Loom or a peer router; `http/affine.rs`) when the connection has a slot for
    /// one, else through the pool; wait for the response head, at most `timeout`.
    pub async fn send_from(
        &self,
        affine: Option<&Affine>,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        let Some(affine) = affine else {
            // Boxed: HTTP/2 connections and probes only; the owned path's future stays small.
            return Box::pin(self.send(request, timeout)).await;
        };
        let progress = request.body().progress();
        let sent = within(affine.deadline(timeout), self.owned(affine, request)).await;
        settle(sent, progress, timeout)
    }

    async fn pooled(&self, request: Request<Body>) -> Result<Response<Incoming>, SendError> {
        self.client.request(request).await.map_err(|e| {
            let kind = kind_of(&e, e.is_connect());
            SendError {
                kind,
                source: Some(Box::new(e)),
            }
        })
    }

    /// Send over the connection `affine` owns, opening one if it has none. A request the
    /// connection closed under before it was written goes out once more, on a fresh
    /// connection; one that was written is never sent twice.
    async fn owned(
        &self,
        affine: &Affine,
        mut request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let (key, mut reused) = match affine.take(request.uri()) {
            // Boxed, as `open` below: rare paths must not grow every request's future.
            Owned::First => return Box::pin(self.pooled(request)).await,
            Owned::Ready(key, sender) => (key, Some(sender)),
            Owned::None => (Upstream::of(request.uri()), None),
        };
        // hyper's connections send the URI as given, and add no `Host`: Loom expects
        // origin-form, and the pool's `Host` (the upstream's authority). The absolute URI is
        // moved out, not cloned: only opening a connection or the pool needs it again.
        let origin_form = request.uri().path_and_query().cloned().map(Uri::from);
        let upstream = match origin_form {
            Some(path) => std::mem::replace(request.uri_mut(), path),
            None => request.uri().clone(),
        };
        if let Some(host) = key.host() {
            request
                .headers_mut()
                .insert(http::header::HOST, host.clone());
        }
        loop {
            let (mut sender, fresh) = match reused.take() {
                Some(sender) => (sender, false),
                None => match affine
                    .has_room()
                    .then(|| self.bound.own(&upstream))
                    .flatten()
                {
                    Some(permit) => (Box::pin(self.open(affine, &upstream, permit)).await?, true),
                    None => {
                        // Past the share of the bound owned connections may take, or past the
                        // upstreams one connection may own: the pool.
                        *request.uri_mut() = upstream;
                        return Box::pin(self.pooled(request)).await;
                    }
                },
            };
            if std::future::poll_fn(|cx| sender.poll_ready(cx))
                .await
                .is_err()
            {
                if fresh {
                    return Err(SendError {
                        kind: UpstreamKind::Reset,
                        source: None,
                    });
                }
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    affine.put(key, sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => request = unsent,
                    _ => {
                        let e = e.into_error();
                        return Err(SendError {
                            kind: kind_of(&e, false),
                            source: Some(Box::new(e)),
                        });
                    }
                },
            }
        }
    }

    /// Open a connection for `affine` to own, holding `permit` while it is open: through the
    /// pool's connector (its connect timeout, and TLS toward `https://` upstreams).
    async fn open(
        &self,
        affine: &Affine,
        upstream: &Uri,
        permit: OwnedSemaphorePermit,
    ) -> Result<SendRequest<Body>, SendError> {
        let connect_failed = |source: BoxError| SendError {
            kind: kind_of(source.as_ref(), true),
            source: Some(source),
        };
        let connector = self.connector.inner.clone();
        let io = tower::ServiceExt::oneshot(connector, upstream.clone())
            .await
            .map_err(connect_failed)?;
        let (sender, connection) = http1::Builder::new()
            // As the client side's (`proxy/listener.rs`): one buffer, one write.
            .writev(false)
            .handshake(io)
            .await
            .map_err(|e| connect_failed(Box::new(e)))?;
        affine.opened(Box::pin(async move {
            let _permit = permit;
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "owned upstream connection ended with an error");
            }
        }));
        Ok(sender)
    }
}

fn pool(connector: Connector, idle_timeout: Duration) -> Client<Connector, Body> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        // Without a timer the pool never evicts idle connections.
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// A send's outcome under its deadline. A failure that was the client's (its body broke,
/// stalled, or was still awaited from it at the deadline) is told apart from the upstream's
/// here, where the body was handed over.
fn settle(
    sent: Option<Result<Response<Incoming>, SendError>>,
    progress: Option<BodyProgress>,
    timeout: Duration,
) -> Result<Response<Incoming>, SendError> {
    match sent {
        Some(result) => result,
        None => {
            let waiting_on_client = progress.is_some_and(|p| p.waiting_on_client());
            Err(SendError {
                kind: if waiting_on_client {
                    UpstreamKind::ClientStalled(timeout)
                } else {
                    UpstreamKind::Timeout
                },
                source: None,
            })
        }
    }
}

/// What kind of failure `e` was; `connect` if it happened before a connection was open.
fn kind_of(e: &(dyn std::error::Error + 'static), connect: bool) -> UpstreamKind {
    if tls_failed(e) {
        UpstreamKind::Tls
    } else if connect {
        UpstreamKind::Connect
    } else if client_body_failed(e) {
        match crate::http::body::client_timeout(e) {
            Some(after) => UpstreamKind::ClientStalled(after),
            None => UpstreamKind::ClientBody,
        }
    } else {
        UpstreamKind::Reset
    }
}

/// Whether a send failed in the TLS handshake (rustls reports through an `io::Error`).
fn tls_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// Whether a send failed because the request body we were streaming from the client failed
/// (hyper reports errors of the body it was given as "user" errors).
fn client_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(hyper_error) = err.downcast_ref::<hyper::Error>() {
            if hyper_error.is_user() {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// `base` (scheme and authority of an upstream) joined with a request's path and query.
pub fn upstream_uri(base: &Uri, path_and_query: Option<&PathAndQuery>) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = base.scheme().cloned();
    parts.authority = base.authority().cloned();
    parts.path_and_query = Some(
        path_and_query
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    // Scheme, authority and path all come from valid parts, so this cannot fail; fall back to
    // the base rather than panic.
    Uri::from_parts(parts).unwrap_or_else(|_| base.clone())
}

/// A request body after the router tried to keep it for a retry.
#[derive(Debug)]
pub enum Buffered {
    /// The whole body is in memory: the request can be sent again.
    Complete(Bytes),
    /// The body is over the limit: what was read so far, and the rest of the stream. It can be
    /// sent once only.
    Partial(Body),
}

/// Read a client's body into memory if it is at most `limit` bytes. A body whose declared length
/// is over the limit is not read at all; one that turns out too big while reading keeps
/// streaming.
pub async fn buffer_up_to(mut body: Box<ClientBody>, limit: usize) -> Result<Buffered, BoxError> {
    if body.is_end_stream() {
        return Ok(Buffered::Complete(Bytes::new()));
    }
    if body.size_hint().lower() > limit as u64 {
        return Ok(Buffered::Partial(Body::Client(body)));
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                return Ok(Buffered::Partial(Body::Prefixed {
                    prefix: Some(buf.freeze()),
                    rest: body,
                }));
            }
        }
    }
    Ok(Buffered::Complete(buf.freeze()))
}

/// Why a body the router must read could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadBodyError {
    #[error("body over the limit")]
    TooLarge,
    #[error("the client stalled its body")]
    ClientTimeout,
    #[error("body error")]
    Broken(#[source] BoxError),
}

/// Read a whole body the router needs to look into (a `/v2/nodes` write, an upstream's small
/// answer), at most `limit` bytes.
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, ReadBodyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(ReadBodyError::TooLarge);
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ReadBodyError::TooLarge),
        Err(e) if crate::http::body::client_timeout(e.as_ref()).is_some() => {
            Err(ReadBodyError::ClientTimeout)
        }
        Err(e) => Err(ReadBodyError::Broken(e)),
    }
}
