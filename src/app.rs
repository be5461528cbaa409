//! Wiring: build a router from a config, then run it until shutdown.
//!
//! [`App::bind`] binds every listener first, so a port conflict fails start-up instead of the
//! first request; tests and the demo use [`App::from_listeners`] with sockets bound on port 0.
//! [`App::run`] starts the snapshot writer, the health probes and the listeners, and on shutdown
//! drains: `/readyz` turns 503 at once, listeners stop accepting, and in-flight requests get
//! `drain_timeout` to finish (docs/operations.md). This file makes no routing decisions.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Backend, Config};
use crate::coord::control::Control;
use crate::coord::join::{self as coordinator, Joined};
use crate::coord::store::Store;
use crate::health::{HealthBoard, Probes};
use crate::http::forward::Forwarder;
use crate::metrics;
use crate::ops::admin;
use crate::proxy::listener;
use crate::proxy::workers::{Serve, Sockets, Workers};
use crate::proxy::Proxy;

/// Why a router could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listen: no client listener is configured (listen.http or listen.https)")]
    NoDataListener,
    #[error(transparent)]
    Tls(#[from] crate::http::tls::TlsError),
    #[error("coordination.backend: \"memory\" needs an in-process store; it exists only for the demo and tests")]
    NoMemoryStore,
    /// Config validation refuses this first (`check` and `run` both say so before anything
    /// starts); kept for a config built in code.
    #[error(
        "coordination.backend: this binary was built without the etcd backend; build with \
         `--features etcd` (needs protoc) or use the Docker image"
    )]
    EtcdUnavailable,
    #[error("coordination: {0}")]
    Join(#[from] crate::coord::join::JoinError),
    #[error("cannot start the request workers: {0}")]
    Workers(#[source] std::io::Error),
}

/// A router with its listeners bound, ready to run.
#[derive(Debug)]
pub struct App {
    config: Config,
    /// The plain-HTTP data listener (`listen.http`), if configured.
    http: Option<Sockets>,
    /// The TLS data listener (`listen.https`), if configured.
    https: Option<Sockets>,
    admin: TcpListener,
    /// The coordination store, for the memory backend (the caller shares one store between the
    /// routers of a process).
    store: Option<Store>,
    /// The config file, for reloads (SIGHUP, file changes, `POST /admin/reload`).
    config_path: Option<std::path::PathBuf>,
}

impl App {
    /// Bind the listeners the config names.
    pub async fn bind(config: Config) -> Result<Self, AppError> {
        if config.listen.http.is_none() && config.listen.https.is_none() {
            return Err(AppError::NoDataListener);
        }
        // Load the certificates now, so that a bad file fails start-up, not the first handshake.
        crate::http::tls::server_config(&config)?;
        let http = match config.listen.http {
            Some(addr) => Some(bind_workers("listen.http", addr, &config)?),
            None => None,
        };
        let https = match config.listen.https {
            Some(addr) => Some(bind_workers("listen.https", addr, &config)?),
            None => None,
        };
        let admin = crate::proxy::workers::listener(config.listen.admin, config.listen.backlog)
            .map_err(|source| AppError::Bind {
                key: "listen.admin",
                addr: config.listen.admin,
                source,
            })?;
        Ok(Self {
            config,
            http,
            https,
            admin,
            store: None,
            config_path: None,
        })
    }

    /// Use listeners the caller bound (tests and the demo bind port 0 or fixed ports). Every
    /// request worker accepts on the one data socket.
    pub fn from_listeners(config: Config, http: TcpListener, admin: TcpListener) -> Self {
        Self {
            config,
            http: Some(Sockets::Shared(http)),
            https: None,
            admin,
            store: None,
            config_path: None,
        }
    }

    /// Reload from this file on SIGHUP, on a change to it, and on `POST /admin/reload`.
    #[must_use]
    pub fn with_config_path(mut self, path: std::path::PathBuf) -> Self {
        self.config_path = Some(path);
        self
    }

    /// Also serve TLS on this listener (it needs `[tls]` in the config).
    #[must_use]
    pub fn with_https(mut self, https: TcpListener) -> Self {
        self.https = Some(Sockets::Shared(https));
        self
    }

    /// Use this coordination store (the memory backend's shared in-process store).
    #[must_use]
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|s| s.local_addr().ok())
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|s| s.local_addr().ok())
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Serve until `shutdown` fires, then drain and return. Fails only at start-up, when the
    /// coordination store cannot be joined.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let metrics = metrics::install();
        let config = Arc::new(self.config);
        metrics::register(
            config.datacenters.iter().map(|dc| dc.name.as_str()),
            config.table().shards().map(|s| s.key),
        );
        let server_tls = crate::http::tls::server_config(&config)?;
        let forwarder = Forwarder::new(
            config.loom.connect_timeout,
            config.limits.idle_timeout,
            crate::http::tls::client_config(&config)?,
            config.limits.max_upstream_connections,
        );
        // One log of recent events, recorded into by the health board and the snapshot writer.
        let event_log = Arc::new(crate::events::EventLog::default());
        let board = Arc::new(HealthBoard::with_event_log(event_log.clone()));
        // Background tasks stop only after the listeners have drained; every early return below
        // stops what was started so far, and so does the end of `run`.
        let background = CancellationToken::new();
        let _stop_background = background.clone().drop_guard();
        let probes = Probes::start(
            config.clone(),
            board.clone(),
            forwarder.clone(),
            background.clone(),
        );
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let runtime = Runtime {
            config: config.clone(),
            board,
            forwarder,
            background,
        };
        let joined = runtime.join(self.store).await?;
        let (link, gate) = match joined {
            Some(j) => (Some(j.coordination), Some((j.gate, j.handle))),
            None => (None, None),
        };
        let control = Control::start((*config).clone(), link, self.config_path.clone(), event_log);
        // Control is the only writer of the snapshot; the probes and the limiter follow the
        // configs it publishes.
        probes.follow(control.configs());
        let proxy = Proxy::new(
            control.clone(),
            runtime.board.clone(),
            runtime.forwarder.clone(),
            gate.as_ref().map(|(gate, _)| gate.clone()),
        );
        proxy.follow_reloads(runtime.background.clone());
        proxy.publish_every_second(runtime.background.clone());
        if let Some(path) = self.config_path {
            crate::ops::reload::spawn_triggers(control.clone(), path, runtime.background.clone());
        }
        let listeners = DataListeners {
            http: self.http,
            https: self.https,
            server_tls,
        };
        let data_stop = CancellationToken::new();
        // The request workers are threads of their own: were `run` dropped instead of shut down
        // (an embedding runtime that ends, a test's), they would serve on forever.
        let _stop_data = data_stop.clone().drop_guard();
        let data = listeners.serve(&config, &proxy, &data_stop)?;
        let admin_state = admin::AdminState {
            proxy: proxy.clone(),
            control,
            health: runtime.board.clone(),
            forwarder: runtime.forwarder.clone(),
            coordination: gate,
            metrics,
            started: std::time::Instant::now(),
            traffic: Default::default(),
        };
        let admin = tokio::spawn(admin::serve(
            self.admin,
            admin_state,
            runtime.background.clone(),
        ));

        shutdown.cancelled().await;
        tracing::info!("shutting down: readyz is 503, draining in-flight requests");
        proxy.start_draining();
        data_stop.cancel();
        data.join().await;
        runtime.background.cancel();
        let _ = admin.await;
        Ok(())
    }
}

