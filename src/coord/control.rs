//! The single writer of the routing snapshot.
//!
//! A [`Snapshot`] is everything the request path needs that must change together: the validated
//! config, the ownership table, alerts, and values derived from them once (header values). It
//! lives behind one `ArcSwap`. The request path loads it once per request; only the writer task
//! here stores into it, so two updates can never interleave.
//!
//! The writer takes its inputs from three places: views of the coordination store (pushed by the
//! watch in `coord/join.rs`), refresh requests from the request path (a peer knew a newer
//! epoch), and results of become-owner hooks. It never installs a table older than the one it
//! serves (docs/failover.md), and on any error the old snapshot keeps serving.
//!
//! This file must not route requests or probe anything; it only builds and publishes snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::coord::failover::{self, Liveness};
use crate::coord::hook::HookJob;
use crate::coord::store::Store;
use crate::coord::{Keys, View};
use crate::events::{EventLog, Kind};
use crate::http::headers::via_token;
use crate::metrics;
use crate::routing::table::Table;
use crate::shard::ShardKey;

/// One consistent view of configuration and ownership.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub table: Table,
    /// Problems an operator must know about (shards that cannot fail over), for `/admin/table`.
    pub alerts: Vec<String>,
    /// The table came from the coordination store (always false with `static`). Owned writes are
    /// admitted only from a store table under the memory and etcd backends.
    pub from_store: bool,
    /// `1.1 loom-router-<dc>`, appended to every request and response this router passes on.
    pub via: HeaderValue,
    /// `loom-router-<dc>`, looked for in incoming `Via` headers to detect loops.
    pub via_token: String,
    /// DC names as header values, by `DcId`, for `X-Loom-Served-By` and `X-Loom-Router-Origin`.
    pub dc_names: Vec<HeaderValue>,
}

impl Snapshot {
    pub fn new(config: Arc<Config>, table: Table, alerts: Vec<String>, from_store: bool) -> Self {
        let local = &config.local_dc().name;
        let via_token = via_token(local);
        // DC names are validated to be [A-Za-z0-9_-], so they are always valid header values.
        let header = |s: &str| {
            HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
        };
        let via = header(&format!("1.1 {via_token}"));
        let dc_names = config.datacenters.iter().map(|d| header(&d.name)).collect();
        Self {
            config,
            table,
            alerts,
            from_store,
            via,
            via_token,
            dc_names,
        }
    }
}

/// The coordination side of a router, as the writer sees it.
#[derive(Debug)]
pub struct StoreLink {
    pub store: Store,
    pub keys: Keys,
    /// The store as the watch last saw it.
    pub views: watch::Receiver<Arc<View>>,
    /// Become-owner hook calls to make, each with a token that cancels its retries (the shard
    /// moved away again); `None` when no hook is configured.
    pub hooks: Option<mpsc::Sender<(HookJob, CancellationToken)>>,
    /// Hooks that succeeded: (shard, epoch).
    pub hook_results: mpsc::Receiver<(ShardKey, u64)>,
}

/// Why a reload was refused. The old config keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload (the router was started without one)")]
    NoFile,
    #[error("{0}")]
    Invalid(#[from] crate::config::ConfigErrors),
    #[error("{}: changing it needs a restart; the old config keeps serving", .0.join(", "))]
    RestartNeeded(Vec<&'static str>),
    #[error("[[shards]] epochs went backwards (table epoch {next} < {current}); a router never installs an older table")]
    Older { current: u64, next: u64 },
}

/// What the writer task is asked to do.
#[derive(Debug)]
enum Request {
    /// Re-read ownership from the coordination store, then answer.
    Refresh(oneshot::Sender<()>),
    /// Re-read the config file, validate it, and swap it in (or refuse).
    Reload(oneshot::Sender<Result<String, ReloadError>>),
}

/// A handle on the current snapshot and its writer task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Control {
    /// Read by every request; stored into only by the writer task.
    current: Arc<ArcSwap<Snapshot>>,
    /// Requests to the writer task; it ends when every handle is dropped.
    events: mpsc::Sender<Request>,
    /// Each config the writer installs, for the tasks that apply settings outside the snapshot
    /// (health probes, the concurrency limit).
    configs: watch::Receiver<Arc<Config>>,
    /// Recent events, for `/admin/events`.
    event_log: Arc<EventLog>,
}

