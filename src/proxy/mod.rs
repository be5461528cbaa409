//! The request path: classify → resolve → forward, and the edge where errors become responses.
//!
//! [`Proxy::handle`] is what every data-listener connection calls for every request. It loads the
//! snapshot once, asks `routing/classify.rs` what the request is and `routing/table.rs` where it goes, then
//! uses `http/forward.rs` to send it: to the local Loom, or, for a write this DC does not own, to the
//! owning DC's router (one hop, never two). A write that arrives from a peer router is checked
//! against this router's table before its Loom sees it (docs/routing.md).
//!
//! This file owns the order of those steps, the 421 retry loop, route headers, and logging and
//! metrics for each request, once, at the edge. It must not parse paths (routing/classify.rs), compute
//! shards (routing/table.rs) or build HTTP clients (http/forward.rs).

pub mod listener;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::sync::Semaphore;

use crate::config::AccessLog;
use crate::coord::control::{Control, Snapshot};
use crate::coord::join::Handle;
use crate::coord::lease::Gate;
use crate::health::{HealthBoard, Status};
use crate::http::body::Body;
use crate::http::error::{MisdirectedView, RouterError};
use crate::http::forward::{self, Buffered, Forwarder, ReadBodyError};
use crate::http::headers::{self, Client};
use crate::metrics;
use crate::routing::classify::{self, Class, Key, Route};
use crate::routing::table::{Admission, Target};
use crate::shard::{DcId, ShardKey, ShardState};

/// How many times the origin re-sends a write that a peer answered with 421.
const MAX_MISDIRECTED_RETRIES: usize = 2;

/// What the router knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// The request came over TLS.
    pub https: bool,
    /// The client presented a certificate signed by `[tls] client_ca`.
    pub peer_verified: bool,
    /// The client's address as `X-Forwarded-For` appends it, formatted once per connection.
    pub forwarded_for: HeaderValue,
}

impl ConnInfo {
    pub fn new(remote: SocketAddr, https: bool, peer_verified: bool) -> Self {
        Self {
            remote,
            https,
            peer_verified,
            forwarded_for: headers::ip_value(remote.ip()),
        }
    }
}

/// Shared state of the request path. One per router; cheap to clone.
#[derive(Debug, Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    control: Control,
    /// Written by the health probes; read here to fail fast on a dead owner.
    health: Arc<HealthBoard>,
    forwarder: Forwarder,
    /// `max_concurrent_requests` permits; a request that finds none gets 503 `overloaded`.
    limiter: Semaphore,
    /// The limit the semaphore was sized for, so a reload can grow or shrink it.
    limit: std::sync::atomic::AtomicUsize,
    /// Set once on SIGTERM; `/readyz` answers 503 from then on.
    draining: AtomicBool,
    /// The self-fencing gate and store access, with the memory and etcd backends; `None` with
    /// `static`, where ownership changes only by hand and no lease exists.
    coordination: Option<(Arc<Gate>, Handle)>,
    /// Owned writes at the local Loom right now, by shard. Incremented and decremented by the
    /// requests themselves (many at once, hence a concurrent map); read by `/loom-router/drained`.
    in_flight_writes: DashMap<ShardKey, usize>,
    /// Request counts, latencies and the in-flight gauge, through cached handles.
    metrics: metrics::RequestMetrics,
    /// `[tls] client_ca` was set at start-up, so hop headers need a verified peer certificate.
    /// Read once: the https listener keeps its start-up verifier until a restart, and trust must
    /// follow what the listener verifies, not a reloaded file.
    peers_need_certificates: bool,
}

/// Counts one owned write in [`Inner::in_flight_writes`] until dropped.
struct InFlight<'a> {
    map: &'a DashMap<ShardKey, usize>,
    shard: ShardKey,
}

