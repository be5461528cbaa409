//! Test support: three emulated DCs, each with a Loom emulator and a real router on 127.0.0.1
//! port 0, plus a small HTTP client that returns everything a test asserts on.
//!
//! Scenarios read as: start a [`Cluster`], send requests through one DC's router, then assert
//! what the client got *and* what each DC's Loom received.

#![allow(dead_code)] // each test module uses a different part of the support

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use loom_emulator::{Emulator, EmulatorHandle, Received};
use loom_router::app::App;
use loom_router::config::Config;
use loom_router::coord::memory::{MemoryClient, MemoryStore};
use loom_router::coord::store::Store;
use loom_router::demo::sandbox::{self, Coordination, Profile, RouterToml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use loom_router::demo::sandbox::DCS;
pub const EAST: usize = 0;
pub const WEST: usize = 1;
pub const EU: usize = 2;

/// Identity headers Coopr requires on /v2.
pub const COOPR: [(&str, &str); 2] = [("coopr-userid", "admin"), ("coopr-tenantid", "tenant1")];
/// Identity headers Loom requires on /v1/loom.
pub const LOOM: [(&str, &str); 2] = [("x-loom-userid", "admin"), ("x-loom-apikey", "key1")];

/// Another router of one DC ([`Dc::second_router`]); stopped when dropped.
#[derive(Debug)]
pub struct SecondRouter {
    pub router: SocketAddr,
    pub admin: SocketAddr,
    stop: CancellationToken,
    _task: JoinHandle<()>,
}

impl SecondRouter {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.router)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

impl Drop for SecondRouter {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One emulated DC: its Loom and its router.
#[derive(Debug)]
pub struct Dc {
    pub name: &'static str,
    pub loom: Emulator,
    pub loom_addr: SocketAddr,
    loom_handle: Option<EmulatorHandle>,
    pub router: SocketAddr,
    pub admin: SocketAddr,
    router_stop: CancellationToken,
    router_task: Option<JoinHandle<()>>,
    /// The router's config, to start it again after a stop.
    toml: String,
    /// This router's connection to the memory store (memory backend only).
    pub store: Option<MemoryClient>,
    /// The https listener (serving only with `Options::tls`).
    pub https: SocketAddr,
    /// The router's config file, with `Options::config_files`.
    pub config_path: Option<std::path::PathBuf>,
    /// Holds the file's directory for as long as the DC lives.
    _config_dir: Option<tempfile::TempDir>,
}

impl Dc {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.router)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Stop this DC's Loom: connections are refused from now on.
    pub async fn stop_loom(&mut self) {
        if let Some(h) = self.loom_handle.take() {
            h.stop().await;
        }
    }

    /// Stop this DC's router (drains, then its port refuses connections).
    pub async fn stop_router(&mut self) {
        self.router_stop.cancel();
        if let Some(task) = self.router_task.take() {
            let _ = task.await;
        }
    }

    /// Start this DC's Loom again on its old address, with the data it had.
    pub async fn restore_loom(&mut self) {
        let (_, handle) = self.loom.spawn_at(self.loom_addr).await.unwrap();
        self.loom_handle = Some(handle);
    }

    /// Run this DC's router as a child process (so that it can be paused with SIGSTOP), for
    /// a cluster started with `external_router` set for this DC.
    pub fn spawn_router(&self) -> Spawned {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.toml");
        let toml = format!(
            "{}\n[listen]\nhttp = \"{}\"\nadmin = \"{}\"\n",
            self.config_toml(),
            self.router,
            self.admin
        );
        std::fs::write(&path, toml).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_loom-router"))
            .args(["run", "--config", path.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Spawned { child, _dir: dir }
    }

    /// Start another router for this DC, in process on new ports, with the same config: a DC
    /// runs several behind its load balancer. Its peers do not know it; it knows them.
    pub async fn second_router(&self) -> SecondRouter {
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (router, admin_addr) = (http.local_addr().unwrap(), admin.local_addr().unwrap());
        let mut app = App::from_listeners(Config::from_toml(&self.toml).unwrap(), http, admin);
        if let Some(client) = &self.store {
            app = app.with_store(Store::Memory(client.clone()));
        }
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move { app.run(stopped).await.unwrap() });
        let second = SecondRouter {
            router,
            admin: admin_addr,
            stop,
            _task: task,
        };
        eventually(|| async {
            let table = get(&second.admin_url("/admin/table")).await;
            table.status == 200
                && table.json()["datacenters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|d| d["healthy"] == true)
        })
        .await;
        second
    }

    /// The router's config text (to run it as a child process).
    pub fn config_toml(&self) -> &str {
        &self.toml
    }

    /// Start this DC's router again on its old ports, with its old config.
    pub async fn restore_router(&mut self) {
        let http = TcpListener::bind(self.router).await.unwrap();
        let admin = TcpListener::bind(self.admin).await.unwrap();
        let config = Config::from_toml(&self.toml).unwrap();
        let mut app = App::from_listeners(config, http, admin);
        if let Some(client) = &self.store {
            app = app.with_store(Store::Memory(client.clone()));
        }
        self.router_stop = CancellationToken::new();
        let stopped = self.router_stop.clone();
        self.router_task = Some(tokio::spawn(async move { app.run(stopped).await.unwrap() }));
    }

    /// Stop both, as a DC failure would (the router's lease is not revoked: it expires).
    pub async fn kill(&mut self) {
        self.stop_router().await;
        self.stop_loom().await;
    }

    /// Requests this DC's Loom received, as (method, path and query).
    pub fn seen(&self) -> Vec<(String, String)> {
        self.loom
            .received()
            .into_iter()
            .filter(|r| r.path_and_query != "/status")
            .map(|r| (r.method.to_string(), r.path_and_query))
            .collect()
    }

    /// The non-probe requests this DC's Loom received.
    pub fn received(&self) -> Vec<Received> {
        self.loom
            .received()
            .into_iter()
            .filter(|r| r.path_and_query != "/status")
            .collect()
    }
}

/// Three DCs (us-east, us-west, eu-central), increment 10, global shard homed in us-east.
#[derive(Debug)]
pub struct Cluster {
    pub dcs: Vec<Dc>,
    /// Certificates, with `Options::tls`.
    pub certs: Option<(tempfile::TempDir, crate::certs::TestCa)>,
    /// The shared coordination store (memory backend only).
    pub store: Option<MemoryStore>,
    /// DCs whose Loom is not an emulator (never ready; not waited for).
    overridden: [bool; 3],
}

/// Knobs for a cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// Extra TOML appended to every router's config (top-level `[[shards]]` or tables).
    pub extra: String,
    /// Extra TOML for one DC's router only.
    pub per_dc: [String; 3],
    /// Replication delay of the emulated Looms.
    pub replication_delay: Duration,
    /// Use this address as a DC's Loom instead of an emulator (a black hole, say).
    pub loom_override: [Option<SocketAddr>; 3],
    /// Tell every router that this address is a DC's router (a stub peer, say).
    pub router_override: [Option<SocketAddr>; 3],
    /// Coordinate through one in-process memory store (leases, automatic failover), with a
    /// become-owner hook on each DC's emulated Loom.
    pub memory: bool,
    /// Coordinate through etcd instead: each DC's endpoints (a real etcd, or a fault proxy in
    /// front of it), and the key prefix for this test.
    pub etcd: Option<([Vec<String>; 3], String)>,
    /// Lease, keepalive and write timeout with a store, instead of the short ones tests use.
    pub profile: Option<Profile>,
    /// Do not start this DC's router in process (a test runs it as a child process).
    pub external_router: [bool; 3],
    /// The become-owner hook URL for every router, instead of its own Loom's.
    pub hook: Option<String>,
    /// Serve https too, with certificates from this CA, and reach peers over https (mTLS).
    pub tls: bool,
    /// `[tls] client_auth` with `tls`: "optional" or "required".
    pub client_auth: &'static str,
    /// Give each router its config as a file, which it reloads (file change, POST
    /// /admin/reload).
    pub config_files: bool,
    /// `[loom] connect_timeout`, which is also how long a request waits for a connection when
    /// `max_upstream_connections` are all busy.
    pub connect_timeout: Duration,
    /// `[health] interval` of every router (100 ms).
    pub health_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            extra: String::new(),
            per_dc: [String::new(), String::new(), String::new()],
            replication_delay: Duration::from_millis(50),
            loom_override: [None, None, None],
            router_override: [None, None, None],
            memory: false,
            etcd: None,
            profile: None,
            external_router: [false, false, false],
            hook: None,
            tls: false,
            client_auth: "optional",
            config_files: false,
            connect_timeout: Duration::from_millis(300),
            health_interval: Duration::from_millis(100),
        }
    }
}