impl Control {
    /// Publish the first snapshot (from the config) and start the writer task. With a
    /// coordination store, the writer replaces it as soon as the store has been read.
    pub fn start(
        config: Config,
        coordination: Option<StoreLink>,
        config_path: Option<std::path::PathBuf>,
        event_log: Arc<EventLog>,
    ) -> Self {
        let config = Arc::new(config);
        let (configs_tx, configs) = watch::channel(config.clone());
        let table = config.table();
        publish_metrics(&table);
        let current = Arc::new(ArcSwap::from_pointee(Snapshot::new(
            config.clone(),
            table,
            Vec::new(),
            false,
        )));
        let (events, rx) = mpsc::channel(64);
        let writer = Writer {
            liveness: Liveness::new(config.coordination.lease),
            current: current.clone(),
            config,
            pending_hooks: BTreeMap::new(),
            handled: BTreeMap::new(),
            config_path,
            configs: configs_tx,
            last_view: None,
            event_log: event_log.clone(),
        };
        tokio::spawn(writer.run(rx, coordination));
        Self {
            current,
            events,
            configs,
            event_log,
        }
    }

    /// This router's recent events, which the writer and the reloads record into.
    pub fn event_log(&self) -> &Arc<EventLog> {
        &self.event_log
    }

    /// Every config installed from now on (the current one is marked seen).
    pub fn configs(&self) -> watch::Receiver<Arc<Config>> {
        self.configs.clone()
    }

    /// Re-read the config file and swap it in atomically; on any error the old config keeps
    /// serving. Counted in `loom_router_config_reloads_total{result}`.
    pub async fn reload(&self) -> Result<String, ReloadError> {
        let (tx, rx) = oneshot::channel();
        let outcome = match self.events.send(Request::Reload(tx)).await {
            Ok(()) => rx.await.unwrap_or(Err(ReloadError::NoFile)),
            Err(_) => Err(ReloadError::NoFile),
        };
        metrics::config_reload(outcome.is_ok());
        match &outcome {
            Ok(summary) => {
                tracing::info!("config reloaded: {summary}");
                self.event_log
                    .record(Kind::Reload, format!("config reloaded: {summary}"));
            }
            Err(e) => {
                tracing::warn!(error = %e, "config reload refused; the old config keeps serving");
                self.event_log.record(
                    Kind::Reload,
                    format!("config reload refused, the old config keeps serving: {e}"),
                );
            }
        }
        outcome
    }

