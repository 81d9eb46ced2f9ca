//! The map protocol behind a `SingleFlight`: each key's stored value and
//! epoch, its flight in progress, and the one lock that guards them.
//!
//! Every operation is one short critical section of the map lock (two for a
//! flight: [`enter`](Registry::enter) and [`complete`](Registry::complete))
//! plus, where followers are involved, their flight's lock (order: map, then
//! flight; see `flight.rs` for the life of a flight). The user's hasher runs
//! before the lock is taken. Under it run only `K`'s `Eq`, `Clone` and
//! `Drop` and `T::clone`/`E::clone`, where documented; every probe that may
//! run `K::eq` comes before the first change, so a key whose `Eq` panics
//! leaves the map as it was; and finishing or giving up a flight finds its
//! key's entry by the flight's mark, running no user code at all (it may
//! happen in a drop, during a panic).
//!
//! A `T` copied or taken out under the lock lives in a local declared
//! *before* the guard: if a later clone under the lock panics, unwinding
//! drops the guard first, so no `T::drop` runs locked (I8).
//!
//! The map is a set of [`Entry`]s, one per key that has a stored value or a
//! flight in progress: the key's hash, the mark of its flight, the key, and
//! the value with its epoch (32 bytes for a `u64` key and value). One probe
//! per call finds and changes it; the flights in progress themselves live in
//! a small table (`flight_table.rs`) that the mark points into.

use std::any::Any;
use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use crate::epoch::{Epoch, Stamp, Stamped, Versioned};
use crate::flight::{self, Finished, Flight, FlightId, Unattended, WaitKind};
use crate::flight_table::{FlightTable, Removed, mark, marked};
use crate::hashed::{BuildPassThrough, ByMark, Entry, Hashed, Probe, fold, lookup};
use crate::read_cache::{Cached, ReadCache};
use crate::spawner::Spawner;
use crate::sync::{Arc, Mutex, MutexGuard, StdArc};
use crate::wakers::Registration;
use crate::work::Work;

/// A panic caught while publishing, re-raised in the caller it belongs to.
pub(crate) type Panic = Box<dyn Any + Send>;

/// Below this many entries, the map keeps its capacity as keys go.
const KEEP_CAPACITY: usize = 1024;

pub(crate) struct Registry<K, T, E, S> {
    hasher: S,
    map: Mutex<Map<K, T, E>>,
    reads: ReadCache<K, T>,
    spawner: Option<Spawner<Detached<K, T, E, S>>>,
}

/// What the map lock guards.
struct Map<K, T, E> {
    /// Invariant: an attached flight's key has an entry that marks it, and
    /// an entry has a value or a mark.
    entries: HashSet<Entry<K, T>, BuildPassThrough>,
    flights: FlightTable<K, T, E>,
    /// The last epoch issued, for any key.
    last_epoch: u64,
    /// Takes a released flight's mark off its key's entry. `release` runs
    /// where `K: Eq` is not known (a caller's drop), so `enter`, which knows
    /// it, leaves the function here when it starts a flight.
    unmark: Option<Unmark<K, T, E>>,
}

type Unmark<K, T, E> = fn(&mut Map<K, T, E>, FlightId);

impl<K, T, E> Map<K, T, E> {
    fn next_stamp(&mut self) -> Stamp {
        self.last_epoch += 1;
        Stamp::issued(self.last_epoch)
    }
}

/// The entry that marks flight `id`, whose key hashes to `hash`: found by
/// mark, running no user code.
fn entry_marking<K: Eq, T>(
    entries: &HashSet<Entry<K, T>, BuildPassThrough>,
    hash: u32,
    id: FlightId,
) -> &Entry<K, T> {
    let probe = ByMark {
        hash,
        flight: mark(id),
    };
    let entry = entries.get(lookup::<K, _>(&probe));
    entry.expect("an attached flight's key has an entry that marks it")
}

/// Takes flight `id`'s mark off its key's entry, and the entry out of the
/// map if it holds no value.
fn unmark_entry<K: Eq, T>(
    entries: &mut HashSet<Entry<K, T>, BuildPassThrough>,
    hash: u32,
    id: FlightId,
) {
    let entry = entry_marking(entries, hash, id);
    if entry.value(|value| value.is_some()) {
        entry.flight.set(None);
    } else {
        let probe = ByMark {
            hash,
            flight: mark(id),
        };
        entries.remove(lookup::<K, _>(&probe));
    }
}

/// [`unmark_entry`] for a flight still in the table (what `release` calls).
fn unmark<K: Eq, T, E>(map: &mut Map<K, T, E>, id: FlightId) {
    let hash = map.flights.get(id).key().hash;
    unmark_entry(&mut map.entries, hash, id);
}

