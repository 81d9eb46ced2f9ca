//! The map behind a `SingleFlight`: each key's [`Slot`] (its latest value and
//! its flight in progress), the flights cut loose by `forget` and `set`, and
//! the counters that issue epochs and flight ids. Guarded by one mutex.
//!
//! Slots live in a slab indexed by the key map. A driver remembers its slot's
//! index, so finishing a flight costs no second hash of the key; the flight
//! id, never reused, tells whether the slot still holds that flight.
//!
//! The slab holds each slot's key too, which makes a one-entry hint possible:
//! the slot found last is checked with `K::eq` before the key is hashed.
//! Callers of one hot key (a token, a config) then never hash it; a miss
//! costs one comparison.

use std::borrow::Borrow;
use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

use crate::epoch::{Epoch, Stamp, Versioned};
use crate::flight::{Flight, FlightId};
use crate::sync::Arc;

/// Where a key's slot is in the slab. Valid while the key stays in the map;
/// check the flight id before trusting it later.
pub(crate) type SlotId = usize;

pub(crate) struct Slots<K, T, E, S> {
    index: HashMap<K, SlotId, S>,
    /// Each slot with a copy of its key: `index[key] == at` exactly when
    /// `slab[at]` holds `key`.
    slab: Vec<Option<(K, Slot<T, E>)>>,
    /// The slot found last. Checked by comparing keys, so never stale:
    /// a removed or reused slot simply does not match.
    hint: Cell<SlotId>,
    /// Empty places in `slab`; it never holds more places than the peak
    /// number of live keys (DESIGN I7).
    free: Vec<SlotId>,
    /// Shared flights cut loose from their key by `forget` or `set`, kept
    /// until their driver finishes so that an original leader (which holds
    /// only the flight's id) can still find its followers.
    detached: HashMap<FlightId, Arc<Flight<T, E>>>,
    last_epoch: u64,
    last_flight: FlightId,
}

/// A key's entry. Never left empty: a slot with neither a value nor a flight
/// is removed.
pub(crate) struct Slot<T, E> {
    pub(crate) value: Option<Versioned<T>>,
    pub(crate) flight: Option<FlightRef<T, E>>,
}

/// A flight in progress, as the map holds it.
pub(crate) enum FlightRef<T, E> {
    /// Only the leader: no follower has needed a shared state yet.
    Solo(FlightId),
    /// Followers wait on this.
    Shared(Arc<Flight<T, E>>),
}

/// Where a driver's flight is, found again when it finishes or gives up.
pub(crate) struct Found<T, E> {
    /// Still its key's flight: its result may be stored.
    pub(crate) attached: bool,
    /// Its shared state, if followers ever joined.
    pub(crate) shared: Option<Arc<Flight<T, E>>>,
}

impl<T, E> FlightRef<T, E> {
    pub(crate) fn id(&self) -> FlightId {
        match self {
            FlightRef::Solo(id) => *id,
            FlightRef::Shared(flight) => flight.id,
        }
    }

    /// The shared state followers wait on, created by the first follower.
    pub(crate) fn share(&mut self) -> Arc<Flight<T, E>> {
        if let FlightRef::Solo(id) = *self {
            *self = FlightRef::Shared(Arc::new(Flight::new(id)));
        }
        match self {
            FlightRef::Shared(flight) => flight.clone(),
            FlightRef::Solo(_) => unreachable!("made shared above"),
        }
    }

    pub(crate) fn shared(&self) -> Option<&Arc<Flight<T, E>>> {
        match self {
            FlightRef::Solo(_) => None,
            FlightRef::Shared(flight) => Some(flight),
        }
    }

    fn into_shared(self) -> Option<Arc<Flight<T, E>>> {
        match self {
            FlightRef::Solo(_) => None,
            FlightRef::Shared(flight) => Some(flight),
        }
    }
}

impl<T, E> Slot<T, E> {
    fn holds_flight(&self, id: FlightId) -> bool {
        self.flight.as_ref().is_some_and(|f| f.id() == id)
    }
}

