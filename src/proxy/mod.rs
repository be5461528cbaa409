//! The request path: classify → resolve → forward, and the edge where errors become responses.
//!
//! [`Proxy::handle`] is what every data-listener connection calls for every request. It loads the
//! snapshot once, asks `routing::classify` what the request is and `routing::table` where it
//! goes, then uses `http::forward` to send it: to the local Loom, or, for a write this DC does
//! not own, to the owning DC's router (one hop, never two). A write that arrives from a peer
//! router is checked against this router's table before its Loom sees it (docs/routing.md).
//!
//! - this file: the shared state, and the first steps every request takes (`Host`, path,
//!   limiter, loop check), which decide who it is from: a client or a peer router;
//! - `request.rs`: the per-request context and the types the steps pass on;
//! - `client.rs`: a client's request, keyed by its shard and resolved against the table;
//! - `local.rs`: what this DC's Loom serves, through the write gate, and a peer's hop, admitted
//!   or answered 421;
//! - `peer.rs`: a write sent on to the owner's router, and the 421 retry loop;
//! - `fresh.rs`: a read of one cluster sent to its owner (`read-owner`) so a client reads its
//!   own write, the owner's side of it, and the tracking and cookie a forwarded write leaves;
//! - `probe.rs`: the router-to-router probes (`/loom-router/readyz`, `/loom-router/drained`);
//! - `edge.rs`: the response the client gets, with route headers, counted and logged once;
//! - `listener.rs`: the data listeners' accept loop, TLS, connection limits and drain;
//! - `workers.rs`: the request workers, a thread and a single-threaded runtime each.
//!
//! Nothing here parses paths (`routing::classify`), computes shards (`routing::table`), builds
//! HTTP clients (`http::forward`) or writes the snapshot (`coord::control`).

mod client;
mod edge;
mod fresh;
pub mod listener;
mod local;
mod peer;
mod probe;
mod request;
pub mod workers;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use http::header::HeaderValue;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::coord::control::{Control, Snapshot};
use crate::coord::lease::Gate;
use crate::health::{HealthBoard, Status};
use crate::http::affine::Affine;
use crate::http::body::Body;
use crate::http::error::RouterError;
use crate::http::forward::Forwarder;
use crate::http::headers;
use crate::metrics;
use crate::routing::classify::{self, Route};
use crate::shard::ShardKey;
use request::{Ctx, Label, Notes, Outcome, Seen};

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
    /// The connection's slot for an upstream connection of its own to the local Loom (HTTP/1
    /// connections: `http::affine`); `None` sends everything through the shared pool.
    pub affine: Option<Affine>,
}

impl ConnInfo {
    pub fn new(remote: SocketAddr, https: bool, peer_verified: bool) -> Self {
        Self {
            remote,
            https,
            peer_verified,
            forwarded_for: headers::ip_value(remote.ip()),
            affine: None,
        }
    }
}

/// Shared state of the request path. One per router; cheap to clone.
#[derive(Debug, Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
    /// Each request worker has its own pool ([`Proxy::for_worker`]).
    forwarder: Forwarder,
}

