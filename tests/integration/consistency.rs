//! Reading your own writes (docs/routing.md): a read of one cluster goes to its owner after a
//! write this router forwarded, with the `loom-ryw` cookie, or with `X-Loom-Consistency: owner`;
//! anything else stays local. The emulated Looms replicate after a delay, so a local read right
//! after a remote write is really stale.

use std::time::Duration;

use crate::support::*;

/// Replication between the emulated Looms: long enough that a read right after a write finds
/// the local copy stale, even on a loaded machine.
const REPLICATION: Duration = Duration::from_millis(1000);

fn with_window(window: &str, extra: &str) -> Options {
    Options {
        extra: format!("\n[consistency]\nread_your_writes = \"{window}\"\n{extra}"),
        replication_delay: REPLICATION,
        ..Options::default()
    }
}

/// A cluster created in us-east, once eu-central's Loom has its replica.
async fn east_cluster(c: &Cluster, name: &str) -> String {
    let id = create_cluster(c.dc(EAST), name).await;
    let direct = format!("http://{}/v2/clusters/{id}", c.dc(EU).loom_addr);
    eventually(|| async { send("GET", &direct, &COOPR, b"").await.status == 200 }).await;
    id
}

/// The cluster's status as eu-central's own Loom has it.
async fn eu_loom_status(c: &Cluster, id: &str) -> serde_json::Value {
    let direct = format!("http://{}/v2/clusters/{id}", c.dc(EU).loom_addr);
    send("GET", &direct, &COOPR, b"").await.json()["status"].clone()
}