impl<K, T, E, S> Slots<K, T, E, S> {
    pub(crate) fn with_hasher(hasher: S) -> Self {
        Self {
            index: HashMap::with_hasher(hasher),
            slab: Vec::new(),
            hint: Cell::new(SlotId::MAX),
            free: Vec::new(),
            detached: HashMap::new(),
            last_epoch: 0,
            last_flight: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn in_flight(&self) -> usize {
        let slots = self.slab.iter().flatten();
        slots.filter(|(_, s)| s.flight.is_some()).count()
    }

    pub(crate) fn detached_len(&self) -> usize {
        self.detached.len()
    }

    pub(crate) fn last_epoch(&self) -> Epoch {
        Epoch(self.last_epoch)
    }

    /// A new epoch, greater than every epoch issued before, for any key.
    pub(crate) fn next_epoch(&mut self) -> Stamp {
        self.last_epoch += 1;
        Stamp::issued(self.last_epoch)
    }

    /// A new flight id, never issued before.
    pub(crate) fn next_flight(&mut self) -> FlightId {
        self.last_flight += 1;
        self.last_flight
    }

    pub(crate) fn at_mut(&mut self, at: SlotId) -> Option<&mut Slot<T, E>> {
        self.slab.get_mut(at)?.as_mut().map(|(_, slot)| slot)
    }

    fn at(&self, at: SlotId) -> Option<&Slot<T, E>> {
        self.slab.get(at)?.as_ref().map(|(_, slot)| slot)
    }
}

impl<K, T, E, S> Slots<K, T, E, S>
where
    K: Hash + Eq,
    S: BuildHasher,
{
    /// Where `key`'s slot is: the hinted slot if it holds `key`, else
    /// looked up by hash (and hinted for next time).
    fn find<Q>(&self, key: &Q) -> Option<SlotId>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hint = self.hint.get();
        if let Some(Some((hinted, _))) = self.slab.get(hint) {
            if hinted.borrow() == key {
                return Some(hint);
            }
        }
        let at = *self.index.get(key)?;
        self.hint.set(at);
        Some(at)
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&Slot<T, E>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.at(self.find(key)?)
    }

    pub(crate) fn get_mut<Q>(&mut self, key: &Q) -> Option<(SlotId, &mut Slot<T, E>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let at = self.find(key)?;
        Some((at, self.at_mut(at)?))
    }

    /// Adds a slot for `key`, which has none.
    pub(crate) fn insert(&mut self, key: K, slot: Slot<T, E>) -> SlotId
    where
        K: Clone,
    {
        let at = match self.free.pop() {
            Some(at) => at,
            None => {
                self.slab.push(None);
                self.slab.len() - 1
            }
        };
        self.index.insert(key.clone(), at);
        self.slab[at] = Some((key, slot));
        self.hint.set(at);
        at
    }

    /// Removes `key`'s slot; the caller drops it once unlocked.
    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<(K, Slot<T, E>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let at = self.index.remove(key)?;
        let slot = self.slab[at].take()?;
        self.free.push(at);
        Some(slot)
    }

    /// Removes the slot at `at` if it holds nothing any more. Its key is
    /// the slab's copy: a driver keeps no key of its own.
    pub(crate) fn prune(&mut self, at: SlotId) -> Option<(K, Slot<T, E>)> {
        let slot = self.at(at)?;
        if slot.value.is_some() || slot.flight.is_some() {
            return None;
        }
        let (key, slot) = self.slab[at].take()?;
        self.index.remove(&key);
        self.free.push(at);
        Some((key, slot))
    }

    /// Unhooks flight `id`, which started in slot `at`, from wherever the map
    /// holds it now.
    pub(crate) fn take_flight(&mut self, at: SlotId, id: FlightId) -> Found<T, E> {
        if let Some(slot) = self.at_mut(at).filter(|slot| slot.holds_flight(id)) {
            let shared = slot.flight.take().and_then(FlightRef::into_shared);
            return Found {
                attached: true,
                shared,
            };
        }
        Found {
            attached: false,
            shared: self.detached.remove(&id),
        }
    }

    /// The shared state of flight `id` (started in slot `at`), wherever the
    /// map holds it now.
    pub(crate) fn find_flight(&self, at: SlotId, id: FlightId) -> Option<Arc<Flight<T, E>>> {
        match self.at(at) {
            Some(slot) if slot.holds_flight(id) => slot.flight.as_ref()?.shared().cloned(),
            _ => self.detached.get(&id).cloned(),
        }
    }

    /// Keeps a flight taken out of its key's slot (by `forget` or `set`)
    /// until its driver finishes: its callers still get its result, which is
    /// not stored. A solo flight needs nothing kept: its leader finds it gone.
    pub(crate) fn keep_detached(&mut self, flight: Option<FlightRef<T, E>>) {
        if let Some(FlightRef::Shared(flight)) = flight {
            self.detached.insert(flight.id, flight);
        }
    }
}
