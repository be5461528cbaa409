//! The edge of the request path: where an [`Outcome`] becomes the response the client gets, and
//! where each request is counted and logged, once (docs/operations.md, metrics).
//!
//! Every metric about a request is recorded here, from what the outcome says happened: the
//! request itself, a fenced write, an upstream that failed, a client at fault, 421 retries. The
//! steps before it only say what happened; they record nothing.

use http::header::{HeaderValue, CONNECTION, VIA};
use http::{Response, Version};

use super::request::{Label, Outcome, Seen};
use super::Proxy;
use crate::config::AccessLog;
use crate::coord::control::Snapshot;
use crate::http::body::Body;
use crate::http::error::RouterError;
use crate::http::headers;
use crate::metrics;
use crate::shard::DcId;

impl Proxy {
    /// The edge: turn errors into responses, add route headers, log and count, once.
    pub(super) fn finish(
        &self,
        snap: &Snapshot,
        seen: &Seen<'_>,
        outcome: Outcome,
    ) -> Response<Body> {
        let (mut response, error) = match outcome.result {
            Ok(response) => (response, None),
            Err(error) => (error.to_response(), Some(error)),
        };
        if outcome.label == Label::Probe {
            return response;
        }
        let served_by = outcome.served_by.filter(|_| error.is_none());
        route_headers(snap, &mut response, outcome.label, served_by);
        if let Some(error) = &error {
            error_headers(snap, seen, &mut response, error);
        }
        let elapsed = seen.start.elapsed();
        let status = response.status().as_u16();
        self.inner
            .metrics
            .request(outcome.label.metric(), status, elapsed);
        for _ in 0..outcome.retries {
            metrics::retry("misdirected");
        }
        if let Some(error) = &error {
            count_and_log(snap, seen, error);
        }
        if let Some(failed) = &outcome.owner_failed {
            // The client got a stale local read; the owner's failure is still an upstream error.
            count_and_log(snap, seen, failed);
        }
        if snap.config.access_log != AccessLog::Off {
            let config = &snap.config;
            tracing::info!(
                target: "loom_router::access",
                request_id = seen.request_id.to_str().ok(),
                method = %seen.method,
                path = seen.path,
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

/// `X-Loom-Route` and `X-Loom-Served-By` (for a response a Loom served), when `[response]
/// route_headers` is on; neither when it is off, even if an upstream sent them.
fn route_headers(
    snap: &Snapshot,
    response: &mut Response<Body>,
    label: Label,
    served_by: Option<DcId>,
) {
    let config = &snap.config;
    let h = response.headers_mut();
    if !config.route_headers {
        h.remove(headers::ROUTE);
        h.remove(headers::SERVED_BY);
        return;
    }
    h.insert(headers::ROUTE, HeaderValue::from_static(label.as_str()));
    match served_by {
        Some(dc) => {
            // A forwarded response already names the owner's DC; keep the owner's word.
            if dc == config.local || !h.contains_key(headers::SERVED_BY) {
                h.insert(headers::SERVED_BY, snap.dc_names[dc].clone());
            }
        }
        _ => {
            h.remove(headers::SERVED_BY);
        }
    }
}

/// What every answer the router writes itself carries: its `Via`, and `Connection: close` when
/// the rest of a stalled body may still arrive.
fn error_headers(
    snap: &Snapshot,
    seen: &Seen<'_>,
    response: &mut Response<Body>,
    error: &RouterError,
) {
    let h = response.headers_mut();
    h.append(VIA, snap.via.clone());
    if matches!(error, RouterError::ClientTimeout(_)) && seen.version != Version::HTTP_2 {
        // The connection cannot carry another request. (HTTP/2 has no `Connection`; its stream
        // is simply reset.)
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
}

/// The error's own counters, and a log line: a warning for what the router or an upstream
/// failed at, debug for a client's mistake.
fn count_and_log(snap: &Snapshot, seen: &Seen<'_>, error: &RouterError) {
    if matches!(error, RouterError::Fenced(_)) {
        metrics::fenced_write();
    }
    if matches!(error, RouterError::OwnershipConflict(_)) {
        metrics::ownership_conflict();
    }
    if let Some((dc, kind)) = error.upstream_failure() {
        let local = || snap.config.local_dc().name.as_str();
        metrics::upstream_error(dc.unwrap_or_else(local), kind);
    }
    if error.is_client_fault() {
        metrics::client_error(error.code());
    }
    let (method, path, code) = (seen.method, seen.path, error.code());
    if error.status().is_server_error() {
        let source = std::error::Error::source(error);
        tracing::warn!(%method, path, code, error = %error, source = ?source, "router error");
    } else {
        tracing::debug!(%method, path, code, error = %error, "client error");
    }
}
