//! `loom-router demo`: three DCs in one process, with nothing to install or configure.
//!
//! Each DC gets an emulated Loom (`emulator.rs`) and a real router built from a generated
//! config, exactly as `run` would build it. The emulated Looms replicate completed writes to each
//! other after a short delay, as the seed design describes. This file owns the sandbox's
//! topology, ports and the scripted walk-through ([`Demo::scenario`]) that is printed as curl
//! lines and that the tests execute. It must not contain routing logic of its own.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::Config;
use crate::emulator::{Emulator, EmulatorConfig};

/// The demo's DCs: name and Loom `ids.start.num`. `ids.increment.by` is [`INCREMENT`].
pub const DCS: [(&str, u64); 3] = [("us-east", 1), ("us-west", 2), ("eu-central", 3)];
pub const INCREMENT: u64 = 10;
/// With the default `--port-base` of 8080, routers listen on 8081-8083.
pub const DEFAULT_PORT_BASE: u16 = 8080;
/// Admin listeners are at `port_base + 1821..` (9901-9903 by default).
const ADMIN_OFFSET: u16 = 1820;
/// Emulated Looms are at `port_base + 1001..` (9081-9083 by default).
const LOOM_OFFSET: u16 = 1000;
/// How long a completed write takes to reach the other DCs' Looms.
const REPLICATION_DELAY: Duration = Duration::from_millis(500);

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
    pub admin: SocketAddr,
    pub loom: SocketAddr,
    pub emulator: Emulator,
}

/// The running sandbox.
#[derive(Debug)]
pub struct Demo {
    pub dcs: Vec<DemoDc>,
    /// Cancelled by [`Demo::stop`]; stops every router and Loom.
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// One step of the walk-through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub comment: String,
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: Option<&'static str>,
    /// Wait this long before the step (replication needs a moment).
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
    /// Start the sandbox. `port_base: None` binds every listener on an ephemeral port (tests).
    pub async fn start(port_base: Option<u16>) -> Result<Self, DemoError> {
        if port_base.is_some_and(|b| b > u16::MAX - ADMIN_OFFSET - 3) {
            return Err(DemoError::PortBase(port_base.unwrap_or_default()));
        }
        let port = |offset: u16, i: usize| port_base.map_or(0, |b| b + offset + i as u16 + 1);
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();

        let mut looms = Vec::new();
        for (i, (name, start)) in DCS.iter().enumerate() {
            let listener = bind(port(LOOM_OFFSET, i)).await?;
            let addr = local_addr(&listener)?;
            let emulator = Emulator::new(EmulatorConfig {
                dc: (*name).to_owned(),
                id_start: *start,
                increment: INCREMENT,
                replication_delay: REPLICATION_DELAY,
            });
            let serving = emulator.clone();
            let shutdown = stop.clone();
            tasks.push(tokio::spawn(async move {
                let shutdown = async move { shutdown.cancelled().await };
                if let Err(e) = serving.serve(listener, shutdown).await {
                    tracing::error!(error = %e, "emulated Loom stopped");
                }
            }));
            looms.push((emulator, addr));
        }
        for (i, (emulator, _)) in looms.iter().enumerate() {
            for (j, (peer, _)) in looms.iter().enumerate() {
                if i != j {
                    emulator.add_peer(peer.clone());
                }
            }
        }

        let mut listeners = Vec::new();
        for i in 0..DCS.len() {
            let http = bind(port(0, i)).await?;
            let admin = bind(port(ADMIN_OFFSET, i)).await?;
            listeners.push((http, admin));
        }
        let routers = listeners
            .iter()
            .map(|(http, _)| local_addr(http))
            .collect::<Result<Vec<_>, _>>()?;

        let mut dcs = Vec::new();
        for (i, ((emulator, loom), (http, admin))) in looms.into_iter().zip(listeners).enumerate() {
            let config = Config::from_toml(&router_config(i, loom, &routers))?;
            let router = local_addr(&http)?;
            let admin_addr = local_addr(&admin)?;
            let app = App::from_listeners(config, http, admin);
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = app.run(stop).await {
                    tracing::error!(error = %e, "router stopped");
                }
            }));
            dcs.push(DemoDc {
                name: DCS[i].0,
                router,
                admin: admin_addr,
                loom,
                emulator,
            });
        }
        Ok(Self { dcs, stop, tasks })
    }

    /// The walk-through: create a cluster in us-east, read it from us-west once it has
    /// replicated, delete it through eu-central (which forwards the delete to us-east, the
    /// owner), and look at the ownership table.
    pub fn scenario(&self) -> Vec<Step> {
        let router = |i: usize, path: &str| format!("http://{}{path}", self.dcs[i].router);
        let identity = IDENTITY.to_vec();
        vec![
            Step {
                comment: "Create a cluster in us-east; its Loom allocates ID 00000001 in shard 1, \
                          which us-east owns (X-Loom-Route: create)"
                    .to_owned(),
                method: "POST",
                url: router(0, "/v2/clusters"),
                headers: identity.clone(),
                body: Some(
                    r#"{"name":"demo","clusterTemplate":"hadoop-distributed","numMachines":3}"#,
                ),
                wait: Duration::ZERO,
            },
            Step {
                comment: "Read it from us-west, served by us-west's own Loom once replication has \
                          copied it there (X-Loom-Route: read, X-Loom-Served-By: us-west)"
                    .to_owned(),
                method: "GET",
                url: router(1, "/v2/clusters/00000001"),
                headers: identity.clone(),
                body: None,
                wait: REPLICATION_DELAY * 2,
            },
            Step {
                comment: "Delete it through eu-central, which forwards the write to the owner, \
                          us-east (X-Loom-Route: write-forwarded, X-Loom-Served-By: us-east)"
                    .to_owned(),
                method: "DELETE",
                url: router(2, "/v2/clusters/00000001"),
                headers: identity,
                body: None,
                wait: Duration::ZERO,
            },
            Step {
                comment: "See who owns which shard".to_owned(),
                method: "GET",
                url: format!("http://{}/admin/table", self.dcs[2].admin),
                headers: Vec::new(),
                body: None,
                wait: Duration::ZERO,
            },
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

    /// Stop every router (with a drain) and every Loom.
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn router_config(i: usize, loom: SocketAddr, routers: &[SocketAddr]) -> String {
    let mut toml = format!(
        r#"
datacenter = "{name}"
global_home = "us-east"

[loom]
upstream = "http://{loom}"

[ids]
increment = {INCREMENT}

[shutdown]
drain_timeout = "2s"
"#,
        name = DCS[i].0,
    );
    // Each DC's shards fail over to the next DC in the ring.
    for (j, (name, start)) in DCS.iter().enumerate() {
        let replica = DCS[(j + 1) % DCS.len()].0;
        toml.push_str(&format!(
            "\n[[datacenters]]\nname = \"{name}\"\nid_start = {start}\nrouter = \"http://{}\"\nreplicas = [\"{replica}\"]\n",
            routers[j]
        ));
    }
    toml
}

async fn bind(port: u16) -> Result<TcpListener, DemoError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpListener::bind(addr)
        .await
        .map_err(|source| DemoError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, DemoError> {
    listener.local_addr().map_err(|source| DemoError::Bind {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        source,
    })
}
