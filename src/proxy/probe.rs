//! The router-to-router probes on the data listeners (docs/operations.md): `/loom-router/readyz`,
//! which peers' health checks call, and `/loom-router/drained`, which a planned switchover polls
//! on the old owner's routers.
//!
//! Their answers are plain text, and are not logged, counted or labelled ([`Label::Probe`]), so
//! that probes every `[health] interval` do not drown the access log and the request metrics.

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Response, StatusCode};

use super::request::{Label, Outcome};
use super::Proxy;
use crate::coord::control::Snapshot;
use crate::http::body::Body;
use crate::http::headers;

impl Proxy {
    /// `GET /loom-router/drained?shard=S&epoch=E`: 200 once this router serves a table at epoch E
    /// or newer for the shard (it has seen the fence) and no write it admitted for the shard is
    /// still at its Loom; 503 until then. A planned switchover polls it on the old owner's
    /// routers instead of waiting out `write_timeout`.
    pub(super) fn drained(&self, snap: &Snapshot, method: &Method, query: Option<&str>) -> Outcome {
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
    pub(super) fn readyz(&self, method: &Method) -> Outcome {
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
        retries: 0,
        owner_failed: None,
    }
}
