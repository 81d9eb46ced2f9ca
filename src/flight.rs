//! The state a flight's driver shares with its followers.
//!
//! A flight starts *solo*: the leader alone, no allocation beyond its boxed
//! work. The first follower turns it into a shared [`Flight`] (one `Arc`),
//! which is what followers wait on. Every transition happens under the
//! flight's own lock; whoever needs to unhook a flight from the map takes the
//! map lock first (lock order: map, then flight).
//!
//! Followers wait by leaving their waker in the flight's [`Wakers`], in the
//! same critical section in which they saw there was nothing to do yet; every
//! phase change wakes them all. A wake-up cannot be lost between the look and
//! the registration, and a follower costs no allocation of its own.

use std::mem;
use std::num::NonZeroU32;
use std::task::Waker;

use crate::epoch::Stamp;
use crate::sync::Mutex;
use crate::work::Work;

/// Identifies a flight within one `SingleFlight`, so a driver can tell whether
/// the map still holds *its* flight after a `forget` or `set`.
pub(crate) type FlightId = u64;

/// A completed flight's result as every caller sees it.
pub(crate) type Finished<T, E> = Result<(T, Stamp), E>;

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
    state: Mutex<FlightState<T, E>>,
}

struct FlightState<T, E> {
    phase: Phase<T, E>,
    /// Followers registered and not yet resolved (dropped ones are removed).
    waiters: usize,
    /// How many of `waiters` are async.
    async_waiters: usize,
    wakers: Wakers,
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
    /// Nothing yet: its waker is registered.
    Wait,
    /// The flight finished.
    Done(Finished<T, E>),
    /// Continue polling this orphaned work; this follower is the driver now.
    Adopt(Work<T, E>),
    /// Run your own closure; this follower is the driver now.
    Promote,
}

/// What a departing follower leaves behind, to drop once unlocked.
pub(crate) struct Leave<T, E> {
    /// Its waker.
    pub(crate) waker: Option<Waker>,
    /// Followers to wake.
    pub(crate) wake: WakeOnDrop,
    /// `Some` if it was the last follower of a flight nobody drives: the
    /// caller must unhook the flight from the map and drop this work.
    pub(crate) abandoned: Option<Option<Work<T, E>>>,
}

/// A follower's place in [`Wakers`]: valid only in the round it was taken.
///
/// Two words (the index is stored plus one, so `None` costs no tag): it
/// lives in every follower's future, which callers move and spawn.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Registration(Option<(u64, NonZeroU32)>);

impl Registration {
    fn new(round: u64, index: usize) -> Self {
        let stored = u32::try_from(index + 1)
            .ok()
            .and_then(NonZeroU32::new)
            .expect("a flight has fewer than 4 billion followers waiting");
        Registration(Some((round, stored)))
    }

    /// The round and slot index, if registered.
    fn get(self) -> Option<(u64, usize)> {
        self.0
            .map(|(round, stored)| (round, stored.get() as usize - 1))
    }
}

/// The wakers of the followers waiting for the next phase change: a slab, so
/// a follower that comes and goes during a long flight reuses a slot.
#[derive(Default)]
struct Wakers {
    slots: Vec<WakerSlot>,
    free: Option<usize>,
    /// Counts wake-ups; registrations from an earlier round are void.
    round: u64,
}

enum WakerSlot {
    Taken(Waker),
    Free(Option<usize>),
}

