//! An emulated Loom/Coopr server, for loom-router's integration tests and for
//! `loom-router demo` (three data centres in one process).
//!
//! What it owns: an in-memory Loom that answers both API generations (`/v1/loom` and `/v2`) for
//! the endpoints in the router's routing table (`docs/routing.md` at the workspace root), as
//! Loom's sources have them: identity headers and their 401 texts, `%08d` cluster IDs from
//! `ids.start.num` and `ids.increment.by`, plain-text errors, and routing on the path netty-http
//! routes on ([`netty_path`]). It records every request it receives and every write it applies,
//! so tests can see where the router sent what. Like Loom's hot-hot custom-replication design, it
//! copies a cluster's or node's state to its peers only once a write has completed, and only
//! after a delay.
//!
//! It also answers the router's become-owner hook (`[coordination] become_owner_hook`), which is
//! where a DC takes over a shard it gained: replication from the old owner is cut off for that
//! shard and the replicated in-progress jobs are restarted, as the design does on failover.
//! A stopped emulator keeps its data and can be served again, as a restored DC.
//!
//! What it must not do: know anything of the router. It is its own crate so that the router's
//! production build carries none of it; the router depends on it only through its `demo`
//! feature and its tests. It does not model per-user visibility, tenant lookup, jobs, tasks or
//! plugins beyond what tests need.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// Bodies are buffered whole so that `received()` holds the exact bytes; this bounds the buffer.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
const EPOCH_HEADER: &str = "x-loom-router-epoch";
/// Where the router's `become_owner_hook` points (`[coordination] become_owner_hook`).
const BECOME_OWNER_PATH: &str = "/replication/become-owner";
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
/// Admin and tenant entities, all kept alike in one map keyed by full path.
const ENTITY_TYPES: &str = "providers hardwaretypes imagetypes services clustertemplates \
    partialtemplates providertypes automatortypes plugins tenants profile import export";
/// Everything else that reads the identity headers.
const AUTHED: &str = "clusters nodes getNodeProperties getClusterStatuses resolve metrics";

fn listed(list: &str, word: &str) -> bool {
    list.split_whitespace().any(|w| w == word)
}

#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// DC name, e.g. "us-east".
    pub dc: String,
    /// Loom's `ids.start.num`.
    pub id_start: u64,
    /// Loom's `ids.increment.by`.
    pub increment: u64,
    /// How long a completed write takes to reach the peers.
    pub replication_delay: Duration,
}

/// One request as the emulator received it from a client.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One write this emulator applied for a client; replicas it received are not listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedWrite {
    pub dc: String,
    /// The cluster the write touched; for a create, the new cluster.
    pub cluster: Option<u64>,
    /// The touched cluster's shard (cluster ID mod increment), so a history checker can group
    /// writes by (dc, shard, epoch).
    pub shard: Option<u64>,
    /// `X-Loom-Router-Epoch` of the request, so tests can check fencing.
    pub epoch: Option<u64>,
    pub method: String,
    pub path: String,
    /// When the write was applied (tokio's clock, like the memory store's audit trail), so a
    /// history checker can order it against ownership changes.
    pub at: tokio::time::Instant,
}

/// One call of the become-owner hook that this emulator answered with 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BecomeOwner {
    /// The shard's residue; `None` for the global shard.
    pub shard: Option<u64>,
    pub epoch: u64,
    pub previous_owner: Option<String>,
    /// Clusters whose job this call restarted, in ID order; empty when it was a repeat.
    pub restarted: Vec<u64>,
}

/// An emulated Loom. Clones share one server.
#[derive(Debug, Clone)]
pub struct Emulator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: EmulatorConfig,
    state: Mutex<State>,
    /// Weak because peers usually point at each other and strong references would form a cycle.
    peers: Mutex<Vec<Weak<Inner>>>,
}

#[derive(Debug, Default)]
struct State {
    dc: String,
    increment: u64,
    next_id: u64,
    /// Orders this emulator's replicas, so a late copy never overwrites a newer one at a peer.
    seq: u64,
    /// How many `serve` loops run; with none, this DC is dead and ships no replicas.
    serving: usize,
    /// Bumped whenever serving starts or stops. A replica ships only if this has not changed
    /// since its write, so a write from before a stop is lost even if the DC is restored.
    incarnation: u64,
    /// Clusters and nodes, owned or replicated: the state that replication copies.
    store: BTreeMap<Key, Map<String, Value>>,
    /// The records in `store` held as another DC's replica, with that DC. A local write or a
    /// become-owner call makes a record this DC's own.
    replicated_from: BTreeMap<Key, String>,
    /// Per shard, the highest epoch under which this DC wrote it or became its owner. Replicas
    /// carry it, so that a peer can tell a returning owner from a stale one.
    epochs: HashMap<u64, u64>,
    /// Replication cut off by becoming a shard's owner: (origin DC, shard) to the epoch of the
    /// takeover. Replicas from that origin for that shard are ignored unless they carry a later
    /// epoch, which only happens once the origin has become the owner again (failback).
    cut: HashMap<(String, u64), u64>,
    become_owner: Vec<BecomeOwner>,
    entities: BTreeMap<String, Value>,
    provisioners: BTreeMap<String, Value>,
    received: Vec<Received>,
    applied: Vec<AppliedWrite>,
    replica_seq: HashMap<(String, Key), u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    Cluster(u64),
    Node(String),
}

/// A record's state on its way to the peers.
#[derive(Debug)]
struct Replica {
    seq: u64,
    key: Key,
    /// `None` when the record was deleted.
    snapshot: Option<Map<String, Value>>,
    /// The sender's epoch for the record's shard, if it knows one.
    epoch: Option<u64>,
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    payload: Payload,
    /// For an applied write: the cluster it touched and what to replicate.
    write: Option<(Option<u64>, Option<Key>)>,
}

#[derive(Debug)]
enum Payload {
    Empty,
    Text(String),
    Json(Value),
}

impl Reply {
    fn new(status: StatusCode, payload: Payload) -> Self {
        let write = None;
        Self {
            status,
            payload,
            write,
        }
    }
    fn ok() -> Self {
        Self::new(StatusCode::OK, Payload::Empty)
    }
    fn json(value: Value) -> Self {
        Self::new(StatusCode::OK, Payload::Json(value))
    }
    fn text(status: StatusCode, text: impl Into<String>) -> Self {
        Self::new(status, Payload::Text(text.into()))
    }
    fn bad_request(text: impl Into<String>) -> Self {
        Self::text(StatusCode::BAD_REQUEST, text)
    }
    fn not_found(text: impl Into<String>) -> Self {
        Self::text(StatusCode::NOT_FOUND, text)
    }
    fn wrote(mut self, cluster: Option<u64>, replicate: Option<Key>) -> Self {
        self.write = Some((cluster, replicate));
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let (content_type, body) = match self.payload {
            Payload::Empty => (None, Bytes::new()),
            Payload::Text(text) => (Some(TEXT_PLAIN), Bytes::from(text)),
            Payload::Json(value) => (Some("application/json"), Bytes::from(value.to_string())),
        };
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = self.status;
        if let Some(content_type) = content_type {
            let value = HeaderValue::from_static(content_type);
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        response
    }
}

/// netty-http's answer for a path no handler matches.
fn unmatched(uri: &Uri) -> Reply {
    Reply::not_found(format!("Problem accessing: {uri}. Reason: Not Found"))
}

/// One request, as the handlers see it.
struct Ctx<'a> {
    v2: bool,
    method: &'a str,
    path: &'a str,
    headers: &'a HeaderMap,
    body: &'a Bytes,
}

impl Ctx<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn authenticate(&self) -> Result<(), Reply> {
        let missing = if !self.v2 {
            self.header("x-loom-userid")
                .is_none()
                .then_some("X-Loom-UserID not found in the request header.")
        } else if self.header("coopr-userid").is_none() {
            Some("Coopr-UserID not found in request headers.")
        } else {
            self.header("coopr-tenantid")
                .is_none()
                .then_some("Coopr-TenantID not found in request headers.")
        };
        missing.map_or(Ok(()), |text| {
            Err(Reply::text(StatusCode::UNAUTHORIZED, text))
        })
    }

    /// An empty body counts as `{}`: most Loom writes take an optional body.
    fn object(&self) -> Result<Map<String, Value>, Reply> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Map::new());
        }
        match serde_json::from_slice(self.body) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(Reply::bad_request("invalid request body.")),
        }
    }
}

