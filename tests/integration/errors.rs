//! Bad input and dead parts (docs/routing.md): every router error with its status, code, route
//! header and sentence, and nothing reaches a Loom that should not.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cluster_ids_bad_paths_and_unassigned_shards() {
    let c = Cluster::start().await;
    let e = c.dc(EAST);
    for id in ["abc", "-1", "9223372036854775808", "00000000000000000001"] {
        let r = send("DELETE", &e.url(&format!("/v2/clusters/{id}")), &COOPR, b"").await;
        r.assert_router_error(400, "bad_cluster_id", "unrouted");
    }
    for path in [
        "/v2/clusters/00000001/../00000002",
        "/v2/clusters/%2e%2e/00000002",
        "/v2/clusters%2F00000002",
        "/v2/clusters//00000002",
    ] {
        let r = send("DELETE", &e.url(path), &COOPR, b"").await;
        r.assert_router_error(400, "bad_path", "unrouted");
    }
    // Residue 5: no DC homes it.
    let r = send("DELETE", &e.url("/v2/clusters/00000005"), &COOPR, b"").await;
    r.assert_router_error(404, "unassigned_shard", "write-local");
    for dc in &c.dcs {
        assert!(dc.seen().is_empty(), "{} saw {:?}", dc.name, dc.seen());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_request_line_gets_bad_request_with_its_code() {
    let c = Cluster::start().await;
    let out = raw(c.dc(EAST).router, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert!(
        out.contains("x-loom-router-error: bad_request\r\n"),
        "{out}"
    );
    assert!(
        out.contains("content-type: text/plain; charset=utf-8\r\n"),
        "{out}"
    );
    assert!(out.contains("x-loom-route: unrouted\r\n"), "{out}");
    assert!(out.ends_with(".\n"), "{out}");
    // The router is still serving.
    assert_eq!(get(&c.dc(EAST).url("/status")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_headers_too_large() {
    let c = Cluster::start().await;
    let big = "x".repeat(70_000);
    let request = format!("GET /status HTTP/1.1\r\nhost: a\r\nx-big: {big}\r\n\r\n");
    let out = raw(c.dc(EAST).router, request.as_bytes()).await;
    assert!(
        out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{out}"
    );
    assert!(
        out.contains("x-loom-router-error: headers_too_large\r\n"),
        "{out}"
    );
    assert!(out.contains("65536 bytes"), "{out}");
    assert!(c.dc(EAST).seen().is_empty());
    // Just under the limit is fine.
    let ok = "x".repeat(60_000);
    let r = send("GET", &c.dc(EAST).url("/status"), &[("x-big", &ok)], b"").await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_node_body_gets_413() {
    let c = Cluster::start().await;
    let body = format!(
        r#"{{"clusterId":"00000002","pad":"{}"}}"#,
        "x".repeat(70_000)
    );
    let r = send(
        "POST",
        &c.dc(EAST).url("/v2/nodes"),
        &COOPR,
        body.as_bytes(),
    )
    .await;
    r.assert_router_error(413, "body_too_large", "unrouted");
    assert!(c.who_saw("POST", "/v2/nodes").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_disconnected_without_a_response_and_others_are_served() {
    let mut options = Options::default();
    options.per_dc[EAST] = "\n[limits]\nheader_read_timeout = \"300ms\"\n".to_owned();
    let c = Cluster::start_with(options).await;
    let addr = c.dc(EAST).router;
    let slow = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /status HTTP/1.1\r\nhost: a\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
        (started.elapsed(), out)
    });
    // Meanwhile another client is served at once.
    let r = get(&c.dc(EAST).url("/status")).await;
    assert_eq!(r.status, 200);
    let (elapsed, out) = slow.await.unwrap();
    assert!(out.is_empty(), "got {:?}", String::from_utf8_lossy(&out));
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_client_slow_to_send_its_next_head_is_disconnected_too() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut options = Options::default();
    options.per_dc[EAST] = "\n[limits]\nheader_read_timeout = \"300ms\"\n".to_owned();
    let c = Cluster::start_with(options).await;
    let mut stream = tokio::net::TcpStream::connect(c.dc(EAST).router)
        .await
        .unwrap();
    // Requests keep coming for longer than the timeout: each head is timed on its own, so the
    // connection stays up.
    let request = b"GET /status HTTP/1.1\r\nhost: a\r\n\r\n";
    for _ in 0..4 {
        stream.write_all(request).await.unwrap();
        let head = read_response_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Then half a head, and nothing more.
    stream.write_all(b"GET /status HTTP/1.1\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the router kept the connection open");
    assert!(out.is_empty(), "got {:?}", String::from_utf8_lossy(&out));
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

/// Read one response head and its `content-length` body from a raw connection.
async fn read_response_head(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "connection closed"
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .map_or(0, |n| n.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_gives_owner_unavailable_and_reads_elsewhere_keep_working() {
    let mut c = Cluster::start().await;
    let id = create_cluster(c.dc(WEST), "d").await;
    c.dcs[WEST].stop_router().await;
    c.dcs[WEST].stop_loom().await;
    // Health checks mark us-west down on every other router.
    for dc in [EAST, EU] {
        let admin = c.dc(dc).admin_url("/admin/table");
        eventually(|| async {
            let t = get(&admin).await.json();
            t["datacenters"][1]["healthy"] == false
        })
        .await;
    }
    let started = std::time::Instant::now();
    let r = send(
        "DELETE",
        &c.dc(EAST).url(&format!("/v2/clusters/{id}")),
        &COOPR,
        b"",
    )
    .await;
    r.assert_router_error(503, "owner_unavailable", "write-forwarded");
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert!(started.elapsed() < Duration::from_millis(500), "fail fast");
    // Reads in the surviving DCs are unaffected.
    for dc in [EAST, EU] {
        let r = send("GET", &c.dc(dc).url("/v2/clusters"), &COOPR, b"").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-loom-route"), Some("read"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_refuses_connections_before_health_notices_is_peer_unreachable() {
    let mut c = Cluster::start().await;
    c.dcs[WEST].stop_router().await;
    // Straight away, before the probes have marked it down.
    let r = send(
        "DELETE",
        &c.dc(EAST).url("/v2/clusters/00000002"),
        &COOPR,
        b"",
    )
    .await;
    if r.header("x-loom-router-error") == Some("owner_unavailable") {
        // The probes were quicker than us; that is the other correct answer.
        r.assert_router_error(503, "owner_unavailable", "write-forwarded");
    } else {
        r.assert_router_error(502, "peer_unreachable", "write-forwarded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_local_loom_gives_upstream_unreachable_and_other_dcs_keep_reading() {
    let mut c = Cluster::start().await;
    c.dcs[EU].stop_loom().await;
    let r = send("GET", &c.dc(EU).url("/v2/clusters"), &COOPR, b"").await;
    r.assert_router_error(502, "upstream_unreachable", "read");
    // eu-central's readiness follows its Loom.
    let admin = c.dc(EU).admin_url("/readyz");
    eventually(|| async { get(&admin).await.status == 503 }).await;
    for dc in [EAST, WEST] {
        let r = send("GET", &c.dc(dc).url("/v2/clusters"), &COOPR, b"").await;
        assert_eq!(r.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_local_loom_gives_upstream_timeout() {
    let hole = black_hole().await;
    let mut options = Options::default();
    options.loom_override[EAST] = Some(hole);
    options.per_dc[EAST] = "\n[limits]\nmax_concurrent_requests = 1\n".to_owned();
    let c = Cluster::start_with(options).await;
    let url = c.dc(EAST).url("/v2/clusters");
    let first = tokio::spawn(async move { send("GET", &url, &COOPR, b"").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The only permit is taken by the hung request.
    let r = send("GET", &c.dc(EAST).url("/v2/clusters"), &COOPR, b"").await;
    r.assert_router_error(503, "overloaded", "read");
    assert_eq!(r.header("retry-after"), Some("1"));
    let r = first.await.unwrap();
    r.assert_router_error(504, "upstream_timeout", "read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_body_with_a_bad_cluster_id_is_bad_cluster_id() {
    let c = Cluster::start().await;
    let r = send(
        "POST",
        &c.dc(EAST).url("/v2/nodes"),
        &COOPR,
        br#"{"clusterId":"x12"}"#,
    )
    .await;
    r.assert_router_error(400, "bad_cluster_id", "unrouted");
    assert!(c.who_saw("POST", "/v2/nodes").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_node_body_over_the_limit_is_413() {
    let c = Cluster::start().await;
    let chunk = "x".repeat(40_000);
    let request = format!(
        "POST /v2/nodes HTTP/1.1\r\nhost: a\r\ncoopr-userid: admin\r\ncoopr-tenantid: t\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         {len:x}\r\n{chunk}\r\n{len:x}\r\n{chunk}\r\n0\r\n\r\n",
        len = chunk.len()
    );
    let out = raw(c.dc(EAST).router, request.as_bytes()).await;
    assert!(
        out.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{out}"
    );
    assert!(
        out.contains("x-loom-router-error: body_too_large\r\n"),
        "{out}"
    );
    assert!(c.who_saw("POST", "/v2/nodes").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_gives_peer_timeout_after_write_timeout_plus_a_second() {
    // A peer that passes its readiness probes but never answers a write.
    let (hung, _) = stub(0, "text/plain", "").await;
    let mut options = Options::default();
    options.router_override[WEST] = Some(hung);
    let c = Cluster::start_with(options).await;
    let started = std::time::Instant::now();
    let r = send(
        "DELETE",
        &c.dc(EAST).url("/v2/clusters/00000002"),
        &COOPR,
        b"",
    )
    .await;
    r.assert_router_error(504, "peer_timeout", "write-forwarded");
    // write_timeout (2 s) + 1 s.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_on_a_body_too_big_to_keep_is_ownership_conflict_without_a_retry() {
    let (c, seen) = cluster_with_misdirecting_west().await;
    let body = vec![b'x'; 100_000];
    let r = send(
        "PUT",
        &c.dc(EAST).url("/v2/clusters/00000002/config"),
        &COOPR,
        &body,
    )
    .await;
    r.assert_router_error(503, "ownership_conflict", "write-forwarded");
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "a streamed body is sent once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_errors_drop_route_headers_when_they_are_off() {
    let c = Cluster::start_with(Options {
        extra: "\n[response]\nroute_headers = false\n".to_owned(),
        ..Options::default()
    })
    .await;
    let r = send("DELETE", &c.dc(EAST).url("/v2/clusters/abc"), &COOPR, b"").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-loom-router-error"), Some("bad_cluster_id"));
    assert_eq!(r.header("x-loom-route"), None);
    let out = raw(c.dc(EAST).router, b"NOT HTTP\r\n\r\n").await;
    assert!(
        out.contains("x-loom-router-error: bad_request\r\n"),
        "{out}"
    );
    assert!(!out.contains("x-loom-route:"), "{out}");
}
