//! The HTTP edge under hostile input (docs/routing.md): paths that normalise into the API,
//! `Connection` on several lines, bad `Host` fields, stalled bodies, forged router headers and
//! client certificates. Each test sends exact request bytes and asserts what reached which Loom.

use std::time::Duration;

use loom_emulator::{Emulator, EmulatorConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Coopr's identity headers as request lines.
const IDENTITY: &str = "coopr-userid: admin\r\ncoopr-tenantid: tenant1\r\n";

/// A response read off the wire: status, lower-cased head and body.
#[derive(Debug)]
struct Wire {
    status: u16,
    head: String,
    body: String,
}

impl Wire {
    fn parse(out: &str) -> Self {
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {out:?}"));
        Self {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_owned(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            (n == name).then(|| v.trim())
        })
    }

    /// A router error: status, code, route header, and one sentence.
    fn assert_router_error(&self, status: u16, code: &str, route: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("x-loom-router-error"), Some(code), "{self:?}");
        assert_eq!(self.header("x-loom-route"), Some(route), "{self:?}");
        assert_eq!(self.header("x-loom-served-by"), None);
        assert!(
            self.body.ends_with(".\n") && self.body.lines().count() == 1,
            "{self:?}"
        );
    }
}

/// Send exact bytes on a new connection; the request should ask to close it.
async fn wire(addr: std::net::SocketAddr, request: &str) -> Wire {
    Wire::parse(&raw(addr, request.as_bytes()).await)
}

fn delete(path: &str) -> String {
    format!("DELETE {path} HTTP/1.1\r\nhost: loom\r\n{IDENTITY}connection: close\r\n\r\n")
}

/// `java.net.URI.create(target).normalize().getPath()`, which Loom's HTTP layer routes on,
/// written here from the JDK's documented behaviour and independent of the router and the
/// emulator: a leading `//` starts an authority; `normalize()` works on the encoded path,
/// merging slashes, dropping `.` and resolving `x/..`, keeping a `..` it cannot resolve; then
/// `getPath()` decodes percent-escapes.
fn java_uri_path(target: &str) -> String {
    let path = match target.strip_prefix("//") {
        Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
        None => target,
    };
    let mut out: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut trailing = path.len() > 1 && path.ends_with('/');
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        if *part == "." {
            trailing |= last;
        } else if *part == ".." && out.last().is_some_and(|p| *p != "..") {
            out.pop();
            trailing |= last;
        } else {
            out.push(part);
        }
    }
    let mut normal = format!("/{}", out.join("/"));
    if trailing && !out.is_empty() {
        normal.push('/');
    }
    percent_encoding::percent_decode_str(&normal)
        .decode_utf8_lossy()
        .into_owned()
}

fn decoded(path: &str) -> String {
    percent_encoding::percent_decode_str(path)
        .decode_utf8_lossy()
        .into_owned()
}

/// A request reached Loom without any `X-Loom-Router-*` header.
fn assert_no_router_headers(received: &loom_emulator::Received) {
    let router: Vec<_> = received
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-loom-router-"))
        .collect();
    assert!(router.is_empty(), "{router:?}");
}

