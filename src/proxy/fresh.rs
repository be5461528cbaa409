//! Reads a client must see fresh: a read of one cluster sent to its owner (`read-owner`), the
//! owner's side of it, and what a forwarded write leaves behind so the next read finds it
//! (docs/routing.md, reading your own writes).
//!
//! `routing::fresh` decides; this file sends. A read goes to the owner like a forwarded write,
//! one hop with the hop headers, and the owner's router serves it from its Loom if it still owns
//! the shard. When the owner is down or does not answer, the read falls back to the local Loom,
//! marked `X-Loom-Stale: 1`: for a read, availability beats freshness. Nothing here retries a
//! 421 for a read; the local answer is what a client without the promise would have had.

use std::time::{Duration, Instant};

use http::header::{HeaderValue, COOKIE, SET_COOKIE};
use http::{HeaderMap, Request};

use super::peer::{answered, buffer_for_retry, hop_headers, is_misdirected, rebuild};
use super::request::{header_u64, Ctx, Label, Outcome, ToLocal, ToPeer};
use super::Proxy;
// Unix milliseconds: the cookie's clock and the map's, so that both expire alike (the same
// clock failover stamps records with).
use crate::coord::failover::unix_ms as now_ms;
use crate::http::body::Body;
use crate::http::error::RouterError;
use crate::http::forward;
use crate::http::headers;
use crate::routing::classify::{Key, Route};
use crate::routing::fresh::{self, Asked, Cookie};

impl Proxy {
    /// Which cluster a client's read must be read fresh from its owner, if any: `None` keeps it
    /// local. A bad `X-Loom-Consistency` is refused on any read, so that a typo does not pass
    /// for a read the client thinks is fresh. A decision, not a step: the caller awaits the
    /// local read itself, so the read path gains no future of its own.
    pub(super) fn read_from(
        &self,
        ctx: Ctx<'_>,
        key: Key,
        headers: &HeaderMap,
    ) -> Result<Option<u64>, RouterError> {
        let asked = fresh::asked(header_bytes(headers, &headers::CONSISTENCY))
            .map_err(|_| RouterError::BadConsistency)?;
        Ok(match key {
            Key::ClusterRead(id)
                if asked == Asked::Owner || self.wrote_recently(ctx, id, headers) =>
            {
                Some(id)
            }
            _ => None,
        })
    }

    /// Whether this router, or the cookie another router of the DC set, forwarded a write to
    /// `cluster` within `[consistency] read_your_writes`. With tracking off, one branch; with it
    /// on and the cluster untracked, one map lookup, and a cookie only if the client sent one.
    fn wrote_recently(&self, ctx: Ctx<'_>, cluster: u64, headers: &HeaderMap) -> bool {
        if !ctx.snap.config.consistency.tracks() {
            return false;
        }
        if self.inner.tracked.holds(cluster, now_ms) {
            return true;
        }
        let window = ctx.snap.config.consistency.read_your_writes.as_millis() as u64;
        headers.contains_key(COOKIE)
            && Cookie::from_headers(header_bytes(headers, &COOKIE))
                .is_some_and(|c| c.names(cluster, now_ms(), window))
    }

    /// A read of `cluster` sent to the router of its shard's owner; this DC's Loom with the stale
    /// marker when the owner is down or does not answer. When this DC owns the shard, its own
    /// Loom is the fresh one.
    pub(super) async fn read_from_owner(
        &self,
        ctx: Ctx<'_>,
        cluster: u64,
        request: Request<Body>,
    ) -> Outcome {
        let snap = ctx.snap;
        let config = &snap.config;
        let shard = snap.table.shard_key_of_cluster(cluster);
        let owner = match snap.table.shard(shard) {
            Some(s) if s.owner != config.local => s,
            // Ours, or no DC's (Loom answers 404): the local Loom has the truth.
            _ => {
                return self
                    .serve_local(ctx, ToLocal::unowned(Label::Read), request)
                    .await
            }
        };
        let to = ToPeer {
            label: Label::ReadOwner,
            route: Route::Read,
            shard,
            dc: owner.owner,
            epoch: owner.epoch,
        };
        let owner_name = &config.datacenters[to.dc].name;
        if !self.inner.health.usable(owner_name) {
            return self.read_stale(ctx, request, None).await;
        }
        let (mut parts, body) = request.into_parts();
        let original_headers = parts.headers.clone();
        let bytes = match buffer_for_retry(config, body).await {
            Ok((Some(bytes), _)) => bytes,
            // A read with a body too big to send twice is sent once, here.
            Ok((None, once)) => {
                let body = once.unwrap_or_else(Body::empty);
                let request = Request::from_parts(parts, body);
                return self.read_stale(ctx, request, None).await;
            }
            Err(error) => return Outcome::error(Label::Read, error),
        };
        hop_headers(snap, ctx.conn, &mut parts, shard);
        parts
            .headers
            .insert(headers::EPOCH, HeaderValue::from(to.epoch));
        parts.uri = forward::upstream_uri(
            &config.datacenters[to.dc].router,
            parts.uri.path_and_query(),
        );
        // Bounded like a forwarded write's hop, not by request_timeout: a silent owner must
        // not hold a read for 30 s before it falls back, and health checks stop sending reads
        // there within a few probe intervals anyway.
        let timeout = config.loom.write_timeout + Duration::from_secs(1);
        let sent = Instant::now();
        let response = self
            .forwarder
            .send_from(
                ctx.conn.affine.as_ref(),
                rebuild(&parts, Body::full(bytes.clone())),
                timeout,
            )
            .await;
        let failed = match response {
            Ok(response) if !response.headers().contains_key(headers::ROUTER_ERROR) => {
                return answered(snap, &to, response, sent.elapsed());
            }
            // The owner's router refused the hop itself (draining, overloaded, its Loom down, a
            // 421, an older router that serves no read hops): this request was fine, so the
            // local read stands in, and a 421 makes our table catch up.
            Ok(refused) => {
                let code = refused.headers().get(headers::ROUTER_ERROR).cloned();
                if is_misdirected(&refused) {
                    self.refresh_soon();
                }
                tracing::warn!(owner = %owner_name, status = %refused.status(), code = ?code, "read-owner hop refused; serving the local read, marked stale");
                None
            }
            Err(error) => Some(Box::new(RouterError::from_peer(
                error,
                owner_name.clone(),
                timeout,
            ))),
        };
        parts.headers = original_headers;
        let request = Request::from_parts(parts, Body::full(bytes));
        self.read_stale(ctx, request, failed).await
    }

