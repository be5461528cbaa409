//! A write sent on to the router of the DC that owns its shard: one hop, with hop, origin,
//! shard and epoch headers, and the 421 retry loop (docs/routing.md, between routers).
//!
//! A 421 means the peer's Loom never saw the write, so even a POST may be sent again: at most
//! [`MAX_MISDIRECTED_RETRIES`] times, to the owner this router's refreshed table names, or to the
//! peer's newer view unless that names this DC. A write whose owner health checks find down gets
//! 503 `owner_unavailable` at once instead of waiting on a dead peer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use super::request::{client, Ctx, Label, Outcome, ToLocal, ToPeer, Trust};
use super::{ConnInfo, Proxy};
use crate::config::Config;
use crate::coord::control::Snapshot;
use crate::http::body::Body;
use crate::http::error::{MisdirectedView, RouterError};
use crate::http::forward::{self, Buffered};
use crate::http::headers;
use crate::routing::classify::Route;
use crate::routing::table::Target;
use crate::shard::{DcId, ShardKey};

/// How many times the origin re-sends a write that a peer answered with 421.
const MAX_MISDIRECTED_RETRIES: usize = 2;

impl Proxy {
    /// Send a write to the owning DC's router, with hop, origin, epoch and `Via`. Bodies up to
    /// `max_retry_body_bytes` are kept so that a 421 can be retried (at most twice).
    pub(super) async fn forward_to_peer(
        &self,
        ctx: Ctx<'_>,
        to: ToPeer,
        request: Request<Body>,
    ) -> Outcome {
        let mut to = to;
        let config = &ctx.snap.config;
        if let Some(down) = self.owner_down(config, &to) {
            return down;
        }
        let (mut parts, body) = request.into_parts();
        // Kept in case a 421 retry ends here, where the local path rewrites them itself.
        let original_headers = parts.headers.clone();
        hop_headers(ctx.snap, ctx.conn, &mut parts, to.shard);
        let (replayable, mut once) = match buffer_for_retry(config, body).await {
            Ok(buffered) => buffered,
            Err(error) => return Outcome::error(to.label, error),
        };
        let sent = Instant::now();
        // 421s that sent the write on again; the edge counts them, however the write ends.
        let mut retries = 0;
        for attempt in 0..=MAX_MISDIRECTED_RETRIES {
            let body = match (&replayable, once.take()) {
                (Some(bytes), _) => Body::full(bytes.clone()),
                (None, Some(body)) => body,
                (None, None) => break,
            };
            let response = match self.send_hop(ctx, &to, &mut parts, body).await {
                Ok(response) => response,
                Err(error) => {
                    let failed = hop_failed(&to, error, sent.elapsed());
                    return Outcome { retries, ..failed };
                }
            };
            if !is_misdirected(&response) {
                let answer = answered(ctx.snap, &to, response, sent.elapsed());
                return Outcome { retries, ..answer };
            }
            // 421: the peer's Loom never saw the request, so even a POST may be sent again.
            let view = misdirected_view(response).await;
            if attempt == MAX_MISDIRECTED_RETRIES || replayable.is_none() {
                break;
            }
            retries += 1;
            match self.next_owner(to.route, to.shard, view).await {
                Some(NextOwner::Peer { dc, epoch }) => (to.dc, to.epoch) = (dc, epoch),
                Some(NextOwner::Here { snap, epoch }) => {
                    // Our refreshed table says we own it now: serve it here, through the gate,
                    // with the headers the client sent.
                    parts.headers = original_headers;
                    let body = replayable.map(Body::full).unwrap_or_else(Body::empty);
                    let here = ToLocal {
                        label: Label::local(to.route),
                        shard: Some(to.shard),
                        epoch,
                        trust: Trust::Client,
                    };
                    let request = Request::from_parts(parts, body);
                    let fresh = Ctx { snap: &snap, ..ctx };
                    let served = self.serve_admitted(fresh, here, request).await;
                    return Outcome { retries, ..served };
                }
                None => break,
            }
            if let Some(down) = self.owner_down(config, &to) {
                return Outcome { retries, ..down };
            }
        }
        let conflict = Outcome::error(to.label, RouterError::OwnershipConflict(to.shard));
        Outcome {
            retries,
            ..conflict
        }
    }

