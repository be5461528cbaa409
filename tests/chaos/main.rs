//! Chaos tests (issue 12): faults of a real three-member etcd (Debian's `etcd-server`) and of a
//! router, under steady writes through every router (`scene.rs`). Each ends with the history
//! checker of `tests/integration/history.rs`, against the ownership trail recorded from etcd.
//!
//! They time pauses, so they run one at a time, in their own test binary: cargo runs test
//! binaries one after another, so no other test competes with them for the CPU.

// Test support panics on purpose: a failed setup is a failed test.
#![allow(clippy::unwrap_used)]
// The support modules are shared with tests/integration; these tests use part of them.
#![allow(dead_code)]

#[path = "../integration/certs.rs"]
mod certs;
#[path = "../common/etcd_cluster.rs"]
mod etcd_cluster;
#[path = "../integration/history.rs"]
mod history;
mod scene;
#[path = "../integration/support.rs"]
mod support;

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use scene::{longest_pause, sent_between, Answer, Scene, CLUSTERS};
use support::*;

/// The DC each of [`CLUSTERS`] is homed in.
const HOMES: [&str; 3] = ["us-east", "us-west", "eu-central"];
/// The fast profile's lease: quorum losses and pauses outlast it.
const LEASE: Duration = Duration::from_secs(3);
/// The fast profile's write timeout.
const WRITE: Duration = Duration::from_secs(1);

/// Run one scenario on its own runtime, never two at once.
fn scenario<F: Future<Output = ()>>(test: impl FnOnce() -> F) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test());
}

/// Every answer is accepted, or fenced.
fn accepted_or_fenced(answers: &[&Answer]) {
    for a in answers {
        assert!(a.accepted() || a.fenced(), "{a:?}");
    }
}

/// How the etcd leader is lost.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// SIGKILL: its connections are closed at once.
    Killed,
    /// SIGSTOP: its connections stay open and unanswered, as with a frozen VM or a partition.
    Frozen,
}

/// Lose the etcd leader under steady writes; the targets of issue 12.
async fn leader_loss(prefix: &str, loss: Loss) {
    let mut s = Scene::start(prefix, None).await;
    s.write().await;
    let owners = s.owners(0).await;
    let leader = s.etcd.until_leader(Duration::from_secs(5)).await;

    let lost = Instant::now();
    match loss {
        Loss::Killed => s.etcd.kill(leader),
        Loss::Frozen => s.etcd.pause(leader, true),
    }
    s.etcd.until_leader(Duration::from_secs(10)).await;
    let election = lost.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end = Instant::now();
    let answers = s.stop_writing().await;

    let during = sent_between(&answers, lost, end);
    let fenced = during.iter().filter(|a| a.fenced()).count();
    let pause = (0..3)
        .map(|r| longest_pause(&answers, r, lost, end))
        .max()
        .unwrap();
    eprintln!(
        "etcd leader {loss:?}: election {election:?}, {} writes, {fenced} fenced, longest pause {pause:?}",
        during.len()
    );
    accepted_or_fenced(&during);
    if election <= Duration::from_secs(1) {
        assert_eq!(fenced, 0, "fenced although etcd elected in {election:?}");
    }
    // A slower election may make a correct router fence once its lease is no longer certain:
    // the allowance grows by what the election took beyond 1.5 s.
    let allowed = Duration::from_millis(500) + election.saturating_sub(Duration::from_millis(1500));
    assert!(
        pause <= allowed,
        "writes paused {pause:?} (allowed {allowed:?})"
    );
    for dc in 0..3 {
        assert_eq!(s.owners(dc).await, owners, "an etcd election moved a shard");
    }
    s.check(&answers);
}

#[test]
fn chaos_a_killed_etcd_leader_fences_no_write_and_barely_pauses_them() {
    scenario(|| leader_loss("/loom-router/chaos1", Loss::Killed));
}

#[test]
fn chaos_a_frozen_etcd_leader_fences_no_write_and_barely_pauses_them() {
    scenario(|| leader_loss("/loom-router/chaos5", Loss::Frozen));
}

