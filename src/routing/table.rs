//! The ownership table: which DC owns each shard, at which epoch (docs/routing.md).
//!
//! A [`Table`] is an immutable snapshot. `coord/control.rs` builds the next one to one side and
//! publishes it with a single `ArcSwap::store`; the request path loads it once per request and
//! calls the pure functions here: [`Table::resolve_write`] and [`Table::resolve_create`] for a
//! request this router routes, and [`Table::admit_forwarded`] for a write another router
//! forwarded to it.
//!
//! A table comes from the config (`Config::table`, the `static` backend and the seed of an empty
//! store) or from a coordination store's view (`View::table`); this file builds neither, so that
//! it depends on nothing but the domain types in `shard.rs`.
//!
//! This file must not do I/O, spawn tasks or know about health: whether a peer DC is up is
//! checked by the caller after resolving, because health never moves ownership.

use std::time::SystemTime;

use crate::routing::classify::shard_of;
use crate::shard::{DcId, ShardKey, ShardState};

/// One shard's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub key: ShardKey,
    /// The DC whose `id_start` lands in this residue; `None` for residues only `[[shards]]` maps.
    pub home: Option<DcId>,
    pub owner: DcId,
    /// Failover order.
    pub replicas: Vec<DcId>,
    /// Grows whenever the owner or state changes.
    pub epoch: u64,
    pub state: ShardState,
    /// Automatic failover is off for this shard.
    pub frozen: bool,
    pub changed_at: SystemTime,
    pub changed_by: String,
    pub reason: String,
}

/// An immutable snapshot of shard ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Never lower than any shard's epoch; never goes backwards on a router.
    pub table_epoch: u64,
    /// Loom's `ids.increment.by`.
    pub increment: u64,
    /// Residue shards, sorted by residue. A handful in practice, so a binary search beats a map.
    residues: Vec<Shard>,
    pub global: Shard,
    /// Shards this DC gained whose become-owner hook has not succeeded yet on this router:
    /// writes for them are fenced here (docs/failover.md). Router-local, never stored.
    pub hook_pending: Vec<ShardKey>,
}

/// Where a request goes, as decided from the table alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// This DC's Loom. `epoch` is the shard epoch the write is admitted under (`None` for
    /// requests that name no shard).
    Local { epoch: Option<u64> },
    /// The owning DC's router.
    Peer { dc: DcId, epoch: u64 },
}

/// Which shard a request was resolved against, for headers, logs and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub shard: ShardKey,
    pub target: Target,
}

/// Why a write cannot be routed from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no datacenter owns shard {0}")]
    Unassigned(ShardKey),
    #[error("shard {0} is fenced")]
    Fenced(ShardKey),
}

/// The receiver's verdict on a forwarded write (docs/routing.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Serve it from the local Loom, stamped with this epoch.
    Serve { epoch: u64 },
    /// The sender knows a newer epoch than this table: refresh from the store, then ask again.
    Refresh,
    /// Not ours: answer 421 with this view (`owner: None` when no DC owns the shard here).
    Misdirected { owner: Option<DcId>, epoch: u64 },
    /// Ours, but fenced: 503 `fenced`.
    Fenced,
}

impl Table {
    /// A table of these shards. `residues` may come in any order; the table keeps them sorted.
    pub fn new(table_epoch: u64, increment: u64, mut residues: Vec<Shard>, global: Shard) -> Self {
        residues.sort_by_key(|s| s.key);
        Self {
            table_epoch,
            increment,
            residues,
            global,
            hook_pending: Vec::new(),
        }
    }

    /// Whether writes for `key` wait for this router's become-owner hook.
    fn hook_pending_for(&self, key: ShardKey) -> bool {
        self.hook_pending.contains(&key)
    }

    /// All shards, residues in order, global last (the order of `/admin/table`).
    pub fn shards(&self) -> impl Iterator<Item = &Shard> {
        self.residues.iter().chain(std::iter::once(&self.global))
    }

    /// The shard entry for a key, if any DC owns it.
    pub fn shard(&self, key: ShardKey) -> Option<&Shard> {
        match key {
            ShardKey::Global => Some(&self.global),
            ShardKey::Residue(r) => self
                .residues
                .binary_search_by_key(&r, |s| match s.key {
                    ShardKey::Residue(r) => r,
                    ShardKey::Global => u64::MAX,
                })
                .ok()
                .map(|i| &self.residues[i]),
        }
    }

