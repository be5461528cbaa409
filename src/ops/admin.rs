//! The admin listener: health, readiness, metrics, the shard table and operator controls
//! (`docs/operations.md`).
//!
//! It runs on its own port, never behind the proxy's routing, so an operator can still see the
//! router when the data path is overloaded. Reads (`/healthz`, `/readyz`, `/metrics`,
//! `/admin/table`) are open; calls that change state (move, freeze, unfreeze) need
//! `Authorization: Bearer <token>` when `[admin] token` is set, and act through the coordination
//! store (`coord/failover.rs`), never on this router's table directly.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::coord::control::{Control, Snapshot};
use crate::coord::failover::{self, OperatorError};
use crate::coord::join::Handle;
use crate::coord::lease::Gate;
use crate::health::{HealthBoard, Status};
use crate::http::body::Body;
use crate::http::forward::Forwarder;
use crate::http::headers::TEXT_PLAIN;
use crate::proxy::Proxy;
use crate::shard::ShardKey;

/// Largest admin request body read (a move's `{"to": ...}`).
const MAX_ADMIN_BODY: usize = 4096;

/// What the admin listener reads and acts through, handed over by `app.rs`: this file names
/// what it uses instead of reaching into the data path for it.
#[derive(Clone)]
pub struct AdminState {
    /// The data path, for `/readyz` (it is ready as the peers' probe sees it) and the tracked
    /// clusters of `/admin/table`.
    pub proxy: Proxy,
    pub control: Control,
    pub health: Arc<HealthBoard>,
    /// For a planned move's drain calls to the old owner's routers.
    pub forwarder: Forwarder,
    /// The write gate and store access, with the memory and etcd backends.
    pub coordination: Option<(Arc<Gate>, Handle)>,
    pub metrics: PrometheusHandle,
    /// When the router started, for its uptime.
    pub started: std::time::Instant,
    /// The last minute of request totals, sampled every second while the listener runs.
    pub traffic: Arc<super::traffic::Traffic>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("coordination", &self.coordination.is_some())
            .finish_non_exhaustive()
    }
}

impl AdminState {
    fn gate(&self) -> Option<&Gate> {
        self.coordination.as_ref().map(|(gate, _)| gate.as_ref())
    }

    fn store(&self) -> Option<&Handle> {
        self.coordination.as_ref().map(|(_, handle)| handle)
    }
}

/// Serve the admin endpoints until `shutdown` fires.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    sample_traffic(&state, shutdown.clone());
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let state = state.clone();
        // Operator calls carry an `X-Request-Id` too (generated when absent, returned on the
        // answer), so that a move or a reload can be found in the logs. Off the request path,
        // tower-http's layers cost nothing that matters.
        let service = tower::ServiceBuilder::new()
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
            .layer(PropagateRequestIdLayer::x_request_id())
            .service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, request).await) }
            });
        let service = TowerToHyperService::new(service);
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = watched.await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

/// Sample the request totals every second for `/admin/status`, until `stop` fires.
fn sample_traffic(state: &AdminState, stop: CancellationToken) {
    let (proxy, traffic) = (state.proxy.clone(), state.traffic.clone());
    tokio::spawn(stop.run_until_cancelled_owned(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            traffic.record(std::time::Instant::now(), proxy.request_totals());
        }
    }));
}

/// The status page: one self-contained HTML file, no external scripts, fonts or styles.
const STATUS_PAGE: &str = include_str!("status.html");

