//! Health checks: is the local Loom answering, and is each peer DC's router ready?
//!
//! Two parts, kept apart. [`Counter`] is the pure threshold state machine (N consecutive
//! failures to go down, M consecutive successes to come back), tested without a clock.
//! [`Probes`] runs one probe task per DC on the `[health]` schedule and writes the verdict into
//! [`HealthBoard`], which the request path reads to fail fast with `owner_unavailable`; it
//! follows the configs a reload publishes, and starts over only when what is probed changes.
//!
//! Health never moves ownership (docs/routing.md); this file must not touch the table.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{Method, Request, Uri};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::{EventLog, Kind};
use crate::http::body::Body;
use crate::http::forward::{upstream_uri, Forwarder};
use crate::metrics;

/// What the probes last concluded about a DC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No verdict yet (no success, and fewer than `unhealthy_after` failures, since start).
    /// Treated as up for routing and as not ready for `/readyz`.
    Unknown,
    Up,
    Down,
}

impl Status {
    /// As the events and `/admin/status` name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// Consecutive-result thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

/// The pure state machine behind one DC's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    status: Status,
    /// Consecutive results that disagree with `status`.
    streak: u32,
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

impl Counter {
    pub fn new() -> Self {
        Self {
            status: Status::Unknown,
            streak: 0,
        }
    }

    pub fn status(&self) -> Status {
        self.status
    }

    /// Feed one probe result; returns the new status if it changed. From `Unknown`, one
    /// success is enough to be up (a router knows where it stands after one interval), but
    /// going down still takes `unhealthy_after` failures: routers that start together probe
    /// each other before they are ready, and that must not read as an outage.
    pub fn observe(&mut self, ok: bool, t: Thresholds) -> Option<Status> {
        let wanted = if ok { Status::Up } else { Status::Down };
        if self.status == wanted {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = match (self.status, ok) {
            (Status::Unknown, true) => 1,
            (_, true) => t.healthy_after,
            (_, false) => t.unhealthy_after,
        };
        if self.streak >= needed {
            self.status = wanted;
            self.streak = 0;
            Some(wanted)
        } else {
            None
        }
    }
}

/// What the probes last found of one DC, for the status page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DcHealth {
    pub status: Status,
    /// When the DC entered this status.
    pub since: std::time::SystemTime,
    /// How long the last probe took, answered or not.
    pub last_probe: Option<Duration>,
}

/// The latest status of every DC, by name. Keyed by name rather than index so that it outlives
/// config reloads that add, remove or reorder DCs.
#[derive(Debug, Default)]
pub struct HealthBoard {
    /// Written by the probe tasks only (rarely: on a change); read by the request path for
    /// forwarded writes, `/readyz`, `/admin/table` and the lease task.
    statuses: RwLock<HashMap<String, DcHealth>>,
    /// Woken on every change, so the lease task (re)registers or withdraws at once rather than
    /// at its next keepalive.
    changed: tokio::sync::Notify,
    /// Where transitions are recorded for operators.
    event_log: Arc<EventLog>,
}

impl HealthBoard {
    pub fn new() -> Self {
        Self::default()
    }

    /// A board that records every transition in `event_log`.
    pub fn with_event_log(event_log: Arc<EventLog>) -> Self {
        Self {
            event_log,
            ..Self::default()
        }
    }

    /// Resolves after the next status change.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    pub fn get(&self, dc: &str) -> Status {
        self.detail(dc).map_or(Status::Unknown, |h| h.status)
    }

    /// The status, since when, and the last probe's time.
    pub fn detail(&self, dc: &str) -> Option<DcHealth> {
        self.statuses
            .read()
            .expect("health board lock poisoned")
            .get(dc)
            .copied()
    }

    /// A probe of `dc` took `took`.
    pub fn observe_probe(&self, dc: &str, took: Duration) {
        let mut statuses = self.statuses.write().expect("health board lock poisoned");
        let entry = statuses.entry(dc.to_owned()).or_insert(DcHealth {
            status: Status::Unknown,
            since: std::time::SystemTime::now(),
            last_probe: None,
        });
        entry.last_probe = Some(took);
    }