    /// The current snapshot, kept alive for as long as the caller holds it (across awaits).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Ask the writer to re-read ownership from the coordination store, and wait for it. Used
    /// when a peer shows a newer epoch than ours (docs/routing.md).
    pub async fn refresh(&self) {
        let (tx, rx) = oneshot::channel();
        if self.events.send(Request::Refresh(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The writer task's state: the only code that stores a snapshot after start-up.
struct Writer {
    current: Arc<ArcSwap<Snapshot>>,
    config: Arc<Config>,
    /// Shards this DC gained whose hook has not succeeded: the epoch it was called for, and the
    /// token that stops its retries.
    pending_hooks: BTreeMap<ShardKey, (u64, CancellationToken)>,
    /// For each shard this router has seen itself own: the record's `owner_changes` then. A
    /// larger count later means the shard left and came back, whatever views were skipped.
    handled: BTreeMap<ShardKey, u64>,
    /// The file the config came from, for reloads.
    config_path: Option<std::path::PathBuf>,
    /// Tells the settings appliers about each installed config.
    configs: watch::Sender<Arc<Config>>,
    /// The last store view installed, to rebuild the table when only the config changes.
    last_view: Option<View>,
    /// Whose deaths the alerts may report (`failover::Liveness`).
    liveness: Liveness,
    /// Where ownership changes, fences and hook results are recorded for operators.
    event_log: Arc<EventLog>,
}

impl Writer {
    async fn run(mut self, mut events: mpsc::Receiver<Request>, coordination: Option<StoreLink>) {
        let Some(mut c) = coordination else {
            // Static: the config is the store. A refresh finds nothing newer until an operator
            // reloads the config.
            while let Some(event) = events.recv().await {
                match event {
                    Request::Refresh(done) => {
                        let _ = done.send(());
                    }
                    Request::Reload(done) => {
                        let _ = done.send(self.reload(None));
                    }
                }
            }
            return;
        };
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Request::Refresh(done)) => {
                        match c.store.range(&c.keys.all()).await {
                            Ok((kvs, revision)) => {
                                let view = View::from_range(&c.keys, kvs, revision);
                                self.install(&view, c.hooks.as_ref());
                            }
                            Err(e) => tracing::warn!(error = %e, "refresh from the store failed; keeping the current table"),
                        }
                        let _ = done.send(());
                    }
                    Some(Request::Reload(done)) => {
                        let _ = done.send(self.reload(c.hooks.as_ref()));
                    }
                    None => return,
                },
                changed = c.views.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let view = c.views.borrow_and_update().clone();
                    self.install(&view, c.hooks.as_ref());
                }
                // Every DC's liveness becomes known a lease TTL after start: look again then, as
                // the store may not change in the meantime.
                () = until(self.liveness.settles_at(Instant::now())) => {
                    if let Some(view) = self.last_view.clone() {
                        self.install(&view, c.hooks.as_ref());
                    }
                }
                Some((shard, epoch)) = c.hook_results.recv() => {
                    if self.pending_hooks.get(&shard).is_some_and(|(e, _)| *e == epoch) {
                        self.pending_hooks.remove(&shard);
                        self.event_log.record(
                            Kind::Hook,
                            format!("become-owner hook for shard {shard} at epoch {epoch} succeeded; writes admitted"),
                        );
                        self.republish();
                    }
                }
            }
        }
    }

    /// Build the table a store view describes and publish it, unless it is older than the one
    /// being served. Shards this DC gained get their hook called and stay fenced until it
    /// succeeds.
    fn install(&mut self, view: &View, hooks: Option<&mpsc::Sender<(HookJob, CancellationToken)>>) {
        self.last_view = Some(view.clone());
        let current = self.current.load();
        let mut table = view.table(&self.config);
        if current.from_store && table.table_epoch < current.table.table_epoch {
            tracing::debug!(
                offered = table.table_epoch,
                serving = current.table.table_epoch,
                "older table ignored"
            );
            return;
        }
        let local = self.config.local;
        let local_name = &self.config.local_dc().name;
        for shard in table.shards() {
            if shard.owner != local {
                if let Some((_, cancel)) = self.pending_hooks.remove(&shard.key) {
                    // It moved away before its hook succeeded: stop calling it.
                    cancel.cancel();
                }
                continue;
            }
            let (previous, changes) = view.shards.get(&shard.key).map_or((None, 0), |(r, _)| {
                (r.previous_owner.clone(), r.owner_changes)
            });
            // Gained: the owner changed since this router last saw itself own the shard, or (the
            // first time it sees it) the store says it moved here from elsewhere.
            let gained = match self.handled.get(&shard.key) {
                Some(&seen) => changes > seen,
                None => previous.as_deref().is_some_and(|p| p != local_name),
            };
            if !gained {
                self.handled.insert(shard.key, changes);
                continue;
            }
            tracing::warn!(shard = %shard.key, epoch = shard.epoch, previous = ?previous, "this datacenter gained the shard");
            let Some(hooks) = hooks else {
                self.handled.insert(shard.key, changes);
                continue;
            };
            let cancel = CancellationToken::new();
            let job = HookJob {
                shard: shard.key,
                epoch: shard.epoch,
                previous_owner: previous,
            };
            match hooks.try_send((job, cancel.clone())) {
                Ok(()) => {
                    if let Some((_, old)) =
                        self.pending_hooks.insert(shard.key, (shard.epoch, cancel))
                    {
                        old.cancel();
                    }
                    self.handled.insert(shard.key, changes);
                }
                Err(_) => {
                    // Not marked handled: the next table tries again. Fenced until then.
                    tracing::error!(shard = %shard.key, "hook queue full; will retry with the next table");
                    self.pending_hooks
                        .entry(shard.key)
                        .or_insert((shard.epoch, cancel));
                }
            }
        }
        table.hook_pending = self.pending_hooks.keys().copied().collect();
        publish_metrics(&table);
        let now = Instant::now();
        self.liveness.observe(view, now);
        let alerts = failover::alerts(view, &|dc| self.liveness.known(dc, now));
        log_alert_changes(&current.alerts, &alerts);
        record_changes(&self.event_log, &self.config, &current.table, &table);
        self.current.store(Arc::new(Snapshot::new(
            self.config.clone(),
            table,
            alerts,
            true,
        )));
    }

    /// Re-read, validate and install the config file. With a store, ownership still comes from
    /// the store (re-derived under the new config); with `static`, from the new config, which
    /// must not move the table epoch backwards.
    fn reload(
        &mut self,
        hooks: Option<&mpsc::Sender<(HookJob, CancellationToken)>>,
    ) -> Result<String, ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let next = Config::load(path)?;
        let refused = self.config.restart_only_changes(&next);
        if !refused.is_empty() {
            return Err(ReloadError::RestartNeeded(refused));
        }
        let later = self.config.applied_at_restart(&next);
        let next = Arc::new(next);
        let current = self.current.load_full();
        if self.last_view.is_none() {
            let table = next.table();
            if table.table_epoch < current.table.table_epoch {
                return Err(ReloadError::Older {
                    current: current.table.table_epoch,
                    next: table.table_epoch,
                });
            }
            publish_metrics(&table);
            record_changes(&self.event_log, &next, &current.table, &table);
            self.config = next.clone();
            self.current.store(Arc::new(Snapshot::new(
                next.clone(),
                table,
                current.alerts.clone(),
                false,
            )));
        } else if let Some(view) = self.last_view.take() {
            self.config = next.clone();
            // Re-derive from the same store view under the new config (the epoch is unchanged,
            // so force the install past the never-older check by comparing equal).
            self.install(&view, hooks);
        }
        let _ = self.configs.send(next.clone());
        let table = &self.current.load().table;
        let mut summary = format!(
            "{} datacenters, {} shards, table epoch {}",
            next.datacenters.len(),
            table.shards().count(),
            table.table_epoch
        );
        if !later.is_empty() {
            summary.push_str(&format!(
                "; {} changed and will apply at the next restart",
                later.join(", ")
            ));
        }
        Ok(summary)
    }

    /// Publish the current table again with the current hook state.
    fn republish(&self) {
        let current = self.current.load();
        let mut table = current.table.clone();
        table.hook_pending = self.pending_hooks.keys().copied().collect();
        self.current.store(Arc::new(Snapshot::new(
            self.config.clone(),
            table,
            current.alerts.clone(),
            current.from_store,
        )));
    }
}