async fn handle(state: &AdminState, request: Request<Incoming>) -> Response<Body> {
    let get = request.method() == Method::GET || request.method() == Method::HEAD;
    let post = request.method() == Method::POST;
    let path = request.uri().path().to_owned();
    match (get, post, path.as_str()) {
        (true, _, "/healthz") => text(StatusCode::OK, "ok\n"),
        (true, _, "/readyz") => {
            if state.proxy.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (true, _, "/metrics") => {
            if let Some(gate) = state.gate() {
                crate::metrics::set_lease_remaining(gate.remaining(tokio::time::Instant::now()));
            }
            let mut response = Response::new(Body::full(state.metrics.render()));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (true, _, "/admin/table") => {
            let snap = state.control.snapshot();
            json_response(StatusCode::OK, &table_view(state, &snap))
        }
        (true, _, "/") => {
            let mut response = Response::new(Body::full(STATUS_PAGE));
            let h = response.headers_mut();
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            // Nothing from elsewhere, ever: the page must work in an air-gapped DC.
            h.insert(
                "content-security-policy",
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                     connect-src 'self'",
                ),
            );
            response
        }
        (true, _, "/admin/status") => {
            let snap = state.control.snapshot();
            json_response(StatusCode::OK, &status_view(state, &snap))
        }
        // Read-only and free of secrets: no token, like /admin/table.
        (true, _, "/admin/events") => json_response(
            StatusCode::OK,
            &serde_json::json!({ "events": state.control.event_log().recent() }),
        ),
        (false, true, "/admin/reload") => {
            if let Some(denied) = authorize(state, &request) {
                return denied;
            }
            match state.control.reload().await {
                Ok(summary) => text_owned(StatusCode::OK, format!("reloaded: {summary}\n")),
                Err(e) => {
                    let mut response =
                        text_owned(StatusCode::BAD_REQUEST, format!("reload refused: {e}\n"));
                    response.headers_mut().insert(
                        crate::http::headers::ROUTER_ERROR,
                        HeaderValue::from_static("bad_config"),
                    );
                    response
                }
            }
        }
        (false, true, p) if p.starts_with("/admin/shards/") => {
            if let Some(denied) = authorize(state, &request) {
                return denied;
            }
            shard_control(state, request).await
        }
        (
            false,
            _,
            "/" | "/healthz" | "/readyz" | "/metrics" | "/admin/table" | "/admin/events"
            | "/admin/status",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        (_, false, p) if p.starts_with("/admin/shards/") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n")
        }
        _ => text(StatusCode::NOT_FOUND, "no such admin endpoint\n"),
    }
}

/// `None` if the call may go ahead; otherwise the 401 to send.
fn authorize(state: &AdminState, request: &Request<Incoming>) -> Option<Response<Body>> {
    let snap = state.control.snapshot();
    let token = snap.config.admin_token.as_deref()?;
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time, so that response timing does not tell how much of a guess was right.
    let matches = presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(token.as_bytes())));
    if matches {
        None
    } else {
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            "This admin call changes state; send Authorization: Bearer <[admin] token>.\n",
        );
        response
            .headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        Some(response)
    }
}

/// `POST /admin/shards/{shard}/move|freeze|unfreeze`.
async fn shard_control(state: &AdminState, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let rest = path.trim_start_matches("/admin/shards/");
    let Some((shard, action)) = rest.split_once('/') else {
        return text(StatusCode::NOT_FOUND, "no such admin endpoint\n");
    };
    let Ok(shard) = shard.parse::<ShardKey>() else {
        return text(StatusCode::NOT_FOUND, "no such shard\n");
    };
    if !matches!(action, "move" | "freeze" | "unfreeze") {
        return text(StatusCode::NOT_FOUND, "no such admin endpoint\n");
    }
    let Some(coord) = state.store() else {
        return text(
            StatusCode::CONFLICT,
            "Ownership is static here: edit [[shards]] on every router and reload (fence first, \
             then move, each with a higher epoch).\n",
        );
    };
    let view = coord.views.borrow().clone();
    if !view.shards.contains_key(&shard) {
        return text(StatusCode::NOT_FOUND, "no such shard\n");
    }
    let by = format!("operator via {}", coord.router_id);
    match action {
        "move" => {
            let body = match read_json(request).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            let Some(to) = body.get("to").and_then(Value::as_str) else {
                return text(StatusCode::BAD_REQUEST, "send {\"to\": \"<datacenter>\"}\n");
            };
            let planned = failover::PlannedMove {
                shard,
                to,
                by: &by,
                write_timeout: state.control.snapshot().config.loom.write_timeout,
            };
            let forwarder = &state.forwarder;
            match failover::switchover(&coord.store, &coord.keys, forwarder, &view, planned).await {
                Ok(done) => json_response(StatusCode::OK, &Moved::from(done)),
                Err(e) => control_error(&e),
            }
        }
        frozen => {
            let change = failover::Freeze {
                shard,
                frozen: frozen == "freeze",
                by: &by,
            };
            match failover::set_frozen(&coord.store, &coord.keys, &view, change).await {
                Ok(epoch) => json_response(
                    StatusCode::OK,
                    &Frozen {
                        shard,
                        frozen: change.frozen,
                        epoch,
                    },
                ),
                Err(e) => control_error(&e),
            }
        }
    }
}

