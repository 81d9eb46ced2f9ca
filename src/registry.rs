//! The map protocol behind a `SingleFlight`: each key's stored value and
//! epoch, its flight in progress, and the one lock that guards them.
//!
//! Every operation is one short critical section of the map lock (two for a
//! flight: [`enter`](Registry::enter) and [`complete`](Registry::complete))
//! plus, where followers are involved, their flight's lock (order: map, then
//! flight; see `flight.rs` for the life of a flight). The user's hasher runs
//! before the lock is taken; under it run only `K`'s `Eq`, `Clone` and
//! `Drop` and `T::clone`/`E::clone` where documented, and every probe that
//! may run `K::eq` comes before the first change, so a key whose `Eq` panics
//! leaves the map as it was.
//!
//! Stored values and flights in progress live in two tables: the values
//! table is the big one (one entry per stored key: the key, its hash, the
//! value and its epoch) and is probed once per call; the flight table holds
//! only flights in progress and stays in cache.

use std::any::Any;
use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::mem;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::epoch::{Epoch, Stamp, Versioned};
use crate::flight::{self, Finished, Flight, FlightId, Unattended, WaitKind};
use crate::flight_table::FlightTable;
use crate::hashed::{BuildPassThrough, Hashed, Probe};
use crate::read_cache::{Entry, ReadCache};
use crate::spawner::Spawner;
use crate::sync::{Arc, Mutex, StdArc};
use crate::wakers::{Registration, WakeOnDrop};
use crate::work::Work;

/// A panic caught while publishing, re-raised in the caller it belongs to.
pub(crate) type Panic = Box<dyn Any + Send>;

/// Below this many entries, a table keeps its capacity when emptied.
const KEEP_CAPACITY: usize = 1024;

pub(crate) struct Registry<K, T, E, S> {
    hasher: S,
    map: Mutex<Map<K, T, E>>,
    reads: ReadCache<K, T>,
    spawner: Option<Spawner<Orphan<K, T, E, S>>>,
}

/// What the map lock guards.
struct Map<K, T, E> {
    values: HashMap<Hashed<K>, Versioned<T>, BuildPassThrough>,
    flights: FlightTable<K, T, E>,
    /// The last epoch issued, for any key.
    last_epoch: u64,
}

/// Work whose callers all went away, on its way to the spawner. The task
/// takes the work out to drive it; if the task is dropped before it ran (an
/// executor shutting down), the drop gives the flight up: its joiners take
/// the work over, or the key is freed, and it is not spawned again.
pub(crate) struct Orphan<K, T, E, S> {
    pub(crate) registry: StdArc<Registry<K, T, E, S>>,
    pub(crate) id: FlightId,
    pub(crate) work: Option<Work<T, E>>,
}

impl<K, T, E, S> Drop for Orphan<K, T, E, S> {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            self.registry.give_up(self.id, Some(work), false);
        }
    }
}

/// What a caller wants when it registers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mode {
    /// Join the flight in progress or lead one (`run`).
    Run,
    /// Reuse a value newer than this epoch; else join or lead.
    RefreshIfCurrent(Epoch),
    /// Join the flight in progress; else reuse the stored value; else lead.
    Get,
}

impl Mode {
    /// The reuse rule: whether the key's stored value answers this call
    /// without any flight, given whether another flight is in progress.
    pub(crate) fn reuses<T>(self, stored: &Versioned<T>, in_flight: bool) -> bool {
        match self {
            Mode::Run => false,
            // Even while a flight runs: the caller's value is already stale.
            Mode::RefreshIfCurrent(seen) => stored.epoch > seen,
            // A flight in progress is newer than the stored value: join it.
            Mode::Get => !in_flight,
        }
    }
}

/// How a caller registered.
pub(crate) enum Entered<T, E> {
    /// The stored value answers its call.
    Reused(Versioned<T>),
    /// It leads a new flight.
    Lead(FlightId),
    /// It follows the flight in progress.
    Join(FlightId, Arc<Flight<T, E>>, WaitKind),
}

