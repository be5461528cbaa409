//! Failover with the etcd backend, against a real `etcd` (Debian's `etcd-server`), started and
//! stopped by the tests on free loopback ports (issue 3). Built with `--features etcd`.
//!
//! Faults: a DC killed outright; a router cut off from etcd by a user-space TCP proxy that drops
//! its traffic; a router process paused with SIGSTOP until its shards have moved; the failover
//! manager's DC dying before it has failed anything over. Every scenario ends with the history
//! checker, against the ownership trail recorded from etcd's watch.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::etcd_cluster::EtcdCluster;
use crate::history;
use crate::support::*;

/// A user-space TCP proxy in front of etcd for one router. While `dropping`, bytes in both
/// directions are thrown away, as a network partition would.
struct FaultProxy {
    addr: SocketAddr,
    dropping: Arc<AtomicBool>,
}

impl FaultProxy {
    async fn start(upstream: &str) -> Self {
        let upstream: SocketAddr = upstream.trim_start_matches("http://").parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dropping = Arc::new(AtomicBool::new(false));
        let flag = dropping.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, flag.clone()));
                tokio::spawn(pump(sr, cw, flag.clone()));
            }
        });
        Self { addr, dropping }
    }

    fn set_dropping(&self, drop: bool) {
        self.dropping.store(drop, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dropping: Arc<AtomicBool>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if dropping.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// One etcd endpoint for each DC's router.
fn etcd_options(endpoints: [String; 3], prefix: &str) -> Options {
    Options {
        etcd: Some((endpoints.map(|e| vec![e]), prefix.to_owned())),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_dead_dcs_shards_move_and_the_restored_dc_forwards_to_the_new_owner() {
    let etcd = EtcdCluster::start(1).await;
    let endpoint = &etcd.endpoints()[0];
    let prefix = "/loom-router/t1";
    let trail = history::record(std::slice::from_ref(endpoint), prefix).await;
    let e = endpoint.clone();
    let mut c = Cluster::start_with(etcd_options([e.clone(), e.clone(), e], prefix)).await;
    for dc in &c.dcs {
        admitting(dc).await;
    }
    let mut acked = Vec::new();
    assert_eq!(create_cluster(c.dc(EU), "e").await, "00000003");
    eventually(|| async { c.dc(EAST).loom.cluster(3).is_some() }).await;
    let r = history::write(
        &mut acked,
        c.dc(WEST),
        "POST",
        "/v2/clusters/00000003/abort",
        b"",
    )
    .await;
    assert_eq!(r.header("x-loom-served-by"), Some("eu-central"));

    c.dcs[EU].kill().await;
    until_owner(c.dc(EAST), 3, "us-east").await;
    until_owner(c.dc(WEST), 3, "us-east").await;
    for i in [EAST, WEST] {
        let r = history::write_until_admitted(
            &mut acked,
            c.dc(i),
            "POST",
            "/v2/clusters/00000003/pause",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-loom-served-by"), Some("us-east"));
    }
    let r = send("GET", &c.dc(WEST).url("/v2/clusters/00000003"), &COOPR, b"").await;
    assert_eq!(r.header("x-loom-served-by"), Some("us-west"));

    c.dcs[EU].restore_loom().await;
    c.dcs[EU].restore_router().await;
    admitting(c.dc(EU)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(shard_owner(c.dc(EU), 3).await.0, "us-east");
    let r = history::write(&mut acked, c.dc(EU), "DELETE", "/v2/clusters/00000003", b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(r.header("x-loom-served-by"), Some("us-east"));
    history::check_etcd(&c, prefix, &trail, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_router_cut_off_from_etcd_fences_itself_before_the_others_take_over() {
    let etcd = EtcdCluster::start(1).await;
    let endpoint = &etcd.endpoints()[0];
    let prefix = "/loom-router/t2";
    let trail = history::record(std::slice::from_ref(endpoint), prefix).await;
    let proxy = FaultProxy::start(endpoint).await;
    let e = endpoint.clone();
    let endpoints = [e.clone(), format!("http://{}", proxy.addr), e];
    let c = Cluster::start_with(etcd_options(endpoints, prefix)).await;
    for dc in &c.dcs {
        admitting(dc).await;
    }
    let mut acked = Vec::new();
    assert_eq!(create_cluster(c.dc(WEST), "p").await, "00000002");
    eventually(|| async { c.dc(EU).loom.cluster(2).is_some() }).await;

    proxy.set_dropping(true);
    let cut = std::time::Instant::now();
    let mut fenced_at = None;
    while cut.elapsed() < Duration::from_secs(4) {
        let r = history::write(
            &mut acked,
            c.dc(WEST),
            "POST",
            "/v2/clusters/00000002/abort",
            b"",
        )
        .await;
        if r.header("x-loom-router-error") == Some("fenced") {
            fenced_at.get_or_insert(cut.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let fenced_at = fenced_at.expect("us-west never fenced itself");
    // Fenced before etcd could expire its 2 s lease.
    assert!(fenced_at < Duration::from_secs(2), "{fenced_at:?}");
    until_owner(c.dc(EAST), 2, "eu-central").await;
    let r = history::write_until_admitted(
        &mut acked,
        c.dc(EAST),
        "POST",
        "/v2/clusters/00000002/resume",
    )
    .await;
    assert_eq!(
        r.header("x-loom-served-by"),
        Some("eu-central"),
        "{}",
        r.text()
    );
    history::check_etcd(&c, prefix, &trail, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_paused_router_that_wakes_after_its_shards_moved_does_not_write() {
    let etcd = EtcdCluster::start(1).await;
    let endpoint = &etcd.endpoints()[0];
    let prefix = "/loom-router/t3";
    let trail = history::record(std::slice::from_ref(endpoint), prefix).await;
    let e = endpoint.clone();
    let mut options = etcd_options([e.clone(), e.clone(), e], prefix);
    options.external_router[WEST] = true;
    let c = Cluster::start_with(options).await;
    let child = c.dc(WEST).spawn_router();
    for dc in &c.dcs {
        admitting(dc).await;
    }
    let mut acked = Vec::new();
    assert_eq!(create_cluster(c.dc(WEST), "z").await, "00000002");
    eventually(|| async { c.dc(EU).loom.cluster(2).is_some() }).await;

    // us-west's router stops dead (its Loom is fine): its lease runs out in etcd.
    child.signal(nix::sys::signal::Signal::SIGSTOP);
    until_owner(c.dc(EAST), 2, "eu-central").await;
    let r = history::write_until_admitted(
        &mut acked,
        c.dc(EAST),
        "POST",
        "/v2/clusters/00000002/pause",
    )
    .await;
    assert_eq!(
        r.header("x-loom-served-by"),
        Some("eu-central"),
        "{}",
        r.text()
    );

    // It wakes with an old table and a dead lease. Whatever it does, it must not write shard 2
    // at its Loom: it fences itself or forwards to the new owner.
    child.signal(nix::sys::signal::Signal::SIGCONT);
    for _ in 0..40 {
        let r = history::write(
            &mut acked,
            c.dc(WEST),
            "POST",
            "/v2/clusters/00000002/resume",
            b"",
        )
        .await;
        if r.status.is_success() {
            assert_eq!(r.header("x-loom-served-by"), Some("eu-central"));
        } else {
            assert_eq!(
                r.header("x-loom-router-error"),
                Some("fenced"),
                "{}",
                r.text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !c.dc(WEST)
            .loom
            .applied_writes()
            .iter()
            .any(|w| w.path.ends_with("/resume")),
        "the woken router wrote at its own Loom"
    );
    history::check_etcd(&c, prefix, &trail, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_when_the_failover_manager_dies_another_router_takes_over_and_fails_it_over() {
    let etcd = EtcdCluster::start(1).await;
    let endpoint = &etcd.endpoints()[0];
    let prefix = "/loom-router/t4";
    let trail = history::record(std::slice::from_ref(endpoint), prefix).await;
    let e = endpoint.clone();
    let mut c = Cluster::start_with(etcd_options([e.clone(), e.clone(), e], prefix)).await;
    for dc in &c.dcs {
        admitting(dc).await;
    }
    // Find the manager, and kill its whole DC: the failover of that DC's shards is pending on a
    // manager that no longer exists.
    let manager = get(&c.dc(EAST).admin_url("/admin/table")).await.json()["failover_manager"]
        .as_str()
        .unwrap()
        .to_owned();
    let victim = c
        .dcs
        .iter()
        .position(|d| manager.starts_with(&format!("{}-", d.name)))
        .unwrap();
    let survivor = (victim + 1) % 3;
    let victim_shard = victim as u64 + 1;
    let replica = ["us-west", "eu-central", "us-east"][victim];
    c.dcs[victim].kill().await;
    until_owner(c.dc(survivor), victim_shard, replica).await;
    let t = get(&c.dc(survivor).admin_url("/admin/table")).await.json();
    assert_ne!(t["failover_manager"].as_str().unwrap(), manager);
    history::check_etcd(&c, prefix, &trail, &[]);
}