    /// The shard a cluster ID belongs to.
    pub fn shard_key_of_cluster(&self, cluster: u64) -> ShardKey {
        ShardKey::Residue(shard_of(cluster, self.increment))
    }

    /// The home shard of a DC (where its Loom allocates IDs).
    pub fn home_shard_of(&self, dc: DcId) -> Option<ShardKey> {
        self.residues
            .iter()
            .find(|s| s.home == Some(dc))
            .map(|s| s.key)
    }

    /// Where a write for `key` goes, seen from `local`.
    pub fn resolve_write(&self, local: DcId, key: ShardKey) -> Result<Resolved, ResolveError> {
        let shard = self.shard(key).ok_or(ResolveError::Unassigned(key))?;
        if shard.state == ShardState::Fenced || (shard.owner == local && self.hook_pending_for(key))
        {
            return Err(ResolveError::Fenced(key));
        }
        let target = if shard.owner == local {
            Target::Local {
                epoch: Some(shard.epoch),
            }
        } else {
            Target::Peer {
                dc: shard.owner,
                epoch: shard.epoch,
            }
        };
        Ok(Resolved { shard: key, target })
    }

    /// Where a create goes: this DC's Loom allocates IDs in its home shard, so the create goes to
    /// whoever owns that shard now.
    pub fn resolve_create(&self, local: DcId) -> Result<Resolved, ResolveError> {
        let key = self
            .home_shard_of(local)
            .ok_or(ResolveError::Unassigned(ShardKey::Global))?;
        self.resolve_write(local, key)
    }