fn control_error(e: &OperatorError) -> Response<Body> {
    let status = match e {
        OperatorError::UnknownShard(_) => StatusCode::NOT_FOUND,
        OperatorError::NotAReplica(..)
        | OperatorError::NotAlive(_)
        | OperatorError::Conflict(_) => StatusCode::CONFLICT,
        OperatorError::Store(_) | OperatorError::NotDrained(..) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut response = Response::new(Body::full(format!("{e}\n")));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
    response
}

async fn read_json(request: Request<Incoming>) -> Result<Value, Response<Body>> {
    let limited = http_body_util::Limited::new(request.into_body(), MAX_ADMIN_BODY);
    let bytes: Bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return Err(text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n")),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        let mut r = Response::new(Body::full(format!("body is not JSON: {e}\n")));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
        r
    })
}

fn text_owned(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Body::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
    response
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_string(value).unwrap_or_default();
    let mut response = Response::new(Body::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The answer to `POST /admin/shards/{shard}/move`.
#[derive(Debug, Serialize)]
struct Moved {
    epoch: i64,
    from: String,
    shard: ShardKey,
    to: String,
    write_pause_ms: u64,
}

impl From<failover::Switchover> for Moved {
    fn from(done: failover::Switchover) -> Self {
        Self {
            shard: done.shard,
            from: done.from,
            to: done.to,
            epoch: done.epoch,
            write_pause_ms: done.write_pause.as_millis() as u64,
        }
    }
}

/// The answer to `POST /admin/shards/{shard}/freeze|unfreeze`.
#[derive(Debug, Serialize)]
struct Frozen {
    epoch: i64,
    frozen: bool,
    shard: ShardKey,
}

/// `/admin/table`: the table as this router serves it, with DC health and alerts
/// (docs/operations.md).
#[derive(Debug, Serialize)]
struct TableView<'a> {
    datacenter: &'a str,
    table_epoch: u64,
    increment: u64,
    shards: Vec<ShardView<'a>>,
    datacenters: Vec<DcView<'a>>,
    alerts: &'a [String],
    /// Clusters whose reads this router sends to their owner, after a write it forwarded.
    tracked_clusters: usize,
    /// With the memory and etcd backends only.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    coordination: Option<CoordinationView>,
}

/// One shard of `/admin/table`.
#[derive(Debug, Serialize)]
struct ShardView<'a> {
    shard: ShardKey,
    home: Option<&'a str>,
    owner: &'a str,
    replicas: Vec<&'a str>,
    epoch: u64,
    state: &'static str,
    frozen: bool,
    changed_at: String,
    changed_by: &'a str,
    reason: &'a str,
}

/// One DC of `/admin/table`, as this router's health checks see it.
#[derive(Debug, Serialize)]
struct DcView<'a> {
    name: &'a str,
    healthy: bool,
}

/// This router's place in the coordination store.
#[derive(Debug, Serialize)]
struct CoordinationView {
    lease: LeaseView,
    fingerprint: String,
    router_id: String,
    failover_manager: Option<String>,
}

/// This router's lease, and whether it may admit writes for the shards it owns right now.
#[derive(Debug, Serialize)]
struct LeaseView {
    registered: bool,
    remaining_ms: u64,
    admitting: bool,
}

