//! The `etcd` coordination backend: the real multi-DC mode (docs/failover.md), on `etcd-client`.
//!
//! It maps the [`Store`](crate::coord::store::Store) interface onto etcd's API one to one: leases
//! with keepalive, transactions with compares (a prefix compare is etcd's `version == 0` over the
//! prefix range), range reads and watch-from-revision. Every call is bounded by a timeout, so a
//! router cut off from etcd sees errors (and lets its fence deadline run out) instead of hanging.
//!
//! **Members, not a pool.** It keeps one client per member, and sends each call to one member
//! at a time, the *preferred* one. When a member fails a call (no answer in time, a broken
//! connection, no leader), the preference moves to the next member, and calls that are safe to
//! repeat go there at once: a keepalive, a grant, a read, opening a watch. So a member that has
//! just failed is tried again only after every other member has been tried. A transaction is not
//! repeated on another member: its answer may have been lost after it was applied. The watch
//! lives on one member too, with `require_leader`, so etcd ends it when that member loses its
//! leader, and it ends when a keepalive gives up on its member. etcd-client's own balanced
//! channel would instead keep sending to a dead member until its connection attempts time out,
//! which paused every router's writes during an etcd leader election (issue 12).
//!
//! Built only with the `etcd` cargo feature: `etcd-client` needs `protoc` at build time. This
//! file knows nothing about shards.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, WatchOptions, WatchStream as Stream,
};
use tokio::sync::{mpsc, watch, Mutex};
use tokio::time::Instant;
use tonic::Code;

use crate::coord::{
    Batch, Compare, CoordError, Event, Kv, LeaseId, Op, Renewal, Revision, TxnOutcome, WatchStream,
};

/// Bound on one etcd call at one member, except keepalives, which get the keepalive interval.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to an etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct EtcdClient {
    shared: Arc<Shared>,
}

struct Shared {
    members: Vec<Member>,
    /// The member calls go to first.
    preferred: AtomicUsize,
    /// One keepalive stream per lease, reused between keepalives, and the member it is on.
    keepers: Mutex<HashMap<LeaseId, Keeper>>,
}

/// One etcd member, and a client that talks to it alone.
struct Member {
    endpoint: String,
    client: Client,
    /// The same, with `require_leader`: etcd cancels its watches when this member has no leader.
    watcher: Client,
    /// Bumped each time a call to this member fails; the watch on it ends when it changes.
    failures: watch::Sender<u64>,
}

struct Keeper {
    member: usize,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints: Vec<&str> = self
            .shared
            .members
            .iter()
            .map(|m| m.endpoint.as_str())
            .collect();
        f.debug_struct("EtcdClient")
            .field("endpoints", &endpoints)
            .finish_non_exhaustive()
    }
}

/// What a failed call means for the member that failed it.
enum Failure {
    /// The member answered: the same call would fare no better at another member.
    Answered(CoordError),
    /// The member did not answer usefully (unreachable, too slow, no leader): try another.
    Member(String),
}

impl Failure {
    fn from_error(e: etcd_client::Error) -> Self {
        use etcd_client::Error;
        match e {
            Error::GRpcStatus(status) => match status.code() {
                // Unavailable covers "no leader" and a member that is stopping.
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal
                | Code::Aborted => Self::Member(status.message().to_owned()),
                _ if status.message().contains("lease not found") => {
                    // etcd does not say which lease; the caller knows the one it used.
                    Self::Answered(CoordError::LeaseNotFound(0))
                }
                _ => Self::Answered(CoordError::Unavailable(status.message().to_owned())),
            },
            Error::LeaseKeepAliveError(m) if m.contains("lease not found") => {
                Self::Answered(CoordError::LeaseNotFound(0))
            }
            other => Self::Member(other.to_string()),
        }
    }
}