/// Log each alert once: when a table raises it, and when a table no longer has it. (A table
/// holds a few alerts at most, one per shard.)
/// Ownership changes and fences between the served table and the next, for operators.
fn record_changes(log: &EventLog, config: &Config, old: &Table, new: &Table) {
    let name = |dc: usize| config.datacenters.get(dc).map_or("?", |d| d.name.as_str());
    for shard in new.shards() {
        let Some(before) = old.shard(shard.key) else {
            continue;
        };
        let why = || {
            if shard.reason.is_empty() {
                String::new()
            } else {
                format!(" ({}, by {})", shard.reason, shard.changed_by)
            }
        };
        if before.owner != shard.owner {
            log.record(
                Kind::Ownership,
                format!(
                    "shard {} moved from {} to {} at epoch {}{}",
                    shard.key,
                    name(before.owner),
                    name(shard.owner),
                    shard.epoch,
                    why()
                ),
            );
        }
        if before.state != shard.state {
            log.record(
                Kind::Fence,
                format!(
                    "shard {} is {} at epoch {}{}",
                    shard.key,
                    shard.state.as_str(),
                    shard.epoch,
                    why()
                ),
            );
        }
    }
}

/// The gauges that follow the published table: its epoch, and which shards are away from home.
fn publish_metrics(table: &Table) {
    metrics::set_table_epoch(table.table_epoch);
    for shard in table.shards() {
        let moved = shard.home.is_some_and(|home| home != shard.owner);
        metrics::set_shard_moved(&shard.key.to_string(), moved);
    }
}

fn log_alert_changes(before: &[String], after: &[String]) {
    for raised in after.iter().filter(|a| !before.contains(a)) {
        tracing::warn!("{raised}");
    }
    for cleared in before.iter().filter(|a| !after.contains(a)) {
        tracing::info!("cleared: {cleared}");
    }
}

/// Sleep until `at`; forever without one.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::ShardRecord;

    const CONFIG: &str = r#"
