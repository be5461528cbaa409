//! Failover benchmark (issue 3): how long from killing a DC until the first write for its shard
//! is accepted at the new owner, and how long a planned switchover pauses writes.
//!
//! Each round starts a fresh three-DC sandbox (`loom_router::demo`, real routers and emulated
//! Looms on ephemeral ports), creates a cluster in eu-central, kills eu-central through its
//! admin front, and writes to the cluster through us-west every 10 ms until a write is answered
//! by us-east, the new owner. Then it moves shard 1 from us-east to us-west while a client writes
//! to it every 10 ms, and records the longest gap between accepted writes. Dual-owner windows
//! are counted from the emulated Looms' write logs: two DCs applying writes for one shard at one
//! epoch.
//!
//! With etcd, it also loses the etcd leader of a three-member cluster it starts itself (killed,
//! and frozen with SIGSTOP) under a write every 20 ms through every router, and reports the
//! election, the longest pause between accepted writes and the `fenced` answers.
//!
//! Run: `bench/failover.sh` (it starts an etcd for the etcd rounds), or
//! `cargo bench --bench failover` for the memory backend only. `LOOM_BENCH_ROUNDS` sets the
//! rounds per backend and profile (default 10); `LOOM_BENCH_ETCD` an etcd endpoint;
//! `LOOM_BENCH_ONLY=leader-loss` runs only the leader-loss rounds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use loom_router::demo::{Demo, DemoOptions, Profile};

#[path = "../tests/common/etcd_cluster.rs"]
mod etcd_cluster;

use etcd_cluster::EtcdCluster;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const IDENTITY: [(&str, &str); 2] = [("coopr-userid", "admin"), ("coopr-tenantid", "bench")];

struct Answer {
    status: u16,
    served_by: Option<String>,
    /// `X-Loom-Router-Error`.
    error: Option<String>,
    body: String,
}