    /// Whether requests may be sent to the DC: anything but a confirmed `Down`.
    pub fn usable(&self, dc: &str) -> bool {
        self.get(dc) != Status::Down
    }

    pub fn set(&self, dc: &str, status: Status) {
        let previous = {
            let mut statuses = self.statuses.write().expect("health board lock poisoned");
            let entry = statuses.entry(dc.to_owned()).or_insert(DcHealth {
                status: Status::Unknown,
                since: std::time::SystemTime::now(),
                last_probe: None,
            });
            let previous = entry.status;
            if previous != status {
                entry.status = status;
                entry.since = std::time::SystemTime::now();
            }
            previous
        };
        if previous != status {
            self.changed.notify_waiters();
            self.event_log.record(
                Kind::Health,
                format!("datacenter {dc} is {}", status.as_str()),
            );
        }
    }

    /// Forget DCs a reloaded config no longer has.
    pub fn retain(&self, names: &[&str]) {
        self.statuses
            .write()
            .expect("health board lock poisoned")
            .retain(|name, _| names.contains(&name.as_str()));
    }
}

/// The running probes, and the config they were started from. Replaced as a whole when a
/// reload changes what is probed or how; kept, with the health they have learned, otherwise.
#[derive(Debug)]
pub struct Probes {
    config: Arc<Config>,
    board: Arc<HealthBoard>,
    forwarder: Forwarder,
    /// Ends everything: the current generation of probes and the follower.
    stop: CancellationToken,
    /// Ends the current generation of probes only.
    generation: CancellationToken,
}

impl Probes {
    /// Start one probe task per DC. The local DC is probed at its Loom's `health_path`; every
    /// other DC at its router's `/loom-router/readyz`, which is 503 unless that router's own
    /// Loom is healthy. The tasks end when `stop` fires.
    pub fn start(
        config: Arc<Config>,
        board: Arc<HealthBoard>,
        forwarder: Forwarder,
        stop: CancellationToken,
    ) -> Self {
        let generation = stop.child_token();
        spawn_probes(&config, &board, &forwarder, &generation);
        Self {
            config,
            board,
            forwarder,
            stop,
            generation,
        }
    }

    /// Follow the configs a reload publishes (`coord::control` is their only writer). A config
    /// whose probes differ (`Config::probes_differ`) replaces the probes and forgets the health
    /// of DCs it no longer names; any other leaves them running.
    pub fn follow(mut self, mut configs: watch::Receiver<Arc<Config>>) {
        let stop = self.stop.clone();
        tokio::spawn(stop.run_until_cancelled_owned(async move {
            while configs.changed().await.is_ok() {
                let next = configs.borrow_and_update().clone();
                if self.config.probes_differ(&next) {
                    self.restart(next);
                }
            }
        }));
    }

    fn restart(&mut self, config: Arc<Config>) {
        self.generation.cancel();
        self.generation = self.stop.child_token();
        spawn_probes(&config, &self.board, &self.forwarder, &self.generation);
        let names: Vec<&str> = config.datacenters.iter().map(|d| d.name.as_str()).collect();
        self.board.retain(&names);
        self.config = config;
    }
}

/// One probe task per DC of `config`, until `cancel` fires.
fn spawn_probes(
    config: &Config,
    board: &Arc<HealthBoard>,
    forwarder: &Forwarder,
    cancel: &CancellationToken,
) {
    let thresholds = Thresholds {
        unhealthy_after: config.health.unhealthy_after,
        healthy_after: config.health.healthy_after,
    };
    for (dc, d) in config.datacenters.iter().enumerate() {
        let url = if dc == config.local {
            probe_url(&config.loom.upstream, &config.loom.health_path)
        } else {
            probe_url(&d.router, crate::routing::classify::READYZ_PATH)
        };
        let task = Probe {
            name: d.name.clone(),
            url,
            interval: config.health.interval,
            timeout: config.health.timeout,
            thresholds,
            board: board.clone(),
            forwarder: forwarder.clone(),
        };
        tokio::spawn(cancel.clone().run_until_cancelled_owned(task.run()));
    }
}

