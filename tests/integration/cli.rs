//! `loom-router check` and `--version` (docs/configuration.md), run as the real binary.

use std::process::Command;
use std::time::Duration;

use crate::support::ChildRouter;

fn router(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loom-router"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn check_accepts_every_shipped_example_and_prints_one_line_per_shard() {
    for file in [
        "config/loom-router.toml",
        "config/local/us-east.toml",
        "config/local/us-west.toml",
        "config/local/eu-central.toml",
    ] {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        let out = router(&["check", "--config", &path]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let shard_lines: Vec<_> = stdout.lines().filter(|l| l.starts_with("shard ")).collect();
        assert_eq!(shard_lines.len(), 4, "{stdout}");
        assert!(
            shard_lines[0].starts_with("shard 1: owner us-east"),
            "{stdout}"
        );
        assert!(
            shard_lines[3].starts_with("shard global: owner us-east"),
            "{stdout}"
        );
    }
}

#[test]
fn check_reports_each_error_by_key_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
datacenter = "us-east"
global_home = "us-east"
[loom]
upstream = "http://127.0.0.1:55054"
[ids]
increment = 10
[[datacenters]]
name = "us-east"
id_start = 1
router = "http://10.1.0.10:8080"
replicas = ["eu-north"]
"#,
    )
    .unwrap();
    let out = router(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "datacenters[0].replicas[0]: unknown datacenter \"eu-north\"\n"
    );
}

#[test]
fn check_gives_line_and_column_for_syntax_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "datacenter = \"a\"\nglobal_home = [\n").unwrap();
    let out = router(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("TOML syntax error at line 2, column"),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_2_and_version_prints() {
    assert_eq!(router(&["check", "--no-such-flag"]).status.code(), Some(2));
    let out = router(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("loom-router {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn run_refuses_the_memory_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = local_config_with(dir.path(), "backend = \"memory\"");
    let out = router(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("coordination.backend"));
}

#[test]
fn sigterm_drains_in_flight_requests_turns_readyz_503_and_exits_0() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loom = rt.block_on(crate::support::slow_loom(Duration::from_millis(1500)));
    let extra = "[health]\ninterval = \"100ms\"\n[shutdown]\ndrain_timeout = \"5s\"\n";
    let mut router = ChildRouter::start(loom, extra, "warn", std::process::Stdio::null());
    router.until_readyz(&rt, 200);
    let url = router.url("/v2/clusters");
    let slow = rt
        .spawn(async move { crate::support::send("GET", &url, &crate::support::COOPR, b"").await });
    std::thread::sleep(Duration::from_millis(300));
    router.signal(nix::sys::signal::Signal::SIGTERM);
    // Readiness turns 503 at once, while the slow request is still in flight.
    router.until_readyz(&rt, 503);
    let response = rt.block_on(slow).unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(&response.body[..], b"slow");
    assert_eq!(router.child.wait().unwrap().code(), Some(0));
}

#[test]
fn sighup_reloads_the_config() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loom = rt.block_on(crate::support::slow_loom(Duration::from_millis(10)));
    let mut router = ChildRouter::start(loom, "", "warn", std::process::Stdio::null());
    let metrics = router.admin_url("/metrics");
    let reloads_ok = || async {
        let Ok(r) = crate::support::client().get(metrics.parse().unwrap()).await else {
            return None;
        };
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .ok()?
            .to_bytes();
        String::from_utf8_lossy(&body)
            .lines()
            .find(|l| l.starts_with("loom_router_config_reloads_total{result=\"ok\"}"))
            .map(|l| l.ends_with(" 1"))
    };
    rt.block_on(crate::support::eventually(|| async {
        reloads_ok().await == Some(false)
    }));
    router.signal(nix::sys::signal::Signal::SIGHUP);
    rt.block_on(crate::support::eventually(|| async {
        reloads_ok().await == Some(true)
    }));
    // Still serving after the reload, and SIGHUP did not end it.
    assert!(router.child.try_wait().unwrap().is_none());
    router.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(router.child.wait().unwrap().code(), Some(0));
}

#[test]
fn the_json_access_log_has_every_field() {
    use std::io::{BufRead, BufReader};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loom = rt.block_on(crate::support::slow_loom(Duration::from_millis(5)));
    let extra = "[log]\naccess = \"json\"\n";
    let mut router = ChildRouter::start(loom, extra, "info", std::process::Stdio::piped());
    router.until_readyz(&rt, 200);
    let headers = [
        ("coopr-userid", "u"),
        ("coopr-tenantid", "t"),
        ("x-request-id", "req-42"),
    ];
    let url = router.url("/v2/clusters/00000011/abort");
    let r = rt.block_on(crate::support::send("POST", &url, &headers, b""));
    assert_eq!(r.status, 200);
    router.signal(nix::sys::signal::Signal::SIGTERM);
    let stderr = router.child.stderr.take().unwrap();
    let line = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("loom_router::access") && l.contains("req-42"))
        .expect("an access log line for the request");
    let _ = router.child.wait();
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    let fields = &json["fields"];
    assert_eq!(fields["request_id"], "req-42", "{line}");
    assert_eq!(fields["method"], "POST");
    assert_eq!(fields["path"], "/v2/clusters/00000011/abort");
    assert_eq!(fields["route"], "write-local");
    assert_eq!(fields["cluster"], 11);
    assert_eq!(fields["shard"], "1");
    assert_eq!(fields["target_dc"], "a");
    assert_eq!(fields["status"], 200);
    assert!(fields["duration_us"].as_u64().unwrap() >= fields["upstream_us"].as_u64().unwrap());
    assert!(fields["upstream_us"].as_u64().unwrap() >= 5_000, "{line}");
}

