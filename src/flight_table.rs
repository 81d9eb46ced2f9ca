//! The flights in progress: a slab. A key's entry in the map marks where
//! its flight is here.
//!
//! A flight keeps its place from the moment it is led until it leaves the
//! table (published or released), and only the party responsible for it
//! removes it (see `flight.rs`), so a [`FlightId`] held by its driver or its
//! followers stays valid for as long as they need it: finishing or giving up
//! a flight finds it without hashing or comparing keys.

use std::mem;
use std::num::NonZeroU32;

use crate::flight::{Flight, FlightId};
use crate::hashed::Hashed;
use crate::sync::Arc;

pub(crate) struct FlightTable<K, T, E> {
    places: Vec<Place<K, T, E>>,
    /// The first free place; free places link to the next.
    free: Option<FlightId>,
    len: usize,
}

enum Place<K, T, E> {
    Taken(InFlight<K, T, E>),
    Free(Option<FlightId>),
}

/// A flight in progress.
pub(crate) struct InFlight<K, T, E> {
    /// Its key: its value is stored under it, and a release finds the key's
    /// entry with it.
    pub(crate) key: Hashed<K>,
    /// Still its key's flight: `forget` and `set` cut it loose.
    pub(crate) attached: bool,
    /// The shared state, created by the first follower.
    pub(crate) shared: Option<Arc<Flight<T, E>>>,
}

/// A flight's place as a key's entry marks it: one more than its id.
pub(crate) fn mark(id: FlightId) -> NonZeroU32 {
    u32::try_from(id + 1)
        .ok()
        .and_then(NonZeroU32::new)
        .expect("fewer than 4 billion flights in progress")
}

/// The flight a key's entry marks.
pub(crate) fn marked(mark: NonZeroU32) -> FlightId {
    mark.get() as usize - 1
}

impl<K, T, E> FlightTable<K, T, E> {
    pub(crate) fn new() -> Self {
        Self {
            places: Vec::new(),
            free: None,
            len: 0,
        }
    }

    /// Flights in progress, attached or cut loose.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Flights in progress that were cut loose.
    pub(crate) fn cut_loose(&self) -> usize {
        let cut = |place: &Place<K, T, E>| matches!(place, Place::Taken(f) if !f.attached);
        self.places.iter().filter(|place| cut(place)).count()
    }

    /// The flight at `id`, which is in the table.
    pub(crate) fn get(&self, id: FlightId) -> &InFlight<K, T, E> {
        match &self.places[id] {
            Place::Taken(flight) => flight,
            Place::Free(_) => unreachable!("flight {id} left the table while still in use"),
        }
    }

    pub(crate) fn get_mut(&mut self, id: FlightId) -> &mut InFlight<K, T, E> {
        match &mut self.places[id] {
            Place::Taken(flight) => flight,
            Place::Free(_) => unreachable!("flight {id} left the table while still in use"),
        }
    }

    /// Adds an attached flight for `key`.
    pub(crate) fn lead(&mut self, key: Hashed<K>) -> FlightId {
        let flight = Place::Taken(InFlight {
            key,
            attached: true,
            shared: None,
        });
        self.len += 1;
        match self.free {
            Some(id) => {
                let Place::Free(next) = mem::replace(&mut self.places[id], flight) else {
                    unreachable!("the free list holds free places only");
                };
                self.free = next;
                id
            }
            None => {
                self.places.push(flight);
                self.places.len() - 1
            }
        }
    }

    /// Takes flight `id` out of the table; the caller drops it once unlocked.
    pub(crate) fn remove(&mut self, id: FlightId) -> InFlight<K, T, E> {
        let Place::Taken(flight) = mem::replace(&mut self.places[id], Place::Free(self.free))
        else {
            unreachable!("flight {id} removed twice");
        };
        self.free = Some(id);
        self.len -= 1;
        flight
    }
}
