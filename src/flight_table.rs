//! The flights in progress, as the map holds them: a slab, plus an index
//! from a key's hash to its attached flight.
//!
//! A flight keeps its place from the moment it is led until it leaves the
//! table (published or released), and only the party responsible for it
//! removes it (see `flight.rs`), so a [`FlightId`] held by its driver or its
//! followers stays valid for as long as they need it: no key is hashed or
//! compared to find one's own flight again, which is why finishing or giving
//! up a flight runs no user code.
//!
//! The table is small (it holds flights in progress, not stored values) and
//! stays in cache; the index is keyed by the precomputed hash, with the rare
//! flights whose keys share a 64-bit hash chained behind the first.

use std::borrow::Borrow;
use std::collections::HashMap;

use crate::flight::{Flight, FlightId};
use crate::hashed::{BuildPassThrough, Hashed};
use crate::sync::Arc;

pub(crate) struct FlightTable<K, T, E> {
    places: Vec<Place<K, T, E>>,
    /// The first free place; free places link to the next.
    free: Option<FlightId>,
    /// The first attached flight of each hash.
    index: HashMap<u64, FlightId, BuildPassThrough>,
    /// Flights in the table.
    len: usize,
}

enum Place<K, T, E> {
    Taken(InFlight<K, T, E>),
    Free(Option<FlightId>),
}

/// A flight in progress.
pub(crate) struct InFlight<K, T, E> {
    /// Its key: the leader's, moved in (joiners compare with it; its value
    /// is stored under it).
    pub(crate) key: Hashed<K>,
    /// Still its key's flight: `forget` and `set` cut it loose.
    pub(crate) attached: bool,
    /// The shared state, created by the first follower.
    pub(crate) shared: Option<Arc<Flight<T, E>>>,
    /// The next attached flight whose key has the same hash.
    next: Option<FlightId>,
}

impl<K, T, E> FlightTable<K, T, E> {
    pub(crate) fn new() -> Self {
        Self {
            places: Vec::new(),
            free: None,
            index: HashMap::default(),
            len: 0,
        }
    }

    /// Flights in progress, attached or cut loose.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Flights in progress that are their key's.
    pub(crate) fn attached(&self) -> impl Iterator<Item = &InFlight<K, T, E>> {
        self.places.iter().filter_map(|place| match place {
            Place::Taken(flight) if flight.attached => Some(flight),
            _ => None,
        })
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

    /// The attached flight for `key` (which hashes to `hash`). Runs `K::eq`
    /// only on flights whose key has the same hash.
    pub(crate) fn find<Q>(&self, hash: u64, key: &Q) -> Option<FlightId>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let mut at = self.index.get(&hash).copied();
        while let Some(id) = at {
            let flight = self.get(id);
            if flight.key.key.borrow() == key {
                return Some(id);
            }
            at = flight.next;
        }
        None
    }

    /// Adds the flight for `key`, which has none attached.
    pub(crate) fn lead(&mut self, key: Hashed<K>) -> FlightId {
        let next = self.index.get(&key.hash).copied();
        let hash = key.hash;
        let flight = Place::Taken(InFlight {
            key,
            attached: true,
            shared: None,
            next,
        });
        let id = match self.free {
            Some(id) => {
                let Place::Free(next_free) = std::mem::replace(&mut self.places[id], flight) else {
                    unreachable!("the free list holds free places only");
                };
                self.free = next_free;
                id
            }
            None => {
                self.places.push(flight);
                self.places.len() - 1
            }
        };
        self.index.insert(hash, id);
        self.len += 1;
        id
    }

    /// Unlinks flight `id` from its key: it runs on, but is no longer found.
    pub(crate) fn cut_loose(&mut self, id: FlightId) {
        if !self.get(id).attached {
            return;
        }
        let InFlight { key, next, .. } = self.get(id);
        let (hash, next) = (key.hash, *next);
        match self.index.get(&hash).copied() {
            Some(first) if first == id => match next {
                Some(next) => self.index.insert(hash, next),
                None => self.index.remove(&hash),
            },
            first => {
                // A 64-bit hash collision: unlink from the middle of a chain.
                let mut at = first;
                while let Some(previous) = at {
                    let flight = self.get_mut(previous);
                    if flight.next == Some(id) {
                        flight.next = next;
                        break;
                    }
                    at = flight.next;
                }
                None
            }
        };
        let flight = self.get_mut(id);
        flight.attached = false;
        flight.next = None;
    }

    /// Takes flight `id` out of the table; the caller drops it once unlocked.
    pub(crate) fn remove(&mut self, id: FlightId) -> InFlight<K, T, E> {
        self.cut_loose(id);
        let Place::Taken(flight) = std::mem::replace(&mut self.places[id], Place::Free(self.free))
        else {
            unreachable!("flight {id} removed twice");
        };
        self.free = Some(id);
        self.len -= 1;
        flight
    }

    /// Returns the index's spare memory. The slab keeps its places, as many
    /// as the most flights ever in progress at once (they may be in use).
    pub(crate) fn shrink_to_fit(&mut self) {
        self.index.shrink_to_fit();
    }
}