impl<K, T, E, S> Registry<K, T, E, S> {
    pub(crate) fn new(hasher: S) -> Self {
        Self {
            hasher,
            map: Mutex::new(Map {
                values: HashMap::default(),
                flights: FlightTable::new(),
                last_epoch: 0,
            }),
            reads: ReadCache::new(),
            spawner: None,
        }
    }

    pub(crate) fn set_spawner(&mut self, spawner: Spawner<Orphan<K, T, E, S>>) {
        self.spawner = Some(spawner);
    }

    /// The driver of flight `id` stops without a result: cancelled between
    /// two polls (`work` is `Some`), or panicked or never started (`None`).
    /// Heirs take it over; with none, the work finishes on the spawner if
    /// `may_spawn` (not for a driver already on it), else the flight is
    /// released.
    pub(crate) fn give_up(
        self: &StdArc<Self>,
        id: FlightId,
        work: Option<Work<T, E>>,
        may_spawn: bool,
    ) {
        let map = self.map.lock();
        let shared = map.flights.get(id).shared.clone();
        let handed = match &shared {
            Some(flight) => flight.hand_off(work),
            None => Err(Unattended {
                work,
                waits_for_itself: false,
            }),
        };
        drop(map);
        match handed {
            Ok(wake) => drop(wake),
            Err(unattended) => self.attend(id, unattended, may_spawn),
        }
    }

    /// A follower of flight `id` leaves without its result.
    pub(crate) fn leave(
        self: &StdArc<Self>,
        id: FlightId,
        flight: &Flight<T, E>,
        kind: WaitKind,
        registration: Registration,
    ) {
        let left = flight.leave(kind, registration);
        drop((left.waker, left.wake));
        if let Some(unattended) = left.unattended {
            // It was the last heir of a flight nobody drives.
            self.attend(id, unattended, true);
        }
    }

    /// Takes responsibility for flight `id`, which nobody drives and nobody
    /// can take over: spawn its work, or drop it and release the flight.
    fn attend(self: &StdArc<Self>, id: FlightId, unattended: Unattended<T, E>, may_spawn: bool) {
        let Unattended {
            work,
            waits_for_itself,
        } = unattended;
        match (work, &self.spawner) {
            (Some(work), Some(spawner)) if may_spawn && !waits_for_itself => {
                spawner.spawn(Orphan {
                    registry: self.clone(),
                    id,
                    work: Some(work),
                });
            }
            (work, _) => {
                // First the work's destructor, then the key is free (I5).
                drop(work);
                self.release(id);
            }
        }
    }

    /// Frees flight `id`, whose work (if any) was dropped: it leaves the
    /// table, or becomes vacant for heirs that joined meanwhile.
    pub(crate) fn release(&self, id: FlightId) {
        let mut map = self.map.lock();
        let flight = map.flights.get(id);
        let wake = flight.shared.as_ref().and_then(|shared| shared.vacate());
        let removed = if wake.is_none() {
            let removed = map.flights.remove(id);
            if removed.attached {
                self.reads.changed();
            }
            Some(removed)
        } else {
            None
        };
        drop(map);
        drop((wake, removed));
    }
}