/// Work whose callers all went away, on its way to the spawner. The task
/// takes the work out to drive it; if the task is dropped before it ran (an
/// executor shutting down), the drop gives the flight up: its joiners take
/// the work over, or the key is freed, and it is not spawned again.
pub(crate) struct Detached<K, T, E, S> {
    pub(crate) registry: StdArc<Registry<K, T, E, S>>,
    pub(crate) id: FlightId,
    pub(crate) work: Option<Work<T, E>>,
}

impl<K, T, E, S> Drop for Detached<K, T, E, S> {
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
    pub(crate) fn reuses<T>(self, stored: &Stamped<T>, in_flight: bool) -> bool {
        match self {
            Mode::Run => false,
            // Even while a flight runs: the caller's value is already stale.
            Mode::RefreshIfCurrent(seen) => Epoch::from(stored.stamp) > seen,
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
                entries: HashSet::default(),
                flights: FlightTable::new(),
                last_epoch: 0,
                unmark: None,
            }),
            reads: ReadCache::new(),
            spawner: None,
        }
    }

    pub(crate) fn set_spawner(&mut self, spawner: Spawner<Detached<K, T, E, S>>) {
        self.spawner = Some(spawner);
    }

    pub(crate) fn has_spawner(&self) -> bool {
        self.spawner.is_some()
    }

    /// Identifies this map to [`flight::is_driving`].
    pub(crate) fn address(&self) -> usize {
        self as *const Self as usize
    }

    /// Keys holding a value or a flight in progress.
    pub(crate) fn len(&self) -> usize {
        self.map.lock().entries.len()
    }

    /// The driver of flight `id` stops without a result: cancelled between
    /// two polls (`work` is `Some`), or panicked or never started (`None`).
    /// Heirs take it over; with none, the work finishes on the spawner if
    /// `may_spawn` (not for a driver already on it), else the flight is
    /// released. Runs no user code but the spawner and the work's drop, and
    /// those with no lock held.
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
            Err(unattended) => self.spawn_or_release(id, unattended, may_spawn),
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
            self.spawn_or_release(id, unattended, true);
        }
    }

    /// Takes responsibility for flight `id`, which nobody drives and nobody
    /// can take over: spawn its work, or drop it and release the flight.
    fn spawn_or_release(
        self: &StdArc<Self>,
        id: FlightId,
        unattended: Unattended<T, E>,
        may_spawn: bool,
    ) {
        let Unattended {
            work,
            waits_for_itself,
        } = unattended;
        match (work, &self.spawner) {
            (Some(work), Some(spawner)) if may_spawn && !waits_for_itself => {
                spawner.spawn(Detached {
                    registry: self.clone(),
                    id,
                    work: Some(work),
                });
            }
            (work, _) => {
                // First the work's destructor, then the key is free (I5);
                // freed also if that destructor panics. The destructor runs
                // as the flight's work: a call it makes on the key is nested.
                let _release = ReleaseOnDrop(self, id);
                flight::driving(self.address(), id, || drop(work));
            }
        }
    }

    /// Frees flight `id`, whose work (if any) was dropped: it leaves the
    /// table, or becomes vacant for heirs that joined meanwhile. Runs no user
    /// code but the drops of the flight's leftovers, once unlocked.
    fn release(&self, id: FlightId) {
        let mut map = self.map.lock();
        let flight = map.flights.get(id);
        let wake = flight.shared.as_ref().and_then(|shared| shared.vacate());
        let removed = if wake.is_none() {
            if flight.attached {
                let unmark = map.unmark.expect("`enter` led this flight");
                unmark(&mut map, id);
                self.reads.changed();
            }
            Some(map.flights.remove(id))
        } else {
            None
        };
        drop(map);
        drop((wake, removed));
    }
}

/// Releases a flight when dropped: after its work's destructor, even one
/// that panics.
struct ReleaseOnDrop<'a, K, T, E, S>(&'a Registry<K, T, E, S>, FlightId);

impl<K, T, E, S> Drop for ReleaseOnDrop<'_, K, T, E, S> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

