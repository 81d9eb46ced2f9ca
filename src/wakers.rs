//! The wakers of a flight's followers: a slab under the flight's lock.
//!
//! A follower leaves its waker here in the same critical section in which it
//! saw there was nothing to do yet, so a wake-up cannot be lost between the
//! look and the registration. Every phase change takes them all and wakes
//! them once the lock is released; a follower costs no allocation of its own,
//! and one that comes and goes during a long flight reuses a slot.

use std::mem;
use std::num::NonZeroU32;
use std::task::Waker;

/// A follower's place in [`Wakers`]: valid only in the round it was taken.
///
/// One word: it lives in every follower's future, which callers move and
/// spawn. The index is stored plus one, so `None` costs no tag.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Registration(Option<(u32, NonZeroU32)>);

impl Registration {
    fn new(round: u32, index: usize) -> Self {
        let stored = u32::try_from(index + 1)
            .ok()
            .and_then(NonZeroU32::new)
            .expect("a flight has fewer than 4 billion followers waiting");
        Registration(Some((round, stored)))
    }

    /// The round and slot index, if registered.
    fn get(self) -> Option<(u32, usize)> {
        self.0
            .map(|(round, stored)| (round, stored.get() as usize - 1))
    }
}

#[derive(Default)]
pub(crate) struct Wakers {
    slots: Vec<Slot>,
    free: Option<usize>,
    /// Counts wake-ups; registrations from an earlier round are void. It
    /// wraps: a follower would have to sleep through 2³² phase changes of
    /// one flight to be confused by it.
    round: u32,
}

enum Slot {
    Taken(Waker),
    Free(Option<usize>),
}

impl Wakers {
    /// Leaves `waker` to be woken by the next [`take`](Self::take). Returns
    /// a waker it replaced, to be dropped once unlocked.
    pub(crate) fn register(&mut self, waker: &Waker, at: &mut Registration) -> Option<Waker> {
        if let Some((round, index)) = at.get() {
            if round == self.round {
                if let Slot::Taken(old) = &mut self.slots[index] {
                    if old.will_wake(waker) {
                        return None;
                    }
                    return Some(mem::replace(old, waker.clone()));
                }
            }
        }
        let slot = Slot::Taken(waker.clone());
        let index = match self.free {
            Some(index) => {
                let Slot::Free(next) = mem::replace(&mut self.slots[index], slot) else {
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

    /// Removes a registration of this round; returns its waker, to be
    /// dropped once unlocked.
    pub(crate) fn unregister(&mut self, at: Registration) -> Option<Waker> {
        let (round, index) = at.get()?;
        if round != self.round {
            return None;
        }
        match mem::replace(&mut self.slots[index], Slot::Free(self.free)) {
            Slot::Taken(waker) => {
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
    pub(crate) fn take(&mut self) -> WakeOnDrop {
        self.free = None;
        self.round = self.round.wrapping_add(1);
        WakeOnDrop(mem::take(&mut self.slots))
    }
}

/// Wakers taken from a flight, woken when this is dropped: after the lock
/// that guarded them is released, since waking runs executor code.
#[must_use = "dropping it wakes the followers: drop it once unlocked"]
#[derive(Default)]
pub(crate) struct WakeOnDrop(Vec<Slot>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        for slot in self.0.drain(..) {
            if let Slot::Taken(waker) = slot {
                waker.wake();
            }
        }
    }
}