/// `config/local/us-east.toml` with `coordination` as its `[coordination]` table, in `dir`.
fn local_config_with(dir: &std::path::Path, coordination: &str) -> std::path::PathBuf {
    let path = dir.join("router.toml");
    let text = std::fs::read_to_string(format!(
        "{}/config/local/us-east.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replace(
        "[health]",
        &format!("[coordination]\n{coordination}\n\n[health]"),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A config with the etcd backend, the local example's DCs otherwise.
fn etcd_config(dir: &std::path::Path) -> std::path::PathBuf {
    local_config_with(
        dir,
        "backend = \"etcd\"\nendpoints = [\"http://127.0.0.1:1\"]",
    )
}

/// Without the etcd feature, `check` and `run` both refuse an etcd config before anything
/// starts, and say how to get a binary that has it.
#[cfg(not(feature = "etcd"))]
#[test]
fn a_build_without_etcd_refuses_an_etcd_config_in_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = etcd_config(dir.path());
    let expected = "coordination.backend: this binary was built without the etcd backend; build \
                    with `--features etcd` (needs protoc) or use the Docker image\n";
    for command in ["check", "run"] {
        let out = router(&[command, "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{command}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), expected, "{command}");
    }
}

/// With the etcd feature, the same config is valid (a warning: etcd wants three DCs' worth of
/// failure domains, and this config has three).
#[cfg(feature = "etcd")]
#[test]
fn a_build_with_etcd_accepts_an_etcd_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = etcd_config(dir.path());
    let out = router(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("built without"));
}

/// A write that Loom answered while the router was paused past `write_timeout` (SIGSTOP, a VM
/// freeze) is answered with Loom's response, not 504: the deadline bounds the wait, not whether
/// an answer that came is reported. Over an owned upstream connection and through the pool.
#[test]
fn a_write_loom_answered_while_the_router_was_paused_is_relayed_not_timed_out() {
    use crate::support::{send, KeepAlive, COOPR};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loom = rt.block_on(crate::support::slow_loom(Duration::from_millis(300)));
    let router = ChildRouter::start(loom, "", "warn", std::process::Stdio::null());
    router.until_readyz(&rt, 200);
    let write = "/v2/clusters/00000011/abort";
    // A keep-alive client whose second request goes over its own upstream connection.
    let addr = router.http_addr();
    let owned = rt.spawn(async move {
        let mut client = KeepAlive::open(addr).await;
        let (status, _, _) = client.send("GET", "/v2/clusters").await;
        assert_eq!(status, 200);
        client.send("POST", write).await
    });
    // A first request on a new connection, through the shared pool.
    let url = router.url(write);
    std::thread::sleep(Duration::from_millis(350));
    let pooled = rt.spawn(async move { send("POST", &url, &COOPR, b"").await });
    // Both writes are at Loom (300 ms each); pause the router past write_timeout (2 s).
    std::thread::sleep(Duration::from_millis(100));
    router.signal(nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(3000));
    router.signal(nix::sys::signal::Signal::SIGCONT);
    let (status, route, body) = rt.block_on(owned).unwrap();
    assert_eq!(
        (status, route.as_str(), body.as_str()),
        (200, "write-local", "slow")
    );
    let pooled = rt.block_on(pooled).unwrap();
    assert_eq!(pooled.status, 200, "{}", pooled.text());
    assert_eq!(&pooled.body[..], b"slow");
}

/// The origin of a forwarded write relays the owner's answer when it came while the origin was
/// paused past its own deadline (`write_timeout` + 1 s): the same rule as for Loom's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_answered_while_the_origin_was_paused_is_relayed_not_timed_out() {
    use crate::support::*;
    let mut options = Options::default();
    // us-east owns cluster 1; its Loom answers writes in 300 ms.
    options.loom_override[EAST] = Some(slow_loom(Duration::from_millis(300)).await);
    options.external_router[WEST] = true;
    let c = Cluster::start_with(options).await;
    let origin = c.dc(WEST).spawn_router();
    let readyz = c.dc(WEST).admin_url("/readyz");
    eventually(|| async {
        client()
            .get(readyz.parse().unwrap())
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;

    let url = c.dc(WEST).url("/v2/clusters/00000001/abort");
    let write = tokio::spawn(async move { send("POST", &url, &COOPR, b"").await });
    // Forwarded by now, and at us-east's Loom: pause the origin past its 3 s deadline.
    tokio::time::sleep(Duration::from_millis(100)).await;
    origin.signal(nix::sys::signal::Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(4000)).await;
    origin.signal(nix::sys::signal::Signal::SIGCONT);
    let r = write.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(&r.body[..], b"slow");
    assert_eq!(r.header("x-loom-route"), Some("write-forwarded"));
    assert_eq!(r.header("x-loom-served-by"), Some("us-east"));
    // Not applied at the origin's Loom, nor anywhere but the owner's.
    assert_eq!(
        c.who_saw("POST", "/v2/clusters/00000001/abort"),
        Vec::<&str>::new()
    );
}
