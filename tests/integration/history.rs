//! The history checker run over every failover test (issue 3).
//!
//! Inputs: the emulated Looms' logs of applied writes (DC, shard, epoch, time), the memory
//! store's audit trail (which DC owned each shard at each epoch, and when that was committed),
//! every request each Loom received, and the writes the test's clients saw acknowledged.
//! It asserts:
//! 1. at most one DC per (shard, epoch), and that DC is the shard's owner at that epoch;
//! 2. no write at an old owner after a newer epoch of its shard was committed;
//! 3. epochs only grow, per DC and shard, in the order writes were applied;
//! 4. every write acknowledged to a client was applied at the DC that served it;
//! 5. no request crossed more than one router hop.

use std::collections::{BTreeMap, BTreeSet};

use loom_router::shard::ShardKey;
use std::sync::Arc;

use loom_router::coord::{Batch, Event, Keys, ShardRecord};

use crate::support::{send, Cluster, Dc, TestResponse, COOPR};

/// A write a client saw succeed: the DC in `X-Loom-Served-By`, method and path.
#[derive(Debug, Clone)]
pub struct Acked {
    pub served_by: String,
    pub method: String,
    pub path: String,
}

/// Check the whole history of `cluster`, with the memory store's audit trail. Panics with the
/// first violation.
pub fn check(cluster: &Cluster, acked: &[Acked]) {
    let store = cluster
        .store
        .as_ref()
        .expect("history needs the memory backend");
    check_against(cluster, "/loom-router", &store.audit(), acked);
}

