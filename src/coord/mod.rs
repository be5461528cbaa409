//! Coordination: who owns each shard, decided in a store by compare-and-swap, and followed by
//! every router (docs/failover.md).
//!
//! - this file: the store interface (etcd's semantics, written once for every backend) and the
//!   store's data model;
//! - `store`: dispatch to the configured backend, `memory` (in-process, for the demo and tests)
//!   or `etcd` (cargo feature `etcd`);
//! - `join`: joining the store at start-up, following it with a watch, starting the tasks below;
//! - `control`: the single writer of the routing snapshot (config + table), for store changes
//!   and config reloads alike;
//! - `lease`: this router's lease, its registration, and the self-fencing write gate;
//! - `failover`: the failover manager, planned moves, freeze;
//! - `hook`: the become-owner hook calls.
//!
//! Nothing here serves client requests or knows the request path: `proxy` reads the snapshot
//! `control` publishes and asks `lease` whether a write may go.
//!
//! # The store interface
//!
//! Ownership lives in a linearizable store that decides by compare-and-swap (`docs/failover.md`).
//! This file defines what the router needs from such a store (leases with keepalive, a transaction
//! with compares, range reads, watch-from-revision, and election), and the store's data model: key
//! layout, the JSON of a shard record, and a [`View`] of everything a router follows. `store`
//! dispatches the interface to the configured backend (`memory`, `etcd`), which implement it on
//! these types; this file names no backend.
//!
//! It must not decide anything: `lease`, `failover` and `control` do, through this
//! interface, so their logic does not depend on which backend is configured.

pub mod control;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod failover;
pub mod hook;
pub mod join;
pub mod lease;
pub mod memory;
pub mod records;
pub mod store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::shard::ShardKey;

/// A store revision: grows by one with every committed change.
pub type Revision = i64;
/// A lease ID; `0` means "no lease".
pub type LeaseId = i64;

/// One key and its metadata, as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: i64,
    pub lease: LeaseId,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals this (0: the key does not exist).
    ModRevision(String, Revision),
    /// The key's `create_revision` equals this (0: the key does not exist).
    CreateRevision(String, Revision),
    /// No key starts with this prefix (etcd: `version == 0` over the prefix range).
    PrefixEmpty(String),
    /// Some key starts with this prefix (etcd: `version > 0` over the prefix range, which an
    /// empty range fails).
    PrefixNonEmpty(String),
}

/// A write in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put a value, attached to a lease (deleted when it expires) unless `lease` is 0.
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete(String),
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every compare held (and the `then` ops ran).
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: Revision,
}

/// An acknowledged keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    /// When the keepalive that the store acknowledged was sent. The store expires the lease no
    /// earlier than `ttl` after this.
    pub sent: tokio::time::Instant,
    /// The TTL the store reset the lease to.
    pub ttl: std::time::Duration,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Kv),
    Delete { key: String, mod_revision: Revision },
}

/// The changes of one revision (or several), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The store revision once these events applied.
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// Why a store call failed. Every failure leaves the caller's current table in place.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("coordination store unavailable: {0}")]
    Unavailable(String),
    #[error("lease {0} is not known to the store (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("revision {0} has been compacted; re-read the prefix")]
    Compacted(Revision),
}

/// A stream of watch batches. It ends (returns `None`) or yields an error when the watch breaks;
/// the caller then re-reads in full and watches again.
pub type WatchStream = tokio::sync::mpsc::Receiver<Result<Batch, CoordError>>;

// === Key layout ===

