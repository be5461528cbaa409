//! Forwarding: the I/O of sending a request to the local Loom or a peer router.
//!
//! One pooled keep-alive client (hyper-util's legacy `Client`) is built at start-up and shared by
//! every request and every health probe. This file owns timeouts, the mapping of transport
//! failures to [`UpstreamKind`], and reading bodies into memory when the router has to. It must
//! not decide *where* a request goes: `proxy/` does that from the ownership table.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::http::body::{Body, ClientBody};
use crate::http::error::{BoxError, SendError, UpstreamKind};

/// Idle pooled connections kept per upstream host. Enough for a burst of concurrent writes to
/// one peer without reconnecting; the rest are closed when they go idle.
const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// Plain HTTP, or rustls for `https://` upstreams, on one pooled connector.
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The shared upstream client.
#[derive(Debug, Clone)]
pub struct Forwarder {
    /// Cloning shares the pool; every request and probe goes through this one client.
    client: Client<Connector, Body>,
}

impl Forwarder {
    /// `tls` is used toward `https://` upstreams (`http/tls.rs`: peer routers and the Loom).
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        tls: std::sync::Arc<rustls::ClientConfig>,
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
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle_timeout)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            // Without a timer the pool never evicts idle connections.
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self { client }
    }

    /// Send a request and wait for the response head, at most `timeout`. A failure that was the
    /// client's (its body broke, stalled, or was still awaited from it at the deadline) is told
    /// apart from the upstream's here, where the body is handed over.
    pub async fn send(
        &self,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        let progress = request.body().progress();
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                let kind = if tls_failed(&e) {
                    UpstreamKind::Tls
                } else if e.is_connect() {
                    UpstreamKind::Connect
                } else if client_body_failed(&e) {
                    match crate::http::body::client_timeout(&e) {
                        Some(after) => UpstreamKind::ClientStalled(after),
                        None => UpstreamKind::ClientBody,
                    }
                } else {
                    UpstreamKind::Reset
                };
                Err(SendError {
                    kind,
                    source: Some(Box::new(e)),
                })
            }
            Err(_) => {
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
}

/// Whether a send failed in the TLS handshake (rustls reports through an `io::Error`).
fn tls_failed(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
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
fn client_body_failed(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
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
