//! Request workers (`[runtime] workers`): a router process with two workers, each accepting on
//! its own `SO_REUSEPORT` socket, and a reload that every worker's connections see at once.

use std::time::Duration;

use crate::support::*;

/// `loom_router_worker_connections_total` for each of the first `n` workers.
async fn accepted(router: &ChildRouter, n: usize) -> Vec<u64> {
    let metrics = get(&router.admin_url("/metrics")).await.text();
    (0..n)
        .map(|worker| {
            let name = format!("loom_router_worker_connections_total{{worker=\"{worker}\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&name))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

#[test]
fn every_worker_serves_with_the_reloaded_config() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loom = rt.block_on(slow_loom(Duration::from_millis(1)));
    let extra = "[runtime]\nworkers = 2\n";
    let router = ChildRouter::start(loom, extra, "warn", std::process::Stdio::null());
    router.until_readyz(&rt, 200);
    rt.block_on(async {
        // Open connections until both workers hold some: the kernel spreads them by hash.
        let mut held = Vec::new();
        while held.len() < 64 {
            let mut client = KeepAlive::open(router.http_addr()).await;
            let (status, route, body) = client.send("GET", "/v2/clusters").await;
            assert_eq!(
                (status, route.as_str(), body.as_str()),
                (200, "read", "slow")
            );
            held.push(client);
            let counts = accepted(&router, 2).await;
            if counts.iter().all(|c| *c > 0) {
                break;
            }
        }
        let counts = accepted(&router, 2).await;
        assert!(counts.iter().all(|c| *c > 0), "{counts:?}");
        assert_eq!(counts.iter().sum::<u64>(), held.len() as u64);

        // Turn the route headers off and reload.
        let path = router.config_path();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            format!("{text}\n[response]\nroute_headers = false\n"),
        )
        .unwrap();
        let r = send("POST", &router.admin_url("/admin/reload"), &[], b"").await;
        assert_eq!(r.status, 200, "{}", r.text());

        // Every connection, on either worker, is served under the new config.
        for client in &mut held {
            let (status, route, body) = client.send("GET", "/v2/clusters").await;
            assert_eq!((status, route.as_str(), body.as_str()), (200, "", "slow"));
        }
    });
}

/// Every listener queues `[listen] backlog` connections (1024 by default, capped by the kernel's
/// `somaxconn`), not the 128 that left a load balancer's burst of connections waiting for SYN
/// retries. `ss` (iproute2) shows a listening socket's queue size as its Send-Q.
#[test]
fn every_listener_has_the_configured_backlog() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let loom = rt.block_on(slow_loom(Duration::from_millis(1)));
    let router = ChildRouter::start(
        loom,
        "[runtime]\nworkers = 2\n",
        "warn",
        std::process::Stdio::null(),
    );
    router.until_readyz(&rt, 200);
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let want = 1024.min(somaxconn).to_string();
    let admin = router.admin_url("");
    let admin_port = admin.rsplit(':').next().unwrap();
    for port in [router.http_addr().port().to_string(), admin_port.to_owned()] {
        let out = std::process::Command::new("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) must be installed for this test");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let queues: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .collect();
        // The data port has one socket per worker.
        let expected = if port == admin_port { 1 } else { 2 };
        assert_eq!(queues, vec![want.as_str(); expected], "port {port}: {text}");
    }
}

#[test]
fn a_router_whose_runtime_ends_without_a_shutdown_stops_its_workers() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rt.block_on(Cluster::start());
    let router = c.dc(EAST).router;
    let r = rt.block_on(get(&c.dc(EAST).url("/status")));
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "OK\n"));
    // The router's task is dropped with its runtime, never told to shut down (an embedding
    // program that ends its runtime, every test here): its worker threads must stop too, and
    // close the listener, instead of serving on without the control plane.
    drop(rt);
    drop(c);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match std::net::TcpStream::connect(router) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{router} still accepts connections"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