/// Splits off the API base: `(is_v2, rest)`, where rest is `""` or starts with `/`.
/// The path Loom's HTTP layer routes a request target on. netty-http's `HttpResourceHandler`
/// takes `java.net.URI.create(uri).normalize().getPath()`, and its path router then drops one
/// trailing '/'. So, in order:
/// - a target that starts with `//` is a network-path reference: `//a/b` has authority `a` and
///   path `/b`;
/// - `normalize()` works on the still-encoded path: it merges repeated slashes, removes `.`
///   segments and `x/..` pairs, and keeps a `..` it cannot resolve;
/// - `getPath()` decodes percent-escapes, `%2F` into `/`; a malformed escape is an exception
///   (500);
/// - one trailing '/' is dropped.
pub fn netty_path(target: &str) -> Result<String, String> {
    let path = match target.strip_prefix("//") {
        Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
        None => target,
    };
    check_escapes(target)?;
    let absolute = path.starts_with('/');
    let mut trailing = path.len() > 1 && path.ends_with('/');
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." => trailing |= last,
            ".." if kept.last().is_some_and(|k| *k != "..") => {
                kept.pop();
                trailing |= last;
            }
            other => kept.push(other),
        }
    }
    let mut normal = String::with_capacity(path.len());
    if absolute {
        normal.push('/');
    }
    normal.push_str(&kept.join("/"));
    if trailing && !kept.is_empty() {
        normal.push('/');
    }
    let mut decoded = percent_encoding::percent_decode_str(&normal)
        .decode_utf8_lossy()
        .into_owned();
    if decoded.len() > 1 && decoded.ends_with('/') {
        decoded.pop();
    }
    Ok(decoded)
}

/// `java.net.URI.create` refuses a `%` not followed by two hex digits.
fn check_escapes(target: &str) -> Result<(), String> {
    let bytes = target.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'%'
            && !(bytes.len() > i + 2 && bytes[i + 1..i + 3].iter().all(u8::is_ascii_hexdigit))
        {
            return Err(format!("Malformed escape pair at index {i}: {target}"));
        }
    }
    Ok(())
}

fn split_base(path: &str) -> Option<(bool, &str)> {
    let (v2, rest) = match path.strip_prefix("/v1/loom") {
        Some(rest) => (false, rest),
        None => (true, path.strip_prefix("/v2")?),
    };
    (rest.is_empty() || rest.starts_with('/')).then_some((v2, rest))
}

/// The paths the router keeps local as `provisioner`: Loom reads no identity headers there.
fn is_provisioner(v2: bool, segs: &[&str]) -> bool {
    match segs {
        ["tasks", ..] => true,
        ["provisioners", ..] | ["tenants", _, "automatortypes" | "providertypes", ..] => v2,
        _ => false,
    }
}

/// Loom parses cluster IDs with `Long.parseLong`: leading zeros are fine, and anything else is
/// an uncaught `NumberFormatException`.
fn parse_cluster_id(id: &str) -> Result<u64, Reply> {
    id.parse().map_err(|_| {
        let reason =
            format!("Caught exception processing request. Reason: For input string: \"{id}\"");
        Reply::text(StatusCode::INTERNAL_SERVER_ERROR, reason)
    })
}

fn format_id(id: u64) -> String {
    format!("{id:08}")
}

/// A `clusterId` in a JSON body, which clients send as a string or an integer.
fn body_cluster_id(body: &Map<String, Value>) -> Result<u64, Reply> {
    match body.get("clusterId") {
        None | Some(Value::Null) => Err(Reply::bad_request("clusterId must be specified.")),
        value => number(value).ok_or_else(|| Reply::bad_request("invalid clusterId.")),
    }
}

fn number(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn str_field<'a>(map: &'a Map<String, Value>, key: &str) -> &'a str {
    map.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn field_or(map: &Map<String, Value>, key: &str, default: Value) -> Value {
    map.get(key).cloned().unwrap_or(default)
}

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// Starts a new job on the cluster, as each Loom cluster operation does.
fn start_job(cluster: &mut Map<String, Value>, action: &str) {
    let id = str_field(cluster, "id").to_owned();
    let latest = str_field(cluster, "latestJobId").rsplit('-').next();
    let job = latest.and_then(|n| n.parse::<u64>().ok()).unwrap_or(0) + 1;
    cluster.insert("latestJobId".into(), json!(format!("{id}-{job:03}")));
    let progress =
        json!({"action": action, "actionstatus": "running", "stepstotal": 1, "stepscompleted": 0});
    cluster.insert("progress".into(), progress);
}

/// Pending, or its latest job still running: what the new owner must restart after a failover.
fn in_progress(cluster: &Map<String, Value>) -> bool {
    let running = cluster.get("progress").and_then(|p| p.get("actionstatus"));
    str_field(cluster, "status") == "pending" || running.and_then(Value::as_str) == Some("running")
}

/// Runs the cluster's latest action again under a new job ID. Only the minimal state to restart
/// it was replicated, so the job starts over; the note says why.
fn restart_job(cluster: &mut Map<String, Value>, note: String) {
    let action = cluster.get("progress").and_then(|p| p.get("action"));
    let action = action
        .and_then(Value::as_str)
        .unwrap_or("solve_layout")
        .to_owned();
    start_job(cluster, &action);
    if let Some(Value::Object(progress)) = cluster.get_mut("progress") {
        progress.insert("message".into(), json!(note));
    }
}

/// The become-owner hook's body:
/// `{"shard": r | "global", "epoch": E, "previous_owner": dc | null}`.
fn parse_become_owner(body: &[u8], increment: u64) -> Result<BecomeOwner, Reply> {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else {
        return Err(Reply::bad_request("invalid request body."));
    };
    let shard = match body.get("shard") {
        Some(Value::String(s)) if s == "global" => None,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|r| r < increment) => n.as_u64(),
        _ => {
            let text = format!("shard must be \"global\" or an integer below {increment}.");
            return Err(Reply::bad_request(text));
        }
    };
    let epoch = body.get("epoch").and_then(Value::as_u64);
    let epoch = epoch.ok_or_else(|| Reply::bad_request("epoch must be a non-negative integer."))?;
    let previous_owner = match body.get("previous_owner") {
        None | Some(Value::Null) => None,
        Some(Value::String(dc)) => Some(dc.clone()),
        Some(_) => {
            return Err(Reply::bad_request(
                "previous_owner must be a DC name or null.",
            ))
        }
    };
    Ok(BecomeOwner {
        shard,
        epoch,
        previous_owner,
        restarted: Vec::new(),
    })
}

fn cluster_status(cluster: &Map<String, Value>) -> Value {
    let progress = field_or(cluster, "progress", json!({}));
    json!({
        "clusterid": cluster.get("id"),
        "status": cluster.get("status"),
        "action": progress.get("action"),
        "actionstatus": progress.get("actionstatus"),
        "stepstotal": progress.get("stepstotal"),
        "stepscompleted": progress.get("stepscompleted"),
    })
}

fn cluster_summary(cluster: &Map<String, Value>) -> Value {
    let keys = "id name description ownerId account createTime expireTime numMachines status \
        clusterTemplate services progress";
    let fields = keys
        .split_whitespace()
        .filter_map(|k| Some((k.to_owned(), cluster.get(k)?.clone())));
    Value::Object(fields.collect())
}

fn plan(cluster: &Map<String, Value>) -> Value {
    let action = cluster.get("progress").and_then(|p| p.get("action"));
    let (id, cluster_id) = (cluster.get("latestJobId"), cluster.get("id"));
    json!({"id": id, "clusterId": cluster_id, "action": action, "currentStage": 0, "stages": []})
}

