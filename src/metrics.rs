//! Metric names, descriptions and the Prometheus recorder (docs/operations.md).
//!
//! Every metric name is a constant here, and every label set is small and fixed: routes, status
//! codes, DC names and error kinds, never cluster IDs. Other files record through the helpers
//! below instead of naming metrics themselves, so this file is the checklist of what the router
//! exports. When adding a metric: add the constant, describe it in [`describe`], add a helper.
//!
//! This file must not decide what to record; callers do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::shard::ShardKey;

pub const REQUESTS_TOTAL: &str = "loom_router_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "loom_router_request_duration_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "loom_router_upstream_errors_total";
pub const TABLE_EPOCH: &str = "loom_router_table_epoch";
pub const DATACENTER_UP: &str = "loom_router_datacenter_up";
pub const FAILOVERS_TOTAL: &str = "loom_router_failovers_total";
pub const CONFIG_RELOADS_TOTAL: &str = "loom_router_config_reloads_total";
pub const INFLIGHT_REQUESTS: &str = "loom_router_inflight_requests";
pub const FENCED_WRITES_TOTAL: &str = "loom_router_fenced_writes_total";
pub const LEASE_REMAINING_SECONDS: &str = "loom_router_lease_remaining_seconds";
pub const SHARD_UNPROTECTED: &str = "loom_router_shard_unprotected";
pub const BUILD_INFO: &str = "loom_router_build_info";
pub const RETRIES_TOTAL: &str = "loom_router_retries_total";
pub const OPEN_CONNECTIONS: &str = "loom_router_open_connections";
pub const WORKER_CONNECTIONS_TOTAL: &str = "loom_router_worker_connections_total";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "loom_router_tls_handshake_failures_total";
pub const CLIENT_ERRORS_TOTAL: &str = "loom_router_client_errors_total";
pub const TRACKED_CLUSTERS: &str = "loom_router_tracked_clusters";
pub const SHARD_MOVED: &str = "loom_router_shard_moved";
pub const FAILOVER_MANAGER_ELECTED: &str = "loom_router_failover_manager_elected";
pub const OWNERSHIP_CONFLICTS_TOTAL: &str = "loom_router_ownership_conflicts_total";
pub const READY: &str = "loom_router_ready";

/// Every metric the router exports: what dashboards and alert rules may name
/// (`tests/monitoring.rs` holds `config/monitoring/` to it).
pub const ALL: [&str; 23] = [
    REQUESTS_TOTAL,
    REQUEST_DURATION_SECONDS,
    UPSTREAM_ERRORS_TOTAL,
    TABLE_EPOCH,
    DATACENTER_UP,
    FAILOVERS_TOTAL,
    CONFIG_RELOADS_TOTAL,
    INFLIGHT_REQUESTS,
    FENCED_WRITES_TOTAL,
    LEASE_REMAINING_SECONDS,
    SHARD_UNPROTECTED,
    BUILD_INFO,
    RETRIES_TOTAL,
    OPEN_CONNECTIONS,
    WORKER_CONNECTIONS_TOTAL,
    TLS_HANDSHAKE_FAILURES_TOTAL,
    CLIENT_ERRORS_TOTAL,
    TRACKED_CLUSTERS,
    SHARD_MOVED,
    FAILOVER_MANAGER_ELECTED,
    OWNERSHIP_CONFLICTS_TOTAL,
    READY,
    // The histogram's series carry suffixes; the name itself is REQUEST_DURATION_SECONDS.
    "loom_router_request_duration_seconds_bucket",
];

/// The codes of client faults the router answers itself (`RouterError::is_client_fault`), listed
/// so that every `client_errors_total` series exists before its first error.
pub const CLIENT_ERROR_KINDS: [&str; 8] = [
    "bad_request",
    "bad_cluster_id",
    "bad_path",
    "peer_unauthenticated",
    "unassigned_shard",
    "client_timeout",
    "body_too_large",
    "headers_too_large",
];