impl Cluster {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let mut looms = Vec::new();
        for loom in sandbox::looms(options.replication_delay) {
            let (addr, handle) = loom.spawn().await.unwrap();
            looms.push((loom, addr, handle));
        }
        let mut listeners = Vec::new();
        let mut https_listeners = Vec::new();
        for _ in DCS {
            let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listeners.push((http, admin));
            https_listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let certs = options.tls.then(|| {
            let dir = tempfile::tempdir().unwrap();
            let ca = crate::certs::TestCa::new(dir.path(), "test-ca");
            (dir, ca)
        });
        // With TLS, peers reach each other on their https listeners.
        let routers: Vec<SocketAddr> = (0..DCS.len())
            .map(|i| {
                let listener = if options.tls {
                    &https_listeners[i]
                } else {
                    &listeners[i].0
                };
                options.router_override[i].unwrap_or_else(|| listener.local_addr().unwrap())
            })
            .collect();
        let store = options.memory.then(MemoryStore::new);
        let mut dcs = Vec::new();
        for (i, ((loom, loom_addr, handle), (http, admin))) in
            looms.into_iter().zip(listeners).enumerate()
        {
            let upstream = options.loom_override[i].unwrap_or(loom_addr);
            let mut toml = router_toml(i, upstream, &routers, &options);
            if let Some((_, ca)) = &certs {
                let (cert, key) = ca.issue(DCS[i].0);
                toml = toml
                    .replace("router = \"http://", "router = \"https://")
                    .replace(
                        "[ids]",
                        &format!(
                            "[tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {:?}\n\
                             client_auth = \"{}\"\nhandshake_timeout = \"1s\"\n\n[ids]",
                            ca.ca_pem, options.client_auth
                        ),
                    );
            }
            let https = https_listeners.remove(0);
            let config = Config::from_toml(&toml)
                .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"));
            let router = http.local_addr().unwrap();
            let admin_addr = admin.local_addr().unwrap();
            let client = store.as_ref().map(MemoryStore::client);
            if options.external_router[i] {
                // The test starts this router itself, on these ports.
                drop((http, admin));
                dcs.push(Dc {
                    name: DCS[i].0,
                    loom,
                    loom_addr,
                    loom_handle: Some(handle),
                    router,
                    admin: admin_addr,
                    router_stop: CancellationToken::new(),
                    router_task: None,
                    toml,
                    store: client,
                    https: https.local_addr().unwrap(),
                    config_path: None,
                    _config_dir: None,
                });
                continue;
            }
            let https_addr = https.local_addr().unwrap();
            let mut app = App::from_listeners(config, http, admin);
            let config_dir = options.config_files.then(|| tempfile::tempdir().unwrap());
            let config_path = config_dir.as_ref().map(|dir| {
                let path = dir.path().join(format!("{}.toml", DCS[i].0));
                std::fs::write(&path, &toml).unwrap();
                path
            });
            if let Some(path) = &config_path {
                app = app.with_config_path(path.clone());
            }
            if options.tls {
                app = app.with_https(https);
            }
            if let Some(client) = &client {
                app = app.with_store(Store::Memory(client.clone()));
            }
            let stop = CancellationToken::new();
            let stopped = stop.clone();
            let task = tokio::spawn(async move { app.run(stopped).await.unwrap() });
            dcs.push(Dc {
                name: DCS[i].0,
                loom,
                loom_addr,
                loom_handle: Some(handle),
                router,
                admin: admin_addr,
                router_stop: stop,
                router_task: Some(task),
                toml,
                store: client,
                https: https_addr,
                config_path,
                _config_dir: config_dir,
            });
        }
        let mut overridden = options.loom_override.map(|o| o.is_some());
        for (o, external) in overridden.iter_mut().zip(options.external_router) {
            *o |= external;
        }
        let cluster = Self {
            dcs,
            certs,
            store,
            overridden,
        };
        cluster.wait_ready().await;
        cluster
    }