    /// The receiver's check on a forwarded write for `key` at the sender's `epoch`. For a
    /// forwarded create, `key` is the origin's home shard, and this DC must also own its own home
    /// shard, or its Loom would allocate an ID in a shard it does not own.
    pub fn admit_forwarded(
        &self,
        local: DcId,
        key: ShardKey,
        epoch: u64,
        create: bool,
    ) -> Admission {
        let Some(shard) = self.shard(key) else {
            // Nobody owns it in our view: tell the sender so (it will give up after retries).
            return Admission::Misdirected {
                owner: None,
                epoch: 0,
            };
        };
        if shard.owner != local {
            if epoch > shard.epoch {
                return Admission::Refresh;
            }
            return Admission::Misdirected {
                owner: Some(shard.owner),
                epoch: shard.epoch,
            };
        }
        if epoch > shard.epoch {
            return Admission::Refresh;
        }
        if shard.state == ShardState::Fenced || self.hook_pending_for(key) {
            return Admission::Fenced;
        }
        if create {
            let own_home = self.home_shard_of(local).and_then(|k| self.shard(k));
            if !own_home.is_some_and(|s| s.owner == local && s.state == ShardState::Active) {
                return Admission::Misdirected {
                    owner: Some(shard.owner),
                    epoch: shard.epoch,
                };
            }
        }
        Admission::Serve { epoch: shard.epoch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(extra: &str) -> Config {
        Config::from_toml(&format!(
            r#"
datacenter = "us-east"
global_home = "us-west"
[loom]
upstream = "http://127.0.0.1:1"
[ids]
increment = 10
[[datacenters]]
name = "us-east"
id_start = 1
router = "http://127.0.0.1:2"
replicas = ["us-west", "eu-central"]
[[datacenters]]
name = "us-west"
id_start = 2
router = "http://127.0.0.1:3"
replicas = ["eu-central"]
[[datacenters]]
name = "eu-central"
id_start = 13
router = "http://127.0.0.1:4"
replicas = ["us-east"]
{extra}
"#
        ))
        .unwrap()
    }

    const EAST: DcId = 0;
    const WEST: DcId = 1;
    const EU: DcId = 2;

    #[test]
    fn each_dc_owns_its_home_residue_at_epoch_one() {
        let t = config("").table();
        let keys: Vec<_> = t.shards().map(|s| s.key).collect();
        assert_eq!(
            keys,
            vec![
                ShardKey::Residue(1),
                ShardKey::Residue(2),
                ShardKey::Residue(3),
                ShardKey::Global
            ]
        );
        assert_eq!(t.shard(ShardKey::Residue(3)).unwrap().owner, EU);
        assert_eq!(t.shard(ShardKey::Residue(3)).unwrap().home, Some(EU));
        assert_eq!(t.global.owner, WEST);
        assert_eq!(t.global.replicas, vec![EU]);
        assert_eq!(t.table_epoch, 1);
    }

    #[test]
    fn shard_math_uses_the_decimal_value_mod_increment() {
        let t = config("").table();
        assert_eq!(t.shard_key_of_cluster(79), ShardKey::Residue(9));
        assert_eq!(t.shard_key_of_cluster(11), ShardKey::Residue(1));
        assert_eq!(
            t.shard_key_of_cluster(9_223_372_036_854_775_807),
            ShardKey::Residue(7)
        );
    }

    #[test]
    fn a_local_shard_resolves_local_with_its_epoch() {
        let t = config("").table();
        assert_eq!(
            t.resolve_write(EAST, ShardKey::Residue(1)),
            Ok(Resolved {
                shard: ShardKey::Residue(1),
                target: Target::Local { epoch: Some(1) }
            })
        );
    }

    #[test]
    fn a_remote_shard_resolves_to_its_owner() {
        let t = config("").table();
        assert_eq!(
            t.resolve_write(EAST, ShardKey::Residue(3)).unwrap().target,
            Target::Peer { dc: EU, epoch: 1 }
        );
        assert_eq!(
            t.resolve_write(EAST, ShardKey::Global).unwrap().target,
            Target::Peer { dc: WEST, epoch: 1 }
        );
    }

    #[test]
    fn unassigned_residues_are_errors_unless_mapped() {
        let t = config("").table();
        assert_eq!(
            t.resolve_write(EAST, ShardKey::Residue(0)),
            Err(ResolveError::Unassigned(ShardKey::Residue(0)))
        );
        let t = config("[[shards]]\nresidue = 0\nowner = \"us-west\"\nepoch = 4").table();
        assert_eq!(
            t.resolve_write(EAST, ShardKey::Residue(0)).unwrap().target,
            Target::Peer { dc: WEST, epoch: 4 }
        );
        assert_eq!(t.shard(ShardKey::Residue(0)).unwrap().home, None);
        assert_eq!(t.table_epoch, 4);
    }

    #[test]
    fn a_fenced_shard_admits_no_writes() {
        let t =
            config("[[shards]]\nresidue = 1\nowner = \"us-east\"\nepoch = 2\nstate = \"fenced\"")
                .table();
        assert_eq!(
            t.resolve_write(EAST, ShardKey::Residue(1)),
            Err(ResolveError::Fenced(ShardKey::Residue(1)))
        );
        assert_eq!(
            t.admit_forwarded(EAST, ShardKey::Residue(1), 2, false),
            Admission::Fenced
        );
    }

    #[test]
    fn creates_go_to_the_owner_of_the_local_home_shard() {
        let t = config("").table();
        assert_eq!(
            t.resolve_create(EAST).unwrap(),
            Resolved {
                shard: ShardKey::Residue(1),
                target: Target::Local { epoch: Some(1) }
            }
        );
        let moved = config("[[shards]]\nresidue = 1\nowner = \"us-west\"\nepoch = 2").table();
        assert_eq!(
            moved.resolve_create(EAST).unwrap().target,
            Target::Peer { dc: WEST, epoch: 2 }
        );
    }

    #[test]
    fn the_receiver_serves_only_shards_it_owns_at_an_epoch_at_least_the_senders() {
        let t = config("").table();
        assert_eq!(
            t.admit_forwarded(EAST, ShardKey::Residue(1), 1, false),
            Admission::Serve { epoch: 1 }
        );
        assert_eq!(
            t.admit_forwarded(EAST, ShardKey::Residue(2), 1, false),
            Admission::Misdirected {
                owner: Some(WEST),
                epoch: 1
            }
        );
        assert_eq!(
            t.admit_forwarded(EAST, ShardKey::Residue(1), 2, false),
            Admission::Refresh
        );
        assert_eq!(
            t.admit_forwarded(EAST, ShardKey::Residue(2), 5, false),
            Admission::Refresh
        );
    }

    #[test]
    fn a_forwarded_create_needs_the_receivers_own_home_shard_too() {
        // us-west owns us-east's home shard but has lost its own.
        let t = config(
            "[[shards]]\nresidue = 1\nowner = \"us-west\"\nepoch = 2\n\
             [[shards]]\nresidue = 2\nowner = \"eu-central\"\nepoch = 2",
        )
        .table();
        assert_eq!(
            t.admit_forwarded(WEST, ShardKey::Residue(1), 2, true),
            Admission::Misdirected {
                owner: Some(WEST),
                epoch: 2
            }
        );
        assert_eq!(
            t.admit_forwarded(WEST, ShardKey::Residue(1), 2, false),
            Admission::Serve { epoch: 2 }
        );
    }
}
