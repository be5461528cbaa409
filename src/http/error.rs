//! Router errors, and the one place they become HTTP responses (docs/routing.md).
//!
//! Every error the router produces itself is a [`RouterError`]. [`RouterError::status`] and
//! [`RouterError::code`] are exhaustive matches with no wildcard, so a new variant cannot ship
//! without a status and a code. The body is one plain-text sentence telling the user what
//! happened and what to do; details such as socket errors go to the log, not to the client.
//!
//! This file must not log or record metrics: `proxy/edge.rs` does both once, at the edge.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::http::body::Body;
use crate::http::headers::{ROUTER_ERROR, TEXT_PLAIN};
use crate::routing::classify::ClassifyError;
use crate::shard::ShardKey;

/// Which upstream a transport error is about, for codes and the `kind` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    Connect,
    Timeout,
    Reset,
    Tls,
    /// The client's own request body failed while it was being sent on: not the upstream's
    /// fault, and not counted against it.
    ClientBody,
    /// The client stopped sending its request body: also the client's fault. Either the body's
    /// stall timer (`body_read_timeout`) or the send's deadline ran out while the router was
    /// waiting for the client's bytes; this is how long.
    ClientStalled(Duration),
}

impl UpstreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Tls => "tls",
            Self::ClientBody => "client_body",
            Self::ClientStalled(_) => "client_stalled",
        }
    }

    /// Whether the client, not the upstream, broke the exchange.
    pub fn is_client(self) -> bool {
        match self {
            Self::ClientBody | Self::ClientStalled(_) => true,
            Self::Connect | Self::Timeout | Self::Reset | Self::Tls => false,
        }
    }
}

/// A transport failure talking to an upstream (the local Loom or a peer router).
#[derive(Debug, thiserror::Error)]
#[error("{} error", kind.as_str())]
pub struct SendError {
    pub kind: UpstreamKind,
    #[source]
    pub source: Option<BoxError>,
}

/// The body of a 421 `misdirected`: the receiver's view of the shard. Written by the receiver
/// and read by the origin, through this one type.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MisdirectedView {
    pub shard: ShardKey,
    /// `None` when no DC owns the shard in the receiver's view.
    pub owner: Option<String>,
    pub epoch: u64,
}

/// An error the router answers itself.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("the request could not be parsed as HTTP")]
    BadRequest,
    #[error("bad cluster ID")]
    BadClusterId,
    #[error("bad path")]
    BadPath,
    #[error("no valid Host: none, several, or not host[:port]")]
    BadHost,
    #[error("a hop request that names no shard")]
    HopWithoutShard,
    #[error("X-Loom-Consistency with a value other than \"owner\"")]
    BadConsistency,
    #[error("a node body that is not strict JSON but may name a clusterId")]
    AmbiguousNodeBody,
    #[error("the client stalled its request body for {0:?}")]
    ClientTimeout(Duration),
    #[error("hop headers without a verified peer certificate")]
    PeerUnauthenticated,
    #[error("shard {0} is unassigned")]
    UnassignedShard(ShardKey),
    #[error("body over {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("misdirected: shard {shard} is owned by {owner:?} at epoch {epoch}")]
    Misdirected {
        shard: ShardKey,
        /// `None` when no DC owns the shard in the receiver's view.
        owner: Option<String>,
        epoch: u64,
    },
    #[error("request headers over {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("local Loom unreachable ({kind:?})")]
    UpstreamUnreachable {
        kind: UpstreamKind,
        #[source]
        source: Option<BoxError>,
    },
    #[error("peer router {dc} unreachable ({kind:?})")]
    PeerUnreachable {
        dc: String,
        kind: UpstreamKind,
        #[source]
        source: Option<BoxError>,
    },
    #[error("owning datacenter {dc} is down")]
    OwnerUnavailable { dc: String, retry_after: Duration },
    #[error("writes for shard {0} are fenced here")]
    Fenced(ShardKey),
    #[error("routers disagree about the owner of shard {0}")]
    OwnershipConflict(ShardKey),
    #[error("{limit} requests already in flight")]
    Overloaded { limit: usize },
    #[error("no response from the local Loom within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("no response from peer router {dc} within {after:?}")]
    PeerTimeout { dc: String, after: Duration },
    #[error("the request already passed through this router")]
    LoopDetected,
}

pub use crate::http::body::BoxError;

