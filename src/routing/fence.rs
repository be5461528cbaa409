//! The fence arithmetic: how long a router may keep admitting writes under a lease
//! (`docs/failover.md`, self-fencing).
//!
//! Pure and dependency-free, so that both the lease task (`coord/lease.rs`), which feeds the
//! write gate, and config validation (`config/validate.rs`), which refuses a `write_timeout` that
//! could never fit, use one formula without one depending on the other.

use std::time::Duration;

use tokio::time::Instant;

/// Assumed bound on clock rate difference between this router and the store (1 %).
pub const DRIFT: f64 = 0.01;
/// Safety margin for scheduling jitter on top of the drift bound.
pub const MARGIN: Duration = Duration::from_millis(250);

/// The last moment a write may still be running under a lease whose keepalive was sent at `sent`
/// and acknowledged with `ttl`: `sent + ttl·(1 − 2ρ) − δ`.
pub fn fence_deadline(sent: Instant, ttl: Duration) -> Instant {
    (sent + ttl.mul_f64(1.0 - 2.0 * DRIFT))
        .checked_sub(MARGIN)
        .unwrap_or(sent)
}

/// The longest write that always fits inside a lease of `lease` renewed every `keepalive`: the
/// lease less drift and margin, less one keepalive interval (the next renewal may be that far
/// away). A `write_timeout` above it would fence every write.
pub fn usable_lease(lease: Duration, keepalive: Duration) -> Duration {
    lease
        .mul_f64(1.0 - 2.0 * DRIFT)
        .saturating_sub(MARGIN)
        .saturating_sub(keepalive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_of_five_seconds_renewed_every_second_fits_a_write_of_3_65_seconds() {
        assert_eq!(
            usable_lease(Duration::from_secs(5), Duration::from_secs(1)),
            Duration::from_millis(3650)
        );
        assert_eq!(
            usable_lease(Duration::from_millis(500), Duration::from_millis(500)),
            Duration::ZERO
        );
    }
}
