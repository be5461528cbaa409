//! What this DC's Loom serves: requests this router keeps, owned writes through the write gate,
//! and writes a peer router forwarded here (docs/routing.md, docs/failover.md).
//!
//! An owned write is admitted twice: once when it is routed ([`Proxy::serve_admitted`]: the
//! lease may admit writes), and again right before it is sent (`still_admitted`: the table and
//! the lease once more, so that a pause in between cannot let a write out after a fence). A
//! peer's hop is served only if this DC owns the shard at the sender's epoch or newer.

use std::time::Instant;

use http::header::HeaderValue;
use http::{Request, Version};

use super::request::{client, header_u64, Ctx, Label, Outcome, ToLocal, Trust};
use super::{InFlight, Proxy};
use crate::http::body::Body;
use crate::http::error::RouterError;
use crate::http::forward;
use crate::http::headers;
use crate::routing::classify::{Class, Key, Route};
use crate::routing::table::Admission;
use crate::shard::{ShardKey, ShardState};

impl Proxy {
    /// A request that carries `X-Loom-Router-Hop`: a peer forwarded it. It is never forwarded
    /// again; it is served here if this DC owns the shard at the sender's epoch or newer, and
    /// answered 421 otherwise.
    pub(super) async fn receive_forwarded(
        &self,
        ctx: Ctx<'_>,
        class: Class,
        request: Request<Body>,
    ) -> Outcome {
        let label = Label::local(class.route);
        if let Key::ClusterRead(cluster) = class.key {
            // A peer's `read-owner` (`fresh.rs`).
            return self.serve_owner_read(ctx, cluster, request).await;
        }
        let local = ctx.snap.config.local;
        let (parts, body) = request.into_parts();
        let shard = if class.route == Route::Create {
            // The origin names its home shard; the path cannot.
            header_u64(&parts.headers, &headers::SHARD)
                .map(ShardKey::Residue)
                .or_else(|| ctx.snap.table.home_shard_of(local))
                .map(|k| (Some(k), body))
                .ok_or(RouterError::UnassignedShard(ShardKey::Global))
        } else {
            self.shard_of_request(ctx, class, &parts, body).await
        };
        let (shard, body) = match shard {
            Ok(found) => found,
            Err(e) => return Outcome::error(Label::Unrouted, e),
        };
        let Some(shard) = shard else {
            if class.key == Key::NodeLookup {
                // A node delete whose node this DC's Loom does not know (any more): Loom's own
                // 404 is the true answer. Served as from a client: the hop's router headers are
                // stripped, as nothing here vouches for them.
                let request = Request::from_parts(parts, body);
                return self
                    .serve_local(ctx, ToLocal::unowned(label), request)
                    .await;
            }
            // Routers forward only writes that name a shard. Anything else that claims to be a
            // hop would reach Loom carrying router headers nobody vouches for.
            return Outcome::error(label, RouterError::HopWithoutShard);
        };
        let epoch = header_u64(&parts.headers, &headers::EPOCH).unwrap_or(0);
        let create = class.route == Route::Create;
        let mut snap = ctx.snap.clone();
        let mut admission = snap.table.admit_forwarded(local, shard, epoch, create);
        if admission == Admission::Refresh {
            self.inner.control.refresh().await;
            snap = self.inner.control.snapshot();
            admission = snap.table.admit_forwarded(local, shard, epoch, create);
        }
        match admission {
            Admission::Serve { epoch } => {
                let to = ToLocal {
                    label,
                    shard: Some(shard),
                    epoch: Some(epoch),
                    trust: Trust::Peer,
                };
                let request = Request::from_parts(parts, body);
                self.serve_admitted(Ctx { snap: &snap, ..ctx }, to, request)
                    .await
            }
            Admission::Fenced => Outcome::error(label, RouterError::Fenced(shard)),
            Admission::Refresh | Admission::Misdirected { .. } => {
                let (owner, epoch) = match snap.table.shard(shard) {
                    Some(s) => (Some(snap.config.datacenters[s.owner].name.clone()), s.epoch),
                    None => (None, 0),
                };
                Outcome::error(
                    label,
                    RouterError::Misdirected {
                        shard,
                        owner,
                        epoch,
                    },
                )
            }
        }
    }