impl Wakers {
    /// Leaves `waker` to be woken by the next phase change. Returns a waker
    /// it replaced, to be dropped once unlocked.
    fn register(&mut self, waker: &Waker, at: &mut Registration) -> Option<Waker> {
        if let Some((round, index)) = at.get() {
            if round == self.round {
                if let WakerSlot::Taken(old) = &mut self.slots[index] {
                    if old.will_wake(waker) {
                        return None;
                    }
                    return Some(mem::replace(old, waker.clone()));
                }
            }
        }
        let slot = WakerSlot::Taken(waker.clone());
        let index = match self.free {
            Some(index) => {
                let WakerSlot::Free(next) = mem::replace(&mut self.slots[index], slot) else {
                    unreachable!("the free list holds free slots only");
                };
                self.free = next;
                index
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        *at = Registration::new(self.round, index);
        None
    }

    fn unregister(&mut self, at: Registration) -> Option<Waker> {
        let (round, index) = at.get()?;
        if round != self.round {
            return None;
        }
        match mem::replace(&mut self.slots[index], WakerSlot::Free(self.free)) {
            WakerSlot::Taken(waker) => {
                self.free = Some(index);
                Some(waker)
            }
            free => {
                self.slots[index] = free;
                None
            }
        }
    }

    /// Takes every waker, to be woken once unlocked, and starts a new round.
    fn take(&mut self) -> WakeOnDrop {
        self.free = None;
        self.round += 1;
        WakeOnDrop(mem::take(&mut self.slots))
    }
}

/// Wakers taken from a flight, woken when this is dropped: after the lock
/// that guarded them is released, since waking runs executor code.
#[must_use = "dropping it wakes the followers: drop it once unlocked"]
#[derive(Default)]
pub(crate) struct WakeOnDrop(Vec<WakerSlot>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        for slot in self.0.drain(..) {
            if let WakerSlot::Taken(waker) = slot {
                waker.wake();
            }
        }
    }
}

impl<T, E> Flight<T, E> {
    pub(crate) fn new(id: FlightId) -> Self {
        Self {
            id,
            state: Mutex::new(FlightState {
                phase: Phase::Running,
                waiters: 0,
                async_waiters: 0,
                wakers: Wakers::default(),
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

    /// A follower's look at the flight. Claims orphaned work or a vacancy for
    /// the caller, or registers `waker` for the next phase change.
    pub(crate) fn step(&self, kind: WaitKind, waker: &Waker, at: &mut Registration) -> Step<T, E>
    where
        T: Clone,
        E: Clone,
    {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let step = match &state.phase {
            // T::clone / E::clone under the flight lock: documented; it keeps
            // `SingleFlight` free of `T: Sync` bounds.
            Phase::Done(result) => return Step::Done(result.clone()),
            Phase::Running => Step::Wait,
            // Leave it to an async follower, which can poll it on its own
            // runtime. If they all leave, `leave` wakes us again.
            Phase::Orphaned(_) if kind == WaitKind::Blocking && state.async_waiters > 0 => {
                Step::Wait
            }
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
                // This follower drives the flight now: no longer a waiter.
                state.remove(kind);
                state.wakers.unregister(*at)
            }
        };
        drop(guard);
        drop(replaced);
        step
    }

    /// The driver finished: publish the result to every follower.
    pub(crate) fn complete(&self, result: Finished<T, E>) {
        let mut state = self.state.lock();
        let replaced = mem::replace(&mut state.phase, Phase::Done(result));
        let wake = state.wakers.take();
        drop(state);
        // Running is all a finished driver can replace; drop it unlocked anyway.
        drop((replaced, wake));
    }

    /// The driver gives up without a result: cancelled (`work` is `Some`, to
    /// be continued) or panicked (`None`, a follower must start over).
    ///
    /// The caller holds the map lock, and wakes the followers (drops the
    /// returned [`WakeOnDrop`]) once it released it. Returns the work back
    /// when no follower is left: the caller then unhooks the flight and drops
    /// the work.
    pub(crate) fn hand_off(
        &self,
        work: Option<Work<T, E>>,
    ) -> Result<WakeOnDrop, Option<Work<T, E>>> {
        let mut state = self.state.lock();
        if state.waiters == 0 {
            return Err(work);
        }
        state.phase = match work {
            Some(work) => Phase::Orphaned(work),
            None => Phase::Vacant,
        };
        // Every follower looks; the first eligible one claims the flight and
        // the rest go back to waiting. Rare path, so simplicity wins.
        Ok(state.wakers.take())
    }

    /// A follower leaves without a result (its future was dropped). The
    /// caller holds the map lock, and drops the returned [`Leave`] once it
    /// released it.
    pub(crate) fn leave(&self, kind: WaitKind, at: Registration) -> Leave<T, E> {
        let mut state = self.state.lock();
        if matches!(state.phase, Phase::Done(_)) {
            return Leave {
                waker: None,
                wake: WakeOnDrop::default(),
                abandoned: None,
            };
        }
        state.remove(kind);
        let waker = state.wakers.unregister(at);
        let mut abandoned = None;
        let mut wake = WakeOnDrop::default();
        match &state.phase {
            Phase::Orphaned(_) | Phase::Vacant if state.waiters == 0 => {
                abandoned = match mem::replace(&mut state.phase, Phase::Running) {
                    Phase::Orphaned(work) => Some(Some(work)),
                    _ => Some(None),
                };
            }
            Phase::Orphaned(_) if kind == WaitKind::Async && state.async_waiters == 0 => {
                // The blocking followers were deferring to async ones; there
                // are none left, so one of them must take the work.
                wake = state.wakers.take();
            }
            _ => {}
        }
        drop(state);
        Leave {
            waker,
            wake,
            abandoned,
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
