//! Deadlines that reuse one tokio timer entry per connection, for the timers every request arms:
//! hyper's wait for a request head, and the wait for an owned upstream's response
//! (docs/performance.md).
//!
//! A fresh `tokio::time::Sleep` per request locks the runtime's timer wheel twice, to insert
//! its entry when first polled and to remove it when dropped. One connection's deadlines only
//! move later, and tokio moves an armed entry later with one atomic store, so a [`Reused`]
//! entry costs a request that store instead. An entry whose request has finished stays armed:
//! when it fires, it wakes its connection once, for nothing, and the next deadline re-arms it.
//!
//! One [`Reused`] serves one waiter at a time. Each [`Deadline`] arms the entry for itself when
//! polled, so two polled in turn would keep moving the one entry and wake only the last poller.
//! hyper's HTTP/1 server connection has one head to wait for at a time, and a client connection
//! one request in flight.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// One connection's timer entry, shared by the deadlines it hands out.
#[derive(Clone)]
pub struct Reused {
    entry: Arc<Mutex<Pin<Box<Sleep>>>>,
}

impl Reused {
    /// An entry that is not armed until its first deadline is polled. Needs a tokio runtime with
    /// its time driver, as `tokio::time::sleep` does.
    pub fn new() -> Self {
        // Far enough never to fire before a deadline moves it: tokio registers nothing until
        // the first poll, and the first poll carries its own deadline.
        let idle = tokio::time::sleep(Duration::from_secs(86_400));
        Self {
            entry: Arc::new(Mutex::new(Box::pin(idle))),
        }
    }

    /// A future that completes at `deadline`.
    pub fn until(&self, deadline: Instant) -> Deadline {
        Deadline {
            entry: self.entry.clone(),
            deadline,
        }
    }

    /// A future that completes `after` from now.
    pub fn after(&self, after: Duration) -> Deadline {
        self.until(Instant::now() + after)
    }
}

impl Default for Reused {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Reused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reused").finish_non_exhaustive()
    }
}

/// A deadline on a [`Reused`] entry; completes once `deadline` has passed.
pub struct Deadline {
    entry: Arc<Mutex<Pin<Box<Sleep>>>>,
    deadline: Instant,
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Never contended: one connection's task polls its deadlines. A poisoned lock only
        // means a poll panicked; the entry is still whole.
        let mut entry = self.entry.lock().unwrap_or_else(PoisonError::into_inner);
        if entry.deadline() != self.deadline {
            entry.as_mut().reset(self.deadline);
        }
        entry.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for Deadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadline")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl hyper::rt::Sleep for Deadline {}

pin_project_lite::pin_project! {
    /// A future run until a deadline (a [`Deadline`], or any timer future): `None` if the
    /// deadline came first and the future still had no answer. A struct, not an `async fn`: an
    /// `async fn` would keep the future it is given twice in its state, once as the argument
    /// and once pinned.
    #[derive(Debug)]
    pub struct Within<F, D> {
        #[pin]
        future: F,
        deadline: D,
        grace: Grace,
    }
}

/// Where a [`Within`] is after its deadline.
enum Grace {
    /// Not passed yet.
    Running,
    /// Passed: waiting for the runtime to poll its I/O driver once more.
    Turn(Pin<Box<dyn Future<Output = ()> + Send>>),
    /// The tasks and connections woken by that turn have run: one last look.
    LastLook,
}

impl std::fmt::Debug for Grace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Running => "Running",
            Self::Turn(_) => "Turn",
            Self::LastLook => "LastLook",
        })
    }
}

/// Run `future` until `deadline`.
///
/// A deadline bounds how long to wait for an answer, not whether an answer that came is
/// reported. When the process was paused past a deadline (SIGSTOP, a VM freeze, a long stall),
/// the answer may be waiting in a socket that nothing has read yet, while the timer already
/// reads as passed; the I/O driver may even report the timer before the socket. So a passed
/// deadline first waits for one more turn of the I/O driver (`tokio::task::yield_now`, which
/// wakes a task after it), then lets the tasks and connections woken by it run (one more wake),
/// then looks at the future a last time. An answer that arrived is relayed, and a write that
/// Loom applied is not reported as a timeout. Only a future still without an answer is `None`.
pub fn within<F: Future, D: Future<Output = ()> + Unpin>(deadline: D, future: F) -> Within<F, D> {
    Within {
        future,
        deadline,
        grace: Grace::Running,
    }
}