    /// Wait until every router with a live Loom says it is ready, and knows its peers.
    pub async fn wait_ready(&self) {
        let live = || {
            self.dcs
                .iter()
                .zip(self.overridden)
                .filter(|(_, o)| !o)
                .map(|(dc, _)| dc)
        };
        for dc in live() {
            eventually(|| async {
                let r = get(&dc.admin_url("/readyz")).await;
                r.status == 200
            })
            .await;
        }
        // One more probe round so every router has seen every peer up.
        let live_names: Vec<&str> = live().map(|dc| dc.name).collect();
        for dc in live() {
            eventually(|| async {
                let table = get(&dc.admin_url("/admin/table")).await.json();
                table["datacenters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|d| live_names.contains(&d["name"].as_str().unwrap()))
                    .all(|d| d["healthy"] == true)
            })
            .await;
        }
        for dc in &self.dcs {
            dc.loom.clear_received();
        }
    }

    pub fn dc(&self, i: usize) -> &Dc {
        &self.dcs[i]
    }

    /// Names of the DCs whose Loom saw `path` (ignoring health probes).
    pub fn who_saw(&self, method: &str, path: &str) -> Vec<&'static str> {
        let mut out = Vec::new();
        for dc in &self.dcs {
            let n = dc
                .seen()
                .iter()
                .filter(|(m, p)| m == method && p == path)
                .count();
            for _ in 0..n {
                out.push(dc.name);
            }
        }
        out
    }

