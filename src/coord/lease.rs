//! Liveness and self-fencing: this router's lease, its registration, and the write gate.
//!
//! Each router holds a lease in the coordination store and, while its local Loom is healthy,
//! registers itself under its DC on that lease. When the Loom turns unhealthy the router stops
//! admitting owned writes at once, and withdraws its registration once the Loom has been
//! unhealthy for a whole lease. A DC is alive while any of its routers is
//! registered (docs/failover.md). The [`Gate`] is what keeps two DCs from writing one shard: a
//! router admits a write for a shard it owns only while
//! - it is registered (a withdrawn router may already have lost its shards), and its table is at
//!   least as new as its registration (so any failover before it came back is visible), and
//! - its lease is certain to outlast the write: measured from the *send* time of the last
//!   acknowledged keepalive, less clock drift and a margin, minus `write_timeout`.
//!
//! The store expires a lease no earlier than `ttl` after it acknowledged the keepalive, which is
//! after it was sent; so a router fences itself before any other DC can take its shards. The
//! arithmetic is pure (`routing/fence.rs`, [`Gate::admits`]) and tested with a clock we control;
//! [`LeaseTask`] is the task that feeds it. This file does not decide ownership.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::coord::store::Store;
use crate::coord::{CoordError, Keys, LeaseId, Op, Revision};
use crate::health::{HealthBoard, Status};
use crate::metrics;
use crate::routing::fence::fence_deadline;
use crate::shard::DcId;

