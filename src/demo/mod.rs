//! `loom-router demo`: three DCs in one process, with nothing to install or configure.
//!
//! Each DC gets an emulated Loom (the `loom-emulator` crate) and a real router built from a
//! generated config, exactly as `run` would build it, coordinating through one in-process memory
//! store (leases, election, automatic failover). The emulated Looms replicate completed writes to
//! each other after a short delay, as the seed design describes.
//!
//! Each DC's admin port is fronted by the demo itself: `POST /demo/kill` stops that DC's Loom
//! and router (its lease then expires and its shards fail over), `POST /demo/restore` brings
//! both back with their data, and every other path is passed to the router's own admin listener.
//! This file owns the sandbox's topology, ports and the scripted walk-through
//! ([`Demo::scenario`]) that is printed as curl lines and that the tests execute. It must not
//! contain routing logic of its own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use loom_emulator::{Emulator, EmulatorHandle};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::Config;
use crate::coord::memory::MemoryStore;
use crate::coord::store::Store;
use crate::http::headers::TEXT_PLAIN;

pub mod sandbox;

use sandbox::{Coordination, RouterToml};
pub use sandbox::{Profile, DCS, INCREMENT};

/// With the default `--port-base` of 8080, routers listen on 8081-8083.
pub const DEFAULT_PORT_BASE: u16 = 8080;
/// Admin listeners are at `port_base + 1821..` (9901-9903 by default).
const ADMIN_OFFSET: u16 = 1820;
/// Emulated Looms are at `port_base + 1001..` (9081-9083 by default).
const LOOM_OFFSET: u16 = 1000;
/// How long a completed write takes to reach the other DCs' Looms.
const REPLICATION_DELAY: Duration = Duration::from_millis(500);
/// How to build a sandbox.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// `None` binds every listener on an ephemeral port (tests and benchmarks).
    pub port_base: Option<u16>,
    pub profile: Profile,
    /// Coordinate through this etcd (its members' endpoints, key `prefix`) instead of an
    /// in-process store.
    pub etcd: Option<(Vec<String>, String)>,
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("--port-base {0} is too high: the demo needs ports up to port-base + 1823")]
    PortBase(u16),
    #[error("cannot listen on {addr}: {source} (is another demo running? try --port-base)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("generated config is invalid: {0}")]
    Config(#[from] crate::config::ConfigErrors),
}

/// One DC of the sandbox.
#[derive(Debug)]
pub struct DemoDc {
    pub name: &'static str,
    pub router: SocketAddr,
    /// The public admin address (the demo's front, which adds `/demo/kill` and `/demo/restore`).
    pub admin: SocketAddr,
    pub loom: SocketAddr,
    pub emulator: Emulator,
    /// The running router and Loom; `None` while killed.
    running: Arc<Mutex<Option<Running>>>,
    /// The router's config, to start it again on restore.
    config: Arc<str>,
    /// The in-process store, unless the sandbox uses etcd.
    store: Option<MemoryStore>,
}

#[derive(Debug)]
struct Running {
    stop: CancellationToken,
    router: JoinHandle<()>,
    /// The router's own admin listener, on an ephemeral port behind the front.
    inner_admin: SocketAddr,
    loom: EmulatorHandle,
}

/// The running sandbox.
#[derive(Debug)]
pub struct Demo {
    pub dcs: Vec<DemoDc>,
    /// The shared coordination store.
    pub store: MemoryStore,
    /// Cancelled by [`Demo::stop`]: stops the admin fronts.
    stop: CancellationToken,
    fronts: Vec<JoinHandle<()>>,
}

/// One step of the walk-through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub comment: String,
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: Option<&'static str>,
    /// Wait this long before the step (replication and failover take a moment).
    pub wait: Duration,
}

impl Step {
    /// The step as a curl command line.
    pub fn curl(&self) -> String {
        let mut line = if self.method == "GET" {
            format!("curl -si {}", self.url)
        } else {
            format!("curl -si -X {} {}", self.method, self.url)
        };
        for (k, v) in &self.headers {
            line.push_str(&format!(" -H '{k}: {v}'"));
        }
        if let Some(body) = self.body {
            line.push_str(&format!(" -H 'Content-Type: application/json' -d '{body}'"));
        }
        line
    }
}