/// Latency buckets, in seconds: fine-grained below 10 ms where a local proxy hop lives, coarse
/// up to the 30 s default request timeout.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often the recorder folds recorded histogram samples into its buckets. Until it does,
/// every sample is kept: a router that nothing scraped grew by ~21 bytes a request. At 50,000
/// requests a second this bounds what waits to ~0.4 MB.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Install the global Prometheus recorder, describe every metric and start the recorder's
/// upkeep. Call once per process; later calls (several routers in one demo process) share the
/// first recorder.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(REQUEST_DURATION_SECONDS.to_owned()),
                    DURATION_BUCKETS,
                )
                .map(PrometheusBuilder::build_recorder);
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    if metrics::set_global_recorder(recorder).is_err() {
                        tracing::warn!("a metrics recorder was already installed");
                    }
                    describe();
                    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
                    start_upkeep(handle.clone());
                    handle
                }
                Err(e) => {
                    // Only reachable with an empty bucket list, which is a constant above.
                    tracing::error!(error = %e, "cannot build the metrics recorder");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

/// Run the recorder's upkeep every [`UPKEEP_INTERVAL`], for the life of the process, as
/// `metrics-exporter-prometheus` asks of a recorder built with `build_recorder` (its
/// `install_recorder` would start the same thread, but also insist on being the only recorder
/// and on its own listener). A thread, not a task: the recorder outlives every runtime.
fn start_upkeep(handle: PrometheusHandle) {
    let upkeep = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    if let Err(e) = upkeep {
        tracing::error!(error = %e, "cannot start the metrics upkeep; histograms grow until scraped");
    }
}

/// Describe every metric, so `/metrics` carries HELP and TYPE lines.
pub fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered, by route and status code."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from request head to response head, by route."
    );
    describe_counter!(
        UPSTREAM_ERRORS_TOTAL,
        "Transport failures talking to a Loom or a peer router, by target DC and kind."
    );
    describe_gauge!(
        TABLE_EPOCH,
        "Epoch of the ownership table this router serves."
    );
    describe_gauge!(DATACENTER_UP, "1 if health checks find the DC up, else 0.");
    describe_counter!(FAILOVERS_TOTAL, "Shards moved to another DC by failover.");
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "Config reloads, by result (ok or error)."
    );
    describe_gauge!(INFLIGHT_REQUESTS, "Requests being handled right now.");
    describe_counter!(
        FENCED_WRITES_TOTAL,
        "Writes refused with 503 fenced because this DC may not admit them now."
    );
    describe_gauge!(
        LEASE_REMAINING_SECONDS,
        "Seconds this router's coordination lease is certain to remain valid."
    );
    describe_gauge!(
        SHARD_UNPROTECTED,
        "1 when a shard's owner is down and no replica is alive."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
    describe_gauge!(
        OPEN_CONNECTIONS,
        "Client connections open on the data listeners, by listener (http or https)."
    );
    describe_counter!(
        WORKER_CONNECTIONS_TOTAL,
        "Client connections accepted, by request worker ([runtime] workers)."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES_TOTAL,
        "TLS handshakes on the https listener that failed or timed out."
    );
    describe_counter!(
        CLIENT_ERRORS_TOTAL,
        "Client faults the router answered itself, by error code (bad_path, client_timeout...)."
    );
    describe_gauge!(
        TRACKED_CLUSTERS,
        "Clusters this router sends reads of to their owner, after a write it forwarded."
    );
    describe_gauge!(
        SHARD_MOVED,
        "1 while a shard's owner is not its home DC: a failback to plan."
    );
    describe_gauge!(
        FAILOVER_MANAGER_ELECTED,
        "1 while the coordination store names a failover manager (memory and etcd only)."
    );
    describe_counter!(
        OWNERSHIP_CONFLICTS_TOTAL,
        "Forwarded writes answered 503 ownership_conflict: the routers disagreed on the owner."
    );
    describe_gauge!(
        READY,
        "1 while /readyz answers 200: a table, a healthy local Loom, not draining."
    );
    describe_counter!(
        RETRIES_TOTAL,
        "Requests sent again, by reason (misdirected or reset)."
    );
}

/// The per-request metrics, with their handles looked up once per label set.
///
/// `counter!` with labels builds a key and finds it in the recorder's registry on every call:
/// callgrind put that at about 2,000 instructions of a proxied read, for three metrics. The
/// proxy owns one of these, made after [`install`], and records through the cached handles. A
/// route is an index the caller assigns (its route enum), so finding a route's handles hashes
/// nothing; a route's status codes are a short list, scanned.
#[derive(Debug)]
pub struct RequestMetrics {
    inflight: Gauge,
    routes: Box<[RouteCells]>,
}