impl<'a> InFlight<'a> {
    fn start(map: &'a DashMap<ShardKey, usize>, shard: ShardKey) -> Self {
        *map.entry(shard).or_insert(0) += 1;
        Self { map, shard }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(mut n) = self.map.get_mut(&self.shard) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The route label of a request: the `X-Loom-Route` value and the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Provisioner,
    Read,
    Create,
    CreateForwarded,
    WriteLocal,
    WriteForwarded,
    GlobalWrite,
    Passthrough,
    Unrouted,
    /// A peer's readiness probe: answered here, not logged, counted or labelled, so probes
    /// every `[health] interval` do not drown the access log and the request metrics.
    Probe,
}

impl Label {
    fn as_str(self) -> &'static str {
        match self {
            Self::Provisioner => "provisioner",
            Self::Read => "read",
            Self::Create => "create",
            Self::CreateForwarded => "create-forwarded",
            Self::WriteLocal => "write-local",
            Self::WriteForwarded => "write-forwarded",
            Self::GlobalWrite => "global-write",
            Self::Passthrough => "passthrough",
            Self::Unrouted => "unrouted",
            Self::Probe => "probe",
        }
    }

    /// A write this DC's Loom applies for a shard this DC owns.
    fn is_owned_write(self) -> bool {
        matches!(self, Self::WriteLocal | Self::Create | Self::GlobalWrite)
    }

    fn local(route: Route) -> Self {
        match route {
            Route::Provisioner => Self::Provisioner,
            Route::Read => Self::Read,
            Route::Readyz | Route::Drained => Self::Probe,
            Route::Create => Self::Create,
            Route::Write => Self::WriteLocal,
            Route::GlobalWrite => Self::GlobalWrite,
            Route::Passthrough => Self::Passthrough,
        }
    }

    fn forwarded(route: Route) -> Self {
        match route {
            Route::Create => Self::CreateForwarded,
            Route::Write => Self::WriteForwarded,
            other => Self::local(other),
        }
    }
}

/// Whose `X-Loom-Router-*` headers a request may carry to this DC's Loom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// A client's request, or a hop nothing vouches for: its router headers are stripped and the
    /// router sends its own.
    Client,
    /// A peer's hop this router admitted: origin and shard are kept, the epoch is this router's.
    Peer,
}

/// A request on its way to this DC's Loom: how it is labelled, and for an owned write, the shard
/// and the epoch it was admitted under.
#[derive(Debug, Clone, Copy)]
struct ToLocal {
    label: Label,
    shard: Option<ShardKey>,
    epoch: Option<u64>,
    trust: Trust,
}

impl ToLocal {
    /// A request that names no shard this router admits: reads, passthrough, provisioner calls.
    fn unowned(label: Label) -> Self {
        Self {
            label,
            shard: None,
            epoch: None,
            trust: Trust::Client,
        }
    }
}

/// A write on its way to the router of the DC that owns its shard, at the epoch the origin's
/// table gives.
#[derive(Debug, Clone, Copy)]
struct ToPeer {
    label: Label,
    route: Route,
    shard: ShardKey,
    dc: DcId,
    epoch: u64,
}

/// What the request path learns on the way that only the access log needs. Written at most
/// once per request (atomics only because the request future must be `Send`).
#[derive(Debug)]
struct Notes {
    /// The cluster the request named (path, node body or node lookup); `u64::MAX` for none.
    cluster: std::sync::atomic::AtomicU64,
}

impl Default for Notes {
    fn default() -> Self {
        Self {
            cluster: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }
}

impl Notes {
    fn set_cluster(&self, id: u64) {
        self.cluster.store(id, Ordering::Relaxed);
    }

    fn cluster(&self) -> Option<u64> {
        match self.cluster.load(Ordering::Relaxed) {
            u64::MAX => None,
            id => Some(id),
        }
    }
}

/// The request as it arrived, for the access log.
struct Seen<'a> {
    method: &'a Method,
    version: Version,
    path: &'a str,
    request_id: Option<&'a HeaderValue>,
    cluster: Option<u64>,
    start: Instant,
}

