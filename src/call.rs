//! The futures returned by [`SingleFlight`](crate::SingleFlight)'s async
//! operations: one small, hand-written state machine, so a caller's future
//! stays a few words in size whatever role it ends up playing.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use crate::caller::{Next, Stage, reused, with_role};
use crate::epoch::{Outcome, Role};
use crate::work::Work;

/// Makes a caller's work, if it ends up running it.
pub(crate) trait MakeWork<T, E> {
    fn make(self) -> Work<T, E>;
}

/// Work from a closure whose future returns `Result<T, E>`.
pub(crate) struct Fallible<F>(pub(crate) F);

/// Work from a closure whose future returns `T`.
pub(crate) struct Infallibly<F>(pub(crate) F);

impl<T, E, F, Fut> MakeWork<T, E> for Fallible<F>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
{
    fn make(self) -> Work<T, E> {
        Work::Fallible(Box::pin((self.0)()))
    }
}

impl<T, F, Fut> MakeWork<T, Infallible> for Infallibly<F>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    fn make(self) -> Work<T, Infallible> {
        Work::Infallible(Box::pin((self.0)()))
    }
}

/// A call's progress, with the caller's closure beside it until used.
struct Machine<'a, K, T, E, S, W>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    /// Where the caller is. A driver's work is made on its first poll and
    /// then polled in place.
    stage: Stage<'a, K, T, E, S>,
    /// Makes the work if this caller leads or is promoted.
    make: Option<W>,
}

impl<'a, K, T, E, S, W> Machine<'a, K, T, E, S, W>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
    W: MakeWork<T, E>,
{
    fn new(stage: Stage<'a, K, T, E, S>, make: W) -> Self {
        // Moved as it is: no per-stage rewrapping on the fast paths.
        Self {
            stage,
            make: Some(make),
        }
    }

    /// The reuse fast path inline; every other stage out of line.
    #[inline]
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Outcome<T>, E>> {
        if let Stage::Reused(stored) = &mut self.stage {
            if let Some(v) = stored.take() {
                return Poll::Ready(Ok(reused(v)));
            }
        }
        self.poll_stage(cx)
    }

    // Kept out of the caller's future, so that inlining `poll` into it
    // brings the reuse check alone.
    #[inline(never)]
    fn poll_stage(&mut self, cx: &mut Context<'_>) -> Poll<Result<Outcome<T>, E>> {
        loop {
            // Every stage is polled in place. After a panic in user code the
            // driver stays here until the future is dropped; it knows it was
            // busy, so its drop hands the flight on as after a panic.
            match &mut self.stage {
                Stage::Drive(driver) => {
                    if !driver.has_work() {
                        let make = self
                            .make
                            .take()
                            .expect("an epochflight call was polled after it panicked");
                        driver.start(|| make.make());
                    }
                    let finished = ready!(driver.poll_work(cx));
                    let role = driver.role();
                    self.stage = Stage::Finished;
                    return Poll::Ready(with_role(finished, role));
                }
                Stage::Join(waiter) => match ready!(waiter.poll_step(cx)) {
                    Next::Reused(v) => {
                        self.stage = Stage::Finished;
                        return Poll::Ready(Ok(reused(v)));
                    }
                    Next::Done(result) => {
                        self.stage = Stage::Finished;
                        return Poll::Ready(with_role(result, Role::Joined));
                    }
                    // A promoted driver's work is made on the next turn.
                    Next::Adopt(driver) | Next::Promote(driver) => {
                        self.stage = Stage::Drive(driver);
                    }
                },
                Stage::Reused(v) => {
                    let v = v
                        .take()
                        .expect("an epochflight call was polled after it completed");
                    return Poll::Ready(Ok(reused(v)));
                }
                Stage::Finished => panic!("an epochflight call was polled after it completed"),
            }
        }
    }
}

impl<K, T, E, S, W> Machine<'_, K, T, E, S, W>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    fn name(&self) -> &'static str {
        match &self.stage {
            Stage::Reused(Some(_)) => "Reused",
            Stage::Join(..) => "Join",
            Stage::Drive(_) => "Drive",
            Stage::Reused(None) | Stage::Finished => "Finished",
        }
    }
}

/// The future of a fallible call:
/// [`try_run`](crate::SingleFlight::try_run),
/// [`try_refresh_if_current`](crate::SingleFlight::try_refresh_if_current),
/// [`try_get`](crate::SingleFlight::try_get).
///
/// The caller registered with its key when the call was made; this future is
/// its place in the flight. Dropping it withdraws the caller (see the
/// methods' `# Cancel safety`).
#[must_use = "the call is registered with its key; poll it, or drop it to withdraw"]
pub struct TryCall<'a, K, T, E, S, F>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    state: Machine<'a, K, T, E, S, Fallible<F>>,
}

impl<'a, K, T, E, S, F, Fut> TryCall<'a, K, T, E, S, F>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
{
    pub(crate) fn new(stage: Stage<'a, K, T, E, S>, f: F) -> Self {
        Self {
            state: Machine::new(stage, Fallible(f)),
        }
    }
}

impl<K, T, E, S, F, Fut> Future for TryCall<'_, K, T, E, S, F>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
{
    type Output = Result<Outcome<T>, E>;

    // Inline, so that a reused value goes straight into the awaiting
    // future: returned through memory from an out-of-line poll, the outcome
    // is read back right after it was written, a store-forwarding stall
    // that cost the reuse fast path about a sixth of its time.
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().state.poll(cx)
    }
}

// Nothing in a call is ever pinned in place: the work is boxed.
impl<K, T, E, S, F> Unpin for TryCall<'_, K, T, E, S, F>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
}

impl<K, T, E, S, F> fmt::Debug for TryCall<'_, K, T, E, S, F>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TryCall")
            .field("state", &self.state.name())
            .finish()
    }
}

/// The future of an infallible call:
/// [`run`](crate::SingleFlight::run),
/// [`refresh_if_current`](crate::SingleFlight::refresh_if_current),
/// [`get`](crate::SingleFlight::get).
///
/// The caller registered with its key when the call was made; this future is
/// its place in the flight. Dropping it withdraws the caller (see the
/// methods' `# Cancel safety`).
#[must_use = "the call is registered with its key; poll it, or drop it to withdraw"]
pub struct Call<'a, K, T, S, F>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    S: BuildHasher,
{
    state: Machine<'a, K, T, Infallible, S, Infallibly<F>>,
}

impl<'a, K, T, S, F, Fut> Call<'a, K, T, S, F>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    S: BuildHasher,
    F: FnOnce() -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    pub(crate) fn new(stage: Stage<'a, K, T, Infallible, S>, f: F) -> Self {
        Self {
            state: Machine::new(stage, Infallibly(f)),
        }
    }
}

impl<K, T, S, F, Fut> Future for Call<'_, K, T, S, F>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    S: BuildHasher,
    F: FnOnce() -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    type Output = Outcome<T>;

    // Inline: see `TryCall::poll`.
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome<T>> {
        self.get_mut().state.poll(cx).map(|result| match result {
            Ok(outcome) => outcome,
            Err(never) => match never {},
        })
    }
}

// Nothing in a call is ever pinned in place: the work is boxed.
impl<K, T, S, F> Unpin for Call<'_, K, T, S, F>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    S: BuildHasher,
{
}

impl<K, T, S, F> fmt::Debug for Call<'_, K, T, S, F>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    S: BuildHasher,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("state", &self.state.name())
            .finish()
    }
}