/// One route of [`RequestMetrics`]: its index there and its label.
#[derive(Debug, Clone, Copy)]
pub struct RouteLabel {
    pub index: usize,
    pub name: &'static str,
}

#[derive(Debug, Default)]
struct RouteCells {
    /// Made on the route's first request, so that a route never taken exports no series.
    duration: OnceLock<Histogram>,
    /// By status code; a route sees a handful.
    counts: RwLock<Vec<(u16, Counter)>>,
    /// The same requests as plain counters the router can read back, for the status page's
    /// traffic over the last minute: the exporter's handles are write-only.
    name: OnceLock<&'static str>,
    /// By status class, 1xx to 5xx.
    classes: [AtomicU64; 5],
    /// By latency, in [`DURATION_BUCKETS`] and one more for anything slower.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
}

/// One route's requests so far, as [`RequestMetrics::totals`] reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTotals {
    pub route: &'static str,
    /// By status class, 1xx to 5xx.
    pub classes: [u64; 5],
    /// By latency bucket: upper bounds [`latency_bounds`], then one for anything slower.
    pub buckets: Vec<u64>,
}

/// The upper bounds of the latency buckets [`RouteTotals::buckets`] counts, in seconds.
pub fn latency_bounds() -> &'static [f64] {
    DURATION_BUCKETS
}

impl RequestMetrics {
    /// Cells for routes `0..routes`.
    pub fn new(routes: usize) -> Self {
        Self {
            inflight: gauge!(INFLIGHT_REQUESTS),
            routes: (0..routes).map(|_| RouteCells::default()).collect(),
        }
    }

    /// Record one answered request.
    pub fn request(&self, route: RouteLabel, status: u16, elapsed: Duration) {
        let Some(cells) = self.routes.get(route.index) else {
            return;
        };
        let counted = {
            let counts = cells.counts.read().unwrap_or_else(PoisonError::into_inner);
            let found = counts.iter().find(|(code, _)| *code == status);
            found.map(|(_, counter)| counter.increment(1)).is_some()
        };
        if !counted {
            let counter =
                counter!(REQUESTS_TOTAL, "route" => route.name, "code" => status_label(status));
            counter.increment(1);
            let mut counts = cells.counts.write().unwrap_or_else(PoisonError::into_inner);
            // Another worker may have added it meanwhile; both handles count the same series.
            if !counts.iter().any(|(code, _)| *code == status) {
                counts.push((status, counter));
            }
        }
        let seconds = elapsed.as_secs_f64();
        cells
            .duration
            .get_or_init(|| histogram!(REQUEST_DURATION_SECONDS, "route" => route.name))
            .record(seconds);
        cells.name.get_or_init(|| route.name);
        if let Some(class) = cells.classes.get(usize::from(status / 100).wrapping_sub(1)) {
            class.fetch_add(1, Ordering::Relaxed);
        }
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        cells.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Every route taken so far, with its requests by status class and latency bucket.
    pub fn totals(&self) -> Vec<RouteTotals> {
        self.routes
            .iter()
            .filter_map(|cells| {
                Some(RouteTotals {
                    route: cells.name.get()?,
                    classes: std::array::from_fn(|i| cells.classes[i].load(Ordering::Relaxed)),
                    buckets: cells
                        .buckets
                        .iter()
                        .map(|b| b.load(Ordering::Relaxed))
                        .collect(),
                })
            })
            .collect()
    }

    /// Count a request in `loom_router_inflight_requests` until the guard is dropped.
    pub fn inflight(&self) -> InflightGuard<'_> {
        self.inflight.increment(1.0);
        InflightGuard(&self.inflight)
    }
}

/// Counts a request in flight until dropped; see [`RequestMetrics::inflight`].
#[derive(Debug)]
pub struct InflightGuard<'a>(&'a Gauge);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

pub fn upstream_error(target: &str, kind: &'static str) {
    counter!(UPSTREAM_ERRORS_TOTAL, "target" => target.to_owned(), "kind" => kind).increment(1);
}

pub fn set_table_epoch(epoch: u64) {
    gauge!(TABLE_EPOCH).set(epoch as f64);
}

pub fn set_datacenter_up(dc: &str, up: bool) {
    gauge!(DATACENTER_UP, "datacenter" => dc.to_owned()).set(if up { 1.0 } else { 0.0 });
}

