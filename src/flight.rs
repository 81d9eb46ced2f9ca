//! The state a flight's driver shares with its followers.
//!
//! A flight starts *solo*: the leader alone, no allocation beyond its boxed
//! work. The first follower turns it into a shared [`Flight`] (one `Arc`),
//! which is what followers wait on. Every transition happens under the
//! flight's own lock; whoever needs to unhook a flight from the map takes the
//! map lock first (lock order: map, then flight).

use std::future::Future;
use std::mem;
use std::pin::Pin;

use event_listener::Event;

use crate::epoch::Epoch;
use crate::sync::Mutex;

/// Identifies a flight within one `SingleFlight`, so a driver can tell whether
/// the map still holds *its* flight after a `forget` or `set`.
pub(crate) type FlightId = u64;

/// A flight's user work, boxed so that a cancelled driver can hand it over.
pub(crate) type Work<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// A completed flight's result as every caller sees it.
pub(crate) type Finished<T, E> = Result<(T, Epoch), E>;

/// How a follower waits, which decides who inherits orphaned async work:
/// an async follower is preferred, a blocking one would have to drive the
/// future on its own thread (DESIGN I9).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum WaitKind {
    Async,
    Blocking,
}

pub(crate) struct Flight<T, E> {
    pub(crate) id: FlightId,
    /// Notified (all listeners) on every phase change that a follower acts on.
    pub(crate) event: Event,
    state: Mutex<FlightState<T, E>>,
}

struct FlightState<T, E> {
    phase: Phase<T, E>,
    /// Followers registered and not yet resolved (dropped ones are removed).
    waiters: usize,
    /// How many of `waiters` are async.
    async_waiters: usize,
}

enum Phase<T, E> {
    /// A driver is running the work.
    Running,
    /// The driver was cancelled mid-flight: its work waits for a follower to
    /// continue polling it (DESIGN I5).
    Orphaned(Work<T, E>),
    /// The driver panicked (or was dropped before it started): the next
    /// follower to look runs its own closure (DESIGN I6).
    Vacant,
    /// The result, cloned by each follower.
    Done(Finished<T, E>),
}

/// What a follower should do after looking at its flight.
pub(crate) enum Step<T, E> {
    /// Nothing yet: keep waiting.
    Wait,
    /// The flight finished.
    Done(Finished<T, E>),
    /// Continue polling this orphaned work; this follower is the driver now.
    Adopt(Work<T, E>),
    /// Run your own closure; this follower is the driver now.
    Promote,
}

/// What a departing follower leaves behind.
pub(crate) enum Leave<T, E> {
    /// Others still wait, or the flight is running or done: nothing to do.
    Stay,
    /// It was the last follower of a flight nobody drives: the caller must
    /// unhook the flight from the map and drop this work outside all locks.
    Abandoned(Option<Work<T, E>>),
}

impl<T, E> Flight<T, E> {
    pub(crate) fn new(id: FlightId) -> Self {
        Self {
            id,
            event: Event::new(),
            state: Mutex::new(FlightState {
                phase: Phase::Running,
                waiters: 0,
                async_waiters: 0,
            }),
        }
    }

    /// Registers a follower. The caller holds the map lock, so the flight is
    /// still in the map and cannot be abandoned concurrently.
    pub(crate) fn add_waiter(&self, kind: WaitKind) {
        let mut state = self.state.lock();
        state.waiters += 1;
        if kind == WaitKind::Async {
            state.async_waiters += 1;
        }
    }

    /// Followers currently registered and unresolved.
    pub(crate) fn waiters(&self) -> usize {
        self.state.lock().waiters
    }

    /// A follower's look at the flight, after registering and after each
    /// wake-up. Claims orphaned work or a vacancy for the caller.
    pub(crate) fn step(&self, kind: WaitKind) -> Step<T, E>
    where
        T: Clone,
        E: Clone,
    {
        let mut state = self.state.lock();
        match &state.phase {
            Phase::Running => Step::Wait,
            // T::clone / E::clone under the flight lock: documented; it keeps
            // `SingleFlight` free of `T: Sync` bounds.
            Phase::Done(result) => Step::Done(result.clone()),
            Phase::Orphaned(_) if kind == WaitKind::Blocking && state.async_waiters > 0 => {
                // Leave it to an async follower, which can poll it on its own
                // runtime. If they all leave, `leave` wakes us again.
                Step::Wait
            }
            Phase::Orphaned(_) => {
                state.remove(kind);
                match mem::replace(&mut state.phase, Phase::Running) {
                    Phase::Orphaned(work) => Step::Adopt(work),
                    _ => unreachable!("phase checked above"),
                }
            }
            Phase::Vacant => {
                state.remove(kind);
                state.phase = Phase::Running;
                Step::Promote
            }
        }
    }

    /// The driver finished: publish the result to every follower.
    pub(crate) fn complete(&self, result: Finished<T, E>) {
        let replaced = mem::replace(&mut self.state.lock().phase, Phase::Done(result));
        // Running is all a finished driver can replace; drop it unlocked anyway.
        drop(replaced);
        self.event.notify(usize::MAX);
    }

    /// The driver gives up without a result: cancelled (`work` is `Some`, to
    /// be continued) or panicked (`None`, a follower must start over).
    ///
    /// The caller holds the map lock. Returns the work back when no follower
    /// is left: the caller then unhooks the flight and drops the work.
    pub(crate) fn hand_off(&self, work: Option<Work<T, E>>) -> Result<(), Option<Work<T, E>>> {
        let mut state = self.state.lock();
        if state.waiters == 0 {
            return Err(work);
        }
        state.phase = match work {
            Some(work) => Phase::Orphaned(work),
            None => Phase::Vacant,
        };
        drop(state);
        // Every follower looks; the first eligible one claims the flight and
        // the rest go back to waiting. Rare path, so simplicity wins.
        self.event.notify(usize::MAX);
        Ok(())
    }

    /// A follower leaves without a result (its future was dropped). The
    /// caller holds the map lock.
    pub(crate) fn leave(&self, kind: WaitKind) -> Leave<T, E> {
        let mut state = self.state.lock();
        if matches!(state.phase, Phase::Done(_)) {
            return Leave::Stay;
        }
        state.remove(kind);
        match &state.phase {
            Phase::Orphaned(_) | Phase::Vacant if state.waiters == 0 => {
                match mem::replace(&mut state.phase, Phase::Running) {
                    Phase::Orphaned(work) => Leave::Abandoned(Some(work)),
                    _ => Leave::Abandoned(None),
                }
            }
            Phase::Orphaned(_) if kind == WaitKind::Async && state.async_waiters == 0 => {
                // The blocking followers were deferring to async ones; there
                // are none left, so one of them must take the work.
                drop(state);
                self.event.notify(usize::MAX);
                Leave::Stay
            }
            _ => Leave::Stay,
        }
    }
}

impl<T, E> FlightState<T, E> {
    fn remove(&mut self, kind: WaitKind) {
        self.waiters -= 1;
        if kind == WaitKind::Async {
            self.async_waiters -= 1;
        }
    }
}