impl<K, T, E, S> Registry<K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone,
    S: BuildHasher,
{
    fn hash<Q: Hash + ?Sized>(&self, key: &Q) -> u32 {
        fold(self.hasher.hash_one(key))
    }

    /// Registers a caller: reuse, lead or join. Runs no user code but the
    /// hasher (before locking, and only if this thread's read slot does not
    /// answer), `K::eq`, `K::clone` (a new key) and `T::clone`. The read
    /// slot's answer is inline; the map's is not.
    #[inline(always)]
    pub(crate) fn enter(&self, key: K, mode: Mode, kind: WaitKind) -> Entered<T, E> {
        if mode == Mode::Run {
            return match self.enter_run(key, kind) {
                (id, None) => Entered::Lead(id),
                (id, Some(flight)) => {
                    let kind = self.join_kind(id, kind);
                    Entered::Join(id, flight, kind.expect("a blocking self-join panicked"))
                }
            };
        }
        let mut hashed = None;
        let cached = self.reads.read(
            &key,
            || *hashed.insert(self.hash(&key)),
            |cached| {
                let stored = cached.value.as_ref()?;
                mode.reuses(stored, cached.in_flight)
                    .then(|| stored.versioned())
            },
        );
        match cached {
            Ok(Some(stored)) => Entered::Reused(stored),
            Ok(None) => self.enter_map(key, mode, kind, hashed, false),
            Err(miss) => self.enter_map(key, mode, kind, Some(miss.hash), miss.fill),
        }
    }

    /// How a caller of `kind` joins flight `id`: as `Nested` if this thread
    /// is running that flight's work (the call comes from inside it); `None`
    /// if it would block waiting for itself. `enter` asks it twice for a
    /// `run` (see `enter_run`); being thread-local, the answer is the same.
    fn join_kind(&self, id: FlightId, kind: WaitKind) -> Option<WaitKind> {
        if !flight::is_driving(self.address(), id) {
            return Some(kind);
        }
        (kind != WaitKind::Blocking).then_some(WaitKind::Nested)
    }

    /// [`enter`](Self::enter) for a `run`: the flight it leads, or the one
    /// it joins. Sixteen bytes, returned in registers: an `Entered` returned
    /// through memory is read back with loads wider than its stores.
    #[inline(never)]
    fn enter_run(&self, key: K, kind: WaitKind) -> (FlightId, Option<Arc<Flight<T, E>>>) {
        match self.register(key, Mode::Run, kind, None, false) {
            Entered::Lead(id) => (id, None),
            Entered::Join(id, flight, _) => (id, Some(flight)),
            Entered::Reused(_) => unreachable!("`run` reuses no stored value"),
        }
    }

    /// [`enter`](Self::enter) through the map, for a call a stored value may
    /// answer: [`register`](Self::register), kept out of line.
    #[inline(never)]
    fn enter_map(
        &self,
        key: K,
        mode: Mode,
        kind: WaitKind,
        hashed: Option<u32>,
        fill: bool,
    ) -> Entered<T, E> {
        self.register(key, mode, kind, hashed, fill)
    }

    /// Registers a caller with the map (taking its lock): `hashed` is the
    /// key's hash if known; `fill` fills this thread's read slot with a
    /// reused value. Inline in `enter_run` and `enter_map`, each of which
    /// returns what it decides in its own shape.
    #[inline(always)]
    fn register(
        &self,
        key: K,
        mode: Mode,
        kind: WaitKind,
        hashed: Option<u32>,
        fill: bool,
    ) -> Entered<T, E> {
        let key = Hashed {
            hash: hashed.unwrap_or_else(|| self.hash(&key)),
            key,
        };
        // Before the guard (I8; see the module docs).
        let (mut reused, mut copy) = (None, None);
        let mut map = self.map.lock();
        let Map {
            entries,
            flights,
            unmark: unmark_fn,
            ..
        } = &mut *map;
        let entry = entries.get(lookup::<K, _>(&key));
        let flight = entry.and_then(|entry| entry.flight.get());
        if mode != Mode::Run {
            if let Some(entry) = entry {
                entry.value(|stored| {
                    let Some(stored) = stored.filter(|s| mode.reuses(s, flight.is_some())) else {
                        return;
                    };
                    reused = Some(stored.versioned());
                    if fill {
                        copy = Some(stored.clone());
                    }
                });
            }
            if let Some(reused) = reused.take() {
                let version = self.reads.version();
                drop(map);
                if let Some(copy) = copy.take() {
                    self.reads.fill(version, key, Some(copy), flight.is_some());
                }
                return Entered::Reused(reused);
            }
        }
        if let Some(flight) = flight {
            let id = marked(flight);
            let Some(kind) = self.join_kind(id, kind) else {
                drop(map);
                panic!(
                    "epochflight: a blocking call from inside a flight's work joined that \
                     same flight: it would wait for itself forever (work must not wait for \
                     its own key)"
                );
            };
            let shared = &mut flights.get_mut(id).shared;
            let shared = shared.get_or_insert_with(|| Arc::new(Flight::new()));
            shared.join(kind);
            let shared = shared.clone();
            drop(map);
            return Entered::Join(id, shared, kind);
        }
        self.reads.changed();
        unmark_fn.get_or_insert(unmark::<K, T, E>);
        let id = match entry {
            Some(entry) => {
                let id = flights.lead(key);
                entry.flight.set(Some(mark(id)));
                id
            }
            None => {
                let entry = Entry::new(key.clone(), None);
                let id = flights.lead(key);
                entry.flight.set(Some(mark(id)));
                entries.insert(entry);
                id
            }
        };
        drop(map);
        Entered::Lead(id)
    }

    /// The latest value for `key`: `answer` gets it, from this thread's read
    /// slot or from the map.
    pub(crate) fn read<Q, R>(&self, key: &Q, answer: impl Fn(Option<&Stamped<T>>) -> R) -> R
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let cached = self.reads.read(
            key,
            || self.hash(key),
            |cached: &Cached<K, T>| answer(cached.value.as_ref()),
        );
        let (hash, fill) = match cached {
            Ok(answer) => return answer,
            Err(miss) => (miss.hash, miss.fill),
        };
        let probe = Probe { hash, key };
        // Before the guard (I8; see the module docs).
        let (mut answered, mut copy) = (None, None);
        let map = self.map.lock();
        let Some(entry) = map.entries.get(lookup(&probe)) else {
            return answer(None);
        };
        entry.value(|stored| {
            answered = Some(answer(stored));
            if fill {
                copy = Some(stored.cloned());
            }
        });
        if let Some(copy) = copy.take() {
            let in_flight = entry.flight.get().is_some();
            let key = Hashed {
                hash,
                key: entry.key.clone(),
            };
            let version = self.reads.version();
            drop(map);
            self.reads.fill(version, key, copy, in_flight);
        }
        answered.expect("answered under the lock")
    }

    /// Removes `key`'s stored value and cuts its flight loose (`forget`).
    pub(crate) fn take<Q>(&self, key: &Q) -> Option<Versioned<T>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        let probe = Probe { hash, key };
        let mut map = self.map.lock();
        let Map {
            entries, flights, ..
        } = &mut *map;
        let removed = entries.take(lookup(&probe));
        if let Some(entry) = &removed {
            self.reads.changed();
            if let Some(flight) = entry.flight.get() {
                flights.get_mut(marked(flight)).attached = false;
            }
            if entries.capacity() > KEEP_CAPACITY && entries.len() * 4 < entries.capacity() {
                // Memory returns as keys are forgotten (amortised: the map
                // halves only after it emptied to a quarter).
                entries.shrink_to(entries.len() * 2);
            }
        }
        drop(map);
        let value = removed?.into_value();
        self.reads.forget(hash);
        value.map(Versioned::from)
    }

    /// Stores `value` for `key` with a new epoch and cuts its flight loose
    /// (`set`); returns the epoch and the replaced value.
    pub(crate) fn replace(&self, key: K, value: T) -> (Epoch, Option<Versioned<T>>) {
        let key = Hashed {
            hash: self.hash(&key),
            key,
        };
        let mut map = self.map.lock();
        let stamp = map.next_stamp();
        let Map {
            entries, flights, ..
        } = &mut *map;
        let stored = Some(Stamped { value, stamp });
        let replaced = match entries.get(lookup::<K, _>(&key)) {
            Some(entry) => {
                if let Some(flight) = entry.flight.take() {
                    flights.get_mut(marked(flight)).attached = false;
                }
                entry.replace_value(stored)
            }
            None => {
                entries.insert(Entry::new(key, stored));
                None
            }
        };
        self.reads.changed();
        drop(map);
        (stamp.into(), replaced.map(Versioned::from))
    }

    /// How many follow `key`'s flight in progress, if it has one.
    pub(crate) fn flight_of<Q>(&self, key: &Q) -> Option<usize>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let probe = Probe {
            hash: self.hash(key),
            key,
        };
        let map = self.map.lock();
        let entry = map.entries.get(lookup(&probe))?;
        let shared = map.flights.get(marked(entry.flight.get()?)).shared.clone();
        drop(map);
        Some(shared.map_or(0, |flight| flight.followers()))
    }
}

