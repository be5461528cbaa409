//! Automatic failover with the memory backend, three DCs in process (issue 3). Every scenario
//! ends with the history checker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::history::{self, Acked};
use crate::support::*;

fn memory() -> Options {
    Options {
        memory: true,
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_dcs_shards_move_to_the_first_live_replica_and_never_move_back_on_their_own() {
    let mut c = Cluster::start_with(memory()).await;
    let mut acked = Vec::new();
    // Every router reads ownership from the store.
    all_admitting(&c).await;
    // A cluster in eu-central's shard 3; replicas of eu-central: [us-east].
    let id = create_cluster(c.dc(EU), "f").await;
    assert_eq!(id, "00000003");
    let (_, epoch_before) = shard_owner(c.dc(EAST), 3).await;
    // Wait for it to replicate to us-east, the future owner.
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

    // A client keeps writing to the cluster through all three routers, each write unique, from
    // before the kill until after the restore: the history checker sees every transition.
    let background = Arc::new(Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (urls, acked, stop) = (
            c.dcs.iter().map(|d| d.url("")).collect::<Vec<_>>(),
            background.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let url = &urls[(n % 3) as usize];
                let path = format!("/v2/clusters/00000003/services/s{n}/restart");
                let request = send_quietly("POST", &format!("{url}{path}")).await;
                if let Some((200, served_by)) = request {
                    acked.lock().unwrap().push(Acked {
                        served_by,
                        method: "POST".to_owned(),
                        path,
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Let some writes land at eu-central first.
    eventually(|| async {
        background
            .lock()
            .unwrap()
            .iter()
            .any(|a: &Acked| a.served_by == "eu-central")
    })
    .await;
    c.dcs[EU].kill().await;
    // Its lease expires; the manager moves shard 3 to us-east at a newer epoch.
    let epoch = until_owner(c.dc(EAST), 3, "us-east").await;
    assert!(epoch > epoch_before);
    until_owner(c.dc(WEST), 3, "us-east").await;
    // The new owner's hook ran before it admitted writes.
    eventually(|| async {
        c.dc(EAST).loom.become_owner_calls().iter().any(|call| {
            call.shard == Some(3) && call.previous_owner.as_deref() == Some("eu-central")
        })
    })
    .await;

    // Writes through every surviving router reach the new owner.
    for (i, path) in [
        (EAST, "/v2/clusters/00000003/pause"),
        (WEST, "/v2/clusters/00000003/resume"),
    ] {
        // Right after the swap the hook may still be running: fenced, then fine.
        let r = history::write_until_admitted(&mut acked, c.dc(i), "POST", path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.header("x-loom-served-by"), Some("us-east"));
    }
    // Reads stay local throughout.
    let r = send("GET", &c.dc(WEST).url("/v2/clusters/00000003"), &COOPR, b"").await;
    assert_eq!(r.header("x-loom-served-by"), Some("us-west"));
    assert_eq!(r.header("x-loom-route"), Some("read"));

    // eu-central comes back: it does not take shard 3 back, and forwards writes for it.
    c.dcs[EU].restore_loom().await;
    c.dcs[EU].restore_router().await;
    all_admitting(&c).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // longer than a lease: nothing moves back
    assert_eq!(shard_owner(c.dc(EU), 3).await.0, "us-east");
    let r = history::write(&mut acked, c.dc(EU), "DELETE", "/v2/clusters/00000003", b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(r.header("x-loom-served-by"), Some("us-east"));

    stop.cancel();
    writer.await.unwrap();
    let background = background.lock().unwrap().clone();
    // Writes were accepted at both owners: before the kill and after the failover.
    assert!(background.iter().any(|a| a.served_by == "eu-central"));
    assert!(background.iter().any(|a| a.served_by == "us-east"));
    acked.extend(background);
    history::check(&c, &acked);
}

/// A write that may fail at the transport (the DC is being killed): `(status, served_by)`.
async fn send_quietly(method: &str, url: &str) -> Option<(u16, String)> {
    let request = http::Request::builder()
        .method(method)
        .uri(url)
        .header("coopr-userid", "admin")
        .header("coopr-tenantid", "t")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .ok()?;
    let response = client().request(request).await.ok()?;
    let served_by = response
        .headers()
        .get("x-loom-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Some((response.status().as_u16(), served_by))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_live_replica_the_shard_stays_and_an_alert_is_raised() {
    let mut c = Cluster::start_with(memory()).await;
    all_admitting(&c).await;
    // Shard 2 (us-west) has replicas [eu-central]: kill both.
    c.dcs[WEST].kill().await;
    c.dcs[EU].kill().await;
    let admin = c.dc(EAST).admin_url("/admin/table");
    eventually(|| async {
        let t = get(&admin).await.json();
        t["alerts"].as_array().unwrap().iter().any(|a| {
            a.as_str()
                .unwrap()
                .starts_with("shard 2: owner us-west is down")
        })
    })
    .await;
    assert_eq!(shard_owner(c.dc(EAST), 2).await.0, "us-west");
    // Shard 3 (eu-central, replicas [us-east]) did fail over.
    until_owner(c.dc(EAST), 3, "us-east").await;
    let metrics = get(&c.dc(EAST).admin_url("/metrics")).await.text();
    assert!(
        metrics.contains("loom_router_shard_unprotected{shard=\"2\"} 1"),
        "{metrics}"
    );
    history::check(&c, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_cut_off_from_the_store_fences_itself_before_others_take_over() {
    let c = Cluster::start_with(memory()).await;
    let mut acked = Vec::new();
    all_admitting(&c).await;
    let id = create_cluster(c.dc(WEST), "p").await;
    assert_eq!(id, "00000002");
    eventually(|| async { c.dc(EU).loom.cluster(2).is_some() }).await;
    // us-west loses the store; its Loom and peers are fine.
    c.dc(WEST).store.as_ref().unwrap().set_cut_off(true);
    let cut = tokio::time::Instant::now();
    // Within its lease it must refuse writes for its own shard: fenced, never applied late.
    let mut fenced_at = None;
    while cut.elapsed() < Duration::from_secs(3) {
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
    // It fenced itself before its lease could expire in the store (1.5 s).
    assert!(fenced_at < Duration::from_millis(1500), "{fenced_at:?}");
    // The others moved shard 2 to its replica, eu-central.
    until_owner(c.dc(EAST), 2, "eu-central").await;
    history::check(&c, &acked);
    // us-west's events say when its writes were fenced.
    eventually(|| async {
        let events = get(&c.dc(WEST).admin_url("/admin/events")).await.json();
        events["events"].as_array().unwrap().iter().any(|e| {
            e["kind"] == "fence"
                && e["text"]
                    == "writes fenced here: the lease is not certain to outlast write_timeout"
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_move_freeze_and_unfreeze_shards() {
    let mut c = Cluster::start_with(memory()).await;
    all_admitting(&c).await;
    let admin = c.dc(EAST).admin_url("");
    // Not a replica of shard 1 (replicas: [us-west]).
    let r = send(
        "POST",
        &format!("{admin}/admin/shards/1/move"),
        &[],
        br#"{"to":"eu-central"}"#,
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.text());
    let r = send(
        "POST",
        &format!("{admin}/admin/shards/9/move"),
        &[],
        br#"{"to":"us-west"}"#,
    )
    .await;
    assert_eq!(r.status, 404);
    // A planned switchover: fence, drain, move.
    let r = send(
        "POST",
        &format!("{admin}/admin/shards/1/move"),
        &[],
        br#"{"to":"us-west"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let moved = r.json();
    assert_eq!(moved["from"], "us-east");
    assert_eq!(moved["to"], "us-west");
    // The pause ends as soon as us-east's router has seen the fence with no write in flight:
    // well before the fallback of write_timeout (500 ms) plus the margin.
    let pause = moved["write_pause_ms"].as_u64().unwrap();
    assert!(pause < 700, "{pause}");
    until_owner(c.dc(EU), 1, "us-west").await;

    // Freeze shard 3, kill its owner: it stays put.
    let r = send("POST", &format!("{admin}/admin/shards/3/freeze"), &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    c.dcs[EU].kill().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(shard_owner(c.dc(EAST), 3).await.0, "eu-central");
    // Unfreeze: now it fails over.
    let r = send(
        "POST",
        &format!("{admin}/admin/shards/3/unfreeze"),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    until_owner(c.dc(EAST), 3, "us-east").await;
    history::check(&c, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_says_when_it_has_seen_a_fence_and_drained_its_writes() {
    let c = Cluster::start_with(memory()).await;
    all_admitting(&c).await;
    let (_, epoch) = shard_owner(c.dc(EAST), 1).await;
    let url = |q: &str| c.dc(EAST).url(&format!("/loom-router/drained{q}"));
    let r = get(&url(&format!("?shard=1&epoch={epoch}"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "drained\n");
    let r = get(&url(&format!("?shard=1&epoch={}", epoch + 100))).await;
    assert_eq!(r.status, 503, "an epoch it has not seen yet");
    assert_eq!(get(&url("")).await.status, 400);
    // The query is form-encoded, as any client may send it: "%3" and the epoch's digits decode
    // to the epoch, and "%31" to shard 1.
    let r = get(&url(&format!("?epoch=%3{epoch}&shard=%31"))).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "drained\n"));
    // Answered by the router, never by Loom.
    assert!(c.dc(EAST).seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_backend_refuses_moves() {
    let c = Cluster::start().await;
    let r = send(
        "POST",
        &c.dc(EAST).admin_url("/admin/shards/1/move"),
        &[],
        br#"{"to":"us-west"}"#,
    )
    .await;
    assert_eq!(r.status, 409);
    assert!(r.text().contains("static"), "{}", r.text());
}

/// Run `loom-router <args>`; returns (exit code, stdout, stderr).
async fn cli(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_loom-router"))
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cli_shows_the_table_and_moves_freezes_and_unfreezes() {
    let mut options = memory();
    options.extra = "\n[admin]\ntoken = \"s3cret\"\n".to_owned();
    let c = Cluster::start_with(options).await;
    all_admitting(&c).await;
    let admin = c.dc(EU).admin_url("");
    let (code, out, _) = cli(&["table", "--admin", &admin]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("datacenter eu-central  table_epoch "),
        "{out}"
    );
    assert!(lines[1].starts_with("shard 1      owner us-east "), "{out}");
    assert!(lines[4].starts_with("shard global owner us-east "), "{out}");

    // Changing state needs the token.
    let (code, _, err) = cli(&["freeze", "--admin", &admin, "3"]).await;
    assert_eq!(code, 1);
    assert!(err.starts_with("freeze (401): "), "{err}");
    let (code, _, err) = cli(&["freeze", "--admin", &admin, "--token", "s3creT", "3"]).await;
    assert_eq!(code, 1);
    assert!(err.starts_with("freeze (401): "), "a wrong token: {err}");
    let (code, out, _) = cli(&["freeze", "--admin", &admin, "--token", "s3cret", "3"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"frozen\":true"), "{out}");
    let (_, out, _) = cli(&["table", "--admin", &admin]).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("shard 3 ") && l.contains(" frozen")),
        "{out}"
    );
    let (code, _, _) = cli(&["unfreeze", "--admin", &admin, "--token", "s3cret", "3"]).await;
    assert_eq!(code, 0);

    let (code, out, err) = cli(&[
        "move",
        "--admin",
        &admin,
        "--token",
        "s3cret",
        "2",
        "--to",
        "eu-central",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"to\":\"eu-central\""), "{out}");
    until_owner(c.dc(EAST), 2, "eu-central").await;
    let (code, _, err) = cli(&[
        "move", "--admin", &admin, "--token", "s3cret", "2", "--to", "nowhere",
    ])
    .await;
    assert_eq!(code, 1);
    assert!(err.starts_with("move (409): "), "{err}");
    history::check(&c, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dc_whose_loom_fails_its_health_checks_withdraws_and_its_shards_move() {
    let mut c = Cluster::start_with(memory()).await;
    all_admitting(&c).await;
    // Only eu-central's Loom dies; its router stays up but withdraws its registration.
    c.dcs[EU].stop_loom().await;
    until_owner(c.dc(EAST), 3, "us-east").await;
    let t = get(&c.dc(EU).admin_url("/admin/table")).await.json();
    assert_eq!(t["lease"]["registered"], false);
    assert_eq!(t["lease"]["admitting"], false);
    // The live router of the dead Loom forwards writes for its old shard to the new owner.
    eventually(|| async { shard_owner(c.dc(EU), 3).await.0 == "us-east" }).await;
    history::check(&c, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gained_shard_stays_fenced_while_its_become_owner_hook_fails() {
    let (failing_hook, calls) = stub(500, "text/plain", "replication cannot be cut\n").await;
    let mut options = memory();
    options.hook = Some(format!("http://{failing_hook}/replication/become-owner"));
    let mut c = Cluster::start_with(options).await;
    all_admitting(&c).await;
    assert_eq!(create_cluster(c.dc(EU), "h").await, "00000003");
    eventually(|| async { c.dc(EAST).loom.cluster(3).is_some() }).await;
    c.dcs[EU].kill().await;
    until_owner(c.dc(EAST), 3, "us-east").await;
    // The hook keeps failing (and is retried); writes for shard 3 are fenced meanwhile, and
    // none reaches us-east's Loom.
    eventually(|| async { calls.lock().unwrap().len() >= 2 }).await;
    for _ in 0..5 {
        let r = send(
            "POST",
            &c.dc(WEST).url("/v2/clusters/00000003/abort"),
            &COOPR,
            b"",
        )
        .await;
        r.assert_router_error(503, "fenced", "write-forwarded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c
        .dc(EAST)
        .loom
        .applied_writes()
        .iter()
        .all(|w| w.shard != Some(3)));
    // Other shards' writes are unaffected.
    let r = send(
        "POST",
        &c.dc(WEST).url("/v2/clusters"),
        &COOPR,
        br#"{"name":"x"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    history::check(&c, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_with_different_shared_settings_refuses_to_join() {
    let c = Cluster::start_with(memory()).await;
    all_admitting(&c).await;
    // us-east again, but with its replicas changed: the stored fingerprint disagrees.
    let toml = c
        .dc(EAST)
        .config_toml()
        .replace("replicas = [\"us-west\"]", "replicas = [\"eu-central\"]");
    let config = loom_router::config::Config::from_toml(&toml).unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let store = loom_router::coord::store::Store::Memory(c.store.as_ref().unwrap().client());
    let app = loom_router::app::App::from_listeners(config, http, admin).with_store(store);
    let err = app
        .run(tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("different shared settings"), "{err}");
    assert!(
        err.contains("us-east id_start=1 replicas=[us-west]"),
        "{err}"
    );
    // The table shows the fingerprint every router agreed on.
    let t = get(&c.dc(EU).admin_url("/admin/table")).await.json();
    assert!(t["fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("increment=10 global_home=us-east"));
}
