//! Moving shards: automatic failover of a dead DC, planned switchover, and freezing.
//!
//! One failover manager is active cluster-wide: the router that holds the election key, created
//! on its own lease. For each shard owned by a DC that has no registered router, it moves
//! ownership to the first live DC in the shard's replicas, with one compare-and-swap that checks
//! the shard is unchanged, the DC is still dead and the manager still leads (docs/failover.md).
//! The swap's new revision is the shard's new epoch. Health checks play no part: liveness is
//! registration under a lease.
//!
//! What to move is decided by the pure [`plan`]; [`Manager`], [`switchover`] and
//! [`set_frozen`] are the store I/O. Routers learn of every move through their watch
//! (`coord/control.rs`); this file never touches a router's table.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::coord::lease::Gate;
use crate::coord::store::Store;
use crate::coord::{now_rfc3339, Compare, CoordError, Keys, Op, Revision, ShardRecord, View};
use crate::http::forward::Forwarder;
use crate::metrics;
use crate::shard::{ShardKey, ShardState};

/// One shard to move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub shard: ShardKey,
    /// The record's `mod_revision` the move was planned against.
    pub seen: Revision,
    pub from: String,
    pub to: String,
}

/// What the manager should do about the current view, and what it cannot fix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub moves: Vec<Move>,
    /// Shards whose owner is down with no live replica: they stay put, and operators are told.
    pub unprotected: Vec<ShardKey>,
}

/// Decide which shards to move. A shard moves when its owner DC is not alive (and `may_fail`
/// says its death is believable), it is active, not frozen, out of its cooldown, and one of its
/// replicas is alive (the first such in order).
pub fn plan(view: &View, now_ms: u64, cooldown: Duration, may_fail: &dyn Fn(&str) -> bool) -> Plan {
    let mut out = Plan::default();
    for (&shard, (record, seen)) in &view.shards {
        if view.alive(&record.owner) || !may_fail(&record.owner) {
            continue;
        }
        let Some(to) = record.replicas.iter().find(|r| view.alive(r)) else {
            out.unprotected.push(shard);
            continue;
        };
        let cooling = record
            .failed_over_at_ms
            .is_some_and(|at| now_ms.saturating_sub(at) < cooldown.as_millis() as u64);
        // A fenced shard moves too: its owner died in the middle of a switchover.
        if record.frozen || cooling {
            continue;
        }
        out.moves.push(Move {
            shard,
            seen: *seen,
            from: record.owner.clone(),
            to: to.clone(),
        });
    }
    out
}

/// Which DCs a router knows the liveness of. A DC that has no registered router is dead only if
/// this router saw it registered before (it was alive and is gone), or has followed the store
/// for a lease TTL, within which every live router registers. Until then its liveness is
/// unknown: a cold start of the whole installation, where no router has registered yet, raises
/// no alert and marks no shard unprotected.
#[derive(Debug)]
pub struct Liveness {
    seen_alive: BTreeSet<String>,
    /// When this router first saw the store.
    since: Option<Instant>,
    /// One lease TTL.
    settle: Duration,
}

impl Liveness {
    pub fn new(settle: Duration) -> Self {
        Self {
            seen_alive: BTreeSet::new(),
            since: None,
            settle,
        }
    }

    /// Take in a view of the store, seen at `now`.
    pub fn observe(&mut self, view: &View, now: Instant) {
        self.since.get_or_insert(now);
        self.seen_alive.extend(view.routers.values().cloned());
    }

    /// Whether this router has seen `dc` registered.
    pub fn seen(&self, dc: &str) -> bool {
        self.seen_alive.contains(dc)
    }

    /// Whether `dc`'s liveness is known at `now`: a missing registration then means it is down.
    pub fn known(&self, dc: &str, now: Instant) -> bool {
        self.seen_alive.contains(dc) || self.settled(now)
    }

    fn settled(&self, now: Instant) -> bool {
        self.since
            .is_some_and(|since| now.saturating_duration_since(since) >= self.settle)
    }

    /// When every DC's liveness becomes known, if that is still ahead.
    pub fn settles_at(&self, now: Instant) -> Option<Instant> {
        let since = self.since?;
        (!self.settled(now)).then(|| since + self.settle)
    }
}

