//! Every row of the routing table (docs/routing.md), end to end: which DC's Loom saw the request,
//! exactly once, with body bytes and Loom headers unchanged.

use crate::support::*;

/// Loom and Coopr headers that must reach Loom untouched.
const IDENTITY: [(&str, &str); 6] = [
    ("coopr-userid", "admin"),
    ("coopr-tenantid", "tenant1"),
    ("coopr-apikey", "secret-key"),
    ("x-loom-userid", "admin"),
    ("x-loom-apikey", "key1"),
    ("authorization", "Bearer abc.def"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_served_by_the_local_loom_in_both_generations() {
    let c = Cluster::start().await;
    let id = create_cluster(c.dc(WEST), "r1").await; // lives in us-west's shard
    c.clear();
    for (path, headers) in [
        (format!("/v2/clusters/{id}"), &COOPR[..]),
        (format!("/v1/loom/clusters/{id}"), &LOOM[..]),
        ("/v2/clusters".to_owned(), &COOPR[..]),
    ] {
        let r = send("GET", &c.dc(EU).url(&path), headers, b"").await;
        assert_eq!(r.header("x-loom-route"), Some("read"), "{path}");
        assert_eq!(r.header("x-loom-served-by"), Some("eu-central"));
        assert_eq!(c.who_saw("GET", &path), vec!["eu-central"], "{path}");
    }
    // Query POSTs are reads too.
    for path in [
        "/v2/getClusterStatuses",
        "/v2/getNodeProperties",
        "/v2/resolve",
    ] {
        let r = send(
            "POST",
            &c.dc(EU).url(path),
            &COOPR,
            br#"{"clusterId":"00000002"}"#,
        )
        .await;
        assert_eq!(r.header("x-loom-route"), Some("read"), "{path}");
        assert_eq!(c.who_saw("POST", path), vec!["eu-central"], "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_go_to_the_local_loom_which_allocates_in_its_home_shard() {
    let c = Cluster::start().await;
    for (i, expected) in [(EAST, "00000001"), (WEST, "00000002"), (EU, "00000003")] {
        let r = send(
            "POST",
            &c.dc(i).url("/v2/clusters"),
            &COOPR,
            br#"{"name":"c","clusterTemplate":"t","numMachines":1}"#,
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["id"], expected);
        assert_eq!(r.header("x-loom-route"), Some("create"));
        assert_eq!(r.header("x-loom-served-by"), Some(c.dc(i).name));
        let seen = c.dc(i).received();
        let last = seen.last().unwrap();
        assert_eq!(last.path_and_query, "/v2/clusters");
        assert_eq!(last.headers["x-loom-router-epoch"], "1");
    }
    assert_eq!(c.who_saw("POST", "/v2/clusters").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_goes_to_the_local_loom_with_its_epoch() {
    let c = Cluster::start().await;
    let id = create_cluster(c.dc(WEST), "w1").await;
    c.clear();
    let path = format!("/v2/clusters/{id}/abort");
    let r = send("POST", &c.dc(WEST).url(&path), &COOPR, b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-loom-route"), Some("write-local"));
    assert_eq!(r.header("x-loom-served-by"), Some("us-west"));
    assert_eq!(c.who_saw("POST", &path), vec!["us-west"]);
    let seen = &c.dc(WEST).received()[0];
    assert_eq!(seen.headers["x-loom-router-epoch"], "1");
    assert!(!seen.headers.contains_key("x-loom-router-hop"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_write_is_forwarded_once_to_the_owner_with_hop_headers() {
    let c = Cluster::start().await;
    let id = create_cluster(c.dc(WEST), "f1").await;
    c.clear();
    let path = format!("/v2/clusters/{id}");
    let body = br#"{"expireTime": 1900000000000}"#;
    let mut headers = IDENTITY.to_vec();
    headers.push(("x-loom-custom", "kept"));
    headers.push(("x-loom-route", "forged"));
    headers.push(("x-loom-router-epoch", "999"));
    let r = send("POST", &c.dc(EU).url(&path), &headers, body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(r.header("x-loom-served-by"), Some("us-west"));
    assert_eq!(c.who_saw("POST", &path), vec!["us-west"]);

    let seen = &c.dc(WEST).received()[0];
    assert_eq!(&seen.body[..], body);
    for (k, v) in IDENTITY {
        assert_eq!(seen.headers[k], v, "{k}");
    }
    assert_eq!(seen.headers["x-loom-custom"], "kept");
    assert!(!seen.headers.contains_key("x-loom-route"));
    assert_eq!(seen.headers["x-loom-router-hop"], "1");
    assert_eq!(seen.headers["x-loom-router-origin"], "eu-central");
    // The owner stamps its own epoch; a client's forged value never survives.
    assert_eq!(seen.headers["x-loom-router-epoch"], "1");
    let via: Vec<_> = seen.headers.get_all("via").iter().collect();
    assert_eq!(
        via,
        ["1.1 loom-router-eu-central", "1.1 loom-router-us-west"]
    );
    assert!(seen.headers["x-forwarded-for"]
        .to_str()
        .unwrap()
        .starts_with("127.0.0.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_writes_in_both_generations_reach_the_owner() {
    let c = Cluster::start().await;
    let id = create_cluster(c.dc(EU), "g").await;
    assert_eq!(id, "00000003");
    c.clear();
    for (method, path, headers) in [
        ("DELETE", format!("/v2/clusters/{id}"), &COOPR[..]),
        ("PUT", format!("/v2/clusters/{id}/config"), &COOPR[..]),
        (
            "POST",
            format!("/v2/clusters/{id}/services/hdfs/restart"),
            &COOPR[..],
        ),
        ("POST", format!("/v1/loom/clusters/{id}/abort"), &LOOM[..]),
        ("DELETE", format!("/v1/loom/clusters/{id}"), &LOOM[..]),
    ] {
        let r = send(method, &c.dc(EAST).url(&path), headers, b"{}").await;
        assert_eq!(
            r.header("x-loom-route"),
            Some("write-forwarded"),
            "{method} {path}"
        );
        assert_eq!(
            c.who_saw(method, &path),
            vec!["eu-central"],
            "{method} {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_writes_go_to_the_global_home() {
    let c = Cluster::start().await;
    for path in ["/v2/providers", "/v1/loom/hardwaretypes", "/v2/tenants"] {
        let r = send("POST", &c.dc(EU).url(path), &IDENTITY, br#"{"name":"p1"}"#).await;
        assert_eq!(r.header("x-loom-route"), Some("global-write"), "{path}");
        assert_eq!(r.header("x-loom-served-by"), Some("us-east"), "{path}");
        assert_eq!(c.who_saw("POST", path), vec!["us-east"], "{path}");
    }
    let r = send(
        "PUT",
        &c.dc(EAST).url("/v2/providers/p1"),
        &COOPR,
        br#"{"name":"p1"}"#,
    )
    .await;
    assert_eq!(r.header("x-loom-route"), Some("global-write"));
    assert_eq!(c.who_saw("PUT", "/v2/providers/p1"), vec!["us-east"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioner_traffic_and_passthrough_stay_local() {
    let c = Cluster::start().await;
    for (method, path) in [
        ("POST", "/v2/tasks/take"),
        ("POST", "/v2/tasks/finish"),
        ("POST", "/v1/loom/tasks/finish"),
        ("PUT", "/v2/provisioners/p1"),
        (
            "GET",
            "/v2/tenants/t1/automatortypes/chef/cookbooks/x/versions/1",
        ),
    ] {
        let r = send(
            method,
            &c.dc(WEST).url(path),
            &[],
            br#"{"workerId":"w","taskId":"00000003-001-001"}"#,
        )
        .await;
        assert_eq!(
            r.header("x-loom-route"),
            Some("provisioner"),
            "{method} {path}"
        );
        assert_eq!(c.who_saw(method, path), vec!["us-west"], "{method} {path}");
    }
    let r = get(&c.dc(EU).url("/status")).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"OK\n");
    assert_eq!(r.header("x-loom-route"), Some("passthrough"));
    assert_eq!(r.header("x-loom-served-by"), Some("eu-central"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_writes_route_by_the_cluster_in_the_body() {
    let c = Cluster::start().await;
    let id = create_cluster(c.dc(EU), "n").await;
    c.clear();
    let body = format!(r#"{{"id":"node-1","clusterId":"{id}","services":[]}}"#);
    let r = send(
        "POST",
        &c.dc(EAST).url("/v2/nodes"),
        &COOPR,
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(c.who_saw("POST", "/v2/nodes"), vec!["eu-central"]);
    assert_eq!(&c.dc(EU).received()[0].body[..], body.as_bytes());

    // An integer clusterId works the same.
    let body = r#"{"clusterId":3}"#;
    let r = send(
        "PUT",
        &c.dc(WEST).url("/v2/nodes/node-1"),
        &COOPR,
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(c.who_saw("PUT", "/v2/nodes/node-1"), vec!["eu-central"]);

    // No clusterId, or not JSON: local.
    let r = send("POST", &c.dc(WEST).url("/v2/nodes"), &COOPR, b"not json").await;
    assert_eq!(r.header("x-loom-route"), Some("write-local"));
    assert_eq!(r.header("x-loom-served-by"), Some("us-west"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_node_looks_up_its_cluster_locally_then_routes_to_the_owner() {
    let c = Cluster::start().await;
    let id = create_cluster(c.dc(EU), "n").await;
    let body = format!(r#"{{"id":"node-9","clusterId":"{id}"}}"#);
    let r = send("POST", &c.dc(EU).url("/v2/nodes"), &COOPR, body.as_bytes()).await;
    assert_eq!(r.status, 200);
    // Wait until the node has replicated to us-east, where the lookup happens.
    eventually(|| async {
        send("GET", &c.dc(EAST).url("/v2/nodes/node-9"), &COOPR, b"")
            .await
            .status
            == 200
    })
    .await;
    c.clear();
    let r = send("DELETE", &c.dc(EAST).url("/v2/nodes/node-9"), &COOPR, b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-loom-route"), Some("write-forwarded"));
    // Both routers look the node up in their own Loom: the receiver checks ownership itself
    // rather than trusting the sender's idea of the shard.
    assert_eq!(
        c.who_saw("GET", "/v2/nodes/node-9"),
        vec!["us-east", "eu-central"]
    );
    assert_eq!(c.who_saw("DELETE", "/v2/nodes/node-9"), vec!["eu-central"]);

    // An unknown node: local, where Loom answers 404.
    let r = send("DELETE", &c.dc(EAST).url("/v2/nodes/nope"), &COOPR, b"").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-loom-route"), Some("write-local"));
    assert_eq!(c.who_saw("DELETE", "/v2/nodes/nope"), vec!["us-east"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loom_errors_pass_through_byte_for_byte() {
    let c = Cluster::start().await;
    // No identity headers: Loom's own 401, untouched, from the owner.
    let r = send("DELETE", &c.dc(EAST).url("/v2/clusters/00000002"), &[], b"").await;
    assert_eq!(r.status, 401);
    assert_eq!(&r.body[..], b"Coopr-UserID not found in request headers.");
    assert_eq!(r.header("x-loom-router-error"), None);
    assert_eq!(r.header("x-loom-served-by"), Some("us-west"));
    let r = send("GET", &c.dc(EAST).url("/v2/clusters/00000099"), &COOPR, b"").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-loom-route"), Some("read"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_makes_a_remote_cluster_readable_locally() {
    let c = Cluster::start().await;
    let id = create_cluster(c.dc(EAST), "rep").await;
    eventually(|| async {
        send(
            "GET",
            &c.dc(EU).url(&format!("/v2/clusters/{id}")),
            &COOPR,
            b"",
        )
        .await
        .status
            == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_headers_can_be_turned_off() {
    let c = Cluster::start_with(Options {
        extra: "\n[response]\nroute_headers = false\n".to_owned(),
        ..Options::default()
    })
    .await;
    let r = get(&c.dc(EAST).url("/status")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-loom-route"), None);
    assert_eq!(r.header("x-loom-served-by"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_write_bodies_stream_to_the_owner_intact() {
    let c = Cluster::start().await;
    let id = create_cluster(c.dc(WEST), "big").await;
    c.clear();
    // Over max_retry_body_bytes (64 KiB): streamed once rather than buffered.
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let path = format!("/v2/clusters/{id}/config");
    let r = send("PUT", &c.dc(EU).url(&path), &COOPR, &body).await;
    assert_eq!(r.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(c.who_saw("PUT", &path), vec!["us-west"]);
    assert_eq!(c.dc(WEST).received()[0].body.len(), body.len());
    assert!(c.dc(WEST).received()[0].body[..] == body[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_generated_when_absent_and_passed_upstream() {
    let c = Cluster::start().await;
    let r = get(&c.dc(EAST).url("/status")).await;
    let id = r.header("x-request-id").unwrap().to_owned();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(
        c.dc(EAST).loom.received().last().unwrap().headers["x-request-id"],
        id.as_str()
    );
    let r = send(
        "GET",
        &c.dc(EAST).url("/status"),
        &[("x-request-id", "abc-123")],
        b"",
    )
    .await;
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_for_a_home_shard_owned_elsewhere_is_forwarded_to_its_owner() {
    // us-east's home shard (1) is owned by us-west at epoch 2, on every router.
    let c = Cluster::start_with(Options {
        extra: "\n[[shards]]\nresidue = 1\nowner = \"us-west\"\nepoch = 2\n".to_owned(),
        ..Options::default()
    })
    .await;
    let body = br#"{"name":"fwd","clusterTemplate":"t","numMachines":1}"#;
    let r = send("POST", &c.dc(EAST).url("/v2/clusters"), &COOPR, body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-loom-route"), Some("create-forwarded"));
    assert_eq!(r.header("x-loom-served-by"), Some("us-west"));
    // us-west's Loom allocates in its own home shard, which it owns.
    assert_eq!(r.json()["id"], "00000002");
    assert_eq!(c.who_saw("POST", "/v2/clusters"), vec!["us-west"]);
    let seen = &c.dc(WEST).received()[0];
    assert_eq!(seen.headers["x-loom-router-shard"], "1");
    assert_eq!(seen.headers["x-loom-router-origin"], "us-east");
    // The owner stamps the epoch it admitted the create under: its own home shard's.
    assert_eq!(seen.headers["x-loom-router-epoch"], "2");
    assert_eq!(&seen.body[..], body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_dropped_and_router_headers_stripped_on_the_local_path() {
    let c = Cluster::start().await;
    let r = send(
        "GET",
        &c.dc(EAST).url("/v2/clusters"),
        &[
            ("coopr-userid", "admin"),
            ("coopr-tenantid", "t"),
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("x-loom-route", "forged"),
            ("x-loom-served-by", "forged"),
            ("x-loom-router-epoch", "77"),
            ("x-forwarded-proto", "https"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("via"), Some("1.1 loom-router-us-east"));
    let seen = &c.dc(EAST).received()[0];
    for gone in [
        "x-secret",
        "connection",
        "x-loom-route",
        "x-loom-served-by",
        "x-loom-router-epoch",
    ] {
        assert!(!seen.headers.contains_key(gone), "{gone} reached Loom");
    }
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["via"], "1.1 loom-router-us-east");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_writes_job_ids_and_other_read_methods_route_as_the_table_says() {
    let c = Cluster::start().await;
    let r = send(
        "PATCH",
        &c.dc(EAST).url("/v2/clusters/00000002"),
        &COOPR,
        b"{}",
    )
    .await;
    assert_eq!(r.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(c.who_saw("PATCH", "/v2/clusters/00000002"), vec!["us-west"]);
    let r = send(
        "POST",
        &c.dc(EU).url("/v2/clusters/00000002-001/abort"),
        &COOPR,
        b"",
    )
    .await;
    assert_eq!(r.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(
        c.who_saw("POST", "/v2/clusters/00000002-001/abort"),
        vec!["us-west"]
    );
    for m in ["HEAD", "OPTIONS"] {
        let r = send(m, &c.dc(EU).url("/v2/clusters/00000002"), &COOPR, b"").await;
        assert_eq!(r.header("x-loom-route"), Some("read"), "{m}");
        assert_eq!(
            c.who_saw(m, "/v2/clusters/00000002"),
            vec!["eu-central"],
            "{m}"
        );
    }
}