    /// Refresh the table in the background: a 421 said ours is behind.
    fn refresh_soon(&self) {
        let control = self.inner.control.clone();
        tokio::spawn(async move { control.refresh().await });
    }

    /// The local Loom's answer to a read that should have been fresh, marked as perhaps not;
    /// `failed` is the owner's failure that made it so, for the edge to count.
    async fn read_stale(
        &self,
        ctx: Ctx<'_>,
        request: Request<Body>,
        failed: Option<Box<RouterError>>,
    ) -> Outcome {
        let mut outcome = self
            .serve_local(ctx, ToLocal::unowned(Label::Read), request)
            .await;
        outcome.owner_failed = failed;
        if let Ok(response) = &mut outcome.result {
            response
                .headers_mut()
                .insert(headers::STALE, HeaderValue::from_static("1"));
        }
        outcome
    }

    /// A peer's `read-owner` hop: served by this DC's Loom while this DC owns the shard at the
    /// sender's epoch or newer (fenced or not: a read changes nothing), else 421 with this
    /// router's view.
    pub(super) async fn serve_owner_read(
        &self,
        ctx: Ctx<'_>,
        cluster: u64,
        request: Request<Body>,
    ) -> Outcome {
        ctx.notes.set_cluster(cluster);
        let epoch = header_u64(request.headers(), &headers::EPOCH).unwrap_or(0);
        let mut snap = ctx.snap.clone();
        let shard = snap.table.shard_key_of_cluster(cluster);
        if snap.table.shard(shard).is_some_and(|s| s.epoch < epoch) {
            self.inner.control.refresh().await;
            snap = self.inner.control.snapshot();
        }
        let local = snap.config.local;
        match snap.table.shard(shard) {
            Some(s) if s.owner == local && s.epoch >= epoch => {
                let ctx = Ctx { snap: &snap, ..ctx };
                self.serve_local(ctx, ToLocal::unowned(Label::Read), request)
                    .await
            }
            entry => Outcome::error(
                Label::Read,
                RouterError::Misdirected {
                    shard,
                    owner: entry.map(|s| snap.config.datacenters[s.owner].name.clone()),
                    epoch: entry.map_or(0, |s| s.epoch),
                },
            ),
        }
    }

    /// After a forwarded write's 2xx: track its cluster, and set the cookie that tells the other
    /// routers of this DC (`previous` is the cookie the write came with).
    pub(super) fn remember_write(&self, ctx: Ctx<'_>, previous: Option<Cookie>, out: &mut Outcome) {
        let consistency = &ctx.snap.config.consistency;
        let (Some(cluster), Ok(response)) = (ctx.notes.cluster(), &mut out.result) else {
            return;
        };
        if out.label != Label::WriteForwarded || !response.status().is_success() {
            return;
        }
        let now = now_ms();
        let window = consistency.read_your_writes;
        let until = now.saturating_add(window.as_millis() as u64);
        self.inner
            .tracked
            .remember(cluster, until, now, consistency.max_tracked_clusters);
        let cookie = previous.unwrap_or_default();
        let set = cookie.after_write(cluster, until, now, window.as_secs_f64().ceil() as u64);
        if let Ok(value) = HeaderValue::from_str(&set) {
            response.headers_mut().append(SET_COOKIE, value);
        }
    }

    /// The cookie a write came with, kept for [`Self::remember_write`] when tracking is on.
    pub(super) fn cookie_to_renew(&self, ctx: Ctx<'_>, headers: &HeaderMap) -> Option<Cookie> {
        if !ctx.snap.config.consistency.tracks() || !headers.contains_key(COOKIE) {
            return None;
        }
        Cookie::from_headers(header_bytes(headers, &COOKIE))
    }

    /// How many clusters this router tracks (`/admin/table`).
    pub fn tracked_clusters(&self) -> usize {
        self.inner.tracked.len()
    }
}

/// A header's field lines, as bytes.
fn header_bytes<'a>(
    headers: &'a HeaderMap,
    name: &http::HeaderName,
) -> impl Iterator<Item = &'a [u8]> {
    headers.get_all(name).into_iter().map(HeaderValue::as_bytes)
}