impl<K, T, E, S> Registry<K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone,
    S: BuildHasher,
{
    /// Registers a caller: reuse, lead or join. Runs no user code but the
    /// hasher (before locking), `K::eq` and `T::clone`.
    pub(crate) fn enter(&self, key: K, mode: Mode, kind: WaitKind) -> Entered<T, E> {
        let may_reuse = mode != Mode::Run;
        let hash = self.hasher.hash_one(&key);
        let mut fill = false;
        if may_reuse {
            let cached = self.reads.read(
                &key,
                || hash,
                |entry| {
                    let stored = entry.value.as_ref()?;
                    mode.reuses(stored, entry.in_flight).then(|| stored.clone())
                },
            );
            match cached {
                Ok(Some(stored)) => return Entered::Reused(stored),
                Ok(None) => {}
                Err(miss) => fill = miss.fill,
            }
        }
        let key = Hashed { hash, key };
        let mut map = self.map.lock();
        let found = map.flights.find(hash, &key.key);
        let stored = if may_reuse {
            map.values.get(&key)
        } else {
            None
        };
        if let Some(stored) = stored.filter(|s| mode.reuses(s, found.is_some())) {
            let stored = stored.clone();
            let version = self.reads.version();
            drop(map);
            if fill {
                let entry = stored.clone();
                self.reads.fill(version, key, Some(entry), found.is_some());
            }
            return Entered::Reused(stored);
        }
        match found {
            Some(id) => {
                let kind = if flight::is_driving(self.address(), id) {
                    if kind == WaitKind::Blocking {
                        drop(map);
                        panic!(
                            "epochflight: a blocking call from inside a flight's work joined that \
                             same flight: it would wait for itself forever (work must not wait \
                             for its own key)"
                        );
                    }
                    WaitKind::Nested
                } else {
                    kind
                };
                let shared = &mut map.flights.get_mut(id).shared;
                let flight = shared.get_or_insert_with(|| Arc::new(Flight::new()));
                flight.join(kind);
                let flight = flight.clone();
                drop(map);
                Entered::Join(id, flight, kind)
            }
            None => {
                self.reads.changed();
                let id = map.flights.lead(key);
                drop(map);
                Entered::Lead(id)
            }
        }
    }

    /// The latest value for `key`, and whether it has a flight in progress.
    pub(crate) fn read<Q, R>(&self, key: &Q, answer: impl Fn(Option<&Versioned<T>>) -> R) -> R
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hasher = &self.hasher;
        let cached = self.reads.read(
            key,
            || hasher.hash_one(key),
            |entry: &Entry<K, T>| answer(entry.value.as_ref()),
        );
        let (hash, fill) = match cached {
            Ok(answer) => return answer,
            Err(miss) => (miss.hash, miss.fill),
        };
        let probe = Probe { hash, key };
        let map = self.map.lock();
        let stored = map.values.get_key_value(probe.as_lookup());
        let answered = answer(stored.map(|(_, value)| value));
        if fill {
            if let Some((stored_key, value)) = stored {
                let in_flight = map.flights.find(hash, key).is_some();
                let (key, value) = (stored_key.clone(), value.clone());
                let version = self.reads.version();
                drop(map);
                self.reads.fill(version, key, Some(value), in_flight);
            }
        }
        answered
    }

    /// Removes `key`'s stored value and cuts its flight loose (`forget`).
    pub(crate) fn take<Q>(&self, key: &Q) -> Option<Versioned<T>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hasher.hash_one(key);
        let probe = Probe { hash, key };
        let mut map = self.map.lock();
        let found = map.flights.find(hash, key);
        let removed = map.values.remove_entry(probe.as_lookup());
        if found.is_some() || removed.is_some() {
            self.reads.changed();
        }
        if let Some(id) = found {
            map.flights.cut_loose(id);
        }
        let values = &mut map.values;
        if values.capacity() > KEEP_CAPACITY && values.len() * 4 < values.capacity() {
            // Memory returns as keys are forgotten (amortised: the table
            // halves only after it emptied to a quarter).
            values.shrink_to(values.len() * 2);
        }
        drop(map);
        if removed.is_some() {
            self.reads.forget(hash);
        }
        removed.map(|(_, value)| value)
    }

    /// Stores `value` for `key` with a new epoch and cuts its flight loose
    /// (`set`); returns the epoch and the replaced value.
    pub(crate) fn replace(&self, key: K, value: T) -> (Epoch, Option<Versioned<T>>) {
        let key = Hashed {
            hash: self.hasher.hash_one(&key),
            key,
        };
        let mut map = self.map.lock();
        let Map {
            values,
            flights,
            last_epoch,
        } = &mut *map;
        let found = flights.find(key.hash, &key.key);
        *last_epoch += 1;
        let epoch = Epoch::from(Stamp::issued(*last_epoch));
        let stored = Versioned { value, epoch };
        let replaced = match values.get_mut(&key) {
            Some(slot) => Some(mem::replace(slot, stored)),
            None => {
                values.insert(key, stored);
                None
            }
        };
        if let Some(id) = found {
            flights.cut_loose(id);
        }
        self.reads.changed();
        drop(map);
        (epoch, replaced)
    }

    /// Whether `key` has a flight in progress, and how many follow it.
    pub(crate) fn flight_of<Q>(&self, key: &Q) -> Option<usize>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hasher.hash_one(key);
        let map = self.map.lock();
        let id = map.flights.find(hash, key)?;
        let shared = map.flights.get(id).shared.clone();
        drop(map);
        Some(shared.map_or(0, |flight| flight.followers()))
    }
}