#[derive(Debug)]
struct Inner {
    control: Control,
    /// Written by the health probes; read here to fail fast on a dead owner.
    health: Arc<HealthBoard>,
    /// `max_concurrent_requests` permits; a request that finds none gets 503 `overloaded`.
    limiter: Semaphore,
    /// The limit the semaphore was sized for, so a reload can grow or shrink it.
    limit: std::sync::atomic::AtomicUsize,
    /// Set once on SIGTERM; `/readyz` answers 503 from then on.
    draining: AtomicBool,
    /// The self-fencing gate, with the memory and etcd backends; `None` with `static`, where
    /// ownership changes only by hand and no lease exists.
    gate: Option<Arc<Gate>>,
    /// Owned writes at the local Loom right now, by shard. Incremented and decremented by the
    /// requests themselves (many at once, hence a concurrent map); read by `/loom-router/drained`.
    in_flight_writes: DashMap<ShardKey, usize>,
    /// Clusters this router forwarded a write for lately: their reads go to the owner.
    tracked: crate::routing::fresh::Tracked,
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

impl Proxy {
    pub fn new(
        control: Control,
        health: Arc<HealthBoard>,
        forwarder: Forwarder,
        gate: Option<Arc<Gate>>,
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
                limiter: Semaphore::new(limit),
                limit: std::sync::atomic::AtomicUsize::new(limit),
                draining: AtomicBool::new(false),
                gate,
                in_flight_writes: DashMap::new(),
                tracked: Default::default(),
                metrics: metrics::RequestMetrics::new(Label::COUNT),
                peers_need_certificates,
            }),
            forwarder,
        }
    }

    /// This proxy for one request worker: the same state, with an upstream pool of its own.
    #[must_use]
    pub fn for_worker(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            forwarder: self.forwarder.for_worker(),
        }
    }

    /// Follow the configs a reload publishes (`coord::control` is their only writer): resize
    /// the concurrency limit to each one's `max_concurrent_requests`, until `stop` fires.
    pub fn follow_reloads(&self, stop: CancellationToken) {
        let (proxy, mut configs) = (self.clone(), self.inner.control.configs());
        tokio::spawn(stop.run_until_cancelled_owned(async move {
            while configs.changed().await.is_ok() {
                let limit = configs.borrow_and_update().limits.max_concurrent_requests;
                proxy.set_concurrency_limit(limit);
            }
        }));
    }

    /// Every second until `stop` fires: sweep expired clusters from the map, and publish how
    /// many remain and whether this router is ready (`loom_router_ready`, for alerting); and
    /// record in the events when the lease starts or stops letting this router admit writes.
    pub fn publish_every_second(&self, stop: CancellationToken) {
        let proxy = self.clone();
        tokio::spawn(stop.run_until_cancelled_owned(async move {
            // The lease is looked at ten times a second, so that a fence of a few hundred
            // milliseconds still shows in the events; the rest once a second.
            let mut every = tokio::time::interval(std::time::Duration::from_millis(100));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // With a store: whether the lease let this router admit writes at the last look.
            let mut admitting = None;
            for tick in 0u64.. {
                every.tick().await;
                admitting = proxy.record_fence_changes(admitting);
                if tick % 10 == 0 {
                    metrics::set_tracked_clusters(
                        proxy.inner.tracked.sweep(crate::coord::failover::unix_ms()),
                    );
                    metrics::set_ready(proxy.is_ready());
                }
            }
        }));
    }

    /// An event when the lease stops or starts letting this router admit writes: the fences
    /// an operator looks for that no table shows. `None` without a store, and before the first
    /// table from it.
    fn record_fence_changes(&self, before: Option<bool>) -> Option<bool> {
        self.inner.gate.as_ref()?;
        let snap = self.inner.control.snapshot();
        if !snap.from_store {
            return before;
        }
        let now = self.may_admit(&snap);
        let log = self.inner.control.event_log();
        match (before, now) {
            (Some(true), false) => log.record(
                crate::events::Kind::Fence,
                "writes fenced here: the lease is not certain to outlast write_timeout",
            ),
            (Some(false), true) => log.record(
                crate::events::Kind::Fence,
                "writes admitted here again: the lease is renewed",
            ),
            _ => {}
        }
        Some(now)
    }

    /// Resize the concurrency limit. Shrinking takes effect as requests finish.
    fn set_concurrency_limit(&self, limit: usize) {
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

    /// May this router admit a write for a shard it owns, right now (docs/failover.md)?
    /// Always under `static`. Otherwise only from a table read from the store, and only while
    /// the lease is certain to outlast `write_timeout`.
    fn may_admit(&self, snap: &Snapshot) -> bool {
        match &self.inner.gate {
            None => true,
            Some(gate) => {
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

    /// Whether SIGTERM has started the drain.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// The requests answered so far, by route, status class and latency (the status page).
    pub fn request_totals(&self) -> Vec<metrics::RouteTotals> {
        self.inner.metrics.totals()
    }

    /// Turn `/readyz` to 503: the load balancer stops sending new traffic.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Ready: a table is published (always, after start), the local Loom answers its health
    /// path, and the router is not draining.
    pub fn is_ready(&self) -> bool {
        let snap = self.inner.control.snapshot();
        let has_table = snap.from_store || self.inner.gate.is_none();
        has_table
            && !self.inner.draining.load(Ordering::SeqCst)
            && self.inner.health.get(&snap.config.local_dc().name) == Status::Up
    }

    /// Handle one request from a client or a peer router.
    pub async fn handle(&self, mut request: Request<Incoming>, conn: &ConnInfo) -> Response<Body> {
        let start = Instant::now();
        let snap = self.inner.control.snapshot();
        let method = request.method().clone();
        let version = request.version();
        // The URI's parts are shared bytes: cloning it copies no path.
        let uri = request.uri().clone();
        let request_id = headers::ensure_request_id(request.headers_mut());
        let notes = Notes::default();
        let outcome = {
            // Decremented on drop too: hyper drops this future when the client goes away.
            let _inflight = self.inner.metrics.inflight();
            let ctx = Ctx {
                snap: &snap,
                conn,
                notes: &notes,
            };
            self.route(ctx, request).await
        };
        let seen = Seen {
            method: &method,
            version,
            path: uri.path(),
            request_id: &request_id,
            cluster: notes.cluster(),
            start,
        };
        let mut response = self.finish(&snap, &seen, outcome);
        headers::propagate_request_id(response.headers_mut(), request_id);
        response
    }

    /// Steps 3 to 5 of the life of a request (see `lib.rs`).
    async fn route(&self, ctx: Ctx<'_>, mut request: Request<Incoming>) -> Outcome {
        let snap = ctx.snap;
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
            if self.inner.peers_need_certificates && !ctx.conn.peer_verified {
                return Outcome::error(label, RouterError::PeerUnauthenticated);
            }
            // Boxed: a hop is off the read path (see `client.rs`).
            return Box::pin(self.receive_forwarded(ctx, class, request)).await;
        }
        self.route_from_client(ctx, class, request).await
    }
}
