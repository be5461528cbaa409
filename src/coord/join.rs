//! A router's side of coordination (memory and etcd backends): join the store, follow it, and
//! run the background tasks that keep ownership safe.
//!
//! [`join`] checks the shared-settings fingerprint, seeds an empty store with the config's table,
//! and starts:
//! - the lease task (`coord/lease.rs`): liveness registration and the self-fencing gate;
//! - the watch (`follow`): a full read, then changes from the next revision, re-reading in full
//!   after any watch error, publishing each [`View`] to the snapshot writer and the manager;
//! - the failover manager campaign (`coord/failover.rs`);
//! - the become-owner hook runner (`coord/hook.rs`), if a hook is configured.
//!
//! This file wires tasks together; the decisions live in the files it names.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::coord::control::StoreLink;
use crate::coord::lease::{Gate, Identity};
use crate::coord::store::Store;
use crate::coord::{failover, hook, lease};
use crate::coord::{Compare, CoordError, Keys, Op, View};
use crate::health::HealthBoard;
use crate::http::forward::Forwarder;
use crate::shard::ShardKey;

/// Why a router could not join its coordination store.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Store(#[from] CoordError),
    #[error(
        "coordination store at {prefix} was set up with different shared settings; every router \
         must agree on ids.increment, each datacenter's id_start and replicas, and global_home.\n  \
         store:  {stored}\n  config: {ours}"
    )]
    Fingerprint {
        prefix: String,
        stored: String,
        ours: String,
    },
}

/// What the rest of the router keeps from joining.
#[derive(Debug)]
pub struct Joined {
    /// For the snapshot writer.
    pub coordination: StoreLink,
    /// The write gate the request path checks.
    pub gate: Arc<Gate>,
    /// For admin operations (switchover, freeze) and `/admin/table`.
    pub handle: Handle,
}

/// Store access for admin operations.
#[derive(Debug, Clone)]
pub struct Handle {
    pub store: Store,
    pub keys: Keys,
    pub views: watch::Receiver<Arc<View>>,
    pub router_id: String,
    pub fingerprint: String,
}

/// The settings every router of one installation must share (docs/failover.md).
pub fn fingerprint(config: &Config) -> String {
    let mut out = format!(
        "increment={} global_home={}",
        config.increment, config.datacenters[config.global_home].name
    );
    for dc in &config.datacenters {
        let replicas: Vec<&str> = dc
            .replicas
            .iter()
            .map(|&r| config.datacenters[r].name.as_str())
            .collect();
        out.push_str(&format!(
            "; {} id_start={} replicas=[{}]",
            dc.name,
            dc.id_start,
            replicas.join(",")
        ));
    }
    out
}