async fn call(client: &HttpClient, method: Method, url: &str, body: &str) -> Option<Answer> {
    let mut request = Request::new(Full::new(Bytes::from(body.to_owned())));
    *request.method_mut() = method;
    *request.uri_mut() = url.parse().ok()?;
    for (k, v) in IDENTITY {
        request.headers_mut().insert(k, v.parse().ok()?);
    }
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .ok()?
        .ok()?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (served_by, error) = (header("x-loom-served-by"), header("x-loom-router-error"));
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some(Answer {
        status,
        served_by,
        error,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

async fn until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Round {
    failover: Duration,
    switchover_gap: Duration,
    switchover_reported: Duration,
    dual_owner_windows: usize,
}

/// Wait until every router of `demo` admits writes for its own shards.
async fn all_admitting(client: &HttpClient, demo: &Demo) {
    for dc in &demo.dcs {
        let table = format!("http://{}/admin/table", dc.admin);
        until(
            "routers admitting writes",
            Duration::from_secs(30),
            async || {
                call(client, Method::GET, &table, "")
                    .await
                    .and_then(|a| serde_json::from_str::<serde_json::Value>(&a.body).ok())
                    .is_some_and(|t| t["lease"]["admitting"] == true)
            },
        )
        .await;
    }
}

async fn round(client: &HttpClient, options: DemoOptions) -> Round {
    let demo = Demo::start_with(options).await.expect("sandbox starts");
    let router = |i: usize, path: &str| format!("http://{}{path}", demo.dcs[i].router);
    let admin = |i: usize, path: &str| format!("http://{}{path}", demo.dcs[i].admin);
    all_admitting(client, &demo).await;
    let create = r#"{"name":"b","clusterTemplate":"t","numMachines":1}"#;
    for i in [0, 2] {
        let a = call(client, Method::POST, &router(i, "/v2/clusters"), create)
            .await
            .expect("create");
        assert_eq!(a.status, 200, "{}", a.body);
    }
    until(
        "replication to us-east",
        Duration::from_secs(10),
        async || {
            call(client, Method::GET, &router(0, "/v2/clusters/00000003"), "")
                .await
                .is_some_and(|a| a.status == 200)
        },
    )
    .await;

    // Kill eu-central; time until us-east accepts a write for its cluster.
    let killed = Instant::now();
    let a = call(client, Method::POST, &admin(2, "/demo/kill"), "")
        .await
        .expect("kill");
    assert_eq!(a.status, 200, "{}", a.body);
    let write = router(1, "/v2/clusters/00000003/abort");
    until(
        "a write accepted at the new owner",
        Duration::from_secs(60),
        async || {
            call(client, Method::POST, &write, "")
                .await
                .is_some_and(|a| a.status == 200 && a.served_by.as_deref() == Some("us-east"))
        },
    )
    .await;
    let failover = killed.elapsed();

    // Planned switchover of shard 1 (us-east → us-west) under a steady write load.
    let writer_client = client.clone();
    let target = router(1, "/v2/clusters/00000001/abort");
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let mut last_ok = Instant::now();
        let mut longest = Duration::ZERO;
        loop {
            if stop_rx.try_recv().is_ok() {
                return longest;
            }
            if call(&writer_client, Method::POST, &target, "")
                .await
                .is_some_and(|a| a.status == 200)
            {
                longest = longest.max(last_ok.elapsed());
                last_ok = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let moved = call(
        client,
        Method::POST,
        &admin(0, "/admin/shards/1/move"),
        r#"{"to":"us-west"}"#,
    )
    .await
    .expect("move");
    assert_eq!(moved.status, 200, "{}", moved.body);
    let reported: serde_json::Value = serde_json::from_str(&moved.body).expect("move JSON");
    // Let writes resume at the new owner before stopping the writer.
    until(
        "writes at the new owner",
        Duration::from_secs(10),
        async || {
            call(
                client,
                Method::POST,
                &router(1, "/v2/clusters/00000001/abort"),
                "",
            )
            .await
            .is_some_and(|a| a.status == 200 && a.served_by.as_deref() == Some("us-west"))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_tx.send(());
    let switchover_gap = writer.await.unwrap_or_default();

    let mut writers: BTreeMap<(u64, u64), BTreeSet<String>> = BTreeMap::new();
    for dc in &demo.dcs {
        for w in dc.emulator.applied_writes() {
            if let (Some(shard), Some(epoch)) = (w.shard, w.epoch) {
                writers.entry((shard, epoch)).or_default().insert(w.dc);
            }
        }
    }
    demo.stop().await;
    Round {
        failover,
        switchover_gap,
        switchover_reported: Duration::from_millis(
            reported["write_pause_ms"].as_u64().unwrap_or(0),
        ),
        dual_owner_windows: writers.values().filter(|dcs| dcs.len() > 1).count(),
    }
}

/// How the etcd leader is lost in a leader-loss round.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// SIGKILL: its connections close at once.
    Killed,
    /// SIGSTOP: its connections stay open and unanswered (a frozen VM, a partition).
    Frozen,
}

struct LeaderLoss {
    /// From the loss until every answering member agrees on a new leader.
    election: Duration,
    /// The longest time between two accepted writes through one router.
    pause: Duration,
    fenced: usize,
    writes: usize,
}

/// One leader-loss round (issue 12): the fast profile on a three-member etcd, a write every
/// 20 ms through every router to each DC's cluster in turn (so each router writes its own shard
/// and forwards to the others), the etcd leader lost, 3 s of writes after the new leader. The
/// member is brought back before the round ends.
async fn leader_loss_round(
    client: &HttpClient,
    etcd: &mut EtcdCluster,
    loss: Loss,
    prefix: String,
) -> LeaderLoss {
    let options = DemoOptions {
        port_base: None,
        profile: Profile::FAST,
        etcd: Some((etcd.endpoints(), prefix)),
    };
    let demo = Demo::start_with(options).await.expect("sandbox starts");
    all_admitting(client, &demo).await;
    let router = |i: usize, path: &str| format!("http://{}{path}", demo.dcs[i].router);
    let create = r#"{"name":"b","clusterTemplate":"t","numMachines":1}"#;
    for i in 0..3 {
        let a = call(client, Method::POST, &router(i, "/v2/clusters"), create)
            .await
            .expect("create");
        assert_eq!(a.status, 200, "{}", a.body);
    }
    for (i, id) in [(0, 3), (1, 1), (2, 2)] {
        let read = router(i, &format!("/v2/clusters/{id:08}"));
        until("replication", Duration::from_secs(10), async || {
            call(client, Method::GET, &read, "")
                .await
                .is_some_and(|a| a.status == 200)
        })
        .await;
    }

    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let writers: Vec<_> = (0..3)
        .map(|r| {
            let (client, log, stop) = (client.clone(), log.clone(), stop.clone());
            let urls: Vec<String> = (1..=3)
                .map(|id| router(r, &format!("/v2/clusters/{id:08}/abort")))
                .collect();
            tokio::spawn(async move {
                let writing = async {
                    for url in urls.iter().cycle() {
                        let a = call(&client, Method::POST, url, "").await;
                        let (ok, fenced) = a.map_or((false, false), |a| {
                            (a.status == 200, a.error.as_deref() == Some("fenced"))
                        });
                        if let Ok(mut log) = log.lock() {
                            log.push((r, Instant::now(), ok, fenced));
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                };
                stop.run_until_cancelled(writing).await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let leader = etcd.until_leader(Duration::from_secs(10)).await;
    let lost = Instant::now();
    match loss {
        Loss::Killed => etcd.kill(leader),
        Loss::Frozen => etcd.pause(leader, true),
    }
    etcd.until_leader(Duration::from_secs(30)).await;
    let election = lost.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end = Instant::now();
    stop.cancel();
    for w in writers {
        let _ = w.await;
    }
    let log = log.lock().map(|l| l.clone()).unwrap_or_default();
    let during: Vec<_> = log.iter().filter(|w| w.1 >= lost && w.1 <= end).collect();
    let pause = (0..3)
        .map(|r| {
            let mut edges = vec![lost];
            edges.extend(during.iter().filter(|w| w.0 == r && w.2).map(|w| w.1));
            edges.push(end);
            edges
                .windows(2)
                .map(|p| p[1] - p[0])
                .max()
                .unwrap_or_default()
        })
        .max()
        .unwrap_or_default();
    demo.stop().await;
    match loss {
        Loss::Killed => etcd.restart(leader),
        Loss::Frozen => etcd.pause(leader, false),
    }
    etcd.until_leader(Duration::from_secs(30)).await;
    LeaderLoss {
        election,
        pause,
        fenced: during.iter().filter(|w| w.3).count(),
        writes: during.len(),
    }
}

/// Ten (or `rounds`) leader-loss rounds per kind of loss, on one three-member etcd.
async fn leader_loss_table(client: &HttpClient, rounds: usize) -> String {
    let mut table = String::from(
        "| etcd leader loss (fast profile) | rounds | election p50 | max | \
         write pause p50 | p99 | fenced answers (of writes) |\n|---|---|---|---|---|---|---|\n",
    );
    let mut etcd = EtcdCluster::start(3).await;
    for loss in [Loss::Killed, Loss::Frozen] {
        let mut results = Vec::new();
        for i in 0..rounds {
            let prefix = format!("/loom-bench/{}/leader/{loss:?}/{i}", std::process::id());
            let r = leader_loss_round(client, &mut etcd, loss, prefix).await;
            eprintln!(
                "leader {loss:?} round {}: election {}, pause {}, {} fenced of {} writes",
                i + 1,
                secs(r.election),
                secs(r.pause),
                r.fenced,
                r.writes
            );
            results.push(r);
        }
        let elections: Vec<Duration> = results.iter().map(|r| r.election).collect();
        let pauses: Vec<Duration> = results.iter().map(|r| r.pause).collect();
        table.push_str(&format!(
            "| {} | {rounds} | {} | {} | {} | {} | {} ({}) |\n",
            match loss {
                Loss::Killed => "leader killed (SIGKILL)",
                Loss::Frozen => "leader frozen (SIGSTOP)",
            },
            secs(percentile(&elections, 50.0)),
            secs(percentile(&elections, 100.0)),
            secs(percentile(&pauses, 50.0)),
            secs(percentile(&pauses, 99.0)),
            results.iter().map(|r| r.fenced).sum::<usize>(),
            results.iter().map(|r| r.writes).sum::<usize>(),
        ));
    }
    table
}

/// The p-th percentile (nearest rank) of `values`.
fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let rounds: usize = std::env::var("LOOM_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let etcd = std::env::var("LOOM_BENCH_ETCD").ok();
    // `leader-loss`: only the etcd leader-loss rows.
    let only = std::env::var("LOOM_BENCH_ONLY").ok();
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut backends = vec![("memory", None)];
    if let Some(endpoint) = &etcd {
        backends.push(("etcd", Some(endpoint.clone())));
    }
    if only.as_deref() == Some("leader-loss") {
        backends.clear();
    }
    let kill_rows = !backends.is_empty();
    let mut table = String::from(
        "| backend | profile | rounds | kill → first write at new owner p50 | p99 | max | \
         switchover write pause p50 | p99 (client) | p99 (router) | dual-owner windows |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (backend, endpoint) in backends {
        if backend == "etcd" && !cfg!(feature = "etcd") {
            eprintln!("skipping etcd: build with --features etcd");
            continue;
        }
        let profiles = [
            ("default (lease 5 s)", Profile::DEFAULT),
            ("fast (lease 3 s)", Profile::FAST),
        ];
        for (p, (name, profile)) in profiles.into_iter().enumerate() {
            let mut results = Vec::new();
            for i in 0..rounds {
                let options = DemoOptions {
                    port_base: None,
                    profile,
                    etcd: endpoint.clone().map(|e| {
                        (
                            vec![e],
                            format!("/loom-bench/{}/{p}/{i}", std::process::id()),
                        )
                    }),
                };
                let r = round(&client, options).await;
                eprintln!(
                    "{backend} {name} round {}: failover {}, switchover gap {} (router says {}), dual-owner windows {}",
                    i + 1,
                    secs(r.failover),
                    secs(r.switchover_gap),
                    secs(r.switchover_reported),
                    r.dual_owner_windows
                );
                results.push(r);
            }
            let failovers: Vec<Duration> = results.iter().map(|r| r.failover).collect();
            let gaps: Vec<Duration> = results.iter().map(|r| r.switchover_gap).collect();
            let reported: Vec<Duration> = results.iter().map(|r| r.switchover_reported).collect();
            table.push_str(&format!(
                "| {backend} | {name} | {rounds} | {} | {} | {} | {} | {} | {} | {} |\n",
                secs(percentile(&failovers, 50.0)),
                secs(percentile(&failovers, 99.0)),
                secs(percentile(&failovers, 100.0)),
                secs(percentile(&gaps, 50.0)),
                secs(percentile(&gaps, 99.0)),
                secs(percentile(&reported, 99.0)),
                results.iter().map(|r| r.dual_owner_windows).sum::<usize>(),
            ));
        }
    }
    if kill_rows {
        println!("{table}");
    }
    if etcd.is_some() && cfg!(feature = "etcd") {
        println!("{}", leader_loss_table(&client, rounds).await);
    }
}
