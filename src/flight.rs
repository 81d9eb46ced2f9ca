//! The life of a flight: one execution of user work for a key, from the
//! caller that starts it to the result every follower gets.
//!
//! # States
//!
//! A flight lives in the map's flight table
//! ([`FlightTable`](crate::flight_table::FlightTable)) from the moment a caller
//! leads it until its result is published or it is released. It is
//! *attached* while it is its key's flight (new callers join it, its result is
//! stored); `forget` and `set` *cut it loose* (it runs on for its own callers,
//! its result is not stored). Followers wait on its shared state, [`Flight`],
//! which the first follower creates (a flight nobody joins allocates only its
//! boxed work).
//!
//! At every moment exactly one party is **responsible** for a live flight: its
//! driver (the caller polling the work, or a task on the spawner), or, while
//! the phase is `Orphaned` or `Vacant`, its heirs (the first to look takes it
//! over; the last to leave inherits the responsibility).
//!
//! | state | meaning | held as | next | made by |
//! |---|---|---|---|---|
//! | solo | a leader drives; nobody joined | a table entry with no shared state; the work in the leader's future | running | [`Registry::enter`](crate::registry::Registry::enter) (a follower joins: [`Flight::join`]) |
//! | running | a driver polls the work; followers wait | [`Phase::Running`]; the work in the driver | done, orphaned, vacant, detached, released | |
//! | done | the result is published; the flight left the table; if attached and `Ok`, the value was stored with a new epoch | [`Phase::Done`] (for the followers still to look) | — | [`Registry::complete`](crate::registry::Registry::complete), [`Flight::publish`] |
//! | orphaned (handed on after a cancel) | the driver was dropped between two polls while heirs wait; the first heir to look continues the same work (`Role::Joined`) | [`Phase::Orphaned`], holding the work | running | [`Registry::give_up`](crate::registry::Registry::give_up), [`Flight::hand_off`]; taken by [`Flight::step`] |
//! | vacant (after a panic) | the driver panicked, or stopped before it made its work, while heirs wait; the first heir to look runs its own closure (`Role::Led`), or passes the vacancy on if a stored value now answers its call | [`Phase::Vacant`] | running | the same |
//! | detached (finishing on the spawner) | the driver stopped between two polls and nobody waits: with a spawner set, a task finishes the work and stores its result; new callers join it | [`Phase::Running`]; the work in a [`Detached`](crate::registry::Detached), then in the task's driver | done, orphaned, vacant, released | [`Registry::give_up`](crate::registry::Registry::give_up) (spawned with no lock held) |
//! | released | nobody is responsible and nobody waits: the work, if any, is dropped **first**, then the flight leaves the table and its key is free; a caller that joined while the work was being dropped finds it vacant | no longer anywhere | — | `Registry::release` |
//! | cut loose | `forget` or `set` unlinked it from its key; any of the above continues, but its result is not stored | the table entry's `attached` is false; the key's entry no longer marks it | as before | [`Registry::take`](crate::registry::Registry::take), [`Registry::replace`](crate::registry::Registry::replace) |
//!
//! **When the leader is cancelled** (its future dropped between two polls):
//! if heirs wait, the work is handed to them as it is, never restarted
//! (DESIGN I5; async heirs are preferred, I9); if none waits and a spawner is
//! set, the work finishes on the spawner and its result is stored; otherwise
//! the work is dropped and then the key is freed. The same holds when the
//! last heir of an orphaned flight leaves, and when a follower that took the
//! work over is cancelled. A driver on the spawner that is dropped unfinished
//! (its executor shutting down) hands on or is released, never respawned.
//! **When the work panics**, it is dropped by the unwinding before anything
//! else happens, and the flight becomes vacant or is released (I6).
//!
//! A follower that joins its key's flight from inside that flight's own work
//! (on the thread polling it) is *nested*: it can never take that work over
//! (it is part of it), so it is not an heir, and work with a nested follower
//! is not spawned (it waits for itself): when its driver goes, it is dropped
//! and the key freed, which also drops the nested follower. A blocking nested
//! join would wait for itself forever and panics instead; an async one that
//! is awaited waits forever, as in Go (documented on `SingleFlight`).
//!
//! # Locks
//!
//! Two kinds: the map lock (one per `SingleFlight`, in `registry.rs`) and one
//! lock per shared [`Flight`]. Order: map, then flight. Followers look at
//! their flight with the flight lock alone. No user code runs under either,
//! except `T::clone`/`E::clone` of a published result (each follower's own
//! copy) and `K`'s `Eq`/`Clone`/`Drop` under the map lock.

use std::cell::Cell;
use std::mem;
use std::task::Waker;

