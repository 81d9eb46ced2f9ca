//! One caller's part in a flight: the driver that runs the work, or a
//! follower that waits for it. Both are drop guards, so cancellation and
//! panics are handled wherever the caller's future or thread stops.
//!
//! One state machine, two ways to wait: [`Waiter::poll_step`] is the
//! follower's whole logic; async callers poll it from their future
//! ([`crate::call`]), blocking callers from [`block_on`], and both then hand
//! the same [`Driver`] the work.

use std::future::poll_fn;
use std::hash::{BuildHasher, Hash};
use std::task::{Context, Poll};

use crate::block_on::block_on;
use crate::epoch::{Outcome, Role, Versioned};
use crate::flight::{Finished, Flight, FlightId, Registration, Step, WaitKind};
use crate::single_flight::{Mode, SingleFlight};
use crate::slots::SlotId;
use crate::sync::Arc;
use crate::work::Work;

/// Where a caller is in its call. Set when it registers with the map
/// (synchronously, at call time: that is what makes a burst of callers
/// coalesce), then advanced in place: it is the async call's future state as
/// `enter` returns it, with no conversion in between.
pub(crate) enum Stage<'a, K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    /// A value newer than the caller's epoch exists; `None` once returned
    /// (taking just the value keeps the fast path from moving the stage).
    Reused(Option<Versioned<T>>),
    /// The caller runs the flight's work: it leads, or took the flight over.
    Drive(Driver<'a, K, T, E, S>),
    /// The caller follows a flight in progress.
    Join(Waiter<'a, K, T, E, S>),
    /// The call returned its outcome.
    Finished,
}

impl<K, T, E, S> Stage<'_, K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    /// The blocking caller's whole life: lead, or wait and then perhaps drive.
    pub(crate) fn resolve_blocking<F>(self, f: F) -> Result<Outcome<T>, E>
    where
        F: FnOnce() -> Result<T, E>,
    {
        let mut waiter = match self {
            Stage::Reused(Some(v)) => return Ok(reused(v)),
            Stage::Drive(driver) => return driver.run_blocking(f),
            Stage::Join(waiter) => waiter,
            Stage::Reused(None) | Stage::Finished => unreachable!("a new stage is unfinished"),
        };
        match block_on(poll_fn(|cx| waiter.poll_step(cx))) {
            Next::Reused(v) => Ok(reused(v)),
            Next::Done(result) => with_role(result, Role::Joined),
            Next::Adopt(driver) => driver.drive_blocking(),
            Next::Promote(driver) => driver.run_blocking(f),
        }
    }
}

pub(crate) fn reused<T>(stored: Versioned<T>) -> Outcome<T> {
    Outcome::new(stored.value, stored.epoch, Role::Reused)
}

pub(crate) fn with_role<T, E>(result: Finished<T, E>, role: Role) -> Result<Outcome<T>, E> {
    result.map(|(value, stamp)| Outcome::new(value, stamp.into(), role))
}

/// The caller that runs a flight's work: its leader, a follower that adopted
/// the work of a cancelled driver, or one promoted after a panic.
///
/// Dropped before finishing, it hands the flight on (DESIGN I5, I6).
pub(crate) struct Driver<'a, K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    sf: &'a SingleFlight<K, T, E, S>,
    /// Where the flight started; the id tells whether it is still there.
    at: SlotId,
    id: FlightId,
    /// Known when the driver came from a follower. The original leader of a
    /// solo flight finds the shared flight (if one was created) in the map.
    flight: Option<Arc<Flight<T, E>>>,
    work: Option<Work<T, E>>,
    /// Whether it continues a cancelled driver's work (its caller then
    /// `Joined`) rather than running work it made (`Led`). A flag, not a
    /// [`Role`], which is a word wide.
    adopted: bool,
    /// True while user code (the closure or a poll of the work) runs. If the
    /// driver is dropped with it set, that code panicked.
    busy: bool,
    finished: bool,
}

