//! `loom-router demo` (docs/configuration.md): the printed walk-through works, in process and as
//! the real binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use loom_router::demo::Demo;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_scenario_creates_reads_and_deletes_through_three_dcs() {
    let demo = Demo::start(None).await.unwrap();
    // Wait until every router knows every peer is up.
    for dc in &demo.dcs {
        let url = format!("http://{}/admin/table", dc.admin);
        eventually(|| async {
            let t = get(&url).await.json();
            t["datacenters"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["healthy"] == true)
        })
        .await;
    }
    let banner = demo.banner();
    let steps = demo.scenario();
    for step in &steps {
        assert!(
            banner.contains(&step.curl()),
            "banner lacks {}",
            step.curl()
        );
    }
    let mut responses = Vec::new();
    for step in &steps {
        tokio::time::sleep(step.wait).await;
        let r = send(
            step.method,
            &step.url,
            &step.headers,
            step.body.unwrap_or("").as_bytes(),
        )
        .await;
        responses.push(r);
    }
    let [create, read, delete, read_back, table, create_eu, kill, moved, write, restore] =
        &responses[..]
    else {
        panic!("{} steps", responses.len())
    };
    assert_eq!(create.status, 200);
    assert_eq!(create.json(), serde_json::json!({"id": "00000001"}));
    assert_eq!(create.header("x-loom-route"), Some("create"));
    assert_eq!(create.header("x-loom-served-by"), Some("us-east"));

    assert_eq!(read.status, 200, "{}", read.text());
    assert_eq!(read.json()["id"], "00000001");
    assert_eq!(read.header("x-loom-route"), Some("read"));
    assert_eq!(read.header("x-loom-served-by"), Some("us-west"));

    assert_eq!(delete.status, 200, "{}", delete.text());
    assert_eq!(delete.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(delete.header("x-loom-served-by"), Some("us-east"));
    // The delete was applied once, at the owner.
    let east_writes: Vec<_> = demo.dcs[0]
        .emulator
        .applied_writes()
        .into_iter()
        .filter(|w| w.method == "DELETE")
        .collect();
    assert_eq!(east_writes.len(), 1);
    assert_eq!(east_writes[0].cluster, Some(1));
    assert!(!demo.dcs[2]
        .emulator
        .applied_writes()
        .iter()
        .any(|w| w.method == "DELETE"));

    // Read back at once through the DC that forwarded the delete: served by the owner, fresh,
    // while eu-central's own Loom still has the cluster as it was (it checks no later than
    // the 500 ms replication delay after the delete).
    assert_eq!(read_back.status, 200, "{}", read_back.text());
    assert_eq!(read_back.header("x-loom-route"), Some("read-owner"));
    assert_eq!(read_back.header("x-loom-served-by"), Some("us-east"));
    assert_eq!(read_back.json()["status"], "terminated");
    assert_eq!(read_back.header("x-loom-stale"), None);

    assert_eq!(table.status, 200);
    assert_eq!(table.json()["datacenter"], "eu-central");
    assert_eq!(table.json()["tracked_clusters"], 1);
    // Stamped with shard 1's epoch, as the table shows it.
    let shard1 = table.json()["shards"][0].clone();
    assert_eq!(shard1["shard"], 1);
    assert_eq!(east_writes[0].epoch, shard1["epoch"].as_u64());

    // Failover: eu-central dies, shard 3 moves to us-east, writes follow the new owner.
    assert_eq!(create_eu.json(), serde_json::json!({"id": "00000003"}));
    assert_eq!(kill.status, 200, "{}", kill.text());
    let shard3 = moved.json()["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["shard"] == 3)
        .unwrap()
        .clone();
    assert_eq!(shard3["owner"], "us-east", "{shard3}");
    assert_eq!(write.status, 200, "{}", write.text());
    assert_eq!(write.header("x-loom-served-by"), Some("us-east"));
    assert_eq!(write.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(restore.status, 200, "{}", restore.text());
    // Back, and not the owner of shard 3.
    let admin = format!("http://{}/admin/table", demo.dcs[2].admin);
    eventually(|| async { get(&admin).await.status == 200 }).await;
    let t = get(&admin).await.json();
    let owner = t["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["shard"] == 3)
        .unwrap()["owner"]
        .clone();
    assert_eq!(owner, "us-east");
    demo.stop().await;
}

/// Start `loom-router demo --port-base <base>` and read its banner; its warnings and errors go
/// to `log`. Returns `None` if it exited before printing the banner (a port was taken).
fn start_demo(base: u16, log: &std::fs::File) -> Option<(std::process::Child, Vec<String>)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loom-router"))
        .args(["demo", "--port-base", &base.to_string()])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(log.try_clone().unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let done = line.starts_with("Press Ctrl-C");
        lines.push(line);
        if done {
            return Some((child, lines));
        }
    }
    let _ = child.wait();
    None
}

#[test]
fn the_demo_binary_prints_its_urls_serves_and_stops_on_sigint() {
    // Port bases below Linux's ephemeral range (32768 up), where the other tests' port-0
    // listeners live; another base if one is taken anyway.
    let first = 10_000 + (std::process::id() % 9_000) as u16 * 2;
    let log_path = tempfile::NamedTempFile::new().unwrap();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(log_path.path())
        .unwrap();
    let (base, mut child, lines) = (0..5)
        .map(|i| first.wrapping_add(i * 1_999) % 20_000 + 10_000)
        .find_map(|base| {
            // A try that lost its port logged that; only the last try's log counts.
            log.set_len(0).unwrap();
            start_demo(base, &log).map(|(child, lines)| (base, child, lines))
        })
        .expect("the demo did not start on any port base");
    let dcs: Vec<&String> = lines.iter().filter(|l| l.starts_with("dc=")).collect();
    assert_eq!(dcs.len(), 3, "{lines:?}");
    assert_eq!(
        dcs[0],
        &format!(
            "dc=us-east router=http://127.0.0.1:{} admin=http://127.0.0.1:{} loom=http://127.0.0.1:{}",
            base + 1,
            base + 1821,
            base + 1001
        )
    );
    assert!(lines.iter().any(|l| l.starts_with("curl -si -X POST")));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(get(&format!("http://127.0.0.1:{}/status", base + 3)));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-loom-served-by"), Some("eu-central"));

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "demo did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    // A quiet start and stop: nothing was down, so nothing was worth a warning. (Alerts about
    // owners whose liveness was not yet known once flooded this log, each twice.)
    let log = std::fs::read_to_string(log_path.path()).unwrap();
    assert_eq!(log, "", "the demo logged warnings or errors");
}
