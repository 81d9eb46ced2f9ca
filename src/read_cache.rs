//! Readers that don't queue: each reader thread answers repeated reads of a
//! hot key (`current`, `epoch`, and calls a stored value answers, such as a
//! token request) from its own slot, without the map lock.
//!
//! A lock shared by readers makes them slower together than alone: every
//! acquisition writes the lock's cache line, which then bounces between
//! cores, whether the lock is a mutex or a read-write lock. Here a reader
//! touches only its own slot (its own line) and reads [`ReadCache::version`],
//! which writers change only when the map changes.
//!
//! # Invariants
//!
//! - `version` changes, under the map lock, whenever a key's stored value
//!   changes or a flight starts or stops being a key's flight. It is read
//!   under the map lock when a slot is filled.
//! - A slot's entry is the map's answer for its key as of the version it
//!   records; it is used only while that version is still current. A
//!   reader that sees the current version knows nothing changed since: its
//!   answer is what the map would say at that instant.
//! - Slots are filled on a thread's second miss for the same key in a row
//!   (or when its own key went stale), so scrambled reads clone nothing
//!   extra; `forget` empties the slots that hold its key's value.
//! - A slot and the map are never locked together: a reader looks at its
//!   slot, and on a miss reads the map, then fills the slot once the map is
//!   unlocked, only if the version is still the one it read under the map
//!   lock. `forget` changes the version before it empties the slots, so a
//!   value it removed is never put back by a fill racing it. A value
//!   replaced in a slot is dropped after the slot is unlocked (I8).

use std::borrow::Borrow;

use crate::epoch::Stamped;
use crate::hashed::Hashed;
use crate::sync::{AtomicU64, Mutex, Ordering, read_slots, reader_number};

pub(crate) struct ReadCache<K, T> {
    version: AtomicU64,
    slots: Slots<K, T>,
}

/// A slot on a cache line of its own (two lines: adjacent-line prefetchers
/// pair them).
#[repr(align(128))]
struct Padded<X>(X);

struct Slot<K, T> {
    entry: Option<Cached<K, T>>,
    /// The hash of this thread's last miss: a second miss in a row fills.
    last_miss: u32,
}

/// What the map said about a key.
pub(crate) struct Cached<K, T> {
    version: u64,
    key: Hashed<K>,
    /// Its stored value.
    pub(crate) value: Option<Stamped<T>>,
    /// Whether it has a flight in progress.
    pub(crate) in_flight: bool,
}

/// A read the slot could not answer.
pub(crate) struct Miss {
    /// The key's hash.
    pub(crate) hash: u32,
    /// Whether to fill the slot with the map's answer.
    pub(crate) fill: bool,
}

impl<K, T> ReadCache<K, T> {
    pub(crate) fn new() -> Self {
        Self {
            version: AtomicU64::new(0),
            slots: Slots::new(),
        }
    }

    /// The map changed; call under the map lock.
    pub(crate) fn changed(&self) {
        // Writers are serialised by the map lock: no read-modify-write.
        let version = self.version.load(Ordering::Relaxed);
        self.version
            .store(version.wrapping_add(1), Ordering::Release);
    }

    /// The version an entry made now records; call under the map lock.
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Answers from this thread's slot if it holds `key` at the current
    /// version (`answer` runs under the slot's lock); else records the miss.
    /// `hash` is called only on a miss.
    #[inline(always)]
    pub(crate) fn read<Q, R>(
        &self,
        key: &Q,
        hash: impl FnOnce() -> u32,
        answer: impl FnOnce(&Cached<K, T>) -> R,
    ) -> Result<R, Miss>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let mut slot = self.slots.mine().lock();
        if let Some(entry) = &slot.entry {
            let current = entry.version == self.version.load(Ordering::Acquire);
            if current && entry.key.key.borrow() == key {
                return Ok(answer(entry));
            }
        }
        Err(missed(&mut slot, hash))
    }

    /// Fills this thread's slot with what the map said about `key` at
    /// `version`, unless the map changed since: a `forget` in between bumped
    /// the version before it emptied the slots, so a value it removed is not
    /// put back here.
    pub(crate) fn fill(
        &self,
        version: u64,
        key: Hashed<K>,
        value: Option<Stamped<T>>,
        in_flight: bool,
    ) {
        let entry = Cached {
            version,
            key,
            value,
            in_flight,
        };
        let mut slot = self.slots.mine().lock();
        let replaced = if self.version.load(Ordering::Acquire) == version {
            slot.entry.replace(entry)
        } else {
            Some(entry)
        };
        drop(slot);
        drop(replaced);
    }

    /// Empties the slots that hold a key with `hash` (after `forget`: a
    /// forgotten value, a token say, is not kept in a reader's slot).
    pub(crate) fn forget(&self, hash: u32) {
        for slot in self.slots.allocated() {
            let mut slot = slot.0.lock();
            let holds = slot.entry.as_ref().is_some_and(|e| e.key.hash == hash);
            let removed = if holds { slot.entry.take() } else { None };
            drop(slot);
            drop(removed);
        }
    }
}

/// Records a miss in `slot` (out of line: the hit is the path to keep short;
/// not `#[cold]`, since scrambled readers miss on every read).
#[inline(never)]
fn missed<K, T>(slot: &mut Slot<K, T>, hash: impl FnOnce() -> u32) -> Miss {
    let hash = hash();
    let same_key = slot.entry.as_ref().is_some_and(|e| e.key.hash == hash);
    let fill = same_key || slot.last_miss == hash;
    slot.last_miss = hash;
    Miss { hash, fill }
}

/// One slot per reader number (modulo).
type SlotArray<K, T> = Box<[Padded<Mutex<Slot<K, T>>>]>;

/// The slots, allocated on first use: a `SingleFlight` nobody reads from
/// costs none.
#[cfg(not(loom))]
struct Slots<K, T>(std::sync::OnceLock<SlotArray<K, T>>);

/// Under loom, allocated at once (loom cannot see `OnceLock`'s blocking).
#[cfg(loom)]
struct Slots<K, T>(SlotArray<K, T>);

impl<K, T> Slots<K, T> {
    fn make() -> SlotArray<K, T> {
        (0..read_slots())
            .map(|_| {
                Padded(Mutex::new(Slot {
                    entry: None,
                    last_miss: 0,
                }))
            })
            .collect()
    }

    #[cfg(not(loom))]
    fn new() -> Self {
        Self(std::sync::OnceLock::new())
    }

    #[cfg(loom)]
    fn new() -> Self {
        Self(Self::make())
    }

    #[cfg(not(loom))]
    fn all(&self) -> &[Padded<Mutex<Slot<K, T>>>] {
        self.0.get_or_init(Self::make)
    }

    #[cfg(loom)]
    fn all(&self) -> &[Padded<Mutex<Slot<K, T>>>] {
        &self.0
    }

    #[cfg(not(loom))]
    fn allocated(&self) -> &[Padded<Mutex<Slot<K, T>>>] {
        self.0.get().map_or(&[], |slots| slots)
    }

    #[cfg(loom)]
    fn allocated(&self) -> &[Padded<Mutex<Slot<K, T>>>] {
        &self.0
    }

    /// This thread's slot.
    #[inline]
    fn mine(&self) -> &Mutex<Slot<K, T>> {
        let all = self.all();
        // `read_slots` is a power of two.
        &all[reader_number() & (all.len() - 1)].0
    }
}