fn assert_served(r: &TestResponse, route: &str, by: &str) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-loom-route"), Some(route));
    assert_eq!(r.header("x-loom-served-by"), Some(by));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_write_is_read_back_from_its_owner_until_the_window_ends() {
    let c = Cluster::start_with(with_window("1500ms", "")).await;
    let id = east_cluster(&c, "ryw").await;
    let path = format!("/v2/clusters/{id}");
    let before = eu_loom_status(&c, &id).await;
    c.clear();

    let delete = send("DELETE", &c.dc(EU).url(&path), &COOPR, b"").await;
    assert_served(&delete, "write-forwarded", "us-east");
    let read = send("GET", &c.dc(EU).url(&path), &COOPR, b"").await;
    assert_served(&read, "read-owner", "us-east");
    assert_eq!(read.json()["status"], "terminated");
    assert_eq!(read.header("x-loom-stale"), None);
    assert_eq!(c.who_saw("GET", &path), ["us-east"]);
    // The owner's Loom saw the client's read, with the proxy headers and none of the hop's.
    let seen = c.dc(EAST).received();
    let at_owner = seen.iter().rfind(|r| r.path_and_query == path).unwrap();
    for name in [
        "x-loom-router-hop",
        "x-loom-router-origin",
        "x-loom-router-epoch",
        "x-loom-router-shard",
    ] {
        assert!(!at_owner.headers.contains_key(name), "{name} reached Loom");
    }
    assert_eq!(at_owner.headers["coopr-userid"], "admin");
    assert!(at_owner.headers.contains_key("x-forwarded-for"));
    // Read from eu-central's own Loom it would still be the old cluster.
    assert_ne!(before, "terminated");
    assert_eq!(eu_loom_status(&c, &id).await, before);
    // The status call of the same cluster follows it too, as does HEAD.
    let status_path = format!("{path}/status");
    let status = send("GET", &c.dc(EU).url(&status_path), &COOPR, b"").await;
    assert_served(&status, "read-owner", "us-east");
    // HEAD goes to the owner too (whose Loom, like Loom, routes no HEAD: 404).
    let head = send("HEAD", &c.dc(EU).url(&path), &COOPR, b"").await;
    assert_eq!(head.status, 404);
    assert_eq!(head.header("x-loom-route"), Some("read-owner"));
    assert_eq!(head.header("x-loom-served-by"), Some("us-east"));
    // Lists are never sent to an owner.
    let list = send("GET", &c.dc(EU).url("/v2/clusters"), &COOPR, b"").await;
    assert_served(&list, "read", "eu-central");

    let admin = get(&c.dc(EU).admin_url("/admin/table")).await.json();
    assert_eq!(admin["tracked_clusters"], 1);

    // After the window the read is local again, and eu-central's Loom has caught up.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let later = send("GET", &c.dc(EU).url(&path), &COOPR, b"").await;
    assert_served(&later, "read", "eu-central");
    assert_eq!(later.json()["status"], "terminated");
    eventually(|| async {
        let table = get(&c.dc(EU).admin_url("/admin/table")).await.json();
        table["tracked_clusters"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_router_of_the_dc_honours_the_cookie_the_write_set() {
    let c = Cluster::start_with(with_window("30s", "")).await;
    let id = east_cluster(&c, "cookie").await;
    let path = format!("/v2/clusters/{id}");
    let delete = send("DELETE", &c.dc(EU).url(&path), &COOPR, b"").await;
    assert_served(&delete, "write-forwarded", "us-east");
    let set = delete.header("set-cookie").unwrap().to_owned();
    let (pair, attributes) = set.split_once("; ").unwrap();
    assert_eq!(attributes, "Path=/; HttpOnly; SameSite=Lax; Max-Age=30");
    let entry = pair.strip_prefix("loom-ryw=").unwrap();
    let (cluster, expiry) = entry.split_once('.').unwrap();
    assert_eq!(cluster.parse::<u64>().unwrap(), id.parse::<u64>().unwrap());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let expiry: u64 = expiry.parse().unwrap();
    assert!(
        expiry > now_ms + 28_000 && expiry <= now_ms + 30_000,
        "{set}"
    );

    let second = c.dc(EU).second_router().await;
    let cookie = [("cookie", pair)];
    let with = send(
        "GET",
        &second.url(&path),
        &[COOPR[0], COOPR[1], cookie[0]],
        b"",
    )
    .await;
    assert_served(&with, "read-owner", "us-east");
    assert_eq!(with.json()["status"], "terminated");
    let without = send("GET", &second.url(&path), &COOPR, b"").await;
    assert_served(&without, "read", "eu-central");

    // A second write through the second router keeps the first cluster in the cookie.
    let other = east_cluster(&c, "cookie2").await;
    let headers = [COOPR[0], COOPR[1], cookie[0]];
    let other_path = format!("/v2/clusters/{other}");
    let delete = send("DELETE", &second.url(&other_path), &headers, b"").await;
    let renewed = delete.header("set-cookie").unwrap();
    let value = renewed.split(';').next().unwrap();
    let mut named: Vec<u64> = value
        .strip_prefix("loom-ryw=")
        .unwrap()
        .split('-')
        .map(|e| e.split_once('.').unwrap().0.parse().unwrap())
        .collect();
    let mut expected = vec![other.parse::<u64>().unwrap(), id.parse::<u64>().unwrap()];
    expected.sort_unstable();
    named.sort_unstable();
    assert_eq!(named, expected, "{renewed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consistency_header_reads_from_the_owner_even_with_tracking_off() {
    let c = Cluster::start_with(Options {
        replication_delay: REPLICATION,
        ..Options::default()
    })
    .await;
    let id = east_cluster(&c, "header").await;
    let path = format!("/v2/clusters/{id}");
    let delete = send("DELETE", &c.dc(EU).url(&path), &COOPR, b"").await;
    assert_served(&delete, "write-forwarded", "us-east");
    assert_eq!(delete.header("set-cookie"), None, "tracking is off");
    let plain = send("GET", &c.dc(EU).url(&path), &COOPR, b"").await;
    assert_served(&plain, "read", "eu-central");
    assert_ne!(
        plain.json()["status"],
        "terminated",
        "the local copy is stale"
    );

    let owner = [COOPR[0], COOPR[1], ("x-loom-consistency", "owner")];
    let fresh = send("GET", &c.dc(EU).url(&path), &owner, b"").await;
    assert_served(&fresh, "read-owner", "us-east");
    assert_eq!(fresh.json()["status"], "terminated");
    // The owner's own router serves it from its own Loom.
    let at_owner = send("GET", &c.dc(EAST).url(&path), &owner, b"").await;
    assert_served(&at_owner, "read", "us-east");
    // A list is never redirected.
    let list = send("GET", &c.dc(EU).url("/v2/clusters"), &owner, b"").await;
    assert_served(&list, "read", "eu-central");

    for bad in ["Owner", "local", "owner, owner", ""] {
        let headers = [COOPR[0], COOPR[1], ("x-loom-consistency", bad)];
        let r = send("GET", &c.dc(EU).url(&path), &headers, b"").await;
        r.assert_router_error(400, "bad_request", "read");
        assert!(r.text().contains("X-Loom-Consistency"), "{}", r.text());
    }
}

fn owner_header() -> [(&'static str, &'static str); 3] {
    [COOPR[0], COOPR[1], ("x-loom-consistency", "owner")]
}

/// Routers that probe their peers every 3 s and need two failures to find one down: a test can
/// break a peer and, for the next 3 s at least, the others still believe it up, so their hop
/// is really tried.
fn probing_once() -> Options {
    Options {
        replication_delay: Duration::from_millis(50),
        health_interval: Duration::from_secs(3),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_owner_router_refuses_it_or_is_gone_is_served_locally_and_marked_stale() {
    let mut c = Cluster::start_with(probing_once()).await;
    let id = east_cluster(&c, "stale").await;
    let path = format!("/v2/clusters/{id}");
    // The owner's router answers for itself (its Loom is down: 502 upstream_unreachable).
    c.dcs[EAST].stop_loom().await;
    c.clear();
    let refused = send("GET", &c.dc(EU).url(&path), &owner_header(), b"").await;
    assert_served(&refused, "read", "eu-central");
    assert_eq!(refused.header("x-loom-stale"), Some("1"));
    assert_eq!(refused.header("x-loom-router-error"), None);
    assert_eq!(refused.json()["id"], id.as_str());
    assert_eq!(c.who_saw("GET", &path), ["eu-central"]);
    // The owner's router is gone: the hop is refused at connect.
    c.dcs[EAST].stop_router().await;
    c.clear();
    let gone = send("GET", &c.dc(EU).url(&path), &owner_header(), b"").await;
    assert_served(&gone, "read", "eu-central");
    assert_eq!(gone.header("x-loom-stale"), Some("1"));
    assert_eq!(c.who_saw("GET", &path), ["eu-central"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_sent_to_a_router_that_does_not_own_the_shard_falls_back_stale() {
    // eu-central believes shard 1 moved to us-west; us-west's table (and us-east's) says not.
    let mut options = probing_once();
    options.per_dc[EU] = "\n[[shards]]\nresidue = 1\nowner = \"us-west\"\nepoch = 5\n".to_owned();
    let c = Cluster::start_with(options).await;
    let id = create_cluster(c.dc(EAST), "misdirected").await;
    let path = format!("/v2/clusters/{id}");
    eventually(|| async { c.dc(EU).loom.cluster(1).is_some() }).await;
    c.clear();
    let r = send("GET", &c.dc(EU).url(&path), &owner_header(), b"").await;
    assert_served(&r, "read", "eu-central");
    assert_eq!(r.header("x-loom-stale"), Some("1"));
    assert_eq!(
        c.who_saw("GET", &path),
        ["eu-central"],
        "us-west answered 421"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_for_an_owner_health_checks_find_down_is_served_locally_and_marked_stale() {
    let mut c = Cluster::start_with(Options {
        replication_delay: Duration::from_millis(50),
        ..Options::default()
    })
    .await;
    let id = east_cluster(&c, "down").await;
    let path = format!("/v2/clusters/{id}");
    let owner = owner_header();
    c.dcs[EAST].stop_router().await;
    // Once health checks find it down, the hop is not even tried.
    eventually(|| async {
        let table = get(&c.dc(EU).admin_url("/admin/table")).await.json();
        table["datacenters"][EAST]["healthy"] == false
    })
    .await;
    let down = send("GET", &c.dc(EU).url(&path), &owner, b"").await;
    assert_served(&down, "read", "eu-central");
    assert_eq!(down.header("x-loom-stale"), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_cookies_and_a_cookie_of_1000_clusters_are_ignored() {
    let c = Cluster::start_with(with_window("30s", "")).await;
    let id = east_cluster(&c, "forged").await;
    let path = format!("/v2/clusters/{id}");
    let n: u64 = id.parse().unwrap();
    let far = u64::MAX / 2;
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 10_000;
    let thousand: Vec<String> = (0..1000).map(|i| format!("{}.{soon}", n + i)).collect();
    // 17 short entries: under the size bound, over the count.
    let seventeen: Vec<String> = (0..17).map(|i| format!("{}.{soon}", n + i)).collect();
    let cookies = [
        format!("loom-ryw={n}"),
        format!("loom-ryw={n}.{far}-"),
        format!("loom-ryw={n}.x"),
        format!("loom-ryw=abc.{far}"),
        format!("loom-ryw={n}.{far}; loom-ryw={n}.{far}"),
        format!("loom-ryw={n}.{far}{}", "0".repeat(5000)),
        format!("loom-ryw={}", thousand.join("-")),
        format!("loom-ryw={}", seventeen.join("-")),
        // Expired, and claiming far more than the 30 s window.
        format!("loom-ryw={n}.1000"),
        format!("loom-ryw={n}.{far}"),
    ];
    for cookie in &cookies {
        let headers = [COOPR[0], COOPR[1], ("cookie", cookie.as_str())];
        let r = send("GET", &c.dc(EU).url(&path), &headers, b"").await;
        assert_served(&r, "read", "eu-central");
        assert_eq!(r.header("x-loom-stale"), None);
    }
    // The same cluster in a well-formed cookie goes to the owner.
    let good = format!("session=1; loom-ryw={}", seventeen[..16].join("-"));
    let headers = [COOPR[0], COOPR[1], ("cookie", good.as_str())];
    let r = send("GET", &c.dc(EU).url(&path), &headers, b"").await;
    assert_served(&r, "read-owner", "us-east");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracked_clusters_stay_within_their_bound() {
    let c = Cluster::start_with(with_window("30s", "max_tracked_clusters = 2\n")).await;
    let mut ids = Vec::new();
    for name in ["b1", "b2", "b3"] {
        ids.push(east_cluster(&c, name).await);
    }
    for id in &ids {
        let path = format!("/v2/clusters/{id}");
        let delete = send("DELETE", &c.dc(EU).url(&path), &COOPR, b"").await;
        assert_served(&delete, "write-forwarded", "us-east");
        // Past the bound, the cookie still carries the promise.
        assert!(delete.header("set-cookie").is_some());
    }
    let table = get(&c.dc(EU).admin_url("/admin/table")).await.json();
    assert_eq!(table["tracked_clusters"], 2);
    let routes: Vec<String> = {
        let mut routes = Vec::new();
        for id in &ids {
            let r = send(
                "GET",
                &c.dc(EU).url(&format!("/v2/clusters/{id}")),
                &COOPR,
                b"",
            )
            .await;
            routes.push(r.header("x-loom-route").unwrap().to_owned());
        }
        routes
    };
    assert_eq!(routes, ["read-owner", "read-owner", "read"]);
    // The gauge is the process's, shared by every router of this test binary: it must exist.
    let metrics = get(&c.dc(EU).admin_url("/metrics")).await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("loom_router_tracked_clusters ")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_hop_is_served_only_by_the_owner() {
    let c = Cluster::start().await;
    let id = east_cluster(&c, "hop").await;
    let path = format!("/v2/clusters/{id}");
    c.clear();
    let hop = [
        COOPR[0],
        COOPR[1],
        ("x-loom-router-hop", "1"),
        ("x-loom-router-origin", "eu-central"),
        ("x-loom-router-epoch", "0"),
    ];
    let at_owner = send("GET", &c.dc(EAST).url(&path), &hop, b"").await;
    assert_served(&at_owner, "read", "us-east");
    let elsewhere = send("GET", &c.dc(WEST).url(&path), &hop, b"").await;
    assert_eq!(elsewhere.status, 421, "{}", elsewhere.text());
    assert_eq!(elsewhere.json()["owner"], "us-east");
    assert_eq!(c.who_saw("GET", &path), ["us-east"]);
}