    pub fn clear(&self) {
        for dc in &self.dcs {
            dc.loom.clear_received();
        }
    }
}

/// DC `i`'s router config: the sandbox's, with short timeouts and fast health checks so that
/// a test sees a dead DC within a few hundred milliseconds.
fn router_toml(
    i: usize,
    upstream: SocketAddr,
    routers: &[SocketAddr],
    options: &Options,
) -> String {
    let (coordination, profile) = if options.memory {
        // Short leases so failover takes about two seconds; write_timeout must fit inside.
        let profile = Profile {
            lease: Duration::from_millis(1500),
            keepalive: Duration::from_millis(250),
            write_timeout: Duration::from_millis(500),
        };
        (Coordination::Memory, profile)
    } else if let Some((endpoints, prefix)) = &options.etcd {
        // etcd leases are whole seconds: 2 s is the shortest that leaves room for writes.
        let etcd = Coordination::Etcd {
            endpoints: endpoints[i].clone(),
            prefix: prefix.clone(),
        };
        let profile = options.profile.unwrap_or(Profile {
            lease: Duration::from_secs(2),
            keepalive: Duration::from_millis(250),
            write_timeout: Duration::from_millis(500),
        });
        (etcd, profile)
    } else {
        let profile = Profile {
            write_timeout: Duration::from_secs(2),
            ..Profile::DEFAULT
        };
        (Coordination::Static, profile)
    };
    let tables = format!(
        "[health]\ninterval = \"{}ms\"\ntimeout = \"300ms\"\nunhealthy_after = 2\n\
         healthy_after = 1\n\n[log]\naccess = \"off\"\n{}\n",
        options.health_interval.as_millis(),
        options.per_dc[i]
    );
    let loom_keys = format!(
        "connect_timeout = \"{}ms\"\nrequest_timeout = \"2s\"\n",
        options.connect_timeout.as_millis()
    );
    let mut toml = RouterToml {
        dc: i,
        loom: upstream,
        routers,
        coordination,
        profile,
        hook: options.hook.as_deref(),
        loom_keys: &loom_keys,
        coordination_keys: "failover_cooldown = \"1s\"\nhook_timeout = \"1s\"\n",
        tables: &tables,
    }
    .render();
    toml.push_str(&options.extra);
    toml
}

/// Retry `check` every 20 ms for up to 5 s.
pub async fn eventually<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a test client got back.
#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Assert a router error: status, code, route header, plain-text sentence.
    pub fn assert_router_error(&self, status: u16, code: &str, route: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        assert_eq!(self.header("x-loom-router-error"), Some(code));
        assert_eq!(self.header("x-loom-route"), Some(route));
        assert_eq!(self.header("x-loom-served-by"), None);
        if status != 421 {
            assert_eq!(
                self.header("content-type"),
                Some("text/plain; charset=utf-8")
            );
            let text = self.text();
            assert!(
                text.ends_with(".\n") && text.lines().count() == 1,
                "one sentence: {text:?}"
            );
        }
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The longest any one exchange of a test may take. Every router and Loom timeout in these
/// tests is a few seconds at most, so an exchange still open after this is a hang: it fails the
/// test, with what hung, instead of stalling the whole run.
pub const HUNG: Duration = Duration::from_secs(30);

/// `future`'s output, or a panic naming `what` once [`HUNG`] has passed.
pub async fn within<T>(
    what: impl std::fmt::Display,
    future: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(HUNG, future).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: no answer within {HUNG:?}"),
    }
}