/// A client fault the router answered itself (`kind` is the error code). Never an upstream
/// error: a client must not be able to trip the alerts on Loom's health.
pub fn client_error(kind: &'static str) {
    counter!(CLIENT_ERRORS_TOTAL, "kind" => kind).increment(1);
}

pub fn set_tracked_clusters(n: usize) {
    gauge!(TRACKED_CLUSTERS).set(n as f64);
}

pub fn fenced_write() {
    counter!(FENCED_WRITES_TOTAL).increment(1);
}

pub fn retry(reason: &'static str) {
    counter!(RETRIES_TOTAL, "reason" => reason).increment(1);
}

/// Status codes as labels. The common ones are static strings, so recording a request
/// allocates nothing; any other code is still its own number, as the spec asks.
fn status_label(status: u16) -> metrics::SharedString {
    let known = match status {
        200 => "200",
        201 => "201",
        204 => "204",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        417 => "417",
        421 => "421",
        431 => "431",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        508 => "508",
        other => return metrics::SharedString::from(other.to_string()),
    };
    metrics::SharedString::const_str(known)
}

pub fn set_lease_remaining(remaining: Duration) {
    gauge!(LEASE_REMAINING_SECONDS).set(remaining.as_secs_f64());
}

pub fn failover() {
    counter!(FAILOVERS_TOTAL).increment(1);
}

pub fn set_shard_moved(shard: &str, moved: bool) {
    gauge!(SHARD_MOVED, "shard" => shard.to_owned()).set(if moved { 1.0 } else { 0.0 });
}

pub fn set_failover_manager_elected(elected: bool) {
    gauge!(FAILOVER_MANAGER_ELECTED).set(if elected { 1.0 } else { 0.0 });
}

pub fn ownership_conflict() {
    counter!(OWNERSHIP_CONFLICTS_TOTAL).increment(1);
}

pub fn set_ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}

pub fn set_shard_unprotected(shard: &str, unprotected: bool) {
    gauge!(SHARD_UNPROTECTED, "shard" => shard.to_owned()).set(if unprotected { 1.0 } else { 0.0 });
}

/// Create every spec metric with its label sets, so `/metrics` lists them from the start (the
/// exporter only prints series that exist). Adds zero: safe when several routers share the
/// recorder, as in the demo. Takes the DC names and shard keys, not the config: this module is a
/// leaf that everything records into, and depends on nothing that records.
pub fn register<'a>(
    datacenters: impl IntoIterator<Item = &'a str>,
    shards: impl IntoIterator<Item = ShardKey>,
) {
    counter!(FAILOVERS_TOTAL).increment(0);
    counter!(FENCED_WRITES_TOTAL).increment(0);
    counter!(TLS_HANDSHAKE_FAILURES_TOTAL).increment(0);
    counter!(OWNERSHIP_CONFLICTS_TOTAL).increment(0);
    gauge!(READY).increment(0.0);
    gauge!(TRACKED_CLUSTERS).increment(0.0);
    for listener in ["http", "https"] {
        gauge!(OPEN_CONNECTIONS, "listener" => listener).increment(0.0);
    }
    for result in ["ok", "error"] {
        counter!(CONFIG_RELOADS_TOTAL, "result" => result).increment(0);
    }
    for kind in CLIENT_ERROR_KINDS {
        counter!(CLIENT_ERRORS_TOTAL, "kind" => kind).increment(0);
    }
    gauge!(INFLIGHT_REQUESTS).increment(0.0);
    gauge!(LEASE_REMAINING_SECONDS).increment(0.0);
    gauge!(TABLE_EPOCH).increment(0.0);
    for dc in datacenters {
        gauge!(DATACENTER_UP, "datacenter" => dc.to_owned()).increment(0.0);
        for kind in ["connect", "timeout", "reset", "tls"] {
            counter!(UPSTREAM_ERRORS_TOTAL, "target" => dc.to_owned(), "kind" => kind).increment(0);
        }
    }
    for shard in shards {
        gauge!(SHARD_UNPROTECTED, "shard" => shard.to_string()).increment(0.0);
        gauge!(SHARD_MOVED, "shard" => shard.to_string()).increment(0.0);
    }
}

pub fn config_reload(ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!(CONFIG_RELOADS_TOTAL, "result" => result).increment(1);
}