impl<K, T, E, S> Registry<K, T, E, S>
where
    K: Eq + Clone,
    T: Clone,
{
    /// Flight `id`'s driver finished with `result`: store it if the flight is
    /// still its key's and it is `Ok` (with a new epoch), publish it to the
    /// followers, and take the flight out of the table.
    ///
    /// A panicking `T::clone` or `E::clone` reaches only the driver's caller
    /// (`Err(panic)`, once everything is published): see [`Copies`].
    pub(crate) fn complete(
        &self,
        id: FlightId,
        result: Result<T, E>,
    ) -> Result<Finished<T, E>, Panic>
    where
        E: Clone,
    {
        let mut copies = Copies::new(result);
        let mut map = self.map.lock();
        let Map {
            values,
            flights,
            last_epoch,
        } = &mut *map;
        let flight = flights.get(id);
        let store = flight.attached && copies.succeeded();
        // Probed before anything changes: a `K::eq` that panics leaves the
        // flight as it was, and the driver's drop hands it on.
        let stored_at = if store {
            values.get_mut(&flight.key)
        } else {
            None
        };
        *last_epoch += 1;
        let stamp = Stamp::issued(*last_epoch);
        let stored = store.then(|| Versioned {
            value: copies.take_for_store(),
            epoch: Epoch::from(stamp),
        });
        let published = flight
            .shared
            .is_some()
            .then(|| copies.take_for_followers(stored.as_ref().map(|s| &s.value)));
        let mut replaced = None;
        if let Some(stored) = stored {
            self.reads.changed();
            match stored_at {
                Some(slot) => replaced = Some(mem::replace(slot, stored)),
                // A new key: the flight's copy of it goes into the table.
                None => drop(values.insert(flight.key.clone(), stored)),
            }
        }
        let shared = flights.get(id).shared.clone();
        let (wake, removed) = match (shared, published) {
            // Both copies panicked and the original is stored: the heirs
            // take the flight over as after a panic, and find the stored
            // value (see `SingleFlight`'s `# Panics`).
            (Some(shared), Some(None)) => match shared.hand_off(None) {
                Ok(wake) => (wake, None),
                Err(_) => (WakeOnDrop::default(), Some(flights.remove(id))),
            },
            (shared, published) => {
                let wake = match (shared, published) {
                    (Some(shared), Some(Some(result))) => {
                        shared.publish(result.map(|value| (value, stamp)))
                    }
                    _ => WakeOnDrop::default(),
                };
                (wake, Some(flights.remove(id)))
            }
        };
        if removed.as_ref().is_some_and(|flight| flight.attached) {
            self.reads.changed();
        }
        drop(map);
        drop(wake);
        // The replaced value's drop is user code that may panic: caught, so
        // that the driver marks itself finished before the panic goes on.
        let dropped = catch_unwind(AssertUnwindSafe(|| drop((removed, replaced))));
        let returned = copies.into_own();
        match dropped {
            Ok(()) => returned.map(|result| result.map(|value| (value, stamp))),
            Err(panic) => Err(panic),
        }
    }

    /// For a follower promoted after a panic: the stored value its own call
    /// would reuse now (a `set` may have stored one since it joined; I3).
    pub(crate) fn reusable(&self, id: FlightId, mode: Mode) -> Option<Versioned<T>> {
        let map = self.map.lock();
        let key = &map.flights.get(id).key;
        let stored = map.values.get(key)?;
        // The vacancy is this caller's: no other flight is in progress.
        mode.reuses(stored, false).then(|| stored.clone())
    }

    /// Returns spare memory: the tables shrink to what they hold.
    pub(crate) fn shrink_to_fit(&self) {
        let mut map = self.map.lock();
        map.values.shrink_to_fit();
        map.flights.shrink_to_fit();
    }

    /// Keys holding a value or a flight in progress.
    pub(crate) fn len(&self) -> usize {
        let map = self.map.lock();
        let without_value = map
            .flights
            .attached()
            .filter(|f| !map.values.contains_key(&f.key));
        map.values.len() + without_value.count()
    }
}