/// What the router's background parts share while it starts.
struct Runtime {
    config: Arc<Config>,
    board: Arc<HealthBoard>,
    forwarder: Forwarder,
    /// Stops the background tasks, after the listeners have drained.
    background: CancellationToken,
}

impl Runtime {
    /// Join the configured coordination store: `None` for the static backend; the in-process
    /// store the caller gave for `memory`; a connection to the endpoints (or the given store)
    /// for `etcd`.
    async fn join(&self, store: Option<Store>) -> Result<Option<Joined>, AppError> {
        let store = match (self.config.coordination.backend, store) {
            (Backend::Static, _) => return Ok(None),
            (Backend::Memory, Some(store)) | (Backend::Etcd, Some(store)) => store,
            (Backend::Memory, None) => return Err(AppError::NoMemoryStore),
            (Backend::Etcd, None) => connect_etcd(&self.config.coordination.endpoints).await?,
        };
        let joined = coordinator::join(
            self.config.clone(),
            store,
            self.board.clone(),
            self.forwarder.clone(),
            self.background.clone(),
        )
        .await?;
        Ok(Some(joined))
    }
}

/// The data listeners, and the TLS config for the https one.
struct DataListeners {
    http: Option<Sockets>,
    https: Option<Sockets>,
    server_tls: Option<Arc<rustls::ServerConfig>>,
}

impl DataListeners {
    /// Start the request workers on every listener, until `stop` fires.
    fn serve(
        self,
        config: &Config,
        proxy: &Proxy,
        stop: &CancellationToken,
    ) -> Result<Workers, AppError> {
        let https = match self.https {
            None => None,
            Some(sockets) => {
                let (Some(server_tls), Some(tls)) = (self.server_tls, &config.tls) else {
                    return Err(AppError::Tls(crate::http::tls::TlsError::NoServerConfig));
                };
                let accept = listener::TlsAccept {
                    acceptor: tokio_rustls::TlsAcceptor::from(server_tls),
                    handshake_timeout: tls.handshake_timeout,
                };
                Some((sockets, accept))
            }
        };
        let serve = Serve {
            http: self.http,
            https,
            drain_timeout: config.drain_timeout,
        };
        Workers::start(config.workers, serve, proxy, stop).map_err(AppError::Workers)
    }
}

#[cfg(feature = "etcd")]
async fn connect_etcd(endpoints: &[String]) -> Result<Store, AppError> {
    crate::coord::etcd::EtcdClient::connect(endpoints)
        .await
        .map(Store::Etcd)
        .map_err(|e| AppError::Join(e.into()))
}

#[cfg(not(feature = "etcd"))]
async fn connect_etcd(_endpoints: &[String]) -> Result<Store, AppError> {
    Err(AppError::EtcdUnavailable)
}

/// A data listener: one `SO_REUSEPORT` socket per request worker.
fn bind_workers(key: &'static str, addr: SocketAddr, config: &Config) -> Result<Sockets, AppError> {
    Sockets::bind(addr, config.workers, config.listen.backlog).map_err(|source| AppError::Bind {
        key,
        addr,
        source,
    })
}