/// Send a request with headers and body; panics on transport errors.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> TestResponse {
    let mut request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(url);
    for (k, v) in headers {
        request = request.header(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    within(format!("{method} {url}"), async {
        let response = client()
            .request(request)
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"));
        let (parts, body) = response.into_parts();
        TestResponse {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    })
    .await
}

pub async fn get(url: &str) -> TestResponse {
    send("GET", url, &[], b"").await
}

/// Write raw bytes on a fresh connection and read until the server closes it (or 5 s pass).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A TCP server that accepts connections and never answers: a hung Loom.
pub async fn black_hole() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// Create a cluster through a DC's router; returns its ID.
pub async fn create_cluster(dc: &Dc, name: &str) -> String {
    let body = format!(r#"{{"name":"{name}","clusterTemplate":"hadoop","numMachines":3}}"#);
    let r = send("POST", &dc.url("/v2/clusters"), &COOPR, body.as_bytes()).await;
    assert_eq!(r.status, 200, "create: {}", r.text());
    r.json()["id"].as_str().unwrap().to_owned()
}

/// Requests a stub received, as (method, path).
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// A peer router stand-in: ready on `/loom-router/readyz`, and every other request gets the same
/// response (status 0: no response ever, a hung peer). Returns its address and what it received
/// (probes excluded).
pub async fn stub(
    status: u16,
    content_type: &'static str,
    body: &'static str,
) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let recorded = recorded.clone();
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let recorded = recorded.clone();
                    async move {
                        let probe = request.uri().path() == "/loom-router/readyz";
                        if !probe {
                            let entry = (
                                request.method().to_string(),
                                request.uri().path().to_owned(),
                            );
                            recorded.lock().unwrap().push(entry);
                        }
                        // Read the whole body, as a real peer would before answering.
                        let _ = request.into_body().collect().await;
                        if status == 0 && !probe {
                            std::future::pending::<()>().await;
                        }
                        let (status, body) = if probe {
                            (200, "ready\n")
                        } else {
                            (status, body)
                        };
                        let mut response =
                            http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        response
                            .headers_mut()
                            .insert("content-type", HeaderValue::from_static(content_type));
                        if status == 421 && !probe {
                            // What a router's 421 carries (a Loom's 421 would not).
                            response.headers_mut().insert(
                                "x-loom-router-error",
                                HeaderValue::from_static("misdirected"),
                            );
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, seen)
}

/// A Loom stand-in that answers `/status` at once and everything else with 200 `slow` after
/// `delay`.
pub async fn slow_loom(delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(
                move |request: Request<hyper::body::Incoming>| async move {
                    if request.uri().path() != "/status" {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"slow"),
                    )))
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// One keep-alive client connection to a router (a test knows which connection carries what).
pub struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>,
}

impl KeepAlive {
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        Self { sender }
    }

    /// Send one request on this connection: status, route header and body.
    pub async fn send(&mut self, method: &str, path: &str) -> (u16, String, String) {
        within(format!("{method} {path}"), self.exchange(method, path)).await
    }

    async fn exchange(&mut self, method: &str, path: &str) -> (u16, String, String) {
        self.sender.ready().await.unwrap();
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in COOPR {
            request = request.header(name, value);
        }
        let request = request
            .header("host", "loom")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let route = response
            .headers()
            .get("x-loom-route")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, route, String::from_utf8_lossy(&body).into_owned())
    }
}