/// Headers Coopr requires on `/v2`.
const IDENTITY: [(&str, &str); 2] = [("Coopr-UserID", "admin"), ("Coopr-TenantID", "demo")];

impl Demo {
    /// Start the sandbox with the fast profile and an in-process store. `port_base: None` binds
    /// every listener on an ephemeral port (tests).
    pub async fn start(port_base: Option<u16>) -> Result<Self, DemoError> {
        Self::start_with(DemoOptions {
            port_base,
            profile: Profile::FAST,
            etcd: None,
        })
        .await
    }

    /// Start a sandbox as `options` say.
    pub async fn start_with(options: DemoOptions) -> Result<Self, DemoError> {
        let port_base = options.port_base;
        if port_base.is_some_and(|b| b > u16::MAX - ADMIN_OFFSET - 3) {
            return Err(DemoError::PortBase(port_base.unwrap_or_default()));
        }
        let port = |offset: u16, i: usize| port_base.map_or(0, |b| b + offset + i as u16 + 1);
        let store = MemoryStore::new();

        // Bind everything first: every router's config names every other router.
        let mut bound = Vec::new();
        for i in 0..DCS.len() {
            let loom = bind(port(LOOM_OFFSET, i)).await?;
            let http = bind(port(0, i)).await?;
            let admin = bind(port(ADMIN_OFFSET, i)).await?;
            bound.push((loom, http, admin));
        }
        let routers = bound
            .iter()
            .map(|(_, http, _)| local_addr(http))
            .collect::<Result<Vec<_>, _>>()?;

        let mut dcs = Vec::new();
        let looms = sandbox::looms(REPLICATION_DELAY);
        for (i, ((loom_listener, http, admin), emulator)) in
            bound.into_iter().zip(looms).enumerate()
        {
            let loom = local_addr(&loom_listener)?;
            // Hand the port back to the emulator's own binding, which supports restoring.
            drop(loom_listener);
            let config: Arc<str> = router_config(i, loom, &routers, &options).into();
            Config::from_toml(&config)?;
            let dc = DemoDc {
                name: DCS[i].0,
                router: local_addr(&http)?,
                admin: local_addr(&admin)?,
                loom,
                emulator,
                running: Arc::new(Mutex::new(None)),
                config,
                store: options.etcd.is_none().then(|| store.clone()),
            };
            dc.bring_up(Some(http)).await?;
            dcs.push((dc, admin));
        }
        let stop = CancellationToken::new();
        let mut fronts = Vec::new();
        let mut out = Vec::new();
        for (dc, admin) in dcs {
            fronts.push(tokio::spawn(front(admin, dc.handle(), stop.clone())));
            out.push(dc);
        }
        Ok(Self {
            dcs: out,
            store,
            stop,
            fronts,
        })
    }

