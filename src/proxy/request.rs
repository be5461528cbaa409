//! What one request carries on its way through the proxy: its context ([`Ctx`]), where it is
//! going ([`ToLocal`], [`ToPeer`]), its route label, and what it came to ([`Outcome`]).
//!
//! Plain data with no behaviour beyond naming things, so that the steps of the request path
//! (`client.rs`, `local.rs`, `peer.rs`, `probe.rs`) take one context and one destination instead
//! of long lists of positional arguments, and the edge (`edge.rs`) finishes every request from
//! the same `Outcome`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{HeaderMap, Method, Response, Version};

use super::ConnInfo;
use crate::coord::control::Snapshot;
use crate::http::body::Body;
use crate::http::error::RouterError;
use crate::http::headers::Client;
use crate::metrics::RouteLabel;
use crate::routing::classify::Route;
use crate::shard::{DcId, ShardKey};

/// One request's context: the snapshot it is routed by, the connection it came on, and what the
/// access log learns on the way. Copied, not shared: a step that refreshes the table goes on
/// with a context that holds the new snapshot (`Ctx { snap: &fresh, ..ctx }`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Ctx<'a> {
    pub(super) snap: &'a Arc<Snapshot>,
    pub(super) conn: &'a ConnInfo,
    pub(super) notes: &'a Notes,
}

/// The route label of a request: the `X-Loom-Route` value and the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Label {
    Provisioner,
    Read,
    Create,
    CreateForwarded,
    WriteLocal,
    WriteForwarded,
    GlobalWrite,
    /// A read of one cluster served by its owner's Loom (docs/routing.md, reading your own
    /// writes).
    ReadOwner,
    Passthrough,
    Unrouted,
    /// A peer's readiness probe: answered here, not logged, counted or labelled, so probes
    /// every `[health] interval` do not drown the access log and the request metrics.
    Probe,
}

impl Label {
    /// How many labels there are: the request metrics keep cells for each.
    pub(super) const COUNT: usize = Self::Probe as usize + 1;

    /// The label as the request metrics know it.
    pub(super) fn metric(self) -> RouteLabel {
        RouteLabel {
            index: self as usize,
            name: self.as_str(),
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Provisioner => "provisioner",
            Self::Read => "read",
            Self::Create => "create",
            Self::CreateForwarded => "create-forwarded",
            Self::WriteLocal => "write-local",
            Self::WriteForwarded => "write-forwarded",
            Self::GlobalWrite => "global-write",
            Self::ReadOwner => "read-owner",
            Self::Passthrough => "passthrough",
            Self::Unrouted => "unrouted",
            Self::Probe => "probe",
        }
    }

    /// A write this DC's Loom applies for a shard this DC owns.
    pub(super) fn is_owned_write(self) -> bool {
        matches!(self, Self::WriteLocal | Self::Create | Self::GlobalWrite)
    }

    pub(super) fn local(route: Route) -> Self {
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

    pub(super) fn forwarded(route: Route) -> Self {
        match route {
            Route::Create => Self::CreateForwarded,
            Route::Write => Self::WriteForwarded,
            other => Self::local(other),
        }
    }
}

/// Whose `X-Loom-Router-*` headers a request may carry to this DC's Loom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trust {
    /// A client's request, or a hop nothing vouches for: its router headers are stripped and the
    /// router sends its own.
    Client,
    /// A peer's hop this router admitted: origin and shard are kept, the epoch is this router's.
    Peer,
}

/// A request on its way to this DC's Loom: how it is labelled, and for an owned write, the shard
/// and the epoch it was admitted under.
#[derive(Debug, Clone, Copy)]
pub(super) struct ToLocal {
    pub(super) label: Label,
    pub(super) shard: Option<ShardKey>,
    pub(super) epoch: Option<u64>,
    pub(super) trust: Trust,
}

impl ToLocal {
    /// A request that names no shard this router admits: reads, passthrough, provisioner calls.
    pub(super) fn unowned(label: Label) -> Self {
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
pub(super) struct ToPeer {
    pub(super) label: Label,
    pub(super) route: Route,
    pub(super) shard: ShardKey,
    pub(super) dc: DcId,
    pub(super) epoch: u64,
}

/// What the request path learns on the way that only the access log needs. Written at most
/// once per request (atomics only because the request future must be `Send`).
#[derive(Debug)]
pub(super) struct Notes {
    /// The cluster the request named (path, node body or node lookup); `u64::MAX` for none.
    cluster: AtomicU64,
}

impl Default for Notes {
    fn default() -> Self {
        Self {
            cluster: AtomicU64::new(u64::MAX),
        }
    }
}

impl Notes {
    pub(super) fn set_cluster(&self, id: u64) {
        self.cluster.store(id, Ordering::Relaxed);
    }

    pub(super) fn cluster(&self) -> Option<u64> {
        match self.cluster.load(Ordering::Relaxed) {
            u64::MAX => None,
            id => Some(id),
        }
    }
}

/// The request as it arrived, for the access log.
pub(super) struct Seen<'a> {
    pub(super) method: &'a Method,
    pub(super) version: Version,
    pub(super) path: &'a str,
    pub(super) request_id: &'a HeaderValue,
    pub(super) cluster: Option<u64>,
    pub(super) start: Instant,
}

/// What one request came to, for the edge to finish.
pub(super) struct Outcome {
    pub(super) label: Label,
    /// The DC whose Loom produced the response (none for router errors).
    pub(super) served_by: Option<DcId>,
    /// Shard and target DC, for the access log.
    pub(super) shard: Option<ShardKey>,
    pub(super) target: Option<DcId>,
    pub(super) upstream_time: Option<Duration>,
    pub(super) result: Result<Response<Body>, RouterError>,
    /// How many times a peer's 421 sent the write on again.
    pub(super) retries: u8,
    /// Why a `read-owner` hop gave way to a local read marked stale: the owner's failure, which
    /// the edge counts and logs like any other.
    pub(super) owner_failed: Option<Box<RouterError>>,
}

impl Outcome {
    pub(super) fn error(label: Label, error: RouterError) -> Self {
        Self {
            label,
            served_by: None,
            shard: None,
            target: None,
            upstream_time: None,
            result: Err(error),
            retries: 0,
            owner_failed: None,
        }
    }
}

/// The client as the proxy headers name it.
pub(super) fn client(conn: &ConnInfo) -> Client<'_> {
    Client {
        ip: &conn.forwarded_for,
        https: conn.https,
    }
}

/// A router header's number, if it holds one.
pub(super) fn header_u64(headers: &HeaderMap, name: &http::HeaderName) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}