impl EtcdClient {
    /// A client for the members at `endpoints` (`http://host:port`). Connections are opened by
    /// the first call to each member, so this succeeds while members are down.
    pub async fn connect(endpoints: &[String]) -> Result<Self, CoordError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            // etcd closes connections that ping more often than every 5 s.
            .with_keep_alive(Duration::from_secs(5), CALL_TIMEOUT);
        let mut members = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let client = Client::connect([endpoint], Some(options.clone()))
                .await
                .map_err(|e| CoordError::Unavailable(format!("{endpoint}: {e}")))?;
            let watcher =
                Client::connect([endpoint], Some(options.clone().with_require_leader(true)))
                    .await
                    .map_err(|e| CoordError::Unavailable(format!("{endpoint}: {e}")))?;
            members.push(Member {
                endpoint: endpoint.clone(),
                client,
                watcher,
                failures: watch::Sender::new(0),
            });
        }
        if members.is_empty() {
            return Err(CoordError::Unavailable("no etcd endpoints".to_owned()));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                members,
                preferred: AtomicUsize::new(0),
                keepers: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, CoordError> {
        // etcd leases are whole seconds; round up, never down.
        let secs = i64::try_from(ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX);
        let (_, granted) = self
            .shared
            .each_member(|mut client| async move { client.lease_grant(secs, None).await })
            .await?;
        Ok(granted.id())
    }

    /// One keepalive of `lease`, on the member its stream is on, or on the next members at
    /// once, each given `within`.
    pub async fn keepalive(&self, lease: LeaseId, within: Duration) -> Result<Renewal, CoordError> {
        let shared = &self.shared;
        let mut keepers = shared.keepers.lock().await;
        // The preferred member, where the watch is too, and not the stream's own: a member that
        // failed another call since must not be made the preferred one again by a keepalive it
        // still answers, and a frozen member is noticed by the keepalive, which ends its watch.
        let first = shared.preferred();
        let mut last = String::new();
        for member in shared.from(first) {
            let sent = Instant::now();
            let renewed = tokio::time::timeout(within, renew(shared, &mut keepers, lease, member));
            let failure = match renewed.await {
                Ok(Ok(ttl)) => {
                    shared.prefer(member);
                    return Ok(Renewal { sent, ttl });
                }
                Ok(Err(Failure::Answered(CoordError::LeaseNotFound(_)))) => {
                    keepers.remove(&lease);
                    return Err(CoordError::LeaseNotFound(lease));
                }
                Ok(Err(Failure::Answered(e))) => {
                    keepers.remove(&lease);
                    return Err(e);
                }
                Ok(Err(Failure::Member(e))) => e,
                Err(_) => format!("no keepalive answer within {within:?}"),
            };
            // A broken or stuck stream is opened again, on the next member.
            keepers.remove(&lease);
            last = shared.failed(member, &failure);
        }
        Err(CoordError::Unavailable(last))
    }

    pub async fn range(&self, prefix: &str) -> Result<(Vec<Kv>, Revision), CoordError> {
        let (_, response) = self
            .shared
            .each_member(|mut client| async move {
                client
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await
            })
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let kvs = response.kvs().iter().map(kv).collect();
        Ok((kvs, revision))
    }

    /// One attempt, at the preferred member: a transaction whose answer was lost may have been
    /// applied, so it is not sent again elsewhere. The caller re-reads and decides again.
    pub async fn txn(
        &self,
        compares: &[Compare],
        then: Vec<Op>,
        otherwise: Vec<Op>,
    ) -> Result<TxnOutcome, CoordError> {
        let compares: Vec<EtcdCompare> = compares.iter().map(compare).collect();
        let txn = Txn::new()
            .when(compares)
            .and_then(then.into_iter().map(op).collect::<Vec<_>>())
            .or_else(otherwise.into_iter().map(op).collect::<Vec<_>>());
        let shared = &self.shared;
        let member = shared.preferred();
        let mut client = shared.members[member].client.clone();
        let failure = match tokio::time::timeout(CALL_TIMEOUT, client.txn(txn)).await {
            Ok(Ok(response)) => {
                return Ok(TxnOutcome {
                    succeeded: response.succeeded(),
                    revision: response.header().map_or(0, |h| h.revision()),
                })
            }
            Ok(Err(e)) => match Failure::from_error(e) {
                Failure::Answered(e) => return Err(e),
                Failure::Member(e) => e,
            },
            Err(_) => format!("no answer within {CALL_TIMEOUT:?}"),
        };
        Err(CoordError::Unavailable(shared.failed(member, &failure)))
    }

    /// Changes under `prefix` from `from` on, from one member. The stream ends with an error
    /// when that member loses its leader, its connection breaks, or a keepalive gives up on it.
    pub async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, CoordError> {
        let shared = self.shared.clone();
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        // Subscribed before the watch opens: a call that fails at its member meanwhile still
        // ends it.
        let mut failures: Vec<_> = shared
            .members
            .iter()
            .map(|m| m.failures.subscribe())
            .collect();
        let (member, stream) = self
            .shared
            .each_member_with(
                |m| m.watcher.clone(),
                |mut client| {
                    let options = options.clone();
                    async move { client.watch(prefix, Some(options)).await }
                },
            )
            .await?;
        let (tx, rx) = mpsc::channel(256);
        let failures = failures.swap_remove(member);
        tokio::spawn(async move {
            let end = relay(stream, failures, &tx, from).await;
            if let Err(e) = end {
                if matches!(e, CoordError::Unavailable(_)) {
                    let why = e.to_string();
                    shared.failed(member, &why);
                }
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(rx)
    }
}

impl Shared {
    fn preferred(&self) -> usize {
        self.preferred.load(Ordering::Relaxed) % self.members.len()
    }

    /// Every member once, from `first` on.
    fn from(&self, first: usize) -> impl Iterator<Item = usize> {
        let n = self.members.len();
        (0..n).map(move |k| (first + k) % n)
    }

    fn prefer(&self, member: usize) {
        self.preferred.store(member, Ordering::Relaxed);
    }

    /// `member` failed a call: prefer the next one (unless another call already moved on), and
    /// end the watch on it. Returns the error to report.
    fn failed(&self, member: usize, why: &str) -> String {
        let next = (member + 1) % self.members.len();
        let _ = self
            .preferred
            .compare_exchange(member, next, Ordering::Relaxed, Ordering::Relaxed);
        let failed = &self.members[member];
        failed.failures.send_modify(|n| *n += 1);
        tracing::debug!(member = %failed.endpoint, error = why, "etcd member failed a call; trying the next");
        format!("{}: {why}", failed.endpoint)
    }

    /// Run `call` at the preferred member, then at each next one, until one answers.
    async fn each_member<T, F, Fut>(&self, call: F) -> Result<(usize, T), CoordError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.each_member_with(|m| m.client.clone(), call).await
    }

    async fn each_member_with<T, F, Fut>(
        &self,
        client: impl Fn(&Member) -> Client,
        mut call: F,
    ) -> Result<(usize, T), CoordError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = String::new();
        for member in self.from(self.preferred()) {
            let answer = tokio::time::timeout(CALL_TIMEOUT, call(client(&self.members[member])));
            let failure = match answer.await {
                Ok(Ok(value)) => {
                    self.prefer(member);
                    return Ok((member, value));
                }
                Ok(Err(e)) => match Failure::from_error(e) {
                    Failure::Answered(e) => return Err(e),
                    Failure::Member(e) => e,
                },
                Err(_) => format!("no answer within {CALL_TIMEOUT:?}"),
            };
            last = self.failed(member, &failure);
        }
        Err(CoordError::Unavailable(last))
    }
}

/// One keepalive round trip for `lease` at `member`, opening its stream there if it has none.
async fn renew(
    shared: &Shared,
    keepers: &mut HashMap<LeaseId, Keeper>,
    lease: LeaseId,
    member: usize,
) -> Result<Duration, Failure> {
    if keepers.get(&lease).is_none_or(|k| k.member != member) {
        let mut client = shared.members[member].client.clone();
        let (keeper, stream) = client
            .lease_keep_alive(lease)
            .await
            .map_err(Failure::from_error)?;
        keepers.insert(
            lease,
            Keeper {
                member,
                keeper,
                stream,
            },
        );
    }
    let Some(k) = keepers.get_mut(&lease) else {
        return Err(Failure::Member("keepalive stream lost".to_owned()));
    };
    k.keeper.keep_alive().await.map_err(Failure::from_error)?;
    match k.stream.message().await.map_err(Failure::from_error)? {
        Some(response) if response.ttl() > 0 => Ok(Duration::from_secs(
            u64::try_from(response.ttl()).unwrap_or(0),
        )),
        Some(_) => Err(Failure::Answered(CoordError::LeaseNotFound(lease))),
        None => Err(Failure::Member("keepalive stream ended".to_owned())),
    }
}

/// Relay a watch's batches to `tx` until it breaks, the reader goes away, or its member fails
/// a call. Returns how it ended: `Ok` when the reader is gone.
async fn relay(
    mut stream: Stream,
    mut failures: watch::Receiver<u64>,
    tx: &mpsc::Sender<Result<Batch, CoordError>>,
    from: Revision,
) -> Result<(), CoordError> {
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            _ = failures.changed() => {
                return Err(CoordError::Unavailable("the watch's etcd member failed a call".to_owned()));
            }
        };
        let message = match message {
            Ok(Some(m)) => m,
            Ok(None) => return Err(CoordError::Unavailable("watch ended".to_owned())),
            Err(e) => return Err(CoordError::Unavailable(e.to_string())),
        };
        if message.compact_revision() > 0 {
            return Err(CoordError::Compacted(from));
        }
        if message.canceled() {
            return Err(CoordError::Unavailable(message.cancel_reason().to_owned()));
        }
        if message.events().is_empty() {
            continue;
        }
        if tx.send(Ok(batch(&message))).await.is_err() {
            return Ok(());
        }
    }
}

