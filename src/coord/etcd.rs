//! The `etcd` coordination backend: the real multi-DC mode (docs/failover.md), on `etcd-client`.
//!
//! It maps the [`Store`](crate::coord::store::Store) interface onto etcd's API one to one: leases
//! with keepalive, transactions with compares (a prefix compare is etcd's `version == 0` over the
//! prefix range), range reads and watch-from-revision. Every call is bounded by a timeout, so a
//! router cut off from etcd sees errors (and lets its fence deadline run out) instead of hanging.
//!
//! Built only with the `etcd` cargo feature: `etcd-client` needs `protoc` at build time. This
//! file knows nothing about shards.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::{mpsc, Mutex};

use crate::coord::{
    Batch, Compare, CoordError, Event, Kv, LeaseId, Op, Revision, TxnOutcome, WatchStream,
};

/// Bound on one etcd call. A keepalive that takes longer is as good as lost.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to etcd. Cheap to clone.
#[derive(Clone)]
pub struct EtcdClient {
    /// Boxed behind an `Arc`: the client is large, and cloning it per call is cheap either way.
    client: Arc<Client>,
    /// One keepalive stream per lease, reused between keepalives.
    keepers: Arc<Mutex<HashMap<LeaseId, (LeaseKeeper, LeaseKeepAliveStream)>>>,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient").finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> CoordError {
    CoordError::Unavailable(e.to_string())
}

/// Run an etcd call with [`CALL_TIMEOUT`].
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, CoordError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result.map_err(unavailable),
        Err(_) => Err(CoordError::Unavailable(format!(
            "etcd did not answer within {CALL_TIMEOUT:?}"
        ))),
    }
}

impl EtcdClient {
    /// Connect to `endpoints` (`http://host:port`).
    pub async fn connect(endpoints: &[String]) -> Result<Self, CoordError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), CALL_TIMEOUT);
        let client = bounded(Client::connect(endpoints, Some(options))).await?;
        Ok(Self {
            client: Arc::new(client),
            keepers: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, CoordError> {
        // etcd leases are whole seconds; round up, never down.
        let secs = i64::try_from(ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX);
        let mut client = (*self.client).clone();
        let granted = bounded(client.lease_grant(secs, None)).await?;
        Ok(granted.id())
    }

    pub async fn keepalive(&self, lease: LeaseId) -> Result<Duration, CoordError> {
        let mut keepers = self.keepers.lock().await;
        let (keeper, stream) = match keepers.entry(lease) {
            Entry::Occupied(pair) => pair.into_mut(),
            Entry::Vacant(slot) => {
                let mut client = (*self.client).clone();
                slot.insert(bounded(client.lease_keep_alive(lease)).await?)
            }
        };
        let round_trip = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match bounded(round_trip).await {
            Ok(Some(response)) if response.ttl() > 0 => Ok(Duration::from_secs(
                u64::try_from(response.ttl()).unwrap_or(0),
            )),
            Ok(Some(_)) => {
                keepers.remove(&lease);
                Err(CoordError::LeaseNotFound(lease))
            }
            Ok(None) | Err(_) => {
                // A broken stream is re-created on the next keepalive.
                keepers.remove(&lease);
                Err(CoordError::Unavailable("keepalive stream broke".to_owned()))
            }
        }
    }

    pub async fn range(&self, prefix: &str) -> Result<(Vec<Kv>, Revision), CoordError> {
        let mut client = (*self.client).clone();
        let response = bounded(client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let kvs = response.kvs().iter().map(kv).collect();
        Ok((kvs, revision))
    }

    pub async fn txn(
        &self,
        compares: &[Compare],
        then: Vec<Op>,
        otherwise: Vec<Op>,
    ) -> Result<TxnOutcome, CoordError> {
        let compares: Vec<EtcdCompare> = compares
            .iter()
            .map(|c| match c {
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
            })
            .collect();
        let txn = Txn::new()
            .when(compares)
            .and_then(then.into_iter().map(op).collect::<Vec<_>>())
            .or_else(otherwise.into_iter().map(op).collect::<Vec<_>>());
        let mut client = (*self.client).clone();
        let response = match tokio::time::timeout(CALL_TIMEOUT, client.txn(txn)).await {
            Ok(Ok(response)) => response,
            Ok(Err(etcd_client::Error::GRpcStatus(status)))
                if status.message().contains("lease not found") =>
            {
                // etcd does not say which lease; the caller knows the one it used.
                return Err(CoordError::LeaseNotFound(0));
            }
            Ok(Err(e)) => return Err(unavailable(e)),
            Err(_) => return Err(unavailable("etcd txn timed out")),
        };
        Ok(TxnOutcome {
            succeeded: response.succeeded(),
            revision: response.header().map_or(0, |h| h.revision()),
        })
    }

    pub async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, CoordError> {
        let mut client = (*self.client).clone();
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = bounded(client.watch(prefix, Some(options))).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            // Keeps the watch's request side alive for as long as we read it.
            let _client = client;
            loop {
                let message = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(unavailable(e))).await;
                        return;
                    }
                };
                if message.compact_revision() > 0 {
                    let _ = tx.send(Err(CoordError::Compacted(from))).await;
                    return;
                }
                if message.canceled() {
                    let reason = message.cancel_reason().to_owned();
                    let _ = tx.send(Err(CoordError::Unavailable(reason))).await;
                    return;
                }
                if message.events().is_empty() {
                    continue;
                }
                // The newest event's revision, not the header's: a catch-up response after a
                // reconnect can carry a header revision ahead of the events it holds, and a
                // table must never claim changes it has not seen.
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
                if tx.send(Ok(Batch { revision, events })).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
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