/// Take away etcd's quorum for twice the lease: the members `lose` picks, given the leader.
async fn quorum_loss(prefix: &str, lose: impl Fn(usize) -> Vec<usize>) {
    let mut s = Scene::start(prefix, None).await;
    s.write().await;
    let owners = s.owners(0).await;
    let leader = s.etcd.until_leader(Duration::from_secs(5)).await;

    let cut = Instant::now();
    let lost = lose(leader);
    for &m in &lost {
        s.etcd.kill(m);
    }
    tokio::time::sleep(2 * LEASE).await;
    let back = Instant::now();
    for &m in &lost {
        s.etcd.restart(m);
    }
    s.etcd.until_leader(Duration::from_secs(15)).await;
    let quorum = Instant::now();
    // Writes resume, at the same owners, within 10 s of quorum.
    let resumed = |answers: &[Answer]| {
        (0..3).all(|r| {
            CLUSTERS.iter().all(|&c| {
                answers
                    .iter()
                    .any(|a| a.router == r && a.cluster == c && a.accepted() && a.sent >= quorum)
            })
        })
    };
    while !resumed(&s.answers.lock().unwrap()) {
        assert!(
            quorum.elapsed() < Duration::from_secs(10),
            "writes did not resume within 10 s of quorum"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "quorum loss: writes resumed {:?} after quorum",
        quorum.elapsed()
    );
    let answers = s.stop_writing().await;

    // Once every lease it renewed before the cut has run out (plus a write's length), every
    // router refuses every write, and no Loom applies any.
    let fenced_from = cut + LEASE + WRITE;
    let during = sent_between(&answers, fenced_from, back);
    for r in 0..3 {
        assert!(
            during.iter().any(|a| a.router == r),
            "no write through router {r}"
        );
    }
    for a in &during {
        assert!(a.fenced(), "{a:?} during the quorum loss");
    }
    for dc in &s.c.dcs {
        let applied = dc.loom.applied_writes();
        let late = applied.iter().find(|w| w.at >= fenced_from && w.at < back);
        assert!(late.is_none(), "{late:?} applied without quorum");
    }
    for a in answers.iter().filter(|a| a.sent >= quorum && a.accepted()) {
        let home = HOMES[CLUSTERS.iter().position(|&c| c == a.cluster).unwrap()];
        assert_eq!(a.served_by.as_deref(), Some(home), "{a:?}");
    }
    for dc in 0..3 {
        assert_eq!(s.owners(dc).await, owners, "a quorum loss moved a shard");
    }
    s.check(&answers);
}

#[test]
fn chaos_a_quorum_loss_of_the_leader_and_a_follower_fences_every_router_until_quorum() {
    scenario(|| {
        quorum_loss("/loom-router/chaos2", |leader| {
            vec![leader, (leader + 1) % 3]
        })
    });
}

#[test]
fn chaos_a_leader_left_alone_by_both_followers_fences_every_router_until_quorum() {
    scenario(|| {
        quorum_loss("/loom-router/chaos3", |leader| {
            vec![(leader + 1) % 3, (leader + 2) % 3]
        })
    });
}

#[test]
fn chaos_an_owner_paused_for_two_leases_never_writes_after_its_shard_moved() {
    scenario(|| async {
        let mut s = Scene::start("/loom-router/chaos4", Some(WEST)).await;
        let child = s.c.dc(WEST).spawn_router();
        s.write().await;
        let epoch = shard_owner(s.c.dc(EAST), 2).await.1;

        child.signal(Signal::SIGSTOP);
        let paused = Instant::now();
        // Writes that queue at the paused router, for the shard it is about to lose.
        let base = s.c.dc(WEST).url("");
        let queued: Vec<_> = (0..5)
            .map(|_| {
                let base = base.clone();
                tokio::spawn(async move { scene::write(WEST, &base, 2).await })
            })
            .collect();
        until_owner(s.c.dc(EAST), 2, "eu-central").await;
        tokio::time::sleep((paused + 2 * LEASE).saturating_duration_since(Instant::now())).await;

        child.signal(Signal::SIGCONT);
        let resumed = Instant::now();
        for q in queued {
            let a = q.await.unwrap();
            // Forwarded to the new owner, or refused, at once.
            assert!(
                a.done - resumed < WRITE + Duration::from_secs(1),
                "{a:?} took {:?}",
                a.done - resumed
            );
            if a.accepted() {
                assert_eq!(a.served_by.as_deref(), Some("eu-central"), "{a:?}");
            } else {
                assert!(a.fenced(), "{a:?}");
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let answers = s.stop_writing().await;

        // us-west's Loom applied nothing for shard 2 after the pause, and nothing at a later
        // epoch than the one it owned.
        for w in s.c.dc(WEST).loom.applied_writes() {
            if w.shard == Some(2) {
                assert!(w.at < paused + WRITE, "{w:?} applied after the pause");
                assert_eq!(w.epoch, Some(epoch), "{w:?}");
            }
        }
        for a in answers
            .iter()
            .filter(|a| a.sent >= resumed && a.cluster == 2 && a.accepted())
        {
            assert_eq!(a.served_by.as_deref(), Some("eu-central"), "{a:?}");
        }
        s.check(&answers);
    });
}