/// A free loopback port (bound and released; fine for tests that start a child process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The owner of `shard` in a router's `/admin/table`, with its epoch.
pub async fn shard_owner(dc: &Dc, shard: u64) -> (String, u64) {
    let t = get(&dc.admin_url("/admin/table")).await.json();
    let s = t["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["shard"] == shard)
        .unwrap_or_else(|| panic!("no shard {shard} in {t}"))
        .clone();
    (
        s["owner"].as_str().unwrap().to_owned(),
        s["epoch"].as_u64().unwrap(),
    )
}

/// Wait (up to 15 s) until `dc`'s table says `shard` is owned by `expected`; returns the epoch.
pub async fn until_owner(dc: &Dc, shard: u64, expected: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (owner, epoch) = shard_owner(dc, shard).await;
        if owner == expected {
            return epoch;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: shard {shard} still owned by {owner}",
            dc.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until `dc`'s router may admit writes for its own shards: table read from the store,
/// lease registered. It may still be starting (connections refused meanwhile).
pub async fn admitting(dc: &Dc) {
    let url = dc.admin_url("/admin/table");
    eventually(|| async {
        // Bounded: a router that accepts but never answers (stopped, say) fails the check.
        let asked = client().get(url.parse().unwrap());
        let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(1), asked).await else {
            return false;
        };
        let Ok(Ok(body)) =
            tokio::time::timeout(Duration::from_secs(1), response.into_body().collect()).await
        else {
            return false;
        };
        let body = body.to_bytes();
        let table: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        table["lease"]["admitting"] == true
    })
    .await;
}

/// [`admitting`] for every DC of a cluster.
pub async fn all_admitting(c: &Cluster) {
    for dc in &c.dcs {
        admitting(dc).await;
    }
}

/// A cluster in which us-west's "router" is a stub answering every write 421 with an old view
/// (shard 2, owner us-west, epoch 1), as a peer that disagrees would. Returns what it received.
pub async fn cluster_with_misdirecting_west() -> (Cluster, Seen) {
    let (stub_addr, seen) = stub(
        421,
        "application/json",
        r#"{"shard": 2, "owner": "us-west", "epoch": 1}"#,
    )
    .await;
    let mut options = Options::default();
    options.router_override[WEST] = Some(stub_addr);
    (Cluster::start_with(options).await, seen)
}

/// A `loom-router run` child process: one DC (`a`) around `loom`, plus `extra` TOML tables.
/// Its metrics are its own, not shared with the routers of other tests in this process.
#[derive(Debug)]
pub struct ChildRouter {
    pub child: std::process::Child,
    http: u16,
    admin: u16,
    _dir: tempfile::TempDir,
}

impl ChildRouter {
    pub fn start(
        loom: std::net::SocketAddr,
        extra: &str,
        log: &str,
        stderr: std::process::Stdio,
    ) -> Self {
        let (http, admin) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.toml");
        std::fs::write(
            &path,
            format!(
                "datacenter = \"a\"\nglobal_home = \"a\"\n[listen]\nhttp = \"127.0.0.1:{http}\"\n\
                 admin = \"127.0.0.1:{admin}\"\n[loom]\nupstream = \"http://{loom}\"\n[ids]\n\
                 increment = 10\n{extra}\n[[datacenters]]\nname = \"a\"\nid_start = 1\n\
                 router = \"http://127.0.0.1:{http}\"\n"
            ),
        )
        .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_loom-router"))
            .args(["run", "--config", path.to_str().unwrap()])
            .env("RUST_LOG", log)
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Self {
            child,
            http,
            admin,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin)
    }

    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http))
    }

    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("router.toml")
    }

    /// Wait until `/readyz` on the admin listener answers `status`.
    pub fn until_readyz(&self, rt: &tokio::runtime::Runtime, status: u16) {
        let readyz = self.admin_url("/readyz");
        rt.block_on(eventually(|| async {
            client()
                .get(readyz.parse().unwrap())
                .await
                .is_ok_and(|r| r.status() == status)
        }));
    }

    /// Send `signal`; after SIGSTOP, return only once every thread has stopped.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        send_signal(self.child.id(), signal);
    }
}

/// Send `signal` to process `pid`. SIGSTOP reaches a thread running on another core only at its
/// next interrupt, so after it this waits until every thread is stopped: a request sent after
/// this returns is one the paused process cannot have admitted before the pause.
pub fn send_signal(pid: u32, signal: nix::sys::signal::Signal) {
    let target = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(target, signal).unwrap();
    if signal != nix::sys::signal::Signal::SIGSTOP {
        return;
    }
    let stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|task| {
            // The state is the field after the parenthesised command name.
            std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
            })
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !stopped() {
        assert!(std::time::Instant::now() < deadline, "{pid} did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A DC's router run as a child process ([`Dc::spawn_router`]), with its config dir. Killed
/// when dropped, so that a failed test leaves no router behind, paused or not.
#[derive(Debug)]
pub struct Spawned {
    pub child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Spawned {
    /// Send `signal`; after SIGSTOP, return only once every thread has stopped.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        send_signal(self.child.id(), signal);
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too; nothing here may panic while a test unwinds.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for ChildRouter {
    fn drop(&mut self) {
        // A test that failed half-way must not leave a router running.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