/// Check `cluster`'s history against a trail of store changes under `prefix`, each with the time
/// it committed (or, for etcd, was first seen: a little later, which only makes check 2 more
/// lenient by the watch delay).
pub fn check_against(
    cluster: &Cluster,
    prefix: &str,
    trail: &[(tokio::time::Instant, Arc<Batch>)],
    acked: &[Acked],
) {
    let keys = Keys::new(prefix);
    // (shard residue, epoch) -> (owner, commit time, active), from the audit trail.
    let mut owners: BTreeMap<(u64, u64), (String, tokio::time::Instant, bool)> = BTreeMap::new();
    for (at, batch) in trail {
        let at = *at;
        for event in &batch.events {
            if let Event::Put(kv) = event {
                if let (Some(ShardKey::Residue(r)), Some(record)) = (
                    keys.parse_shard(&kv.key),
                    ShardRecord::from_bytes(&kv.value),
                ) {
                    let active = record.state == "active";
                    owners.insert((r, kv.mod_revision as u64), (record.owner, at, active));
                }
            }
        }
    }

    let mut writers: BTreeMap<(u64, u64), BTreeSet<String>> = BTreeMap::new();
    for dc in &cluster.dcs {
        let mut last_epoch: BTreeMap<u64, u64> = BTreeMap::new();
        for w in dc.loom.applied_writes() {
            let Some(shard) = w.shard else { continue };
            // Every write for a shard reaches Loom stamped with the epoch it was admitted under.
            let epoch = w
                .epoch
                .unwrap_or_else(|| panic!("{w:?} reached Loom without X-Loom-Router-Epoch"));
            writers
                .entry((shard, epoch))
                .or_default()
                .insert(w.dc.clone());
            // 1. The writer owned the shard, active, at that epoch.
            let (owner, _, active) = owners
                .get(&(shard, epoch))
                .unwrap_or_else(|| panic!("{w:?}: epoch {epoch} of shard {shard} never existed"));
            assert_eq!(
                owner, &w.dc,
                "{w:?} applied at a DC that did not own shard {shard} at epoch {epoch}"
            );
            assert!(active, "{w:?} applied while shard {shard} was fenced");
            // 2. No newer epoch of the shard was committed before this write was applied.
            let newer = owners
                .range((shard, epoch + 1)..(shard + 1, 0))
                .find(|(_, (o, committed, _))| o != &w.dc && *committed < w.at);
            assert!(
                newer.is_none(),
                "{w:?} applied at an old owner after {newer:?} was committed"
            );
            // 3. Epochs only grow.
            let last = last_epoch.entry(shard).or_insert(0);
            assert!(epoch >= *last, "{w:?}: epoch went back from {last}");
            *last = epoch;
        }
    }
    for ((shard, epoch), dcs) in &writers {
        assert_eq!(
            dcs.len(),
            1,
            "shard {shard} epoch {epoch} written by {dcs:?}"
        );
    }

    // 4. Acknowledged writes were applied where they were served.
    for a in acked {
        let dc = cluster
            .dcs
            .iter()
            .find(|d| d.name == a.served_by)
            .unwrap_or_else(|| panic!("{a:?}: served by an unknown DC"));
        let applied = dc
            .loom
            .applied_writes()
            .iter()
            .any(|w| w.method == a.method && w.path == a.path);
        assert!(
            applied,
            "{a:?} was acknowledged but not applied at {}",
            a.served_by
        );
    }

    // 5. At most one hop.
    for dc in &cluster.dcs {
        for r in dc.loom.received() {
            if let Some(hop) = r.headers.get("x-loom-router-hop") {
                assert_eq!(hop, "1", "{r:?}");
            }
            let routers = r
                .headers
                .get_all("via")
                .iter()
                .flat_map(|v| {
                    v.to_str()
                        .unwrap_or("")
                        .split(',')
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .filter(|entry| entry.contains("loom-router-"))
                .count();
            assert!(
                routers <= 2,
                "{} crossed {routers} routers: {r:?}",
                r.path_and_query
            );
        }
    }
}

/// Send a write through `dc`'s router and remember it if it was acknowledged.
pub async fn write(
    acked: &mut Vec<Acked>,
    dc: &Dc,
    method: &str,
    path: &str,
    body: &[u8],
) -> TestResponse {
    let r = send(method, &dc.url(path), &COOPR, body).await;
    if r.status.is_success() {
        acked.push(Acked {
            served_by: r.header("x-loom-served-by").unwrap().to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
        });
    }
    r
}

/// [`write`], retried while the new owner's become-owner hook is still running (503 `fenced`),
/// for up to 2 s.
pub async fn write_until_admitted(
    acked: &mut Vec<Acked>,
    dc: &Dc,
    method: &str,
    path: &str,
) -> TestResponse {
    let mut r = write(acked, dc, method, path, b"").await;
    for _ in 0..40 {
        if r.header("x-loom-router-error") != Some("fenced") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        r = write(acked, dc, method, path, b"").await;
    }
    r
}

/// Everything committed under a prefix, with when the recorder's watch saw it.
#[cfg(feature = "etcd")]
pub type Trail = Arc<std::sync::Mutex<Vec<(tokio::time::Instant, Arc<Batch>)>>>;

/// Record every change under `prefix` in etcd, from revision 1, through any of `endpoints`.
/// When its watch breaks (a member died), it watches again from the next revision.
#[cfg(feature = "etcd")]
pub async fn record(endpoints: &[String], prefix: &str) -> Trail {
    use loom_router::coord::etcd::EtcdClient;
    use loom_router::coord::store::Store;
    let store = Store::Etcd(EtcdClient::connect(endpoints).await.unwrap());
    let trail = Trail::default();
    let out = trail.clone();
    let prefix = prefix.to_owned();
    tokio::spawn(async move {
        let mut next = 1;
        loop {
            if let Ok(mut watch) = store.watch(&prefix, next).await {
                while let Some(Ok(batch)) = watch.recv().await {
                    next = batch.revision + 1;
                    let mut out = out.lock().unwrap();
                    out.push((tokio::time::Instant::now(), Arc::new(batch)));
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    trail
}

/// [`check_against`] the trail recorded from etcd.
#[cfg(feature = "etcd")]
pub fn check_etcd(cluster: &Cluster, prefix: &str, trail: &Trail, acked: &[Acked]) {
    let trail = trail.lock().unwrap().clone();
    check_against(cluster, prefix, &trail, acked);
}