/// Where one installation's keys live: `<prefix>/shards/<shard>`, `<prefix>/dcs/<dc>/routers/<id>`,
/// `<prefix>/manager`, `<prefix>/fingerprint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// Everything this installation stores.
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn shards(&self) -> String {
        format!("{}/shards/", self.prefix)
    }

    pub fn shard(&self, key: ShardKey) -> String {
        format!("{}/shards/{key}", self.prefix)
    }

    /// The shard a key under [`Keys::shards`] is about.
    pub fn parse_shard(&self, key: &str) -> Option<ShardKey> {
        key.strip_prefix(&self.shards())?.parse().ok()
    }

    /// The registrations of one DC's routers: empty means the DC is not alive.
    pub fn dc_routers(&self, dc: &str) -> String {
        format!("{}/dcs/{dc}/routers/", self.prefix)
    }

    pub fn router(&self, dc: &str, id: &str) -> String {
        format!("{}/dcs/{dc}/routers/{id}", self.prefix)
    }

    /// The DC a registration key belongs to.
    pub fn parse_router_dc<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("/dcs/")?;
        let (dc, rest) = rest.split_once('/')?;
        rest.starts_with("routers/").then_some(dc)
    }

    /// The failover manager's election key.
    pub fn manager(&self) -> String {
        format!("{}/manager", self.prefix)
    }

    /// The settings every router must share (docs/failover.md).
    pub fn fingerprint(&self) -> String {
        format!("{}/fingerprint", self.prefix)
    }
}

/// A shard as stored. Its epoch is the key's `mod_revision`, so every change bumps it and epochs
/// are unique across shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub owner: String,
    /// The DC whose Loom allocates IDs in this residue; `None` for mapped-only residues and the
    /// global shard's history.
    pub home: Option<String>,
    pub replicas: Vec<String>,
    /// `active` or `fenced`.
    pub state: String,
    #[serde(default)]
    pub frozen: bool,
    /// The owner before the last ownership change; the new owner's become-owner hook gets it.
    pub previous_owner: Option<String>,
    /// RFC 3339.
    pub changed_at: String,
    pub changed_by: String,
    pub reason: String,
    /// Unix milliseconds of the last automatic failover, for the per-shard cooldown.
    #[serde(default)]
    pub failed_over_at_ms: Option<u64>,
    /// How many times the owner has changed. A router that sees it grow while it owns the shard
    /// knows the shard left and came back (its become-owner hook must run again), even if it
    /// never saw the table in between.
    #[serde(default)]
    pub owner_changes: u64,
}

impl ShardRecord {
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain strings, options and bools cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// A test record: an active shard homed at and owned by `owner`.
    #[cfg(test)]
    pub(crate) fn home_of(owner: &str, replicas: &[&str]) -> Self {
        Self {
            owner: owner.to_owned(),
            home: Some(owner.to_owned()),
            replicas: replicas.iter().map(|r| (*r).to_owned()).collect(),
            state: "active".to_owned(),
            frozen: false,
            previous_owner: None,
            changed_at: now_rfc3339(),
            changed_by: "config".to_owned(),
            reason: "home".to_owned(),
            failed_over_at_ms: None,
            owner_changes: 0,
        }
    }
}

/// Everything a router knows about the store, kept up to date from a range read and a watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// The store revision this view reflects.
    pub revision: Revision,
    /// Shard records with their `mod_revision` (the shard's epoch).
    pub shards: BTreeMap<ShardKey, (ShardRecord, Revision)>,
    /// Registration key → DC name, for every registered router.
    pub routers: BTreeMap<String, String>,
    /// Registration key → that router's URL, as it registered it.
    pub router_urls: BTreeMap<String, String>,
    /// The failover manager's election key: (holder, `create_revision`).
    pub manager: Option<(String, Revision)>,
    pub fingerprint: Option<String>,
}

impl View {
    /// A view from a full range read of [`Keys::all`].
    pub fn from_range(keys: &Keys, kvs: Vec<Kv>, revision: Revision) -> Self {
        let mut view = Self {
            revision,
            ..Self::default()
        };
        for kv in kvs {
            view.put(keys, kv);
        }
        view
    }

    /// Apply a watch batch.
    pub fn apply(&mut self, keys: &Keys, batch: Batch) {
        for event in batch.events {
            match event {
                Event::Put(kv) => self.put(keys, kv),
                Event::Delete { key, .. } => self.delete(keys, &key),
            }
        }
        self.revision = self.revision.max(batch.revision);
    }

