//! The `memory` coordination backend: an in-process store with etcd's semantics, shared by the
//! routers of one process (the demo and the tests).
//!
//! It keeps a revisioned key space, leases that expire on the store's own clock (deleting their
//! keys), atomic transactions with compares, and a bounded history so that a watch can start from
//! an older revision. Each router talks to it through its own [`MemoryClient`], which a test can
//! cut off to play a partition between that router and the store.
//!
//! It must not be used by `run` (the config refuses it) and knows nothing about shards; it stores
//! bytes under keys, as etcd does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::coord::{
    Batch, Compare, CoordError, Event, Kv, LeaseId, Op, Renewal, Revision, TxnOutcome, WatchStream,
};

/// Batches kept for watches that start in the past. Older starts get `Compacted`.
const HISTORY: usize = 4096;
/// How often expired leases are reaped. Expiry is at most this late on the store's side, which
/// only makes the store more conservative than the routers' fence deadlines.
const REAP_EVERY: Duration = Duration::from_millis(20);

/// The shared store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    /// All state, behind one lock: every operation is short and never awaits while holding it.
    state: Arc<Mutex<State>>,
    /// Every committed batch, for watches.
    changes: broadcast::Sender<Arc<Batch>>,
}

#[derive(Debug)]
struct State {
    revision: Revision,
    kv: BTreeMap<String, Kv>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    history: VecDeque<Arc<Batch>>,
    /// Every committed batch with its commit time, unbounded: the audit trail that history
    /// checkers compare the Looms' write logs against. The memory backend serves tests and the
    /// demo only, where it stays small.
    audit: Vec<(Instant, Arc<Batch>)>,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    expires: Instant,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A new empty store. Spawns its lease reaper, which ends when the store is dropped.
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(1024);
        let store = Self {
            state: Arc::new(Mutex::new(State {
                revision: 1,
                kv: BTreeMap::new(),
                leases: HashMap::new(),
                next_lease: 1,
                history: VecDeque::new(),
                audit: Vec::new(),
            })),
            changes,
        };
        let weak = Arc::downgrade(&store.state);
        let changes = store.changes.clone();
        tokio::spawn(reap(weak, changes));
        store
    }

    /// A client for one router.
    pub fn client(&self) -> MemoryClient {
        MemoryClient {
            store: self.clone(),
            cut: Arc::new(AtomicBool::new(false)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("memory store lock poisoned")
    }

    /// The current revision.
    pub fn revision(&self) -> Revision {
        self.lock().revision
    }

    /// Every change since the store was created, with when it committed.
    pub fn audit(&self) -> Vec<(Instant, Arc<Batch>)> {
        self.lock().audit.clone()
    }
}

/// Delete the keys of expired leases, one revision per reap.
async fn reap(state: Weak<Mutex<State>>, changes: broadcast::Sender<Arc<Batch>>) {
    let mut ticker = tokio::time::interval(REAP_EVERY);
    loop {
        ticker.tick().await;
        let Some(state) = state.upgrade() else { return };
        let mut state = state.lock().expect("memory store lock poisoned");
        let now = Instant::now();
        let expired: Vec<LeaseId> = state
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            continue;
        }
        for id in &expired {
            state.leases.remove(id);
        }
        let keys: Vec<String> = state
            .kv
            .values()
            .filter(|kv| expired.contains(&kv.lease))
            .map(|kv| kv.key.clone())
            .collect();
        if !keys.is_empty() {
            let ops = keys.into_iter().map(Op::Delete).collect();
            commit(&mut state, ops, &changes);
        }
    }
}

/// Apply ops as one revision and publish the batch. Returns the new revision.
fn commit(state: &mut State, ops: Vec<Op>, changes: &broadcast::Sender<Arc<Batch>>) -> Revision {
    if ops.is_empty() {
        return state.revision;
    }
    state.revision += 1;
    let revision = state.revision;
    let mut events = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Put { key, value, lease } => {
                let (create_revision, version) = match state.kv.get(&key) {
                    Some(old) => (old.create_revision, old.version + 1),
                    None => (revision, 1),
                };
                let kv = Kv {
                    key: key.clone(),
                    value,
                    create_revision,
                    mod_revision: revision,
                    version,
                    lease,
                };
                state.kv.insert(key, kv.clone());
                events.push(Event::Put(kv));
            }
            Op::Delete(key) => {
                if state.kv.remove(&key).is_some() {
                    events.push(Event::Delete {
                        key,
                        mod_revision: revision,
                    });
                }
            }
        }
    }
    let batch = Arc::new(Batch { revision, events });
    state.audit.push((Instant::now(), batch.clone()));
    state.history.push_back(batch.clone());
    if state.history.len() > HISTORY {
        state.history.pop_front();
    }
    // No receivers is fine: nobody is watching.
    let _ = changes.send(batch);
    revision
}

