//! Between routers (docs/routing.md): one hop at most, 421 with the receiver's view, retries after
//! a 421, and 508 on a loop.

use crate::support::*;

/// Headers of a write forwarded by us-east's router.
fn hop(epoch: &str) -> Vec<(&'static str, String)> {
    vec![
        ("x-loom-router-hop", "1".to_owned()),
        ("x-loom-router-origin", "us-east".to_owned()),
        ("x-loom-router-epoch", epoch.to_owned()),
        ("via", "1.1 loom-router-us-east".to_owned()),
        ("coopr-userid", "admin".to_owned()),
        ("coopr-tenantid", "tenant1".to_owned()),
    ]
}

async fn send_owned(
    method: &str,
    url: &str,
    headers: &[(&'static str, String)],
    body: &[u8],
) -> TestResponse {
    let borrowed: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    send(method, url, &borrowed, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_for_a_shard_the_receiver_does_not_own_gets_421_and_is_never_forwarded_again(
) {
    let c = Cluster::start().await;
    // eu-central receives a hop for cluster 2, which us-west owns.
    let r = send_owned(
        "DELETE",
        &c.dc(EU).url("/v2/clusters/00000002"),
        &hop("1"),
        b"",
    )
    .await;
    assert_eq!(r.status, 421);
    assert_eq!(r.header("x-loom-router-error"), Some("misdirected"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json(),
        serde_json::json!({"shard": 2, "owner": "us-west", "epoch": 1})
    );
    assert!(c.who_saw("DELETE", "/v2/clusters/00000002").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_for_an_owned_shard_is_served_with_the_owners_epoch() {
    let c = Cluster::start().await;
    let id = create_cluster(c.dc(WEST), "x").await;
    c.clear();
    let path = format!("/v2/clusters/{id}/abort");
    let r = send_owned("POST", &c.dc(WEST).url(&path), &hop("1"), b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-loom-route"), Some("write-local"));
    assert_eq!(c.who_saw("POST", &path), vec!["us-west"]);
    let seen = &c.dc(WEST).received()[0];
    assert_eq!(seen.headers["x-loom-router-origin"], "us-east");
    assert_eq!(seen.headers["x-loom-router-epoch"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_with_a_newer_epoch_than_the_owner_gets_421() {
    let c = Cluster::start().await;
    let r = send_owned(
        "DELETE",
        &c.dc(WEST).url("/v2/clusters/00000002"),
        &hop("5"),
        b"",
    )
    .await;
    r.assert_router_error(421, "misdirected", "write-local");
    assert_eq!(
        r.json(),
        serde_json::json!({"shard": 2, "owner": "us-west", "epoch": 1})
    );
    assert!(c.who_saw("DELETE", "/v2/clusters/00000002").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_via_names_this_router_is_a_loop() {
    let c = Cluster::start().await;
    let r = send(
        "DELETE",
        &c.dc(EAST).url("/v2/clusters/00000002"),
        &[("via", "1.1 proxy, 1.1 loom-router-us-east")],
        b"",
    )
    .await;
    r.assert_router_error(508, "loop_detected", "write-local");
    assert!(c.who_saw("DELETE", "/v2/clusters/00000002").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_that_disagree_give_up_after_two_retries() {
    // us-east believes eu-central owns shard 2; eu-central (and us-west) believe us-west does.
    let mut options = Options::default();
    options.per_dc[EAST] = "\n[[shards]]\nresidue = 2\nowner = \"eu-central\"\n".to_owned();
    let c = Cluster::start_with(options).await;
    let r = send(
        "DELETE",
        &c.dc(EAST).url("/v2/clusters/00000002"),
        &COOPR,
        b"",
    )
    .await;
    r.assert_router_error(503, "ownership_conflict", "write-forwarded");
    assert_eq!(r.header("retry-after"), Some("1"));
    // No Loom applied it anywhere.
    assert!(c.who_saw("DELETE", "/v2/clusters/00000002").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_adopts_a_newer_view_from_a_421_and_retries_the_post() {
    // Shard 2 moved from us-west to eu-central at epoch 2; us-east still has the old table.
    let moved = "\n[[shards]]\nresidue = 2\nowner = \"eu-central\"\nepoch = 2\n";
    let mut options = Options::default();
    options.per_dc[WEST] = moved.to_owned();
    options.per_dc[EU] = moved.to_owned();
    let c = Cluster::start_with(options).await;
    let body = br#"{"expireTime": 1}"#;
    let r = send(
        "POST",
        &c.dc(EAST).url("/v2/clusters/00000012"),
        &COOPR,
        body,
    )
    .await;
    // us-west answered 421 {owner: eu-central, epoch: 2}; the retry reached eu-central.
    assert_eq!(r.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(
        r.header("x-loom-served-by"),
        Some("eu-central"),
        "{}",
        r.text()
    );
    assert_eq!(
        c.who_saw("POST", "/v2/clusters/00000012"),
        vec!["eu-central"]
    );
    let seen = &c.dc(EU).received()[0];
    assert_eq!(&seen.body[..], body);
    assert_eq!(seen.headers["x-loom-router-epoch"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_shard_refuses_writes_everywhere() {
    let fenced = "\n[[shards]]\nresidue = 2\nowner = \"us-west\"\nepoch = 2\nstate = \"fenced\"\n";
    let c = Cluster::start_with(Options {
        extra: fenced.to_owned(),
        ..Options::default()
    })
    .await;
    for (dc, route) in [(EAST, "write-forwarded"), (WEST, "write-local")] {
        let r = send(
            "DELETE",
            &c.dc(dc).url("/v2/clusters/00000002"),
            &COOPR,
            b"",
        )
        .await;
        r.assert_router_error(503, "fenced", route);
    }
    // Reads still work.
    let r = send("GET", &c.dc(EAST).url("/v2/clusters"), &COOPR, b"").await;
    assert_eq!(r.status, 200);
    assert!(c.who_saw("DELETE", "/v2/clusters/00000002").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_sends_a_misdirected_write_three_times_at_most() {
    let (c, seen) = cluster_with_misdirecting_west().await;
    let r = send(
        "POST",
        &c.dc(EAST).url("/v2/clusters/00000002/abort"),
        &COOPR,
        b"{}",
    )
    .await;
    r.assert_router_error(503, "ownership_conflict", "write-forwarded");
    // The first try and two retries, no more.
    let attempt = ("POST".to_owned(), "/v2/clusters/00000002/abort".to_owned());
    assert_eq!(
        *seen.lock().unwrap(),
        vec![attempt.clone(), attempt.clone(), attempt]
    );
    assert!(c.who_saw("POST", "/v2/clusters/00000002/abort").is_empty());
}

/// Each 421 that sends a write on again is counted once, in `loom_router_retries_total`, whether
/// the write then succeeds or, as here, ends in `ownership_conflict`. A child router, so that the
/// count is its own.
#[test]
fn every_retry_after_a_421_is_counted_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loom = rt.block_on(slow_loom(std::time::Duration::from_millis(1)));
    let (peer, seen) = rt.block_on(stub(
        421,
        "application/json",
        r#"{"shard": 2, "owner": "b", "epoch": 1}"#,
    ));
    let extra = format!(
        "[[datacenters]]\nname = \"b\"\nid_start = 2\nrouter = \"http://{peer}\"\n\
         [health]\ninterval = \"100ms\"\n"
    );
    let router = ChildRouter::start(loom, &extra, "warn", std::process::Stdio::null());
    router.until_readyz(&rt, 200);
    let r = rt.block_on(send(
        "POST",
        &router.url("/v2/clusters/00000002/abort"),
        &COOPR,
        b"{}",
    ));
    r.assert_router_error(503, "ownership_conflict", "write-forwarded");
    assert_eq!(
        seen.lock().unwrap().len(),
        3,
        "the first try and two retries"
    );
    let metrics = rt.block_on(get(&router.admin_url("/metrics"))).text();
    let retries: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("loom_router_retries_total{reason=\"misdirected\"}"))
        .collect();
    assert_eq!(
        retries,
        ["loom_router_retries_total{reason=\"misdirected\"} 2"],
        "{metrics}"
    );
}
