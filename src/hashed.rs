//! Keys with their hash computed once, before any lock is taken.
//!
//! The user's [`BuildHasher`](std::hash::BuildHasher) runs outside every lock
//! (a `Hash` that panics then leaves nothing half-done), and once per call:
//! the map behind a `SingleFlight` stores each key's hash beside it and
//! hashes with [`PassThrough`], which hands the stored number back, also when
//! the table grows.
//!
//! The stored hash is 32 bits (folded from the hasher's 64): beside it, in
//! what would be padding, sits the key's flight mark, so an entry with a
//! `u64` key and value is 32 bytes (a bare map's is 24).
//!
//! Lookups go through `dyn Lookup<Q>`: a [`Entry<K, T>`](Entry) borrows as it, so
//! a `&Q` (or an owned key) and its hash find an entry without building one.

use std::borrow::Borrow;
use std::cell::Cell;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::num::NonZeroU32;

use crate::epoch::Stamped;

/// Folds a 64-bit hash to the 32 bits the map keeps.
pub(crate) fn fold(hash: u64) -> u32 {
    (hash ^ (hash >> 32)) as u32
}

/// Spreads a kept hash back over 64 bits: the table indexes with the low
/// bits and tags with the top ones.
fn spread(hash: u32) -> u64 {
    let hash = u64::from(hash);
    hash << 32 | hash
}

/// A key and its hash.
#[derive(Clone, Debug)]
pub(crate) struct Hashed<K> {
    pub(crate) hash: u32,
    pub(crate) key: K,
}

/// A key's entry in the map: its hash, the flight in progress for it, the
/// key, and its stored value with the stamp of its epoch.
///
/// The map is a set of entries under the map lock; an entry changes through
/// `Cell`s, so that one probe finds it and changes it (a `HashMap` gives no
/// `&mut` to a value together with its key). `Hash` and `Eq` see only the
/// hash and the key, which never change.
pub(crate) struct Entry<K, T> {
    pub(crate) hash: u32,
    /// Where the key's flight in progress is in the flight table (plus one),
    /// if it has one.
    pub(crate) flight: Cell<Option<NonZeroU32>>,
    pub(crate) key: K,
    value: Cell<Option<Stamped<T>>>,
}

impl<K, T> Entry<K, T> {
    pub(crate) fn new(Hashed { hash, key }: Hashed<K>, value: Option<Stamped<T>>) -> Self {
        Self {
            hash,
            flight: Cell::new(None),
            key,
            value: Cell::new(value),
        }
    }

    /// Calls `read` with the stored value (which it may clone: if that
    /// panics, the value is still put back).
    pub(crate) fn value<R>(&self, read: impl FnOnce(Option<&Stamped<T>>) -> R) -> R {
        struct PutBack<'a, T> {
            cell: &'a Cell<Option<Stamped<T>>>,
            value: Option<Stamped<T>>,
        }
        impl<T> Drop for PutBack<'_, T> {
            fn drop(&mut self) {
                self.cell.set(self.value.take());
            }
        }
        let taken = PutBack {
            value: self.value.take(),
            cell: &self.value,
        };
        read(taken.value.as_ref())
    }

    /// Stores `value`; returns the one it replaces.
    pub(crate) fn replace_value(&self, value: Option<Stamped<T>>) -> Option<Stamped<T>> {
        self.value.replace(value)
    }

    pub(crate) fn into_value(self) -> Option<Stamped<T>> {
        self.value.into_inner()
    }
}

impl<K: Eq, T> PartialEq for Entry<K, T> {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        // Different hashes are different keys: `K::eq` runs only on a match.
        self.hash == other.hash && self.key == other.key
    }
}

impl<K: Eq, T> Eq for Entry<K, T> {}

impl<K, T> Hash for Entry<K, T> {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(spread(self.hash));
    }
}

/// Hashes a precomputed hash to itself.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, _: &[u8]) {
        unreachable!("the map hashes precomputed hashes only");
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// What the map hashes with.
pub(crate) type BuildPassThrough = BuildHasherDefault<PassThrough>;

/// An entry to look up: by key (the key and its hash), or by the flight
/// its key's entry marks ([`ByMark`], which runs no user code).
pub(crate) trait Lookup<Q: ?Sized> {
    fn hash(&self) -> u32;
    /// The key; `None` for a [`ByMark`] probe.
    fn key(&self) -> Option<&Q>;
    /// The flight the entry marks.
    fn flight(&self) -> Option<NonZeroU32>;
}

impl<K: Borrow<Q>, T, Q: ?Sized> Lookup<Q> for Entry<K, T> {
    #[inline]
    fn hash(&self) -> u32 {
        self.hash
    }

    #[inline]
    fn key(&self) -> Option<&Q> {
        Some(self.key.borrow())
    }

    #[inline]
    fn flight(&self) -> Option<NonZeroU32> {
        self.flight.get()
    }
}

impl<K: Borrow<Q>, Q: ?Sized> Lookup<Q> for Hashed<K> {
    #[inline]
    fn hash(&self) -> u32 {
        self.hash
    }

    #[inline]
    fn key(&self) -> Option<&Q> {
        Some(self.key.borrow())
    }

    #[inline]
    fn flight(&self) -> Option<NonZeroU32> {
        None
    }
}

/// A borrowed key and its hash.
pub(crate) struct Probe<'q, Q: ?Sized> {
    pub(crate) hash: u32,
    pub(crate) key: &'q Q,
}

impl<Q: ?Sized> Lookup<Q> for Probe<'_, Q> {
    #[inline]
    fn hash(&self) -> u32 {
        self.hash
    }

    #[inline]
    fn key(&self) -> Option<&Q> {
        Some(self.key)
    }

    #[inline]
    fn flight(&self) -> Option<NonZeroU32> {
        None
    }
}

/// Finds the entry that marks a flight: its key's hash and the mark. It
/// compares marks, never keys, so finding a flight's own entry again runs no
/// user code (it may happen in a drop, during a panic).
pub(crate) struct ByMark {
    pub(crate) hash: u32,
    pub(crate) flight: NonZeroU32,
}

impl<Q: ?Sized> Lookup<Q> for ByMark {
    #[inline]
    fn hash(&self) -> u32 {
        self.hash
    }

    #[inline]
    fn key(&self) -> Option<&Q> {
        None
    }

    #[inline]
    fn flight(&self) -> Option<NonZeroU32> {
        Some(self.flight)
    }
}

impl<Q: ?Sized + Eq> PartialEq for dyn Lookup<Q> + '_ {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        if self.hash() != other.hash() {
            return false;
        }
        match (self.key(), other.key()) {
            (Some(mine), Some(theirs)) => mine == theirs,
            // One side is a `ByMark` probe: the same flight's entry.
            _ => self.flight().is_some() && self.flight() == other.flight(),
        }
    }
}

impl<Q: ?Sized + Eq> Eq for dyn Lookup<Q> + '_ {}

impl<Q: ?Sized> Hash for dyn Lookup<Q> + '_ {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(spread(Lookup::hash(self)));
    }
}

impl<'a, K: Borrow<Q> + 'a, T: 'a, Q: ?Sized + 'a> Borrow<dyn Lookup<Q> + 'a> for Entry<K, T> {
    #[inline]
    fn borrow(&self) -> &(dyn Lookup<Q> + 'a) {
        self
    }
}

/// `probe` as the map looks it up.
pub(crate) fn lookup<'a, Q: ?Sized, L: Lookup<Q> + 'a>(probe: &'a L) -> &'a (dyn Lookup<Q> + 'a) {
    probe
}