impl<'a, K, T, E, S> Driver<'a, K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    pub(crate) fn new(
        sf: &'a SingleFlight<K, T, E, S>,
        at: SlotId,
        id: FlightId,
        flight: Option<Arc<Flight<T, E>>>,
        work: Option<Work<T, E>>,
    ) -> Self {
        Self {
            sf,
            at,
            id,
            flight,
            adopted: work.is_some(),
            work,
            busy: false,
            finished: false,
        }
    }

    /// Whether the work exists (made, or adopted).
    pub(crate) fn has_work(&self) -> bool {
        self.work.is_some()
    }

    /// Calls the caller's closure to create the work.
    pub(crate) fn start(&mut self, make_work: impl FnOnce() -> Work<T, E>) {
        self.busy = true;
        let work = make_work();
        self.busy = false;
        self.work = Some(work);
    }

    /// Polls the work; once it is done, finishes the flight and returns the
    /// stamped result (the caller adds its [`role`](Self::role): a smaller
    /// return value, passed in registers for a small `T`).
    pub(crate) fn poll_work(&mut self, cx: &mut Context<'_>) -> Poll<Finished<T, E>> {
        let work = self.work.as_mut().expect("driver polled without work");
        self.busy = true;
        let poll = work.poll(cx);
        if poll.is_ready() {
            // Drop the finished future now, outside every lock.
            self.work = None;
        }
        self.busy = false;
        poll.map(|result| self.finish(result))
    }

    fn drive_blocking(mut self) -> Result<Outcome<T>, E> {
        let finished = block_on(poll_fn(|cx| self.poll_work(cx)));
        with_role(finished, self.role())
    }

    pub(crate) fn role(&self) -> Role {
        if self.adopted {
            Role::Joined
        } else {
            Role::Led
        }
    }

    fn run_blocking<F>(mut self, f: F) -> Result<Outcome<T>, E>
    where
        F: FnOnce() -> Result<T, E>,
    {
        self.busy = true;
        let result = f();
        self.busy = false;
        let finished = self.finish(result);
        with_role(finished, self.role())
    }

    /// Stores the result (if the map still holds this flight) and publishes
    /// it to the followers.
    fn finish(&mut self, result: Result<T, E>) -> Finished<T, E> {
        // `complete_flight` makes every clone before it changes anything: if
        // `T::clone` panics there, this driver is still unfinished, and its
        // drop hands the flight on as after a panic in the work.
        let own = self.flight.as_ref();
        let done = &mut self.finished;
        self.sf.complete_flight(self.at, self.id, own, result, done)
    }
}

impl<K, T, E, S> Drop for Driver<'_, K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Panicked: the work is broken, drop it; a follower starts over.
        // Cancelled: hand the work, already started, to a follower.
        let work = self.work.take();
        let handed = if self.busy {
            // Dropped before the flight is handed on: a promoted follower's
            // work must not start while this one's destructor still runs (I1).
            drop(work);
            None
        } else {
            work
        };
        let leftover = self
            .sf
            .abandon_flight(self.at, self.id, self.flight.take(), handed);
        // User futures are dropped here, after every lock is released.
        drop(leftover);
    }
}

/// A follower: registered with a flight, waiting for its outcome.
///
/// Dropped before resolving, it withdraws (DESIGN I2).
pub(crate) struct Waiter<'a, K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    sf: &'a SingleFlight<K, T, E, S>,
    /// Its key, to look for a newer value if it is promoted (DESIGN I3).
    key: K,
    at: SlotId,
    flight: Arc<Flight<T, E>>,
    /// How it waits; `None` once resolved or turned into a driver: nothing
    /// to withdraw.
    waiting: Option<WaitKind>,
    /// What the caller asked for, checked again if it is promoted.
    mode: Mode,
    registration: Registration,
}

/// What a follower does once its flight moved on.
pub(crate) enum Next<'a, K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    /// Return the flight's result.
    Done(Finished<T, E>),
    /// Promoted, but a stored value now answers the call: return it.
    Reused(Versioned<T>),
    /// Continue the orphaned work with this driver.
    Adopt(Driver<'a, K, T, E, S>),
    /// Start own work with this driver.
    Promote(Driver<'a, K, T, E, S>),
}

impl<'a, K, T, E, S> Waiter<'a, K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    pub(crate) fn new(
        sf: &'a SingleFlight<K, T, E, S>,
        key: K,
        at: SlotId,
        flight: Arc<Flight<T, E>>,
        kind: WaitKind,
        mode: Mode,
    ) -> Self {
        Self {
            sf,
            key,
            at,
            flight,
            waiting: Some(kind),
            mode,
            registration: Registration::default(),
        }
    }

    /// Looks at the flight; `Pending` with the waker registered if there is
    /// nothing to do yet.
    pub(crate) fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Next<'a, K, T, E, S>> {
        let kind = self.waiting.expect("a resolved follower stepped again");
        let step = self.flight.step(kind, cx.waker(), &mut self.registration);
        Poll::Ready(match step {
            Step::Wait => return Poll::Pending,
            Step::Done(result) => {
                self.waiting = None;
                Next::Done(result)
            }
            Step::Adopt(work) => Next::Adopt(self.become_driver(Some(work))),
            Step::Promote => {
                let driver = self.become_driver(None);
                match self.sf.reusable(&self.key, self.mode) {
                    // Running now would refresh a value newer than the one
                    // this caller saw. Pass the vacancy on (dropping an
                    // unstarted driver does) and reuse the value.
                    Some(stored) => Next::Reused(stored),
                    None => Next::Promote(driver),
                }
            }
        })
    }

    fn become_driver(&mut self, work: Option<Work<T, E>>) -> Driver<'a, K, T, E, S> {
        self.waiting = None;
        Driver::new(
            self.sf,
            self.at,
            self.flight.id,
            Some(self.flight.clone()),
            work,
        )
    }
}

impl<K, T, E, S> Drop for Waiter<'_, K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    fn drop(&mut self) {
        if let Some(kind) = self.waiting {
            let leftover = self
                .sf
                .leave_flight(self.at, &self.flight, kind, self.registration);
            drop(leftover);
        }
    }
}
