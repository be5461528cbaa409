//! A client connection's own upstream connections, to the local Loom and to the peer routers its
//! writes go to, and the join that drives them in one task (docs/performance.md).
//!
//! A keep-alive client connection sends its requests to each upstream over one HTTP/1.1
//! connection that it owns: no pool key is hashed, nothing is checked out or returned, and no
//! other task is woken per request. This is HAProxy's `http-reuse safe`. The upstream
//! connections are driven by [`Drive`], in the client connection's task, which polls only the
//! connections whose wakers fired.
//!
//! The rules, so that owning a connection never costs a request:
//! - the first request of a client connection goes through the shared pool: a client that sends
//!   one request and leaves does not open and close an upstream connection for it;
//! - a request that finds its connection closed before it was sent goes out on a fresh one; a
//!   request that was written and then lost its connection is never sent again (it may have
//!   been a write that Loom applied);
//! - each owned connection holds one of the upstream's `max_upstream_connections` permits; past
//!   the share the shared pool keeps (`http/bound.rs`), or past `MAX_OWNED` (8) upstreams,
//!   requests go through the pool.
//!
//! This file knows nothing of routing; `http/forward.rs` decides when to use it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use hyper::client::conn::http1::SendRequest;

use crate::http::body::Body;
use crate::http::bound::Upstream;
use crate::http::timer::{Deadline, Reused};

/// A connection future handed to the driver: the upstream connection with its permit.
pub(crate) type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A client connection's slot for its upstream connection. Cloned into the connection's
/// service (which sends through it) and its [`Drive`] (which drives it).
#[derive(Debug, Clone, Default)]
pub struct Affine {
    slot: Arc<Slot>,
}

#[derive(Default)]
struct Slot {
    /// The owned connections' senders between requests, by upstream. A request takes its
    /// upstream's out while it uses it.
    senders: Mutex<Vec<(Upstream, SendRequest<Body>)>>,
    /// Connections requests just opened, for the driver to pick up.
    opened: Mutex<Vec<Driver>>,
    /// Set with `opened`, so that the driver looks only when there is something to take.
    has_opened: AtomicBool,
    /// Owned connections open, in use or not: at most [`MAX_OWNED`], so that `Drive` has a
    /// wake bit for each.
    open: AtomicUsize,
    /// The connection has sent a request already (through the pool or its own connection).
    used: AtomicBool,
    /// The timer entry its requests' response deadlines reuse (`http/timer.rs`); made by the
    /// first, inside the runtime.
    timer: OnceLock<Reused>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("used", &self.used.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The most upstreams one client connection owns connections to: the local Loom and the peer
/// routers, in any real topology. Past it, requests go through the pool.
pub(crate) const MAX_OWNED: usize = 8;

/// Where a request goes when its client connection may own an upstream connection.
#[derive(Debug)]
pub(crate) enum Owned {
    /// The connection's first request: through the shared pool.
    First,
    /// The owned connection, ready to send on.
    Ready(Upstream, SendRequest<Body>),
    /// None yet (or the last one closed): open one.
    None,
}

impl Affine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the owned connection to `upstream` for one request (see [`Owned`]).
    pub(crate) fn take(&self, upstream: &http::Uri) -> Owned {
        if !self.slot.used.swap(true, Ordering::Relaxed) {
            return Owned::First;
        }
        let mut senders = lock(&self.slot.senders);
        let Some(i) = senders.iter().position(|(key, _)| key.is(upstream)) else {
            return Owned::None;
        };
        let (upstream, sender) = senders.swap_remove(i);
        if sender.is_closed() {
            Owned::None
        } else {
            Owned::Ready(upstream, sender)
        }
    }

    /// The deadline for a response to this connection's request in flight, `after` from now.
    pub(crate) fn deadline(&self, after: Duration) -> Deadline {
        self.slot.timer.get_or_init(Reused::new).after(after)
    }

    /// Whether this connection may own one more upstream connection.
    pub(crate) fn has_room(&self) -> bool {
        self.slot.open.load(Ordering::Relaxed) < MAX_OWNED
    }

    /// Give the connection back once its request has its response.
    pub(crate) fn put(&self, upstream: Upstream, sender: SendRequest<Body>) {
        lock(&self.slot.senders).push((upstream, sender));
    }

    /// Hand a newly opened connection to the driver. The request that opened it is being polled
    /// by the same [`Drive`], which picks it up before it sleeps.
    pub(crate) fn opened(&self, driver: Driver) {
        self.slot.open.fetch_add(1, Ordering::Relaxed);
        lock(&self.slot.opened).push(driver);
        self.slot.has_opened.store(true, Ordering::Release);
    }

    fn take_opened(&self) -> Vec<Driver> {
        if !self.slot.has_opened.swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        std::mem::take(&mut *lock(&self.slot.opened))
    }
}

/// A poisoned slot only means a request panicked while holding it; its content is still whole.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls a client connection and its owned upstream connections in one task, each only when its
/// own waker fired. (`select!` or `join!` would poll all on every wake: ~4k instructions per
/// request.) Completes when the client connection does; its upstream connections close with it.
pub struct Drive<F> {
    server: Pin<Box<F>>,
    /// Upstream connections by wake bit; a finished one leaves its place free.
    upstreams: Vec<(Option<Driver>, Waker)>,
    affine: Affine,
    wakes: Arc<Wakes>,
    server_waker: Waker,
}

/// How many times one poll goes round while the sides keep waking each other (a request handed
/// to the upstream, its response handed back). Past this the task yields, so that tokio's
/// cooperative budget, which wakes a side that ran out, cannot keep it spinning.
const ROUNDS: usize = 8;

#[derive(Default)]
struct Wakes {
    /// The task's own waker.
    parent: AtomicWaker,
    /// [`Drive::poll`] is running: a wake now is seen by its next round, not by a new poll.
    running: AtomicBool,
    server: AtomicBool,
    /// One bit per upstream connection: bit i wakes `Drive::upstreams[i]`.
    upstreams: AtomicU64,
}

#[derive(Clone, Copy)]
enum Side {
    Server,
    Upstream(usize),
}

struct SideWaker {
    wakes: Arc<Wakes>,
    side: Side,
}

impl Wake for SideWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self.side {
            Side::Server => self.wakes.server.store(true, Ordering::SeqCst),
            Side::Upstream(i) => {
                self.wakes.upstreams.fetch_or(1 << i, Ordering::SeqCst);
            }
        }
        if !self.wakes.running.load(Ordering::SeqCst) {
            self.wakes.parent.wake();
        }
    }
}