/// Alerts for `/admin/table`, from the view: shards whose owner is down with no live replica,
/// among DCs whose liveness is `known`.
pub fn alerts(view: &View, known: &dyn Fn(&str) -> bool) -> Vec<String> {
    let now = unix_ms();
    plan(view, now, Duration::ZERO, known)
        .unprotected
        .iter()
        .filter_map(|shard| {
            let (record, _) = view.shards.get(shard)?;
            Some(format!(
                "shard {shard}: owner {} is down and no replica ({}) is alive; not failing over",
                record.owner,
                record.replicas.join(", ")
            ))
        })
        .collect()
}

/// The record after moving to `to`: the old owner becomes the last replica, so that a later
/// failback is a move to a replica like any other.
pub fn moved(record: &ShardRecord, to: &str, by: &str, reason: String) -> ShardRecord {
    let mut replicas: Vec<String> = record
        .replicas
        .iter()
        .filter(|r| *r != to)
        .cloned()
        .collect();
    if record.owner != to && !replicas.contains(&record.owner) {
        replicas.push(record.owner.clone());
    }
    ShardRecord {
        owner: to.to_owned(),
        replicas,
        state: ShardState::Active.as_str().to_owned(),
        previous_owner: Some(record.owner.clone()),
        owner_changes: record.owner_changes + 1,
        ..stamped(record, by, reason)
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The failover manager: at most one router of the installation leads it at a time (an
/// election in the store), and the leader fails over the shards of dead DCs.
#[derive(Debug)]
pub struct Manager {
    pub store: Store,
    pub keys: Keys,
    /// This router's ID, its name in the election.
    pub me: String,
    pub config: Arc<Config>,
    /// Campaigns on this router's lease.
    pub gate: Arc<Gate>,
}

impl Manager {
    /// Campaign for the manager role and, while leading, fail over dead DCs. Runs until
    /// `cancel`.
    ///
    /// "No registration" is believed at once for a DC this router has seen registered (it was
    /// alive and is gone), and for any DC once this router has led for a lease TTL: every live
    /// router renews its registration within a TTL, so that also covers a cold start of the
    /// whole installation without failing over DCs that are merely still starting.
    pub async fn run(self, mut views: watch::Receiver<Arc<View>>, cancel: CancellationToken) {
        let tick = self.config.coordination.keepalive;
        let mut leading: Option<(Revision, Instant)> = None;
        let mut liveness = Liveness::new(self.config.coordination.lease);
        loop {
            tokio::select! {
                _ = views.changed() => {}
                () = tokio::time::sleep(tick) => {}
                () = cancel.cancelled() => return,
            }
            let view = views.borrow().clone();
            // A view older than our own election cannot show us as manager yet; wait for newer.
            if leading.is_some_and(|(rev, _)| view.revision < rev) {
                continue;
            }
            let now = Instant::now();
            liveness.observe(&view, now);
            let known = |dc: &str| liveness.known(dc, now);
            let unprotected = plan(&view, unix_ms(), Duration::ZERO, &known).unprotected;
            for shard in view.shards.keys() {
                metrics::set_shard_unprotected(&shard.to_string(), unprotected.contains(shard));
            }
            metrics::set_failover_manager_elected(view.manager.is_some());
            let was_leading = leading.is_some();
            leading = self.lead(leading, &view).await;
            // A router that just won acts from the next view, the first to show its election.
            if let Some((revision, since)) = leading.filter(|_| was_leading) {
                let settled = since.elapsed() >= self.config.coordination.lease;
                let may_fail = |dc: &str| settled || liveness.seen(dc);
                let cooldown = self.config.coordination.failover_cooldown;
                let moves = plan(&view, unix_ms(), cooldown, &may_fail).moves;
                let elected = Elected {
                    store: &self.store,
                    keys: &self.keys,
                    me: &self.me,
                    revision,
                };
                elected.fail_over_all(&view, moves).await;
            }
        }
    }

    /// Whether this router leads after `view`: (election revision, since when), or `None`. A
    /// router that does not lead campaigns when nobody does.
    async fn lead(
        &self,
        leading: Option<(Revision, Instant)>,
        view: &View,
    ) -> Option<(Revision, Instant)> {
        match (&leading, &view.manager) {
            (Some((rev, _)), Some((holder, created))) if *holder == self.me && created == rev => {
                leading
            }
            (Some(_), _) => {
                tracing::warn!(router = %self.me, "lost the failover manager role");
                None
            }
            (None, Some(_)) => None,
            (None, None) => {
                let lease = self.gate.lease()?;
                let won = self
                    .store
                    .campaign(&self.keys.manager(), &self.me, lease)
                    .await;
                if let Ok(Some(revision)) = won {
                    tracing::info!(router = %self.me, "became the failover manager");
                    return Some((revision, Instant::now()));
                }
                None
            }
        }
    }
}

/// The failover manager while it leads: its election's revision guards every move it commits,
/// so a manager that has been replaced commits nothing.
#[derive(Debug, Clone, Copy)]
pub struct Elected<'a> {
    pub store: &'a Store,
    pub keys: &'a Keys,
    /// This router's ID.
    pub me: &'a str,
    /// The `create_revision` of its election key.
    pub revision: Revision,
}

impl Elected<'_> {
    /// Commit the moves that take dead DCs' shards to live replicas, one by one.
    async fn fail_over_all(&self, view: &View, moves: Vec<Move>) {
        for m in moves {
            match self.fail_over(view, &m).await {
                Ok(true) => {
                    metrics::failover();
                    tracing::warn!(shard = %m.shard, from = %m.from, to = %m.to, "failed over");
                }
                Ok(false) => {
                    tracing::info!(shard = %m.shard, "failover compare failed; re-planning")
                }
                Err(e) => tracing::warn!(shard = %m.shard, error = %e, "failover failed"),
            }
        }
    }

    /// One failover compare-and-swap. `Ok(false)` when a compare failed (the shard changed, the
    /// DC came back or this manager was replaced).
    pub async fn fail_over(&self, view: &View, m: &Move) -> Result<bool, CoordError> {
        let keys = self.keys;
        let Some((record, _)) = view.shards.get(&m.shard) else {
            return Ok(false);
        };
        let mut next = moved(
            record,
            &m.to,
            &format!("failover-manager {}", self.me),
            format!("datacenter {} failed: no router registered", m.from),
        );
        next.failed_over_at_ms = Some(unix_ms());
        let compares = vec![
            Compare::ModRevision(keys.shard(m.shard), m.seen),
            Compare::PrefixEmpty(keys.dc_routers(&m.from)),
            Compare::PrefixNonEmpty(keys.dc_routers(&m.to)),
            Compare::CreateRevision(keys.manager(), self.revision),
        ];
        let put = Op::Put {
            key: keys.shard(m.shard),
            value: next.to_bytes(),
            lease: 0,
        };
        Ok(self
            .store
            .txn(compares, vec![put], Vec::new())
            .await?
            .succeeded)
    }
}

/// Why an operator's move or freeze was refused.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("no shard {0}")]
    UnknownShard(String),
    #[error("{0} is not a replica of shard {1}; move it to one of: {2}")]
    NotAReplica(String, ShardKey, String),
    #[error("{0} has no live router; a shard can only move to a live replica")]
    NotAlive(String),
    #[error("shard {0} changed while moving it; read the table and try again")]
    Conflict(ShardKey),
    #[error(
        "switchover of shard {0} aborted: the old owner's routers {1} did not confirm they had \
         drained in time; the shard is active at its old owner again"
    )]
    NotDrained(ShardKey, String),
    #[error(transparent)]
    Store(#[from] CoordError),
}