    /// One attempt: the write, stamped with the epoch `to` names, sent to `to.dc`'s router.
    async fn send_hop(
        &self,
        ctx: Ctx<'_>,
        to: &ToPeer,
        parts: &mut Parts,
        body: Body,
    ) -> Result<Response<Incoming>, RouterError> {
        let config = &ctx.snap.config;
        parts
            .headers
            .insert(headers::EPOCH, HeaderValue::from(to.epoch));
        let router = &config.datacenters[to.dc].router;
        parts.uri = forward::upstream_uri(router, parts.uri.path_and_query());
        // The owner bounds the write by write_timeout; wait a second longer so that we do not
        // time out on a write the owner applied.
        let timeout = config.loom.write_timeout + Duration::from_secs(1);
        let affine = ctx.conn.affine.as_ref();
        let sent = self
            .forwarder
            .send_from(affine, rebuild(parts, body), timeout);
        let name = || config.datacenters[to.dc].name.clone();
        sent.await
            .map_err(|e| RouterError::from_peer(e, name(), timeout))
    }

    /// After a 421: where the write goes next, by this router's refreshed table, adopting the
    /// peer's newer view unless it names this DC (only our own table may tell us to admit a
    /// write). `None` when the table has no owner for it.
    async fn next_owner(
        &self,
        route: Route,
        shard: ShardKey,
        view: Option<(String, u64)>,
    ) -> Option<NextOwner> {
        self.inner.control.refresh().await;
        let fresh = self.inner.control.snapshot();
        let local = fresh.config.local;
        let ours = if route == Route::Create {
            fresh.table.resolve_create(local)
        } else {
            fresh.table.resolve_write(local, shard)
        };
        let (mut dc, mut epoch) = match ours.map(|r| r.target) {
            Ok(Target::Local { epoch }) => return Some(NextOwner::Here { snap: fresh, epoch }),
            Ok(Target::Peer { dc, epoch }) => (dc, epoch),
            Err(_) => return None,
        };
        if let Some((owner, their_epoch)) = view {
            if let Some(owner) = fresh.config.dc_by_name(&owner) {
                if their_epoch > epoch && owner != local {
                    (dc, epoch) = (owner, their_epoch);
                }
            }
        }
        Some(NextOwner::Peer { dc, epoch })
    }

    /// 503 `owner_unavailable` if health checks find the owning DC down, so the client learns at
    /// once instead of waiting on a dead peer.
    fn owner_down(&self, config: &Config, to: &ToPeer) -> Option<Outcome> {
        let name = &config.datacenters[to.dc].name;
        if self.inner.health.usable(name) {
            return None;
        }
        let error = RouterError::OwnerUnavailable {
            dc: name.clone(),
            retry_after: retry_after(config),
        };
        Some(Outcome {
            target: Some(to.dc),
            shard: Some(to.shard),
            ..Outcome::error(to.label, error)
        })
    }
}

/// A hop that got no answer from the peer router: the peer's failure, with where it was sent,
/// or the client's if its body stalled.
fn hop_failed(to: &ToPeer, error: RouterError, upstream_time: Duration) -> Outcome {
    if error.is_client_fault() {
        return Outcome::error(to.label, error);
    }
    Outcome {
        target: Some(to.dc),
        shard: Some(to.shard),
        upstream_time: Some(upstream_time),
        ..Outcome::error(to.label, error)
    }
}