use crate::epoch::Stamp;
use crate::sync::{Mutex, thread_local};
use crate::wakers::{Registration, WakeOnDrop, Wakers};
use crate::work::Work;

/// Where a flight is in the map's flight table, while it is there.
pub(crate) type FlightId = usize;

/// A finished flight's result as every caller sees it.
pub(crate) type Finished<T, E> = Result<(T, Stamp), E>;

/// How a follower waits, which decides whether and when it may take its
/// flight over.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum WaitKind {
    /// An async caller: preferred heir of orphaned work, which it polls on
    /// its own executor.
    Async,
    /// A blocking caller: inherits orphaned work only when no async heir is
    /// left (it would poll the work on its own thread, DESIGN I9).
    Blocking,
    /// A caller made inside the flight's own work: never an heir.
    Nested,
}

/// The state a flight's driver shares with its followers.
pub(crate) struct Flight<T, E> {
    state: Mutex<State<T, E>>,
}

struct State<T, E> {
    phase: Phase<T, E>,
    /// Followers registered and not yet resolved, by how they wait.
    async_heirs: usize,
    blocking_heirs: usize,
    nested: usize,
    wakers: Wakers,
}

enum Phase<T, E> {
    /// A driver polls the work (or is about to release the flight).
    Running,
    /// Handed on after a cancel: the first heir to look continues it.
    Orphaned(Work<T, E>),
    /// After a panic (or a driver that made no work): the first heir to look
    /// runs its own closure.
    Vacant,
    /// The result, cloned by each follower.
    Done(Finished<T, E>),
}

/// What a follower does after looking at its flight.
pub(crate) enum Step<T, E> {
    /// Nothing yet: its waker is registered.
    Wait,
    /// The flight finished.
    Done(Finished<T, E>),
    /// Continue this work, handed on by a cancelled driver.
    Adopt(Work<T, E>),
    /// Run your own closure: the flight is vacant.
    Promote,
}

/// A flight with nobody left to take it over: whoever holds this is
/// responsible for the flight.
pub(crate) struct Unattended<T, E> {
    /// Its work, if it has started.
    pub(crate) work: Option<Work<T, E>>,
    /// Whether a nested follower waits inside that work: it waits for its
    /// own flight and can never finish, so it is not worth spawning.
    pub(crate) waits_for_itself: bool,
}

/// What a departing follower leaves behind, to use once unlocked.
pub(crate) struct Left<T, E> {
    /// Its waker, to drop.
    pub(crate) waker: Option<Waker>,
    /// Followers to wake (blocking heirs, when the last async heir of
    /// orphaned work left).
    pub(crate) wake: WakeOnDrop,
    /// Set if it was the last heir of a flight nobody drives.
    pub(crate) unattended: Option<Unattended<T, E>>,
}