/// The result of a planned switchover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switchover {
    pub shard: ShardKey,
    pub from: String,
    pub to: String,
    pub epoch: Revision,
    /// From the fence committing to the new owner committing: writes for the shard got 503
    /// `fenced` in between.
    pub write_pause: Duration,
}

/// An operator's planned move of one shard (docs/operations.md).
#[derive(Debug, Clone, Copy)]
pub struct PlannedMove<'a> {
    pub shard: ShardKey,
    pub to: &'a str,
    /// Who asked, as the record's `changed_by` will say.
    pub by: &'a str,
    /// How long a write admitted under the old epoch may still run.
    pub write_timeout: Duration,
}

/// Planned switchover (docs/operations.md): fence the shard, wait until writes in flight under the
/// old epoch have finished (`drain`), then move it.
pub async fn switchover(
    store: &Store,
    keys: &Keys,
    forwarder: &Forwarder,
    view: &View,
    planned: PlannedMove<'_>,
) -> Result<Switchover, OperatorError> {
    let PlannedMove {
        shard,
        to,
        by,
        write_timeout,
    } = planned;
    let (record, seen) = view
        .shards
        .get(&shard)
        .ok_or_else(|| OperatorError::UnknownShard(shard.to_string()))?;
    if record.owner == to {
        return Ok(Switchover {
            shard,
            from: record.owner.clone(),
            to: to.to_owned(),
            epoch: *seen,
            write_pause: Duration::ZERO,
        });
    }
    if !record.replicas.iter().any(|r| r == to) {
        return Err(OperatorError::NotAReplica(
            to.to_owned(),
            shard,
            record.replicas.join(", "),
        ));
    }
    if !view.alive(to) {
        return Err(OperatorError::NotAlive(to.to_owned()));
    }
    let fenced = ShardRecord {
        state: ShardState::Fenced.as_str().to_owned(),
        ..stamped(record, by, format!("switchover to {to}: draining writes"))
    };
    let fence = replace_record(store, keys, shard, *seen, &fenced)
        .await?
        .ok_or(OperatorError::Conflict(shard))?;
    let paused = Instant::now();
    // Ask the routers registered now, not the ones this router last saw.
    let (kvs, revision) = store.range(&keys.dc_routers(&record.owner)).await?;
    let current = View::from_range(keys, kvs, revision);
    let routers = current.router_urls_of(&record.owner);
    let undrained = drain(forwarder, &routers, shard, fence, write_timeout).await;
    if !undrained.is_empty() {
        // Moving now could let a lagging router of the old owner write beside the new one.
        let reason = format!(
            "switchover to {to} aborted: {} did not drain",
            undrained.join(", ")
        );
        replace_record(store, keys, shard, fence, &stamped(record, by, reason)).await?;
        return Err(OperatorError::NotDrained(shard, undrained.join(", ")));
    }
    let next = moved(
        record,
        to,
        by,
        format!("planned switchover from {}", record.owner),
    );
    let epoch = replace_record(store, keys, shard, fence, &next)
        .await?
        .ok_or(OperatorError::Conflict(shard))?;
    Ok(Switchover {
        shard,
        from: record.owner.clone(),
        to: to.to_owned(),
        epoch,
        write_pause: paused.elapsed(),
    })
}

