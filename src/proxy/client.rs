//! A client's request: keyed by the shard it names, resolved against the table, and sent to
//! this DC's Loom or the owner DC's router (docs/routing.md).
//!
//! The key comes from the path, the global or home shard, a `/v2/nodes` body the router reads,
//! or a lookup of the node at the local Loom. What the table says is final here: health is
//! checked only once a peer is chosen (`peer.rs`), because health never moves ownership.

use http::request::Parts;
use http::{Request, StatusCode};

use super::request::{client, Ctx, Label, Outcome, ToLocal, ToPeer, Trust};
use super::Proxy;
use crate::http::body::Body;
use crate::http::error::RouterError;
use crate::http::forward::{self, ReadBodyError};
use crate::http::headers;
use crate::routing::classify::{self, Class, Key, Route};
use crate::routing::table::{ResolveError, Target};
use crate::shard::ShardKey;

impl Proxy {
    /// A request from a client (not a peer router).
    pub(super) async fn route_from_client(
        &self,
        ctx: Ctx<'_>,
        class: Class,
        request: Request<Body>,
    ) -> Outcome {
        let snap = ctx.snap;
        let local = snap.config.local;
        let label = Label::local(class.route);
        let (parts, body) = request.into_parts();
        let (shard, body) = match self.shard_of_request(ctx, class, &parts, body).await {
            Ok(found) => found,
            // The request could not be keyed (a node body too big or with a bad clusterId):
            // no route was decided.
            Err(e) => return Outcome::error(Label::Unrouted, e),
        };
        let Some(shard) = shard else {
            if class.route == Route::Read {
                // Local, unless the client must read its own write (`fresh.rs`).
                match self.read_from(ctx, class.key, &parts.headers) {
                    Ok(None) => {}
                    Ok(Some(cluster)) => {
                        let request = Request::from_parts(parts, body);
                        return Box::pin(self.read_from_owner(ctx, cluster, request)).await;
                    }
                    Err(e) => return Outcome::error(label, e),
                }
            }
            // Reads, passthrough, provisioner traffic and unkeyed node writes: local.
            let request = Request::from_parts(parts, body);
            return self
                .serve_local(ctx, ToLocal::unowned(label), request)
                .await;
        };
        let resolved = if class.route == Route::Create {
            snap.table.resolve_create(local)
        } else {
            snap.table.resolve_write(local, shard)
        };
        let resolved = match resolved {
            Ok(r) => r,
            Err(ResolveError::Unassigned(key)) => {
                return Outcome::error(label, RouterError::UnassignedShard(key))
            }
            Err(ResolveError::Fenced(key)) => {
                let owner = snap.table.shard(key).map(|s| s.owner);
                let label = if owner == Some(local) {
                    label
                } else {
                    Label::forwarded(class.route)
                };
                return Outcome::error(label, RouterError::Fenced(key));
            }
        };
        match resolved.target {
            Target::Local { epoch } => {
                let to = ToLocal {
                    label,
                    shard: Some(resolved.shard),
                    epoch,
                    trust: Trust::Client,
                };
                let request = Request::from_parts(parts, body);
                self.serve_admitted(ctx, to, request).await
            }
            Target::Peer { dc, epoch } => {
                let to = ToPeer {
                    label: Label::forwarded(class.route),
                    route: class.route,
                    shard: resolved.shard,
                    dc,
                    epoch,
                };
                let cookie = self.cookie_to_renew(ctx, &parts.headers);
                let request = Request::from_parts(parts, body);
                // Boxed, as every path off the read path: the future hyper keeps for each request
                // stays the size of a read's (docs/performance.md).
                let mut outcome = Box::pin(self.forward_to_peer(ctx, to, request)).await;
                if ctx.snap.config.consistency.tracks() {
                    self.remember_write(ctx, cookie, &mut outcome);
                }
                outcome
            }
        }
    }

    /// The shard a request is keyed by, reading the body or asking the local Loom where the
    /// routing table says to. Returns the body to send on (read bodies come back buffered).
    pub(super) async fn shard_of_request(
        &self,
        ctx: Ctx<'_>,
        class: Class,
        parts: &Parts,
        body: Body,
    ) -> Result<(Option<ShardKey>, Body), RouterError> {
        let Ctx { snap, notes, .. } = ctx;
        let table = &snap.table;
        match class.key {
            Key::None => Ok((None, body)),
            Key::ClusterRead(id) => {
                notes.set_cluster(id);
                Ok((None, body))
            }
            Key::Cluster(id) => {
                notes.set_cluster(id);
                Ok((Some(table.shard_key_of_cluster(id)), body))
            }
            Key::Global => Ok((Some(ShardKey::Global), body)),
            Key::Home => {
                let home = table
                    .home_shard_of(snap.config.local)
                    .ok_or(RouterError::UnassignedShard(ShardKey::Global))?;
                Ok((Some(home), body))
            }
            Key::NodeBody => {
                let limits = &snap.config.limits;
                let limit = limits.max_read_body_bytes;
                // The body stalls after body_read_timeout without a byte (the body's own timer);
                // a client that trickles it is cut off at the same bound for the whole body.
                let stalled = RouterError::ClientTimeout(limits.body_read_timeout);
                let read = Box::pin(tokio::time::timeout(
                    limits.body_read_timeout,
                    forward::read_body(body, limit),
                ));
                let bytes = match read.await {
                    Ok(Ok(bytes)) => bytes,
                    Ok(Err(ReadBodyError::TooLarge)) => {
                        return Err(RouterError::BodyTooLarge { limit })
                    }
                    Ok(Err(ReadBodyError::ClientTimeout)) | Err(_) => return Err(stalled),
                    Ok(Err(ReadBodyError::Broken(_))) => return Err(RouterError::BadRequest),
                };
                let cluster = classify::cluster_from_node_body(&bytes)?;
                if let Some(id) = cluster {
                    notes.set_cluster(id);
                }
                Ok((
                    cluster.map(|id| table.shard_key_of_cluster(id)),
                    Body::full(bytes),
                ))
            }
            Key::NodeLookup => {
                let cluster = Box::pin(self.node_cluster(ctx, parts)).await;
                if let Some(id) = cluster {
                    notes.set_cluster(id);
                }
                Ok((cluster.map(|id| table.shard_key_of_cluster(id)), body))
            }
        }
    }

    /// `DELETE /v2/nodes/{node}`: learn the node's cluster from the local Loom, with the
    /// caller's identity headers (Loom answers only to them). Any failure routes locally, where
    /// Loom gives the authoritative answer (404 for an unknown node).
    async fn node_cluster(&self, ctx: Ctx<'_>, parts: &Parts) -> Option<u64> {
        let Ctx { snap, conn, .. } = ctx;
        let mut headers = parts.headers.clone();
        headers::prepare_upstream(&mut headers, client(conn), &snap.via, false);
        headers.remove(http::header::CONTENT_LENGTH);
        let mut request = Request::new(Body::empty());
        *request.uri_mut() =
            forward::upstream_uri(&snap.config.loom.upstream, parts.uri.path_and_query());
        *request.headers_mut() = headers;
        let response = self
            .forwarder
            .send(request, snap.config.loom.request_timeout)
            .await
            .ok()?;
        if response.status() != StatusCode::OK {
            return None;
        }
        let bytes =
            forward::read_body(response.into_body(), snap.config.limits.max_read_body_bytes)
                .await
                .ok()?;
        classify::cluster_from_node_body(&bytes).ok().flatten()
    }
}