fn batch(message: &etcd_client::WatchResponse) -> Batch {
    // The newest event's revision, not the header's: a catch-up response after a reconnect can
    // carry a header revision ahead of the events it holds, and a table must never claim
    // changes it has not seen.
    let revision = message
        .events()
        .iter()
        .filter_map(|e| e.kv().map(etcd_client::KeyValue::mod_revision))
        .max()
        .unwrap_or(0);
    let events = message
        .events()
        .iter()
        .filter_map(|e| {
            let kv = e.kv()?;
            Some(match e.event_type() {
                EventType::Put => Event::Put(crate::coord::etcd::kv(kv)),
                EventType::Delete => Event::Delete {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    mod_revision: kv.mod_revision(),
                },
            })
        })
        .collect();
    Batch { revision, events }
}

fn compare(c: &Compare) -> EtcdCompare {
    match c {
        Compare::ModRevision(key, rev) => {
            EtcdCompare::mod_revision(key.as_str(), CompareOp::Equal, *rev)
        }
        Compare::CreateRevision(key, rev) => {
            EtcdCompare::create_revision(key.as_str(), CompareOp::Equal, *rev)
        }
        // Over a range, etcd compares every key; with no key it compares a zero key, so
        // version == 0 holds exactly when nothing is under the prefix.
        Compare::PrefixEmpty(prefix) => {
            EtcdCompare::version(prefix.as_str(), CompareOp::Equal, 0).with_prefix()
        }
        Compare::PrefixNonEmpty(prefix) => {
            EtcdCompare::version(prefix.as_str(), CompareOp::Greater, 0).with_prefix()
        }
    }
}

fn kv(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

fn op(op: Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            TxnOp::put(key, value, options)
        }
        Op::Delete(key) => TxnOp::delete(key, None),
    }
}
