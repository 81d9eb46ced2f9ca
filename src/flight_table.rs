//! The flights in progress: a slab. A key's entry in the map marks where
//! its flight is here.
//!
//! A flight keeps its place from the moment it is led until it leaves the
//! table (published or released), and only the party responsible for it
//! removes it (see `flight.rs`), so a [`FlightId`] held by its driver or its
//! followers stays valid for as long as they need it: finishing or giving up
//! a flight finds it without hashing or comparing keys.

use std::num::NonZeroU32;

use crate::flight::{Flight, FlightId};
use crate::hashed::Hashed;
use crate::sync::Arc;

pub(crate) struct FlightTable<K, T, E> {
    places: Vec<InFlight<K, T, E>>,
    free: Vec<FlightId>,
}

/// A flight in progress, or a free place (no key).
pub(crate) struct InFlight<K, T, E> {
    /// Its key: its value is stored under it, and a release finds the key's
    /// entry with its hash. `None` for a free place.
    key: Option<Hashed<K>>,
    /// Still its key's flight: `forget` and `set` cut it loose.
    pub(crate) attached: bool,
    /// The shared state, created by the first follower.
    pub(crate) shared: Option<Arc<Flight<T, E>>>,
}

/// A flight taken out of the table, to drop once unlocked.
pub(crate) struct Removed<K, T, E> {
    pub(crate) key: Hashed<K>,
    pub(crate) attached: bool,
    /// Kept only to be dropped once unlocked.
    pub(crate) shared: Option<Arc<Flight<T, E>>>,
}

/// A flight's place as a key's entry marks it: one more than its id.
#[inline]
pub(crate) fn mark(id: FlightId) -> NonZeroU32 {
    u32::try_from(id + 1)
        .ok()
        .and_then(NonZeroU32::new)
        .expect("fewer than 4 billion flights in progress")
}

/// The flight a key's entry marks.
#[inline]
pub(crate) fn marked(mark: NonZeroU32) -> FlightId {
    mark.get() as usize - 1
}

impl<K, T, E> InFlight<K, T, E> {
    pub(crate) fn key(&self) -> &Hashed<K> {
        self.key
            .as_ref()
            .expect("a flight in the table has its key")
    }
}

impl<K, T, E> FlightTable<K, T, E> {
    pub(crate) fn new() -> Self {
        Self {
            places: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Flights in progress, attached or cut loose.
    pub(crate) fn len(&self) -> usize {
        self.places.len() - self.free.len()
    }

    /// Flights in progress that were cut loose.
    pub(crate) fn cut_loose(&self) -> usize {
        let cut = |place: &&InFlight<K, T, E>| place.key.is_some() && !place.attached;
        self.places.iter().filter(cut).count()
    }

    /// The flight at `id`, which is in the table.
    #[inline]
    pub(crate) fn get(&self, id: FlightId) -> &InFlight<K, T, E> {
        let flight = &self.places[id];
        debug_assert!(
            flight.key.is_some(),
            "flight {id} left the table while still in use"
        );
        flight
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, id: FlightId) -> &mut InFlight<K, T, E> {
        let flight = &mut self.places[id];
        debug_assert!(
            flight.key.is_some(),
            "flight {id} left the table while still in use"
        );
        flight
    }

    /// Adds an attached flight for `key`. Its fields are written in place: a
    /// flight built aside and moved in costs a stall on the uncontended path.
    #[inline]
    pub(crate) fn lead(&mut self, key: Hashed<K>) -> FlightId {
        match self.free.pop() {
            Some(id) => {
                let place = &mut self.places[id];
                place.key = Some(key);
                place.attached = true;
                id
            }
            None => {
                self.places.push(InFlight {
                    key: Some(key),
                    attached: true,
                    shared: None,
                });
                self.places.len() - 1
            }
        }
    }

    /// Takes flight `id` out of the table; the caller drops it once unlocked.
    #[inline]
    pub(crate) fn remove(&mut self, id: FlightId) -> Removed<K, T, E> {
        let place = &mut self.places[id];
        let key = place.key.take().expect("a flight leaves the table once");
        let shared = place.shared.take();
        self.free.push(id);
        Removed {
            key,
            attached: place.attached,
            shared,
        }
    }
}