impl<F: Future> Drive<F> {
    pub fn new(server: F, affine: Affine) -> Self {
        let wakes = Arc::new(Wakes::default());
        // The first poll polls the server side.
        wakes.server.store(true, Ordering::SeqCst);
        let server_waker = side_waker(&wakes, Side::Server);
        Self {
            server: Box::pin(server),
            upstreams: Vec::new(),
            affine,
            server_waker,
            wakes,
        }
    }

    /// Give a newly opened connection a free place, and poll it at once.
    fn adopt(&mut self, driver: Driver) {
        let i = match self.upstreams.iter().position(|(d, _)| d.is_none()) {
            Some(i) => i,
            None => {
                let i = self.upstreams.len();
                let waker = side_waker(&self.wakes, Side::Upstream(i));
                self.upstreams.push((None, waker));
                i
            }
        };
        self.upstreams[i].0 = Some(driver);
        self.wakes.upstreams.fetch_or(1 << i, Ordering::SeqCst);
    }

    /// One round: poll each woken side once. `Some` once the client connection is done.
    fn round(&mut self) -> Option<F::Output> {
        if self.wakes.server.swap(false, Ordering::SeqCst) {
            let mut cx = Context::from_waker(&self.server_waker);
            if let Poll::Ready(out) = self.server.as_mut().poll(&mut cx) {
                return Some(out);
            }
            // Requests opened connections (replacing closed ones, if any).
            for driver in self.affine.take_opened() {
                self.adopt(driver);
            }
        }
        let mut woken = self.wakes.upstreams.swap(0, Ordering::SeqCst);
        while woken != 0 {
            let i = woken.trailing_zeros() as usize;
            woken &= woken - 1;
            if let Some((Some(upstream), waker)) = self.upstreams.get_mut(i) {
                let mut cx = Context::from_waker(waker);
                if upstream.as_mut().poll(&mut cx).is_ready() {
                    self.upstreams[i].0 = None;
                    self.affine.slot.open.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        None
    }

    fn woken(&self) -> bool {
        self.wakes.server.load(Ordering::SeqCst) || self.wakes.upstreams.load(Ordering::SeqCst) != 0
    }
}

impl<F: Future> Future for Drive<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Every field is Unpin (the server future is boxed).
        let this = self.get_mut();
        this.wakes.parent.register(cx.waker());
        this.wakes.running.store(true, Ordering::SeqCst);
        for _ in 0..ROUNDS {
            if let Some(out) = this.round() {
                this.wakes.running.store(false, Ordering::SeqCst);
                return Poll::Ready(out);
            }
            if !this.woken() {
                this.wakes.running.store(false, Ordering::SeqCst);
                // A wake between the check and the store above went unannounced: look again.
                if !this.woken() {
                    return Poll::Pending;
                }
                this.wakes.running.store(true, Ordering::SeqCst);
            }
        }
        this.wakes.running.store(false, Ordering::SeqCst);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<F> Unpin for Drive<F> {}

fn side_waker(wakes: &Arc<Wakes>, side: Side) -> Waker {
    Waker::from(Arc::new(SideWaker {
        wakes: wakes.clone(),
        side,
    }))
}

impl<F> std::fmt::Debug for Drive<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = self.upstreams.iter().filter(|(d, _)| d.is_some()).count();
        f.debug_struct("Drive")
            .field("upstreams", &open)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A future that counts its polls and finishes when told.
    struct Counted {
        polls: Arc<AtomicUsize>,
        done: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Counted {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.done.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    struct Handle {
        polls: Arc<AtomicUsize>,
        done: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    fn counted() -> (Counted, Handle) {
        let (polls, done, waker) = (Arc::default(), Arc::default(), Arc::default());
        let future = Counted {
            polls: Arc::clone(&polls),
            done: Arc::clone(&done),
            waker: Arc::clone(&waker),
        };
        (future, Handle { polls, done, waker })
    }

    impl Handle {
        fn wake(&self) {
            self.waker.lock().unwrap().take().unwrap().wake();
        }
        fn polls(&self) -> usize {
            self.polls.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn only_the_woken_side_is_polled() {
        let (server, s) = counted();
        let (upstream, u) = counted();
        let affine = Affine::new();
        let mut drive = Drive::new(server, affine.clone());
        let task = Arc::new(Flag::default());
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut drive).poll(&mut cx).is_pending());
        assert_eq!((s.polls(), u.polls()), (1, 0));

        // A request opens a connection: it is picked up after the server side's poll.
        affine.opened(Box::pin(upstream));
        s.wake();
        assert!(task.take(), "a wake outside a poll wakes the task");
        assert!(Pin::new(&mut drive).poll(&mut cx).is_pending());
        assert_eq!((s.polls(), u.polls()), (2, 1));

        // The upstream alone is woken: the server is not polled.
        u.wake();
        assert!(task.take());
        assert!(Pin::new(&mut drive).poll(&mut cx).is_pending());
        assert_eq!((s.polls(), u.polls()), (2, 2));

        // A spurious poll polls nobody.
        assert!(Pin::new(&mut drive).poll(&mut cx).is_pending());
        assert_eq!((s.polls(), u.polls()), (2, 2));

        // The upstream finishing leaves the server running; the server finishing ends it all.
        u.done.store(true, Ordering::SeqCst);
        u.wake();
        assert!(Pin::new(&mut drive).poll(&mut cx).is_pending());
        assert_eq!(u.polls(), 3);
        s.done.store(true, Ordering::SeqCst);
        s.wake();
        assert!(Pin::new(&mut drive).poll(&mut cx).is_ready());
    }

    #[test]
    fn the_first_request_uses_the_pool_and_later_ones_their_own() {
        let affine = Affine::new();
        let loom = http::Uri::from_static("http://127.0.0.1:8080/x");
        assert!(matches!(affine.take(&loom), Owned::First));
        assert!(matches!(affine.take(&loom), Owned::None));
        assert!(matches!(affine.take(&loom), Owned::None));
        assert!(affine.has_room());
        for _ in 0..MAX_OWNED {
            affine.opened(Box::pin(std::future::pending()));
        }
        assert!(!affine.has_room(), "at most {MAX_OWNED} upstreams each");
    }

    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Flag {
        fn take(&self) -> bool {
            self.0.swap(false, Ordering::SeqCst)
        }
    }

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}
