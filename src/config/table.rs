//! The ownership table a config describes: the `static` backend's table, and the seed of an
//! empty coordination store (docs/failover.md).
//!
//! Each DC owns its home residue at epoch 1, `[[shards]]` entries override or add shards, and
//! the global shard is owned by `global_home`.

use std::time::SystemTime;

use super::{Config, ShardEntry};
use crate::routing::table::{Shard, Table};
use crate::shard::{DcId, ShardKey, ShardState};

impl Config {
    /// The table this config describes.
    pub fn table(&self) -> Table {
        let now = SystemTime::now();
        let mut residues: Vec<Shard> = self
            .datacenters
            .iter()
            .enumerate()
            .map(|(dc, d)| home_shard(ShardKey::Residue(d.residue), dc, &d.replicas, now, "home"))
            .collect();
        let home = self.global_home;
        let replicas = &self.datacenters[home].replicas;
        let mut global = home_shard(ShardKey::Global, home, replicas, now, "global_home");
        for entry in &self.shards {
            let shard = match entry.key {
                ShardKey::Global => &mut global,
                key => match residues.iter().position(|s| s.key == key) {
                    Some(i) => &mut residues[i],
                    None => {
                        residues.push(unhomed_shard(key, entry.owner, now));
                        residues.last_mut().expect("just pushed")
                    }
                },
            };
            apply(entry, shard);
        }
        let table_epoch = residues
            .iter()
            .map(|s| s.epoch)
            .chain([global.epoch])
            .max()
            .unwrap_or(1);
        Table::new(table_epoch, self.increment, residues, global)
    }
}

/// A shard owned by the DC it is home to, as the config says before `[[shards]]` entries apply.
fn home_shard(key: ShardKey, dc: DcId, replicas: &[DcId], now: SystemTime, reason: &str) -> Shard {
    Shard {
        key,
        home: Some(dc),
        owner: dc,
        replicas: replicas.to_vec(),
        epoch: 1,
        state: ShardState::Active,
        frozen: false,
        changed_at: now,
        changed_by: "config".to_owned(),
        reason: reason.to_owned(),
    }
}

/// A residue no DC's `id_start` lands in, which only a `[[shards]]` entry maps.
fn unhomed_shard(key: ShardKey, owner: DcId, now: SystemTime) -> Shard {
    Shard {
        key,
        home: None,
        owner,
        replicas: Vec::new(),
        epoch: 1,
        state: ShardState::Active,
        frozen: false,
        changed_at: now,
        changed_by: String::new(),
        reason: String::new(),
    }
}

/// A `[[shards]]` entry overrides what the config's DCs imply.
fn apply(entry: &ShardEntry, shard: &mut Shard) {
    shard.owner = entry.owner;
    if let Some(replicas) = &entry.replicas {
        shard.replicas.clone_from(replicas);
    }
    shard.epoch = entry.epoch;
    shard.state = entry.state;
    shard.changed_by = "config".to_owned();
    shard.reason = "[[shards]] entry".to_owned();
}