fn table_view<'a>(state: &AdminState, snap: &'a Snapshot) -> TableView<'a> {
    let config = &snap.config;
    let name = |dc: usize| config.datacenters[dc].name.as_str();
    let shards = snap
        .table
        .shards()
        .map(|s| ShardView {
            shard: s.key,
            home: s.home.map(name),
            owner: name(s.owner),
            replicas: s.replicas.iter().map(|&r| name(r)).collect(),
            epoch: s.epoch,
            state: s.state.as_str(),
            frozen: s.frozen,
            changed_at: humantime::format_rfc3339_seconds(s.changed_at).to_string(),
            changed_by: &s.changed_by,
            reason: &s.reason,
        })
        .collect();
    let datacenters = config
        .datacenters
        .iter()
        .map(|d| DcView {
            name: &d.name,
            healthy: state.health.get(&d.name) == Status::Up,
        })
        .collect();
    TableView {
        datacenter: &config.local_dc().name,
        table_epoch: snap.table.table_epoch,
        increment: config.increment,
        shards,
        datacenters,
        alerts: &snap.alerts,
        tracked_clusters: state.proxy.tracked_clusters(),
        coordination: coordination_view(state, snap),
    }
}

/// `/admin/status`: this router at a glance, for the status page (docs/operations.md).
#[derive(Debug, Serialize)]
struct StatusView<'a> {
    datacenter: &'a str,
    router_id: Option<String>,
    version: &'static str,
    uptime_seconds: u64,
    table_epoch: u64,
    ready: bool,
    draining: bool,
    /// With a store: whether the lease lets this router admit writes now.
    admitting: Option<bool>,
    lease: Option<LeaseView>,
    failover_manager: Option<String>,
    tracked_clusters: usize,
    datacenters: Vec<DcStatus<'a>>,
    traffic: super::traffic::TrafficView,
}

/// One DC as this router's probes see it.
#[derive(Debug, Serialize)]
struct DcStatus<'a> {
    name: &'a str,
    status: &'static str,
    /// How long it has been in that status.
    for_seconds: Option<u64>,
    last_probe_ms: Option<f64>,
}

fn status_view<'a>(state: &AdminState, snap: &'a Snapshot) -> StatusView<'a> {
    let config = &snap.config;
    let coordination = coordination_view(state, snap);
    let datacenters = config
        .datacenters
        .iter()
        .map(|d| {
            let health = state.health.detail(&d.name);
            DcStatus {
                name: &d.name,
                status: health.map_or(Status::Unknown, |h| h.status).as_str(),
                for_seconds: health
                    .and_then(|h| h.since.elapsed().ok())
                    .map(|d| d.as_secs()),
                last_probe_ms: health
                    .and_then(|h| h.last_probe)
                    .map(|d| d.as_secs_f64() * 1000.0),
            }
        })
        .collect();
    let (router_id, admitting, lease, failover_manager) = match coordination {
        Some(c) => (
            Some(c.router_id),
            Some(c.lease.admitting),
            Some(c.lease),
            c.failover_manager,
        ),
        None => (None, None, None, None),
    };
    StatusView {
        datacenter: &config.local_dc().name,
        router_id,
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        table_epoch: snap.table.table_epoch,
        ready: state.proxy.is_ready(),
        draining: state.proxy.is_draining(),
        admitting,
        lease,
        failover_manager,
        tracked_clusters: state.proxy.tracked_clusters(),
        datacenters,
        traffic: state.traffic.view(),
    }
}

fn coordination_view(state: &AdminState, snap: &Snapshot) -> Option<CoordinationView> {
    let (gate, coord) = state.coordination.as_ref()?;
    let now = tokio::time::Instant::now();
    let write_timeout = snap.config.loom.write_timeout;
    let lease = LeaseView {
        registered: gate.registered_at().is_some(),
        remaining_ms: gate.remaining(now).as_millis() as u64,
        admitting: snap.from_store && gate.admits(now, write_timeout, snap.table.table_epoch),
    };
    let manager = coord
        .views
        .borrow()
        .manager
        .as_ref()
        .map(|(m, _)| m.clone());
    Some(CoordinationView {
        lease,
        fingerprint: coord.fingerprint.clone(),
        router_id: coord.router_id.clone(),
        failover_manager: manager,
    })
}