/// Counts one client connection in `loom_router_open_connections` until dropped.
#[derive(Debug)]
pub struct OpenConnection(&'static str);

impl OpenConnection {
    pub fn start(listener: &'static str) -> Self {
        gauge!(OPEN_CONNECTIONS, "listener" => listener).increment(1.0);
        Self(listener)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        gauge!(OPEN_CONNECTIONS, "listener" => self.0).decrement(1.0);
    }
}

/// The counter of client connections request worker `worker` accepted, for its accept loop to
/// hold (one label formatted per listener, not per connection).
pub fn worker_connections(worker: usize) -> metrics::Counter {
    counter!(WORKER_CONNECTIONS_TOTAL, "worker" => worker.to_string())
}

pub fn tls_handshake_failed() {
    counter!(TLS_HANDSHAKE_FAILURES_TOTAL).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Render what `f` records, with a recorder local to this test.
    fn rendered(f: impl FnOnce()) -> String {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(REQUEST_DURATION_SECONDS.to_owned()),
                DURATION_BUCKETS,
            )
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            f();
        });
        handle.render()
    }

    #[test]
    fn a_request_is_counted_by_route_and_numeric_code_with_its_latency() {
        let text = rendered(|| {
            let metrics = RequestMetrics::new(2);
            let forwarded = RouteLabel {
                index: 0,
                name: "write-forwarded",
            };
            let read = RouteLabel {
                index: 1,
                name: "read",
            };
            metrics.request(forwarded, 200, Duration::from_millis(3));
            metrics.request(forwarded, 200, Duration::from_millis(3));
            metrics.request(read, 418, Duration::from_micros(300));
            metrics.request(read, 200, Duration::from_micros(300));
        });
        assert!(
            text.contains("# TYPE loom_router_requests_total counter"),
            "{text}"
        );
        assert!(
            text.contains("loom_router_requests_total{route=\"write-forwarded\",code=\"200\"} 2"),
            "{text}"
        );
        // Codes without a static label are still their own number.
        assert!(
            text.contains("loom_router_requests_total{route=\"read\",code=\"418\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("loom_router_requests_total{route=\"read\",code=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "loom_router_request_duration_seconds_bucket{route=\"write-forwarded\",le=\"0.005\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "loom_router_request_duration_seconds_bucket{route=\"read\",le=\"0.0005\"} 2"
            ),
            "{text}"
        );
    }

    #[test]
    fn requests_in_flight_are_counted_until_their_guard_drops() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let metrics = RequestMetrics::new(1);
            let first = metrics.inflight();
            let second = metrics.inflight();
            drop(first);
            assert!(handle
                .render()
                .contains("loom_router_inflight_requests 1\n"));
            drop(second);
            assert!(handle
                .render()
                .contains("loom_router_inflight_requests 0\n"));
        });
    }

    #[test]
    fn every_spec_metric_exists_from_the_start() {
        let dcs = ["us-east", "us-west", "eu-central"];
        let shards = [ShardKey::Residue(1), ShardKey::Global];
        let text = rendered(|| register(dcs, shards));
        for name in [
            UPSTREAM_ERRORS_TOTAL,
            TABLE_EPOCH,
            DATACENTER_UP,
            FAILOVERS_TOTAL,
            CONFIG_RELOADS_TOTAL,
            INFLIGHT_REQUESTS,
            FENCED_WRITES_TOTAL,
            LEASE_REMAINING_SECONDS,
            SHARD_UNPROTECTED,
            OPEN_CONNECTIONS,
            CLIENT_ERRORS_TOTAL,
            OWNERSHIP_CONFLICTS_TOTAL,
            READY,
            TRACKED_CLUSTERS,
            SHARD_MOVED,
        ] {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} not described"
            );
            assert!(
                text.contains(&format!("\n{name}")),
                "{name} has no series:\n{text}"
            );
        }
        assert!(text.contains("loom_router_datacenter_up{datacenter=\"eu-central\"} 0"));
        assert!(
            text.contains("loom_router_upstream_errors_total{target=\"us-west\",kind=\"tls\"} 0")
        );
        assert!(text.contains("loom_router_shard_unprotected{shard=\"global\"} 0"));
        assert!(text.contains("loom_router_client_errors_total{kind=\"client_timeout\"} 0"));
    }
}
