//! The admin listener: health, readiness, metrics and the shard table (spec section 8).
//!
//! It runs on its own port, never behind the proxy's routing, so an operator can still see the
//! router when the data path is overloaded. It only reads state; it must not route requests.

use std::convert::Infallible;
use std::time::Duration;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::Body;
use crate::config::ShardKey;
use crate::headers::TEXT_PLAIN;
use crate::health::Status;
use crate::proxy::Proxy;

/// Serve the admin endpoints until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    proxy: Proxy,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) {
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
        let proxy = proxy.clone();
        let metrics = metrics.clone();
        let service = service_fn(move |request| {
            let response = handle(&proxy, &metrics, &request);
            async move { Ok::<_, Infallible>(response) }
        });
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

fn handle(
    proxy: &Proxy,
    metrics: &PrometheusHandle,
    request: &Request<Incoming>,
) -> Response<Body> {
    let get = request.method() == Method::GET || request.method() == Method::HEAD;
    match (get, request.uri().path()) {
        (true, "/healthz") => text(StatusCode::OK, "ok\n"),
        (true, "/readyz") => {
            if proxy.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (true, "/metrics") => {
            let mut response = Response::new(Body::full(metrics.render()));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (true, "/admin/table") => {
            let mut response = Response::new(Body::full(table_json(proxy).to_string()));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        (false, "/healthz" | "/readyz" | "/metrics" | "/admin/table") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
        }
        _ => text(StatusCode::NOT_FOUND, "no such admin endpoint\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
    response
}

/// `/admin/table`: the table as this router serves it, with DC health.
pub fn table_json(proxy: &Proxy) -> Value {
    let snap = proxy.control().snapshot();
    let config = &snap.config;
    let name = |dc: usize| config.datacenters[dc].name.as_str();
    let shards: Vec<Value> = snap
        .table
        .shards()
        .map(|s| {
            json!({
                "shard": match s.key {
                    ShardKey::Residue(r) => json!(r),
                    ShardKey::Global => json!("global"),
                },
                "home": s.home.map(name),
                "owner": name(s.owner),
                "replicas": s.replicas.iter().map(|&r| name(r)).collect::<Vec<_>>(),
                "epoch": s.epoch,
                "state": s.state.as_str(),
                "frozen": s.frozen,
                "changed_at": humantime::format_rfc3339_seconds(s.changed_at).to_string(),
                "changed_by": s.changed_by,
                "reason": s.reason,
            })
        })
        .collect();
    let datacenters: Vec<Value> = config
        .datacenters
        .iter()
        .enumerate()
        .map(|(dc, d)| json!({"name": d.name, "healthy": proxy.health().get(dc) == Status::Up}))
        .collect();
    json!({
        "datacenter": config.local_dc().name,
        "table_epoch": snap.table.table_epoch,
        "increment": config.increment,
        "shards": shards,
        "datacenters": datacenters,
        "alerts": Vec::<String>::new(),
    })
}
