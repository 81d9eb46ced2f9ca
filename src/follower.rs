//! A caller that follows a flight another caller leads. A drop guard:
//! dropped before it resolves, it withdraws (DESIGN I2), and if it was the
//! last heir of a flight nobody drives, its drop takes that flight on (see
//! `flight.rs`).

use std::task::{Context, Poll};

use crate::driver::Driver;
use crate::epoch::Stamped;
use crate::flight::{Finished, Flight, FlightId, Step, WaitKind};
use crate::registry::{Mode, Registry};
use crate::sync::{Arc, StdArc};
use crate::wakers::Registration;

pub(crate) struct Follower<'a, K, T, E, S> {
    registry: &'a StdArc<Registry<K, T, E, S>>,
    id: FlightId,
    flight: Arc<Flight<T, E>>,
    kind: WaitKind,
    /// What the caller asked for, checked again if it is promoted.
    mode: Mode,
    registration: Registration,
    /// It got its result, or took the flight over: nothing to withdraw.
    resolved: bool,
}

/// Where a follower's look at its flight leads.
pub(crate) enum Followed<'a, K, T, E, S> {
    /// The flight's result.
    Done(Finished<T, E>),
    /// It was promoted, but a stored value answers its call now.
    Reused(Stamped<T>),
    /// It drives the flight now: the work handed on, or its own closure.
    Drive(Driver<'a, K, T, E, S>),
}

impl<'a, K, T, E, S> Follower<'a, K, T, E, S> {
    pub(crate) fn new(
        registry: &'a StdArc<Registry<K, T, E, S>>,
        id: FlightId,
        flight: Arc<Flight<T, E>>,
        kind: WaitKind,
        mode: Mode,
    ) -> Self {
        Self {
            registry,
            id,
            flight,
            kind,
            mode,
            registration: Registration::default(),
            resolved: false,
        }
    }
}

impl<'a, K, T, E, S> Follower<'a, K, T, E, S>
where
    K: Eq + Clone,
    T: Clone,
    E: Clone,
{
    /// Looks at the flight; `Pending` with the waker registered if there is
    /// nothing to do yet.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Followed<'a, K, T, E, S>> {
        assert!(!self.resolved, "a resolved follower looked again");
        let step = self
            .flight
            .step(self.kind, cx.waker(), &mut self.registration);
        Poll::Ready(match step {
            Step::Wait => return Poll::Pending,
            Step::Done(result) => {
                self.resolved = true;
                Followed::Done(result)
            }
            Step::Adopt(work) => {
                self.resolved = true;
                Followed::Drive(Driver::adopting(self.registry, self.id, work))
            }
            Step::Promote => {
                self.resolved = true;
                let driver = Driver::leading(self.registry, self.id);
                match self.registry.reusable(self.id, self.mode) {
                    // Running now would refresh a value newer than the one
                    // this caller saw. Pass the vacancy on (dropping the
                    // unstarted driver does) and reuse the value.
                    Some(stored) => Followed::Reused(stored),
                    None => Followed::Drive(driver),
                }
            }
        })
    }
}

impl<K, T, E, S> Drop for Follower<'_, K, T, E, S> {
    fn drop(&mut self) {
        if !self.resolved {
            self.registry
                .leave(self.id, &self.flight, self.kind, self.registration);
        }
    }
}