/// The peer's answer, as the client gets it: the owner's DC serves it unless the peer router
/// answered itself.
pub(super) fn answered(
    snap: &Snapshot,
    to: &ToPeer,
    response: Response<Incoming>,
    upstream_time: Duration,
) -> Outcome {
    let mut response = response.map(Body::Incoming);
    headers::prepare_downstream(response.headers_mut(), &snap.via);
    let router_error = response.headers().contains_key(headers::ROUTER_ERROR);
    Outcome {
        label: to.label,
        served_by: (!router_error).then_some(to.dc),
        shard: Some(to.shard),
        target: Some(to.dc),
        upstream_time: Some(upstream_time),
        result: Ok(response),
        retries: 0,
        owner_failed: None,
    }
}

/// Where a forwarded write goes after a 421.
enum NextOwner {
    /// Another DC's router, at this epoch.
    Peer { dc: DcId, epoch: u64 },
    /// This DC, by the refreshed table `snap`.
    Here {
        snap: Arc<Snapshot>,
        epoch: Option<u64>,
    },
}

/// `Retry-After` for `owner_unavailable`: about as long as health checks need to see the DC come
/// back.
fn retry_after(config: &Config) -> Duration {
    config.health.interval * config.health.healthy_after
}

/// Only a router's 421 means "not delivered"; a 421 from the owner's Loom is an answer.
pub(super) fn is_misdirected(response: &Response<Incoming>) -> bool {
    response.status() == StatusCode::MISDIRECTED_REQUEST
        && response
            .headers()
            .get(headers::ROUTER_ERROR)
            .is_some_and(|v| v == "misdirected")
}

/// The headers of a write forwarded to a peer: the proxy rewrite, then hop, origin and shard.
pub(super) fn hop_headers(snap: &Snapshot, conn: &ConnInfo, parts: &mut Parts, shard: ShardKey) {
    headers::prepare_upstream(&mut parts.headers, client(conn), &snap.via, false);
    parts
        .headers
        .insert(headers::HOP, HeaderValue::from_static("1"));
    parts
        .headers
        .insert(headers::ORIGIN, snap.dc_names[snap.config.local].clone());
    if let ShardKey::Residue(r) = shard {
        parts.headers.insert(headers::SHARD, HeaderValue::from(r));
    }
    parts.version = Version::HTTP_11;
}

/// A forwarded write's body, kept whole when it fits `max_retry_body_bytes` (so a 421 can be
/// retried), else the part read so far and the rest of the stream, to be sent once.
pub(super) async fn buffer_for_retry(
    config: &Config,
    body: Body,
) -> Result<(Option<Bytes>, Option<Body>), RouterError> {
    let buffered = match body {
        Body::Client(streamed) => {
            let buffering = tokio::time::timeout(
                config.loom.write_timeout,
                forward::buffer_up_to(streamed, config.limits.max_retry_body_bytes),
            );
            match buffering.await {
                Ok(Ok(b)) => b,
                // The client stalled, or trickled its body past the write's deadline: nothing
                // was sent anywhere.
                Ok(Err(e)) => {
                    return Err(match crate::http::body::client_timeout(e.as_ref()) {
                        Some(stalled) => RouterError::ClientTimeout(stalled),
                        None => RouterError::BadRequest,
                    })
                }
                Err(_) => return Err(RouterError::ClientTimeout(config.loom.write_timeout)),
            }
        }
        Body::Incoming(empty) => {
            drop(empty);
            Buffered::Complete(Bytes::new())
        }
        Body::Full(bytes) => Buffered::Complete(bytes.unwrap_or_default()),
        prefixed @ Body::Prefixed { .. } => Buffered::Partial(prefixed),
    };
    Ok(match buffered {
        Buffered::Complete(bytes) => (Some(bytes), None),
        Buffered::Partial(body) => (None, Some(body)),
    })
}

pub(super) fn rebuild(parts: &Parts, body: Body) -> Request<Body> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request
}

/// The owner and epoch a peer's 421 names (its [`MisdirectedView`]), if it names an owner.
async fn misdirected_view(response: Response<Incoming>) -> Option<(String, u64)> {
    let bytes: Bytes = forward::read_body(response.into_body(), 4096).await.ok()?;
    let view: MisdirectedView = serde_json::from_slice(&bytes).ok()?;
    Some((view.owner?, view.epoch))
}