/// Wait until writes admitted under the old epoch are over: every registered router of the old
/// owner says (at `/loom-router/drained`) that it has seen the fence at `epoch` and has no write
/// for the shard at its Loom. Returns the routers that did not say so within `write_timeout`
/// plus the margin. With no registered router there is nothing to wait for: an unregistered
/// router admits no owned write (its gate needs the registration).
async fn drain(
    forwarder: &Forwarder,
    routers: &[&str],
    shard: ShardKey,
    epoch: Revision,
    write_timeout: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + write_timeout + crate::routing::fence::MARGIN;
    let query = format!(
        "{}?shard={shard}&epoch={epoch}",
        crate::routing::classify::DRAINED_PATH
    );
    let mut pending: Vec<&str> = routers.to_vec();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for url in pending {
            let uri = format!("{}{query}", url.trim_end_matches('/'));
            let drained = match uri.parse::<http::Uri>() {
                Ok(uri) => {
                    let mut request = http::Request::new(crate::http::body::Body::empty());
                    *request.uri_mut() = uri;
                    let left = deadline.saturating_duration_since(Instant::now());
                    matches!(
                        forwarder.send(request, left).await,
                        Ok(response) if response.status().is_success()
                    )
                }
                Err(_) => false,
            };
            if !drained {
                still.push(url);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    pending.into_iter().map(str::to_owned).collect()
}

/// Turn automatic failover off (`frozen = true`) or on for a shard. A frozen owner still admits
/// writes. Returns the new epoch.
pub async fn set_frozen(
    store: &Store,
    keys: &Keys,
    view: &View,
    change: Freeze<'_>,
) -> Result<Revision, OperatorError> {
    let Freeze { shard, frozen, by } = change;
    let (record, seen) = view
        .shards
        .get(&shard)
        .ok_or_else(|| OperatorError::UnknownShard(shard.to_string()))?;
    if record.frozen == frozen {
        return Ok(*seen);
    }
    let reason = if frozen {
        "frozen by operator"
    } else {
        "unfrozen by operator"
    };
    let next = ShardRecord {
        frozen,
        ..stamped(record, by, reason.to_owned())
    };
    replace_record(store, keys, shard, *seen, &next)
        .await?
        .ok_or(OperatorError::Conflict(shard))
}

/// An operator's freeze or unfreeze of one shard.
#[derive(Debug, Clone, Copy)]
pub struct Freeze<'a> {
    pub shard: ShardKey,
    /// `true` turns automatic failover off for the shard.
    pub frozen: bool,
    /// Who asked, as the record's `changed_by` will say.
    pub by: &'a str,
}

/// `record` with its last change stamped: now, by whom, why.
fn stamped(record: &ShardRecord, by: &str, reason: String) -> ShardRecord {
    ShardRecord {
        changed_at: now_rfc3339(),
        changed_by: by.to_owned(),
        reason,
        ..record.clone()
    }
}

/// Replace a shard's record if it is still at revision `seen`. Returns the new revision (the
/// shard's new epoch), or `None` if the record changed meanwhile.
async fn replace_record(
    store: &Store,
    keys: &Keys,
    shard: ShardKey,
    seen: Revision,
    record: &ShardRecord,
) -> Result<Option<Revision>, CoordError> {
    let key = keys.shard(shard);
    let put = Op::Put {
        key: key.clone(),
        value: record.to_bytes(),
        lease: 0,
    };
    let outcome = store
        .txn(vec![Compare::ModRevision(key, seen)], vec![put], Vec::new())
        .await?;
    Ok(outcome.succeeded.then_some(outcome.revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elected<'a>(
        store: &'a Store,
        keys: &'a Keys,
        me: &'a str,
        revision: Revision,
    ) -> Elected<'a> {
        Elected {
            store,
            keys,
            me,
            revision,
        }
    }

    fn record(owner: &str, replicas: &[&str]) -> ShardRecord {
        ShardRecord::home_of(owner, replicas)
    }

    fn view(shards: Vec<(ShardKey, ShardRecord)>, alive: &[&str]) -> View {
        View {
            revision: 100,
            shards: shards
                .into_iter()
                .enumerate()
                .map(|(i, (k, r))| (k, (r, 10 + i as i64)))
                .collect(),
            routers: alive
                .iter()
                .map(|dc| (format!("/p/dcs/{dc}/routers/r"), (*dc).to_owned()))
                .collect(),
            ..View::default()
        }
    }

    const R1: ShardKey = ShardKey::Residue(1);
    const COOL: Duration = Duration::from_secs(300);

    #[test]
    fn a_shard_of_a_live_dc_stays() {
        let v = view(vec![(R1, record("a", &["b"]))], &["a", "b"]);
        assert_eq!(plan(&v, 0, COOL, &|_| true), Plan::default());
    }

    #[test]
    fn a_dead_owners_shard_moves_to_its_first_live_replica() {
        let v = view(vec![(R1, record("a", &["b", "c"]))], &["c"]);
        let p = plan(&v, 0, COOL, &|_| true);
        assert_eq!(
            p.moves,
            vec![Move {
                shard: R1,
                seen: 10,
                from: "a".to_owned(),
                to: "c".to_owned()
            }]
        );
    }

    #[test]
    fn with_no_live_replica_the_shard_stays_and_is_unprotected() {
        let v = view(vec![(R1, record("a", &["b"]))], &["c"]);
        let p = plan(&v, 0, COOL, &|_| true);
        assert!(p.moves.is_empty());
        assert_eq!(p.unprotected, vec![R1]);
        assert_eq!(alerts(&v, &|_| true).len(), 1);
        assert!(alerts(&v, &|_| true)[0].starts_with("shard 1: owner a is down"));
        // Nothing is said about a DC whose liveness is not known yet.
        assert!(alerts(&v, &|dc| dc != "a").is_empty());
    }

    #[test]
    fn liveness_is_unknown_until_seen_or_a_lease_has_passed() {
        let start = Instant::now();
        let lease = Duration::from_secs(5);
        let mut live = Liveness::new(lease);
        assert!(!live.known("a", start), "nothing seen yet");
        assert_eq!(live.settles_at(start), None, "not following the store yet");
        // A cold start: nobody has registered.
        live.observe(&view(vec![], &[]), start);
        assert!(!live.known("a", start + Duration::from_secs(4)));
        assert_eq!(live.settles_at(start), Some(start + lease));
        // `b` registers: its death is believed from now on; `a` is still unknown.
        live.observe(&view(vec![], &["b"]), start + Duration::from_secs(1));
        assert!(live.known("b", start + Duration::from_secs(1)));
        assert!(live.seen("b") && !live.seen("a"));
        assert!(!live.known("a", start + Duration::from_secs(4)));
        // A lease after the first view, every live router has registered: `a` is down.
        assert!(live.known("a", start + lease));
        assert_eq!(live.settles_at(start + lease), None);
    }

    #[test]
    fn frozen_and_cooling_shards_do_not_move() {
        let mut frozen = record("a", &["b"]);
        frozen.frozen = true;
        let mut cooling = record("a", &["b"]);
        cooling.failed_over_at_ms = Some(1_000);
        for r in [frozen, cooling] {
            let v = view(vec![(R1, r)], &["b"]);
            assert!(plan(&v, 100_000, COOL, &|_| true).moves.is_empty());
        }
        // Once the cooldown has passed, it moves.
        let mut cooled = record("a", &["b"]);
        cooled.failed_over_at_ms = Some(1_000);
        let v = view(vec![(R1, cooled)], &["b"]);
        assert_eq!(plan(&v, 1_000 + 300_000, COOL, &|_| true).moves.len(), 1);
    }

    #[test]
    fn a_shard_fenced_for_a_switchover_moves_if_its_owner_dies() {
        let mut fenced = record("a", &["b"]);
        fenced.state = "fenced".to_owned();
        let v = view(vec![(R1, fenced)], &["b"]);
        assert_eq!(plan(&v, 0, COOL, &|_| true).moves.len(), 1);
    }

    #[test]
    fn a_dc_not_yet_believed_dead_keeps_its_shards() {
        let v = view(vec![(R1, record("a", &["b"]))], &["b"]);
        assert!(plan(&v, 0, COOL, &|dc| dc != "a").moves.is_empty());
        assert_eq!(plan(&v, 0, COOL, &|_| true).moves.len(), 1);
    }

    /// The failover compare-and-swap refuses to act on a stale picture: a shard that changed, a
    /// DC that came back, a manager that was replaced (it died mid-failover and another took
    /// over).
    #[tokio::test]
    async fn the_failover_swap_checks_shard_liveness_and_leadership() {
        use crate::coord::memory::MemoryStore;
        let store = Store::Memory(MemoryStore::new().client());
        let keys = Keys::new("/p");
        let put = |key: String, value: Vec<u8>| Op::Put {
            key,
            value,
            lease: 0,
        };
        let shard = store
            .txn(
                vec![],
                vec![put(keys.shard(R1), record("a", &["b"]).to_bytes())],
                vec![],
            )
            .await
            .unwrap()
            .revision;
        let manager = store
            .txn(vec![], vec![put(keys.manager(), b"m1".to_vec())], vec![])
            .await
            .unwrap()
            .revision;
        // The target, b, is alive.
        store
            .txn(
                vec![],
                vec![put(keys.router("b", "r2"), b"{}".to_vec())],
                vec![],
            )
            .await
            .unwrap();
        let view = || async {
            let (kvs, rev) = store.range(&keys.all()).await.unwrap();
            View::from_range(&keys, kvs, rev)
        };
        let m = Move {
            shard: R1,
            seen: shard,
            from: "a".to_owned(),
            to: "b".to_owned(),
        };
        // The DC is back: no move.
        let back = store
            .txn(
                vec![],
                vec![put(keys.router("a", "r1"), b"{}".to_vec())],
                vec![],
            )
            .await
            .unwrap();
        assert!(back.succeeded);
        assert!(!elected(&store, &keys, "m1", manager)
            .fail_over(&view().await, &m)
            .await
            .unwrap());
        store
            .txn(vec![], vec![Op::Delete(keys.router("a", "r1"))], vec![])
            .await
            .unwrap();
        // A new manager was elected meanwhile: the old one's swap fails.
        store
            .txn(vec![], vec![Op::Delete(keys.manager())], vec![])
            .await
            .unwrap();
        let new_manager = store
            .txn(vec![], vec![put(keys.manager(), b"m2".to_vec())], vec![])
            .await
            .unwrap()
            .revision;
        assert!(!elected(&store, &keys, "m1", manager)
            .fail_over(&view().await, &m)
            .await
            .unwrap());
        // The current manager's swap succeeds once, and bumps the epoch.
        assert!(elected(&store, &keys, "m2", new_manager)
            .fail_over(&view().await, &m)
            .await
            .unwrap());
        let after = view().await;
        let (record, epoch) = &after.shards[&R1];
        assert_eq!(record.owner, "b");
        assert!(*epoch > shard);
        // Replaying the same move (planned against the old revision) does nothing.
        assert!(!elected(&store, &keys, "m2", new_manager)
            .fail_over(&after, &m)
            .await
            .unwrap());
    }

    #[test]
    fn a_moved_record_keeps_the_old_owner_as_last_replica() {
        let r = record("a", &["b", "c"]);
        let m = moved(&r, "b", "test", "why".to_owned());
        assert_eq!(m.owner, "b");
        assert_eq!(m.owner_changes, 1);
        assert_eq!(m.replicas, vec!["c".to_owned(), "a".to_owned()]);
        assert_eq!(m.previous_owner, Some("a".to_owned()));
        assert_eq!(m.home, Some("a".to_owned()));
    }
}