fn holds(state: &State, compare: &Compare) -> bool {
    match compare {
        Compare::ModRevision(key, rev) => state.kv.get(key).map_or(0, |kv| kv.mod_revision) == *rev,
        Compare::CreateRevision(key, rev) => {
            state.kv.get(key).map_or(0, |kv| kv.create_revision) == *rev
        }
        Compare::PrefixEmpty(prefix) => !prefix_used(state, prefix),
        Compare::PrefixNonEmpty(prefix) => prefix_used(state, prefix),
    }
}

fn prefix_used(state: &State, prefix: &str) -> bool {
    state
        .kv
        .range(prefix.to_owned()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(prefix))
}

/// One router's connection to the [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryClient {
    store: MemoryStore,
    /// Set by tests to cut this router off from the store: every call fails and watches end.
    cut: Arc<AtomicBool>,
}

impl MemoryClient {
    /// Cut this client off from the store (`true`), or reconnect it.
    pub fn set_cut_off(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }

    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    fn check(&self) -> Result<(), CoordError> {
        if self.cut.load(Ordering::SeqCst) {
            Err(CoordError::Unavailable(
                "cut off from the memory store".to_owned(),
            ))
        } else {
            Ok(())
        }
    }

    pub fn grant(&self, ttl: Duration) -> Result<LeaseId, CoordError> {
        self.check()?;
        let mut state = self.store.lock();
        let id = state.next_lease;
        state.next_lease += 1;
        state.leases.insert(
            id,
            Lease {
                ttl,
                expires: Instant::now() + ttl,
            },
        );
        Ok(id)
    }

    pub fn keepalive(&self, lease: LeaseId) -> Result<Renewal, CoordError> {
        self.check()?;
        let mut state = self.store.lock();
        let now = Instant::now();
        match state.leases.get_mut(&lease) {
            Some(l) if l.expires > now => {
                l.expires = now + l.ttl;
                Ok(Renewal {
                    sent: now,
                    ttl: l.ttl,
                })
            }
            _ => Err(CoordError::LeaseNotFound(lease)),
        }
    }

    pub fn range(&self, prefix: &str) -> Result<(Vec<Kv>, Revision), CoordError> {
        self.check()?;
        let state = self.store.lock();
        let kvs = state
            .kv
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok((kvs, state.revision))
    }

    pub fn txn(
        &self,
        compares: &[Compare],
        then: Vec<Op>,
        otherwise: Vec<Op>,
    ) -> Result<TxnOutcome, CoordError> {
        self.check()?;
        let mut state = self.store.lock();
        let succeeded = compares.iter().all(|c| holds(&state, c));
        let ops = if succeeded { then } else { otherwise };
        // A put on a dead lease fails in etcd; refuse it here too.
        for op in &ops {
            if let Op::Put { lease, .. } = op {
                if *lease != 0 && !state.leases.contains_key(lease) {
                    return Err(CoordError::LeaseNotFound(*lease));
                }
            }
        }
        let revision = commit(&mut state, ops, &self.store.changes);
        Ok(TxnOutcome {
            succeeded,
            revision,
        })
    }