/// What became of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// 400 `bad_path`, and no Loom saw it.
    Refused,
    /// Exactly this DC's Loom saw it, with the path unchanged.
    Seen(usize),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_that_normalises_into_the_api_is_refused_and_the_cluster_stays() {
    let c = Cluster::start().await;
    // Cluster 00000003 lives in eu-central's shard 3.
    let id = create_cluster(c.dc(EU), "victim").await;
    assert_eq!(id, "00000003");
    tokio::time::sleep(Duration::from_millis(200)).await; // replicated everywhere
    c.clear();
    let applied: Vec<usize> = c
        .dcs
        .iter()
        .map(|dc| dc.loom.applied_writes().len())
        .collect();
    let r = wire(c.dc(WEST).router, &delete("//v1/loom/clusters/00000003")).await;
    r.assert_router_error(400, "bad_path", "unrouted");
    let r = wire(c.dc(WEST).router, &delete("/v1//loom/clusters/00000003")).await;
    r.assert_router_error(400, "bad_path", "unrouted");
    for (dc, before) in c.dcs.iter().zip(applied) {
        assert!(dc.seen().is_empty(), "{} saw {:?}", dc.name, dc.seen());
        assert_eq!(dc.loom.applied_writes().len(), before, "{}", dc.name);
    }
    // The cluster is untouched in its owner's Loom.
    let cluster = c.dc(EU).loom.cluster(3).expect("still there");
    assert_ne!(cluster["status"], "terminated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_accepted_only_where_the_router_and_javas_normaliser_agree() {
    use Fate::{Refused, Seen};
    let c = Cluster::start().await;
    // DELETE through us-west. Shard 3 belongs to eu-central, so an accepted cluster path is
    // forwarded there; passthrough paths stay at us-west's Loom.
    let table: &[(&str, Fate)] = &[
        ("/v2/clusters/00000013", Seen(EU)),
        ("/v1/loom/clusters/00000013", Seen(EU)),
        ("/v2/%63lusters/00000013", Seen(EU)),
        ("/v2/clusters/%30%30000013", Seen(EU)),
        ("/v2/clusters/00000013-001", Seen(EU)),
        ("/v3/clusters/00000013", Seen(WEST)),
        ("/v2x/clusters/00000013", Seen(WEST)),
        ("/a/b.c/..d/.e", Seen(WEST)),
        ("/status/", Seen(WEST)),
        ("//v1/loom/clusters/00000013", Refused),
        ("//x/v2/clusters/00000013", Refused),
        ("/v1//loom/clusters/00000013", Refused),
        ("/v2/clusters//00000013", Refused),
        ("/x/../v1/loom/clusters/00000013", Refused),
        ("/./v2/clusters/00000013", Refused),
        ("/v2/./clusters/00000013", Refused),
        ("/v2/clusters/00000012/../00000013", Refused),
        ("/%2e/v2/clusters/00000013", Refused),
        ("/x/%2E%2e/v2/clusters/00000013", Refused),
        ("/v2/clusters/.%2e/00000013", Refused),
        ("/v2/clusters%2F00000013", Refused),
        ("/v2%2fclusters/00000013", Refused),
        ("/v2/clusters%5C00000013", Refused),
        ("/v2/clusters\\00000013", Refused),
        ("http://loom//v1/loom/clusters/00000013", Refused),
        ("http://loom/x/../v2/clusters/00000013", Refused),
        ("/v2/clusters/00000013/", Refused),
        ("/foo/../status", Refused),
        ("/x//y", Refused),
    ];
    for &(path, fate) in table {
        c.clear();
        let r = wire(c.dc(WEST).router, &delete(path)).await;
        let agree = java_uri_path(path) == decoded(path);
        match fate {
            Refused => {
                r.assert_router_error(400, "bad_path", "unrouted");
                for dc in &c.dcs {
                    assert!(dc.seen().is_empty(), "{path}: {} saw it", dc.name);
                }
            }
            Seen(dc) => {
                assert!(
                    agree,
                    "{path}: accepted, but Java routes it on {:?}",
                    java_uri_path(path)
                );
                assert_eq!(r.header("x-loom-router-error"), None, "{path}: {r:?}");
                assert_eq!(
                    r.header("x-loom-served-by"),
                    Some(c.dc(dc).name),
                    "{path}: {r:?}"
                );
                for (i, other) in c.dcs.iter().enumerate() {
                    let expected = if i == dc {
                        vec![("DELETE".to_owned(), path.to_owned())]
                    } else {
                        Vec::new()
                    };
                    assert_eq!(other.seen(), expected, "{path}: {}", other.name);
                }
            }
        }
    }
    // Every path Java would route somewhere other than where it reads was refused.
    for &(path, fate) in table {
        if java_uri_path(path) != decoded(path) {
            assert_eq!(fate, Refused, "{path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_named_on_any_connection_line_never_reach_loom() {
    let c = Cluster::start().await;
    // A forwarded write (shard 3, eu-central) and a local one (shard 2, us-west).
    for (path, owner) in [
        ("/v2/clusters/00000013/abort", EU),
        ("/v2/clusters/00000012/abort", WEST),
    ] {
        c.clear();
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: loom\r\n{IDENTITY}connection: keep-alive\r\n\
             connection: X-Secret, close\r\nx-secret: s3cret\r\nx-kept: yes\r\n\
             content-length: 0\r\n\r\n"
        );
        let r = wire(c.dc(WEST).router, &request).await;
        assert_eq!(
            r.header("x-loom-served-by"),
            Some(c.dc(owner).name),
            "{r:?}"
        );
        let got = c.dc(owner).received();
        assert_eq!(got.len(), 1, "{path}");
        assert_eq!(got[0].path_and_query, path);
        assert!(
            !got[0].headers.contains_key("x-secret"),
            "{path}: {:?}",
            got[0].headers
        );
        assert_eq!(got[0].headers["x-kept"], "yes");
        assert_eq!(got[0].headers["coopr-userid"], "admin");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_duplicate_or_malformed_host_is_bad_request() {
    let c = Cluster::start().await;
    let request = |host_lines: &str, version: &str| {
        format!(
            "POST /v2/clusters/00000012/abort {version}\r\n{host_lines}{IDENTITY}\
             connection: close\r\ncontent-length: 0\r\n\r\n"
        )
    };
    for (host_lines, version) in [
        ("", "HTTP/1.1"),
        ("", "HTTP/1.0"),
        ("host: a\r\nhost: b\r\n", "HTTP/1.1"),
        ("host: loom/v2\r\n", "HTTP/1.1"),
        ("host: user@loom\r\n", "HTTP/1.1"),
        ("host: lo om\r\n", "HTTP/1.1"),
        ("host: loom:80:81\r\n", "HTTP/1.1"),
        ("host: \r\n", "HTTP/1.1"),
    ] {
        let r = wire(c.dc(WEST).router, &request(host_lines, version)).await;
        r.assert_router_error(400, "bad_request", "unrouted");
        assert!(r.body.contains("Host"), "{r:?}");
    }
    for dc in &c.dcs {
        assert!(dc.seen().is_empty(), "{} saw {:?}", dc.name, dc.seen());
    }
    // One good Host is served, and passed on as X-Forwarded-Host.
    let r = wire(
        c.dc(WEST).router,
        &request("host: loom.example:8080\r\n", "HTTP/1.1"),
    )
    .await;
    // Loom's own answer: there is no such cluster.
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.header("x-loom-router-error"), None);
    assert_eq!(r.header("x-loom-served-by"), Some("us-west"));
    let got = c.dc(WEST).received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["x-forwarded-host"], "loom.example:8080");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_router_headers_never_reach_loom_and_a_shardless_hop_is_refused() {
    let c = Cluster::start().await;
    // A client's router headers on a write that names no shard: stripped, the router's own
    // (none here: there is no shard epoch) sent instead.
    let body = r#"{"id":"n1","hostname":"h"}"#;
    let request = format!(
        "POST /v2/nodes HTTP/1.1\r\nhost: loom\r\n{IDENTITY}x-loom-router-epoch: 999\r\n\
         x-loom-router-origin: us-east\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = wire(c.dc(WEST).router, &request).await;
    assert_eq!(r.header("x-loom-route"), Some("write-local"), "{r:?}");
    let got = c.dc(WEST).received();
    assert_eq!(got.len(), 1);
    assert_no_router_headers(&got[0]);
    // The same write claiming to be a hop: refused, and no Loom saw it.
    c.clear();
    let request = request.replace(
        "x-loom-router-epoch: 999\r\n",
        "x-loom-router-hop: 1\r\nx-loom-router-epoch: 999\r\n",
    );
    let r = wire(c.dc(WEST).router, &request).await;
    r.assert_router_error(400, "bad_request", "write-local");
    // A hop read names no shard either.
    let r = wire(
        c.dc(WEST).router,
        &format!(
            "GET /v2/clusters HTTP/1.1\r\nhost: loom\r\n{IDENTITY}x-loom-router-hop: 1\r\n\
             connection: close\r\n\r\n"
        ),
    )
    .await;
    r.assert_router_error(400, "bad_request", "read");
    for dc in &c.dcs {
        assert!(dc.seen().is_empty(), "{} saw {:?}", dc.name, dc.seen());
    }
}

/// Send a head declaring a 100-byte body and only part of it, then read the answer.
async fn stall(addr: std::net::SocketAddr, path: &str) -> (Duration, Wire) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: loom\r\n{IDENTITY}content-type: application/json\r\n\
         content-length: 100\r\n\r\n{{\"partial\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    (
        started.elapsed(),
        Wire::parse(&String::from_utf8_lossy(&out)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_408_client_timeout_locally_and_forwarded() {
    let mut options = Options::default();
    for dc in &mut options.per_dc {
        *dc = "\n[limits]\nbody_read_timeout = \"300ms\"\n".to_owned();
    }
    let c = Cluster::start_with(options).await;
    for (path, route) in [
        // Shard 2 is us-west's own: the body streams to its Loom.
        ("/v2/clusters/00000012/abort", "write-local"),
        // Shard 3: buffered for a retry, then forwarded.
        ("/v2/clusters/00000013/abort", "write-forwarded"),
        // The router reads a node body itself.
        ("/v2/nodes", "unrouted"),
    ] {
        let (elapsed, r) = stall(c.dc(WEST).router, path).await;
        r.assert_router_error(408, "client_timeout", route);
        assert_eq!(r.header("connection"), Some("close"), "{r:?}");
        assert!(elapsed < Duration::from_secs(2), "{path}: {elapsed:?}");
    }
    for dc in &c.dcs {
        assert!(dc.loom.applied_writes().is_empty(), "{}", dc.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_still_incomplete_at_the_write_deadline_is_the_clients_fault() {
    // Each byte comes before the stall timer runs out, but the body is not done when the
    // write's deadline (write_timeout, 2 s) passes.
    let mut options = Options::default();
    options.per_dc[WEST] = "\n[limits]\nbody_read_timeout = \"1s\"\n".to_owned();
    let c = Cluster::start_with(options).await;
    let mut stream = TcpStream::connect(c.dc(WEST).router).await.unwrap();
    let head = format!(
        "POST /v2/clusters/00000012/abort HTTP/1.1\r\nhost: loom\r\n{IDENTITY}\
         content-length: 100\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..40 {
            if writer.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(6), reader.read_to_end(&mut out)).await;
    trickle.abort();
    let r = Wire::parse(&String::from_utf8_lossy(&out));
    r.assert_router_error(408, "client_timeout", "write-local");
    // The sentence names the time that ran out: the write's deadline, not the stall timer.
    assert!(r.body.contains(" 2s;"), "{r:?}");
    assert!(c.dc(WEST).loom.applied_writes().is_empty());
}

#[test]
fn client_timeouts_are_counted_as_client_errors_not_upstream_errors() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = Emulator::new(EmulatorConfig {
        dc: "a".to_owned(),
        id_start: 1,
        increment: 10,
        replication_delay: Duration::from_millis(50),
    });
    let (loom, _handle) = rt.block_on(emulator.spawn()).unwrap();
    let extra = "[limits]\nbody_read_timeout = \"200ms\"\n";
    let router = ChildRouter::start(loom, extra, "warn", std::process::Stdio::null());
    router.until_readyz(&rt, 200);
    let addr = router
        .url("")
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let (_, r) = rt.block_on(stall(addr, "/v2/clusters/00000011/abort"));
    r.assert_router_error(408, "client_timeout", "write-local");
    let r = rt.block_on(wire(addr, &delete("/x/../v2/clusters/00000011")));
    r.assert_router_error(400, "bad_path", "unrouted");
    let metrics = rt.block_on(get(&router.admin_url("/metrics"))).text();
    let line = |prefix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_owned)
    };
    assert_eq!(
        line("loom_router_client_errors_total{kind=\"client_timeout\"}").as_deref(),
        Some("loom_router_client_errors_total{kind=\"client_timeout\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        line("loom_router_client_errors_total{kind=\"bad_path\"}").as_deref(),
        Some("loom_router_client_errors_total{kind=\"bad_path\"} 1")
    );
    let upstream: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("loom_router_upstream_errors_total{"))
        .collect();
    assert!(upstream.iter().all(|l| l.ends_with(" 0")), "{upstream:?}");
    assert!(emulator.applied_writes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_body_only_a_lenient_parser_reads_is_refused() {
    let c = Cluster::start().await;
    // Coopr's Gson would read clusterId 13 (eu-central's shard) from each of these; strict JSON
    // refuses them, so the router would have sent them to us-west's own Loom.
    for body in [
        &br#"{"clusterId":"00000013","clusterId":"00000013","id":"n1"}"#[..],
        br#"{clusterId:'00000013',id:'n1'}"#,
        b"\xef\xbb\xbf{\"clusterId\":\"00000013\",\"id\":\"n1\"}",
    ] {
        let mut request = format!(
            "POST /v2/nodes HTTP/1.1\r\nhost: loom\r\n{IDENTITY}connection: close\r\n\
             content-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        let out = raw(c.dc(WEST).router, &request).await;
        Wire::parse(&out).assert_router_error(400, "bad_request", "unrouted");
    }
    for dc in &c.dcs {
        assert!(dc.seen().is_empty(), "{} saw {:?}", dc.name, dc.seen());
    }
    // A body that is not JSON and cannot name a cluster still goes to the local Loom.
    let r = send("POST", &c.dc(WEST).url("/v2/nodes"), &COOPR, b"hostname=h1").await;
    assert_eq!(
        r.header("x-loom-route"),
        Some("write-local"),
        "{}",
        r.text()
    );
    assert_eq!(r.header("x-loom-served-by"), Some("us-west"));
    assert_eq!(c.who_saw("POST", "/v2/nodes"), vec!["us-west"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_node_delete_for_a_node_unknown_here_gets_looms_answer_without_router_headers() {
    let c = Cluster::start().await;
    let hop = [
        ("x-loom-router-hop", "1"),
        ("x-loom-router-origin", "us-east"),
        ("x-loom-router-epoch", "77"),
        ("coopr-userid", "admin"),
        ("coopr-tenantid", "tenant1"),
    ];
    let r = send(
        "DELETE",
        &c.dc(WEST).url("/v2/nodes/no-such-node"),
        &hop,
        b"",
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.header("x-loom-router-error"), None);
    assert_eq!(r.header("x-loom-served-by"), Some("us-west"));
    let deletes: Vec<_> = c
        .dc(WEST)
        .received()
        .into_iter()
        .filter(|r| r.method == http::Method::DELETE)
        .collect();
    assert_eq!(deletes.len(), 1);
    assert_no_router_headers(&deletes[0]);
}