/// A router ID unique within the process and across restarts: `<dc>-<pid>-<n>`.
fn router_id(dc: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{dc}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Join the store and start the background tasks; they stop when `cancel` fires.
pub async fn join(
    config: Arc<Config>,
    store: Store,
    health: Arc<HealthBoard>,
    forwarder: Forwarder,
    cancel: CancellationToken,
) -> Result<Joined, JoinError> {
    let keys = Keys::new(&config.coordination.prefix);
    let ours = claim_fingerprint(&store, &keys, &config).await?;
    seed(&store, &keys, &config).await?;
    let local = config.local_dc();
    let me = Identity {
        dc: local.name.clone(),
        local: config.local,
        router_id: router_id(&local.name),
        router_url: local.router.to_string(),
        started_at: crate::coord::now_rfc3339(),
    };
    let gate = Arc::new(Gate::new());
    let task = lease::LeaseTask {
        store: store.clone(),
        keys: keys.clone(),
        me: me.clone(),
        ttl: config.coordination.lease,
        every: config.coordination.keepalive,
        gate: gate.clone(),
        health,
    };
    tokio::spawn(task.run(cancel.clone()));

    let (views_tx, views) = watch::channel(Arc::new(View::default()));
    tokio::spawn(follow(
        store.clone(),
        keys.clone(),
        views_tx,
        config.coordination.keepalive,
        cancel.clone(),
    ));
    let manager = failover::Manager {
        store: store.clone(),
        keys: keys.clone(),
        me: me.router_id.clone(),
        config: config.clone(),
        gate: gate.clone(),
    };
    tokio::spawn(manager.run(views.clone(), cancel.clone()));

    let (results_tx, hook_results) = mpsc::channel::<(ShardKey, u64)>(64);
    let hooks = config.coordination.become_owner_hook.clone().map(|url| {
        let (jobs_tx, jobs) = mpsc::channel(256);
        let hook = hook::Hook {
            url,
            timeout: config.coordination.hook_timeout,
            forwarder,
        };
        let queue = hook::HookQueue {
            jobs,
            done: results_tx,
        };
        tokio::spawn(hook.run(queue, cancel.clone()));
        jobs_tx
    });

    Ok(Joined {
        coordination: StoreLink {
            store: store.clone(),
            keys: keys.clone(),
            views: views.clone(),
            hooks,
            hook_results,
        },
        gate,
        handle: Handle {
            store,
            keys,
            views,
            router_id: me.router_id,
            fingerprint: ours,
        },
    })
}

/// Claim the installation's fingerprint in the store, or check ours against the one there:
/// every router of one installation must share the settings it names (docs/failover.md).
async fn claim_fingerprint(
    store: &Store,
    keys: &Keys,
    config: &Config,
) -> Result<String, JoinError> {
    let ours = fingerprint(config);
    let claim = store
        .txn(
            vec![Compare::CreateRevision(keys.fingerprint(), 0)],
            vec![Op::Put {
                key: keys.fingerprint(),
                value: ours.clone().into_bytes(),
                lease: 0,
            }],
            Vec::new(),
        )
        .await?;
    if !claim.succeeded {
        let (kvs, _) = store.range(&keys.fingerprint()).await?;
        let stored = kvs
            .iter()
            .find(|kv| kv.key == keys.fingerprint())
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default();
        if stored != ours {
            return Err(JoinError::Fingerprint {
                prefix: config.coordination.prefix.clone(),
                stored,
                ours,
            });
        }
    }
    Ok(ours)
}

/// Seed the shards the store does not have yet, as the config describes them; the first router
/// to start wins each.
async fn seed(store: &Store, keys: &Keys, config: &Config) -> Result<(), JoinError> {
    for (shard, record) in crate::coord::records::seed_records(config) {
        store
            .txn(
                vec![Compare::CreateRevision(keys.shard(shard), 0)],
                vec![Op::Put {
                    key: keys.shard(shard),
                    value: record.to_bytes(),
                    lease: 0,
                }],
                Vec::new(),
            )
            .await?;
    }
    Ok(())
}

/// Keep `views` up to date with the store until `cancel`: read everything, then watch from the
/// next revision. After any error, wait `retry` and start over with a full read
/// (docs/failover.md: a router re-reads the table in full after a watch error).
async fn follow(
    store: Store,
    keys: Keys,
    views: watch::Sender<Arc<View>>,
    retry: Duration,
    cancel: CancellationToken,
) {
    let following = async {
        loop {
            follow_once(&store, &keys, &views).await;
            tokio::time::sleep(retry).await;
        }
    };
    cancel.run_until_cancelled(following).await;
}

/// One round: read the whole table, publish it, then publish every change the watch brings
/// until the watch breaks. A failed read keeps the current table.
async fn follow_once(store: &Store, keys: &Keys, views: &watch::Sender<Arc<View>>) {
    let all = keys.all();
    let mut view = match store.range(&all).await {
        Ok((kvs, revision)) => View::from_range(keys, kvs, revision),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the coordination store; keeping the current table");
            return;
        }
    };
    let _ = views.send(Arc::new(view.clone()));
    let mut stream = match store.watch(&all, view.revision + 1).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the coordination store");
            return;
        }
    };
    while let Some(next) = stream.recv().await {
        match next {
            Ok(batch) => {
                view.apply(keys, batch);
                let _ = views.send(Arc::new(view.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "watch broke; re-reading the table in full");
                return;
            }
        }
    }
}