fn probe_url(base: &Uri, path: &str) -> Uri {
    upstream_uri(base, path.parse().ok().as_ref())
}

#[derive(Debug)]
struct Probe {
    name: String,
    url: Uri,
    interval: Duration,
    timeout: Duration,
    thresholds: Thresholds,
    board: Arc<HealthBoard>,
    forwarder: Forwarder,
}

impl Probe {
    async fn run(self) {
        let mut counter = Counter::new();
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let started = std::time::Instant::now();
            let ok = self.probe_once().await;
            self.board.observe_probe(&self.name, started.elapsed());
            if let Some(status) = counter.observe(ok, self.thresholds) {
                self.board.set(&self.name, status);
                metrics::set_datacenter_up(&self.name, status == Status::Up);
                match status {
                    Status::Up => {
                        tracing::info!(datacenter = %self.name, url = %self.url, "datacenter is up")
                    }
                    Status::Down | Status::Unknown => {
                        tracing::warn!(datacenter = %self.name, url = %self.url, "datacenter is down");
                    }
                }
            }
        }
    }

    async fn probe_once(&self) -> bool {
        let request = Request::builder()
            .method(Method::GET)
            .uri(self.url.clone())
            .body(Body::empty());
        let Ok(request) = request else { return false };
        match self.forwarder.send(request, self.timeout).await {
            Ok(response) => {
                let ok = response.status().is_success();
                // Drain the (tiny) body so the pooled connection can be reused.
                let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                ok
            }
            Err(e) => {
                tracing::debug!(datacenter = %self.name, url = %self.url, error = %e, source = ?std::error::Error::source(&e), "probe failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        unhealthy_after: 3,
        healthy_after: 2,
    };

    #[test]
    fn one_success_is_enough_to_leave_unknown() {
        let mut c = Counter::new();
        assert_eq!(c.observe(true, T), Some(Status::Up));
    }

    #[test]
    fn leaving_unknown_for_down_takes_unhealthy_after_failures() {
        let mut c = Counter::new();
        assert_eq!(c.observe(false, T), None);
        assert_eq!(c.observe(false, T), None);
        assert_eq!(c.status(), Status::Unknown);
        assert_eq!(c.observe(false, T), Some(Status::Down));
    }

    #[test]
    fn going_down_takes_unhealthy_after_consecutive_failures() {
        let mut c = Counter::new();
        c.observe(true, T);
        assert_eq!(c.observe(false, T), None);
        assert_eq!(c.observe(false, T), None);
        assert_eq!(c.observe(false, T), Some(Status::Down));
        assert_eq!(c.status(), Status::Down);
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let mut c = Counter::new();
        c.observe(true, T);
        c.observe(false, T);
        c.observe(false, T);
        assert_eq!(c.observe(true, T), None);
        assert_eq!(c.observe(false, T), None);
        assert_eq!(c.observe(false, T), None);
        assert_eq!(c.status(), Status::Up);
    }

    #[test]
    fn coming_back_takes_healthy_after_consecutive_successes() {
        let mut c = Counter::new();
        c.observe(true, T);
        for _ in 0..3 {
            c.observe(false, T);
        }
        assert_eq!(c.status(), Status::Down);
        assert_eq!(c.observe(true, T), None);
        assert_eq!(c.observe(true, T), Some(Status::Up));
    }

    #[test]
    fn the_board_treats_unknown_as_usable_but_not_down() {
        let b = HealthBoard::new();
        assert!(b.usable("a"));
        b.set("a", Status::Down);
        assert!(!b.usable("a"));
        assert_eq!(b.get("b"), Status::Unknown);
        b.retain(&["b"]);
        assert_eq!(b.get("a"), Status::Unknown);
    }
}