    /// The walk-through: create a cluster in us-east, read it from us-west once it has
    /// replicated, delete it through eu-central (which forwards the delete to us-east, the
    /// owner), look at the ownership table; then fail eu-central, watch its shard move to
    /// us-east, write to it through us-west, and bring eu-central back.
    pub fn scenario(&self) -> Vec<Step> {
        let router = |i: usize, path: &str| format!("http://{}{path}", self.dcs[i].router);
        let admin = |i: usize, path: &str| format!("http://{}{path}", self.dcs[i].admin);
        let identity = IDENTITY.to_vec();
        let step = |comment: &str, method, url, headers: &[(&'static str, &'static str)]| Step {
            comment: comment.to_owned(),
            method,
            url,
            headers: headers.to_vec(),
            body: None,
            wait: Duration::ZERO,
        };
        vec![
            Step {
                body: Some(
                    r#"{"name":"demo","clusterTemplate":"hadoop-distributed","numMachines":3}"#,
                ),
                ..step(
                    "Create a cluster in us-east; its Loom allocates ID 00000001 in shard 1, \
                     which us-east owns (X-Loom-Route: create)",
                    "POST",
                    router(0, "/v2/clusters"),
                    &identity,
                )
            },
            Step {
                wait: REPLICATION_DELAY * 2,
                ..step(
                    "Read it from us-west, served by us-west's own Loom once replication has \
                     copied it there (X-Loom-Route: read, X-Loom-Served-By: us-west)",
                    "GET",
                    router(1, "/v2/clusters/00000001"),
                    &identity,
                )
            },
            step(
                "Delete it through eu-central, which forwards the write to the owner, us-east \
                 (X-Loom-Route: write-forwarded, X-Loom-Served-By: us-east)",
                "DELETE",
                router(2, "/v2/clusters/00000001"),
                &identity,
            ),
            step(
                "Read it back through eu-central at once: its own Loom has not had the delete \
                 replicated yet, so the read goes to the owner and shows status terminated \
                 (X-Loom-Route: read-owner, X-Loom-Served-By: us-east)",
                "GET",
                router(2, "/v2/clusters/00000001"),
                &identity,
            ),
            step(
                "See who owns which shard, at which epoch",
                "GET",
                admin(2, "/admin/table"),
                &[],
            ),
            Step {
                body: Some(
                    r#"{"name":"eu","clusterTemplate":"hadoop-distributed","numMachines":1}"#,
                ),
                ..step(
                    "Create a cluster in eu-central (ID 00000003, shard 3)",
                    "POST",
                    router(2, "/v2/clusters"),
                    &identity,
                )
            },
            Step {
                wait: REPLICATION_DELAY * 2,
                ..step(
                    "Fail eu-central (its Loom and router stop; its 3 s lease then expires)",
                    "POST",
                    admin(2, "/demo/kill"),
                    &[],
                )
            },
            Step {
                wait: Duration::from_secs(8),
                ..step(
                    "A few seconds later shard 3 belongs to us-east, its first live replica, at \
                     a newer epoch",
                    "GET",
                    admin(0, "/admin/table"),
                    &[],
                )
            },
            step(
                "Write to the eu-central cluster through us-west: it goes to the new owner \
                 (X-Loom-Served-By: us-east)",
                "POST",
                router(1, "/v2/clusters/00000003/abort"),
                &identity,
            ),
            step(
                "Bring eu-central back: it does not take shard 3 back",
                "POST",
                admin(2, "/demo/restore"),
                &[],
            ),
        ]
    }

    /// What `loom-router demo` prints: one line per DC, then the walk-through as curl lines.
    pub fn banner(&self) -> String {
        let mut out = String::new();
        for dc in &self.dcs {
            out.push_str(&format!(
                "dc={} router=http://{} admin=http://{} loom=http://{}\n",
                dc.name, dc.router, dc.admin, dc.loom
            ));
        }
        out.push_str("\nTry it (in another terminal):\n\n");
        for step in self.scenario() {
            out.push_str(&format!("# {}\n{}\n\n", step.comment, step.curl()));
        }
        out.push_str("Press Ctrl-C to stop.\n");
        out
    }

    /// Stop every router (with a drain), every Loom and the admin fronts.
    pub async fn stop(self) {
        for dc in &self.dcs {
            dc.handle().kill().await;
        }
        self.stop.cancel();
        for front in self.fronts {
            let _ = front.await;
        }
    }
}

/// What an admin front needs to kill, restore and pass requests on.
#[derive(Debug, Clone)]
struct DcHandle {
    name: &'static str,
    router: SocketAddr,
    loom: SocketAddr,
    emulator: Emulator,
    running: Arc<Mutex<Option<Running>>>,
    config: Arc<str>,
    store: Option<MemoryStore>,
}

impl DemoDc {
    fn handle(&self) -> DcHandle {
        DcHandle {
            name: self.name,
            router: self.router,
            loom: self.loom,
            emulator: self.emulator.clone(),
            running: self.running.clone(),
            config: self.config.clone(),
            store: self.store.clone(),
        }
    }

    async fn bring_up(&self, http: Option<TcpListener>) -> Result<(), DemoError> {
        self.handle().bring_up(http).await
    }
}