impl<K, T, E, S> Registry<K, T, E, S>
where
    K: Eq,
    T: Clone,
{
    /// Flight `id`'s driver finished with `result`: store it if the flight is
    /// still its key's and it is `Ok` (with a new epoch), publish it to the
    /// followers, take the flight out of the table, and return the driver's
    /// copy. The driver counts as finished from this call on: whatever
    /// happens, the flight is committed.
    ///
    /// User code runs only once the flight is committed, so that a panic in
    /// it reaches only the driver's caller: the clone of the driver's own copy
    /// (last, under the lock) and the drop of a replaced value (unlocked). The
    /// followers' copy is needed before: with followers, a panic in a clone is
    /// caught and handled by [`Copies`]. The key's entry is found by mark: no
    /// `K::eq`.
    pub(crate) fn complete(&self, id: FlightId, result: Result<T, E>) -> Finished<T, E>
    where
        E: Clone,
    {
        // Before the guard (I8; see the module docs).
        let mut replaced = None;
        let mut map = self.map.lock();
        let stamp = map.next_stamp();
        if map.flights.get(id).shared.is_some() {
            return self.complete_followed(map, id, stamp, result);
        }
        // Nobody follows: the original is stored, the driver's copy cloned last.
        // Taken apart at once: moved whole later, it would be read back with
        // loads wider than the stores that wrote it.
        let Removed {
            key,
            attached,
            shared,
        } = map.flights.remove(id);
        let hash = key.hash;
        let own = match result {
            Ok(value) if attached => {
                self.reads.changed();
                let entry = entry_marking(&map.entries, hash, id);
                entry.flight.set(None);
                replaced = entry.replace_value(Some(Stamped { value, stamp }));
                Ok(entry.value(|stored| stored.expect("just stored").value.clone()))
            }
            unstored => {
                if attached {
                    self.reads.changed();
                    unmark_entry(&mut map.entries, hash, id);
                }
                unstored
            }
        };
        drop(map);
        drop(replaced);
        drop(key);
        drop(shared);
        own.map(|value| (value, stamp))
    }

    /// [`complete`](Self::complete) for a flight with followers, whose copy of
    /// the result is made before anything changes.
    fn complete_followed(
        &self,
        mut map: MutexGuard<'_, Map<K, T, E>>,
        id: FlightId,
        stamp: Stamp,
        result: Result<T, E>,
    ) -> Finished<T, E>
    where
        E: Clone,
    {
        let mut copies = Copies::new(result);
        let flight = map.flights.get(id);
        let (attached, hash) = (flight.attached, flight.key().hash);
        let stored = (attached && copies.succeeded()).then(|| Stamped {
            value: copies.take_for_store(),
            stamp,
        });
        let published = copies.take_for_followers(stored.as_ref().map(|s| &s.value));
        let mut replaced = None;
        if attached {
            self.reads.changed();
            match stored {
                Some(stored) => {
                    let entry = entry_marking(&map.entries, hash, id);
                    entry.flight.set(None);
                    replaced = entry.replace_value(Some(stored));
                }
                None => unmark_entry(&mut map.entries, hash, id),
            }
        }
        let shared = map.flights.get(id).shared.clone().expect("followed");
        let (wake, removed) = match published {
            Some(result) => {
                let wake = shared.publish(result.map(|value| (value, stamp)));
                (Some(wake), Some(map.flights.remove(id)))
            }
            // Both copies panicked and the original is stored: the heirs
            // take the flight over as after a panic, and find the stored
            // value (see `SingleFlight`'s `# Panics`).
            None => match shared.hand_off(None) {
                Ok(wake) => (Some(wake), None),
                Err(_) => (None, Some(map.flights.remove(id))),
            },
        };
        drop(map);
        drop((wake, shared, removed, replaced));
        match copies.into_own() {
            Ok(own) => own.map(|value| (value, stamp)),
            // A clone made for this caller panicked; everyone else has what
            // they need.
            Err(panic) => resume_unwind(panic),
        }
    }

    /// For a follower promoted after a panic: the stored value its own call
    /// would reuse now (a `set` may have stored one since it joined; I3).
    pub(crate) fn reusable(&self, id: FlightId, mode: Mode) -> Option<Stamped<T>> {
        let map = self.map.lock();
        let key = map.flights.get(id).key();
        let entry = map.entries.get(lookup::<K, _>(key))?;
        // The vacancy is this caller's: no other flight is in progress.
        entry.value(|stored| stored.filter(|s| mode.reuses(s, false)).cloned())
    }

    /// Returns spare memory: the map shrinks to what it holds.
    pub(crate) fn shrink_to_fit(&self) {
        self.map.lock().entries.shrink_to_fit();
    }
}

impl<K, T, E, S> fmt::Debug for Registry<K, T, E, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self.map.lock();
        let cut_loose = map.flights.cut_loose();
        f.debug_struct("SingleFlight")
            .field("keys", &map.entries.len())
            .field("in_flight", &(map.flights.len() - cut_loose))
            .field("cut_loose_in_flight", &cut_loose)
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