    /// A write this DC owns, through the write gate: 503 `fenced` unless this router may admit
    /// writes right now (`docs/failover.md`, self-fencing), else [`Self::serve_local`].
    pub(super) async fn serve_admitted(
        &self,
        ctx: Ctx<'_>,
        to: ToLocal,
        request: Request<Body>,
    ) -> Outcome {
        if let (Some(shard), Some(_)) = (to.shard, to.epoch) {
            if !self.may_admit(ctx.snap) {
                return Outcome::error(to.label, RouterError::Fenced(shard));
            }
        }
        self.serve_local(ctx, to, request).await
    }

    /// Whether an owned write admitted at epoch `admitted` may still go out, right before the
    /// send: the current table and the lease again, so that a pause since admission cannot let a
    /// write out after a fence or past the lease. The write is counted first and checked second,
    /// so either it sees a fence that landed since the request began, or `/loom-router/drained`
    /// sees it; the returned guard keeps it counted until Loom has answered.
    fn still_admitted(&self, shard: ShardKey, admitted: u64) -> Option<InFlight<'_>> {
        let guard = InFlight::start(&self.inner.in_flight_writes, shard);
        let now = self.inner.control.snapshot();
        let local = now.config.local;
        let still = now.table.shard(shard).is_some_and(|s| {
            s.epoch == admitted && s.owner == local && s.state == ShardState::Active
        }) && self.may_admit(&now);
        still.then_some(guard)
    }

    /// Send a request to this DC's Loom. The epoch it was admitted under is stamped on owned
    /// writes; a peer's `X-Loom-Router-*` headers are kept only for [`Trust::Peer`].
    pub(super) async fn serve_local(
        &self,
        ctx: Ctx<'_>,
        to: ToLocal,
        request: Request<Body>,
    ) -> Outcome {
        let Ctx { snap, conn, .. } = ctx;
        let ToLocal {
            label,
            shard,
            epoch,
            trust,
        } = to;
        let (mut parts, body) = request.into_parts();
        let config = &snap.config;
        let local = config.local;
        let keep_router_headers = trust == Trust::Peer;
        headers::prepare_upstream(
            &mut parts.headers,
            client(conn),
            &snap.via,
            keep_router_headers,
        );
        if let Some(epoch) = epoch {
            parts
                .headers
                .insert(headers::EPOCH, HeaderValue::from(epoch));
        }
        // Routed writes are bounded by write_timeout (the fence arithmetic relies on it); reads,
        // query POSTs, provisioner and passthrough traffic by request_timeout.
        let timeout = if label.is_owned_write() {
            config.loom.write_timeout
        } else {
            config.loom.request_timeout
        };
        parts.uri = forward::upstream_uri(&config.loom.upstream, parts.uri.path_and_query());
        parts.version = Version::HTTP_11;
        let sent = Instant::now();
        let _in_flight = match (shard, epoch) {
            (Some(shard), Some(admitted)) => match self.still_admitted(shard, admitted) {
                Some(guard) => Some(guard),
                None => return Outcome::error(label, RouterError::Fenced(shard)),
            },
            _ => None,
        };
        let result = self
            .forwarder
            .send_from(
                conn.affine.as_ref(),
                Request::from_parts(parts, body),
                timeout,
            )
            .await;
        let upstream_time = Some(sent.elapsed());
        let result = match result {
            Ok(response) => {
                let mut response = response.map(Body::Incoming);
                headers::prepare_downstream(response.headers_mut(), &snap.via);
                Ok(response)
            }
            Err(e) => Err(RouterError::from_local(e, timeout)),
        };
        Outcome {
            label,
            served_by: result.is_ok().then_some(local),
            retries: 0,
            owner_failed: None,
            shard,
            target: Some(local),
            upstream_time,
            result,
        }
    }
}