/// Applies a write to a cluster this Loom holds; the route was checked by the caller.
fn write_cluster(
    cluster: &mut Map<String, Value>,
    method: &str,
    rest: &[&str],
    body: &Map<String, Value>,
) -> Result<(), Reply> {
    match (method, rest) {
        // Deleting a terminated cluster is a no-op in Loom, not an error.
        ("DELETE", []) if str_field(cluster, "status") == "terminated" => {}
        ("DELETE", []) => {
            cluster.insert("status".into(), json!("terminated"));
            start_job(cluster, "cluster_delete");
        }
        ("POST", []) => {
            let expire = number(body.get("expireTime"));
            let expire =
                expire.ok_or_else(|| Reply::bad_request("expireTime must be specified."))?;
            cluster.insert("expireTime".into(), json!(expire));
        }
        ("PUT", ["config"]) => {
            cluster.insert("config".into(), field_or(body, "config", json!({})));
            start_job(cluster, "cluster_configure");
        }
        ("POST", ["services"]) => {
            let added = field_or(body, "services", json!([]));
            let services = cluster.get_mut("services");
            if let (Some(Value::Array(services)), Value::Array(added)) = (services, added) {
                let new: Vec<Value> = added
                    .into_iter()
                    .filter(|s| !services.contains(s))
                    .collect();
                services.extend(new);
            }
            start_job(cluster, "add_services");
        }
        ("POST", ["services", .., op]) => start_job(cluster, &format!("{op}_services")),
        // abort, pause, resume and template sync: Loom only records them against the job.
        _ => start_job(cluster, &rest.join("_")),
    }
    Ok(())
}

impl State {
    fn dispatch(&mut self, cx: &Ctx<'_>, segs: &[&str]) -> Option<Reply> {
        match (cx.method, segs) {
            ("POST", ["tasks", "take"]) => Some(Reply::new(StatusCode::NO_CONTENT, Payload::Empty)),
            ("POST", ["tasks", "finish"]) => Some(Reply::ok()),
            (_, ["provisioners", rest @ ..]) if cx.v2 => self.provisioners(cx, rest),
            (_, ["clusters", rest @ ..]) => self.clusters(cx, rest),
            (_, ["nodes", rest @ ..]) if cx.v2 => self.nodes(cx, rest),
            ("POST", ["getNodeProperties"]) => {
                let cluster = cx.object().and_then(|body| body_cluster_id(&body));
                Some(cluster.map_or_else(|e| e, |c| Reply::json(self.nodes_of(c).into())))
            }
            ("POST", ["getClusterStatuses"]) => {
                let statuses: Vec<Value> = self.cluster_records().map(cluster_status).collect();
                let empty = statuses.is_empty();
                Some(if empty {
                    Reply::not_found("No clusters found")
                } else {
                    Reply::json(statuses.into())
                })
            }
            ("POST", ["resolve"]) | ("GET", ["metrics", ..]) if cx.v2 => {
                Some(Reply::json(json!({})))
            }
            (_, [kind, ..]) if listed(ENTITY_TYPES, kind) => self.entities(cx, segs),
            _ => None,
        }
    }

    fn cluster_records(&self) -> impl Iterator<Item = &Map<String, Value>> {
        let clusters = self
            .store
            .iter()
            .filter(|(k, _)| matches!(k, Key::Cluster(_)));
        clusters.map(|(_, c)| c)
    }

    fn shard_of(&self, cluster: u64) -> Option<u64> {
        cluster.checked_rem(self.increment)
    }

    /// The shards a record belongs to: a node's, by its cluster, before and after a replica.
    fn shards_of(&self, key: &Key, snapshot: Option<&Map<String, Value>>) -> Vec<u64> {
        let clusters = match key {
            Key::Cluster(id) => vec![*id],
            Key::Node(_) => [snapshot, self.store.get(key)]
                .into_iter()
                .flatten()
                .filter_map(|node| str_field(node, "clusterId").parse().ok())
                .collect(),
        };
        clusters
            .into_iter()
            .filter_map(|c| self.shard_of(c))
            .collect()
    }

    /// Whether this DC cut off replication of the replica's shard from `origin` at an epoch the
    /// replica does not exceed. A replica without an epoch predates any takeover, so it is cut.
    fn is_cut(&self, origin: &str, replica: &Replica) -> bool {
        let shards = self.shards_of(&replica.key, replica.snapshot.as_ref());
        shards.into_iter().any(|shard| {
            let cut = self.cut.get(&(origin.to_owned(), shard));
            cut.is_some_and(|&cut| replica.epoch.is_none_or(|epoch| epoch <= cut))
        })
    }

    fn note_epoch(&mut self, shard: u64, epoch: u64) {
        let known = self.epochs.entry(shard).or_insert(epoch);
        *known = (*known).max(epoch);
    }

    /// Makes `shard` this DC's own: cuts replication from the previous owner and restarts the
    /// in-progress jobs it held as replicas (from `previous_owner`, or from anyone if `None`).
    /// Returns the restarted clusters and their replicas for the peers.
    fn take_over(&mut self, shard: u64, call: &BecomeOwner) -> (Vec<u64>, Vec<Replica>) {
        let previous = call.previous_owner.as_deref();
        if let Some(origin) = previous {
            let cut = self
                .cut
                .entry((origin.to_owned(), shard))
                .or_insert(call.epoch);
            *cut = (*cut).max(call.epoch);
        }
        self.note_epoch(shard, call.epoch);
        let taken: Vec<Key> = self
            .replicated_from
            .iter()
            .filter(|(key, origin)| {
                previous.is_none_or(|p| p == origin.as_str())
                    && self.shards_of(key, None).contains(&shard)
            })
            .map(|(key, _)| key.clone())
            .collect();
        let (mut restarted, mut replicas) = (Vec::new(), Vec::new());
        let from = previous.unwrap_or("another DC");
        for key in taken {
            // Already-restarted records are local, so a repeated call finds nothing to do.
            self.replicated_from.remove(&key);
            let Key::Cluster(id) = key else { continue };
            let Some(cluster) = self.store.get_mut(&key).filter(|c| in_progress(c)) else {
                continue;
            };
            let note = format!(
                "restarted after failover from {from} at epoch {}",
                call.epoch
            );
            restart_job(cluster, note);
            let snapshot = Some(cluster.clone());
            self.seq += 1;
            let (seq, epoch) = (self.seq, Some(call.epoch));
            restarted.push(id);
            replicas.push(Replica {
                seq,
                key,
                snapshot,
                epoch,
            });
        }
        (restarted, replicas)
    }

    fn nodes_of(&self, cluster: u64) -> Vec<Value> {
        let id = format_id(cluster);
        // Nodes sort after every cluster: a read of one cluster scans the nodes only, not the
        // clusters, whose number grows with every create (bench/soak.rs creates all along).
        let nodes = self
            .store
            .range(Key::Node(String::new())..)
            .filter(|(_, n)| str_field(n, "clusterId") == id);
        nodes.map(|(_, n)| Value::Object(n.clone())).collect()
    }