/// The write gate. Written by the lease task; read by the request path on every owned write.
#[derive(Debug)]
pub struct Gate {
    /// Reference point for the deadline, so it fits an atomic.
    base: Instant,
    /// Fence deadline as nanoseconds after `base`; 0 means closed.
    deadline_nanos: AtomicU64,
    /// Store revision of this router's registration; 0 while not registered.
    registered_at: AtomicI64,
    /// The current lease, for the failover manager's election; 0 while none.
    lease: AtomicI64,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
            deadline_nanos: AtomicU64::new(0),
            registered_at: AtomicI64::new(0),
            lease: AtomicI64::new(0),
        }
    }

    /// Whether a write that may run for `write_timeout` from `now` can be admitted with a table
    /// at `table_epoch`.
    pub fn admits(&self, now: Instant, write_timeout: Duration, table_epoch: u64) -> bool {
        let registered_at = self.registered_at.load(Ordering::SeqCst);
        if registered_at <= 0 || (table_epoch as i64) < registered_at {
            return false;
        }
        match self.deadline() {
            Some(deadline) => now + write_timeout <= deadline,
            None => false,
        }
    }

    /// The current fence deadline, if the gate is open at all.
    pub fn deadline(&self) -> Option<Instant> {
        match self.deadline_nanos.load(Ordering::SeqCst) {
            0 => None,
            n => Some(self.base + Duration::from_nanos(n)),
        }
    }

    /// Seconds of lease certainly left, for `loom_router_lease_remaining_seconds`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.deadline()
            .map_or(Duration::ZERO, |d| d.saturating_duration_since(now))
    }

    /// Move the deadline after an acknowledged keepalive. It only ever moves forward for one
    /// lease, since a later send time gives a later deadline.
    pub fn extend(&self, deadline: Instant) {
        let nanos = deadline
            .saturating_duration_since(self.base)
            .as_nanos()
            .max(1);
        self.deadline_nanos
            .fetch_max(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Close the gate: the lease is gone or about to be replaced.
    pub fn close(&self) {
        self.registered_at.store(0, Ordering::SeqCst);
        self.deadline_nanos.store(0, Ordering::SeqCst);
        self.lease.store(0, Ordering::SeqCst);
    }

    pub fn set_registered(&self, at: Option<Revision>) {
        self.registered_at.store(at.unwrap_or(0), Ordering::SeqCst);
    }

    pub fn registered_at(&self) -> Option<Revision> {
        match self.registered_at.load(Ordering::SeqCst) {
            0 => None,
            r => Some(r),
        }
    }

    pub fn lease(&self) -> Option<LeaseId> {
        match self.lease.load(Ordering::SeqCst) {
            0 => None,
            l => Some(l),
        }
    }

    fn set_lease(&self, lease: LeaseId) {
        self.lease.store(lease, Ordering::SeqCst);
    }
}

/// What the lease task needs to know about this router.
#[derive(Debug, Clone)]
pub struct Identity {
    pub dc: String,
    pub local: DcId,
    /// Unique per router process: `<dc>-<pid>-<n>`.
    pub router_id: String,
    pub router_url: String,
    /// When this router started, as its registration says.
    pub started_at: String,
}

/// This router's lease task: the lease it keeps, and the registration on it while the local
/// Loom is healthy.
#[derive(Debug)]
pub struct LeaseTask {
    pub store: Store,
    pub keys: Keys,
    pub me: Identity,
    /// The lease's TTL (`coordination.lease`).
    pub ttl: Duration,
    /// How often it is kept alive (`coordination.keepalive`).
    pub every: Duration,
    pub gate: Arc<Gate>,
    pub health: Arc<HealthBoard>,
}

/// This router's registration on its current lease.
#[derive(Debug, Default)]
struct Registration {
    /// The registration key's revision while it exists (it dies with the lease).
    revision: Option<Revision>,
    /// When the local Loom turned unhealthy while registered.
    unhealthy_since: Option<Instant>,
}

/// The store no longer has this lease: start over with a new one.
struct LeaseLost;

impl LeaseTask {
    /// Keep a lease, and a registration on it while the local Loom is healthy, until `cancel`.
    /// Never revokes the lease on the way out: a restart quicker than the lease keeps the DC's
    /// shards (docs/operations.md).
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            self.gate.close();
            let grant = self.store.grant(self.ttl);
            let Some(granted) = cancel.run_until_cancelled(grant).await else {
                return;
            };
            let lease = match granted {
                Ok(lease) => lease,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot get a lease; writes for owned shards are fenced");
                    let pause = tokio::time::sleep(self.every);
                    if cancel.run_until_cancelled(pause).await.is_none() {
                        return;
                    }
                    continue;
                }
            };
            self.gate.set_lease(lease);
            if cancel.run_until_cancelled(self.hold(lease)).await.is_none() {
                return;
            }
        }
    }

    /// Keep `lease` alive every `every`, and the registration in step with the local Loom's
    /// health, until the store loses the lease.
    async fn hold(&self, lease: LeaseId) -> LeaseLost {
        let mut registration = Registration::default();
        let mut ticker = tokio::time::interval(self.every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let keepalive = tokio::select! {
                _ = ticker.tick() => true,
                // Register or withdraw as soon as the local Loom changes state.
                () = self.health.changed() => false,
            };
            if keepalive {
                if let Err(lost) = self.keepalive(lease).await {
                    return lost;
                }
            }
            metrics::set_lease_remaining(self.gate.remaining(Instant::now()));
            if let Err(lost) = self.follow_health(lease, &mut registration).await {
                return lost;
            }
        }
    }

    /// One keepalive: the gate's deadline moves to what the store granted, measured from when
    /// the acknowledged keepalive was sent. A failure that is not a lost lease lets the deadline
    /// run out; writes are fenced when it does. Each etcd member gets one keepalive interval to
    /// answer before the next is tried, so a dead member costs at most one interval.
    async fn keepalive(&self, lease: LeaseId) -> Result<(), LeaseLost> {
        match self.store.keepalive(lease, self.every).await {
            Ok(renewal) => self.gate.extend(fence_deadline(renewal.sent, renewal.ttl)),
            Err(CoordError::LeaseNotFound(_)) => {
                tracing::warn!(
                    lease,
                    "lease expired in the store; fencing and re-registering"
                );
                return Err(LeaseLost);
            }
            Err(e) => tracing::warn!(error = %e, "keepalive failed"),
        }
        Ok(())
    }

    /// Register while the local Loom is healthy; stop admitting at once when it is not, and
    /// withdraw once it has been unhealthy for a whole lease.
    async fn follow_health(
        &self,
        lease: LeaseId,
        registration: &mut Registration,
    ) -> Result<(), LeaseLost> {
        let healthy = self.health.get(&self.me.dc) == Status::Up;
        match (healthy, registration.revision) {
            (true, None) => self.register(lease, registration).await?,
            (true, Some(_)) => {
                // Healthy (again, after a blip shorter than the lease): admit again.
                registration.unhealthy_since = None;
                self.gate.set_registered(registration.revision);
            }
            (false, Some(_)) => {
                // Stop admitting at once; a dead Loom takes no writes anyway.
                self.gate.set_registered(None);
                let since = *registration
                    .unhealthy_since
                    .get_or_insert_with(Instant::now);
                // Withdraw only once the Loom has been unhealthy for a whole lease, so that a
                // blip shorter than that moves nothing. By then every write admitted before it
                // turned unhealthy is long over (write_timeout fits inside the lease).
                if since.elapsed() >= self.ttl {
                    self.withdraw(registration).await;
                }
            }
            (false, None) => {}
        }
        Ok(())
    }

    /// Put the registration key on `lease`: this router's URL and start time.
    async fn register(
        &self,
        lease: LeaseId,
        registration: &mut Registration,
    ) -> Result<(), LeaseLost> {
        let value = serde_json::to_vec(&RegistrationValue {
            url: &self.me.router_url,
            started_at: &self.me.started_at,
        })
        .unwrap_or_default();
        let put = Op::Put {
            key: self.registration_key(),
            value,
            lease,
        };
        match self.store.txn(Vec::new(), vec![put], Vec::new()).await {
            Ok(outcome) => {
                tracing::info!(router = %self.me.router_id, revision = outcome.revision, "registered");
                registration.revision = Some(outcome.revision);
                self.gate.set_registered(registration.revision);
            }
            Err(CoordError::LeaseNotFound(_)) => return Err(LeaseLost),
            Err(e) => tracing::warn!(error = %e, "cannot register"),
        }
        Ok(())
    }

    /// Delete the registration key; if that fails, it ends with the lease.
    async fn withdraw(&self, registration: &mut Registration) {
        tracing::warn!(router = %self.me.router_id, "local Loom unhealthy for a whole lease: withdrawing registration");
        let delete = Op::Delete(self.registration_key());
        match self.store.txn(Vec::new(), vec![delete], Vec::new()).await {
            Ok(_) => *registration = Registration::default(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot withdraw registration; it ends with the lease");
            }
        }
    }

    fn registration_key(&self) -> String {
        self.keys.router(&self.me.dc, &self.me.router_id)
    }
}