/// What one request came to, for the edge to finish.
struct Outcome {
    label: Label,
    /// The DC whose Loom produced the response (none for router errors).
    served_by: Option<DcId>,
    /// Shard and target DC, for the access log.
    shard: Option<ShardKey>,
    target: Option<DcId>,
    upstream_time: Option<Duration>,
    result: Result<Response<Body>, RouterError>,
}

impl Outcome {
    fn error(label: Label, error: RouterError) -> Self {
        Self {
            label,
            served_by: None,
            shard: None,
            target: None,
            upstream_time: None,
            result: Err(error),
        }
    }
}

impl Proxy {
    pub fn new(
        control: Control,
        health: Arc<HealthBoard>,
        forwarder: Forwarder,
        coordination: Option<(Arc<Gate>, Handle)>,
    ) -> Self {
        let snap = control.snapshot();
        let limit = snap.config.limits.max_concurrent_requests;
        let peers_need_certificates = snap
            .config
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_some());
        drop(snap);
        Self {
            inner: Arc::new(Inner {
                control,
                health,
                forwarder,
                limiter: Semaphore::new(limit),
                limit: std::sync::atomic::AtomicUsize::new(limit),
                draining: AtomicBool::new(false),
                coordination,
                in_flight_writes: DashMap::new(),
                metrics: metrics::RequestMetrics::default(),
                peers_need_certificates,
            }),
        }
    }

    /// Resize the concurrency limit after a reload. Shrinking takes effect as requests finish.
    pub fn set_concurrency_limit(&self, limit: usize) {
        let old = self.inner.limit.swap(limit, Ordering::SeqCst);
        if limit > old {
            self.inner.limiter.add_permits(limit - old);
        } else if limit < old {
            let mut excess = old - limit;
            excess -= self.inner.limiter.forget_permits(excess);
            if excess > 0 {
                // Permits held by requests in flight: take them back as they are released.
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    if let Ok(permits) = inner.limiter.acquire_many(excess as u32).await {
                        permits.forget();
                    }
                });
            }
        }
    }

    /// The shared upstream client, for admin calls to peers.
    pub fn forwarder(&self) -> &Forwarder {
        &self.inner.forwarder
    }

    /// Store access for admin operations; `None` with the static backend.
    pub fn coordination(&self) -> Option<&Handle> {
        self.inner.coordination.as_ref().map(|(_, h)| h)
    }

    /// The write gate, with the memory and etcd backends.
    pub fn gate(&self) -> Option<&Gate> {
        self.inner.coordination.as_ref().map(|(g, _)| g.as_ref())
    }

    /// May this router admit a write for a shard it owns, right now (docs/failover.md)?
    /// Always under `static`. Otherwise only from a table read from the store, and only while
    /// the lease is certain to outlast `write_timeout`.
    fn may_admit(&self, snap: &Snapshot) -> bool {
        match &self.inner.coordination {
            None => true,
            Some((gate, _)) => {
                snap.from_store
                    && gate.admits(
                        tokio::time::Instant::now(),
                        snap.config.loom.write_timeout,
                        snap.table.table_epoch,
                    )
            }
        }
    }

    pub fn control(&self) -> &Control {
        &self.inner.control
    }

    pub fn health(&self) -> &HealthBoard {
        &self.inner.health
    }

    /// Turn `/readyz` to 503: the load balancer stops sending new traffic.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Ready: a table is published (always, after start), the local Loom answers its health
    /// path, and the router is not draining.
    pub fn is_ready(&self) -> bool {
        let snap = self.inner.control.snapshot();
        let has_table = snap.from_store || self.inner.coordination.is_none();
        has_table
            && !self.inner.draining.load(Ordering::SeqCst)
            && self.inner.health.get(&snap.config.local_dc().name) == Status::Up
    }

    /// Handle one request from a client or a peer router.
    pub async fn handle(&self, request: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let start = Instant::now();
        let snap = self.inner.control.snapshot();
        let method = request.method().clone();
        let version = request.version();
        // The URI's parts are shared bytes: cloning it copies no path.
        let uri = request.uri().clone();
        let request_id = request.headers().get(headers::REQUEST_ID).cloned();
        let notes = Notes::default();
        let outcome = {
            // Decremented on drop too: hyper drops this future when the client goes away.
            let _inflight = self.inner.metrics.inflight();
            self.route(&snap, request, &conn, &notes).await
        };
        let seen = Seen {
            method: &method,
            version,
            path: uri.path(),
            request_id: request_id.as_ref(),
            cluster: notes.cluster(),
            start,
        };
        self.finish(&snap, &seen, outcome)
    }

    /// Steps 3 to 5 of the life of a request (see `lib.rs`).
    async fn route(
        &self,
        snap: &Arc<Snapshot>,
        mut request: Request<Incoming>,
        conn: &ConnInfo,
        notes: &Notes,
    ) -> Outcome {
        let uri = request.uri();
        if !headers::host_ok(request.headers(), request.version(), uri.authority()) {
            return Outcome::error(Label::Unrouted, RouterError::BadHost);
        }
        if request.version() == Version::HTTP_2 {
            // An HTTP/2 client names its host in `:authority`; give it the `Host` an HTTP/1.1
            // request would have had, so upstreams see the same `X-Forwarded-Host` either way.
            let authority = request.uri().authority().cloned();
            headers::host_from_authority(request.headers_mut(), authority.as_ref());
        }
        let uri = request.uri();
        let class = match classify::classify(request.method(), uri.path()) {
            Ok(class) => class,
            Err(e) => return Outcome::error(Label::Unrouted, e.into()),
        };
        if class.route == Route::Readyz {
            return self.readyz(request.method());
        }
        if class.route == Route::Drained {
            return self.drained(snap, request.method(), request.uri().query());
        }
        let label = Label::local(class.route);
        let Ok(_permit) = self.inner.limiter.try_acquire() else {
            return Outcome::error(
                label,
                RouterError::Overloaded {
                    limit: snap.config.limits.max_concurrent_requests,
                },
            );
        };
        if headers::via_names(request.headers(), &snap.via_token) {
            return Outcome::error(label, RouterError::LoopDetected);
        }
        // From here on the body comes from the client (or the origin router) under the stall
        // timer.
        let stall = snap.config.limits.body_read_timeout;
        let request = request.map(|body| Body::from_client(body, stall));
        if headers::has_hop(request.headers()) {
            if self.inner.peers_need_certificates && !conn.peer_verified {
                return Outcome::error(label, RouterError::PeerUnauthenticated);
            }
            return self
                .receive_forwarded(snap, class, request, conn, notes)
                .await;
        }
        self.route_from_client(snap, class, request, conn, notes)
            .await
    }

    /// A request from a client (not a peer router).
    async fn route_from_client(
        &self,
        snap: &Arc<Snapshot>,
        class: Class,
        request: Request<Body>,
        conn: &ConnInfo,
        notes: &Notes,
    ) -> Outcome {
        let local = snap.config.local;
        let label = Label::local(class.route);
        let (parts, body) = request.into_parts();
        let (shard, body) = match self
            .shard_of_request(snap, class, &parts, body, conn, notes)
            .await
        {
            Ok(found) => found,
            // The request could not be keyed (a node body too big or with a bad clusterId):
            // no route was decided.
            Err(e) => return Outcome::error(Label::Unrouted, e),
        };
        let Some(shard) = shard else {
            // Reads, passthrough, provisioner traffic and unkeyed node writes: always local.
            let request = Request::from_parts(parts, body);
            return self
                .serve_local(snap, conn, ToLocal::unowned(label), request)
                .await;
        };
        let resolved = if class.route == Route::Create {
            snap.table.resolve_create(local)
        } else {
            snap.table.resolve_write(local, shard)
        };
        let resolved = match resolved {
            Ok(r) => r,
            Err(crate::routing::table::ResolveError::Unassigned(key)) => {
                return Outcome::error(label, RouterError::UnassignedShard(key))
            }
            Err(crate::routing::table::ResolveError::Fenced(key)) => {
                metrics::fenced_write();
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
                self.serve_admitted(snap, conn, to, request).await
            }
            Target::Peer { dc, epoch } => {
                let to = ToPeer {
                    label: Label::forwarded(class.route),
                    route: class.route,
                    shard: resolved.shard,
                    dc,
                    epoch,
                };
                let request = Request::from_parts(parts, body);
                self.forward_to_peer(snap, conn, to, request).await
            }
        }
    }

    /// The shard a request is keyed by, reading the body or asking the local Loom where the
    /// routing table says to. Returns the body to send on (read bodies come back buffered).
    async fn shard_of_request(
        &self,
        snap: &Snapshot,
        class: Class,
        parts: &Parts,
        body: Body,
        conn: &ConnInfo,
        notes: &Notes,
    ) -> Result<(Option<ShardKey>, Body), RouterError> {
        let table = &snap.table;
        match class.key {
            Key::None => Ok((None, body)),
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
                let read =
                    tokio::time::timeout(limits.body_read_timeout, forward::read_body(body, limit));
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
                let cluster = self.node_cluster(snap, parts, conn).await;
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
    async fn node_cluster(&self, snap: &Snapshot, parts: &Parts, conn: &ConnInfo) -> Option<u64> {
        let mut headers = parts.headers.clone();
        headers::prepare_upstream(&mut headers, client(conn), &snap.via, false);
        headers.remove(http::header::CONTENT_LENGTH);
        let mut request = Request::new(Body::empty());
        *request.uri_mut() =
            forward::upstream_uri(&snap.config.loom.upstream, parts.uri.path_and_query());
        *request.headers_mut() = headers;
        let response = self
            .inner
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

    /// A request that carries `X-Loom-Router-Hop`: a peer forwarded it. It is never forwarded
    /// again; it is served here if this DC owns the shard at the sender's epoch or newer, and
    /// answered 421 otherwise.
    async fn receive_forwarded(
        &self,
        snap: &Arc<Snapshot>,
        class: Class,
        request: Request<Body>,
        conn: &ConnInfo,
        notes: &Notes,
    ) -> Outcome {
        let label = Label::local(class.route);
        let local = snap.config.local;
        let (parts, body) = request.into_parts();
        let shard = if class.route == Route::Create {
            // The origin names its home shard; the path cannot.
            header_u64(&parts.headers, &headers::SHARD)
                .map(ShardKey::Residue)
                .or_else(|| snap.table.home_shard_of(local))
                .map(|k| (Some(k), body))
                .ok_or(RouterError::UnassignedShard(ShardKey::Global))
        } else {
            self.shard_of_request(snap, class, &parts, body, conn, notes)
                .await
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
                    .serve_local(snap, conn, ToLocal::unowned(label), request)
                    .await;
            }
            // Routers forward only writes that name a shard. Anything else that claims to be a
            // hop would reach Loom carrying router headers nobody vouches for.
            return Outcome::error(label, RouterError::HopWithoutShard);
        };
        let epoch = header_u64(&parts.headers, &headers::EPOCH).unwrap_or(0);
        let create = class.route == Route::Create;
        let mut snap = snap.clone();
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
                self.serve_admitted(&snap, conn, to, request).await
            }
            Admission::Fenced => {
                metrics::fenced_write();
                Outcome::error(label, RouterError::Fenced(shard))
            }
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

    /// Send a request to this DC's Loom. The epoch it was admitted under is stamped on owned
    /// writes; a peer's `X-Loom-Router-*` headers are kept only for [`Trust::Peer`].
    async fn serve_local(
        &self,
        snap: &Snapshot,
        conn: &ConnInfo,
        to: ToLocal,
        request: Request<Body>,
    ) -> Outcome {
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
                None => {
                    metrics::fenced_write();
                    return Outcome::error(label, RouterError::Fenced(shard));
                }
            },
            _ => None,
        };
        let result = self
            .inner
            .forwarder
            .send(Request::from_parts(parts, body), timeout)
            .await;
        let upstream_time = Some(sent.elapsed());
        let result = match result {
            Ok(response) => {
                let mut response = response.map(Body::Incoming);
                headers::prepare_downstream(response.headers_mut(), &snap.via);
                Ok(response)
            }
            Err(e) => {
                if !e.kind.is_client() {
                    let name = &config.datacenters[local].name;
                    metrics::upstream_error(name, e.kind.as_str());
                }
                Err(RouterError::from_local(e, timeout))
            }
        };
        Outcome {
            label,
            served_by: result.is_ok().then_some(local),
            shard,
            target: Some(local),
            upstream_time,
            result,
        }
    }

    /// A write this DC owns, through the write gate: 503 `fenced` unless this router may admit
    /// writes right now (`docs/failover.md`, self-fencing), else [`Self::serve_local`].
    async fn serve_admitted(
        &self,
        snap: &Snapshot,
        conn: &ConnInfo,
        to: ToLocal,
        request: Request<Body>,
    ) -> Outcome {
        if let (Some(shard), Some(_)) = (to.shard, to.epoch) {
            if !self.may_admit(snap) {
                metrics::fenced_write();
                return Outcome::error(to.label, RouterError::Fenced(shard));
            }
        }
        self.serve_local(snap, conn, to, request).await
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

    /// Send a write to the owning DC's router, with hop, origin, epoch and `Via`. Bodies up to
    /// `max_retry_body_bytes` are kept so that a 421 can be retried (at most twice).
    async fn forward_to_peer(
        &self,
        snap: &Arc<Snapshot>,
        conn: &ConnInfo,
        to: ToPeer,
        request: Request<Body>,
    ) -> Outcome {
        let ToPeer {
            label,
            route,
            shard,
            mut dc,
            mut epoch,
        } = to;
        let config = &snap.config;
        if let Some(down) = self.owner_down(config, label, dc, shard) {
            return down;
        }
        let (mut parts, body) = request.into_parts();
        // Kept in case a 421 retry ends here, where the local path rewrites them itself.
        let original_headers = parts.headers.clone();
        hop_headers(snap, conn, &mut parts, shard);
        let (replayable, mut once) = match buffer_for_retry(config, body).await {
            Ok(buffered) => buffered,
            Err(error) => return Outcome::error(label, error),
        };
        // The owner bounds the write by write_timeout; wait a second longer so that we do not
        // time out on a write the owner applied.
        let timeout = config.loom.write_timeout + Duration::from_secs(1);
        let sent = Instant::now();
        for attempt in 0..=MAX_MISDIRECTED_RETRIES {
            parts
                .headers
                .insert(headers::EPOCH, HeaderValue::from(epoch));
            parts.uri =
                forward::upstream_uri(&config.datacenters[dc].router, parts.uri.path_and_query());
            let body = match (&replayable, once.take()) {
                (Some(bytes), _) => Body::full(bytes.clone()),
                (None, Some(body)) => body,
                (None, None) => break,
            };
            let response = match self
                .inner
                .forwarder
                .send(rebuild(&parts, body), timeout)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    let name = config.datacenters[dc].name.clone();
                    if e.kind.is_client() {
                        return Outcome::error(label, RouterError::from_peer(e, name, timeout));
                    }
                    metrics::upstream_error(&name, e.kind.as_str());
                    return Outcome {
                        target: Some(dc),
                        shard: Some(shard),
                        upstream_time: Some(sent.elapsed()),
                        ..Outcome::error(label, RouterError::from_peer(e, name, timeout))
                    };
                }
            };
            if !is_misdirected(&response) {
                let mut response = response.map(Body::Incoming);
                headers::prepare_downstream(response.headers_mut(), &snap.via);
                let router_error = response.headers().contains_key(headers::ROUTER_ERROR);
                return Outcome {
                    label,
                    served_by: (!router_error).then_some(dc),
                    shard: Some(shard),
                    target: Some(dc),
                    upstream_time: Some(sent.elapsed()),
                    result: Ok(response),
                };
            }
            // 421: the peer's Loom never saw the request, so even a POST may be sent again.
            let view = misdirected_view(response).await;
            if attempt == MAX_MISDIRECTED_RETRIES || replayable.is_none() {
                break;
            }
            metrics::retry("misdirected");
            match self.next_owner(route, shard, view).await {
                Some(NextOwner::Peer { dc: d, epoch: e }) => (dc, epoch) = (d, e),
                Some(NextOwner::Here { snap: fresh, epoch }) => {
                    // Our refreshed table says we own it now: serve it here, through the gate,
                    // with the headers the client sent.
                    parts.headers = original_headers;
                    let body = replayable.map(Body::full).unwrap_or_else(Body::empty);
                    let to = ToLocal {
                        label: Label::local(route),
                        shard: Some(shard),
                        epoch,
                        trust: Trust::Client,
                    };
                    let request = Request::from_parts(parts, body);
                    return self.serve_admitted(&fresh, conn, to, request).await;
                }
                None => break,
            }
            if let Some(down) = self.owner_down(config, label, dc, shard) {
                return down;
            }
        }
        Outcome::error(label, RouterError::OwnershipConflict(shard))
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
    fn owner_down(
        &self,
        config: &crate::config::Config,
        label: Label,
        dc: DcId,
        shard: ShardKey,
    ) -> Option<Outcome> {
        let name = &config.datacenters[dc].name;
        if self.inner.health.usable(name) {
            return None;
        }
        Some(Outcome {
            target: Some(dc),
            shard: Some(shard),
            ..Outcome::error(
                label,
                RouterError::OwnerUnavailable {
                    dc: name.clone(),
                    retry_after: retry_after(config),
                },
            )
        })
    }

    /// `GET /loom-router/drained?shard=S&epoch=E`: 200 once this router serves a table at epoch E
    /// or newer for the shard (it has seen the fence) and no write it admitted for the shard is
    /// still at its Loom; 503 until then. A planned switchover polls it on the old owner's
    /// routers instead of waiting out `write_timeout`.
    fn drained(&self, snap: &Snapshot, method: &Method, query: Option<&str>) -> Outcome {
        let mut shard = None;
        let mut epoch = None;
        for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match (name.as_ref(), value.as_ref()) {
                ("shard", s) => shard = s.parse().ok(),
                ("epoch", e) => epoch = e.parse::<u64>().ok(),
                _ => {}
            }
        }
        let (status, body) = match (method == Method::GET, shard, epoch) {
            (false, _, _) => (StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
            (true, Some(shard), Some(epoch)) => {
                let seen = snap.table.shard(shard).is_some_and(|s| s.epoch >= epoch);
                let busy = self
                    .inner
                    .in_flight_writes
                    .get(&shard)
                    .is_some_and(|n| *n > 0);
                if seen && !busy {
                    (StatusCode::OK, "drained\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                }
            }
            (true, _, _) => (
                StatusCode::BAD_REQUEST,
                "send ?shard=<residue|global>&epoch=<n>\n",
            ),
        };
        probe_answer(status, body)
    }

    /// `GET /loom-router/readyz` on the data listener: what peers probe.
    fn readyz(&self, method: &Method) -> Outcome {
        let ready = self.is_ready();
        let (status, body) = if method != Method::GET && method != Method::HEAD {
            (StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
        } else if ready {
            (StatusCode::OK, "ready\n")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        };
        probe_answer(status, body)
    }

    /// The edge: turn errors into responses, add route headers, log and count, once.
    fn finish(&self, snap: &Snapshot, seen: &Seen<'_>, outcome: Outcome) -> Response<Body> {
        let (method, path, start) = (seen.method, seen.path, seen.start);
        let config = &snap.config;
        let (mut response, error) = match outcome.result {
            Ok(response) => (response, None),
            Err(error) => (error.to_response(), Some(error)),
        };
        if outcome.label == Label::Probe {
            return response;
        }
        if config.route_headers {
            let h = response.headers_mut();
            h.insert(
                headers::ROUTE,
                HeaderValue::from_static(outcome.label.as_str()),
            );
            match outcome.served_by {
                Some(dc) if error.is_none() => {
                    // A forwarded response already names the owner's DC; keep the owner's word.
                    if dc == config.local || !h.contains_key(headers::SERVED_BY) {
                        h.insert(headers::SERVED_BY, snap.dc_names[dc].clone());
                    }
                }
                _ => {
                    h.remove(headers::SERVED_BY);
                }
            }
        } else {
            response.headers_mut().remove(headers::ROUTE);
            response.headers_mut().remove(headers::SERVED_BY);
        }
        if let Some(error) = &error {
            let h = response.headers_mut();
            h.append(http::header::VIA, snap.via.clone());
            if matches!(error, RouterError::ClientTimeout(_)) && seen.version != Version::HTTP_2 {
                // The rest of the body may still come: the connection cannot carry another
                // request. (HTTP/2 has no `Connection`; its stream is simply reset.)
                h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        let elapsed = start.elapsed();
        let status = response.status().as_u16();
        self.inner
            .metrics
            .request(outcome.label.as_str(), status, elapsed);
        if let Some(error) = &error {
            if error.is_client_fault() {
                metrics::client_error(error.code());
            }
            if status >= 500 {
                tracing::warn!(%method, path, code = error.code(), error = %error, source = ?std::error::Error::source(error), "router error");
            } else {
                tracing::debug!(%method, path, code = error.code(), error = %error, "client error");
            }
        }
        if config.access_log != AccessLog::Off {
            tracing::info!(
                target: "loom_router::access",
                request_id = seen.request_id.and_then(|v| v.to_str().ok()),
                %method,
                path,
                route = outcome.label.as_str(),
                cluster = seen.cluster,
                shard = outcome.shard.map(|s| s.to_string()),
                target_dc = outcome.target.map(|dc| config.datacenters[dc].name.as_str()),
                status,
                duration_us = elapsed.as_micros() as u64,
                upstream_us = outcome.upstream_time.map(|d| d.as_micros() as u64),
            );
        }
        response
    }
}

/// A router-to-router probe's plain-text answer (not logged, counted or labelled).
fn probe_answer(status: StatusCode, body: &'static str) -> Outcome {
    let mut response = Response::new(Body::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(headers::TEXT_PLAIN));
    Outcome {
        label: Label::Probe,
        served_by: None,
        shard: None,
        target: None,
        upstream_time: None,
        result: Ok(response),
    }
}

fn client(conn: &ConnInfo) -> Client<'_> {
    Client {
        ip: &conn.forwarded_for,
        https: conn.https,
    }
}

fn header_u64(headers: &HeaderMap, name: &http::HeaderName) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// `Retry-After` for `owner_unavailable`: about as long as health checks need to see the DC come
/// back.
fn retry_after(config: &crate::config::Config) -> Duration {
    config.health.interval * config.health.healthy_after
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

/// Only a router's 421 means "not delivered"; a 421 from the owner's Loom is an answer.
fn is_misdirected(response: &Response<Incoming>) -> bool {
    response.status() == StatusCode::MISDIRECTED_REQUEST
        && response
            .headers()
            .get(headers::ROUTER_ERROR)
            .is_some_and(|v| v == "misdirected")
}

/// The headers of a write forwarded to a peer: the proxy rewrite, then hop, origin and shard.
fn hop_headers(snap: &Snapshot, conn: &ConnInfo, parts: &mut Parts, shard: ShardKey) {
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
async fn buffer_for_retry(
    config: &crate::config::Config,
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

fn rebuild(parts: &Parts, body: Body) -> Request<Body> {
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