impl<F: Future, D: Future<Output = ()> + Unpin> Future for Within<F, D> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.future.poll(cx) {
            return Poll::Ready(Some(out));
        }
        match this.grace {
            Grace::Running => {
                if Pin::new(this.deadline).poll(cx).is_ready() {
                    // Boxed: only a request past its deadline pays for it.
                    *this.grace = Grace::Turn(Box::pin(tokio::task::yield_now()));
                    this.grace.wait_turn(cx);
                }
                Poll::Pending
            }
            Grace::Turn(_) => {
                this.grace.wait_turn(cx);
                Poll::Pending
            }
            Grace::LastLook => Poll::Ready(None),
        }
    }
}

impl Grace {
    /// Past the deadline: once the I/O driver has turned, wake again behind what that turn
    /// woke (in `affine::Drive`, the upstream connections, polled after the client side in the
    /// same round), for the last look.
    fn wait_turn(&mut self, cx: &mut Context<'_>) {
        if let Self::Turn(turn) = self {
            if turn.as_mut().poll(cx).is_ready() {
                *self = Self::LastLook;
                cx.waker().wake_by_ref();
            }
        }
    }
}

/// hyper's timer for one HTTP/1 server connection: its header-read deadlines share one entry.
#[derive(Debug, Clone, Default)]
pub struct ConnectionTimer {
    reused: Reused,
}

impl ConnectionTimer {
    pub fn new() -> Self {
        Self::default()
    }
}

impl hyper::rt::Timer for ConnectionTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.reused.after(duration))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.reused.until(deadline.into()))
    }

    fn now(&self) -> std::time::Instant {
        // tokio's clock, so that a test that pauses time pauses this timer too.
        Instant::now().into_std()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_completes_when_it_passes_and_not_before() {
        let reused = Reused::new();
        let start = Instant::now();
        reused.after(Duration::from_secs(2)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_deadline_moves_the_entry_an_earlier_one_left_armed() {
        let reused = Reused::new();
        let start = Instant::now();
        // The first waiter is done before its deadline: the entry stays armed for 1 s.
        assert_eq!(
            within(reused.after(Duration::from_secs(1)), async { 7 }).await,
            Some(7)
        );
        // The next deadline is later; passing the first one's second must not end it.
        let late = within(
            reused.after(Duration::from_secs(3)),
            std::future::pending::<()>(),
        );
        assert_eq!(late.await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_ready_once_the_tasks_woken_with_the_deadline_have_run_is_kept() {
        let reused = Reused::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The answer is sent by another task that runs when the deadline passes, as a
        // connection whose response waited in its socket while the process was paused.
        let answer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = tx.send("applied");
        });
        let got = within(reused.after(Duration::from_secs(2)), rx).await;
        assert_eq!(got.map(Result::ok), Some(Some("applied")));
        answer.await.unwrap();
        // With no answer at all, the deadline still ends the wait.
        let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
        assert!(within(reused.after(Duration::from_secs(1)), rx)
            .await
            .is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_than_the_armed_one_still_fires_on_time() {
        let reused = Reused::new();
        let start = Instant::now();
        assert_eq!(
            within(reused.after(Duration::from_secs(10)), async {}).await,
            Some(())
        );
        reused.after(Duration::from_secs(1)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_after_one_that_fired_re_arms_the_entry() {
        let reused = Reused::new();
        let start = Instant::now();
        reused.after(Duration::from_secs(1)).await;
        reused.after(Duration::from_secs(1)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn hypers_sleeps_on_one_connection_timer_complete_in_turn() {
        use hyper::rt::Timer as _;
        let timer = ConnectionTimer::new();
        let start = timer.now();
        timer.sleep(Duration::from_millis(500)).await;
        timer.sleep_until(start + Duration::from_millis(1500)).await;
        assert_eq!(timer.now() - start, Duration::from_millis(1500));
    }
}
