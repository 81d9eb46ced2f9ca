//! The futures returned by [`SingleFlight`](crate::SingleFlight)'s async
//! operations, and the blocking twins' wait: one state machine, two ways to
//! wait (an async caller polls it; a blocking one drives it with
//! `block_on`).

use std::convert::Infallible;
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use crate::block_on::block_on;
use crate::driver::Driver;
use crate::epoch::{Outcome, Role, Versioned};
use crate::flight::Finished;
use crate::follower::{Followed, Follower};
use crate::registry::{Entered, Mode, Registry};
use crate::sync::StdArc;
use crate::work::{MakeWork, ReturnsResult, ReturnsValue};

/// Where a caller is in its call. Set when it registers with the map (at
/// call time: that is what makes a burst of callers coalesce), then advanced
/// in place.
pub(crate) enum CallState<'a, K, T, E, S> {
    /// A value newer than the caller's epoch exists; `None` once returned.
    Reused(Option<Versioned<T>>),
    /// The caller runs the flight's work: it leads, or took the flight over.
    Driving(Driver<'a, K, T, E, S>),
    /// The caller follows a flight in progress.
    Following(Follower<'a, K, T, E, S>),
    /// The call returned its outcome.
    Done,
}

impl<'a, K, T, E, S> CallState<'a, K, T, E, S> {
    #[inline]
    pub(crate) fn new(
        registry: &'a StdArc<Registry<K, T, E, S>>,
        entered: Entered<T, E>,
        mode: Mode,
    ) -> Self {
        match entered {
            Entered::Reused(stored) => CallState::Reused(Some(stored)),
            Entered::Lead(id) => CallState::Driving(Driver::leading(registry, id)),
            Entered::Join(id, flight, kind) => {
                CallState::Following(Follower::new(registry, id, flight, kind, mode))
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            CallState::Reused(Some(_)) => "Reused",
            CallState::Driving(_) => "Driving",
            CallState::Following(_) => "Following",
            CallState::Reused(None) | CallState::Done => "Done",
        }
    }
}

impl<K, T, E, S> CallState<'_, K, T, E, S>
where
    K: Eq + Clone,
    T: Clone,
    E: Clone,
{
    /// The reuse fast path inline; every other state out of line.
    #[inline]
    fn poll<W: MakeWork<T, E>>(
        &mut self,
        make: &mut Option<W>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Outcome<T>, E>> {
        if let CallState::Reused(stored) = self {
            if let Some(stored) = stored.take() {
                return Poll::Ready(Ok(reused(stored)));
            }
        }
        // The result comes back in registers (no tag, no padding) and the
        // role beside it; the `Outcome` is built here, in the caller's poll.
        let mut role = None;
        let finished = ready!(self.poll_flight(make, cx, &mut role));
        let role = role.expect("poll_flight says how the caller got a result it returns");
        Poll::Ready(with_role(finished, role))
    }

    /// Every state but a reuse answered at call time; sets `role` when ready.
    #[inline(never)]
    fn poll_flight<W: MakeWork<T, E>>(
        &mut self,
        make: &mut Option<W>,
        cx: &mut Context<'_>,
        role: &mut Option<Role>,
    ) -> Poll<Finished<T, E>> {
        loop {
            // Every state is polled in place. After a panic in user code the
            // driver stays here until the future is dropped: its drop knows
            // the work panicked.
            match self {
                CallState::Driving(driver) => {
                    let finished = if driver.is_unstarted() {
                        let make = make
                            .take()
                            .expect("an epochflight call was polled after it panicked");
                        ready!(driver.start(|| make.make(), cx))
                    } else {
                        ready!(driver.poll_work(cx))
                    };
                    *role = Some(driver.role());
                    *self = CallState::Done;
                    return Poll::Ready(finished);
                }
                CallState::Following(follower) => match ready!(follower.poll(cx)) {
                    Followed::Done(result) => {
                        *self = CallState::Done;
                        *role = Some(Role::Joined);
                        return Poll::Ready(result);
                    }
                    Followed::Reused(stored) => {
                        *self = CallState::Done;
                        *role = Some(Role::Reused);
                        return Poll::Ready(Ok((stored.value, stored.stamp)));
                    }
                    // A promoted driver's work is made on the next turn.
                    Followed::Drive(driver) => *self = CallState::Driving(driver),
                },
                CallState::Reused(_) | CallState::Done => {
                    panic!("an epochflight call was polled after it completed")
                }
            }
        }
    }

    /// A blocking caller's whole call: lead with `f`, or wait and then
    /// perhaps drive (the work handed on, polled on this thread; or `f`).
    pub(crate) fn wait(self, f: impl FnOnce() -> Result<T, E>) -> Result<Outcome<T>, E> {
        let mut follower = match self {
            CallState::Reused(Some(stored)) => return Ok(reused(stored)),
            CallState::Driving(driver) => return with_role(driver.run_blocking(f), Role::Led),
            CallState::Following(follower) => follower,
            CallState::Reused(None) | CallState::Done => unreachable!("a new call is unfinished"),
        };
        match block_on(poll_fn(|cx| follower.poll(cx))) {
            Followed::Done(result) => with_role(result, Role::Joined),
            Followed::Reused(stored) => Ok(reused(stored.into())),
            Followed::Drive(driver) if driver.is_unstarted() => {
                with_role(driver.run_blocking(f), Role::Led)
            }
            Followed::Drive(driver) => with_role(driver.drive_blocking(), Role::Joined),
        }
    }
}

fn reused<T>(stored: Versioned<T>) -> Outcome<T> {
    Outcome::new(stored.value, stored.epoch, Role::Reused)
}

fn with_role<T, E>(result: Finished<T, E>, role: Role) -> Result<Outcome<T>, E> {
    result.map(|(value, stamp)| Outcome::new(value, stamp.into(), role))
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
pub struct TryCall<'a, K, T, E, S, F> {
    state: CallState<'a, K, T, E, S>,
    make: Option<ReturnsResult<F>>,
}

impl<'a, K, T, E, S, F> TryCall<'a, K, T, E, S, F> {
    pub(crate) fn new(state: CallState<'a, K, T, E, S>, f: F) -> Self {
        Self {
            state,
            make: Some(ReturnsResult(f)),
        }
    }
}

impl<K, T, E, S, F, Fut> Future for TryCall<'_, K, T, E, S, F>
where
    K: Eq + Clone,
    T: Clone,
    E: Clone,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
{
    type Output = Result<Outcome<T>, E>;

    // Inline, so that a reused value goes straight into the awaiting future.
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.state.poll(&mut this.make, cx)
    }
}

// Nothing in a call is ever pinned in place: the work is boxed.
impl<K, T, E, S, F> Unpin for TryCall<'_, K, T, E, S, F> {}

impl<K, T, E, S, F> fmt::Debug for TryCall<'_, K, T, E, S, F> {
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
pub struct Call<'a, K, T, S, F> {
    state: CallState<'a, K, T, Infallible, S>,
    make: Option<ReturnsValue<F>>,
}

impl<'a, K, T, S, F> Call<'a, K, T, S, F> {
    pub(crate) fn new(state: CallState<'a, K, T, Infallible, S>, f: F) -> Self {
        Self {
            state,
            make: Some(ReturnsValue(f)),
        }
    }
}

impl<K, T, S, F, Fut> Future for Call<'_, K, T, S, F>
where
    K: Eq + Clone,
    T: Clone,
    F: FnOnce() -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    type Output = Outcome<T>;

    // Inline: see `TryCall::poll`.
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome<T>> {
        let this = self.get_mut();
        this.state
            .poll(&mut this.make, cx)
            .map(|result| match result {
                Ok(outcome) => outcome,
                Err(never) => match never {},
            })
    }
}

// Nothing in a call is ever pinned in place: the work is boxed.
impl<K, T, S, F> Unpin for Call<'_, K, T, S, F> {}

impl<K, T, S, F> fmt::Debug for Call<'_, K, T, S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("state", &self.state.name())
            .finish()
    }
}