    fn put(&mut self, keys: &Keys, kv: Kv) {
        if let Some(shard) = keys.parse_shard(&kv.key) {
            match ShardRecord::from_bytes(&kv.value) {
                Some(record) => {
                    self.shards.insert(shard, (record, kv.mod_revision));
                }
                None => tracing::warn!(key = %kv.key, "unreadable shard record ignored"),
            }
        } else if let Some(dc) = keys.parse_router_dc(&kv.key) {
            self.routers.insert(kv.key.clone(), dc.to_owned());
            let url = serde_json::from_slice::<serde_json::Value>(&kv.value)
                .ok()
                .and_then(|v| v["url"].as_str().map(str::to_owned));
            if let Some(url) = url {
                self.router_urls.insert(kv.key.clone(), url);
            }
        } else if kv.key == keys.manager() {
            let holder = String::from_utf8_lossy(&kv.value).into_owned();
            self.manager = Some((holder, kv.create_revision));
        } else if kv.key == keys.fingerprint() {
            self.fingerprint = Some(String::from_utf8_lossy(&kv.value).into_owned());
        }
    }

    fn delete(&mut self, keys: &Keys, key: &str) {
        if let Some(shard) = keys.parse_shard(key) {
            self.shards.remove(&shard);
        } else if key == keys.manager() {
            self.manager = None;
        } else {
            self.routers.remove(key);
            self.router_urls.remove(key);
        }
    }

    /// The URLs of a DC's registered routers.
    pub fn router_urls_of(&self, dc: &str) -> Vec<&str> {
        self.routers
            .iter()
            .filter(|(_, d)| *d == dc)
            .filter_map(|(key, _)| self.router_urls.get(key).map(String::as_str))
            .collect()
    }

    /// A DC is alive while any of its routers is registered.
    pub fn alive(&self, dc: &str) -> bool {
        self.routers.values().any(|d| d == dc)
    }
}

/// The current wall-clock time in RFC 3339, for `changed_at`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = Keys::new("/loom-router/prod/");
        assert_eq!(k.shard(ShardKey::Residue(3)), "/loom-router/prod/shards/3");
        assert_eq!(
            k.parse_shard("/loom-router/prod/shards/3"),
            Some(ShardKey::Residue(3))
        );
        assert_eq!(
            k.parse_shard("/loom-router/prod/shards/global"),
            Some(ShardKey::Global)
        );
        assert_eq!(k.parse_shard("/loom-router/prod/shards/x"), None);
        let r = k.router("us-east", "r1");
        assert_eq!(r, "/loom-router/prod/dcs/us-east/routers/r1");
        assert_eq!(k.parse_router_dc(&r), Some("us-east"));
        assert!(r.starts_with(&k.dc_routers("us-east")));
        assert!(!r.starts_with(&k.dc_routers("us")));
    }

    fn kv(key: &str, value: &[u8], create: Revision, rev: Revision) -> Kv {
        Kv {
            key: key.to_owned(),
            value: value.to_vec(),
            create_revision: create,
            mod_revision: rev,
            version: 1,
            lease: 0,
        }
    }

    #[test]
    fn a_view_follows_puts_and_deletes() {
        let k = Keys::new("/p");
        let record = ShardRecord::home_of("a", &["b"]);
        let mut v = View::from_range(
            &k,
            vec![
                kv("/p/shards/1", &record.to_bytes(), 2, 2),
                kv("/p/dcs/a/routers/r1", b"{}", 3, 3),
                kv("/p/manager", b"a-1", 4, 4),
            ],
            4,
        );
        assert_eq!(v.shards[&ShardKey::Residue(1)].1, 2);
        assert!(v.alive("a"));
        assert!(!v.alive("b"));
        assert_eq!(v.manager, Some(("a-1".to_owned(), 4)));
        v.apply(
            &k,
            Batch {
                revision: 9,
                events: vec![
                    Event::Delete {
                        key: "/p/dcs/a/routers/r1".to_owned(),
                        mod_revision: 9,
                    },
                    Event::Delete {
                        key: "/p/manager".to_owned(),
                        mod_revision: 9,
                    },
                ],
            },
        );
        assert!(!v.alive("a"));
        assert_eq!(v.manager, None);
        assert_eq!(v.revision, 9);
    }
}