/// The value of a registration key.
#[derive(serde::Serialize)]
struct RegistrationValue<'a> {
    url: &'a str,
    started_at: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRITE: Duration = Duration::from_secs(2);

    #[test]
    fn the_deadline_is_the_send_time_plus_the_lease_less_drift_and_margin() {
        let sent = Instant::now();
        let d = fence_deadline(sent, Duration::from_secs(5));
        // 5 s × 0.98 − 250 ms = 4.65 s.
        assert_eq!(d - sent, Duration::from_millis(4650));
    }

    #[test]
    fn a_closed_gate_admits_nothing() {
        let g = Gate::new();
        assert!(!g.admits(Instant::now(), WRITE, 100));
    }

    #[test]
    fn an_open_gate_admits_while_the_write_fits_before_the_deadline() {
        let g = Gate::new();
        let sent = g.base + Duration::from_secs(10);
        g.extend(fence_deadline(sent, Duration::from_secs(5)));
        g.set_registered(Some(7));
        // Deadline at 14.65 s: a 2 s write may start up to 12.65 s.
        assert!(g.admits(g.base + Duration::from_millis(12_650), WRITE, 7));
        assert!(!g.admits(g.base + Duration::from_millis(12_651), WRITE, 7));
        assert_eq!(
            g.remaining(g.base + Duration::from_secs(14)),
            Duration::from_millis(650)
        );
    }

    #[test]
    fn an_unregistered_router_or_a_table_older_than_its_registration_is_fenced() {
        let g = Gate::new();
        g.extend(fence_deadline(
            g.base + Duration::from_secs(1),
            Duration::from_secs(5),
        ));
        let now = g.base + Duration::from_secs(1);
        assert!(!g.admits(now, WRITE, 9), "not registered");
        g.set_registered(Some(9));
        assert!(!g.admits(now, WRITE, 8), "table predates registration");
        assert!(g.admits(now, WRITE, 9));
    }

    #[test]
    fn the_deadline_never_moves_back_and_close_resets_it() {
        let g = Gate::new();
        let late = g.base + Duration::from_secs(20);
        g.extend(late);
        g.extend(g.base + Duration::from_secs(3));
        assert_eq!(g.deadline(), Some(late));
        g.close();
        assert_eq!(g.deadline(), None);
        assert_eq!(g.registered_at(), None);
    }
}
