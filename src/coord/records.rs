//! Between the routing table and the store's shard records: the records that seed an empty
//! store, and the table a store's view describes (docs/failover.md).
//!
//! Records name DCs by name and carry epochs as store revisions; the table uses the config's DC
//! indices. A record that names a DC this config does not know is left out and logged, rather
//! than guessed at.

use std::time::SystemTime;

use super::{ShardRecord, View};
use crate::config::Config;
use crate::routing::table::{Shard, Table};
use crate::shard::{DcId, ShardKey, ShardState};

/// The records that seed an empty coordination store with the table `config` describes.
pub fn seed_records(config: &Config) -> Vec<(ShardKey, ShardRecord)> {
    let name = |dc: DcId| config.datacenters[dc].name.clone();
    config
        .table()
        .shards()
        .map(|s| {
            let record = ShardRecord {
                owner: name(s.owner),
                home: s.home.map(name),
                replicas: s.replicas.iter().map(|&r| name(r)).collect(),
                state: s.state.as_str().to_owned(),
                frozen: s.frozen,
                previous_owner: None,
                changed_at: humantime::format_rfc3339_seconds(s.changed_at).to_string(),
                changed_by: s.changed_by.clone(),
                reason: s.reason.clone(),
                failed_over_at_ms: None,
                owner_changes: 0,
            };
            (s.key, record)
        })
        .collect()
}

impl View {
    /// The table this view describes. A shard's epoch is its record's `mod_revision`; the table
    /// epoch is the store revision the view reflects.
    pub fn table(&self, config: &Config) -> Table {
        let mut residues = Vec::new();
        let mut global = None;
        for (&key, (record, epoch)) in &self.shards {
            let Some(shard) = shard(config, key, record, *epoch) else {
                continue;
            };
            match key {
                ShardKey::Global => global = Some(shard),
                ShardKey::Residue(_) => residues.push(shard),
            }
        }
        // The store is seeded with the global shard before any router reads it. If its record is
        // missing or unreadable, nobody may write global entities until it is fixed.
        let global = global.unwrap_or_else(|| {
            let mut g = config.table().global;
            g.state = ShardState::Fenced;
            g.reason = "no readable global shard record in the store".to_owned();
            g
        });
        let table_epoch = u64::try_from(self.revision).unwrap_or(0);
        Table::new(table_epoch, config.increment, residues, global)
    }
}

/// One record as a table entry, or `None` if its owner is a DC this config does not know.
fn shard(config: &Config, key: ShardKey, record: &ShardRecord, epoch: i64) -> Option<Shard> {
    let dc = |name: &str| config.dc_by_name(name);
    let Some(owner) = dc(&record.owner) else {
        tracing::warn!(shard = %key, owner = %record.owner, "shard owned by an unknown datacenter ignored");
        return None;
    };
    Some(Shard {
        key,
        home: record.home.as_deref().and_then(dc),
        owner,
        replicas: record.replicas.iter().filter_map(|r| dc(r)).collect(),
        epoch: u64::try_from(epoch).unwrap_or(0),
        // A state this build does not know admits writes, as it always has.
        state: record.state.parse().unwrap_or(ShardState::Active),
        frozen: record.frozen,
        changed_at: humantime::parse_rfc3339(&record.changed_at).unwrap_or(SystemTime::UNIX_EPOCH),
        changed_by: record.changed_by.clone(),
        reason: record.reason.clone(),
    })
}