impl<T, E> Flight<T, E> {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                phase: Phase::Running,
                async_heirs: 0,
                blocking_heirs: 0,
                nested: 0,
                wakers: Wakers::default(),
            }),
        }
    }

    /// Registers a follower. The caller holds the map lock, so the flight is
    /// still in the table and its phase cannot be finished concurrently.
    pub(crate) fn join(&self, kind: WaitKind) {
        *self.state.lock().count(kind) += 1;
    }

    /// Followers registered and unresolved.
    pub(crate) fn followers(&self) -> usize {
        let state = self.state.lock();
        state.async_heirs + state.blocking_heirs + state.nested
    }

    /// A follower's look at the flight: the result, work or a vacancy to
    /// take over, or nothing yet (then `waker` is registered).
    pub(crate) fn step(&self, kind: WaitKind, waker: &Waker, at: &mut Registration) -> Step<T, E>
    where
        T: Clone,
        E: Clone,
    {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let step = match &state.phase {
            // Each follower's own copy: a panicking clone reaches only it.
            Phase::Done(result) => return Step::Done(result.clone()),
            Phase::Running => Step::Wait,
            Phase::Orphaned(_) | Phase::Vacant if kind == WaitKind::Nested => Step::Wait,
            // Left to an async heir, which polls it on its own executor. If
            // they all leave, `leave` wakes the blocking ones again.
            Phase::Orphaned(_) if kind == WaitKind::Blocking && state.async_heirs > 0 => Step::Wait,
            Phase::Orphaned(_) => match mem::replace(&mut state.phase, Phase::Running) {
                Phase::Orphaned(work) => Step::Adopt(work),
                _ => unreachable!("phase checked above"),
            },
            Phase::Vacant => {
                state.phase = Phase::Running;
                Step::Promote
            }
        };
        let replaced = match step {
            Step::Wait => state.wakers.register(waker, at),
            _ => {
                // This follower drives the flight now: no longer a follower.
                *state.count(kind) -= 1;
                state.wakers.unregister(*at)
            }
        };
        drop(guard);
        drop(replaced);
        step
    }

    /// The driver finished: publish the result to every follower. Returns
    /// the followers to wake once unlocked.
    pub(crate) fn publish(&self, result: Finished<T, E>) -> WakeOnDrop {
        let mut state = self.state.lock();
        // Running is all a finished driver can replace: nothing to drop.
        state.phase = Phase::Done(result);
        state.wakers.take()
    }

    /// The driver stops without a result: cancelled between two polls (`work`
    /// is `Some`, to be continued) or panicked / never started (`None`, an
    /// heir must start over). With heirs waiting, they get it, and the
    /// returned wakers (to wake once unlocked) tell them; with none, the
    /// caller stays responsible for the flight.
    pub(crate) fn hand_off(
        &self,
        work: Option<Work<T, E>>,
    ) -> Result<WakeOnDrop, Unattended<T, E>> {
        let mut state = self.state.lock();
        if state.heirs() == 0 {
            let waits_for_itself = state.nested > 0;
            return Err(Unattended {
                work,
                waits_for_itself,
            });
        }
        state.phase = match work {
            Some(work) => Phase::Orphaned(work),
            None => Phase::Vacant,
        };
        // Every follower looks; the first eligible one takes the flight and
        // the rest go back to waiting. Rare path, so simplicity wins.
        Ok(state.wakers.take())
    }

    /// The party releasing the flight dropped its work; heirs that joined
    /// meanwhile find it vacant (the returned wakers tell them). `None` if
    /// nobody waits: the flight can leave the table.
    pub(crate) fn vacate(&self) -> Option<WakeOnDrop> {
        let mut state = self.state.lock();
        if state.heirs() == 0 {
            return None;
        }
        state.phase = Phase::Vacant;
        Some(state.wakers.take())
    }

    /// A follower leaves without a result (its future was dropped).
    pub(crate) fn leave(&self, kind: WaitKind, at: Registration) -> Left<T, E> {
        let mut state = self.state.lock();
        let mut left = Left {
            waker: None,
            wake: WakeOnDrop::default(),
            unattended: None,
        };
        if matches!(state.phase, Phase::Done(_)) {
            return left;
        }
        *state.count(kind) -= 1;
        left.waker = state.wakers.unregister(at);
        match &state.phase {
            Phase::Orphaned(_) | Phase::Vacant if state.heirs() == 0 => {
                let work = match mem::replace(&mut state.phase, Phase::Running) {
                    Phase::Orphaned(work) => Some(work),
                    _ => None,
                };
                left.unattended = Some(Unattended {
                    work,
                    waits_for_itself: state.nested > 0,
                });
            }
            Phase::Orphaned(_) if kind == WaitKind::Async && state.async_heirs == 0 => {
                // The blocking heirs were deferring to async ones; there are
                // none left, so one of them must take the work.
                left.wake = state.wakers.take();
            }
            _ => {}
        }
        left
    }
}

impl<T, E> State<T, E> {
    fn count(&mut self, kind: WaitKind) -> &mut usize {
        match kind {
            WaitKind::Async => &mut self.async_heirs,
            WaitKind::Blocking => &mut self.blocking_heirs,
            WaitKind::Nested => &mut self.nested,
        }
    }

    fn heirs(&self) -> usize {
        self.async_heirs + self.blocking_heirs
    }
}

// The flight this thread is polling the work of: the address of its map and
// its id (`(0, 0)`: none). Read and written on every poll of a work, so
// const-initialised (one plain load); loom's `thread_local!` takes no const.
#[cfg(not(loom))]
thread_local!(static DRIVING: Cell<(usize, FlightId)> = const { Cell::new((0, 0)) });
#[cfg(loom)]
thread_local!(static DRIVING: Cell<(usize, FlightId)> = Cell::new((0, 0)));

/// Runs `poll` (a poll of flight `id`'s work, in the map at address `map`)
/// marked as driving it, so that a call made inside on the same key is known
/// to be nested (see the states above).
#[inline]
pub(crate) fn driving<R>(map: usize, id: FlightId, poll: impl FnOnce() -> R) -> R {
    struct Restore((usize, FlightId));
    impl Drop for Restore {
        #[inline]
        fn drop(&mut self) {
            DRIVING.with(|driving| driving.set(self.0));
        }
    }
    let _outer = Restore(DRIVING.with(|driving| driving.replace((map, id))));
    poll()
}

/// Whether this thread is polling the work of flight `id` in the map at
/// address `map`.
#[inline]
pub(crate) fn is_driving(map: usize, id: FlightId) -> bool {
    DRIVING.with(|driving| driving.get() == (map, id))
}
