//! A client connection's own upstream connection to the local Loom, and the join that drives
//! both in one task (docs/performance.md).
//!
//! A keep-alive client connection sends its requests to the local Loom over one upstream
//! HTTP/1.1 connection that it owns: no pool key is hashed, nothing is checked out or returned,
//! and no other task is woken per request. This is HAProxy's `http-reuse safe`. The upstream
//! connection is driven by [`Drive`], in the client connection's task, which polls only the side
//! whose waker fired.
//!
//! The rules, so that owning a connection never costs a request:
//! - the first request of a client connection goes through the shared pool: a client that sends
//!   one request and leaves does not open and close an upstream connection for it;
//! - a request that finds its connection closed before it was sent goes out on a fresh one; a
//!   request that was written and then lost its connection is never sent again (it may have
//!   been a write that Loom applied);
//! - each owned connection holds one of the upstream's `max_upstream_connections` permits; past
//!   the share the shared pool keeps (`http/bound.rs`), requests go through the pool.
//!
//! This file knows nothing of routing; `http/forward.rs` decides when to use it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;
use hyper::client::conn::http1::SendRequest;

use crate::http::body::Body;

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
    /// The owned connection's sender, between requests. Taken by the request that uses it.
    sender: Mutex<Option<SendRequest<Body>>>,
    /// A connection a request just opened, for the driver to pick up.
    opened: Mutex<Option<Driver>>,
    /// Set with `opened`, so that the driver looks only when there is something to take.
    has_opened: AtomicBool,
    /// The connection has sent a request already (through the pool or its own connection).
    used: AtomicBool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("used", &self.used.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Where a request goes when its client connection may own an upstream connection.
#[derive(Debug)]
pub(crate) enum Owned {
    /// The connection's first request: through the shared pool.
    First,
    /// The owned connection, ready to send on.
    Ready(SendRequest<Body>),
    /// None yet (or the last one closed): open one.
    None,
}

impl Affine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the owned connection for one request (see [`Owned`]).
    pub(crate) fn take(&self) -> Owned {
        if !self.slot.used.swap(true, Ordering::Relaxed) {
            return Owned::First;
        }
        let sender = lock(&self.slot.sender).take();
        match sender {
            Some(sender) if !sender.is_closed() => Owned::Ready(sender),
            _ => Owned::None,
        }
    }

    /// Give the connection back once its request has its response.
    pub(crate) fn put(&self, sender: SendRequest<Body>) {
        *lock(&self.slot.sender) = Some(sender);
    }

    /// Hand a newly opened connection to the driver. The request that opened it is being polled
    /// by the same [`Drive`], which picks it up before it sleeps.
    pub(crate) fn opened(&self, driver: Driver) {
        *lock(&self.slot.opened) = Some(driver);
        self.slot.has_opened.store(true, Ordering::Release);
    }

    fn take_opened(&self) -> Option<Driver> {
        if !self.slot.has_opened.swap(false, Ordering::Acquire) {
            return None;
        }
        lock(&self.slot.opened).take()
    }
}

/// A poisoned slot only means a request panicked while holding it; its content is still whole.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls a client connection and its owned upstream connection in one task, each only when its
/// own waker fired. (`select!` or `join!` would poll both on every wake: ~4k instructions per
/// request.) Completes when the client connection does; its upstream connection closes with it.
pub struct Drive<F> {
    server: Pin<Box<F>>,
    upstream: Option<Driver>,
    affine: Affine,
    wakes: Arc<Wakes>,
    server_waker: Waker,
    upstream_waker: Waker,
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
    upstream: AtomicBool,
}

#[derive(Clone, Copy)]
enum Side {
    Server,
    Upstream,
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
        let flag = match self.side {
            Side::Server => &self.wakes.server,
            Side::Upstream => &self.wakes.upstream,
        };
        flag.store(true, Ordering::SeqCst);
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
        let waker = |side| {
            Waker::from(Arc::new(SideWaker {
                wakes: wakes.clone(),
                side,
            }))
        };
        Self {
            server: Box::pin(server),
            upstream: None,
            affine,
            server_waker: waker(Side::Server),
            upstream_waker: waker(Side::Upstream),
            wakes,
        }
    }

    /// One round: poll each woken side once. `Some` once the client connection is done.
    fn round(&mut self) -> Option<F::Output> {
        if self.wakes.server.swap(false, Ordering::SeqCst) {
            let mut cx = Context::from_waker(&self.server_waker);
            if let Poll::Ready(out) = self.server.as_mut().poll(&mut cx) {
                return Some(out);
            }
            if let Some(opened) = self.affine.take_opened() {
                // A request opened a connection (replacing a closed one, if any).
                self.upstream = Some(opened);
                self.wakes.upstream.store(true, Ordering::SeqCst);
            }
        }
        if self.wakes.upstream.swap(false, Ordering::SeqCst) {
            if let Some(upstream) = &mut self.upstream {
                let mut cx = Context::from_waker(&self.upstream_waker);
                if upstream.as_mut().poll(&mut cx).is_ready() {
                    self.upstream = None;
                }
            }
        }
        None
    }

    fn woken(&self) -> bool {
        self.wakes.server.load(Ordering::SeqCst) || self.wakes.upstream.load(Ordering::SeqCst)
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

impl<F> std::fmt::Debug for Drive<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drive")
            .field("upstream", &self.upstream.is_some())
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
        assert!(matches!(affine.take(), Owned::First));
        assert!(matches!(affine.take(), Owned::None));
        assert!(matches!(affine.take(), Owned::None));
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
