//! Request workers (`[runtime] workers`), nginx's model: each worker is a thread with a
//! single-threaded tokio runtime, its own listening sockets and its own upstream pool, and serves
//! every connection it accepts from start to end. No request crosses threads, and the
//! work-stealing scheduler's atomics and cross-thread wake-ups are off the hot path.
//!
//! The workers share what must be one per router: the snapshot (written only by
//! `coord::control`, read by each worker through its `ArcSwap`), the concurrency limit, the write
//! gate, the in-flight writes and the bound on upstream connections. The control plane (health
//! probes, lease, coordinator, admin, reloads) runs on the runtime that started the router.
//!
//! With sockets from [`Sockets::bind`], every worker has its own `SO_REUSEPORT` socket and the
//! kernel spreads new connections across them. Sockets a caller bound (tests, the demo) are
//! shared: every worker accepts from the one queue.

use std::io;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::listener::{self, TlsAccept};
use super::Proxy;

/// One data listener's sockets.
#[derive(Debug)]
pub enum Sockets {
    /// One `SO_REUSEPORT` socket per worker, on the same address.
    PerWorker(Vec<std::net::TcpListener>),
    /// One socket, bound by the caller, that every worker accepts on.
    Shared(tokio::net::TcpListener),
}

impl Sockets {
    /// Bind `workers` sockets on `addr` with `SO_REUSEPORT` (port 0: the port the first got),
    /// each with a listen queue of `backlog`.
    pub fn bind(addr: SocketAddr, workers: usize, backlog: u32) -> io::Result<Self> {
        let reuseport = |addr| socket(addr, Reuse::Port)?.listen(backlog)?.into_std();
        let first = reuseport(addr)?;
        let addr = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..workers {
            sockets.push(reuseport(addr)?);
        }
        Ok(Self::PerWorker(sockets))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::PerWorker(sockets) => sockets
                .first()
                .ok_or_else(|| io::Error::other("no sockets"))?
                .local_addr(),
            Self::Shared(socket) => socket.local_addr(),
        }
    }

    /// One socket for each of `workers` (duplicates of the shared one).
    fn split(self, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
        match self {
            Self::PerWorker(sockets) => Ok(sockets),
            Self::Shared(socket) => {
                let socket = socket.into_std()?;
                let mut out = Vec::with_capacity(workers);
                for _ in 1..workers {
                    out.push(socket.try_clone()?);
                }
                out.push(socket);
                Ok(out)
            }
        }
    }
}

/// Whether other sockets may bind the same address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reuse {
    /// `SO_REUSEPORT`: the request workers' sockets, among which the kernel spreads connections.
    Port,
    /// One socket on the address (the admin listener).
    Alone,
}

/// A TCP socket bound to `addr`, ready to listen.
fn socket(addr: SocketAddr, reuse: Reuse) -> io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse == Reuse::Port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    Ok(socket)
}

/// A listener on `addr` with a listen queue of `backlog` (`[listen] backlog`), for the admin
/// listener and whatever else is bound outside the workers.
pub fn listener(addr: SocketAddr, backlog: u32) -> io::Result<tokio::net::TcpListener> {
    socket(addr, Reuse::Alone)?.listen(backlog)
}

/// What the workers serve: the plain and TLS listeners, and how long a drain may take.
#[derive(Debug)]
pub struct Serve {
    pub http: Option<Sockets>,
    pub https: Option<(Sockets, TlsAccept)>,
    pub drain_timeout: Duration,
}

/// Running workers; [`Workers::join`] waits until every one has drained.
#[derive(Debug)]
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Start `count` workers serving `serve` until `stop` fires.
    pub fn start(
        count: usize,
        serve: Serve,
        proxy: &Proxy,
        stop: &CancellationToken,
    ) -> io::Result<Self> {
        let mut http: Vec<Option<_>> = match serve.http {
            Some(sockets) => sockets.split(count)?.into_iter().map(Some).collect(),
            None => std::iter::repeat_with(|| None).take(count).collect(),
        };
        let (mut https, tls): (Vec<Option<_>>, _) = match serve.https {
            Some((sockets, tls)) => (
                sockets.split(count)?.into_iter().map(Some).collect(),
                Some(tls),
            ),
            None => (std::iter::repeat_with(|| None).take(count).collect(), None),
        };
        let mut threads = Vec::with_capacity(count);
        for worker in 0..count {
            let job = Job {
                worker,
                http: http.pop().flatten(),
                https: https.pop().flatten().zip(tls.clone()),
                proxy: proxy.for_worker(),
                drain_timeout: serve.drain_timeout,
                stop: stop.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("loom-worker-{worker}"))
                .spawn(move || job.run())?;
            threads.push(thread);
        }
        Ok(Self { threads })
    }

    /// Wait until every worker has drained its connections and stopped.
    pub async fn join(self) {
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                if thread.join().is_err() {
                    tracing::error!("a request worker panicked");
                }
            }
        });
        let _ = joined.await;
    }
}

/// One worker's share.
struct Job {
    worker: usize,
    http: Option<std::net::TcpListener>,
    https: Option<(std::net::TcpListener, TlsAccept)>,
    proxy: Proxy,
    drain_timeout: Duration,
    stop: CancellationToken,
}

impl Job {
    fn run(self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(worker = self.worker, error = %e, "cannot start a request worker");
                return;
            }
        };
        let Self {
            worker,
            http,
            https,
            proxy,
            drain_timeout,
            stop,
        } = self;
        runtime.block_on(async move {
            let serve = |socket, tls| {
                let on = listener::On {
                    worker,
                    tls,
                    drain_timeout,
                };
                listen(socket, on, proxy.clone(), stop.clone())
            };
            let plain = http.map(|socket| serve(socket, None));
            let tls = https.map(|(socket, tls)| serve(socket, Some(tls)));
            tokio::join!(maybe(plain), maybe(tls));
        });
    }
}

async fn maybe(serve: Option<impl std::future::Future<Output = ()>>) {
    if let Some(serve) = serve {
        serve.await;
    }
}

/// Serve one socket on this worker's runtime.
async fn listen(
    socket: std::net::TcpListener,
    on: listener::On,
    proxy: Proxy,
    stop: CancellationToken,
) {
    match tokio::net::TcpListener::from_std(socket) {
        Ok(socket) => listener::serve(socket, on, proxy, stop).await,
        Err(e) => tracing::error!(worker = on.worker, error = %e, "cannot listen"),
    }
}