    pub fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, CoordError> {
        self.check()?;
        let (tx, rx) = mpsc::channel(256);
        let mut live = {
            let state = self.store.lock();
            let oldest = state
                .history
                .front()
                .map_or(state.revision + 1, |b| b.revision);
            if from < oldest && from <= state.revision {
                return Err(CoordError::Compacted(from));
            }
            // Subscribe under the lock so that no batch falls between history and live.
            let live = self.store.changes.subscribe();
            for batch in state.history.iter().filter(|b| b.revision >= from) {
                if let Some(batch) = filter(batch, prefix) {
                    if tx.try_send(Ok(batch)).is_err() {
                        return Err(CoordError::Unavailable(
                            "watch backlog too large".to_owned(),
                        ));
                    }
                }
            }
            live
        };
        let prefix = prefix.to_owned();
        let cut = self.cut.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::time::timeout(Duration::from_millis(100), live.recv()).await;
                if cut.load(Ordering::SeqCst) {
                    let _ = tx
                        .send(Err(CoordError::Unavailable("cut off".to_owned())))
                        .await;
                    return;
                }
                let batch = match next {
                    Err(_) => {
                        if tx.is_closed() {
                            return;
                        }
                        continue;
                    }
                    Ok(Ok(batch)) => batch,
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                        let _ = tx
                            .send(Err(CoordError::Unavailable("watch fell behind".to_owned())))
                            .await;
                        return;
                    }
                    Ok(Err(broadcast::error::RecvError::Closed)) => return,
                };
                if batch.revision < from {
                    continue;
                }
                if let Some(batch) = filter(&batch, &prefix) {
                    if tx.send(Ok(batch)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// The events of a batch under `prefix`, if any.
fn filter(batch: &Batch, prefix: &str) -> Option<Batch> {
    let events: Vec<Event> = batch
        .events
        .iter()
        .filter(|e| match e {
            Event::Put(kv) => kv.key.starts_with(prefix),
            Event::Delete { key, .. } => key.starts_with(prefix),
        })
        .cloned()
        .collect();
    (!events.is_empty()).then_some(Batch {
        revision: batch.revision,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, lease: LeaseId) -> Op {
        Op::Put {
            key: key.to_owned(),
            value: value.as_bytes().to_vec(),
            lease,
        }
    }

    #[tokio::test]
    async fn a_transaction_applies_only_when_its_compares_hold() {
        let c = MemoryStore::new().client();
        let create = |k: &str| vec![Compare::CreateRevision(k.to_owned(), 0)];
        let t = c
            .txn(&create("/a"), vec![put("/a", "1", 0)], vec![])
            .unwrap();
        assert!(t.succeeded);
        let t2 = c
            .txn(&create("/a"), vec![put("/a", "2", 0)], vec![])
            .unwrap();
        assert!(!t2.succeeded);
        let (kvs, _) = c.range("/a").unwrap();
        assert_eq!(kvs[0].value, b"1");
        assert_eq!(kvs[0].mod_revision, t.revision);
        let stale = vec![Compare::ModRevision("/a".to_owned(), t.revision - 1)];
        assert!(
            !c.txn(&stale, vec![put("/a", "3", 0)], vec![])
                .unwrap()
                .succeeded
        );
        let fresh = vec![Compare::ModRevision("/a".to_owned(), t.revision)];
        assert!(
            c.txn(&fresh, vec![put("/a", "3", 0)], vec![])
                .unwrap()
                .succeeded
        );
    }

    #[tokio::test]
    async fn prefix_empty_sees_any_key_under_the_prefix_only() {
        let c = MemoryStore::new().client();
        let empty = |p: &str| vec![Compare::PrefixEmpty(p.to_owned())];
        assert!(c.txn(&empty("/dcs/a/"), vec![], vec![]).unwrap().succeeded);
        c.txn(&[], vec![put("/dcs/ab/routers/1", "x", 0)], vec![])
            .unwrap();
        assert!(c.txn(&empty("/dcs/a/"), vec![], vec![]).unwrap().succeeded);
        c.txn(&[], vec![put("/dcs/a/routers/1", "x", 0)], vec![])
            .unwrap();
        assert!(!c.txn(&empty("/dcs/a/"), vec![], vec![]).unwrap().succeeded);
    }

    #[tokio::test]
    async fn keys_on_an_expired_lease_are_deleted_and_keepalive_fails() {
        tokio::time::pause();
        let c = MemoryStore::new().client();
        let lease = c.grant(Duration::from_millis(300)).unwrap();
        c.txn(&[], vec![put("/r/1", "x", lease)], vec![]).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(c.keepalive(lease).unwrap().ttl, Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(c.range("/r/").unwrap().0.len(), 1, "kept alive");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(c.range("/r/").unwrap().0.is_empty(), "expired");
        assert!(matches!(
            c.keepalive(lease),
            Err(CoordError::LeaseNotFound(_))
        ));
        assert!(matches!(
            c.txn(&[], vec![put("/r/2", "x", lease)], vec![]),
            Err(CoordError::LeaseNotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_watch_replays_history_then_follows_live_changes() {
        let c = MemoryStore::new().client();
        let first = c
            .txn(&[], vec![put("/s/1", "a", 0)], vec![])
            .unwrap()
            .revision;
        c.txn(&[], vec![put("/other", "b", 0)], vec![]).unwrap();
        let mut w = c.watch("/s/", first).unwrap();
        let b = w.recv().await.unwrap().unwrap();
        assert_eq!(b.revision, first);
        c.txn(&[], vec![Op::Delete("/s/1".to_owned())], vec![])
            .unwrap();
        let b = w.recv().await.unwrap().unwrap();
        assert!(matches!(&b.events[0], Event::Delete { key, .. } if key == "/s/1"));
    }

    #[tokio::test]
    async fn a_cut_off_client_fails_every_call_and_its_watch_ends() {
        let c = MemoryStore::new().client();
        let mut w = c.watch("/", 2).unwrap();
        c.set_cut_off(true);
        assert!(matches!(c.range("/"), Err(CoordError::Unavailable(_))));
        assert!(matches!(
            w.recv().await,
            Some(Err(CoordError::Unavailable(_)))
        ));
        c.set_cut_off(false);
        assert!(c.range("/").is_ok());
    }
}