impl DcHandle {
    /// Start the Loom and the router (on their old addresses). No-op if running.
    async fn bring_up(&self, http: Option<TcpListener>) -> Result<(), DemoError> {
        let mut running = self.running.lock().await;
        if running.is_some() {
            return Ok(());
        }
        let (_, loom) =
            self.emulator
                .spawn_at(self.loom)
                .await
                .map_err(|source| DemoError::Bind {
                    addr: self.loom,
                    source,
                })?;
        let http = match http {
            Some(http) => http,
            None => bind(self.router.port()).await?,
        };
        let inner_admin = bind(0).await?;
        let inner_addr = local_addr(&inner_admin)?;
        let config = Config::from_toml(&self.config)?;
        let mut app = App::from_listeners(config, http, inner_admin);
        if let Some(store) = &self.store {
            app = app.with_store(Store::Memory(store.client()));
        }
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let name = self.name;
        let router = tokio::spawn(async move {
            if let Err(e) = app.run(stopped).await {
                tracing::error!(datacenter = name, error = %e, "router stopped");
            }
        });
        *running = Some(Running {
            stop,
            router,
            inner_admin: inner_addr,
            loom,
        });
        Ok(())
    }

    /// Stop the router and the Loom, as a DC failure would: the lease is not revoked.
    async fn kill(&self) -> bool {
        let Some(running) = self.running.lock().await.take() else {
            return false;
        };
        running.stop.cancel();
        let _ = running.router.await;
        running.loom.stop().await;
        true
    }
}

/// The public admin port of one DC: `/demo/kill`, `/demo/restore`, and everything else passed
/// to the router's own admin listener while it runs.
async fn front(listener: TcpListener, dc: DcHandle, stop: CancellationToken) {
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            () = stop.cancelled() => return,
        };
        let (dc, client) = (dc.clone(), client.clone());
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let (dc, client) = (dc.clone(), client.clone());
            async move { Ok::<_, Infallible>(front_request(&dc, &client, request).await) }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
    }
}

async fn front_request(
    dc: &DcHandle,
    client: &Client<HttpConnector, Incoming>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let post = request.method() == Method::POST;
    match (post, request.uri().path()) {
        (true, "/demo/kill") => {
            if dc.kill().await {
                text(
                    StatusCode::OK,
                    format!(
                        "{} is down: its Loom and router stopped. Its shards fail over once its \
                         lease expires.\n",
                        dc.name
                    ),
                )
            } else {
                text(
                    StatusCode::CONFLICT,
                    format!("{} is already down\n", dc.name),
                )
            }
        }
        (true, "/demo/restore") => match dc.bring_up(None).await {
            Ok(()) => text(
                StatusCode::OK,
                format!(
                    "{} is back with its data. It does not take its shards back: failback is a \
                     planned move (POST /admin/shards/<shard>/move).\n",
                    dc.name
                ),
            ),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        _ => {
            let inner = dc.running.lock().await.as_ref().map(|r| r.inner_admin);
            let Some(inner) = inner else {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{} is down; POST /demo/restore brings it back\n", dc.name),
                );
            };
            let (mut parts, body) = request.into_parts();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let Ok(uri) = format!("http://{inner}{path}").parse() else {
                return text(StatusCode::BAD_REQUEST, "bad path\n".to_owned());
            };
            parts.uri = uri;
            match client.request(Request::from_parts(parts, body)).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let bytes = body
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    Response::from_parts(parts, Full::new(bytes))
                }
                Err(e) => text(StatusCode::BAD_GATEWAY, format!("{e}\n")),
            }
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
    response
}

/// DC `i`'s router config: the sandbox's, with the demo's profile and store.
fn router_config(
    i: usize,
    loom: SocketAddr,
    routers: &[SocketAddr],
    options: &DemoOptions,
) -> String {
    let coordination = match &options.etcd {
        Some((endpoints, prefix)) => Coordination::Etcd {
            endpoints: endpoints.clone(),
            prefix: prefix.clone(),
        },
        None => Coordination::Memory,
    };
    RouterToml {
        dc: i,
        loom,
        routers,
        coordination,
        profile: options.profile,
        hook: None,
        loom_keys: "",
        coordination_keys: "",
        // Reads of a cluster written through a router go to its owner for 5 s, as in
        // config/loom-router.toml: the walk-through reads a delete back at once.
        tables: "[shutdown]\ndrain_timeout = \"2s\"\n\n[consistency]\nread_your_writes = \"5s\"\n",
    }
    .render()
}

async fn bind(port: u16) -> Result<TcpListener, DemoError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    crate::proxy::workers::listener(addr, crate::config::DEFAULT_BACKLOG)
        .map_err(|source| DemoError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, DemoError> {
    listener.local_addr().map_err(|source| DemoError::Bind {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        source,
    })
}