impl From<ClassifyError> for RouterError {
    fn from(e: ClassifyError) -> Self {
        match e {
            ClassifyError::BadPath => Self::BadPath,
            ClassifyError::BadClusterId => Self::BadClusterId,
            ClassifyError::AmbiguousNodeBody => Self::AmbiguousNodeBody,
        }
    }
}

impl RouterError {
    /// A failed send to the local Loom, bounded by `timeout`.
    pub fn from_local(e: SendError, timeout: Duration) -> Self {
        match e.kind {
            UpstreamKind::Timeout => Self::UpstreamTimeout(timeout),
            UpstreamKind::ClientBody => Self::BadRequest,
            UpstreamKind::ClientStalled(after) => Self::ClientTimeout(after),
            UpstreamKind::Connect | UpstreamKind::Reset | UpstreamKind::Tls => {
                Self::UpstreamUnreachable {
                    kind: e.kind,
                    source: e.source,
                }
            }
        }
    }

    /// A failed send to the router of DC `dc`, bounded by `timeout`.
    pub fn from_peer(e: SendError, dc: String, timeout: Duration) -> Self {
        match e.kind {
            UpstreamKind::Timeout => Self::PeerTimeout { dc, after: timeout },
            UpstreamKind::ClientBody => Self::BadRequest,
            UpstreamKind::ClientStalled(after) => Self::ClientTimeout(after),
            UpstreamKind::Connect | UpstreamKind::Reset | UpstreamKind::Tls => {
                Self::PeerUnreachable {
                    dc,
                    kind: e.kind,
                    source: e.source,
                }
            }
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest
            | Self::BadClusterId
            | Self::BadPath
            | Self::BadHost
            | Self::HopWithoutShard
            | Self::BadConsistency
            | Self::AmbiguousNodeBody => StatusCode::BAD_REQUEST,
            Self::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::PeerUnauthenticated => StatusCode::FORBIDDEN,
            Self::UnassignedShard(_) => StatusCode::NOT_FOUND,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UpstreamUnreachable { .. } | Self::PeerUnreachable { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::OwnerUnavailable { .. }
            | Self::Fenced(_)
            | Self::OwnershipConflict(_)
            | Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout(_) | Self::PeerTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::LoopDetected => StatusCode::LOOP_DETECTED,
        }
    }

    /// The `X-Loom-Router-Error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest
            | Self::BadHost
            | Self::HopWithoutShard
            | Self::BadConsistency
            | Self::AmbiguousNodeBody => "bad_request",
            Self::ClientTimeout(_) => "client_timeout",
            Self::BadClusterId => "bad_cluster_id",
            Self::BadPath => "bad_path",
            Self::PeerUnauthenticated => "peer_unauthenticated",
            Self::UnassignedShard(_) => "unassigned_shard",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::Misdirected { .. } => "misdirected",
            Self::HeadersTooLarge { .. } => "headers_too_large",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::PeerUnreachable { .. } => "peer_unreachable",
            Self::OwnerUnavailable { .. } => "owner_unavailable",
            Self::Fenced(_) => "fenced",
            Self::OwnershipConflict(_) => "ownership_conflict",
            Self::Overloaded { .. } => "overloaded",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::PeerTimeout { .. } => "peer_timeout",
            Self::LoopDetected => "loop_detected",
        }
    }

    /// One sentence for the client: what happened and what to do.
    fn sentence(&self) -> String {
        match self {
            Self::BadRequest => {
                "The request could not be parsed as HTTP; check the request line and headers."
                    .to_owned()
            }
            Self::BadClusterId => "The cluster ID in the path is not a Loom cluster ID (1 to 19 \
                 decimal digits, at most 9223372036854775807); check the URL."
                .to_owned(),
            Self::BadPath => "The path is not in normal form (it has a dot-segment, an empty \
                 segment, or an encoded '/' or '\\'); send the plain path of the resource."
                .to_owned(),
            Self::BadHost => "The request needs exactly one Host header of the form host[:port]; \
                 check the Host header."
                .to_owned(),
            Self::HopWithoutShard => "A request between routers must name a shard, and this \
                 one names none; send it without X-Loom-Router-* headers."
                .to_owned(),
            Self::BadConsistency => "X-Loom-Consistency takes one value, owner, which reads a \
                 cluster from the datacenter that owns it; send that or leave the header out."
                .to_owned(),
            Self::AmbiguousNodeBody => "The node body is not plain JSON, so the router cannot \
                 tell which cluster it belongs to; send it as strict JSON."
                .to_owned(),
            Self::ClientTimeout(after) => format!(
                "The request body stopped arriving for {}; nothing was applied, so send the \
                 request again with its whole body.",
                humantime::format_duration(*after)
            ),
            Self::PeerUnauthenticated => "Router hop headers are only accepted from peer routers \
                 with a verified client certificate; remove X-Loom-Router-* headers."
                .to_owned(),
            Self::UnassignedShard(shard) => format!(
                "No datacenter owns shard {shard}, so no configured datacenter can have created \
                 this cluster; check the cluster ID."
            ),
            Self::BodyTooLarge { limit } => format!(
                "The request body is larger than the {limit} bytes this router reads; send a \
                 smaller body."
            ),
            Self::Misdirected { .. } => {
                "This router does not own the shard; retry at its owner.".to_owned()
            }
            Self::HeadersTooLarge { limit } => format!(
                "The request line and headers are larger than {limit} bytes; send fewer or \
                 smaller headers."
            ),
            Self::UpstreamUnreachable { .. } => "The local Loom server could not be reached; \
                 retry later or use another datacenter."
                .to_owned(),
            Self::PeerUnreachable { dc, .. } => format!(
                "The router of datacenter {dc}, which owns this cluster, could not be reached; \
                 retry later."
            ),
            Self::OwnerUnavailable { dc, .. } => format!(
                "Datacenter {dc}, which owns this cluster, is down and its shards have not failed \
                 over yet; retry after the Retry-After delay."
            ),
            Self::Fenced(shard) => format!(
                "Writes for shard {shard} are paused here while its ownership is confirmed or \
                 moved; retry shortly."
            ),
            Self::OwnershipConflict(shard) => {
                format!("The routers disagree about who owns shard {shard}; retry shortly.")
            }
            Self::Overloaded { .. } => {
                "This router is handling too many requests; retry after the Retry-After delay."
                    .to_owned()
            }
            Self::UpstreamTimeout(after) => format!(
                "The local Loom server did not answer within {}; retry later.",
                humantime::format_duration(*after)
            ),
            Self::PeerTimeout { dc, after } => format!(
                "The router of datacenter {dc} did not answer within {}; the write may or may \
                 not have been applied, so check before retrying.",
                humantime::format_duration(*after)
            ),
            Self::LoopDetected => "The request has already passed through this router; check \
                 the routers' peer addresses."
                .to_owned(),
        }
    }

    /// `Retry-After`, in whole seconds, at least 1.
    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::OwnerUnavailable { retry_after, .. } => {
                Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
            }
            Self::Overloaded { .. } | Self::Fenced(_) | Self::OwnershipConflict(_) => Some(1),
            Self::BadRequest
            | Self::BadClusterId
            | Self::BadPath
            | Self::BadHost
            | Self::HopWithoutShard
            | Self::BadConsistency
            | Self::AmbiguousNodeBody
            | Self::ClientTimeout(_)
            | Self::PeerUnauthenticated
            | Self::UnassignedShard(_)
            | Self::BodyTooLarge { .. }
            | Self::Misdirected { .. }
            | Self::HeadersTooLarge { .. }
            | Self::UpstreamUnreachable { .. }
            | Self::PeerUnreachable { .. }
            | Self::UpstreamTimeout(_)
            | Self::PeerTimeout { .. }
            | Self::LoopDetected => None,
        }
    }

    /// The upstream that failed and how, for `upstream_errors_total`: the peer DC's name, or
    /// `None` for this DC's Loom, and the failure's kind. Only a failed exchange with an
    /// upstream counts; the client's faults and the router's own answers do not.
    pub fn upstream_failure(&self) -> Option<(Option<&str>, &'static str)> {
        match self {
            Self::UpstreamTimeout(_) => Some((None, UpstreamKind::Timeout.as_str())),
            Self::UpstreamUnreachable { kind, .. } => Some((None, kind.as_str())),
            Self::PeerTimeout { dc, .. } => Some((Some(dc), UpstreamKind::Timeout.as_str())),
            Self::PeerUnreachable { dc, kind, .. } => Some((Some(dc), kind.as_str())),
            _ => None,
        }
    }

    /// Whether the client's request is at fault (counted in `client_errors_total`, never as an
    /// upstream error). A 421 is one router's answer to another, not a client's fault.
    pub fn is_client_fault(&self) -> bool {
        match self {
            Self::BadRequest
            | Self::BadClusterId
            | Self::BadPath
            | Self::BadHost
            | Self::HopWithoutShard
            | Self::BadConsistency
            | Self::AmbiguousNodeBody
            | Self::ClientTimeout(_)
            | Self::PeerUnauthenticated
            | Self::UnassignedShard(_)
            | Self::BodyTooLarge { .. }
            | Self::HeadersTooLarge { .. } => true,
            Self::Misdirected { .. }
            | Self::UpstreamUnreachable { .. }
            | Self::PeerUnreachable { .. }
            | Self::OwnerUnavailable { .. }
            | Self::Fenced(_)
            | Self::OwnershipConflict(_)
            | Self::Overloaded { .. }
            | Self::UpstreamTimeout(_)
            | Self::PeerTimeout { .. }
            | Self::LoopDetected => false,
        }
    }

    /// The response for this error. Route headers are added by the caller, which knows the
    /// route.
    pub fn to_response(&self) -> Response<Body> {
        let (content_type, body) = match self {
            // The one JSON error: only routers read it (docs/routing.md).
            Self::Misdirected {
                shard,
                owner,
                epoch,
            } => {
                let view = MisdirectedView {
                    shard: *shard,
                    owner: owner.clone(),
                    epoch: *epoch,
                };
                let json = serde_json::to_vec(&view).unwrap_or_default();
                (
                    HeaderValue::from_static("application/json"),
                    Bytes::from(json),
                )
            }
            _ => (
                HeaderValue::from_static(TEXT_PLAIN),
                Bytes::from(self.sentence() + "\n"),
            ),
        };
        let mut response = Response::new(Body::full(body));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, content_type);
        headers.insert(ROUTER_ERROR, HeaderValue::from_static(self.code()));
        if let Some(secs) = self.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }

    /// The bytes of a complete HTTP/1.1 response for errors found before hyper hands the request
    /// to the router (unparseable heads, oversized heads). The connection is closed after it.
    pub fn raw_http1(&self, via: &str, route_headers: bool) -> Vec<u8> {
        let body = self.sentence() + "\n";
        let status = self.status();
        let route = if route_headers {
            "x-loom-route: unrouted\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {TEXT_PLAIN}\r\nx-loom-router-error: {}\r\n\
             {route}via: {via}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.code(),
            body.len(),
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn errors_are_plain_text_with_their_code() {
        let r = RouterError::BadClusterId.to_response();
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()[ROUTER_ERROR], "bad_cluster_id");
        assert_eq!(r.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert!(body.ends_with(b".\n"), "{body:?}");
    }

    #[tokio::test]
    async fn misdirected_is_json_with_the_receivers_view() {
        let r = RouterError::Misdirected {
            shard: ShardKey::Residue(2),
            owner: Some("us-west".to_owned()),
            epoch: 7,
        }
        .to_response();
        assert_eq!(r.status(), 421);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], br#"{"shard":2,"owner":"us-west","epoch":7}"#);
        let view: MisdirectedView = serde_json::from_slice(&body).unwrap();
        assert_eq!(view.owner.as_deref(), Some("us-west"));
    }

    #[test]
    fn every_client_fault_has_a_metric_series_from_the_start() {
        let faults = [
            RouterError::BadRequest,
            RouterError::BadClusterId,
            RouterError::BadPath,
            RouterError::BadHost,
            RouterError::HopWithoutShard,
            RouterError::BadConsistency,
            RouterError::AmbiguousNodeBody,
            RouterError::ClientTimeout(Duration::from_secs(1)),
            RouterError::PeerUnauthenticated,
            RouterError::UnassignedShard(ShardKey::Global),
            RouterError::BodyTooLarge { limit: 1 },
            RouterError::HeadersTooLarge { limit: 1 },
        ];
        for fault in faults {
            assert!(fault.is_client_fault(), "{fault:?}");
            assert!(
                crate::metrics::CLIENT_ERROR_KINDS.contains(&fault.code()),
                "{}",
                fault.code()
            );
        }
        assert!(!RouterError::LoopDetected.is_client_fault());
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        let r = RouterError::OwnerUnavailable {
            dc: "x".to_owned(),
            retry_after: Duration::from_millis(200),
        }
        .to_response();
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        let r = RouterError::OwnerUnavailable {
            dc: "x".to_owned(),
            retry_after: Duration::from_millis(2500),
        }
        .to_response();
        assert_eq!(r.headers()[RETRY_AFTER], "3");
    }

    #[test]
    fn raw_responses_are_complete_http() {
        let raw = String::from_utf8(RouterError::BadRequest.raw_http1("1.1 loom-router-a", true))
            .unwrap();
        assert!(raw.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(raw.contains("x-loom-router-error: bad_request\r\n"));
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}