impl<K, T, E, S> Registry<K, T, E, S> {
    /// Identifies this map to [`flight::is_driving`].
    pub(crate) fn address(&self) -> usize {
        self as *const Self as usize
    }

    pub(crate) fn has_spawner(&self) -> bool {
        self.spawner.is_some()
    }
}

impl<K, T, E, S> fmt::Debug for Registry<K, T, E, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self.map.lock();
        let attached = map.flights.attached().count();
        f.debug_struct("SingleFlight")
            .field("stored_values", &map.values.len())
            .field("in_flight", &attached)
            .field("cut_loose_in_flight", &(map.flights.len() - attached))
            .field("last_epoch", &Epoch(map.last_epoch))
            .field("spawner", &self.spawner.is_some())
            .finish()
    }
}

fn try_clone<V: Clone>(value: &V) -> Result<V, Panic> {
    catch_unwind(AssertUnwindSafe(|| value.clone()))
}

/// A finished flight's result and the copies made of it, handed out in
/// order of importance: the stored value (without it, the next caller runs
/// the work again: for a token, it presents a rotated refresh token twice),
/// then the followers' copy, then the driver's own. A copy whose clone
/// panicked is replaced by the original, and the panic goes to the driver's
/// caller, whose clone it was: nobody else sees it.
struct Copies<T, E> {
    original: Option<Result<T, E>>,
    /// The copy to store, made before locking: a flight still attached that
    /// succeeded (the common case) needs it.
    spare: Option<Result<T, Panic>>,
    panic: Option<Panic>,
}

impl<T: Clone, E: Clone> Copies<T, E> {
    fn new(result: Result<T, E>) -> Self {
        let spare = result.as_ref().ok().map(try_clone);
        Self {
            original: Some(result),
            spare,
            panic: None,
        }
    }

    fn succeeded(&self) -> bool {
        self.spare.is_some()
    }

    /// The value to store; the result succeeded.
    fn take_for_store(&mut self) -> T {
        match self.spare.take() {
            Some(Ok(copy)) => copy,
            Some(Err(panic)) => {
                self.panic.get_or_insert(panic);
                match self.original.take() {
                    Some(Ok(value)) => value,
                    _ => unreachable!("the original is taken only after a panic"),
                }
            }
            None => unreachable!("only a success is stored"),
        }
    }

    /// The followers' copy: of the original, or of `stored` if the original
    /// was stored. `None` if no copy could be made.
    fn take_for_followers(&mut self, stored: Option<&T>) -> Option<Result<T, E>> {
        let copy = match (&self.original, stored) {
            (Some(Ok(value)), _) => try_clone(value).map(Ok),
            (Some(Err(error)), _) => try_clone(error).map(Err),
            (None, Some(value)) => try_clone(value).map(Ok),
            (None, None) => return None,
        };
        match copy {
            Ok(copy) => Some(copy),
            Err(panic) => {
                self.panic.get_or_insert(panic);
                self.original.take()
            }
        }
    }

    /// The driver's own result, or the panic of a clone made for it.
    fn into_own(self) -> Result<Result<T, E>, Panic> {
        match (self.panic, self.original) {
            (None, Some(result)) => Ok(result),
            (Some(panic), _) => Err(panic),
            (None, None) => unreachable!("the original is taken only after a panic"),
        }
    }
}