    fn create_cluster(&mut self, cx: &Ctx<'_>) -> Reply {
        let body = match cx.object() {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let name = str_field(&body, "name");
        if name.is_empty() {
            return Reply::bad_request("name must be specified.");
        }
        // Like Loom's ZooKeeper counter: hand out the old value, store old + increment.
        let num = self.next_id;
        self.next_id = num.saturating_add(self.increment);
        let id = format_id(num);
        let now = now_ms();
        let lease = number(body.get("initialLeaseDuration")).unwrap_or(0);
        let owner = if cx.v2 {
            let (user, tenant) = (cx.header("coopr-userid"), cx.header("coopr-tenantid"));
            ("account", json!({ "userId": user, "tenantId": tenant }))
        } else {
            ("ownerId", json!(cx.header("x-loom-userid")))
        };
        let cluster = json!({
            "id": id,
            "name": name,
            "description": str_field(&body, "description"),
            "clusterTemplate": body.get("clusterTemplate"),
            "provider": body.get("provider"),
            "numMachines": number(body.get("numMachines")).unwrap_or(0),
            "services": field_or(&body, "services", json!([])),
            "config": field_or(&body, "config", json!({})),
            "status": "pending",
            "createTime": now,
            "expireTime": if lease > 0 { now + lease } else { 0 },
            (owner.0): owner.1,
        });
        let Value::Object(mut cluster) = cluster else {
            unreachable!("json! with braces builds an object")
        };
        cluster.insert("latestJobId".into(), json!(format!("{id}-000")));
        start_job(&mut cluster, "solve_layout");
        self.store.insert(Key::Cluster(num), cluster);
        Reply::json(json!({ "id": id })).wrote(Some(num), Some(Key::Cluster(num)))
    }

    fn clusters(&mut self, cx: &Ctx<'_>, segs: &[&str]) -> Option<Reply> {
        let (id, rest) = match (cx.method, segs) {
            ("GET", []) => {
                return Some(Reply::json(
                    self.cluster_records().map(cluster_summary).collect(),
                ))
            }
            ("POST", []) => return Some(self.create_cluster(cx)),
            (_, [id, rest @ ..]) => (*id, rest),
            _ => return None,
        };
        let known = matches!(
            (cx.method, rest),
            (
                "GET",
                [] | ["status" | "services" | "plans" | "config"] | ["plans", _]
            ) | ("DELETE", [])
                | ("POST", [] | ["abort" | "pause" | "resume" | "services"])
                | ("POST", ["clustertemplate", "sync"])
                | ("POST", ["services", "start" | "stop" | "restart"])
                | ("POST", ["services", _, "start" | "stop" | "restart"])
                | ("PUT", ["config"])
        );
        if !known {
            return None;
        }
        let num = match parse_cluster_id(id) {
            Ok(num) => num,
            Err(reply) => return Some(reply),
        };
        let key = Key::Cluster(num);
        if !self.store.contains_key(&key) {
            return Some(Reply::not_found(format!("cluster {id} not found.")));
        }
        if cx.method == "GET" {
            return self.read_cluster(num, rest);
        }
        let body = match cx.object() {
            Ok(body) => body,
            Err(reply) => return Some(reply),
        };
        // Present: checked above, under the same lock.
        let cluster = self.store.get_mut(&key)?;
        if let Err(reply) = write_cluster(cluster, cx.method, rest, &body) {
            return Some(reply);
        }
        Some(Reply::ok().wrote(Some(num), Some(key)))
    }

    fn read_cluster(&self, num: u64, rest: &[&str]) -> Option<Reply> {
        let cluster = self.store.get(&Key::Cluster(num))?;
        let value = match rest {
            [] => {
                let mut full = cluster.clone();
                full.insert("nodes".into(), self.nodes_of(num).into());
                Value::Object(full)
            }
            ["status"] => cluster_status(cluster),
            ["services"] => field_or(cluster, "services", json!([])),
            ["plans"] => json!([plan(cluster)]),
            ["plans", job] => {
                let job_cluster = job.split('-').next().and_then(|c| c.parse::<u64>().ok());
                if job_cluster != Some(num) {
                    let text = format!("plan {job} is not for cluster {num}.");
                    return Some(Reply::bad_request(text));
                }
                if *job != str_field(cluster, "latestJobId") {
                    return Some(Reply::not_found(format!("plan {job} not found.")));
                }
                plan(cluster)
            }
            _ => field_or(cluster, "config", json!({})),
        };
        Some(Reply::json(value))
    }

    fn nodes(&mut self, cx: &Ctx<'_>, segs: &[&str]) -> Option<Reply> {
        let not_found = |id: &str| Reply::not_found(format!("node {id} not found."));
        let node_key = |id: &str| Key::Node(id.to_owned());
        let reply = match (cx.method, segs) {
            ("GET", []) => {
                let nodes = self.store.iter().filter(|(k, _)| matches!(k, Key::Node(_)));
                Reply::json(nodes.map(|(_, n)| Value::Object(n.clone())).collect())
            }
            ("GET", [id]) => match self.store.get(&node_key(id)) {
                Some(node) => Reply::json(Value::Object(node.clone())),
                None => not_found(id),
            },
            ("DELETE", [id]) => match self.store.remove(&node_key(id)) {
                Some(node) => {
                    let cluster = str_field(&node, "clusterId").parse().ok();
                    Reply::ok().wrote(cluster, Some(node_key(id)))
                }
                None => not_found(id),
            },
            ("POST", []) => self.put_node(cx, None),
            ("PUT", [id]) => self.put_node(cx, Some(id)),
            _ => return None,
        };
        Some(reply)
    }

    /// `POST /v2/nodes` (create; the ID may come from the body) or `PUT /v2/nodes/{id}` (upsert).
    fn put_node(&mut self, cx: &Ctx<'_>, path_id: Option<&str>) -> Reply {
        let mut node = match cx.object() {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let id = match path_id.or_else(|| node.get("id").and_then(Value::as_str)) {
            Some(id) => id.to_owned(),
            None => self.node_uuid(),
        };
        let key = Key::Node(id.clone());
        let existing = self.store.get(&key);
        if cx.method == "POST" && existing.is_some() {
            return Reply::text(StatusCode::CONFLICT, format!("node {id} already exists."));
        }
        // A PUT that leaves out the cluster keeps the node where it was.
        let previous = existing.and_then(|n| str_field(n, "clusterId").parse().ok());
        let cluster = match (body_cluster_id(&node), previous) {
            (Ok(cluster), _) | (Err(_), Some(cluster)) => cluster,
            (Err(reply), None) => return reply,
        };
        node.insert("id".into(), json!(id));
        node.insert("clusterId".into(), json!(format_id(cluster)));
        let defaults = [
            ("services", json!([])),
            ("properties", json!({})),
            ("actions", json!([])),
        ];
        for (field, empty) in defaults {
            node.entry(field).or_insert(empty);
        }
        self.store.insert(key.clone(), node);
        let reply = match path_id {
            None => Reply::json(json!({ "id": id })),
            Some(_) => Reply::ok(),
        };
        reply.wrote(Some(cluster), Some(key))
    }

    /// Loom's node IDs are random UUIDs; these only need to be unique and look like one.
    fn node_uuid(&mut self) -> String {
        use std::hash::{BuildHasher, RandomState};
        self.seq += 1;
        let hasher = RandomState::new();
        let a = hasher.hash_one((&self.dc, self.seq, now_ms()));
        let b = hasher.hash_one(a);
        let (a1, a2, a3) = (a >> 32, (a >> 16) & 0xffff, a & 0xfff);
        let (b1, b2) = (0x8000 | ((b >> 48) & 0x3fff), b & 0xffff_ffff_ffff);
        format!("{a1:08x}-{a2:04x}-4{a3:03x}-{b1:04x}-{b2:012x}")
    }

    fn provisioners(&mut self, cx: &Ctx<'_>, segs: &[&str]) -> Option<Reply> {
        let not_found = |id: &str| Reply::not_found(format!("provisioner {id} not found."));
        let reply = match (cx.method, segs) {
            ("GET", []) => Reply::json(self.provisioners.values().cloned().collect()),
            ("GET", [id]) => self
                .provisioners
                .get(*id)
                .cloned()
                .map_or_else(|| not_found(id), Reply::json),
            ("PUT", [id]) => {
                let mut body = match cx.object() {
                    Ok(body) => body,
                    Err(reply) => return Some(reply),
                };
                if body.get("id").is_some_and(|b| b.as_str() != Some(*id)) {
                    return Some(Reply::bad_request(
                        "provisioner id in path and body must match.",
                    ));
                }
                body.insert("id".into(), json!(id));
                self.provisioners.insert((*id).to_owned(), body.into());
                Reply::ok()
            }
            ("POST", [id, "heartbeat"]) if !self.provisioners.contains_key(*id) => not_found(id),
            ("POST", [_, "heartbeat"]) => Reply::ok(),
            ("DELETE", [id]) => {
                self.provisioners.remove(*id);
                Reply::ok()
            }
            _ => return None,
        };
        Some(reply)
    }

    /// Generic entity store: `GET` reads a path or lists what lies directly below it, `POST /<type>`
    /// adds a named entity, other writes replace or remove the path.
    fn entities(&mut self, cx: &Ctx<'_>, segs: &[&str]) -> Option<Reply> {
        let kind = *segs.first()?;
        let label = kind.strip_suffix('s').unwrap_or(kind);
        let missing = || Reply::not_found(format!("{label} {}  not found.", segs[1..].join("/")));
        // Singletons and plugin resource uploads (not JSON) take any body at their own path.
        let singleton = segs.len() > 1 || kind == "profile" || kind == "import";
        let reply = match cx.method {
            "GET" => match self.entities.get(cx.path) {
                Some(value) => Reply::json(value.clone()),
                None if segs.len() > 1 => missing(),
                None if kind == "profile" || kind == "export" => Reply::json(json!({})),
                None => Reply::json(self.children(cx.path)),
            },
            "POST" if !singleton => {
                let body = match cx.object() {
                    Ok(body) => Value::Object(body),
                    Err(reply) => return Some(reply),
                };
                // Tenants arrive wrapped as {"tenant": {...}, "bootstrap": bool}.
                let body = body.get("tenant").cloned().unwrap_or(body);
                let Some(name) = body.get("name").and_then(Value::as_str) else {
                    return Some(Reply::bad_request(format!("{label} must have a name.")));
                };
                let key = format!("{}/{name}", cx.path);
                if self.entities.contains_key(&key) {
                    let text = format!("{label} {name} already exists.");
                    return Some(Reply::text(StatusCode::CONFLICT, text));
                }
                self.entities.insert(key, body);
                Reply::ok()
            }
            "POST" | "PUT" if singleton => {
                let text = || Value::String(String::from_utf8_lossy(cx.body).into_owned());
                let body = serde_json::from_slice(cx.body).unwrap_or_else(|_| text());
                self.entities.insert(cx.path.to_owned(), body);
                Reply::ok()
            }
            "DELETE" if singleton => {
                if self.entities.remove(cx.path).is_none() && kind != "profile" {
                    return Some(missing());
                }
                Reply::ok()
            }
            _ => return None,
        };
        Some(match cx.method {
            "GET" => reply,
            _ => reply.wrote(None, None),
        })
    }

    /// Entities stored directly under `path`, as a JSON array.
    fn children(&self, path: &str) -> Value {
        let prefix = format!("{path}/");
        let below = self
            .entities
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix));
        let direct = below.filter(|(k, _)| !k[prefix.len()..].contains('/'));
        direct.map(|(_, v)| v.clone()).collect()
    }
}