datacenter = "a"
global_home = "a"
[loom]
upstream = "http://127.0.0.1:1"
[ids]
increment = 10
[[datacenters]]
name = "a"
id_start = 1
router = "http://127.0.0.1:2"
replicas = ["b"]
[[datacenters]]
name = "b"
id_start = 2
router = "http://127.0.0.1:3"
replicas = ["a"]
"#;

    fn config() -> Arc<Config> {
        Arc::new(Config::from_toml(CONFIG).unwrap())
    }

    fn view(revision: i64, shard1_owner: &str, previous: Option<&str>) -> View {
        let record = |owner: &str, home: &str| ShardRecord {
            home: Some(home.to_owned()),
            ..ShardRecord::home_of(owner, &[])
        };
        let mut moved = record(shard1_owner, "a");
        moved.previous_owner = previous.map(str::to_owned);
        View {
            revision,
            shards: [
                (ShardKey::Residue(1), (moved, revision)),
                (ShardKey::Residue(2), (record("b", "b"), 2)),
                (ShardKey::Global, (record("a", "a"), 2)),
            ]
            .into_iter()
            .collect(),
            ..View::default()
        }
    }

    fn writer(config: Arc<Config>) -> Writer {
        let table = config.table();
        Writer {
            current: Arc::new(ArcSwap::from_pointee(Snapshot::new(
                config.clone(),
                table,
                Vec::new(),
                false,
            ))),
            config,
            pending_hooks: BTreeMap::new(),
            handled: BTreeMap::new(),
            config_path: None,
            configs: watch::channel(Arc::new(Config::from_toml(CONFIG).unwrap())).0,
            last_view: None,
            liveness: Liveness::new(std::time::Duration::from_secs(5)),
            event_log: Arc::default(),
        }
    }

    #[test]
    fn a_table_epoch_never_goes_back() {
        let mut w = writer(config());
        w.install(&view(10, "a", None), None);
        assert_eq!(w.current.load().table.table_epoch, 10);
        w.install(&view(5, "b", Some("a")), None);
        let current = w.current.load();
        assert_eq!(current.table.table_epoch, 10, "older view installed");
        assert_eq!(current.table.shard(ShardKey::Residue(1)).unwrap().owner, 0);
        w.install(&view(11, "b", Some("a")), None);
        assert_eq!(w.current.load().table.table_epoch, 11);
        // The move is an event; the older view that was ignored is not.
        let moves: Vec<String> = w
            .event_log
            .recent()
            .into_iter()
            .filter(|e| e.kind == Kind::Ownership)
            .map(|e| e.text)
            .collect();
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert!(
            moves[0].starts_with("shard 1 moved from a to b at epoch 11"),
            "{moves:?}"
        );
    }

    #[test]
    fn a_gained_shard_is_fenced_until_its_hook_succeeds() {
        // This router is "b" (index 1): shard 1 moves to it.
        let mut cfg = (*config()).clone();
        cfg.local = 1;
        let mut w = writer(Arc::new(cfg));
        let (hooks, mut jobs) = mpsc::channel(4);
        w.install(&view(10, "a", None), Some(&hooks));
        assert!(jobs.try_recv().is_err());
        w.install(&view(12, "b", Some("a")), Some(&hooks));
        let (job, _cancel) = jobs.try_recv().unwrap();
        assert_eq!(
            job,
            HookJob {
                shard: ShardKey::Residue(1),
                epoch: 12,
                previous_owner: Some("a".to_owned())
            }
        );
        assert_eq!(
            w.current.load().table.hook_pending,
            vec![ShardKey::Residue(1)]
        );
        // The same ownership again does not call the hook twice.
        w.install(&view(13, "b", Some("a")), Some(&hooks));
        assert!(jobs.try_recv().is_err());
        w.pending_hooks.remove(&ShardKey::Residue(1));
        w.republish();
        assert!(w.current.load().table.hook_pending.is_empty());
    }

    #[test]
    fn a_cold_start_raises_no_alert_and_a_dc_that_leaves_raises_one() {
        let mut w = writer(config());
        let with_routers = |revision: i64, dcs: &[&str]| View {
            routers: dcs
                .iter()
                .map(|dc| (format!("/p/dcs/{dc}/routers/r"), (*dc).to_owned()))
                .collect(),
            ..view(revision, "a", None)
        };
        // Nobody has registered yet: no DC's liveness is known, so nothing is down.
        w.install(&with_routers(10, &[]), None);
        assert!(w.current.load().alerts.is_empty());
        w.install(&with_routers(11, &["a", "b"]), None);
        assert!(w.current.load().alerts.is_empty());
        // `a` was alive and is gone: its shards (no replicas here) are unprotected.
        w.install(&with_routers(12, &["b"]), None);
        let alerts = w.current.load().alerts.clone();
        assert_eq!(alerts.len(), 2, "{alerts:?}");
        assert!(
            alerts[0].starts_with("shard 1: owner a is down"),
            "{alerts:?}"
        );
        // Back: cleared.
        w.install(&with_routers(13, &["a", "b"]), None);
        assert!(w.current.load().alerts.is_empty());
    }
}
