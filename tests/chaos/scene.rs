//! The chaos scene: a three-member etcd, three DCs coordinating through it in the fast profile
//! (lease 3 s, keepalive 500 ms, write 1 s), a cluster homed in each DC, and steady writes
//! through every router: every 20 ms, a write to each DC's cluster in turn, so that each router
//! serves writes for its own shard and forwards the others.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use loom_router::demo::sandbox::Profile;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::etcd_cluster::EtcdCluster;
use crate::history::{self, Acked, Trail};
use crate::support::*;

/// The clusters written to: one homed in each DC (us-east 1, us-west 2, eu-central 3).
pub const CLUSTERS: [u64; 3] = [1, 2, 3];
/// A write to each cluster in turn, this often, through each router.
const EVERY: Duration = Duration::from_millis(20);

/// What one write got.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The DC whose router it was sent through.
    pub router: usize,
    pub cluster: u64,
    pub sent: Instant,
    pub done: Instant,
    /// 0 when no HTTP answer came (connection refused or reset, or 10 s passed).
    pub status: u16,
    /// `X-Loom-Router-Error`.
    pub error: Option<String>,
    pub served_by: Option<String>,
    pub path: String,
}

impl Answer {
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn fenced(&self) -> bool {
        self.status == 503 && self.error.as_deref() == Some("fenced")
    }
}

pub type Answers = Arc<Mutex<Vec<Answer>>>;

pub struct Scene {
    pub etcd: EtcdCluster,
    pub c: Cluster,
    pub prefix: String,
    trail: Trail,
    pub answers: Answers,
    stop: CancellationToken,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl Scene {
    /// Start everything, and the writers through every router. A DC in `external` has no
    /// router yet: the test spawns it as a child process, then calls [`Scene::write`].
    pub async fn start(prefix: &str, external: Option<usize>) -> Self {
        let etcd = EtcdCluster::start(3).await;
        let trail = history::record(&etcd.endpoints(), prefix).await;
        let endpoints = etcd.endpoints();
        let mut options = Options {
            etcd: Some((
                [endpoints.clone(), endpoints.clone(), endpoints],
                prefix.to_owned(),
            )),
            profile: Some(Profile::FAST),
            ..Options::default()
        };
        if let Some(dc) = external {
            options.external_router[dc] = true;
        }
        let c = Cluster::start_with(options).await;
        Self {
            etcd,
            c,
            prefix: prefix.to_owned(),
            trail,
            answers: Answers::default(),
            stop: CancellationToken::new(),
            writers: Vec::new(),
        }
    }

    /// Wait until every router admits, create a cluster in each DC, wait until every Loom has
    /// them all, and start writing.
    pub async fn write(&mut self) {
        all_admitting(&self.c).await;
        for (dc, id) in CLUSTERS.iter().enumerate() {
            assert_eq!(
                create_cluster(self.c.dc(dc), "chaos").await,
                format!("{id:08}")
            );
        }
        for dc in &self.c.dcs {
            eventually(|| async { CLUSTERS.iter().all(|&id| dc.loom.cluster(id).is_some()) }).await;
        }
        for dc in 0..3 {
            let base = self.c.dc(dc).url("");
            let (answers, stop) = (self.answers.clone(), self.stop.clone());
            self.writers
                .push(tokio::spawn(writer(dc, base, answers, stop)));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    /// Stop writing, and return every answer.
    pub async fn stop_writing(&mut self) -> Vec<Answer> {
        self.stop.cancel();
        for w in self.writers.drain(..) {
            let _ = w.await;
        }
        self.answers.lock().unwrap().clone()
    }

    /// The owner and epoch of each of [`CLUSTERS`]' shards, as `dc`'s router sees them.
    pub async fn owners(&self, dc: usize) -> Vec<(String, u64)> {
        let mut owners = Vec::new();
        for shard in CLUSTERS {
            owners.push(shard_owner(self.c.dc(dc), shard).await);
        }
        owners
    }

    /// The history checker over everything that happened, with the acknowledged writes.
    pub fn check(&self, answers: &[Answer]) {
        let acked: Vec<Acked> = answers
            .iter()
            .filter(|a| a.accepted())
            .map(|a| Acked {
                served_by: a.served_by.clone().unwrap(),
                method: "POST".to_owned(),
                path: a.path.clone(),
            })
            .collect();
        history::check_etcd(&self.c, &self.prefix, &self.trail, &acked);
    }
}

/// Write through `dc`'s router until `stop`.
async fn writer(dc: usize, base: String, answers: Answers, stop: CancellationToken) {
    let writing = async {
        loop {
            for cluster in CLUSTERS {
                let answer = write(dc, &base, cluster).await;
                answers.lock().unwrap().push(answer);
                tokio::time::sleep(EVERY).await;
            }
        }
    };
    stop.run_until_cancelled(writing).await;
}

/// One write to `cluster` through the router at `base`.
pub async fn write(router: usize, base: &str, cluster: u64) -> Answer {
    let path = format!("/v2/clusters/{cluster:08}/abort");
    let mut request = Request::post(format!("{base}{path}"));
    for (k, v) in COOPR {
        request = request.header(k, v);
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    let sent = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), client().request(request)).await;
    let (status, error, served_by) = match answer {
        Ok(Ok(response)) => {
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let parts = (
                response.status().as_u16(),
                header("x-loom-router-error"),
                header("x-loom-served-by"),
            );
            let _ = response.into_body().collect().await;
            parts
        }
        _ => (0, None, None),
    };
    Answer {
        router,
        cluster,
        sent,
        done: Instant::now(),
        status,
        error,
        served_by,
        path,
    }
}

/// The longest time between two accepted writes through `router` that ended in `[from, to]`,
/// counting the edges of the window.
pub fn longest_pause(answers: &[Answer], router: usize, from: Instant, to: Instant) -> Duration {
    let mut times: Vec<Instant> = answers
        .iter()
        .filter(|a| a.router == router && a.accepted() && a.done >= from && a.done <= to)
        .map(|a| a.done)
        .collect();
    times.sort();
    let mut edges = vec![from];
    edges.extend(times);
    edges.push(to);
    edges
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// Answers sent in `[from, to)`.
pub fn sent_between(answers: &[Answer], from: Instant, to: Instant) -> Vec<&Answer> {
    answers
        .iter()
        .filter(|a| a.sent >= from && a.sent < to)
        .collect()
}