impl Emulator {
    pub fn new(config: EmulatorConfig) -> Self {
        let (dc, increment, next_id) = (config.dc.clone(), config.increment, config.id_start);
        let state = Mutex::new(State {
            dc,
            increment,
            next_id,
            ..State::default()
        });
        let peers = Mutex::new(Vec::new());
        Self {
            inner: Arc::new(Inner {
                config,
                state,
                peers,
            }),
        }
    }

    pub fn dc(&self) -> &str {
        &self.inner.config.dc
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .expect("emulator state lock poisoned")
    }

    fn peers(&self) -> MutexGuard<'_, Vec<Weak<Inner>>> {
        self.inner
            .peers
            .lock()
            .expect("emulator peer lock poisoned")
    }

    /// Serves on `listener` until `shutdown` resolves. Then it stops accepting and drops every
    /// open connection, even mid-request, so that a stopped emulator behaves like a dead Loom.
    /// It keeps its data, and may be served again later, as a restored DC.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        {
            let mut state = self.state();
            state.serving += 1;
            state.incarnation += 1;
        }
        let mut shutdown = std::pin::pin!(shutdown);
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => drop(connections.spawn(self.clone().serve_connection(stream))),
                    Err(error) => {
                        // Usually fd exhaustion; back off instead of spinning on it.
                        tracing::warn!(dc = self.dc(), %error, "emulator accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        {
            let mut state = self.state();
            state.serving -= 1;
            state.incarnation += 1;
        }
        drop(listener);
        connections.shutdown().await;
        Ok(())
    }

    async fn serve_connection(self, stream: TcpStream) {
        let emulator = self.clone();
        let service = service_fn(move |request| {
            let emulator = emulator.clone();
            async move { Ok::<_, Infallible>(emulator.respond(request).await) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        let connection = builder
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        if let Err(error) = connection.await {
            tracing::debug!(dc = self.dc(), %error, "emulator connection ended");
        }
    }

    /// Binds 127.0.0.1:0 and serves there until the handle's `stop()`. Dropping the handle
    /// without calling `stop()` leaves the server running until the runtime shuts down.
    pub async fn spawn(&self) -> std::io::Result<(SocketAddr, EmulatorHandle)> {
        self.spawn_at(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
    }

    /// Like [`Emulator::spawn`], on `addr`. Binding the address a stopped emulator served on
    /// restores that DC where its router expects it, with the data it had.
    pub async fn spawn_at(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<(SocketAddr, EmulatorHandle)> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // The stopped server closed its connections first, so the port may be in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            if stopped.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let emulator = self.clone();
        let task = tokio::spawn(async move { emulator.serve(listener, shutdown).await });
        Ok((addr, EmulatorHandle { stop, task }))
    }

    /// Adds a replication target. It is held weakly, so a dropped peer simply stops receiving.
    pub fn add_peer(&self, peer: Emulator) {
        if !Arc::ptr_eq(&self.inner, &peer.inner) {
            self.peers().push(Arc::downgrade(&peer.inner));
        }
    }

    /// Every request so far, become-owner calls included, in arrival order; replication never
    /// shows up here.
    pub fn received(&self) -> Vec<Received> {
        self.state().received.clone()
    }

    pub fn clear_received(&self) {
        self.state().received.clear();
    }

    /// This Loom's copy of a cluster, owned or replicated (without its nodes).
    pub fn cluster(&self, id: u64) -> Option<Value> {
        self.state()
            .store
            .get(&Key::Cluster(id))
            .cloned()
            .map(Value::Object)
    }

    /// Writes applied for clients here, in order; task and provisioner calls are not listed,
    /// nor are the restarts of the become-owner hook.
    pub fn applied_writes(&self) -> Vec<AppliedWrite> {
        self.state().applied.clone()
    }

    /// Forget the writes applied so far (a long benchmark has no use for them).
    pub fn clear_applied_writes(&self) {
        self.state().applied.clear();
    }

    /// Every become-owner call answered with 200, in order, repeats included.
    pub fn become_owner_calls(&self) -> Vec<BecomeOwner> {
        self.state().become_owner.clone()
    }

    async fn respond(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let (body, failure) = match Limited::new(body, MAX_BODY_BYTES).collect().await {
            Ok(collected) => (collected.to_bytes(), None),
            Err(e) if e.is::<LengthLimitError>() => {
                (Bytes::new(), Some(StatusCode::PAYLOAD_TOO_LARGE))
            }
            Err(_) => (Bytes::new(), Some(StatusCode::BAD_REQUEST)),
        };
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let method = parts.method.clone();
        let (headers, recorded_body) = (parts.headers.clone(), body.clone());
        self.state().received.push(Received {
            method,
            path_and_query,
            headers,
            body: recorded_body,
        });
        let reply = match failure {
            Some(status) => Reply::text(status, "could not read the request body."),
            None => self.handle(&parts.method, &parts.uri, &parts.headers, &body),
        };
        reply.into_response()
    }

    fn handle(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Reply {
        // Route on the path netty-http routes on, not on the raw one.
        let routed = match netty_path(uri.path()) {
            Ok(path) => path,
            Err(reason) => {
                let reason = format!("Caught exception processing request. Reason: {reason}");
                return Reply::text(StatusCode::INTERNAL_SERVER_ERROR, reason);
            }
        };
        let path = routed.as_str();
        if path == "/status" && method == Method::GET {
            return Reply::text(StatusCode::OK, "OK\n");
        }
        // Called by the router, not by clients: no identity headers, and not an applied write.
        if path == BECOME_OWNER_PATH && method == Method::POST {
            return self.become_owner(body);
        }
        let Some((v2, rest)) = split_base(path) else {
            return unmatched(uri);
        };
        let segs: Vec<&str> = rest.split('/').skip(1).collect();
        let cx = Ctx {
            v2,
            method: method.as_str(),
            path,
            headers,
            body,
        };
        let first = segs.first().copied().unwrap_or_default();
        if (listed(AUTHED, first) || listed(ENTITY_TYPES, first)) && !is_provisioner(v2, &segs) {
            if let Err(reply) = cx.authenticate() {
                return reply;
            }
        }
        let mut state = self.state();
        let reply = state.dispatch(&cx, &segs).unwrap_or_else(|| unmatched(uri));
        let Some((cluster, replicate)) = reply.write.clone().filter(|_| reply.status.is_success())
        else {
            return reply;
        };
        let epoch = headers
            .get(EPOCH_HEADER)
            .and_then(|v| v.to_str().ok()?.trim().parse().ok());
        let (dc, method, path) = (self.dc().to_owned(), cx.method.to_owned(), path.to_owned());
        let shard = cluster.and_then(|c| state.shard_of(c));
        if let (Some(shard), Some(epoch)) = (shard, epoch) {
            state.note_epoch(shard, epoch);
        }
        state.applied.push(AppliedWrite {
            dc,
            cluster,
            shard,
            epoch,
            method,
            path,
            at: tokio::time::Instant::now(),
        });
        if let Some(key) = replicate {
            // Written here, so this DC's own from now on, whoever replicated it before.
            state.replicated_from.remove(&key);
            state.seq += 1;
            let (seq, snapshot) = (state.seq, state.store.get(&key).cloned());
            let epoch = shard.and_then(|s| state.epochs.get(&s).copied());
            let incarnation = state.incarnation;
            drop(state);
            let replica = Replica {
                seq,
                key,
                snapshot,
                epoch,
            };
            self.replicate(replica, incarnation);
        }
        reply
    }

    /// The router's become-owner hook: see [`State::take_over`]. Repeats are harmless.
    fn become_owner(&self, body: &Bytes) -> Reply {
        let mut call = match parse_become_owner(body, self.inner.config.increment) {
            Ok(call) => call,
            Err(reply) => return reply,
        };
        let mut state = self.state();
        // Entities are not replicated, so for the global shard there is nothing to cut or restart.
        let (restarted, replicas) = match call.shard {
            Some(shard) => state.take_over(shard, &call),
            None => (Vec::new(), Vec::new()),
        };
        call.restarted = restarted;
        let ids: Vec<String> = call.restarted.iter().copied().map(format_id).collect();
        tracing::info!(dc = self.dc(), ?call, "became owner");
        state.become_owner.push(call);
        let incarnation = state.incarnation;
        drop(state);
        for replica in replicas {
            self.replicate(replica, incarnation);
        }
        Reply::json(json!({ "restarted": ids }))
    }

    /// Ships a record's new state to every peer after the replication delay, unless this DC has
    /// stopped (and perhaps been restored) since: a dead DC's unshipped replicas are lost.
    fn replicate(&self, replica: Replica, incarnation: u64) {
        let peers = self.peers().clone();
        if peers.is_empty() {
            return;
        }
        let origin = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(origin.inner.config.replication_delay).await;
            let alive = {
                let state = origin.state();
                state.serving > 0 && state.incarnation == incarnation
            };
            if !alive {
                let key = &replica.key;
                tracing::debug!(dc = origin.dc(), ?key, "emulator stopped; replica lost");
                return;
            }
            for inner in peers.iter().filter_map(Weak::upgrade) {
                Emulator { inner }.accept_replica(origin.dc(), &replica);
            }
        });
    }

    fn accept_replica(&self, origin: &str, replica: &Replica) {
        let mut state = self.state();
        if state.is_cut(origin, replica) {
            let key = &replica.key;
            tracing::debug!(
                dc = self.dc(),
                origin,
                ?key,
                "replication cut off; replica ignored"
            );
            return;
        }
        let key = &replica.key;
        let last = state
            .replica_seq
            .entry((origin.to_owned(), key.clone()))
            .or_insert(0);
        if *last >= replica.seq {
            return;
        }
        *last = replica.seq;
        match &replica.snapshot {
            Some(record) => {
                state.store.insert(key.clone(), record.clone());
                state.replicated_from.insert(key.clone(), origin.to_owned());
            }
            None => {
                state.store.remove(key);
                state.replicated_from.remove(key);
            }
        }
    }
}

/// Stops a server started by [`Emulator::spawn`].
#[derive(Debug)]
pub struct EmulatorHandle {
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl EmulatorHandle {
    /// Returns once the listener and every connection are closed.
    pub async fn stop(self) {
        // An error only means the server task is already gone, which is what we want.
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "emulator ended with an error"),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Headers = &'static [(&'static str, &'static str)];
    const V1_USER: Headers = &[("X-Loom-UserID", "alice")];
    const V2_USER: Headers = &[("Coopr-UserID", "alice"), ("Coopr-TenantID", "acme")];

    #[test]
    fn loom_routes_on_the_normalised_decoded_path() {
        for (target, routed) in [
            ("/v2/clusters/00000013", "/v2/clusters/00000013"),
            ("/v1//loom/clusters/00000013", "/v1/loom/clusters/00000013"),
            (
                "/x/../v1/loom/clusters/00000013",
                "/v1/loom/clusters/00000013",
            ),
            ("/./v2/clusters/00000013/", "/v2/clusters/00000013"),
            ("/v2/clusters%2F00000013", "/v2/clusters/00000013"),
            ("/v2/%63lusters/00000013", "/v2/clusters/00000013"),
            // Encoded dots are decoded after normalize(): a literal ".." segment.
            ("/v2/x/%2e%2e/clusters", "/v2/x/../clusters"),
            // A leading "//" starts an authority.
            ("//v1/loom/clusters/00000013", "/loom/clusters/00000013"),
            ("/../v2/clusters/1", "/../v2/clusters/1"),
            ("/a/b/..", "/a"),
            ("/", "/"),
        ] {
            assert_eq!(netty_path(target).as_deref(), Ok(routed), "{target}");
        }
        assert!(netty_path("/v2/clusters/%zz").is_err());
        assert!(netty_path("/v2/clusters/%4").is_err());
    }

    fn emulator(dc: &str, id_start: u64) -> Emulator {
        let replication_delay = Duration::from_millis(50);
        Emulator::new(EmulatorConfig {
            dc: dc.to_owned(),
            id_start,
            increment: 10,
            replication_delay,
        })
    }

    #[derive(Debug)]
    struct Answer {
        status: StatusCode,
        content_type: String,
        body: Bytes,
    }

    impl Answer {
        fn text(&self) -> &str {
            std::str::from_utf8(&self.body).expect("utf-8 body")
        }
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("JSON body")
        }
    }

    type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

    async fn connect(addr: SocketAddr) -> (Sender, JoinHandle<hyper::Result<()>>) {
        let stream = TcpStream::connect(addr).await.expect("connect to emulator");
        let handshake = hyper::client::conn::http1::handshake(TokioIo::new(stream));
        let (sender, connection) = handshake.await.expect("handshake");
        (sender, tokio::spawn(connection))
    }

    async fn send_on(
        sender: &mut Sender,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &'static [u8],
    ) -> hyper::Result<Answer> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "emu");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from_static(body)))
            .expect("valid request");
        let (parts, body) = sender.send_request(request).await?.into_parts();
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let content_type = content_type.unwrap_or_default().to_owned();
        let body = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status,
            content_type,
            body,
        })
    }

    async fn send(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &'static [u8],
    ) -> Answer {
        let (mut sender, _) = connect(addr).await;
        send_on(&mut sender, method, path, headers, body)
            .await
            .expect("emulator answers")
    }

    #[tokio::test]
    async fn cluster_ids_follow_start_and_increment() {
        let emulator = emulator("us-east", 2);
        let (addr, handle) = emulator.spawn().await.expect("spawn");
        let body = br#"{"name":"a","clusterTemplate":"hadoop","numMachines":"3"}"#;
        let first = send(addr, "POST", "/v2/clusters", V2_USER, body).await;
        assert_eq!(
            (first.status, first.text()),
            (StatusCode::OK, r#"{"id":"00000002"}"#)
        );
        assert_eq!(first.content_type, "application/json");
        let second = send(addr, "POST", "/v1/loom/clusters", V1_USER, body).await;
        assert_eq!(second.text(), r#"{"id":"00000012"}"#);

        let got = send(addr, "GET", "/v1/loom/clusters/12?x=1", V1_USER, b"")
            .await
            .json();
        assert_eq!(got["latestJobId"], "00000012-001");
        assert_eq!(
            (&got["id"], &got["ownerId"], &got["status"]),
            (&json!("00000012"), &json!("alice"), &json!("pending"))
        );
        let missing = send(addr, "GET", "/v2/clusters/00000013", V2_USER, b"").await;
        assert_eq!(
            (missing.status, missing.text()),
            (StatusCode::NOT_FOUND, "cluster 00000013 not found.")
        );
        let bad = send(addr, "GET", "/v2/clusters/abc", V2_USER, b"").await;
        assert_eq!(bad.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(bad.text().ends_with(r#"For input string: "abc""#));
        let unmatched = send(addr, "GET", "/v2/nowhere?q", V2_USER, b"").await;
        assert_eq!(
            unmatched.text(),
            "Problem accessing: /v2/nowhere?q. Reason: Not Found"
        );

        let lease = send(addr, "POST", "/v2/clusters/2", V2_USER, b"{}").await;
        assert_eq!(
            (lease.status, lease.text()),
            (StatusCode::BAD_REQUEST, "expireTime must be specified.")
        );
        let stamped = [V2_USER[0], V2_USER[1], ("X-Loom-Router-Epoch", "7")];
        let deleted = send(addr, "DELETE", "/v2/clusters/00000002", &stamped, b"").await;
        assert_eq!(deleted.status, StatusCode::OK);
        assert_eq!(
            emulator.cluster(2).expect("cluster 2")["status"],
            "terminated"
        );
        let writes = emulator.applied_writes();
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert_eq!((writes[0].cluster, writes[1].cluster), (Some(2), Some(12)));
        let (dc, method, path) = (
            "us-east".to_owned(),
            "DELETE".to_owned(),
            "/v2/clusters/00000002".to_owned(),
        );
        assert_eq!(
            writes[2],
            AppliedWrite {
                dc,
                cluster: Some(2),
                shard: Some(2),
                epoch: Some(7),
                method,
                path,
                at: writes[2].at,
            }
        );
        handle.stop().await;
    }

    #[tokio::test]
    async fn missing_identity_headers_get_401_text() {
        let (addr, handle) = emulator("us-east", 1).spawn().await.expect("spawn");
        let cases: [(&str, Headers, &str); 3] = [
            (
                "/v1/loom/clusters",
                &[],
                "X-Loom-UserID not found in the request header.",
            ),
            (
                "/v2/clusters",
                &[("Coopr-TenantID", "acme")],
                "Coopr-UserID not found in request headers.",
            ),
            (
                "/v2/providers",
                &[("Coopr-UserID", "alice")],
                "Coopr-TenantID not found in request headers.",
            ),
        ];
        for (path, headers, text) in cases {
            let answer = send(addr, "GET", path, headers, b"").await;
            assert_eq!(
                (answer.status, answer.text()),
                (StatusCode::UNAUTHORIZED, text),
                "{path}"
            );
            assert_eq!(answer.content_type, TEXT_PLAIN);
        }
        let take = send(addr, "POST", "/v2/tasks/take", &[], b"{}").await;
        assert_eq!(take.status, StatusCode::NO_CONTENT);
        let register = send(addr, "PUT", "/v2/provisioners/p1", &[], br#"{"id":"p1"}"#).await;
        assert_eq!(register.status, StatusCode::OK);
        handle.stop().await;
    }

    #[tokio::test]
    async fn status_and_received_record_exact_bytes() {
        let emulator = emulator("us-east", 1);
        let (addr, handle) = emulator.spawn().await.expect("spawn");
        let status = send(addr, "GET", "/status", &[], b"").await;
        assert_eq!((status.status, status.text()), (StatusCode::OK, "OK\n"));
        assert_eq!(status.content_type, TEXT_PLAIN);

        // Valid JSON, but with spacing, CRLF and raw UTF-8 that a re-encoding would lose.
        let body: &'static [u8] = b"{\"name\": \"p\",  \"note\": \"caf\xc3\xa9\" }\r\n";
        send(addr, "POST", "/v2/providers?verbose=1", V2_USER, body).await;
        let listed = send(addr, "GET", "/v2/providers", V2_USER, b"").await;
        assert_eq!(listed.json()[0]["note"], "caf\u{e9}");
        // Reads are recorded as received, never as applied writes.
        assert_eq!(emulator.applied_writes().len(), 1);
        let received = emulator.received();
        assert_eq!(received.len(), 3);
        assert_eq!(received[0].path_and_query, "/status");
        assert_eq!(
            (&received[1].method, received[1].path_and_query.as_str()),
            (&Method::POST, "/v2/providers?verbose=1")
        );
        assert_eq!(
            received[1]
                .headers
                .get("coopr-tenantid")
                .expect("tenant header"),
            "acme"
        );
        assert_eq!(received[1].body.as_ref(), body);
        emulator.clear_received();
        assert!(emulator.received().is_empty());
        handle.stop().await;
    }

    #[tokio::test]
    async fn replication_reaches_peers_only_after_the_delay() {
        let (east, west) = (emulator("us-east", 1), emulator("us-west", 2));
        east.add_peer(west.clone());
        west.add_peer(east.clone());
        let (east_addr, east_handle) = east.spawn().await.expect("spawn east");
        let (west_addr, west_handle) = west.spawn().await.expect("spawn west");

        let created_at = std::time::Instant::now();
        let created = send(
            east_addr,
            "POST",
            "/v2/clusters",
            V2_USER,
            br#"{"name":"c"}"#,
        )
        .await;
        assert_eq!(created.text(), r#"{"id":"00000001"}"#);
        let node = send(
            east_addr,
            "POST",
            "/v2/nodes",
            V2_USER,
            br#"{"id":"n1","clusterId":1}"#,
        )
        .await;
        assert_eq!(node.status, StatusCode::OK);
        let early = send(west_addr, "GET", "/v2/clusters/1", V2_USER, b"").await;
        // Only meaningful while the delay has not passed; a loaded machine may be slower.
        if created_at.elapsed() < Duration::from_millis(50) {
            assert!(west.cluster(1).is_none());
            assert_eq!(early.status, StatusCode::NOT_FOUND);
        }

        tokio::time::sleep(Duration::from_millis(150)).await;
        let late = send(west_addr, "GET", "/v2/clusters/00000001", V2_USER, b"").await;
        assert_eq!(
            (late.status, &late.json()["name"]),
            (StatusCode::OK, &json!("c"))
        );
        let node = send(west_addr, "GET", "/v2/nodes/n1", V2_USER, b"").await;
        assert_eq!(node.json()["clusterId"], "00000001");
        assert!(west.applied_writes().is_empty());
        assert_eq!(west.received().len(), 3);
        // The replica must not bounce back: east saw only its own two writes.
        assert_eq!(east.applied_writes().len(), 2);
        east_handle.stop().await;
        west_handle.stop().await;
    }

    #[tokio::test]
    async fn stop_closes_keep_alive_connections() {
        let (addr, handle) = emulator("us-east", 1).spawn().await.expect("spawn");
        let (mut sender, connection) = connect(addr).await;
        let first = send_on(&mut sender, "GET", "/status", &[], b"")
            .await
            .expect("first answer");
        assert_eq!(first.status, StatusCode::OK);
        handle.stop().await;
        let closed = tokio::time::timeout(Duration::from_secs(2), connection).await;
        assert!(
            closed.is_ok(),
            "stop() must close the kept-alive connection"
        );
        assert!(send_on(&mut sender, "GET", "/status", &[], b"")
            .await
            .is_err());
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the listener must be gone"
        );
    }

    const HOOK: &str = "/replication/become-owner";

    /// us-west holds replicas of shard 1 (from us-east) and shard 3 (from us-central).
    async fn three_dcs() -> ([Emulator; 3], [SocketAddr; 3], Vec<EmulatorHandle>) {
        let dcs = [
            emulator("us-east", 1),
            emulator("us-west", 2),
            emulator("us-central", 3),
        ];
        for dc in &dcs {
            for peer in &dcs {
                dc.add_peer(peer.clone());
            }
        }
        let mut addrs = Vec::new();
        let mut handles = Vec::new();
        for dc in &dcs {
            let (addr, handle) = dc.spawn().await.expect("spawn");
            addrs.push(addr);
            handles.push(handle);
        }
        let addrs: [SocketAddr; 3] = addrs.try_into().expect("three addresses");
        (dcs, addrs, handles)
    }

    fn job(emulator: &Emulator, id: u64) -> Value {
        emulator.cluster(id).expect("cluster")["latestJobId"].clone()
    }

    #[tokio::test]
    async fn become_owner_restarts_the_shards_replicated_jobs_once() {
        let ([east, west, central], [east_addr, west_addr, central_addr], handles) =
            three_dcs().await;
        let body = br#"{"name":"c"}"#;
        send(east_addr, "POST", "/v2/clusters", V2_USER, body).await;
        send(central_addr, "POST", "/v2/clusters", V2_USER, body).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            (job(&west, 1), job(&west, 3)),
            (json!("00000001-001"), json!("00000003-001"))
        );

        let call = br#"{"shard": 1, "epoch": 5, "previous_owner": "us-east"}"#;
        let first = send(west_addr, "POST", HOOK, &[], call).await;
        assert_eq!(
            (first.status, first.json()),
            (StatusCode::OK, json!({"restarted": ["00000001"]}))
        );
        let restarted = west.cluster(1).expect("cluster 1");
        assert_eq!(restarted["latestJobId"], "00000001-002");
        let progress = &restarted["progress"];
        assert_eq!(
            (&progress["action"], &progress["actionstatus"]),
            (&json!("solve_layout"), &json!("running"))
        );
        let note = progress["message"].as_str().expect("a note");
        assert!(
            note.contains("us-east") && note.contains("epoch 5"),
            "{note}"
        );
        // Another shard's replica is untouched.
        assert_eq!(job(&west, 3), "00000003-001");

        let again = send(west_addr, "POST", HOOK, &[], call).await;
        assert_eq!(
            (again.status, again.json()),
            (StatusCode::OK, json!({"restarted": []}))
        );
        assert_eq!(job(&west, 1), "00000001-002");
        let previous_owner = Some("us-east".to_owned());
        let calls = west.become_owner_calls();
        assert_eq!(
            calls,
            [
                BecomeOwner {
                    shard: Some(1),
                    epoch: 5,
                    previous_owner: previous_owner.clone(),
                    restarted: vec![1],
                },
                BecomeOwner {
                    shard: Some(1),
                    epoch: 5,
                    previous_owner,
                    restarted: vec![],
                },
            ]
        );
        // Seen as requests, but the restarts are not client writes.
        assert!(west.applied_writes().is_empty());
        let hooks = west.received();
        assert_eq!(hooks.iter().filter(|r| r.path_and_query == HOOK).count(), 2);

        // The restarted cluster is west's own now: it replicates onward, and takes writes.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(job(&east, 1), "00000001-002");
        assert_eq!(job(&central, 1), "00000001-002");
        let stamped = [V2_USER[0], V2_USER[1], ("X-Loom-Router-Epoch", "5")];
        let abort = send(west_addr, "POST", "/v2/clusters/1/abort", &stamped, b"").await;
        assert_eq!(abort.status, StatusCode::OK);
        let write = &west.applied_writes()[0];
        assert_eq!(
            (write.cluster, write.shard, write.epoch),
            (Some(1), Some(1), Some(5))
        );
        for handle in handles {
            handle.stop().await;
        }
    }

    #[tokio::test]
    async fn become_owner_cuts_replication_from_the_old_owner_until_it_owns_again() {
        let ([_, west, _], [east_addr, west_addr, central_addr], handles) = three_dcs().await;
        let body = br#"{"name":"c"}"#;
        send(east_addr, "POST", "/v2/clusters", V2_USER, body).await;
        send(central_addr, "POST", "/v2/clusters", V2_USER, body).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let call = br#"{"shard": 1, "epoch": 5, "previous_owner": "us-east"}"#;
        assert_eq!(
            send(west_addr, "POST", HOOK, &[], call).await.status,
            StatusCode::OK
        );

        // A late write at the old owner, under an old epoch or none: west must not take it.
        let old = [V2_USER[0], V2_USER[1], ("X-Loom-Router-Epoch", "4")];
        let config = br#"{"config": {"stale": true}}"#;
        send(east_addr, "PUT", "/v2/clusters/1/config", &old, config).await;
        send(east_addr, "POST", "/v2/clusters/1/abort", V2_USER, b"").await;
        let node = br#"{"id": "n1", "clusterId": 1}"#;
        send(east_addr, "POST", "/v2/nodes", V2_USER, node).await;
        send(east_addr, "POST", "/v2/clusters", V2_USER, body).await;
        // Replication of other shards keeps flowing.
        send(central_addr, "POST", "/v2/clusters/3/pause", V2_USER, b"").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let cluster = west.cluster(1).expect("cluster 1");
        assert_eq!(cluster["latestJobId"], "00000001-002");
        assert_eq!(cluster["config"], json!({}));
        let nodes = send(west_addr, "GET", "/v2/nodes/n1", V2_USER, b"").await;
        assert_eq!(nodes.status, StatusCode::NOT_FOUND);
        assert_eq!(job(&west, 3), "00000003-002");
        // East's new cluster 11 is in shard 1 as well.
        assert!(west.cluster(11).is_none());

        // Failback: once east is the owner again at a later epoch, its replicas count again.
        let back = br#"{"shard": 1, "epoch": 6, "previous_owner": "us-west"}"#;
        let answer = send(east_addr, "POST", HOOK, &[], back).await;
        assert_eq!(answer.status, StatusCode::OK);
        let new = [V2_USER[0], V2_USER[1], ("X-Loom-Router-Epoch", "6")];
        send(
            east_addr,
            "PUT",
            "/v2/clusters/1/config",
            &new,
            br#"{"config": {"v": 6}}"#,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            west.cluster(1).expect("cluster 1")["config"],
            json!({"v": 6})
        );
        for handle in handles {
            handle.stop().await;
        }
    }

    #[tokio::test]
    async fn become_owner_rejects_bad_bodies_and_takes_the_global_shard() {
        let emulator = emulator("us-west", 2);
        let (addr, handle) = emulator.spawn().await.expect("spawn");
        let bad: [&'static [u8]; 6] = [
            b"not json",
            br#"[1]"#,
            br#"{"shard": "x", "epoch": 1}"#,
            br#"{"shard": 10, "epoch": 1}"#,
            br#"{"shard": 1}"#,
            br#"{"shard": 1, "epoch": 1, "previous_owner": 7}"#,
        ];
        for body in bad {
            let answer = send(addr, "POST", HOOK, &[], body).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text());
            assert_eq!(answer.content_type, TEXT_PLAIN);
        }
        let global = br#"{"shard": "global", "epoch": 2, "previous_owner": null}"#;
        let answer = send(addr, "POST", HOOK, &[], global).await;
        assert_eq!(
            (answer.status, answer.json()),
            (StatusCode::OK, json!({"restarted": []}))
        );
        let expected = BecomeOwner {
            shard: None,
            epoch: 2,
            previous_owner: None,
            restarted: vec![],
        };
        assert_eq!(emulator.become_owner_calls(), [expected]);
        let get = send(addr, "GET", HOOK, &[], b"").await;
        assert_eq!(get.status, StatusCode::NOT_FOUND);
        handle.stop().await;
    }

    #[tokio::test]
    async fn a_stopped_emulator_serves_again_with_its_data() {
        let (east, west) = (emulator("us-east", 1), emulator("us-west", 2));
        east.add_peer(west.clone());
        let (addr, handle) = east.spawn().await.expect("spawn");
        send(addr, "POST", "/v2/clusters", V2_USER, br#"{"name":"a"}"#).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let written_at = std::time::Instant::now();
        send(addr, "POST", "/v2/clusters", V2_USER, br#"{"name":"b"}"#).await;
        handle.stop().await;
        let stopped_in_time = written_at.elapsed() < Duration::from_millis(50);

        // Restored on the same port, as its router expects.
        let (again, handle) = east.spawn_at(addr).await.expect("serve again");
        assert_eq!(again, addr);
        let got = send(addr, "GET", "/v2/clusters/11", V2_USER, b"").await;
        assert_eq!(
            (got.status, &got.json()["name"]),
            (StatusCode::OK, &json!("b"))
        );
        let next = send(addr, "POST", "/v2/clusters", V2_USER, br#"{"name":"c"}"#).await;
        assert_eq!(next.text(), r#"{"id":"00000021"}"#);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // A dead DC's unshipped replica stays lost; writes after the restore replicate.
        assert!(west.cluster(1).is_some());
        if stopped_in_time {
            assert!(west.cluster(11).is_none());
        }
        assert!(west.cluster(21).is_some());
        handle.stop().await;

        // And once more on a fresh port.
        let (addr, handle) = east.spawn().await.expect("serve a third time");
        let listed = send(addr, "GET", "/v2/clusters", V2_USER, b"").await;
        assert_eq!(listed.json().as_array().map(Vec::len), Some(3));
        handle.stop().await;
    }
}
